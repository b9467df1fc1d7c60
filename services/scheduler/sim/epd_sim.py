"""Multimodal requests in the simulator: an encode cost per image, and where encoding runs.

`ImageSimRequest` is a trace request with one image at the front of its prompt. Its prompt
tokens stand for the image by its id (every token of the image is `-(IMAGE_TOKEN_BASE +
image_id)`), so two requests with the same image share the image's KV blocks in the
engine's prefix cache, as the live engine's block hashes see an image by its content hash.

Where its image is encoded (the topologies of report §3.3):

  * in the instance that prefills it (EPD colocated, EP+D): the step whose chunk first
    reaches an image token also runs the tower on the image (`multimodal._encode_needed`),
    unless a prefix hit covered it, adding `EncodeCost.batch_seconds` of that step's images;
  * on an encoder (E+PD, E+P+D: `SimEncoder`, `services/encoder`): chosen by the image (as
    `encode.pick_encoder` by content), images queue there and run in tower calls of up to
    `max_batch` images; a cached image (by id) costs no tower time; the embeddings then take
    `bytes / interconnect_bw` to reach the instance, and only then is the request placed;
  * on a decode instance that also serves encodes (ED+P, `--encode-on decode`): the same
    encoder queue, but its tower calls are part of that instance's steps, at most
    `max_encode_batch` images (`max_encode_tokens` tokens) a step (the engine's encode
    budget, the profiler's numbers), so they lengthen the decodes' steps as live.

Times still come from the cost model for the model's steps, plus the encode cost here, and
two things of the machine the profiler measured (`EpdProfile.hops`, `.cores`):

  * the trips between processes (`HopCost`): a request reaches its instance (or encoder)
    `dispatch_messages` NATS messages after it is sent (the first token's way back to the
    gateway counted there too), embeddings and a prefill's KV move at the measured
    Mooncake latency and bandwidth, the KV's arrival announced by one more message;
  * the CPU the processes share: with `cores` > 0, the instances' steps and the encoders'
    tower calls are jobs of a processor-sharing queue (`epd_cpu.CpuShare`): while b
    processes are busy, each runs at min(1, cores / b) of its measured speed, so its step
    stretches by b / cores when oversubscribed.
  * the serving path's CPU outside the steps (`ServingCpu`, measured live): on arrival the
    front's and nats-server's share of the request and the loop of the instance that takes
    it, before it is sent on; at each step, the instance's loop for the tokens it streams
    (lengthening the step) and the front's for passing them on (beside it); at a handoff
    the decode instance's loop again, at an encoder its loop per image: so a request that
    crosses more processes costs more CPU on the shared cores, as live.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from services.scheduler.sim.epd_cpu import CpuShare
from services.scheduler.sim.epd_profile import EncodeCost, HopCost, ServingCpu
from services.scheduler.sim.instance import ScheduledStep, SimInstance, SimRequest
from services.scheduler.sim.simulator import ARRIVE, CALL, KV_LANDED, STEP_DONE, Simulator

ENCODER_MAX_BATCH = 8
"""The encoder service's `--max-batch-images` default (services/encoder/config.py)."""
IMAGE_TOKEN_BASE = 1 << 40
"""Image tokens are -(base + image id): never a trace block id (>= 0) or a request's own
tokens (-serial)."""


@dataclass
class ImageSimRequest(SimRequest):
    image_tokens: int = 0
    """The image's tokens, the first of the prompt."""
    image_id: int = 0
    encoded: bool = False
    """Its embeddings exist (an encoder made them, or the instance's step did)."""

    def prompt_token_ids(self) -> list[int]:
        image = [-(IMAGE_TOKEN_BASE + self.image_id)] * self.image_tokens
        return image + [-self.serial] * (self.num_prompt_tokens - self.image_tokens)


class SimEncoder:
    """One encoder's queue, cache and counters; `host`: the instance whose steps run it."""

    def __init__(self, encoder_id: str, max_batch: int, max_tokens: int = 0, host: str = ""):
        self.encoder_id = encoder_id
        self.max_batch = max(1, max_batch)
        self.max_tokens = max_tokens
        """Vision tokens per tower call, at least one image (0 = no limit)."""
        self.host = host
        self.queue: deque[ImageSimRequest] = deque()
        self.running: list[ImageSimRequest] = []
        self.cache: set[int] = set()
        """Image ids encoded here (an LRU of embeddings large enough to keep them all)."""
        self.busy = False
        self.busy_time = 0.0
        self.num_batches = 0
        self.num_images = 0
        self.num_queries = 0
        self.num_hits = 0

    def take_batch(self) -> list[ImageSimRequest]:
        batch: list[ImageSimRequest] = []
        tokens = 0
        while self.queue and len(batch) < self.max_batch:
            nxt = self.queue[0].image_tokens
            if batch and self.max_tokens and tokens + nxt > self.max_tokens:
                break
            batch.append(self.queue.popleft())
            tokens += nxt
        if batch:
            self.num_batches += 1
        self.running = batch
        return batch


class EpdSimulator(Simulator):
    """`Simulator` with image requests encoded where the topology says (module docstring)."""

    def __init__(
        self,
        *args,
        encode: EncodeCost,
        num_encoders: int = 0,
        encode_on: str = "",
        encoder_max_batch: int = ENCODER_MAX_BATCH,
        max_encode_batch: int = 0,
        max_encode_tokens: int = 0,
        hops: HopCost | None = None,
        cores: int = 0,
        serving_cpu: ServingCpu | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.encode = encode
        self.hops = hops = hops or HopCost()
        """What a request's trips between processes cost (default: nothing)."""
        self.cpu = CpuShare(cores) if cores > 0 else None
        """The cores the instances and encoders share (None: a core each)."""
        self.serving = serving_cpu or ServingCpu()
        """The serving path's CPU outside the steps (default: none)."""
        self.encoders = [SimEncoder(f"encode-{i}", encoder_max_batch) for i in range(num_encoders)]
        if encode_on:  # ED+P: the decode instances host the encoders
            self.encoders += [
                SimEncoder(
                    f"{inst.instance_id}-enc",
                    max_encode_batch or 1,
                    max_encode_tokens,
                    host=inst.instance_id,
                )
                for inst in self.instances
                if inst.role == encode_on
            ]
        self._hosted = {e.host: e for e in self.encoders if e.host}
        self._messages = hops.dispatch_messages(
            encoder=bool(self.encoders), disaggregated=any(r != "both" for r in self.cluster.roles)
        )
        self._dispatch = hops.message * self._messages
        self._closed: deque[SimRequest] = deque()
        """Closed loop: requests not yet sent, each sent when one in flight is done."""

    def run_closed(self, requests: list[SimRequest], concurrency: int) -> list[SimRequest]:
        """Closed loop, as a benchmark client with `concurrency` threads: the first
        `concurrency` requests at t = 0, each later one the moment an earlier one is done
        (its `arrival` set then)."""
        first, self._closed = requests[:concurrency], deque(requests[concurrency:])
        for req in first:
            req.arrival = 0.0
        self.run(first)
        return list(requests)

    def _done(self, req: SimRequest) -> None:
        super()._done(req)
        if req.priority == 0 and self._closed:
            following = self._closed.popleft()
            following.arrival = self.now
            self._push(self.now, ARRIVE, following)

    # -- the machine: shared cores, trips between processes --------------------------------

    def _push(self, at: float, kind: int, payload: object) -> None:
        if kind != STEP_DONE:
            super()._push(at, kind, payload)
            return
        step = payload[1]  # type: ignore[index]
        tokens = (
            (len(step.shape.decode_context_lens) + step.shape.num_prefill_samples) if step else 0
        )
        loop = self.serving.instance_token * tokens  # the instance streams them out
        if self.cpu is None:
            super()._push(at + loop, kind, payload)
            return
        self._on_cpu(at - self.now + loop, kind, payload)  # a step: work on the shared cores
        front = (self.serving.front_token + self.serving.nats_token) * tokens
        if front:  # the gateway, nats-server, the client pass them on, beside the steps
            self._on_cpu(front, CALL, (_nothing, ()))

    def _on_cpu(self, work: float, kind: int, payload: object) -> None:
        """Run `work` seconds on the shared cores; then the event (`kind`, `payload`)."""
        if self.cpu is None:
            super()._push(self.now + work, kind, payload)
            return
        self.cpu.start(self.now, work, (kind, payload))
        self._next_cpu_end()

    def _next_cpu_end(self) -> None:
        at = self.cpu.next_end()  # type: ignore[union-attr]
        if at is not None:
            super()._push(at, CALL, (self._cpu_end, (self.cpu.version,)))  # type: ignore[union-attr]

    def _cpu_end(self, version: int) -> None:
        if version != self.cpu.version:  # type: ignore[union-attr]
            return  # the share changed since: a later end was announced
        for kind, payload in self.cpu.take_done(self.now):  # type: ignore[union-attr]
            super()._push(self.now, kind, payload)
        self._next_cpu_end()

    def _transfer_seconds(self, nbytes: int) -> float:
        """A Mooncake transfer: measured, else the hardware profile's link."""
        if self.hops.transfer_bw:
            return self.hops.transfer_seconds(nbytes)
        return self.hw.transfer_latency + nbytes / self.hw.interconnect_bw

    def _on_arrival(self, req: SimRequest) -> None:
        """The front takes the request in, its messages pass nats-server and the instance
        that runs its prompt takes it (CPU, then the messages' latency)."""
        cpu = self.serving
        work = cpu.front_request + cpu.nats_message * self._messages + cpu.instance_request
        if work:
            self._on_cpu(work, CALL, (self._sent, (req,)))
        else:
            self._sent(req)

    def _sent(self, req: SimRequest) -> None:
        if self._dispatch:  # the messages on its way to an instance (or encoder)
            self._push(self.now + self._dispatch, CALL, (self._dispatched, (req,)))
        else:
            self._dispatched(req)

    def _hand_over(self, source: SimInstance, req: SimRequest) -> None:
        """One more process takes the request over: its loop's CPU, the notification's."""
        work = self.serving.instance_request + self.serving.nats_message
        if work:
            self._on_cpu(work, CALL, (self._send_kv, (source, req)))
        else:
            self._send_kv(source, req)

    def _send_kv(self, source: SimInstance, req: SimRequest) -> None:
        if not self.hops.transfer_bw:
            super()._hand_over(source, req)
            return
        nbytes = req.num_prompt_tokens * self.model.kv_bytes_per_token
        delay = self._transfer_seconds(nbytes) + self.hops.message  # then the notification
        target = self._by_id[req.decode_instance_id]  # type: ignore[index]
        self._push(self.now + delay, KV_LANDED, (source, target, req))

    # -- encoders --------------------------------------------------------------------------

    def _dispatched(self, req: SimRequest) -> None:
        if not isinstance(req, ImageSimRequest) or req.encoded or not self.encoders:
            self._place(req)
            return
        encoder = self.encoders[req.image_id % len(self.encoders)]  # by content, as live
        encoder.num_queries += 1
        if req.image_id in encoder.cache:
            encoder.num_hits += 1
            self._embeddings_ready(req)
            return
        encoder.queue.append(req)
        self._kick_encoder(encoder)

    def _kick_encoder(self, encoder: SimEncoder) -> None:
        if encoder.host:
            self._kick(self._by_id[encoder.host])  # its next step takes the images
            return
        if encoder.busy or not encoder.queue:
            return
        batch = encoder.take_batch()
        seconds = self.encode.batch_seconds([r.image_tokens for r in batch])
        seconds += self.serving.encoder_request * len(batch)  # its loop: each image's request
        encoder.busy = True
        encoder.busy_time += seconds
        self._on_cpu(seconds, CALL, (self._encoder_done, (encoder,)))

    def _encoder_done(self, encoder: SimEncoder) -> None:
        encoder.busy = False
        self._encoded(encoder)
        self._kick_encoder(encoder)

    def _encoded(self, encoder: SimEncoder) -> None:
        for req in encoder.running:
            encoder.cache.add(req.image_id)
            encoder.num_images += 1
            self._embeddings_ready(req)
        encoder.running = []

    def _embeddings_ready(self, req: ImageSimRequest) -> None:
        """The instance reads the embeddings (Mooncake), then the request is placed."""
        req.encoded = True
        nbytes = self.encode.embedding_bytes(req.image_tokens)
        delay = self._transfer_seconds(nbytes)
        self._push(self.now + delay, CALL, (self._place, (req,)))

    # -- encoding inside instances' steps ------------------------------------------------------

    def _side_seconds(self, inst: SimInstance, step: ScheduledStep | None) -> float:
        tokens = []
        for item in step.output.scheduled if step is not None else ():
            req = inst.requests.get(item.seq.request_id)
            if (
                isinstance(req, ImageSimRequest)
                and not req.encoded
                and item.seq.num_computed_tokens < req.image_tokens
            ):
                req.encoded = True  # the engine keeps the embeddings while the sequence lives
                tokens.append(req.image_tokens)
        hosted = self._hosted.get(inst.instance_id)
        if hosted is not None and hosted.queue:
            batch = hosted.take_batch()
            tokens += [r.image_tokens for r in batch]
        seconds = self.encode.batch_seconds(tokens)  # one tower call for the step's images
        if hosted is not None and hosted.running:
            hosted.busy_time += seconds
        return seconds

    def _side_done(self, inst: SimInstance) -> None:
        hosted = self._hosted.get(inst.instance_id)
        if hosted is not None and hosted.running:
            self._encoded(hosted)

    def encoder_stats(self) -> dict:
        """Over every encoder: batches, images encoded, cache hit rate."""
        queries = sum(e.num_queries for e in self.encoders)
        return {
            "encoders": len(self.encoders),
            "batches": sum(e.num_batches for e in self.encoders),
            "images_encoded": sum(e.num_images for e in self.encoders),
            "cache_hit_rate": sum(e.num_hits for e in self.encoders) / queries if queries else 0.0,
        }


def _nothing() -> None:
    """What CPU charged beside the steps leads to: nothing but the cores it took."""

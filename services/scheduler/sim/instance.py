"""A simulated instance: our engine's own `Scheduler` and `BlockManager`, with the forward pass
replaced by the cost model's step time.

`SimInstance` holds the real `xllm.engine.scheduler.Scheduler` over a real `BlockManager`
and drives it as `Engine.step` does: `schedule()` (here: returns the step and its shape for
the cost model), then, when the simulator says the step's time has passed, `update()` with
a sampled token for every sequence that samples. So the simulator gets the engine's chunked
prefill, online-before-offline priority, preemption (and swapping, given host blocks) and
prefix cache as they are, and cannot drift from them. What it leaves out is only the
tensors: the model, the sampler (every sampled token is `SAMPLED_TOKEN`, never an EOS, so a
request stops at its trace output length or the context) and KV copies (swaps cost no time).

Prompts have no text, so their tokens are made up (`SimRequest.prompt_token_ids`) so that
the engine's block hashes share exactly what the trace shares: each full trace block
(Mooncake `hash_ids`, 512 tokens) is 512 copies of its id, and the rest of the prompt is
unique to the request. The engine's prefix cache then hits whole trace blocks, as the
trace's granularity says it may.

PD disaggregation, as `xllm.instance` does it with the engine's PD calls: the decode half
comes first, reserving the prompt's blocks (`reserve`: `Scheduler.reserve`, queued while the
pool is short); once reserved, the prefill half starts on its instance as a `prefill_only`
sequence, held (its blocks kept) after its first token until its KV has landed in the
reservation (`release_prefilled`); then the decode side admits it (`add_prefilled`:
`admit_prefilled`). A role flip
(`set_role`) changes what the scheduler places here, never the sequences already here.

Heartbeats carry what `Instance.heartbeat` sends, from the same objects: the scheduler's
queues and `load_stats()`, the block manager's counts, and a `StepStats` fed each simulated
step (its seconds, prefill tokens and decodes) and each first token sampled here.
"""

from __future__ import annotations

import copy
import itertools
from collections import deque
from dataclasses import dataclass, field

from services.scheduler.cost_model import StepShape
from services.scheduler.sim.tiers import SimTiers, TierSetup
from xllm.engine.block_manager import BlockManager
from xllm.engine.prefix_hash import block_hashes
from xllm.engine.scheduler import Scheduler, SchedulerOutput
from xllm.engine.sequence import Sequence, SequenceStatus
from xllm.engine.step_stats import record_first_token, record_step
from xllm.protocol import Heartbeat, PreemptionStats, StepStats
from xllm.protocol.types import SamplingParams

HASH_BLOCK_TOKENS = 512
"""Tokens per trace prefix block (Mooncake's `hash_ids`)."""
SAMPLED_TOKEN = 0
"""The token every simulated sample yields (the scheduler knows no EOS here)."""

_serials = itertools.count(1)


@dataclass
class SimRequest:
    """One trace request as it moves through the cluster, with the times the report needs."""

    request_id: str
    arrival: float
    num_prompt_tokens: int
    output_len: int
    hash_ids: tuple[int, ...] = ()
    priority: int = 0
    """0 = online; > 0 = offline (the engine serves it after online work)."""
    instance_id: str | None = None
    """Where it runs (its prefill, when disaggregated)."""
    decode_instance_id: str | None = None
    """Where its decode runs, when disaggregated."""
    first_token_at: float | None = None
    finished_at: float | None = None
    num_cached_tokens: int = 0
    rejected: bool = False
    serial: int = field(default_factory=lambda: next(_serials), repr=False)
    """Unique in the process: what makes this request's own prompt tokens its own."""
    _block_hashes: list[int] | None = field(default=None, repr=False)

    def prompt_token_ids(self) -> list[int]:
        """Made-up prompt tokens sharing with other prompts exactly the trace's full blocks.
        Lists of repeated ints cost one pointer a token; built again when needed."""
        num_full = min(len(self.hash_ids), self.num_prompt_tokens // HASH_BLOCK_TOKENS)
        tokens = [h for h in self.hash_ids[:num_full] for _ in range(HASH_BLOCK_TOKENS)]
        own = -self.serial  # trace block ids are >= 0: never one of theirs
        return tokens + [own] * (self.num_prompt_tokens - len(tokens))

    def block_hashes(self, block_size: int) -> list[int]:
        """The engine's hash chain of the prompt's full blocks, computed once."""
        if self._block_hashes is None:
            self._block_hashes = block_hashes(self.prompt_token_ids(), block_size)
        return self._block_hashes


@dataclass(frozen=True, slots=True)
class InstanceSpec:
    """The engine options that shape batching (`EngineConfig`'s), plus the KV pool size."""

    num_kv_blocks: int
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 32768
    enable_prefix_caching: bool = True
    num_host_blocks: int = 0
    """Host swap space in blocks (`--swap-space-gb`): preempted offline work keeps its KV."""
    num_host_kv_blocks: int = 0
    """The host-memory KV tier in blocks (`--host-kv-gb`; sim/tiers.py); 0 = none."""
    kv_store: bool = False
    """Blocks also go to the cluster store (`--kv-store-master`), any instance loads them."""

    @property
    def has_tiers(self) -> bool:
        return self.num_host_kv_blocks > 0 or self.kv_store


@dataclass(frozen=True, slots=True)
class ScheduledStep:
    output: SchedulerOutput
    """What `Scheduler.schedule` returned."""
    shape: StepShape
    """What the cost model prices, taken before `update` changes the counts."""

    @property
    def is_empty(self) -> bool:
        return self.output.is_empty


def step_shape(out: SchedulerOutput) -> StepShape:
    decodes: list[int] = []
    chunks: list[tuple[int, int]] = []
    samples = 0
    for item in out.scheduled:
        seq = item.seq
        if item.num_new_tokens == 1 and seq.num_computed_tokens > 0:  # `model_runner.is_decode`
            decodes.append(seq.num_tokens)
            continue
        chunks.append((item.num_new_tokens, seq.num_computed_tokens))
        samples += item.samples
    return StepShape(tuple(decodes), tuple(chunks), samples)


class SimInstance:
    def __init__(
        self,
        instance_id: str,
        spec: InstanceSpec,
        role: str = "both",
        model: str = "m",
        tiers: TierSetup | None = None,
    ):
        self.instance_id = instance_id
        self.spec = spec
        self.role = role
        self.model = model
        self.block_manager = BlockManager(
            spec.num_kv_blocks, spec.block_size, spec.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            self.block_manager,
            spec.max_num_seqs,
            spec.max_num_batched_tokens,
            spec.max_model_len,
            num_host_blocks=spec.num_host_blocks,
        )
        self.requests: dict[str, SimRequest] = {}
        """The requests whose sequences are here (running, queued or held)."""
        self._held: dict[str, Sequence] = {}
        """Prefilled sequences holding their blocks until their KV lands elsewhere."""
        self._reservations: deque[SimRequest] = deque()
        """To be prefilled elsewhere, waiting for room to reserve their prompt's blocks."""
        self._reserved: dict[str, Sequence] = {}
        """Holding blocks for their prompt's KV, which another instance computes."""
        self.finished: list[SimRequest] = []
        """Requests finished here since the simulator last took them."""
        self.reserved: list[SimRequest] = []
        """Requests whose blocks were reserved since the simulator last took them: their
        prefill may start (live: the decode instance's `PrefillCmd`)."""
        self.busy = False
        self.busy_time = 0.0
        self.step_stats = StepStats()
        self.role_flips = 0
        self.kv_block_bytes = tiers.block_bytes if tiers else 0
        self.tiers: SimTiers | None = None
        """Host memory and the cluster store behind the device pool (sim/tiers.py)."""
        if tiers and spec.has_tiers and spec.enable_prefix_caching:
            self.tiers = SimTiers(
                self.block_manager,
                spec.num_host_kv_blocks,
                tiers.store,
                tiers.block_bytes,
                tiers.bandwidth,
            )
        self._loading: dict[str, tuple[Sequence, list[int], list[int]]] = {}
        """Waiting for their prefix blocks to be copied in from a slower tier."""

    # -- what the scheduler sees ---------------------------------------------------------------

    @property
    def num_preemptions(self) -> int:
        return self.scheduler.num_preemptions

    @property
    def prefix_queried_tokens(self) -> int:
        return self.block_manager.stats.queried_tokens

    @property
    def prefix_hit_tokens(self) -> int:
        return self.block_manager.stats.hit_tokens

    def heartbeat(self, sent_at: float) -> Heartbeat:
        """The heartbeat our instance would send now (see `Instance.heartbeat`)."""
        sched, bm = self.scheduler, self.block_manager
        return Heartbeat(
            instance_id=self.instance_id,
            role=self.role,  # type: ignore[arg-type]
            model=self.model,
            max_model_len=self.spec.max_model_len,
            kv_block_size=self.spec.block_size,
            kv_block_bytes=self.kv_block_bytes,
            max_num_batched_tokens=self.spec.max_num_batched_tokens,
            max_num_seqs=self.spec.max_num_seqs,
            sent_at=sent_at,
            role_flips=self.role_flips,
            load=sched.load_stats(self._reserved.values()),
            kv=bm.kv_stats(),
            steps=copy.copy(self.step_stats),  # this instance goes on counting in it
            preemption=PreemptionStats(
                num_preemptions=sched.num_preemptions,
                num_swapped=len(sched.swapped),
                num_swap_outs=sched.num_swap_outs,
                swap_out_blocks=sched.num_swapped_out_blocks,
                swap_in_blocks=sched.num_swapped_in_blocks,
            ),
        )

    def set_role(self, role: str) -> None:
        """`Instance._set_role`: new work by the new role; the sequences here stay as they are."""
        if role != self.role:
            self.role = role
            self.role_flips += 1

    def cached_prefix_tokens(self, req: SimRequest) -> int:
        """Prompt tokens this instance's prefix cache holds (what the kvstore would say)."""
        if not self.spec.enable_prefix_caching:
            return 0
        hashes = req.block_hashes(self.spec.block_size)
        blocks = self.block_manager.cached_blocks_of(hashes, req.num_prompt_tokens)
        return len(blocks) * self.spec.block_size

    def usable_hit(self, req: SimRequest, tokens: int) -> int:
        """What the engine can reuse of a `tokens` prefix: whole KV blocks, never the last
        prompt token (its logits are needed), nothing without prefix caching."""
        if not self.spec.enable_prefix_caching:
            return 0
        limit = (req.num_prompt_tokens - 1) // self.spec.block_size * self.spec.block_size
        return min(tokens, limit)

    # -- requests ---------------------------------------------------------------------------------

    def prefix_tiers(self, req: SimRequest, num_device_tokens: int) -> dict[str, int]:
        """The kvstore's tiers of this instance's hit, given its device hit in tokens."""
        if self.tiers is None:
            return (
                {"device": num_device_tokens // self.spec.block_size} if num_device_tokens else {}
            )
        limit = (req.num_prompt_tokens - 1) // self.spec.block_size
        hashes = req.block_hashes(self.spec.block_size)
        return self.tiers.prefix_tiers(hashes, num_device_tokens // self.spec.block_size, limit)

    def add(self, req: SimRequest, hand_over: bool = False, now: float = 0.0) -> float | None:
        """`Engine.add_request`; `hand_over`: only its prefill runs here (`prefill_only`).
        Returns the seconds it first waits for its prefix to load from a slower tier (then
        `finish_load`), or None: queued now."""
        self.requests[req.request_id] = req
        seq = self._sequence(req, now, prefill_only=hand_over)
        if self.tiers is not None:
            limit = (req.num_prompt_tokens - 1) // self.spec.block_size
            per_token = self.step_stats.recent_prefill_seconds_per_token
            load = self.tiers.start_load(seq.block_hashes, limit, per_token)
            if load is not None:
                block_ids, hashes, seconds = load
                self._loading[req.request_id] = (seq, block_ids, hashes)
                return seconds
        self.scheduler.add(seq)
        return None

    def finish_load(self, req: SimRequest) -> None:
        """Its prefix blocks are in the device pool: queue it, to find them cached."""
        seq, block_ids, hashes = self._loading.pop(req.request_id)
        self.tiers.finish_load(block_ids, hashes)  # type: ignore[union-attr]
        self.scheduler.add(seq)

    def reserve(self, req: SimRequest, now: float) -> None:
        """Placed here as a decode half (`DecodeCmd`): hold blocks for its prompt
        (`reserve_remote_prefill`), at once or once room frees; see `reserved`."""
        self.requests[req.request_id] = req
        self._reservations.append(req)
        self._reserve_waiting(now)

    def add_prefilled(self, req: SimRequest, now: float) -> None:
        """Its KV and first token have landed in the reserved blocks: decode it
        (`commit_remote_prefill`)."""
        seq = self._reserved.pop(req.request_id)
        if self.scheduler.admit_prefilled(seq, SAMPLED_TOKEN) is not None:
            self._finish(req, now)  # that first token was its last
            self._reserve_waiting(now)

    def release_prefilled(self, req: SimRequest) -> None:
        """Its KV has landed on the decode instance: free the blocks it held here."""
        self.scheduler.finish(self._held.pop(req.request_id), None)
        del self.requests[req.request_id]

    def _reserve_waiting(self, now: float) -> None:
        while self._reservations:
            req = self._reservations[0]
            seq = self._sequence(req, now)
            if not self.scheduler.reserve(seq):
                return  # in order: a step that frees blocks tries again
            self._reservations.popleft()
            self._reserved[req.request_id] = seq
            self.reserved.append(req)

    def _sequence(self, req: SimRequest, now: float, prefill_only: bool = False) -> Sequence:
        params = SamplingParams(max_tokens=req.output_len, ignore_eos=True)
        seq = Sequence(
            req.request_id,
            req.prompt_token_ids(),
            params,
            arrival_time=now,
            prefill_only=prefill_only,
            priority=req.priority,
        )
        if self.spec.enable_prefix_caching:  # hashed once per request, not per instance
            seq.block_hashes = list(req.block_hashes(self.spec.block_size))
        return seq

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- one step -----------------------------------------------------------------------------------

    def schedule(self) -> ScheduledStep:
        """`Scheduler.schedule`, with the step's shape for the cost model."""
        out = self.scheduler.schedule()
        return ScheduledStep(out, step_shape(out))

    def update(self, step: ScheduledStep, now: float, seconds: float = 0.0) -> list[SimRequest]:
        """`Scheduler.update` with a sampled token for each sequence that samples; returns
        the requests whose part here is done: finished, or prefilled and ready to hand over
        (`is_prefilled`). `seconds`: the step's duration (`Engine._measure`)."""
        self.step_stats.num_steps += 1
        out = step.output
        num_decodes = len(step.shape.decode_context_lens)
        record_step(self.step_stats, seconds, out.num_tokens - num_decodes, num_decodes)
        sampled = {item.seq.seq_id: SAMPLED_TOKEN for item in out.scheduled if item.samples}
        done = []
        for seq in self.scheduler.update(out, sampled):
            req = self.requests[seq.request_id]
            if seq.num_output_tokens == 1:  # a prompt's first token, sampled here
                record_first_token(self.step_stats, now - seq.arrival_time)
                req.num_cached_tokens = seq.num_cached_tokens
                if req.first_token_at is None:
                    req.first_token_at = now
            if seq.status is SequenceStatus.HELD:
                self._held[seq.request_id] = seq
                done.append(req)
            elif seq.is_finished:
                self._finish(req, now)
                done.append(req)
        self._reserve_waiting(now)  # the step may have freed blocks
        if self.tiers is not None:
            self.tiers.write_through()
        return done

    def is_prefilled(self, req: SimRequest) -> bool:
        """Prefilled here and held for its decode instance."""
        return req.request_id in self._held

    def _finish(self, req: SimRequest, now: float) -> None:
        req.finished_at = now
        del self.requests[req.request_id]
        self.finished.append(req)

    def take_finished(self) -> list[SimRequest]:
        finished, self.finished = self.finished, []
        return finished

    def take_reserved(self) -> list[SimRequest]:
        reserved, self.reserved = self.reserved, []
        return reserved

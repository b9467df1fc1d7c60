"""The EPD profiler's measurements, on the real engine in this process.

Three things, all timed on one `Engine` (calibrate.py's `EngineBench`, one thread, CPU time):

  * steps of a running decode batch plus an encode batch of b images (plus t prefill
    tokens): each image is a request whose prompt is the image and one text token, all but
    its last image token counted as computed, so its 2-token chunk makes the step run the
    vision tower on the whole image, as a prefill reaching an image does; the budgets are
    binary-searched on these (`epd_profile.search_budgets`);
  * the vision tower alone on images of the workload's sizes, batched 1 and 4 (the encode
    cost per image size, `fit_encode_cost`) and the bytes of its embeddings, and decoding
    such an image's file (as the process that encodes it does first);
  * a small grid of decode and prefill steps fitted into a `HardwareProfile` (calibrate.py's
    fit), for the simulator's language-model steps;

and, outside the engine (`epd_hops.py`), a NATS message's and a Mooncake read's cost (the
hardware profile's link between instances is the measured Mooncake one), and the cores
this process may run on (what the deployment's processes will share).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from services.scheduler.sim import calibrate as cal
from services.scheduler.sim.epd_hops import measure_hops
from services.scheduler.sim.epd_profile import EpdProfile, fit_encode_cost, search_budgets
from xllm.engine.multimodal import ImageInput, random_image_bytes
from xllm.hardware import HardwareProfile


class EpdBench(cal.EngineBench):
    """`EngineBench` with image requests whose step encodes their image."""

    def __init__(self, model_dir: str | Path, dtype: str, max_batch: int, max_ctx: int):
        super().__init__(model_dir, dtype, max_batch, max_ctx)
        processor = self.engine.image_processor
        if processor is None:
            raise ValueError(f"{model_dir} takes no images: nothing to profile for EPD")
        self.processor = processor
        self.image_token_id = self.engine.runner.model.image_token_id
        self._images: dict[tuple[int, int], ImageInput] = {}

    def image(self, height: int, width: int) -> ImageInput:
        key = (height, width)
        if key not in self._images:
            data = random_image_bytes(height, width, seed=height * 7919 + width)
            self._images[key] = ImageInput.from_bytes(data, self.processor)
        return self._images[key]

    def _add_image(self, image: ImageInput) -> str:
        from xllm.protocol.types import SamplingParams

        rid = f"epd-{next(self._ids)}"
        params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        fresh = replace(image, embeddings=None)  # the step must encode it
        self.engine.add_request(rid, [self.image_token_id, 11], params, images=[fresh])
        seq = self.engine.sequences[rid][0]
        # The chunk: the last image token and the text token.
        self._run_as_prefilled(rid, seq.num_tokens - 2)
        return rid

    def step_seconds(
        self, decodes: int, ctx: int, image: ImageInput, repeats: int = 3
    ) -> Callable[[int, int], float]:
        """`f(images, prefill_tokens)`: median seconds of a step of `decodes` sequences at
        `ctx` plus that many images and a fresh prompt of that many tokens."""

        def measure(num_images: int, prefill: int) -> float:
            for _ in range(decodes):
                self._add(ctx, computed=ctx - 1)
            times = []
            for _ in range(repeats):
                added = [self._add_image(image) for _ in range(num_images)]
                if prefill:
                    added.append(self._add(prefill, max_tokens=1))
                _, seconds = self._timed_step()
                times.append(seconds)
                for rid in added:
                    self.engine.abort_request(rid)
            self._abort_all()
            return sorted(times)[len(times) // 2]

        return measure

    def decode_seconds(self, height: int, width: int, repeats: int = 3) -> float:
        """Median seconds of decoding and preprocessing a noise PNG of this size (what the
        instance or encoder that encodes an image does with its file first)."""
        data = random_image_bytes(height, width, seed=height * 7919 + width)
        times = []
        for _ in range(repeats):
            start = self.clock()
            ImageInput.from_bytes(data, self.processor)
            times.append(self.clock() - start)
        return sorted(times)[len(times) // 2]

    @torch.inference_mode()
    def tower_seconds(self, images: list[ImageInput], repeats: int = 3) -> tuple[float, int]:
        """(median seconds of one tower call on `images`, embedding bytes per token)."""
        model = self.engine.runner.model
        pixels = torch.cat([im.pixel_values for im in images]).to(model.visual.dtype)
        grids = [im.grid_thw for im in images]
        model.encode_images(pixels, grids)  # warm
        times = []
        for _ in range(repeats):
            start = self.clock()
            out = model.encode_images(pixels, grids)
            times.append(self.clock() - start)
        return sorted(times)[len(times) // 2], out.shape[1] * out.element_size()


def lm_grid(decode_batch: int, ctx: int) -> tuple[list[cal.Shape], list[cal.Shape]]:
    """Train and held-out shapes around the workload's decode batch and prompt length."""
    batches = sorted({1, max(1, decode_batch // 2), decode_batch, 2 * decode_batch})
    train = [cal.decode(b, c) for b in batches for c in (ctx, 4 * ctx)]
    train += [cal.prefill(p) for p in (ctx // 2, ctx, 4 * ctx)] + [cal.prefill(ctx, ctx)]
    held_out = [cal.decode(decode_batch, 2 * ctx), cal.mixed(decode_batch, ctx, ctx)]
    return train, held_out


def usable_cores() -> int:
    """The cores this process may run on (its affinity: a container's or taskset's limit)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def profile_epd(
    model_dir: str | Path,
    sizes: list[tuple[int, int]],
    tpot_slo: float,
    decode_batch: int = 8,
    decode_ctx: int = 128,
    dtype: str = "float32",
    max_images: int = 64,
    max_prefill_tokens: int = 2048,
    log: Callable[[str], None] = lambda _: None,
    nats_url: str = "",
    cores: int = 0,
) -> tuple[EpdProfile, HardwareProfile]:
    """Measure `model_dir` for EPD: `sizes` are (height, width) of the workload's images,
    the first the median one (the encode batch's); `tpot_slo` 0 = 4 x the decode step;
    `nats_url` the NATS server to time messages through ('' = one started for it);
    `cores` 0 = `usable_cores()`."""
    flops, bw = cal.measure_peaks(dtype)
    max_ctx = max(4 * decode_ctx + 64, max_prefill_tokens)
    bench = EpdBench(model_dir, dtype, decode_batch * 2 + max_images, max_ctx)
    median = bench.image(*sizes[0])
    merge = bench.engine.runner.model.vision_config.spatial_merge_size
    tokens = median.grid_thw[1] * median.grid_thw[2] // merge**2
    measure = bench.step_seconds(decode_batch, decode_ctx, median)
    measure(1, 16)  # the first steps are slow
    points: list[dict] = []

    def step(num_images: int, prefill: int) -> float:
        seconds = measure(num_images, prefill)
        points.append({"decodes": decode_batch, "images": num_images,
                       "prefill_tokens": prefill, "seconds": seconds})  # fmt: skip
        log(f"decode {decode_batch}x{decode_ctx} + {num_images} images + {prefill} tokens: "
            f"{seconds * 1e3:.1f} ms")  # fmt: skip
        return seconds

    decode_step = step(0, 0)
    if tpot_slo <= 0:
        tpot_slo = 4 * decode_step  # the default: room for a few times the decodes' work
        log(f"TPOT SLO: {tpot_slo * 1e3:.1f} ms (4 x the decode step)")
    max_encode, max_prefill = search_budgets(step, tpot_slo, max_images, max_prefill_tokens)
    samples, decodes, per_token = [], {}, 0
    for h, w in sizes:
        image = bench.image(h, w)
        n = image.grid_thw[1] * image.grid_thw[2] // merge**2
        decodes[n] = bench.decode_seconds(h, w)
        log(f"decoding a {h}x{w} PNG ({n} tokens): {decodes[n] * 1e3:.2f} ms")
        for batch in (1, 4):
            seconds, per_token = bench.tower_seconds([image] * batch)
            samples.append((batch, n, seconds))
            log(f"tower: {batch} x {h}x{w} ({n} tokens): {seconds * 1e3:.2f} ms")
    encode = replace(
        fit_encode_cost(samples, per_token), decode_points=tuple(sorted(decodes.items()))
    )
    hops = measure_hops(encode.embedding_bytes(tokens), nats_url, log)
    train, held_out = lm_grid(decode_batch, decode_ctx)
    data = cal.measure_all(bench, [*train, *held_out], rounds=2, repeats=3, warmup=1, log=log)
    base = HardwareProfile(
        name=f"epd-{Path(model_dir).name}", peak_flops={dtype: flops}, mem_bw=bw,
        interconnect_bw=hops.transfer_bw, memory_bytes=cal._memory_bytes(),
        kv_cache_bytes=2 * 2**30, transfer_latency=hops.transfer_latency,
        source=f"fitted by `xllm sim profile-epd`, model {Path(model_dir).name} ({dtype})",
    )  # fmt: skip
    hw = cal.fit_factors(bench.model, data[: len(train)], base)
    hw = replace(hw, fit=cal.fit_summary(bench.model, hw, data[: len(train)], data[len(train) :]))
    profile = EpdProfile(
        model=Path(model_dir).name, tpot_slo=tpot_slo, decode_batch=decode_batch,
        decode_ctx=decode_ctx, decode_step=decode_step, image_tokens=tokens,
        max_encode_batch=max_encode, max_encode_tokens=max_encode * tokens,
        max_prefill_tokens=max_prefill, encode=encode, step_points=points, hops=hops,
        cores=cores or usable_cores(),
    )  # fmt: skip
    return profile, hw

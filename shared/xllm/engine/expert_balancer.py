"""ExpertBalancer: a MoE model's expert placement at runtime — sharding, load, re-placement.

Owns every MoE layer's `FusedExperts` (models/moe.py) after loading:

* expert parallelism (`--expert-parallel-size` R > 1, torch.distributed already initialised
  with R ranks): each rank computes its share of the slots and the layer output is summed
  over ranks; every rank runs the same steps on the same tokens (replicated attention), so
  they decide the same placements from the same counts. The ranks' engines must be fed the
  same requests in the same order and schedule alike: a served expert-parallel instance
  (xllm.instance.expert_group) sends its followers rank 0's commands and the step times
  the offline budget is priced by; adaptive speculation is not served there;
* load: the layers count (token, choice) pairs per expert and per slot in counter tensors
  every forward pass; this reads them once per balancing window, never per token;
* EPLB (`--num-redundant-experts` > 0; `--eplb-interval` N > 0): every N steps the window's
  imbalance is measured (stats) and its expert load joins a decayed load history, which goes
  to the pure policy (eplb.py); when redundant slots exist and its placement would cut the
  history's max/mean tokens per copy by at least `MIN_GAIN` against the current placement's,
  the new slot weights are staged
  into a second buffer on a background thread while serving goes on, and switched in at the
  step boundary `STAGE_STEPS` later (the same step on every rank: the switch waits for the
  copy if it is not done). Copies of an expert hold identical weights, so outputs do not
  change, only which copy computes them.

Memory: every rank holds every logical expert's weights (the checkpoint's, the staging
source), and its slots' packed copies for the native kernels (bf16 on CPU; as a dense Linear
keeps one); a slot's plain weights are views. A real multi-node EP would hold only its own
experts and fetch a moved one from its owner.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn

from xllm.config import EngineConfig
from xllm.engine import eplb
from xllm.models.moe import ExpertPlacement, FusedExperts
from xllm.protocol.stats import ExpertStats

log = logging.getLogger(__name__)

MIN_GAIN = 0.05
"""Re-place only when the policy expects max/mean per copy to drop by at least this share."""
HISTORY_DECAY = 0.5
"""Weight of the load history against the newest window (each older window counts half)."""
STAGE_STEPS = 2
"""Steps between a re-placement decision and its switch (the copy runs meanwhile)."""


class ExpertBalancer:
    def __init__(self, layers: list[FusedExperts], config: EngineConfig):
        self.layers = layers
        self.interval = config.eplb_interval
        self.replicate = config.num_redundant_experts > 0
        self.num_ranks = config.expert_parallel_size
        num_experts = layers[0].num_experts
        self.num_slots = num_experts + config.num_redundant_experts
        if self.num_slots % self.num_ranks:
            raise ValueError(
                f"{num_experts} experts + {config.num_redundant_experts} redundant copies "
                f"do not split over {self.num_ranks} expert-parallel ranks"
            )
        if self.num_ranks > 1:
            rank = _expert_parallel_rank(self.num_ranks)
            for layer in layers:
                layer.shard(rank, self.num_ranks)
        # Before any load is seen: every expert equally hot, so the spares go to the first.
        initial = eplb.place([1.0] * num_experts, self.num_slots, self.num_ranks)
        for layer in layers:
            layer.place(ExpertPlacement.of(initial, num_experts))
        self.num_steps = 0
        self.stats = ExpertStats(
            num_moe_layers=len(layers), num_experts=num_experts, num_slots=self.num_slots
        )
        self._window_expert = [layer.expert_load.clone() for layer in layers]
        self._window_slot = [layer.slot_load.clone() for layer in layers]
        self._placed_slot = [layer.slot_load.clone() for layer in layers]
        """The slot counters when the current placement went in."""
        self._history = [[0.0] * num_experts for _ in layers]
        """Tokens per expert and layer, decayed by HISTORY_DECAY per window."""
        self._staging: Future | None = None
        self._switch_at = 0
        self._executor: ThreadPoolExecutor | None = None

    @classmethod
    def for_model(cls, model: nn.Module, config: EngineConfig) -> ExpertBalancer | None:
        """The balancer of `model`'s MoE layers; None for a dense model."""
        layers = [m for m in model.modules() if isinstance(m, FusedExperts)]
        if not layers:
            if config.num_redundant_experts or config.expert_parallel_size > 1:
                raise ValueError("expert options given, but the model has no MoE layers")
            return None
        return cls(layers, config)

    def before_step(self) -> None:
        """Called at every step boundary, before the forward pass."""
        self.num_steps += 1
        if self._staging is not None and self.num_steps >= self._switch_at:
            self._staging.result()  # the copy must be done everywhere by now
            self._staging = None
            self.stats.imbalance_before_rebalance = self._placement_imbalance()
            for layer in self.layers:
                layer.commit()
            self.stats.num_rebalances += 1
            self._placed_slot = [layer.slot_load.clone() for layer in self.layers]
            self._window_slot = [layer.slot_load.clone() for layer in self.layers]
            self._window_expert = [layer.expert_load.clone() for layer in self.layers]
            return
        if self.interval and self.num_steps % self.interval == 0 and self._staging is None:
            self._end_window()

    def _end_window(self) -> None:
        """Measure the window that just ended; start a re-placement if it pays."""
        expert_load = [
            (layer.expert_load - start).tolist()
            for layer, start in zip(self.layers, self._window_expert, strict=True)
        ]
        slot_load = [
            (layer.slot_load - start).tolist()
            for layer, start in zip(self.layers, self._window_slot, strict=True)
        ]
        self._window_expert = [layer.expert_load.clone() for layer in self.layers]
        self._window_slot = [layer.slot_load.clone() for layer in self.layers]
        self.stats.recent_imbalance = _mean(eplb.imbalance(loads) for loads in slot_load)
        self.stats.recent_rank_imbalance = _mean(
            eplb.imbalance(eplb.rank_loads(loads, self.num_ranks)) for loads in slot_load
        )
        self._history = [
            [HISTORY_DECAY * h + w for h, w in zip(hist, window, strict=True)]
            for hist, window in zip(self._history, expert_load, strict=True)
        ]
        if not self.replicate or not any(sum(load) for load in self._history):
            return
        # Both placements judged on the same load history, so a steady load settles.
        current = [layer.placement.slot_experts.tolist() for layer in self.layers]
        placements = [eplb.place(load, self.num_slots, self.num_ranks) for load in self._history]
        expected_now, predicted = (
            _mean(
                eplb.imbalance(eplb.slot_loads(load, slots))
                for load, slots in zip(self._history, chosen, strict=True)
            )
            for chosen in (current, placements)
        )
        if predicted > expected_now * (1 - MIN_GAIN):
            return
        log.info(
            "expert re-placement: max/mean per copy %.2f -> %.2f expected",
            expected_now,
            predicted,
        )
        self.stats.predicted_imbalance = predicted
        num_experts = self.stats.num_experts
        new = [ExpertPlacement.of(slots, num_experts) for slots in placements]
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="eplb-stage")
        self._staging = self._executor.submit(self._stage, new)
        self._switch_at = self.num_steps + STAGE_STEPS

    def _stage(self, placements: list[ExpertPlacement]) -> None:
        for layer, placement in zip(self.layers, placements, strict=True):
            layer.stage(placement)

    def _placement_imbalance(self) -> float:
        return _mean(
            eplb.imbalance((layer.slot_load - start).tolist())
            for layer, start in zip(self.layers, self._placed_slot, strict=True)
        )

    def expert_stats(self) -> ExpertStats:
        self.stats.tokens_routed = sum(int(layer.slot_load.sum()) for layer in self.layers)
        self.stats.imbalance = self._placement_imbalance()
        return ExpertStats(**{f: getattr(self.stats, f) for f in ExpertStats.__slots__})


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def _expert_parallel_rank(num_ranks: int) -> int:
    if not torch.distributed.is_initialized():
        raise ValueError(
            f"--expert-parallel-size {num_ranks} needs torch.distributed initialised "
            "(one process per rank) before the engine starts"
        )
    if torch.distributed.get_world_size() != num_ranks:
        raise ValueError(
            f"--expert-parallel-size {num_ranks}, but torch.distributed has "
            f"{torch.distributed.get_world_size()} ranks"
        )
    return torch.distributed.get_rank()

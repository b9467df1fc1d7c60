"""The sparse MoE block shared by Qwen3-MoE and Qwen2-MoE: router, fused experts, placement.

A layer has E logical experts (the checkpoint's) held in P >= E physical slots: with expert
load balancing (engine/expert_balancer.py) hot experts get redundant copies, and with expert
parallelism the slots are split over ranks. `ExpertPlacement` says which expert each slot
holds; the router's choice of logical expert is mapped to one of its copies, round-robin over
the step's tokens, so a hot expert's tokens spread evenly over its copies.

The expert path is fused: the step's (token, slot) pairs are sorted by slot once, so every
slot's tokens are one contiguous slice; each active local slot then runs one gate|up GEMM and
one down GEMM over its slice (the native packed kernels for decode-sized slices in bf16), and
the weighted results return to token order by one gather and a sum over each token's k.
No Python loop over tokens; the loop is over the slots that got tokens this step.

Weights load by name: the checkpoint's `mlp.experts.{j}.{gate,up,down}_proj.weight` are the
shards of two flat parameters (`expert_weight_shard`), viewed as [E, 2I, H] and [E, H, I].
Every forward pass adds its tokens per slot and per expert to two counter tensors, the load
statistics the balancer and the heartbeat read (no host sync of their own).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from xllm.models.config import ModelConfig
from xllm.models.layers import GatedMLP, Linear
from xllm.ops import fast_linear, pack_weight

_EXPERT_WEIGHT = re.compile(r"\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def expert_weight_shard(name: str) -> tuple[str, int] | None:
    """Checkpoint name of one expert's projection -> (our flat parameter, its shard), or None.

    Expert j's gate and up are shards 2j and 2j + 1 of `experts.gate_up_proj`, its down
    shard j of `experts.down_proj`."""
    match = _EXPERT_WEIGHT.search(name)
    if match is None:
        return None
    j, proj = int(match.group(1)), match.group(2)
    prefix = name[: match.start()]
    if proj == "down_proj":
        return f"{prefix}.experts.down_proj", j
    return f"{prefix}.experts.gate_up_proj", 2 * j + (proj == "up_proj")


@dataclass(frozen=True)
class ExpertPlacement:
    """Which logical expert each physical slot holds, and its inverse for routing."""

    slot_experts: torch.Tensor
    """[P] long: the expert in each slot (slots of rank r: r * P / R up to (r + 1) * P / R)."""
    copies: torch.Tensor
    """[E, C] long: each expert's slots, padded by repeating its first."""
    num_copies: torch.Tensor
    """[E] long: how many slots hold each expert (>= 1)."""

    @classmethod
    def of(cls, slot_experts: list[int], num_experts: int) -> ExpertPlacement:
        slots_of: list[list[int]] = [[] for _ in range(num_experts)]
        for slot, expert in enumerate(slot_experts):
            slots_of[expert].append(slot)
        if any(not slots for slots in slots_of):
            missing = [e for e, slots in enumerate(slots_of) if not slots]
            raise ValueError(f"placement holds no copy of experts {missing}")
        width = max(len(slots) for slots in slots_of)
        padded = [slots + slots[:1] * (width - len(slots)) for slots in slots_of]
        return cls(
            torch.tensor(slot_experts, dtype=torch.long),
            torch.tensor(padded, dtype=torch.long),
            torch.tensor([len(s) for s in slots_of], dtype=torch.long),
        )

    @classmethod
    def identity(cls, num_experts: int) -> ExpertPlacement:
        return cls.of(list(range(num_experts)), num_experts)

    @property
    def num_slots(self) -> int:
        return self.slot_experts.numel()

    @property
    def is_identity(self) -> bool:
        return self.copies.shape[1] == 1 and self.num_slots == self.copies.shape[0]

    def route(self, experts: torch.Tensor) -> torch.Tensor:
        """Chosen experts [N, k] -> the slots that compute them [N, k]: token t's choice of
        an expert with c copies goes to copy t mod c (a token chooses an expert at most once,
        so an expert's tokens spread evenly however they are spread over its choices)."""
        if self.is_identity:
            return experts  # slot e holds expert e
        tokens = torch.arange(experts.shape[0])[:, None]  # [N, 1]
        spread = tokens % self.num_copies[experts]  # [N, k]
        return self.copies[experts, spread]


@dataclass(frozen=True)
class SlotWeights:
    """One expert slot: its SwiGLU weights and their packed layouts (None: no native kernel)."""

    gate_up: torch.Tensor  # [2I, H]
    down: torch.Tensor  # [H, I]
    packed_gate_up: torch.Tensor | None
    packed_down: torch.Tensor | None

    @classmethod
    def of(cls, gate_up: torch.Tensor, down: torch.Tensor) -> SlotWeights:
        return cls(gate_up, down, pack_weight(gate_up), pack_weight(down))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [m, H] -> down(silu(gate(x)) * up(x)) [m, H]."""
        gate, up = _linear(x, self.gate_up, self.packed_gate_up).chunk(2, dim=-1)  # [m, I]
        return _linear(F.silu(gate) * up, self.down, self.packed_down)


def _linear(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor | None) -> torch.Tensor:
    y = fast_linear(x, weight, None, packed)  # the native kernels for few rows (decode)
    return F.linear(x, weight) if y is None else y


class FusedExperts(nn.Module):
    """E SwiGLU experts, computed in P physical slots (see the module doc)."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, dtype: torch.dtype):
        super().__init__()
        self.num_experts, self.hidden, self.intermediate = num_experts, hidden, intermediate
        # Flat so that the loader fills them shard by shard; `weights()` gives the 3-D views.
        self.gate_up_proj = nn.Parameter(
            torch.empty(num_experts * 2 * intermediate, hidden, dtype=dtype), requires_grad=False
        )
        self.gate_up_proj.shard_sizes = [intermediate] * (2 * num_experts)  # type: ignore[attr-defined]
        self.down_proj = nn.Parameter(
            torch.empty(num_experts * hidden, intermediate, dtype=dtype), requires_grad=False
        )
        self.down_proj.shard_sizes = [hidden] * num_experts  # type: ignore[attr-defined]
        self.rank, self.world_size, self.group = 0, 1, None
        self.placement = ExpertPlacement.identity(num_experts)
        self.slots: list[SlotWeights] | None = None
        """This rank's slots' weights, in slot order (made by `place`, or the first forward)."""
        self.staged: tuple[ExpertPlacement, list[SlotWeights]] | None = None
        self.slot_load = torch.zeros(num_experts, dtype=torch.long)
        """Cumulative (token, choice) pairs computed per physical slot, all ranks' slots."""
        self.expert_load = torch.zeros(num_experts, dtype=torch.long)
        """Cumulative (token, choice) pairs routed to each logical expert."""

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The logical experts' weights: gate|up [E, 2I, H] and down [E, H, I] (views)."""
        e, h, i = self.num_experts, self.hidden, self.intermediate
        return self.gate_up_proj.view(e, 2 * i, h), self.down_proj.view(e, h, i)

    def shard(self, rank: int, world_size: int, group=None) -> None:
        """Compute only rank `rank`'s share of the slots, summing over `group` (expert
        parallelism over torch.distributed; every rank sees every token)."""
        self.rank, self.world_size, self.group = rank, world_size, group
        self.place(self.placement)

    def local_slots(self, placement: ExpertPlacement) -> range:
        per_rank, rem = divmod(placement.num_slots, self.world_size)
        if rem:
            raise ValueError(
                f"{placement.num_slots} expert slots do not split over {self.world_size} ranks"
            )
        return range(self.rank * per_rank, (self.rank + 1) * per_rank)

    def stage(self, placement: ExpertPlacement) -> None:
        """Build this rank's slots of `placement` aside; the running ones keep serving until
        `commit()` switches (at a step boundary). Safe off the step thread.

        A slot's plain weights are views of its expert's (every rank holds all experts, see
        expert_balancer.py); its second buffer is the native kernels' packed layout (bf16
        on CPU), a copy per slot."""
        slots = self.local_slots(placement)
        gate_up, down = self.weights()
        with torch.inference_mode():
            staged = [
                SlotWeights.of(gate_up[e], down[e])
                for e in placement.slot_experts[slots.start : slots.stop].tolist()
            ]
        self.staged = (placement, staged)

    def commit(self) -> bool:
        """Switch to the staged placement, if any; returns whether it switched."""
        if self.staged is None:
            return False
        self.placement, self.slots = self.staged
        self.staged = None
        if self.slot_load.numel() != self.placement.num_slots:
            self.slot_load = torch.zeros(self.placement.num_slots, dtype=torch.long)
        return True

    def place(self, placement: ExpertPlacement) -> None:
        """Stage and switch at once (start-up)."""
        self.stage(placement)
        self.commit()

    def forward(
        self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """x [N, H], chosen experts [N, k] and their router weights [N, k] -> [N, H]."""
        n, k = experts.shape
        placement = self.placement
        slots = placement.route(experts).flatten()  # [N*k]
        counts = torch.bincount(slots, minlength=placement.num_slots)  # [P]
        self.slot_load += counts
        self.expert_load += torch.bincount(experts.flatten(), minlength=self.num_experts)
        order = slots.argsort(stable=True)  # sorted position -> (token, choice) pair
        ends = counts.cumsum(0).tolist()  # where each slot's run of pairs ends
        local = self.local_slots(placement)
        begin = ends[local.start - 1] if local.start else 0
        pairs = order[begin : ends[local.stop - 1]]  # this rank's pairs, grouped by slot
        xs = x[pairs // k]  # [M, H] their tokens
        # Results in sorted order; other ranks' runs stay zero (summed over ranks below).
        ys = (
            x.new_zeros(n * k, x.shape[1])
            if self.world_size > 1
            else x.new_empty(n * k, x.shape[1])
        )
        mine = ys[begin : begin + len(pairs)]  # [M, H]
        if self.slots is None:  # no balancer placed us: one slot per expert
            self.place(placement)
        start = begin
        for slot, weights_of in zip(local, self.slots, strict=True):
            stop = ends[slot]
            if stop == start:
                continue
            a, b = start - begin, stop - begin
            mine[a:b] = weights_of(xs[a:b])  # [m, H]
            start = stop
        mine *= weights.flatten()[pairs, None]
        # Back to (token, choice) order by a gather, then sum each token's k results (a
        # gather, not index_add_: the latter is pathologically slow for a few rows).
        out = ys[order.argsort()].view(n, k, -1).sum(1)  # [N, H]
        if self.world_size > 1:
            torch.distributed.all_reduce(out, group=self.group)
        return out


def sparse_or_dense_mlp(config: ModelConfig, dtype: torch.dtype, index: int) -> nn.Module:
    """Layer `index`'s MLP: the MoE block where the config makes it sparse, else dense."""
    if config.is_sparse_layer(index):
        return SparseMoeBlock(config, dtype)
    return GatedMLP(config.hidden_size, config.intermediate_size, dtype)


class SparseMoeBlock(nn.Module):
    """Router + experts (+ Qwen2-MoE's sigmoid-gated shared expert); checkpoint names
    `mlp.gate`, `mlp.experts.*`, `mlp.shared_expert.*`, `mlp.shared_expert_gate`."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = Linear(config.hidden_size, config.num_experts, dtype=dtype)
        self.experts = FusedExperts(
            config.num_experts, config.hidden_size, config.moe_intermediate_size, dtype
        )
        self.shared_expert = self.shared_expert_gate = None
        if config.shared_expert_intermediate_size:
            self.shared_expert = GatedMLP(
                config.hidden_size, config.shared_expert_intermediate_size, dtype
            )
            self.shared_expert_gate = Linear(config.hidden_size, 1, dtype=dtype)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, H] -> chosen experts [N, k] and their weights [N, k] (x's dtype), computed
        in float32 as transformers does."""
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float)  # [N, E]
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights /= weights.sum(dim=-1, keepdim=True)
        return experts, weights.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        experts, weights = self.route(x)
        out = self.experts(x, experts, weights)  # [N, H]
        if self.shared_expert is not None:
            out = out + F.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out

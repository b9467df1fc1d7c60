"""The EPLB placement policy (engine/eplb.py) and the router's logical -> physical mapping,
without a model."""

from __future__ import annotations

import pytest
import torch

from xllm.engine import eplb
from xllm.models.moe import ExpertPlacement

SKEWED = [900.0, 40.0, 300.0, 10.0, 10.0, 500.0, 20.0, 20.0]  # tokens per expert


def test_replicate_gives_spares_to_the_heaviest_per_copy():
    copies = eplb.replicate(SKEWED, 12)
    assert sum(copies) == 12 and min(copies) == 1
    # 900 gets 2 more (900/3 = 300), 500 one (250), then 300 (150) vs 900/3 = 300: 900 again.
    assert copies == [4, 1, 1, 1, 1, 2, 1, 1]
    assert eplb.replicate([1.0] * 4, 4) == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="cannot hold"):
        eplb.replicate(SKEWED, 7)


@pytest.mark.parametrize("num_ranks", [1, 2, 4])
def test_place_holds_every_expert_and_cuts_the_imbalance(num_ranks):
    slots = eplb.place(SKEWED, 12, num_ranks)
    assert len(slots) == 12 and set(slots) == set(range(8))
    before = eplb.imbalance(SKEWED)  # one slot per expert
    after = eplb.imbalance(eplb.slot_loads(SKEWED, slots))
    assert before == pytest.approx(900 / (1800 / 8)) and after <= before / 2
    per_rank = eplb.rank_loads(eplb.slot_loads(SKEWED, slots), num_ranks)
    assert eplb.imbalance(per_rank) < 1.25  # packing evens the ranks out too (ideal: 1)
    if num_ranks > 1:  # the copies of the hottest expert sit on different ranks
        size = 12 // num_ranks
        holders = {s // size for s, e in enumerate(slots) if e == 0}
        assert len(holders) == min(4, num_ranks)


def test_place_is_deterministic_and_uniform_load_is_identity():
    assert eplb.place(SKEWED, 12, 2) == eplb.place(list(SKEWED), 12, 2)
    assert eplb.place([1.0] * 8, 8) == list(range(8))
    assert eplb.imbalance([0, 0]) == 1.0 and eplb.imbalance([3, 1]) == 1.5


def test_router_spreads_an_experts_tokens_over_its_copies():
    placement = ExpertPlacement.of([0, 1, 2, 0, 0, 3], num_experts=4)  # expert 0: slots 0, 3, 4
    assert placement.num_copies.tolist() == [3, 1, 1, 1] and not placement.is_identity
    experts = torch.tensor([[0, 1]] * 6 + [[2, 0]] * 3)  # [9, 2]: expert 0 chosen by all 9
    slots = placement.route(experts)
    assert torch.equal(placement.slot_experts[slots], experts)  # each copy holds its expert
    zero = slots[experts == 0]
    assert torch.bincount(zero, minlength=6)[[0, 3, 4]].tolist() == [3, 3, 3]
    identity = ExpertPlacement.identity(4)
    assert identity.is_identity and identity.route(experts) is experts
    with pytest.raises(ValueError, match="no copy of experts"):
        ExpertPlacement.of([0, 1, 1], num_experts=3)


def test_a_staged_placement_serves_only_after_the_switch():
    """Double buffering in FusedExperts: staging copies the new slots aside; the running
    placement computes until commit(), and a token's result is the same either way."""
    from xllm.models.moe import FusedExperts

    g = torch.Generator().manual_seed(0)
    experts = FusedExperts(num_experts=4, hidden=8, intermediate=16, dtype=torch.float32)
    experts.gate_up_proj.data.copy_(torch.randn(4 * 32, 8, generator=g))
    experts.down_proj.data.copy_(torch.randn(4 * 8, 16, generator=g))
    x = torch.randn(6, 8, generator=g)
    chosen = torch.tensor([[0, 1], [0, 2], [0, 3], [0, 1], [2, 0], [3, 0]])
    weights = torch.rand(6, 2, generator=g)

    def reference() -> torch.Tensor:  # one expert at a time, as transformers does
        gate_up, down = experts.weights()
        out = torch.zeros_like(x)
        for t in range(6):
            for j in range(2):
                gate, up = (gate_up[chosen[t, j]] @ x[t]).chunk(2)
                out[t] += weights[t, j] * (
                    down[chosen[t, j]] @ (torch.nn.functional.silu(gate) * up)
                )
        return out

    with torch.inference_mode():
        before = experts(x, chosen, weights)
        torch.testing.assert_close(before, reference())
        experts.stage(ExpertPlacement.of([0, 1, 2, 3, 0, 0], num_experts=4))
        assert experts.placement.is_identity  # staged, not serving
        torch.testing.assert_close(experts(x, chosen, weights), before)
        assert experts.commit() and experts.placement.num_slots == 6 and not experts.commit()
        after = experts(x, chosen, weights)
    torch.testing.assert_close(after, before)
    assert experts.slot_load.tolist() == [2, 2, 2, 2, 2, 2]  # expert 0's 6 tokens over 3 copies
    assert experts.expert_load.tolist() == [18, 6, 6, 6]  # 3 forward passes

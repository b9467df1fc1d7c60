"""EPLB: where a MoE layer's experts go, from their recent load (DeepSeek's EPLB idea).

Pure functions of a load snapshot (tokens routed to each logical expert), no torch: the
balancer (expert_balancer.py) calls them; tests call them on made-up loads.

A layer has E experts and P >= E physical slots, split evenly over R ranks. Placement is
two greedy passes, as in DeepSeek's `eplb.py` (without its node level):

1. replicate: every expert gets one slot; each spare slot goes to the expert whose load per
   copy is highest now, so the hottest experts end with the most copies;
2. pack: the copies, heaviest first (load / copies each: the router spreads an expert's
   tokens evenly over its copies), each to the rank with the least load so far that still
   has a free slot, avoiding a rank that already holds that expert when another one can
   take it.

The result is the slots' experts, rank by rank: slot s of the P belongs to rank s // (P / R).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence


def replicate(load: Sequence[float], num_slots: int) -> list[int]:
    """Copies per expert (each >= 1, summing to `num_slots`), spares to the heaviest per copy."""
    num_experts = len(load)
    if num_slots < num_experts:
        raise ValueError(f"{num_slots} slots cannot hold {num_experts} experts")
    copies = [1] * num_experts
    # Max-heap on load per copy; ties go to the lower expert id, so the result is deterministic.
    heap = [(-float(w), e) for e, w in enumerate(load)]
    heapq.heapify(heap)
    for _ in range(num_slots - num_experts):
        _, e = heapq.heappop(heap)
        copies[e] += 1
        heapq.heappush(heap, (-float(load[e]) / copies[e], e))
    return copies


def pack(load: Sequence[float], copies: Sequence[int], num_ranks: int) -> list[int]:
    """Each rank's slots' experts, concatenated rank by rank (see the module doc)."""
    num_slots = sum(copies)
    if num_slots % num_ranks:
        raise ValueError(f"{num_slots} slots do not split over {num_ranks} ranks")
    per_rank = num_slots // num_ranks
    items = [(float(load[e]) / c, e) for e, c in enumerate(copies) for _ in range(c)]
    items.sort(key=lambda item: (-item[0], item[1]))
    ranks: list[list[int]] = [[] for _ in range(num_ranks)]
    rank_load = [0.0] * num_ranks
    for weight, expert in items:
        free = [r for r in range(num_ranks) if len(ranks[r]) < per_rank]
        fresh = [r for r in free if expert not in ranks[r]] or free
        rank = min(fresh, key=lambda r: (rank_load[r], r))
        ranks[rank].append(expert)
        rank_load[rank] += weight
    return [expert for slots in ranks for expert in sorted(slots)]


def place(load: Sequence[float], num_slots: int, num_ranks: int = 1) -> list[int]:
    """The slots' experts for `load` (tokens per expert): replicate, then pack."""
    return pack(load, replicate(load, num_slots), num_ranks)


def slot_loads(load: Sequence[float], slot_experts: Sequence[int]) -> list[float]:
    """The load each slot would carry: its expert's, split evenly over that expert's copies."""
    copies = [0] * len(load)
    for expert in slot_experts:
        copies[expert] += 1
    return [float(load[e]) / copies[e] for e in slot_experts]


def imbalance(loads: Sequence[float]) -> float:
    """max / mean of `loads` (1.0 = perfectly even; 1.0 as well when there is no load)."""
    total = sum(loads)
    if not loads or total <= 0:
        return 1.0
    return max(loads) * len(loads) / total


def rank_loads(loads: Sequence[float], num_ranks: int) -> list[float]:
    """Per-slot loads summed rank by rank (slots split evenly, in order)."""
    per_rank = len(loads) // num_ranks
    return [sum(loads[r * per_rank : (r + 1) * per_rank]) for r in range(num_ranks)]

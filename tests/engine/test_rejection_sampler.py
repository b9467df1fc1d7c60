"""RejectionSampler on synthetic logits: greedy keeps exactly the agreeing prefix; sampled
outputs follow the target distribution, which a sampler that keeps every draft — or draws
its correction from p instead of p without the draft — visibly does not."""

from __future__ import annotations

import torch

from xllm.engine.rejection_sampler import RejectionSampler, accepted_tokens
from xllm.engine.sequence import Sequence
from xllm.protocol import SamplingParams

VOCAB = 6
# Upper 1e-4 tail of the chi-square distribution, by degrees of freedom (tables).
CHI2_CRITICAL = {4: 23.51, 5: 25.74}


def seqs_of(n: int, **params) -> list[Sequence]:
    return [Sequence(f"r{i}", [1, 2, 3], SamplingParams(**params)) for i in range(n)]


def one_hot_logits(tokens: list[int]) -> torch.Tensor:
    logits = torch.full((len(tokens), VOCAB), -5.0)
    logits[torch.arange(len(tokens)), torch.tensor(tokens)] = 5.0
    return logits


def test_greedy_keeps_the_agreeing_prefix_then_the_targets_token():
    sampler = RejectionSampler()
    seqs = seqs_of(3, temperature=0.0)
    drafts = [[1, 2, 3], [4, 4], [5]]
    # Target argmax per row: seq 0 agrees twice then says 0; seq 1 agrees on all and adds a
    # bonus 2; seq 2 disagrees at once.
    logits = one_hot_logits([1, 2, 0, 3] + [4, 4, 2] + [1, 0])
    assert sampler(logits, seqs, drafts) == [[1, 2, 0], [4, 4, 2], [1]]


def test_accepted_tokens_walks_rows_per_sequence():
    kept = [True, False, False, True, True, False]
    assert accepted_tokens([[7, 8], [9, 9]], kept, [70, 80, 90, 91, 92, 93]) == [
        [7, 80],
        [9, 9, 93],
    ]


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def emitted(sampler, n: int, logits: torch.Tensor, draft: list[int], **params):
    """n independent verifications of the same drafts against the same target rows."""
    seqs = seqs_of(n, **params)
    return sampler(logits.repeat(n, 1), seqs, [draft] * n)


def target(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(logits / temperature, dim=-1)


class KeepsEveryDraft(RejectionSampler):
    def _sample(self, logits, row_seqs, draft_ids):
        drawn, _ = super()._sample(logits, row_seqs, draft_ids)
        return drawn, draft_ids >= 0


class CorrectsFromTheTarget(RejectionSampler):
    """Rejects properly but draws the correction from p itself (the draft not removed)."""

    def _sample(self, logits, row_seqs, draft_ids):
        _, kept = super()._sample(logits, row_seqs, draft_ids)
        probs = torch.softmax(logits / row_seqs[0].params.temperature, dim=-1)
        return torch.multinomial(probs, 1).squeeze(1), kept


def first_two_statistics(sampler, n: int = 20_000, temperature: float = 1.0):
    """Chi-square of the first emitted token against p_0, and of the second (when the first
    was the draft) against p_1; drafts: one likely token, then an unlikely one."""
    torch.manual_seed(0)
    logits = torch.tensor(
        [[2.0, 1.0, 0.5, 0.0, -1.0, 0.3], [0.1, 0.2, 1.5, -0.5, 0.0, 0.7], [0.0] * VOCAB]
    )
    draft = [0, 3]
    out = emitted(sampler, n, logits, draft, temperature=temperature)
    first = torch.tensor([t[0] for t in out])
    second = torch.tensor([t[1] for t in out if t[0] == draft[0] and len(t) > 1])
    p0, p1 = target(logits[0], temperature), target(logits[1], temperature)
    counts0 = torch.bincount(first, minlength=VOCAB).float()
    counts1 = torch.bincount(second, minlength=VOCAB).float()
    return chi_square(counts0, p0), chi_square(counts1, p1)


def test_sampled_tokens_follow_the_target_distribution():
    for temperature in (1.0, 0.7):
        chi0, chi1 = first_two_statistics(RejectionSampler(), temperature=temperature)
        assert chi0 < CHI2_CRITICAL[5] and chi1 < CHI2_CRITICAL[5], (temperature, chi0, chi1)


def test_the_statistic_catches_broken_rejection_sampling():
    chi0, _ = first_two_statistics(KeepsEveryDraft())
    assert chi0 > 100 * CHI2_CRITICAL[5]
    chi0, chi1 = first_two_statistics(CorrectsFromTheTarget())
    assert max(chi0, chi1) > 10 * CHI2_CRITICAL[5]


def test_top_k_bounds_every_emitted_token():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0, -2.0]] * 3)
    out = emitted(RejectionSampler(), 2000, logits, [5, 4], temperature=1.0, top_k=2)
    assert {t for tokens in out for t in tokens} <= {0, 1}
    assert all(len(tokens) == 1 for tokens in out)  # drafts outside the top 2: never kept


def test_seeded_verification_is_reproducible_and_seed_dependent():
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(1))
    sampler = RejectionSampler()

    def run(seed: int) -> list[list[int]]:
        seqs = [Sequence(f"r{i}", [1, 2], SamplingParams(seed=seed + i)) for i in range(50)]
        return sampler(logits.repeat(50, 1), seqs, [[2, 1]] * 50)

    assert run(0) == run(0)
    assert run(0) != run(1000)

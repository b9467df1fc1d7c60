"""RejectionSampler: which of a sequence's draft tokens the target model keeps.

A sequence that verifies k drafts d_0..d_{k-1} ran k + 1 rows through the model in one
step — its last token, then the drafts — so it has k + 1 rows of target logits:

    row j (j < k)   the target's distribution p_j for the token after d_0..d_{j-1}: judges d_j
    row k           the distribution after every draft: the bonus token when all are kept

Greedy: keep the longest prefix of drafts equal to the target's argmax, then append the
argmax at the first mismatch (or the bonus row's): exactly the tokens plain greedy decoding
gives, k + 1 of them at best, 1 at worst.

Sampled (Leviathan et al. 2023; Chen et al. 2023), for a deterministic proposer (q_j is a
point mass on d_j, see proposer.py): keep d_j with probability min(1, p_j(d_j) / q_j(d_j)) =
p_j(d_j); at the first rejection, draw from the residual max(0, p_j - q_j), normalized — p_j
with d_j removed — and stop; if every draft is kept, draw the bonus from p_k. Each emitted
token is then distributed exactly as p (the target's filtered, temperature-scaled
distribution, as `Sampler` samples it), so outputs follow the target distribution whatever
the drafts were. Draws use the exponential race of `Sampler` (argmax of p / E, so the
residual needs no renormalizing); a seeded sequence takes row j's noise from its generator
at position offset j, so seeded outputs are reproducible.

Not handled, so such requests do not speculate (`speculation.can_speculate`): penalties,
min_tokens still pending, logprobs, n > 1 — each would need per-row state here.
"""

from __future__ import annotations

import torch

from xllm.engine.sampler import filter_logits
from xllm.engine.sequence import Sequence
from xllm.protocol.types import GREEDY_EPSILON


class RejectionSampler:
    def __call__(
        self, logits: torch.Tensor, seqs: list[Sequence], drafts: list[list[int]]
    ) -> list[list[int]]:
        """logits [R, V] float32, R = sum(len(d) + 1): each sequence's rows in order, one
        sequence after another. Returns per sequence the tokens to append: the kept drafts,
        then the target's own token (1 to len(d) + 1 tokens)."""
        row_seqs = [s for s, d in zip(seqs, drafts, strict=True) for _ in range(len(d) + 1)]
        judged = [[*d, -1] for d in drafts]  # the draft each row judges; -1 on bonus rows
        draft_ids = torch.tensor([t for row in judged for t in row])  # [R]
        if all(s.params.greedy for s in seqs):
            targets = logits.argmax(dim=-1)  # [R]
            kept = targets == draft_ids
        else:
            targets, kept = self._sample(logits, row_seqs, draft_ids)
        return accepted_tokens(drafts, kept.tolist(), targets.tolist())

    def _sample(
        self, logits: torch.Tensor, row_seqs: list[Sequence], draft_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row: whether its draft is kept, and the token drawn in case it is not."""
        params = [s.params for s in row_seqs]
        greedy = torch.tensor([p.greedy for p in params])  # [R]
        temperature = torch.tensor([max(p.temperature, GREEDY_EPSILON) for p in params])
        probs = torch.softmax(filter_logits(logits / temperature[:, None], params), dim=-1)
        uniform, noise = self._noise(probs, row_seqs)  # [R], [R, V]
        has_draft = draft_ids >= 0
        drafts = draft_ids.clamp(min=0)[:, None]  # [R, 1]
        p_draft = probs.gather(1, drafts).squeeze(1).where(has_draft, 0.0)  # [R]
        residual = probs.scatter(1, drafts, 0.0).where(has_draft[:, None], probs)  # [R, V]
        drawn = (residual / noise).argmax(dim=-1)  # [R]
        argmax = logits.argmax(dim=-1)
        kept = torch.where(greedy, argmax == draft_ids, uniform < p_draft)
        return torch.where(greedy, argmax, drawn), kept

    def _noise(
        self, probs: torch.Tensor, row_seqs: list[Sequence]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        uniform = torch.rand(probs.shape[0])
        noise = torch.empty_like(probs).exponential_()
        offset = 0
        for row, seq in enumerate(row_seqs):
            offset = offset + 1 if row and row_seqs[row - 1] is seq else 0
            if (generator := seq.next_token_generator(offset)) is not None:
                uniform[row] = torch.rand(1, generator=generator)[0]
                noise[row].exponential_(generator=generator)
        return uniform, noise


def accepted_tokens(
    drafts: list[list[int]], kept: list[bool], targets: list[int]
) -> list[list[int]]:
    """Walk each sequence's rows: drafts while kept, then the target's token of the first
    row that did not keep its draft (the bonus row never does)."""
    out: list[list[int]] = []
    row = 0
    for draft in drafts:
        j = 0
        while j < len(draft) and kept[row + j]:
            j += 1
        out.append([*draft[:j], targets[row + j]])
        row += len(draft) + 1
    return out

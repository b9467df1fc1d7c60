"""Sampler: logits of a batch of sequences -> next tokens (and logprobs), all in tensors.

Order of processing, as in vLLM: raw logprobs (returned to users) are taken from the
model's logits; then penalties, min_tokens suppression, the grammar mask of constrained
rows (engine/grammar.py), temperature, top-k, top-p and min-p shape the distribution that
is sampled, and each constrained row's token advances its grammar. Greedy rows take the
argmax of the penalised logits. Random rows use the exponential race (argmax of p / E with
E ~ Exp(1)), which lets each seeded row draw its noise from its own generator in one call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from xllm.engine.beam_search import BeamCandidates, beam_candidates
from xllm.engine.sequence import Sequence
from xllm.protocol.types import GREEDY_EPSILON, Logprob


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[Logprob | None]
    verified: dict[tuple[str, int], list[int]] = field(default_factory=dict)
    """seq_id -> the tokens a speculative verification kept, then the target's own token
    (rejection_sampler.py); such sequences are not in `token_ids`."""
    beams: BeamCandidates | None = None
    """The candidates of the beams among the rows (beam_search.py); their `token_ids` entry
    is only the argmax, which their group does not use."""


class Sampler:
    def __init__(self, eos_token_ids: tuple[int, ...]):
        self.eos_token_ids = list(eos_token_ids)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        """logits [R, V] float32, one row per sequence in `seqs` (constrained rows are masked
        in place)."""
        params = [s.params for s in seqs]
        beams = beam_candidates(logits, seqs) if any(p.use_beam_search for p in params) else None
        want_logprobs = any(p.logprobs is not None for p in params)
        raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
        if any(p.has_penalties for p in params):
            logits = apply_penalties(logits, seqs)
        if any(
            p.min_tokens and s.num_output_tokens < p.min_tokens
            for s, p in zip(seqs, params, strict=True)
        ):
            logits = self._suppress_stop_tokens(logits, seqs)
        constrained = any(s.grammar is not None for s in seqs)
        if constrained:
            # Imported here: xgrammar loads with the first constrained request, not before.
            from xllm.engine import grammar

            grammar.mask_logits(logits, seqs)
        if all(p.greedy for p in params):
            tokens = logits.argmax(dim=-1)
        else:
            tokens = self._sample(logits, seqs)
        token_list = tokens.tolist()
        if constrained:
            grammar.accept_tokens(seqs, token_list)
        logprobs: list[Logprob | None] = [None] * len(seqs)
        if raw_logprobs is not None:
            logprobs = gather_logprobs(raw_logprobs, tokens, params)
        return SamplerOutput(token_list, logprobs, beams=beams)

    def _suppress_stop_tokens(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        logits = logits.clone()
        for row, seq in enumerate(seqs):
            p = seq.params
            if seq.num_output_tokens < p.min_tokens:
                stop_ids = list(p.stop_token_ids) + ([] if p.ignore_eos else self.eos_token_ids)
                logits[row, stop_ids] = float("-inf")
        return logits

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        params = [s.params for s in seqs]
        greedy = torch.tensor([p.greedy for p in params])
        temperature = torch.tensor([max(p.temperature, GREEDY_EPSILON) for p in params])
        probs = torch.softmax(filter_logits(logits / temperature[:, None], params), dim=-1)
        noise = torch.empty_like(probs).exponential_()
        for row, seq in enumerate(seqs):
            if (generator := seq.next_token_generator()) is not None:
                noise[row].exponential_(generator=generator)
        sampled = (probs / noise).argmax(dim=-1)
        return torch.where(greedy, logits.argmax(dim=-1), sampled)


def filter_logits(logits: torch.Tensor, params: list) -> torch.Tensor:
    """Mask (to -inf) what top-k, top-p and min-p exclude; rows without them are untouched."""
    vocab = logits.shape[-1]
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    top_p = [p.top_p for p in params]
    min_p = [p.min_p for p in params]
    if any(k < vocab for k in top_k) or any(p < 1.0 for p in top_p):
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # [R, V]
        ranks = torch.arange(vocab)
        drop = ranks[None, :] >= torch.tensor(top_k)[:, None]
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
        drop |= (cum - sorted_logits.softmax(dim=-1)) >= torch.tensor(top_p)[:, None]
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    if any(p > 0.0 for p in min_p):
        probs = logits.softmax(dim=-1)
        threshold = probs.max(dim=-1, keepdim=True).values * torch.tensor(min_p)[:, None]
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Repetition penalty over prompt + output (CTRL / HF style); presence and frequency
    penalties over output counts (OpenAI style)."""
    rows, vocab = logits.shape
    output_counts = torch.zeros(rows, vocab)
    seen = torch.zeros(rows, vocab, dtype=torch.bool)
    for row, seq in enumerate(seqs):
        out = torch.tensor(seq.output_token_ids, dtype=torch.long)
        output_counts[row].index_add_(0, out, torch.ones(len(out)))
        seen[row, torch.tensor(seq.token_ids, dtype=torch.long)] = True
    rep = torch.tensor([s.params.repetition_penalty for s in seqs])[:, None]
    presence = torch.tensor([s.params.presence_penalty for s in seqs])[:, None]
    frequency = torch.tensor([s.params.frequency_penalty for s in seqs])[:, None]
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalised, logits)
    return logits - frequency * output_counts - presence * (output_counts > 0)


def gather_logprobs(raw: torch.Tensor, tokens: torch.Tensor, params: list) -> list[Logprob | None]:
    top_n = max(p.logprobs or 0 for p in params)
    chosen = raw.gather(-1, tokens[:, None]).squeeze(-1).tolist()
    top_values, top_ids = raw.topk(top_n, dim=-1) if top_n else (None, None)
    result: list[Logprob | None] = []
    for row, p in enumerate(params):
        if p.logprobs is None:
            result.append(None)
            continue
        top = {}
        if p.logprobs and top_ids is not None:
            ids = top_ids[row, : p.logprobs].tolist()
            top = dict(zip(ids, top_values[row, : p.logprobs].tolist(), strict=True))
        result.append(Logprob(int(tokens[row]), chosen[row], top))
    return result

"""Counting `StepStats` (protocol/stats.py): what the engine's steps cost, for the scheduler's
SLO-aware policy (report §3.2). The value is the heartbeat's own; this module fills it.

Counted once per step from numbers the step already has (its prefill tokens, its decode
sequences, its wall time) and once per first token, never per token. Cumulative counters, as
in heartbeats: the scheduler fits rates from them (seconds per prefill token = prefill_seconds
/ prefill_tokens). Recent values are kept here too, because a rate over "the last few
steps" cannot be rebuilt from one heartbeat, and a lifetime mean never forgets a slow spell:
`recent_tpot`, an exponentially weighted mean of the wall time of the steps that decoded,
and `recent_prefill_seconds_per_token`, one over the last ~`RECENT_PREFILL_TOKENS` prefill
tokens (each step weighs by its tokens, so a 10-token chunk's overheads barely count).

A step's time is split between its prefill and its decodes by token share: a mixed step of
1,000 prefill tokens and 10 decodes charges ~99% of its time to prefill. The whole step
still counts as the decodes' inter-token time — that interference is what TPOT measures.
"""

from __future__ import annotations

from xllm.protocol.stats import StepStats

TPOT_EWMA_WEIGHT = 0.2
"""Weight of the newest decode step in `recent_tpot` (about the last ten steps matter)."""
RECENT_PREFILL_TOKENS = 8192
"""Prefill tokens `recent_prefill_seconds_per_token` roughly averages over."""


def record_step(
    stats: StepStats, seconds: float, num_prefill_tokens: int, num_decodes: int
) -> None:
    """Count one step of `seconds` that computed `num_prefill_tokens` prompt tokens and one
    token for each of `num_decodes` decoding sequences (nothing, for an empty step)."""
    total = num_prefill_tokens + num_decodes
    if total == 0:
        return
    stats.busy_seconds += seconds
    stats.prefill_tokens += num_prefill_tokens
    stats.prefill_seconds += seconds * num_prefill_tokens / total
    if num_prefill_tokens:
        per_token = seconds / total
        weight = min(1.0, num_prefill_tokens / RECENT_PREFILL_TOKENS)
        if stats.recent_prefill_seconds_per_token == 0.0:
            weight = 1.0
        stats.recent_prefill_seconds_per_token += weight * (
            per_token - stats.recent_prefill_seconds_per_token
        )
    if num_decodes:
        stats.decode_steps += 1
        stats.decode_seconds += seconds
        if stats.recent_tpot == 0.0:
            stats.recent_tpot = seconds
        else:
            stats.recent_tpot += TPOT_EWMA_WEIGHT * (seconds - stats.recent_tpot)


def record_first_token(stats: StepStats, seconds: float) -> None:
    """Count a prompt's first token, `seconds` after its request arrived."""
    stats.ttft_count += 1
    stats.ttft_seconds += seconds


def record_scheduler(stats: StepStats, seconds: float, hidden_seconds: float = 0.0) -> None:
    """Count `seconds` of a step's CPU-side work (scheduling, inputs, outputs), of which
    `hidden_seconds` ran while a forward pass was running (async scheduling)."""
    stats.scheduler_seconds += seconds
    stats.hidden_scheduler_seconds += hidden_seconds

"""StepStats: what the engine's steps cost, for the scheduler's SLO-aware policy (report §3.2).

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

from dataclasses import dataclass

TPOT_EWMA_WEIGHT = 0.2
"""Weight of the newest decode step in `recent_tpot` (about the last ten steps matter)."""
RECENT_PREFILL_TOKENS = 8192
"""Prefill tokens `recent_prefill_seconds_per_token` roughly averages over."""


@dataclass
class StepStats:
    prefill_tokens: int = 0
    """Cumulative tokens computed by prefill (prompt chunks and recomputes), not decodes."""
    prefill_seconds: float = 0.0
    """Cumulative step time charged to those tokens."""
    recent_prefill_seconds_per_token: float = 0.0
    """Recent prefill time per token (see the module doc); 0 before the first prefill."""
    decode_steps: int = 0
    """Cumulative steps that ran at least one decode."""
    decode_seconds: float = 0.0
    """Cumulative wall time of those steps."""
    recent_tpot: float = 0.0
    """EWMA of the wall time of recent decode steps: each running decode gets one token per
    step, so this is the time per output token they see now. 0 before the first one."""
    busy_seconds: float = 0.0
    """Cumulative wall time of every step that computed something (utilization = its rate)."""
    ttft_count: int = 0
    """Cumulative first tokens sampled here (prompts this engine prefilled)."""
    ttft_seconds: float = 0.0
    """Cumulative time from `add_request` to those first tokens (queueing + prefill)."""

    def record_step(self, seconds: float, num_prefill_tokens: int, num_decodes: int) -> None:
        total = num_prefill_tokens + num_decodes
        if total == 0:
            return
        self.busy_seconds += seconds
        self.prefill_tokens += num_prefill_tokens
        self.prefill_seconds += seconds * num_prefill_tokens / total
        if num_prefill_tokens:
            per_token = seconds / total
            weight = min(1.0, num_prefill_tokens / RECENT_PREFILL_TOKENS)
            if self.recent_prefill_seconds_per_token == 0.0:
                weight = 1.0
            self.recent_prefill_seconds_per_token += weight * (
                per_token - self.recent_prefill_seconds_per_token
            )
        if num_decodes:
            self.decode_steps += 1
            self.decode_seconds += seconds
            if self.recent_tpot == 0.0:
                self.recent_tpot = seconds
            else:
                self.recent_tpot += TPOT_EWMA_WEIGHT * (seconds - self.recent_tpot)

    def record_first_token(self, seconds: float) -> None:
        self.ttft_count += 1
        self.ttft_seconds += seconds

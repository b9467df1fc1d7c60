"""What rank 0 of an expert-parallel instance tells its follower ranks before each step.

An instance with `--expert-parallel-size N` is N processes (xllm.instance.expert_group):
rank 0 is the instance on NATS, ranks 1..N-1 only compute their share of the experts. Every
rank must run the same engine steps on the same requests, so that the all-reduce inside each
MoE layer lines up. Rank 0 sends one `ExpertGroupStep` per step over torch.distributed
(gloo; not NATS): the engine commands applied since the last step, then whether to step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from xllm.protocol.codec import message
from xllm.protocol.types import SamplingParams


@dataclass(frozen=True, slots=True, kw_only=True)
class GroupRequest:
    """One request rank 0's engine accepted (`Engine.add_request`), to add on every rank."""

    request_id: str
    """The request's id, as the gateway chose it."""
    prompt_token_ids: list[int]
    """The prompt, as rank 0's engine received it."""
    sampling: SamplingParams
    """How to sample it (greedy or seeded: every rank must draw the same tokens)."""
    priority: int = 0
    """0 = online, > 0 = offline."""


@message("expert_group_step", version=1)
@dataclass(frozen=True, slots=True, kw_only=True)
class ExpertGroupStep:
    """expert-parallel rank 0 → its follower ranks (torch.distributed broadcast): apply these
    engine commands in this order (adds, then aborts), then run one step if `step`."""

    added: list[GroupRequest] = field(default_factory=list)
    """Requests added since the last message."""
    aborted: list[str] = field(default_factory=list)
    """Request ids aborted since the last message."""
    step: bool = True
    """Run one engine step after applying the commands; False = keep-alive (rank 0 idles)."""
    stop: bool = False
    """Rank 0 is stopping: the followers exit."""
    outputs_digest: int = 0
    """CRC32 of rank 0's last step's outputs (request ids and tokens), which each follower
    compares with its own: ranks that diverged fail loudly instead of hanging."""
    decode_step_seconds: float = 0.0
    """Rank 0's measured plain decode step time, which its schedule prices offline work by:
    a follower schedules by these, not by its own clock."""
    prefill_seconds_per_token: float = 0.0
    """Rank 0's measured recent prefill cost per token (the other half of that price)."""

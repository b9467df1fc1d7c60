"""A simulated instance: our engine's scheduler, replayed on counts instead of tensors.

`SimInstance.schedule()` follows `xllm.engine.scheduler.Scheduler.schedule` step for step —
running sequences first (decodes and unfinished prefill chunks) under the token budget,
then waiting ones in arrival order while `max_num_seqs`, the budget and KV blocks allow;
the most recent running sequence is preempted (recomputed later) when blocks run out — so
the step shapes the cost model prices are the shapes our engine would run.

The prefix cache is kept at the trace's granularity: an LRU of prefix-block ids (Mooncake
`hash_ids`, 512 tokens each), at most a pool's worth. A hit skips those tokens' prefill,
as `find_cached_prefix` does.

Heartbeats carry what the SLO-aware policy reads, with `xllm.engine.step_stats`'s meanings:
the same `StepStats` records each simulated step (its seconds, prefill tokens, decodes) and
each first token sampled here; the prefill backlog and decoding counts are the engine's
`_backlog` over the simulated queues. A role flip (`set_role`) changes what the scheduler
places here, never what happens to the sequences already here: each knows whether it hands
over after its prefill (placed here as a prefill half) or decodes here, so decodes in flight
finish in place and prefills placed just before the flip still hand over, as live.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

from services.scheduler.sim.cost_model import StepShape
from xllm.engine.step_stats import StepStats
from xllm.protocol import Heartbeat

HASH_BLOCK_TOKENS = 512
"""Tokens per trace prefix block (Mooncake's `hash_ids`)."""


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class SimRequest:
    """One trace request as it moves through the cluster, with the times the report needs."""

    request_id: str
    arrival: float
    num_prompt_tokens: int
    output_len: int
    hash_ids: tuple[int, ...] = ()
    instance_id: str | None = None
    """Where it runs (its prefill, when disaggregated)."""
    decode_instance_id: str | None = None
    """Where its decode runs, when disaggregated."""
    first_token_at: float | None = None
    finished_at: float | None = None
    num_cached_tokens: int = 0
    rejected: bool = False


@dataclass
class SimSeq:
    """Engine-side state of a request: `Sequence`'s counts, without the tokens."""

    req: SimRequest
    num_tokens: int
    num_computed_tokens: int = 0
    num_output_tokens: int = 0
    num_blocks: int = 0
    hand_over: bool = False
    """Placed here as a prefill half: done after its first token, decoded elsewhere."""
    added_at: float = 0.0
    """When it reached this instance (`Sequence.arrival_time`, for `ttft_seconds`)."""

    @property
    def remaining(self) -> int:
        return self.num_tokens - self.num_computed_tokens


@dataclass(frozen=True, slots=True)
class InstanceSpec:
    """The engine options that shape batching (`EngineConfig`'s), plus the KV pool size."""

    num_kv_blocks: int
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 32768
    enable_prefix_caching: bool = True


@dataclass
class ScheduledStep:
    items: list[tuple[SimSeq, int]] = field(default_factory=list)
    """(sequence, new tokens) in schedule order."""

    def shape(self) -> StepShape:
        """What the cost model prices; call before `update` (it reads pre-step counts)."""
        decodes: list[int] = []
        chunks: list[tuple[int, int]] = []
        samples = 0
        for seq, n in self.items:
            if n == 1 and seq.num_computed_tokens > 0:  # `model_runner.is_decode`
                decodes.append(seq.num_tokens)
                continue
            chunks.append((n, seq.num_computed_tokens))
            samples += seq.num_computed_tokens + n == seq.num_tokens
        return StepShape(tuple(decodes), tuple(chunks), samples)


class SimInstance:
    def __init__(self, instance_id: str, spec: InstanceSpec, role: str = "both", model: str = "m"):
        self.instance_id = instance_id
        self.spec = spec
        self.role = role
        self.model = model
        self.waiting: deque[SimSeq] = deque()
        self.running: list[SimSeq] = []
        self.prefix_cache: OrderedDict[int, None] = OrderedDict()
        self.num_used_blocks = 0
        self.busy = False
        self.busy_time = 0.0
        self.steps = 0
        self.num_preemptions = 0
        self.prefix_queried_tokens = 0
        self.prefix_hit_tokens = 0
        self.step_stats = StepStats()
        self.role_flips = 0

    # -- what the scheduler sees ---------------------------------------------------------------

    def heartbeat(self, sent_at: float) -> Heartbeat:
        """The heartbeat our instance would send now (see `Instance._heartbeat`)."""
        return Heartbeat(
            instance_id=self.instance_id,
            role=self.role,  # type: ignore[arg-type]
            model=self.model,
            max_model_len=self.spec.max_model_len,
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            num_tokens_in_flight=sum(s.num_tokens for s in [*self.running, *self.waiting]),
            kv_blocks_used=self.num_used_blocks,
            kv_blocks_free=self.spec.num_kv_blocks - self.num_used_blocks,
            kv_block_size=self.spec.block_size,
            prefix_queried_tokens=self.prefix_queried_tokens,
            prefix_hit_tokens=self.prefix_hit_tokens,
            num_preemptions=self.num_preemptions,
            steps=self.steps,
            sent_at=sent_at,
            role_flips=self.role_flips,
            **self._backlog(),
            **vars(self.step_stats),  # its fields, all scalars (`asdict` is 10x slower)
        )

    def _backlog(self) -> dict[str, int]:
        """`Engine._backlog`: prompt tokens still to prefill, and the sequences decoding."""
        left = [s.remaining for s in [*self.waiting, *self.running]]
        return {
            "num_prefill_backlog_tokens": sum(n for n in left if n > 1),
            "num_decoding": sum(1 for s in self.running if s.remaining <= 1),
        }

    def set_role(self, role: str) -> None:
        """`Instance._set_role`: new work by the new role; the sequences here stay as they are."""
        if role != self.role:
            self.role = role
            self.role_flips += 1

    def cached_prefix_tokens(self, req: SimRequest) -> int:
        """Prompt tokens this instance holds in its prefix cache."""
        hit = 0
        for block in req.hash_ids:
            if block not in self.prefix_cache:
                break
            hit += 1
        return self.usable_hit(req, hit * HASH_BLOCK_TOKENS)

    def usable_hit(self, req: SimRequest, tokens: int) -> int:
        """What the engine can reuse of a `tokens` prefix: whole KV blocks, never the last
        prompt token (its logits are needed), nothing without prefix caching."""
        if not self.spec.enable_prefix_caching:
            return 0
        limit = (req.num_prompt_tokens - 1) // self.spec.block_size * self.spec.block_size
        return min(tokens, limit)

    # -- requests ---------------------------------------------------------------------------------

    def add(
        self,
        req: SimRequest,
        num_computed_tokens: int = 0,
        hand_over: bool = False,
        now: float = 0.0,
    ) -> None:
        """Queue a request; `num_computed_tokens` > 0 when its KV arrived from a prefill peer,
        `hand_over` when only its prefill runs here."""
        seq = SimSeq(req, req.num_prompt_tokens + (1 if num_computed_tokens else 0))
        seq.num_computed_tokens = num_computed_tokens
        seq.num_output_tokens = 1 if num_computed_tokens else 0
        seq.hand_over = hand_over
        seq.added_at = now
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    # -- one step -----------------------------------------------------------------------------------

    def schedule(self) -> ScheduledStep:
        """`Scheduler.schedule`: running first, then admissions, under one token budget."""
        out = ScheduledStep()
        budget = self.spec.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.remaining, budget)
            if not self._allocate_or_preempt(seq, num_new):
                break
            out.items.append((seq, num_new))
            budget -= num_new
            i += 1
        while self.waiting and budget > 0 and len(self.running) < self.spec.max_num_seqs:
            seq = self.waiting[0]
            cached = self._admission_cache_hit(seq)
            start = max(cached, seq.num_computed_tokens)
            num_new = min(seq.num_tokens - start, budget)
            if not self._allocate(seq, start + num_new):
                break
            self.waiting.popleft()
            seq.num_computed_tokens = start
            self.running.append(seq)
            out.items.append((seq, num_new))
            budget -= num_new
        return out

    def _admission_cache_hit(self, seq: SimSeq) -> int:
        cached = self.cached_prefix_tokens(seq.req)
        if seq.num_output_tokens == 0:  # count prompts, not recomputes (as the engine does)
            self.prefix_queried_tokens += seq.num_tokens
            self.prefix_hit_tokens += cached
            seq.req.num_cached_tokens = cached
        return cached

    def _allocate(self, seq: SimSeq, num_tokens: int) -> bool:
        """Hold blocks for `num_tokens` tokens of `seq`; False (no change) if the pool is full."""
        need = cdiv(num_tokens, self.spec.block_size) - seq.num_blocks
        if self.num_used_blocks + need > self.spec.num_kv_blocks:
            return False
        self.num_used_blocks += need
        seq.num_blocks += need
        return True

    def _allocate_or_preempt(self, seq: SimSeq, num_new: int) -> bool:
        while not self._allocate(seq, seq.num_computed_tokens + num_new):
            victim = self.running.pop()
            self._free(victim)
            victim.num_computed_tokens = 0
            self.waiting.appendleft(victim)
            self.num_preemptions += 1
            if victim is seq:
                return False
        return True

    def _free(self, seq: SimSeq) -> None:
        self.num_used_blocks -= seq.num_blocks
        seq.num_blocks = 0

    def update(self, step: ScheduledStep, now: float, seconds: float = 0.0) -> list[SimSeq]:
        """`Scheduler.update`: advance counts, sample, retire; returns the sequences done here
        (finished, or prefilled and ready to hand over). `seconds`: the step's duration, for
        the step stats (`Engine._measure`)."""
        self.steps += 1
        shape = step.shape()  # pre-step counts: what the step ran
        num_decodes = len(shape.decode_context_lens)
        num_prefill_tokens = sum(n for _, n in step.items) - num_decodes
        self.step_stats.record_step(seconds, num_prefill_tokens, num_decodes)
        finished = []
        for seq, num_new in step.items:
            seq.num_computed_tokens += num_new
            self._cache_prefix_blocks(seq)
            if seq.num_computed_tokens < seq.num_tokens:
                continue
            seq.num_tokens += 1  # sampled a token
            seq.num_output_tokens += 1
            if seq.num_output_tokens == 1:  # a prompt's first token, sampled here
                self.step_stats.record_first_token(now - seq.added_at)
            if seq.req.first_token_at is None:
                seq.req.first_token_at = now
            if self._is_done(seq):
                finished.append(seq)
        for seq in finished:
            self.running.remove(seq)
            self._free(seq)
        return finished

    def _is_done(self, seq: SimSeq) -> bool:
        if seq.hand_over:
            return True  # to its decode instance, whatever this instance's role is now
        return (
            seq.num_output_tokens >= seq.req.output_len or seq.num_tokens >= self.spec.max_model_len
        )

    # -- prefix cache ---------------------------------------------------------------------------

    def _cache_prefix_blocks(self, seq: SimSeq) -> None:
        """Publish the trace blocks `seq` has fully computed (like `cache_full_blocks`)."""
        if not self.spec.enable_prefix_caching:
            return
        full = min(seq.num_computed_tokens, seq.req.num_prompt_tokens) // HASH_BLOCK_TOKENS
        for block in seq.req.hash_ids[:full]:
            self.prefix_cache[block] = None
            self.prefix_cache.move_to_end(block)
        self._evict_prefix_blocks()

    def _evict_prefix_blocks(self) -> None:
        """Keep at most a pool's worth of blocks, least recently used out first.

        The engine's cache lives in free blocks and in running sequences' blocks, so a
        whole pool is its upper bound; the simulated hit rate is optimistic by that much.
        """
        capacity = self.spec.num_kv_blocks * self.spec.block_size // HASH_BLOCK_TOKENS
        while len(self.prefix_cache) > capacity:
            self.prefix_cache.popitem(last=False)

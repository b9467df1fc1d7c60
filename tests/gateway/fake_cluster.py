"""A test double of the scheduler + one instance, on a real NATS bus.

It answers `SCHED_SUBMIT` (placing everything on "test-inst", or replying a scripted error),
then streams scripted `TokenDelta`s on the request's output subject, one token per completion
per step; it records the `AbortCmd`s that reach `instance_cmd("test-inst")` and stops the
aborted request's stream the way an instance does (final deltas with finish_reason "abort").
It also answers `CLUSTER_STATE` with one heartbeat.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from xllm.protocol import (
    AbortCmd,
    ClusterState,
    ClusterStateRequest,
    DraftCounts,
    ErrorInfo,
    Heartbeat,
    InstanceLost,
    KvCacheStats,
    KvTierCounters,
    KvTierStats,
    LoadStats,
    Logprob,
    SpeculationStats,
    SubmitReply,
    SubmitRequest,
    TokenDelta,
    TypeDispatcher,
    encode,
    make_callback,
    subjects,
)

INSTANCE = "test-inst"


@dataclass
class Script:
    """What the fake instance does with one request."""

    tokens: list[list[int]]
    """Per completion index, the tokens to stream (cut to max_tokens → "length")."""
    finish_reason: str = "stop"
    """The final delta's reason when the tokens run out before max_tokens."""
    delay: float = 0.0
    """Seconds between steps."""
    submit_error: ErrorInfo | None = None
    """Reply this to the submit instead of placing the request."""
    stream_error: ErrorInfo | None = None
    """After the tokens, send an error delta instead of the final ones."""
    tokens_per_delta: int = 1
    """Tokens per delta, as speculative decoding sends them: each delta beyond the first
    token also reports its tokens as kept drafts (and as many rejected ones)."""
    lost_before_reply: bool = False
    """Announce INSTANCE lost just before replying (placed, then it died at once), and
    stream nothing."""
    cumulative_logprobs: list[float] | None = None
    """Beam search: a stray one-token delta (a prefill instance's first token, which the
    gateway must ignore), then each completion whole in one final delta with its
    cumulative logprob from this list."""


@dataclass
class FakeCluster:
    nc: object
    model_name: str
    plan: Callable[[SubmitRequest], Script]
    roles: list[str] = field(default_factory=lambda: ["both"])
    """The roles of the instances the cluster view reports (the first one is INSTANCE)."""
    submits: list[SubmitRequest] = field(default_factory=list)
    aborts: list[str] = field(default_factory=list)
    _aborted: set[str] = field(default_factory=set)
    _tasks: set[asyncio.Task] = field(default_factory=set)
    _subs: list = field(default_factory=list)

    async def start(self) -> None:
        scheduler = TypeDispatcher(
            {SubmitRequest: self.on_submit, ClusterStateRequest: self.on_cluster_state}
        )
        instance = TypeDispatcher({AbortCmd: self.on_abort})
        for subject, dispatcher in (
            (subjects.SCHED_SUBMIT, scheduler),
            (subjects.CLUSTER_STATE, scheduler),
            (subjects.instance_cmd(INSTANCE), instance),
        ):
            self._subs.append(await self.nc.subscribe(subject, cb=make_callback(dispatcher)))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for sub in self._subs:
            await sub.unsubscribe()

    async def wait_abort(self, request_id: str, timeout: float = 3.0) -> bool:
        deadline = time.monotonic() + timeout
        while request_id not in self.aborts and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return request_id in self.aborts

    async def on_submit(self, req: SubmitRequest) -> SubmitReply:
        self.submits.append(req)
        script = self.plan(req)
        if script.submit_error is not None:
            return SubmitReply(request_id=req.request_id, error=script.submit_error)
        if script.lost_before_reply:
            await self.nc.publish(
                subjects.INSTANCE_LOST, encode(InstanceLost(instance_id=INSTANCE))
            )
            await self.nc.flush()
            return SubmitReply(request_id=req.request_id, instance_id=INSTANCE)
        task = asyncio.create_task(self._stream(req, script))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return SubmitReply(request_id=req.request_id, instance_id=INSTANCE)

    async def on_abort(self, cmd: AbortCmd) -> None:
        self.aborts.append(cmd.request_id)
        self._aborted.add(cmd.request_id)

    async def on_cluster_state(self, _: ClusterStateRequest) -> ClusterState:
        return ClusterState(
            instances=[
                replace(self.heartbeat(), instance_id=f"{INSTANCE}-{i}" if i else INSTANCE, role=r)
                for i, r in enumerate(self.roles)
            ],
            policy="fake",
            num_submitted=len(self.submits),
            num_rejected=0,
            num_redispatched=0,
            sent_at=time.time(),
        )

    def heartbeat(self) -> Heartbeat:
        return Heartbeat(
            instance_id=INSTANCE,
            role="both",
            model=self.model_name,
            max_model_len=4096,
            kv_block_size=16,
            sent_at=time.time(),
            load=LoadStats(num_running=len(self._tasks)),
            kv=KvCacheStats(blocks_used=3, blocks_free=61),
            speculation=SpeculationStats(
                num_draft_tokens=40,
                num_accepted_draft_tokens=25,
                recent_acceptance_rate=0.625,
                speculating=True,
            ),
            tiers=KvTierStats(host=KvTierCounters(hits=3, num_loads=1, load_seconds=0.25)),
        )

    async def _stream(self, req: SubmitRequest, script: Script) -> None:
        rid, n, max_tokens = req.request_id, req.request.sampling.n, req.request.sampling.max_tokens
        subject = subjects.request_output(rid)
        outputs = [script.tokens[i % len(script.tokens)][:max_tokens] for i in range(n)]
        finished: set[int] = set()
        if script.cumulative_logprobs is not None:
            await self._stream_beams(req, outputs, script.cumulative_logprobs)
            return
        per = script.tokens_per_delta
        for step in range(0, max(len(tokens) for tokens in outputs), per):
            await asyncio.sleep(script.delay)
            if rid in self._aborted:
                break
            for index, tokens in enumerate(outputs):
                if step >= len(tokens):
                    continue
                finish = None
                if step + per >= len(tokens) and script.stream_error is None:
                    finish = "length" if len(tokens) == max_tokens else script.finish_reason
                    finished.add(index)
                chunk = tokens[step : step + per]
                kept = step + len(chunk) - (step // per + 1) if per > 1 else 0  # all but 1 a delta
                delta = _delta(req, index, chunk, step, finish, kept)
                await self.nc.publish(subject, encode(delta))
        if rid in self._aborted:
            for index in sorted(set(range(n)) - finished):
                abort = TokenDelta(request_id=rid, index=index, finish_reason="abort")
                await self.nc.publish(subject, encode(abort))
        elif script.stream_error is not None:
            error = TokenDelta(request_id=rid, finish_reason="error", error=script.stream_error)
            await self.nc.publish(subject, encode(error))

    async def _stream_beams(
        self, req: SubmitRequest, outputs: list[list[int]], cumulative_logprobs: list[float]
    ) -> None:
        subject = subjects.request_output(req.request_id)
        await self.nc.publish(subject, encode(_delta(req, 0, outputs[0][:1], 0, None)))
        for index, tokens in enumerate(outputs):
            finish = "length" if len(tokens) == req.request.sampling.max_tokens else "stop"
            delta = replace(
                _delta(req, index, tokens, 0, finish),
                cumulative_logprob=cumulative_logprobs[index],
            )
            await self.nc.publish(subject, encode(delta))


def _delta(
    req: SubmitRequest, index: int, tokens: list[int], before: int, finish, kept: int = 0
) -> TokenDelta:
    """The delta of `tokens` after `before` others; `kept` drafts so far (and as many
    rejected)."""
    logprobs = None
    if req.request.sampling.logprobs is not None:
        logprobs = []
        for token in tokens:
            top = {token: -0.5, token + 1: -1.5, token + 2: -2.5}
            logprobs.append(
                Logprob(token, -0.5, dict(list(top.items())[: req.request.sampling.logprobs]))
            )
    return TokenDelta(
        request_id=req.request_id,
        index=index,
        token_ids=list(tokens),
        logprobs=logprobs,
        finish_reason=finish,
        num_prompt_tokens=len(req.request.prompt_token_ids),
        num_cached_tokens=2,
        num_output_tokens=before + len(tokens),
        drafts=DraftCounts(2 * kept, kept) if kept else None,
    )

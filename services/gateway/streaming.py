"""One generation's way through the cluster: subscribe → submit → token deltas → text.

    async with Generation(nc, model, request, submit_timeout=5, timeout=600) as gen:
        async for out in gen.outputs():   # Output: new text of one completion (index)
            ...
        gen.usage                         # prompt / completion / cached token counts

Contract with the scheduler and the instances (xllm.protocol, DESIGN.md §2):
  1. subscribe to `request_output(request_id)` *before* submitting, so no delta is missed;
     deltas are decoded in the NATS callback and queued (malformed ones are logged, dropped);
  2. `SCHED_SUBMIT` request/reply → `SubmitReply`; an error in it is raised as
     `ProtocolError` (no reply at all → NO_INSTANCE, i.e. 503). While no scheduler is
     subscribed or it answers NO_INSTANCE (one restarting, a role still loading), the
     submit is retried for up to `placement_wait` seconds first;
  3. per completion index: incremental detokenization and stop strings; a completion ends
     on its final delta or when a stop string matches;
  4. on leaving the context — finished, stop string, client gone, deadline, cancellation —
     if the engine has not finished every completion, `AbortCmd` goes to the instance so it
     frees the KV blocks; the subscription always ends.
  5. if the scheduler reports the instance lost (`InstanceLost`), the request resumes on
     another instance: once every delta that arrived before the notice has been fed, it is
     resubmitted as a continuation — the prompt plus the tokens already streamed, the
     remaining token budget, a grammar told how many prompt tokens it must replay — under
     a new request id (`<id>-r<attempt>`), so a late delta of the old attempt can never
     mix in. The client sees one uninterrupted stream; greedy
     output is exactly what it would have been. Seeded sampling restarts its generator, and
     requests with n > 1 are failed (INSTANCE_FAILED) rather than resumed — but a beam
     search, which streams only its final beams, starts its (deterministic) search again.

NOTE: `AbortCmd` stops all `n` completions. A completion of n > 1 cut by a stop string is
dropped here at once, but the engine keeps generating it until the request as a whole ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, replace

import nats.errors
from nats.aio.client import Client as NATS

from services.gateway.detokenizer import IncrementalDetokenizer, StopStrings
from services.gateway.model import ModelInfo
from xllm.protocol import (
    AbortCmd,
    DecodeError,
    ErrorCode,
    ErrorInfo,
    ImageData,
    InstanceLost,
    Logprob,
    ProtocolError,
    RequestSpec,
    SamplingParams,
    SubmitReply,
    SubmitRequest,
    TokenDelta,
    decode_as,
    encode,
    subjects,
)

log = logging.getLogger(__name__)

MAX_RESUMES = 3
"""Instances a request may lose before it fails: beyond that, the cause is likely the
request itself (it crashes whoever runs it)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class GenerationRequest:
    """A validated, tokenized request: what the OpenAI routes hand to a `Generation`."""

    request_id: str
    """`cmpl-…` / `chatcmpl-…`; also the token of the output subject."""
    model: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    """Validated; `sampling.max_tokens` already fits the context."""
    stop: tuple[str, ...] = ()
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    priority: int = 0
    """0 = online (HTTP); > 0 = offline jobs, which online work preempts."""
    images: tuple[ImageData, ...] = ()
    """The prompt's images (their placeholders already expanded in `prompt_token_ids`)."""


@dataclass(slots=True)
class Output:
    """What one completion added since its previous Output."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[Logprob] | None
    """One per token in `token_ids` when logprobs were asked for."""
    finish_reason: str | None
    """Set on the completion's last Output: stop, length, abort."""
    cumulative_logprob: float | None = None
    """Beam search: the beam's summed logprob (its one Output is the whole beam)."""


@dataclass(slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int = 0
    cached_tokens: int = 0
    draft_tokens: int = 0
    """Speculative drafts the instance verified for the request (every attempt's)."""
    accepted_draft_tokens: int = 0

    def to_dict(self) -> dict:
        usage = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }
        if self.draft_tokens:  # OpenAI's names for a prediction's kept / rejected tokens
            usage["completion_tokens_details"] = {
                "accepted_prediction_tokens": self.accepted_draft_tokens,
                "rejected_prediction_tokens": self.draft_tokens - self.accepted_draft_tokens,
            }
        return usage


class CompletionText:
    """One completion as the client sees it: detokenized, cut at stop strings."""

    def __init__(self, index: int, model: ModelInfo, req: GenerationRequest):
        self.index = index
        self.detokenizer = IncrementalDetokenizer(
            model.tokenizer, req.prompt_token_ids, req.skip_special_tokens
        )
        self.stops = StopStrings(req.stop, req.include_stop_str_in_output)
        self.include_stop = req.include_stop_str_in_output
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def feed(self, delta: TokenDelta) -> Output:
        """The text `delta` adds. A delta of several tokens (speculative decoding) is fed
        one token at a time when stop strings are set, so the tokens after the one that
        completes a stop string are dropped — from `token_ids` and the usage too — just as
        if they had come one per delta."""
        if len(delta.token_ids) > 1 and self.stops.stop:
            return self._feed_each(delta)
        return self._feed(delta)

    def _feed_each(self, delta: TokenDelta) -> Output:
        outs: list[Output] = []
        last = len(delta.token_ids) - 1
        for j, token in enumerate(delta.token_ids):
            lps = None if delta.logprobs is None else delta.logprobs[j : j + 1]
            finish = delta.finish_reason if j == last else None
            outs.append(
                self._feed(replace(delta, token_ids=[token], logprobs=lps, finish_reason=finish))
            )
            if self.finish_reason is not None:
                break
        text = "".join(o.text for o in outs)
        tokens = [t for o in outs for t in o.token_ids]
        lps = None if delta.logprobs is None else [lp for o in outs for lp in o.logprobs or ()]
        return Output(self.index, text, tokens, lps, self.finish_reason)

    def _feed(self, delta: TokenDelta) -> Output:
        tokens = delta.token_ids
        self.token_ids += tokens
        text_tokens = tokens
        if delta.finish_reason == "stop" and tokens and not self.include_stop:
            text_tokens = tokens[:-1]  # the EOS / stop token ends the text, vLLM-style
        text = self.detokenizer.add(text_tokens)
        finish = delta.finish_reason
        if finish is not None:
            text += self.detokenizer.flush()
        text = self.stops.push(text)
        if self.stops.matched is not None:
            finish = "stop"
        elif finish is not None:
            text += self.stops.flush()
        self.finish_reason = finish
        return Output(self.index, text, tokens, delta.logprobs, finish, delta.cumulative_logprob)


PLACEMENT_RETRY = 0.25
"""Seconds between submits while no scheduler or fitting instance exists."""


class _Unplaced(Exception):
    """The scheduler placed nothing for a reason that may pass (`error` if it does not)."""

    def __init__(self, error: ProtocolError):
        super().__init__(str(error))
        self.error = error


class Generation:
    """A submitted request's stream of outputs; an async context manager (see module doc)."""

    def __init__(
        self,
        nc: NATS,
        model: ModelInfo,
        req: GenerationRequest,
        *,
        submit_timeout: float,
        timeout: float,
        placement_wait: float = 0.0,
        live: set[Generation] | None = None,
    ):
        self.nc = nc
        self.req = req
        self.live = live if live is not None else set()
        """The gateway's running generations, which `InstanceLost` notices are routed to."""
        self.attempt_id = req.request_id
        """The request id of the current attempt (changes when the request resumes)."""
        self.num_resumes = 0
        self.submit_timeout = submit_timeout
        self.placement_wait = placement_wait
        """Seconds an attempt waits for a scheduler and a fitting instance to exist."""
        self.timeout = timeout
        self.completions = [CompletionText(i, model, req) for i in range(req.sampling.n)]
        self.beam_search = req.sampling.use_beam_search
        """Its beams come whole at the end: a lost instance's search starts again."""
        self.usage = Usage(prompt_tokens=len(req.prompt_token_ids))
        self.instance_id: str | None = None
        """The instance streaming the output (the decode instance, when disaggregated)."""
        self.prefill_instance_id: str | None = None
        """PD-disaggregated: the instance prefilling the current attempt."""
        self.started_at = time.monotonic()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self._deadline = self.started_at + timeout
        self._queue: asyncio.Queue[TokenDelta | InstanceLost] = asyncio.Queue()
        self._engine_done: set[int] = set()  # indices whose final delta arrived
        self._drafts_before = (0, 0)  # (drafts, accepted) of the attempts before this one
        self._sub = None
        self._submitting = False
        self._lost_while_submitting: list[InstanceLost] = []
        """Notices that came while a submit's reply was on its way: the reply may name the
        lost instance (placed just before it died), and its callback can run before ours."""

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.completions)

    async def __aenter__(self) -> Generation:
        await self._subscribe()
        self.live.add(self)  # before the submit: a loss announced meanwhile must reach us
        try:
            await self._submit(self.req.prompt_token_ids, self.req.sampling)
        except BaseException:
            self.live.discard(self)
            await self._unsubscribe()
            raise
        return self

    async def __aexit__(self, *exc_info) -> None:
        self.live.discard(self)
        try:
            if self.instance_id is not None and len(self._engine_done) < len(self.completions):
                await self._abort()
        finally:
            await self._unsubscribe()

    def instance_lost(self, notice: InstanceLost) -> None:
        """Called for every `InstanceLost`; queued behind the deltas already received."""
        if self._submitting:
            self._lost_while_submitting.append(notice)
        elif notice.instance_id in (self.instance_id, self.prefill_instance_id):
            self._queue.put_nowait(notice)

    def bus_reconnected(self) -> None:
        """NATS reconnected: deltas may have been lost meanwhile, so resume (as on a loss)."""
        if self.instance_id is not None:
            notice = InstanceLost(instance_id=self.instance_id, reason="NATS reconnected")
            self._queue.put_nowait(notice)

    async def outputs(self):
        """Outputs until every completion finished; raises ProtocolError on a failed
        request (an error delta, or the deadline)."""
        while not self.finished:
            delta = await self._next()
            if isinstance(delta, InstanceLost):
                if delta.instance_id in (self.instance_id, self.prefill_instance_id):
                    await self._resume()
                continue
            if delta.request_id != self.attempt_id:
                continue  # queued before a resume: the old attempt's
            if delta.finish_reason == "error":  # the whole request failed (an abort is harmless)
                info = delta.error or ErrorInfo(ErrorCode.INSTANCE_FAILED, "the instance failed")
                raise ProtocolError.from_info(info)
            if self.beam_search and delta.finish_reason is None:
                continue  # a beam search sends only its final beams (P's first token is not one)
            if not 0 <= delta.index < len(self.completions):
                log.warning("%s: dropped a delta for index %d", self.req.request_id, delta.index)
                continue
            if delta.finish_reason is not None:
                self._engine_done.add(delta.index)
            completion = self.completions[delta.index]
            if completion.finish_reason is not None:
                continue  # cut by a stop string already; the rest is discarded
            out = completion.feed(delta)
            self._count(delta, len(out.token_ids))
            yield out

    def _count(self, delta: TokenDelta, num_tokens: int) -> None:
        """Usage and timing of a delta, of which `num_tokens` tokens were used."""
        now = time.monotonic()
        if delta.token_ids:
            if self.first_token_at is None:
                self.first_token_at = now
            self.last_token_at = now
        self.usage.completion_tokens += num_tokens
        self.usage.cached_tokens = max(self.usage.cached_tokens, delta.num_cached_tokens)
        if delta.drafts is not None:  # cumulative per attempt: earlier attempts' come first
            self.usage.draft_tokens = self._drafts_before[0] + delta.drafts.num_draft_tokens
            self.usage.accepted_draft_tokens = (
                self._drafts_before[1] + delta.drafts.num_accepted_tokens
            )

    # -- NATS -------------------------------------------------------------------------------

    async def _on_message(self, msg) -> None:
        try:
            delta = decode_as(msg.data, TokenDelta)
        except DecodeError as e:
            log.warning("%s: dropped a malformed delta: %s", self.req.request_id, e)
            return
        if delta.request_id != self.attempt_id:
            log.warning("%s: dropped a delta of %s", self.attempt_id, delta.request_id)
            return
        self._queue.put_nowait(delta)

    async def _subscribe(self) -> None:
        subject = subjects.request_output(self.attempt_id)
        self._sub = await self.nc.subscribe(subject, cb=self._on_message)

    async def _submit(
        self, prompt: list[int], sampling: SamplingParams, resumed: bool = False
    ) -> None:
        """Submit an attempt, waiting up to `placement_wait` while no scheduler answers or
        no instance can take it (one restarting, a role still loading); sets `instance_id`
        (and `prefill_instance_id`) from the reply."""
        give_up_at = time.monotonic() + self.placement_wait
        while True:
            try:
                await self._submit_once(prompt, sampling, resumed)
                return
            except _Unplaced as e:
                if time.monotonic() + PLACEMENT_RETRY > give_up_at:
                    raise e.error from None
            await asyncio.sleep(PLACEMENT_RETRY)

    async def _submit_once(
        self, prompt: list[int], sampling: SamplingParams, resumed: bool
    ) -> None:
        request = RequestSpec(
            prompt_token_ids=prompt,
            sampling=sampling,
            priority=self.req.priority,
            model=self.req.model,
            images=list(self.req.images),
        )
        submit = SubmitRequest(
            request_id=self.attempt_id, request=request, arrival_time=time.time(), resumed=resumed
        )
        self._submitting, self._lost_while_submitting = True, []
        try:
            msg = await self._request(submit)
        finally:
            self._submitting = False
        try:
            reply = decode_as(msg.data, SubmitReply)
        except DecodeError as e:
            raise ProtocolError(ErrorCode.INTERNAL, f"bad reply from the scheduler: {e}") from e
        if reply.error is not None:
            error = ProtocolError.from_info(reply.error)
            raise _Unplaced(error) if error.code == ErrorCode.NO_INSTANCE else error
        assert reply.instance_id is not None  # SubmitReply checks exactly one is set
        self.instance_id = reply.instance_id
        self.prefill_instance_id = reply.prefill_instance_id
        for notice in self._lost_while_submitting:
            self.instance_lost(notice)

    async def _request(self, submit: SubmitRequest):
        try:
            return await self.nc.request(
                subjects.SCHED_SUBMIT, encode(submit), timeout=self.submit_timeout
            )
        except nats.errors.NoRespondersError:  # none subscribed: nothing was placed
            raise _Unplaced(
                ProtocolError(ErrorCode.NO_INSTANCE, "no scheduler is running")
            ) from None
        except nats.errors.TimeoutError:  # not retried: it may have been placed after all
            raise ProtocolError(
                ErrorCode.NO_INSTANCE,
                f"no scheduler placed the request within {self.submit_timeout:g}s",
            ) from None

    async def _next(self) -> TokenDelta | InstanceLost:
        if not self._queue.empty():
            return self._queue.get_nowait()
        remaining = self._deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise TimeoutError
            return await asyncio.wait_for(self._queue.get(), remaining)
        except TimeoutError:
            raise ProtocolError(
                ErrorCode.TIMEOUT, f"the request took longer than {self.timeout:g}s"
            ) from None

    async def _resume(self) -> None:
        """Continue on another instance from the tokens streamed so far (module doc, 5)."""
        lost = f"{self.instance_id}" + (
            f" / {self.prefill_instance_id}" if self.prefill_instance_id else ""
        )
        if (len(self.completions) > 1 and not self.beam_search) or self.num_resumes >= MAX_RESUMES:
            why = "n > 1 is not resumed" if len(self.completions) > 1 else "too many resumes"
            raise ProtocolError(
                ErrorCode.INSTANCE_FAILED, f"the instance running the request was lost ({why})"
            )
        await self._abort()  # in case it is alive after all (a partition): free its blocks
        await self._unsubscribe()
        self._drafts_before = (self.usage.draft_tokens, self.usage.accepted_draft_tokens)
        self.num_resumes += 1
        self.attempt_id = f"{self.req.request_id}-r{self.num_resumes}"
        generated = [] if self.beam_search else self.completions[0].token_ids
        structured = self.req.sampling.structured
        if structured is not None:  # the grammar goes on from after the streamed tokens
            structured = replace(structured, num_replayed_tokens=len(generated))
        sampling = replace(
            self.req.sampling,
            max_tokens=self.req.sampling.max_tokens - len(generated),
            min_tokens=max(0, self.req.sampling.min_tokens - len(generated)),
            structured=structured,
        )
        await self._subscribe()
        await self._submit(self.req.prompt_token_ids + generated, sampling, resumed=True)
        log.warning(
            "%s: instance %s lost after %d tokens; resumed on %s as %s",
            self.req.request_id,
            lost,
            len(generated),
            self.instance_id,
            self.attempt_id,
        )

    async def _abort(self) -> None:
        assert self.instance_id is not None
        log.info("%s: aborting on %s", self.attempt_id, self.instance_id)
        cmd = AbortCmd(request_id=self.attempt_id)
        targets = [self.instance_id, self.prefill_instance_id]
        try:
            for instance_id in filter(None, targets):  # both halves hold blocks
                await self.nc.publish(subjects.instance_cmd(instance_id), encode(cmd))
        except Exception:  # connection closing: the instance's request will run out
            log.warning("%s: could not send the abort", self.req.request_id, exc_info=True)

    async def _unsubscribe(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

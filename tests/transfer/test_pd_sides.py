"""The decode side and the prefill side of PD disaggregation as state machines, over the
loopback transport (no Mooncake, no NATS): the normal path, an abort in every state, peer
loss, late and duplicate answers, timeouts — and after each, every block of both engines
free again.

Two real tiny engines in one process; `Pd` wires a DecodeSide (instance "d0") to a
PrefillSide (instance "p0") the way the instance loop does, with the messages they publish
kept in lists and delivered when the test says so (so each state can be held on purpose).
"""

from __future__ import annotations

import asyncio
import time

import pytest

from xllm.config import EngineConfig
from xllm.engine.engine import Engine
from xllm.instance.early_aborts import EarlyAborts
from xllm.instance.lost_peers import LostPeers
from xllm.instance.pd_decode import DecodeSide, DecodeState
from xllm.instance.pd_prefill import PrefillSide, PrefillState
from xllm.instance.wire import to_wire
from xllm.kv_transfer import TransferState
from xllm.kv_transfer.loopback import LoopbackTransport
from xllm.protocol import (
    DecodeCmd,
    ErrorCode,
    KvReady,
    PrefillCmd,
    RequestSpec,
    SamplingParams,
    TokenDelta,
)

TIMEOUT = 120.0
PROMPT = list(range(100, 140))  # 40 tokens: 3 blocks of 16


class Pd:
    """A decode side and a prefill side, each over its own engine and loopback pool."""

    def __init__(self, model_dir: str, hold: bool, num_kv_blocks: int = 8):
        def engine() -> Engine:
            config = EngineConfig(model=model_dir, num_kv_blocks=num_kv_blocks, num_threads=1)
            return Engine(config)

        self.d_engine, self.p_engine = engine(), engine()
        block_size = self.d_engine.config.block_size
        self.d_pool = LoopbackTransport(self.d_engine.runner.kv_cache.tensor, block_size)
        self.p_pool = LoopbackTransport(self.p_engine.runner.kv_cache.tensor, block_size, hold=hold)
        self.to_p: list[PrefillCmd] = []
        self.to_d: list[KvReady] = []
        self.deltas: list[TokenDelta] = []
        """What both sides sent to clients, in order."""
        self.ended: list[str] = []
        """Write-ended notices the prefill side raised, not yet handled."""
        self.decode = DecodeSide(
            "d0", 1.0, self.d_engine, lambda: self.d_pool, self._send_cmd, self._send,
            LostPeers(), EarlyAborts(), TIMEOUT,
        )  # fmt: skip
        self.prefill = PrefillSide(
            self.p_engine, lambda: self.p_pool, self._send_cmd, self.ended.append,
            LostPeers(), EarlyAborts(),
        )  # fmt: skip

    async def _send_cmd(self, instance_id: str, msg) -> None:
        (self.to_p if instance_id == "p0" else self.to_d).append(msg)

    async def _send(self, delta: TokenDelta) -> None:
        self.deltas.append(delta)

    # -- what the instance loops do --------------------------------------------------------

    async def submit(self, request_id: str, prompt=PROMPT, max_tokens: int = 4) -> None:
        """The scheduler's DecodeCmd reaches d0."""
        await self.decode.on_decode(decode_cmd(request_id, prompt, max_tokens))

    async def deliver_to_p(self) -> None:
        while self.to_p:
            await self.prefill.on_prefill(self.to_p.pop(0))

    async def deliver_to_d(self) -> list[KvReady]:
        delivered, self.to_d = self.to_d, []
        for msg in delivered:
            await self.decode.on_kv_ready(msg)
        return delivered

    async def step_p(self) -> None:
        """One prefill engine step, its outputs streamed and routed as the loop does."""
        for out in self.p_engine.step():
            self.deltas.append(to_wire(out))
            if self.prefill.owns(out.request_id):
                await self.prefill.on_step_output(out)

    async def handle_write_ends(self, release_first: bool = False) -> None:
        """The loop's two halves of a write's end: answer at once, release between steps."""
        ended = list(self.ended)
        self.ended.clear()  # the prefill side appends to this very list
        for request_id in ended:
            if release_first:
                await self.prefill.release(request_id)
            await self.prefill.on_write_ended(request_id)
            if not release_first:
                await self.prefill.release(request_id)

    async def prefill_to_first_token(self) -> None:
        await self.deliver_to_p()
        while self.prefill.in_state(PrefillState.PREFILLING):
            await self.step_p()

    def decode_to_end(self) -> dict[str, list[int]]:
        tokens: dict[str, list[int]] = {}
        while self.d_engine.has_unfinished():
            for out in self.d_engine.step():
                self.deltas.append(to_wire(out))
                tokens.setdefault(out.request_id, []).extend(out.token_ids)
        return tokens

    # -- what the tests check --------------------------------------------------------------

    def finishes(self, request_id: str) -> list[str | None]:
        return [
            d.finish_reason for d in self.deltas if d.request_id == request_id and d.finish_reason
        ]

    def errors(self, request_id: str) -> list[ErrorCode]:
        return [d.error.code for d in self.deltas if d.request_id == request_id and d.error]

    def assert_all_released(self) -> None:
        assert not self.decode.requests and not self.prefill.requests
        assert self.d_engine.block_manager.num_used_blocks == 0
        assert self.p_engine.block_manager.num_used_blocks == 0
        assert not self.d_engine.sequences and not self.p_engine.sequences
        assert self.p_pool.in_flight() == 0

    def close(self) -> None:
        self.d_pool.close()
        self.p_pool.close()


def decode_cmd(request_id: str, prompt: list[int], max_tokens: int) -> DecodeCmd:
    return DecodeCmd(
        request_id=request_id,
        request=RequestSpec(
            prompt_token_ids=prompt,
            sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
        ),
        prefill_instance_id="p0",
        prefill_started_at=2.0,
    )


@pytest.fixture
def make_pd(tiny_model_dir):
    made: list[Pd] = []

    def make(hold: bool = False, **kw) -> Pd:
        made.append(Pd(str(tiny_model_dir("qwen3", "float32")), hold, **kw))
        return made[-1]

    yield make
    for pd in made:
        pd.close()


def run(coro):
    return asyncio.run(coro)


# -- the normal path --------------------------------------------------------------------------


def test_the_kv_crosses_and_decode_continues_as_if_colocated(make_pd):
    pd = make_pd()

    async def scenario():
        await pd.submit("r")
        assert pd.decode.in_state(DecodeState.RESERVED) == ["r"]
        await pd.prefill_to_first_token()  # the loopback write is over at once
        assert pd.ended == ["r"]
        await pd.handle_write_ends()
        [ready] = await pd.deliver_to_d()
        assert ready.error is None and ready.num_blocks == 3
        assert pd.d_pool.stats.bytes_received == pd.p_pool.stats.bytes_sent > 0

    run(scenario())
    decoded = pd.decode_to_end()["r"]
    first = next(t for d in pd.deltas if d.request_id == "r" for t in d.token_ids)
    colocated = pd.p_engine  # same weights: the same request run in one engine
    colocated.add_request("c", PROMPT, decode_cmd("c", PROMPT, 4).request.sampling)
    expected = []
    while colocated.has_unfinished():
        for out in colocated.step():
            expected.extend(out.token_ids)
    assert [first, *decoded] == expected
    assert pd.finishes("r") == ["length"]
    pd.assert_all_released()


def test_a_first_token_that_ends_the_request_sends_no_kv(make_pd):
    pd = make_pd()

    async def scenario():
        await pd.submit("r", max_tokens=1)
        await pd.prefill_to_first_token()
        assert not pd.ended  # nothing to write
        [ready] = await pd.deliver_to_d()
        assert ready.finished

    run(scenario())
    assert pd.finishes("r") == ["length"] and pd.p_pool.stats.transfers == 0
    pd.assert_all_released()


@pytest.mark.parametrize("release_first", [False, True])
def test_the_decode_instance_is_answered_once_whichever_half_of_a_write_end_runs_first(
    make_pd, release_first
):
    pd = make_pd()

    async def scenario():
        await pd.submit("r")
        await pd.prefill_to_first_token()
        await pd.handle_write_ends(release_first=release_first)
        assert len(await pd.deliver_to_d()) == 1

    run(scenario())
    pd.decode_to_end()
    pd.assert_all_released()


# -- aborts, state by state -------------------------------------------------------------------


def test_abort_while_awaiting_room_asks_nothing_of_the_prefill_instance(make_pd):
    pd = make_pd()
    long = list(range(100, 200))  # 7 of the 8 blocks: two do not fit

    async def scenario():
        await pd.submit("a", long)
        await pd.submit("b", long)
        assert pd.decode.in_state(DecodeState.AWAITING_ROOM) == ["b"]
        assert await pd.decode.abort("b")
        assert pd.finishes("b") == ["abort"]
        assert [c.request_id for c in pd.to_p] == ["a"]
        await pd.prefill_to_first_token()
        await pd.handle_write_ends()
        await pd.deliver_to_d()

    run(scenario())
    pd.decode_to_end()
    pd.assert_all_released()


def test_abort_while_reserved_answers_the_client_but_holds_the_blocks_until_p_answers(make_pd):
    pd = make_pd(hold=True)

    async def scenario():
        await pd.submit("r")
        await pd.prefill_to_first_token()  # P is writing into d0's blocks now
        assert await pd.decode.abort("r")
        assert pd.finishes("r") == ["abort"]
        assert pd.decode.in_state(DecodeState.CANCELLED) == ["r"]
        assert pd.d_engine.block_manager.num_used_blocks == 3  # not freed under the write
        assert await pd.decode.abort("r")  # again: nothing more
        assert pd.finishes("r") == ["abort"]
        pd.p_pool.finish()
        await pd.handle_write_ends()
        [ready] = await pd.deliver_to_d()
        assert ready.error is None  # delivered, but no longer wanted

    run(scenario())
    assert not pd.d_engine.has_unfinished()
    pd.assert_all_released()


def test_abort_while_prefilling_answers_aborted_at_once(make_pd):
    pd = make_pd()

    async def scenario():
        await pd.submit("r")
        await pd.deliver_to_p()
        assert pd.prefill.in_state(PrefillState.PREFILLING) == ["r"]
        assert await pd.prefill.abort("r")
        [ready] = await pd.deliver_to_d()
        assert ready.error is not None and "aborted" in ready.error.message

    run(scenario())
    assert pd.p_pool.stats.transfers == 0
    pd.assert_all_released()


def test_abort_while_the_write_is_in_flight_waits_for_its_end(make_pd):
    pd = make_pd(hold=True)

    async def scenario():
        await pd.submit("r")
        await pd.prefill_to_first_token()
        assert pd.prefill.in_state(PrefillState.SENDING) == ["r"]
        assert await pd.prefill.abort("r")
        assert pd.prefill.in_state(PrefillState.CANCELLING) == ["r"]
        assert not pd.ended and not pd.to_d  # no answer while bytes may still land
        assert pd.p_engine.block_manager.num_used_blocks == 3  # the source stays held
        assert await pd.prefill.abort("r")  # again: nothing more
        pd.p_pool.finish()
        await pd.handle_write_ends()
        [ready] = await pd.deliver_to_d()
        assert ready.error is not None and "aborted" in ready.error.message

    run(scenario())
    pd.assert_all_released()


def test_abort_of_a_write_still_queued_behind_another_cancels_it_at_once(make_pd):
    pd = make_pd(hold=True, num_kv_blocks=16)

    async def scenario():
        await pd.submit("a")
        await pd.submit("b", list(range(200, 240)))
        await pd.prefill_to_first_token()
        transfers = {rid: pd.prefill.requests[rid].transfer for rid in ("a", "b")}
        assert transfers["a"].poll() is TransferState.TRANSFERRING
        assert transfers["b"].poll() is TransferState.WAITING
        assert await pd.prefill.abort("b")
        assert pd.ended == ["b"]  # cancelled: over before it started
        await pd.handle_write_ends()
        [ready] = await pd.deliver_to_d()
        assert ready.request_id == "b" and "aborted" in ready.error.message
        pd.p_pool.finish()
        await pd.handle_write_ends()
        [ready] = await pd.deliver_to_d()
        assert ready.request_id == "a" and ready.error is None

    run(scenario())
    assert pd.finishes("b") == ["error"]  # d0 fails what P could not deliver
    assert pd.decode_to_end()["a"]
    pd.assert_all_released()


def test_an_abort_that_overtakes_its_prefill_cmd_is_answered_without_prefilling(make_pd):
    pd = make_pd()

    async def scenario():
        await pd.submit("r")
        assert not await pd.prefill.abort("r")  # the gateway's abort came first
        await pd.deliver_to_p()
        [ready] = await pd.deliver_to_d()
        assert "aborted" in ready.error.message

    run(scenario())
    pd.assert_all_released()


# -- peers lost, answers late, duplicated or never ---------------------------------------------


def test_a_lost_prefill_instance_frees_the_reservation_at_once_and_its_late_answer_is_dropped(
    make_pd,
):
    pd = make_pd(hold=True)

    async def scenario():
        await pd.submit("r")
        await pd.prefill_to_first_token()
        await pd.decode.on_instance_lost("p0", started_at=2.0)
        assert not pd.decode.requests and pd.d_engine.block_manager.num_used_blocks == 0
        pd.p_pool.finish()  # P was not dead after all: its answer comes late
        await pd.handle_write_ends()
        await pd.deliver_to_d()

    run(scenario())
    assert pd.finishes("r") == []  # the gateway resumes it elsewhere
    pd.assert_all_released()


def test_a_lost_decode_instance_stops_the_prefill_side_in_every_state(make_pd):
    pd = make_pd(hold=True, num_kv_blocks=16)

    async def scenario():
        await pd.submit("sending")
        await pd.prefill_to_first_token()
        await pd.submit("prefilling", list(range(200, 240)))
        await pd.deliver_to_p()
        assert pd.prefill.in_state(PrefillState.PREFILLING) == ["prefilling"]
        await pd.prefill.on_instance_lost("d0", started_at=1.0)
        assert pd.prefill.in_state(PrefillState.CANCELLING) == ["sending"]
        assert not pd.prefill.owns("prefilling") and not pd.to_d
        await pd.submit("late", list(range(300, 340)))  # on its way when d0 died
        await pd.deliver_to_p()
        assert not pd.prefill.owns("late")
        pd.d_pool.close()  # d0 is gone: the write in flight fails
        pd.p_pool.finish()
        await pd.handle_write_ends()
        assert [m.request_id for m in pd.to_d] == ["sending"]  # answered into the void

    run(scenario())
    assert pd.p_engine.block_manager.num_used_blocks == 0 and not pd.prefill.requests


def test_a_failed_write_is_answered_as_an_error_and_frees_both_sides(make_pd):
    pd = make_pd(hold=True)

    async def scenario():
        await pd.submit("r")
        await pd.prefill_to_first_token()
        pd.d_pool.close()  # d0's pool vanishes mid-write; nobody announced anything
        pd.p_pool.finish()
        await pd.handle_write_ends()
        [ready] = await pd.deliver_to_d()
        assert ready.error.code is ErrorCode.INTERNAL and "failed" in ready.error.message

    run(scenario())
    assert pd.errors("r") == [ErrorCode.INTERNAL]
    pd.assert_all_released()


def test_a_reservation_nobody_answers_expires_and_a_cancelled_one_expires_silently(make_pd):
    pd = make_pd(num_kv_blocks=16)

    async def scenario():
        await pd.submit("silent")
        await pd.submit("cancelled", list(range(200, 240)))
        assert await pd.decode.abort("cancelled")
        await pd.decode.expire(time.monotonic())  # not yet
        assert len(pd.decode.requests) == 2
        await pd.decode.expire(time.monotonic() + TIMEOUT + 1)
        assert not pd.decode.requests
        await pd.deliver_to_p()  # P comes back to life and answers both, too late
        while pd.prefill.in_state(PrefillState.PREFILLING):
            await pd.step_p()
        await pd.handle_write_ends()
        assert len(await pd.deliver_to_d()) == 2  # dropped: nothing held for them

    run(scenario())
    assert pd.errors("silent") == [ErrorCode.INSTANCE_FAILED]
    assert pd.finishes("cancelled") == ["abort"]
    pd.assert_all_released()


def test_a_duplicate_kv_ready_does_not_touch_the_request_now_decoding(make_pd):
    pd = make_pd()

    async def scenario():
        await pd.submit("r")
        await pd.prefill_to_first_token()
        await pd.handle_write_ends()
        [ready] = await pd.deliver_to_d()
        await pd.decode.on_kv_ready(ready)  # again
        await pd.decode.on_kv_ready(KvReady(request_id="r", error=ready.error))

    run(scenario())
    assert len(pd.decode_to_end()["r"]) == 3  # the 4 tokens: 1 from P, 3 decoded here
    assert pd.finishes("r") == ["length"]
    pd.assert_all_released()


def test_a_second_decode_cmd_for_a_request_here_is_refused_not_merged(make_pd):
    pd = make_pd()

    async def scenario():
        await pd.submit("r")
        await pd.submit("r")  # what the engine says of a second request under one id
        assert len(pd.to_p) == 1
        await pd.prefill_to_first_token()
        await pd.handle_write_ends()
        await pd.deliver_to_d()

    run(scenario())
    assert pd.errors("r") == [ErrorCode.INVALID_REQUEST]
    assert len(pd.decode_to_end()["r"]) == 3  # the first one carries on
    pd.assert_all_released()


def test_a_prompt_too_long_is_refused_with_its_own_code(make_pd):
    pd = make_pd()

    async def scenario():
        await pd.submit("r", list(range(100, 100 + pd.d_engine.max_model_len)))

    run(scenario())
    assert pd.errors("r") == [ErrorCode.CONTEXT_LENGTH_EXCEEDED]
    pd.assert_all_released()

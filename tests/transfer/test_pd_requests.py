"""The decode side of PD disaggregation when its prefill peer is lost or the request was
aborted before its DecodeCmd arrived: no block may be reserved for a transfer no one will
answer (it would stay held until the transfer timeout). A real engine and Mooncake
transport; the commands it would publish are recorded instead."""

from __future__ import annotations

import asyncio

import pytest

from xllm.config import EngineConfig
from xllm.engine.engine import Engine
from xllm.instance.early_aborts import EarlyAborts
from xllm.instance.lost_peers import LostPeers
from xllm.instance.pd_decode import DecodeSide, DecodeState
from xllm.protocol import DecodeCmd, PrefillCmd, RequestSpec, SamplingParams

pytest.importorskip("mooncake.engine")

PROMPT_TOKENS = 100  # 7 blocks of 16: two such prompts do not fit in 8 blocks


@pytest.fixture
def pd(tiny_model_dir):
    from xllm.kv_transfer.mooncake import MooncakeTransport

    engine = Engine(
        EngineConfig(model=str(tiny_model_dir("qwen3", "float32")), num_kv_blocks=8, num_threads=1)
    )
    sent: list[tuple[str, object]] = []

    async def send_cmd(instance_id, cmd):
        sent.append((instance_id, cmd))

    async def send_delta(delta):
        pass

    transport = MooncakeTransport(engine.runner.kv_cache.tensor, engine.config.block_size)
    requests = DecodeSide(
        "d0",
        0.0,
        engine,
        lambda: transport,
        send_cmd,
        send_delta,
        LostPeers(),
        EarlyAborts(),
        transfer_timeout=120.0,
    )
    return requests, engine, sent


def decode_cmd(request_id: str, prefill_instance_id: str, run: float = 0.0) -> DecodeCmd:
    return DecodeCmd(
        request_id=request_id,
        request=RequestSpec(
            prompt_token_ids=list(range(100, 100 + PROMPT_TOKENS)),
            sampling=SamplingParams(max_tokens=4),
        ),
        prefill_instance_id=prefill_instance_id,
        prefill_started_at=run,
    )


def test_a_lost_prefill_instance_frees_reserved_and_queued_requests(pd):
    requests, engine, sent = pd

    async def scenario():
        await requests.on_decode(decode_cmd("a", "p0"))  # reserves 7 of the 8 blocks
        await requests.on_decode(decode_cmd("b", "p0"))  # waits for room
        awaiting_room = requests.in_state(DecodeState.AWAITING_ROOM)
        assert engine.block_manager.num_used_blocks == 7 and len(awaiting_room) == 1
        await requests.on_instance_lost("p0")
        await requests.on_decode(decode_cmd("c", "p0"))  # was on its way when p0 died
        await requests.reserve_waiting()

    asyncio.run(scenario())
    assert engine.block_manager.num_used_blocks == 0
    assert not requests.requests  # none reserved, none awaiting room
    assert [cmd.request_id for _, cmd in sent if isinstance(cmd, PrefillCmd)] == ["a"]


def test_a_decode_cmd_arriving_after_its_abort_reserves_nothing(pd):
    requests, engine, sent = pd

    async def scenario():
        assert not await requests.abort("late")  # the gateway's abort overtook the DecodeCmd
        await requests.on_decode(decode_cmd("late", "p0"))

    asyncio.run(scenario())
    assert engine.block_manager.num_used_blocks == 0
    assert not requests.requests and not sent


def test_a_prefill_instance_restarted_under_its_id_is_a_new_peer(pd):
    """The supervisor restarts a killed prefill instance under the same id within seconds:
    the loss of its first run must not make the decode side drop DecodeCmds for the new
    run (they would never be answered), while late ones for the lost run still are."""
    requests, _engine, sent = pd

    async def scenario():
        await requests.on_decode(decode_cmd("a", "p0", run=1.0))  # reserves 7 of 8 blocks
        await requests.on_instance_lost("p0", started_at=1.0)
        await requests.on_decode(decode_cmd("late", "p0", run=1.0))  # for the lost run
        await requests.on_decode(decode_cmd("new", "p0", run=2.0))  # the restarted run

    asyncio.run(scenario())
    prefills = [cmd for _, cmd in sent if isinstance(cmd, PrefillCmd)]
    assert [cmd.request_id for cmd in prefills] == ["a", "new"]
    assert requests.in_state(DecodeState.RESERVED) == ["new"]
    assert not requests.in_state(DecodeState.AWAITING_ROOM)

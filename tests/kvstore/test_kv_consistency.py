"""The index stays true: what `xllm.kv.match` reports for an instance is what that
instance's own block manager holds — after evictions under a tiny KV budget, and after the
instance is killed (then it reports nothing for it).

Real parts throughout: nats-server, Valkey, the kvstore service, engines on the tiny model.
One instance runs in this process, so the test can read its block manager between
requests; the one that gets killed is a separate process (`python -m services.decode`).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time

import nats
import pytest
from redis.asyncio import Redis

from services.kvstore.config import KvStoreConfig
from services.kvstore.index import KvIndex
from services.kvstore.service import KvStoreService
from xllm.config import EngineConfig
from xllm.engine.engine import Engine
from xllm.engine.prefix_hash import block_hashes
from xllm.instance.config import InstanceConfig
from xllm.instance.instance import Instance
from xllm.protocol import (
    GenerateCmd,
    KvMatchReply,
    KvMatchRequest,
    RequestSpec,
    SamplingParams,
    TokenDelta,
    decode_as,
    encode,
    subjects,
)

BLOCK_SIZE = 16
NUM_KV_BLOCKS = 24  # a prompt takes 7 blocks: a few requests evict each other's prefixes
HEARTBEAT_TIMEOUT = 1.0


def leading_held(chain: list[int], cached: set[int]) -> int:
    n = 0
    while n < len(chain) and chain[n] in cached:
        n += 1
    return n


class Cluster:
    """kvstore + an in-process instance, driven over NATS."""

    def __init__(self, nats_url: str, redis_url: str, key_prefix: str, model: str):
        self.nats_url, self.redis_url = nats_url, redis_url
        self.kv_config = KvStoreConfig(heartbeat_timeout=HEARTBEAT_TIMEOUT, key_prefix=key_prefix)
        self.engine = Engine(
            EngineConfig(model=model, block_size=BLOCK_SIZE, num_kv_blocks=NUM_KV_BLOCKS)
        )
        self.stop = asyncio.Event()

    async def __aenter__(self):
        self.nc = await nats.connect(self.nats_url)
        self.redis = Redis.from_url(self.redis_url)
        self.index = KvIndex(self.redis, self.kv_config.key_prefix)
        instance_config = InstanceConfig(
            instance_id="local", heartbeat_interval=0.1, kv_events_interval=0.05
        )
        self.instance = Instance(instance_config, self.engine, await nats.connect(self.nats_url))
        self.kvstore = KvStoreService(self.kv_config, await nats.connect(self.nats_url), self.redis)
        self.tasks = [
            asyncio.create_task(self.kvstore.serve(self.stop)),
            asyncio.create_task(self.instance.serve(self.stop)),
        ]
        await asyncio.sleep(0.3)
        return self

    async def __aexit__(self, *exc):
        self.stop.set()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.nc.close()
        await self.redis.aclose()

    async def generate(self, instance_id: str, request_id: str, prompt: list[int]) -> None:
        """Run one request to its end on `instance_id`."""
        done = asyncio.Event()

        async def on_delta(msg):
            if decode_as(msg.data, TokenDelta).finish_reason is not None:
                done.set()

        sub = await self.nc.subscribe(subjects.request_output(request_id), cb=on_delta)
        sampling = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        request = RequestSpec(prompt_token_ids=prompt, sampling=sampling)
        cmd = GenerateCmd(request_id=request_id, request=request)
        await self.nc.publish(subjects.instance_cmd(instance_id), encode(cmd))
        await asyncio.wait_for(done.wait(), timeout=120)
        await sub.unsubscribe()

    async def match(self, chain: list[int]) -> dict[str, int]:
        req = KvMatchRequest(block_hashes=chain)
        reply = await self.nc.request(subjects.KV_MATCH, encode(req), timeout=5)
        return decode_as(reply.data, KvMatchReply).matched_blocks

    async def wait_for_heartbeat(self, instance_id: str, timeout: float) -> None:
        """Commands are fire-and-forget: an instance must be subscribed before it gets one."""
        heard = asyncio.Event()

        async def on_heartbeat(msg):
            if msg.data and instance_id.encode() in msg.data:
                heard.set()

        sub = await self.nc.subscribe(subjects.HEARTBEAT, cb=on_heartbeat)
        await asyncio.wait_for(heard.wait(), timeout)
        await sub.unsubscribe()

    async def settle(self) -> None:
        """Long enough for the last KV events batch to be published and applied."""
        await asyncio.sleep(0.4)


def prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    system = [rng.randrange(10, 1000) for _ in range(48)]  # 3 shared blocks
    return [system + [rng.randrange(10, 1000) for _ in range(60)] for _ in range(n)]


def test_match_equals_the_block_manager_through_evictions(
    nats_url, redis_url, key_prefix, tiny_model_dir
):
    model = str(tiny_model_dir("qwen3", "float32"))

    async def scenario():
        async with Cluster(nats_url, redis_url, key_prefix, model) as c:
            chains, evicted_seen = [], False
            for i, prompt in enumerate(prompts(8, seed=1)):
                await c.generate("local", f"r{i}", prompt)
                chains.append(block_hashes(prompt, BLOCK_SIZE))
                await c.settle()
                cached = set(c.engine.block_manager.cached_blocks)
                assert await c.index.blocks("local") == cached
                for chain in chains:
                    held = leading_held(chain, cached)
                    evicted_seen |= held < len(chain)
                    assert (await c.match(chain)).get("local", 0) == held
            return evicted_seen

    assert asyncio.run(scenario()), "the KV budget was meant to force evictions"


@pytest.mark.slow
def test_a_killed_instance_leaves_the_index(nats_url, redis_url, key_prefix, tiny_model_dir):
    model = str(tiny_model_dir("qwen3", "float32"))
    env = {**os.environ, "XLLM_NATS_URL": nats_url, "XLLM_MODEL": model}
    victim = subprocess.Popen(
        [sys.executable, "-m", "services.decode", "--role", "both", "--instance-id", "victim"]
        + ["--num-kv-blocks", "64", "--heartbeat-interval", "0.1", "--kv-events-interval", "0.05"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    async def scenario():
        async with Cluster(nats_url, redis_url, key_prefix, model) as c:
            prompt = prompts(1, seed=2)[0]
            chain = block_hashes(prompt, BLOCK_SIZE)
            await c.wait_for_heartbeat("victim", timeout=120)
            await c.generate("victim", "v0", prompt)
            await c.generate("local", "l0", prompt)
            await c.settle()
            before = await c.match(chain)
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            killed_at = time.monotonic()
            while "victim" in await c.match(chain):
                assert time.monotonic() - killed_at < 4 * HEARTBEAT_TIMEOUT, "victim still listed"
                await asyncio.sleep(0.1)
            return before, await c.match(chain), await c.index.instances()

    try:
        before, after, instances = asyncio.run(scenario())
    finally:
        victim.kill()
    assert before == {"victim": len(prompts(1, seed=2)[0]) // BLOCK_SIZE, "local": 6}
    assert after == {"local": 6}
    assert "victim" not in instances

"""The cluster KV tier, for real: a `mooncake_master` process, instance A in its own process,
instance B here. A computes a long prefix and puts its blocks in Mooncake Store; B, given a
prompt with that prefix, fetches them (bytes counted) instead of prefilling them, and its
output is token-for-token that of an engine without tiers. When the blocks' holder dies, or
the master goes away and comes back, B's requests still finish, with the right tokens,
recomputing what it cannot fetch."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.engine.conftest import make_engine, run_one
from xllm.cli.cluster.embedded import start_mooncake_master
from xllm.config import EngineConfig
from xllm.engine.engine import Engine

pytestmark = pytest.mark.slow

BLOCK = 4
PREFIX = [(11 * i + 5) % 300 + 30 for i in range(8 * BLOCK)]  # eight full blocks
OTHER = [(17 * i + 2) % 300 + 30 for i in range(8 * BLOCK)]
TIERS = dict(block_size=BLOCK, num_kv_blocks=32, kv_store_segment_gb=0.0625)

# Instance A: compute the given prompts, put their blocks, report, stay up (the objects live
# in the memory it lends the store) until its stdin closes.
INSTANCE_A = """
import json, sys
from xllm.config import EngineConfig
from xllm.engine.engine import Engine
from xllm.protocol.types import SamplingParams
options, prompts = json.loads(sys.argv[1]), json.loads(sys.argv[2])
engine = Engine(EngineConfig(**options))
for i, prompt in enumerate(prompts):
    engine.add_request(str(i), prompt, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
engine.tiers.flush()
print(json.dumps(engine.tiers.stats["store"].blocks_stored), flush=True)
sys.stdin.read()
"""


def test_an_instance_fetches_a_prefix_another_computed(tiny_model_dir):
    model = str(tiny_model_dir("llama"))
    plain = make_engine(model, block_size=BLOCK, num_kv_blocks=32)
    host_gb = 40 * plain.runner.kv_cache.nbytes / 32 / 2**30
    with start_mooncake_master() as master:
        options = dict(
            TIERS, model=model, dtype="float32", host_kv_gb=host_gb, kv_store_master=master.url
        )
        a = subprocess.Popen(
            [
                sys.executable,
                "-c",
                INSTANCE_A,
                json.dumps(options),
                json.dumps([PREFIX + [1], OTHER + [1]]),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            put = json.loads(a.stdout.readline())
            assert put >= 16  # both prompts' eight prefix blocks (and more, from outputs)
            b = Engine(EngineConfig(**options))
            store = b.tiers.stats["store"]

            got, cached = run_one(b, "b1", PREFIX + [2, 3])
            assert got == run_one(plain, "p1", PREFIX + [2, 3])[0]
            assert cached == len(PREFIX)  # the prefix was fetched, not prefilled
            assert store.hits == 8 and store.bytes_loaded == 8 * b.tiers.bytes_per_block

            a.kill()  # the holder of OTHER's blocks dies: fetching them fails or finds none
            a.wait()
            got, _ = run_one(b, "b2", OTHER + [4])
            # The master still lists them (until the dead client's TTL): the get failed.
            assert store.failed_loads == 1 and store.hits == 8
            assert got == run_one(plain, "p2", OTHER + [4])[0]

            master.process.kill()  # the master goes: every store call fails
            master.process.wait()
            got, cached = run_one(b, "b3", PREFIX[:12] + [5, 6])
            assert got == run_one(plain, "p3", PREFIX[:12] + [5, 6])[0]
            assert cached == 12  # from b's own tiers still (device, host)

            master.restart()
            # Requests go on; puts work again once the client has reconnected on its own.
            stored_before = store.blocks_stored
            deadline = time.monotonic() + 20
            for k in range(100):
                prompt = [(5 * i + k) % 300 + 30 for i in range(3 * BLOCK)] + [7]
                got, _ = run_one(b, f"b4.{k}", prompt)
                assert got == run_one(plain, f"p4.{k}", prompt)[0]
                b.tiers.flush()
                if store.blocks_stored > stored_before or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert store.blocks_stored > stored_before, "puts work again after the restart"
        finally:
            a.kill()
            a.wait()

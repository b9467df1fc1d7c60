"""The store tier's replicas and its audit, for real: a `mooncake_master` process, instance
A in its own process, instance B here.

* Replica reads: A puts every block twice, in its segment and H's (another instance's: B
  lends the store no memory, so no copy is local to it, which `get` would read first). A
  dies; the master still lists A's segment, so a `get` whose first replica is there fails,
  and B reads the copy in H's segment instead (`replica_reads`): no load fails, nothing is
  recomputed, and the tokens are those of an engine without tiers.
* Audit: blocks B put that the store no longer holds (removed, or lost when the master
  restarted) are reported as evicted from the store tier (KV events); while the master is
  down, nothing is.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.engine.conftest import make_engine, run_one
from tests.engine.test_kv_store_tier import BLOCK, INSTANCE_A, OTHER, PREFIX, TIERS
from xllm.cli.cluster.embedded import start_mooncake_master
from xllm.config import EngineConfig
from xllm.engine.engine import Engine
from xllm.instance.main import read_store_replicas

pytestmark = pytest.mark.slow

LONG = [(7 * i + 3) % 300 + 30 for i in range(16 * BLOCK)]  # sixteen full blocks


def host_gb(plain: Engine) -> float:
    return 40 * plain.runner.kv_cache.nbytes / 32 / 2**30


def test_a_dead_holders_blocks_are_read_from_their_other_replica(tiny_model_dir):
    model = str(tiny_model_dir("llama"))
    plain = make_engine(model, block_size=BLOCK, num_kv_blocks=32)
    with start_mooncake_master() as master:
        options = dict(
            TIERS, model=model, dtype="float32", host_kv_gb=host_gb(plain),
            kv_store_master=master.url, kv_store_replicas=2,
        )  # fmt: skip
        # H's segment must be mounted before A puts (a put places as many replicas as
        # there are segments then): A starts only once H has said it is up.
        h = instance(options, [])
        a = None
        b = Engine(EngineConfig(**{**options, "kv_store_segment_gb": 0.0}))
        read_store_replicas(b)
        try:
            assert json.loads(h.stdout.readline()) == 0
            a = instance(options, [LONG + [1]])
            assert json.loads(a.stdout.readline()) >= 16
            a.kill()  # its segment dies with it; the master lists it until its lease ends
            a.wait()
            store = b.tiers.stats["store"]
            got, cached = run_one(b, "b1", LONG + [2, 3])
            assert got == run_one(plain, "p1", LONG + [2, 3])[0]
            assert cached == len(LONG)  # every block fetched, none recomputed
            assert store.failed_loads == 0 and store.hits == 16
            # Some first replicas were in A's segment (each block's two copies are in the
            # two segments, in either order): read from H's instead.
            stats = b.tier_stats().store
            assert 0 < stats.replica_reads <= 16
        finally:
            for p in (a, h):
                if p is None:
                    continue
                p.kill()
                p.wait()
            b.tiers.close()


def instance(options: dict, prompts: list[list[int]]) -> subprocess.Popen:
    """INSTANCE_A in a process of its own: computes `prompts`, puts their blocks, stays up."""
    return subprocess.Popen(
        [sys.executable, "-c", INSTANCE_A, json.dumps(options), json.dumps(prompts)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def test_blocks_the_store_lost_are_reported_evicted(tiny_model_dir):
    model = str(tiny_model_dir("llama"))
    plain = make_engine(model, block_size=BLOCK, num_kv_blocks=32)
    with start_mooncake_master() as master:
        options = dict(
            TIERS, model=model, dtype="float32", host_kv_gb=host_gb(plain),
            kv_store_master=master.url, kv_store_audit_seconds=0,
        )  # fmt: skip
        b = Engine(EngineConfig(**options))
        try:
            run_one(b, "b1", PREFIX + [1])
            run_one(b, "b2", OTHER + [1])
            b.tiers.flush()
            b.tiers.drain_events()
            put = {h for h, tier in b.tiers.held() if tier == "store"}
            assert len(put) >= 16

            b.tiers.audit_store()  # all there: nothing to report
            assert b.tiers.drain_events() == []

            gone = sorted(put)[:5]  # the store drops some (as its eviction would)
            b.tiers.store.client.batch_remove([b.tiers.store.key(h) for h in gone], True)
            b.tiers.audit_store()
            assert sorted(b.tiers.drain_events()) == [("evicted", h, "store") for h in gone]
            assert b.tiers.stats["store"].blocks_evicted == 5
            held = {h for h, tier in b.tiers.held() if tier == "store"}
            assert held == put - set(gone)  # a snapshot lists only what is still there

            master.process.kill()  # unreachable: an error is not "gone"
            master.process.wait()
            b.tiers.audit_store()
            assert b.tiers.drain_events() == []

            master.restart()  # a new master knows no object: every block is gone
            deadline = time.monotonic() + 20
            events = []
            while not events and time.monotonic() < deadline:
                b.tiers.audit_store()
                events = b.tiers.drain_events()
                time.sleep(0.2)
            assert sorted(events) == sorted(("evicted", h, "store") for h in held)
        finally:
            b.tiers.close()

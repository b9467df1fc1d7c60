"""The supervisor's ExitReporter on a real nats-server, watching real processes: a killed
one is reported once, with its status; a running one, and one stopped after `stop()`, never."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import nats
import pytest

from xllm.cli.cluster.exit_reports import ExitReporter
from xllm.protocol import InstanceExited, decode_as, subjects

pytestmark = pytest.mark.asyncio


def sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


async def test_a_killed_instance_process_is_reported_once(nats_url):
    nc = await nats.connect(nats_url)
    reports: list[InstanceExited] = []

    async def on_exit(msg):
        reports.append(decode_as(msg.data, InstanceExited))

    await nc.subscribe(subjects.INSTANCE_EXITED, cb=on_exit)
    await nc.flush()
    victim, survivor, later = sleeper(), sleeper(), sleeper()
    watched = [("inst-0", victim), ("inst-1", survivor), ("inst-2", later)]
    reporter = ExitReporter(nats_url, lambda: watched)
    reporter.start()
    try:
        before = time.time()
        victim.kill()
        deadline = time.monotonic() + 10
        while not reports and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # a second report would have come by now
    finally:
        reporter.stop()
    later.kill()
    await asyncio.sleep(0.3)
    survivor.kill()
    for _, process in watched:
        process.wait()
    await nc.close()
    assert [(r.instance_id, r.returncode) for r in reports] == [("inst-0", -9)]
    assert reports[0].exited_at >= before

"""The real `xllm up` command, run as a user runs it, survives its own processes dying.

Under a steady stream of requests each kind of child is SIGKILLed in turn (an instance, the
scheduler, the kvstore, the gateway): the supervisor restarts it, the cluster serves again
within seconds, and every request either completes with exactly its tokens or gets a clean
retryable error (429/503 with an OpenAI error body and Retry-After). None hangs, and no
connection is refused once the killed process is back. In PD mode, `ready` means a request
sent that instant succeeds, and a request sent while the decode instance is down waits for
it instead of failing.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from tests.e2e.xllm_up import CLIENT_TIMEOUT, Outcome, XllmUp, wait_restarted

pytestmark = pytest.mark.slow


class Load:
    """Two clients sending requests back to back until stopped."""

    def __init__(self, up: XllmUp, clients: int = 2):
        self.up = up
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(clients)]

    def _run(self, client: int) -> None:
        i = 0
        while not self._stop.is_set():
            outcome = self.up.complete(f"client {client} request {i}: tell me a story")
            self.outcomes.append(outcome)
            if outcome.kind != "ok":
                time.sleep(0.2)  # as a client honouring Retry-After (shortened) would
            i += 1

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(CLIENT_TIMEOUT + 10)


@pytest.fixture
def model_dir(tiny_model_dir):
    return tiny_model_dir("qwen3", "float32")


def test_xllm_up_restarts_each_killed_child_and_keeps_serving(model_dir, tmp_path):
    up = XllmUp(model_dir, tmp_path / "logs", "--instances", "2", instance_ids=("inst-0", "inst-1"))
    try:
        up.wait_ready()
        assert up.complete("warm up").kind == "ok"
        recovered: dict[str, float] = {}
        refused_allowed: list[tuple[float, float]] = []  # while the gateway is down
        with Load(up) as load:
            for victim in ("inst-0", "scheduler", "kvstore", "gateway"):
                time.sleep(2.0)  # requests in flight when it dies
                pid, old_run = up.processes()[victim]["pid"], up.runs().get(victim, 0.0)
                killed_at = time.monotonic()
                os.kill(pid, signal.SIGKILL)
                recovered[victim] = wait_restarted(up, victim, restarts=1, old_run=old_run)
                if victim == "gateway":
                    refused_allowed.append((killed_at, time.monotonic()))
            time.sleep(2.0)
        outcomes = load.outcomes
        final = [up.complete(f"after the storm {i}") for i in range(3)]
        processes = up.processes()
    finally:
        up.stop()

    kinds = [o.kind for o in outcomes]
    summary = {k: kinds.count(k) for k in set(kinds)} | {"recovered_s": recovered}
    print(json.dumps(summary))
    assert kinds.count("hang") == 0, summary
    assert kinds.count("wrong") == 0, [o.detail for o in outcomes if o.kind == "wrong"]
    for o in outcomes:
        if o.kind in ("refused", "reset"):  # only while the gateway itself was down
            assert any(a - 1 <= o.ended <= b + 1 for a, b in refused_allowed), (o, summary)
    assert kinds.count("ok") >= 10, summary
    assert [o.kind for o in final] == ["ok"] * 3
    for victim in recovered:
        assert processes[victim]["restarts"] == 1 and processes[victim]["state"] == "running"
    assert processes["inst-1"]["restarts"] == 0
    assert up.process.returncode == 0


def test_pd_ready_means_servable_and_requests_wait_for_a_missing_decode(model_dir, tmp_path):
    up = XllmUp(
        model_dir, tmp_path / "logs", "--prefill", "1", "--decode", "1",
        instance_ids=("prefill-0", "decode-0"),
    )  # fmt: skip
    try:
        up.wait_ready()
        assert up.complete("sent the moment xllm up said ready").kind == "ok"
        old_run = up.runs()["decode-0"]
        os.kill(up.processes()["decode-0"]["pid"], signal.SIGKILL)
        time.sleep(0.5)
        late = up.complete("sent while the decode instance is down")
        wait_restarted(up, "decode-0", restarts=1, old_run=old_run)
    finally:
        up.stop()
    assert late.kind == "ok", late
    assert late.ended - late.started > 1.0  # it waited for the restarted decode instance

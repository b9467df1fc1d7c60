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

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from xllm.cluster import free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
MAX_TOKENS = 8
CLIENT_TIMEOUT = 90.0  # seconds: a request still unanswered by then counts as a hang
RECOVERY_TIMEOUT = 90.0  # seconds for a killed process to be back and the cluster ready
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class Outcome:
    kind: str  # ok | retryable | refused | reset | hang | wrong
    started: float
    ended: float
    detail: str = ""


class XllmUp:
    """`xllm up` as a subprocess; its stdout is read on a thread, so `ready` is seen at once."""

    def __init__(self, model_dir: Path, log_dir: Path, *args: str, instance_ids=()):
        self.instance_ids = set(instance_ids)
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "xllm.cli", "up", "--model", str(model_dir)]
        argv += ["--host", "127.0.0.1", "--port", str(self.port), "--log-dir", str(log_dir)]
        argv += ["--log-level", "WARNING", "--stop-grace", "5", "--ready-timeout", "240"]
        argv += ["--max-model-len", "1024", "--kv-cache-gb", "0.05", *args]
        env = os.environ | {
            "PYTHONPATH": os.pathsep.join([str(REPO / "shared"), str(REPO)]),
            "XLLM_NATIVE_KERNELS": "0",  # float32 model: the bf16 kernels would not run anyway
        }
        self.process = subprocess.Popen(
            argv, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines: list[str] = []
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)
            if line.startswith("ready"):
                self.ready.set()

    def wait_ready(self, timeout: float = 240.0) -> None:
        if not self.ready.wait(timeout):
            self.stop()
            pytest.fail("xllm up never printed ready:\n" + "".join(self.lines[-60:]))

    def get(self, path: str) -> dict:
        with _NO_PROXY.open(self.base + path, timeout=5) as response:
            return json.loads(response.read())

    def runs(self) -> dict[str, float]:
        """Each live instance's run (`started_at`), as the scheduler knows it."""
        return {hb["instance_id"]: hb["started_at"] for hb in self.get("/cluster")["instances"]}

    def processes(self) -> dict[str, dict]:
        return {row["name"]: row for row in self.get("/cluster")["processes"]}

    def complete(self, prompt: str) -> Outcome:
        body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "min_tokens": MAX_TOKENS}
        request = urllib.request.Request(
            self.base + "/v1/completions",
            data=json.dumps(body | {"ignore_eos": True}).encode(),
            headers={"Content-Type": "application/json"},
        )
        started = time.monotonic()
        try:
            with _NO_PROXY.open(request, timeout=CLIENT_TIMEOUT) as response:
                tokens = json.loads(response.read())["usage"]["completion_tokens"]
            kind = "ok" if tokens == MAX_TOKENS else "wrong"
            return Outcome(kind, started, time.monotonic(), f"{tokens} tokens")
        except urllib.error.HTTPError as e:
            error = json.loads(e.read() or b"{}").get("error", {})
            retryable = e.code in (429, 503) and e.headers.get("Retry-After") and error
            kind = "retryable" if retryable else "wrong"
            return Outcome(kind, started, time.monotonic(), f"{e.code} {error}")
        except (TimeoutError, urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            if isinstance(reason, TimeoutError):
                kind = "hang"
            elif isinstance(reason, ConnectionRefusedError):
                kind = "refused"
            else:  # reset or closed mid-answer: the gateway died with the request
                kind = "reset"
            return Outcome(kind, started, time.monotonic(), repr(reason))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


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


def _wait_restarted(up: XllmUp, name: str, restarts: int, old_run: float = 0.0) -> float:
    """Seconds until `name` runs again after its `restarts`-th restart and /health is 200
    (an instance: until its new run, not `old_run`, has joined the scheduler's rotation)."""
    start = time.monotonic()
    while time.monotonic() - start < RECOVERY_TIMEOUT:
        with contextlib.suppress(OSError, ValueError, KeyError):
            row = up.processes()[name]
            back = row["restarts"] >= restarts and row["state"] == "running"
            joined = name not in up.instance_ids or up.runs().get(name, old_run) != old_run
            if back and joined and up.get("/health")["status"] == "ok":
                return time.monotonic() - start
        time.sleep(0.25)
    pytest.fail(f"{name} was not back within {RECOVERY_TIMEOUT:g}s:\n" + "".join(up.lines[-40:]))


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
                recovered[victim] = _wait_restarted(up, victim, restarts=1, old_run=old_run)
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
        _wait_restarted(up, "decode-0", restarts=1, old_run=old_run)
    finally:
        up.stop()
    assert late.kind == "ok", late
    assert late.ended - late.started > 1.0  # it waited for the restarted decode instance

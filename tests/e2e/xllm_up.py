"""`xllm up` run as a user runs it (a subprocess), for the end-to-end tests that kill its
children: start, wait for `ready`, read `/cluster`, send completions and classify what
came back."""

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

from xllm.cli.cluster import free_port

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

    @property
    def nats_url(self) -> str:
        """The NATS URL `xllm up` printed (its embedded nats-server's)."""
        for line in self.lines:
            if line.strip().startswith("nats "):
                return line.split()[1]
        raise AssertionError("xllm up printed no NATS URL")

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


def wait_restarted(up: XllmUp, name: str, restarts: int, old_run: float = 0.0) -> float:
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

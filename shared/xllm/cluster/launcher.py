"""Process supervision for a local cluster: NATS and Valkey first, then every service.

`Cluster(specs, ...)` runs each `ProcessSpec` (a name, an argv, extra environment) as its own
subprocess and owns their whole lifetime; `xllm up`, the end-to-end tests and the benchmarks
all use it (`xllm.cluster.topology` says which services a serving cluster consists of).

The contract:

* `start()` starts the embedded nats-server (JetStream) and Valkey unless their URLs are given
  (or `embedded_servers=False`), then the children in order. Every child gets the parent's
  environment plus `XLLM_NATS_URL`, `XLLM_REDIS_URL`, `PYTHONUNBUFFERED=1`, the cluster's
  `env` and its own `spec.env`; its stdout and stderr go to `<log_dir>/<name>.log` (log_dir
  defaults to a new temporary folder, kept afterwards for post-mortems). Each child leads its
  own session, so a terminal's Ctrl-C reaches only the supervisor, which then stops things in
  order; should the supervisor die without stopping them, the kernel SIGKILLs them (Linux,
  started from the main thread). If anything fails to start, what did start is stopped
  before the error propagates.
* `wait_ready(timeout)` polls `health_url` until it answers 200 (and, with `instances=N`,
  a JSON body whose `instances` count is at least N: the gateway's /health reports how
  many instances the scheduler sees, and a cluster is not ready while some still load);
  raises `ChildExited` as soon as a child has exited, `TimeoutError` (naming the logs) when
  time runs out.
* `wait(timeout=None)` blocks while all children run; a child that exits, whatever its
  code, raises `ChildExited` with its log tail (services run until they are signalled).
* `stop()` stops the children in reverse start order (SIGTERM to the child's process group;
  each may take until one shared deadline, `grace` seconds away, after which the rest are
  SIGKILLed), then Valkey and NATS last. Idempotent. `hurry()`, safe to call from a signal
  handler, makes a running `stop()` SIGKILL whatever is left at once.
* As a context manager: `start()` on entry, `stop()` on exit.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from xllm.cluster.embedded import (
    EmbeddedServer,
    die_with_parent,
    log_tail,
    start_nats,
    start_valkey,
)

POLL_INTERVAL = 0.1  # seconds between liveness checks
HEALTH_INTERVAL = 0.25  # seconds between health probes
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # ours is local


@dataclass(frozen=True)
class ProcessSpec:
    """One child process: `name` names its log file and appears in every report about it."""

    name: str
    argv: Sequence[str]
    env: Mapping[str, str] = field(default_factory=dict)


class ChildExited(RuntimeError):
    """A child process exited while the cluster was meant to be running."""

    def __init__(self, name: str, returncode: int, log_path: Path):
        self.name, self.returncode, self.log_path = name, returncode, log_path
        self.log_tail = log_tail(log_path)
        super().__init__(
            f"{name} exited with {_describe_returncode(returncode)}; "
            f"last lines of {log_path}:\n{self.log_tail}"
        )


def _describe_returncode(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"


@dataclass
class _Child:
    spec: ProcessSpec
    process: subprocess.Popen
    log_path: Path


class Cluster:
    """Starts, watches and stops a set of processes plus the NATS/Valkey they talk through."""

    def __init__(
        self,
        specs: Sequence[ProcessSpec],
        *,
        env: Mapping[str, str] | None = None,
        log_dir: str | Path | None = None,
        health_url: str | None = None,
        instances: int = 0,
        nats_url: str | None = None,
        redis_url: str | None = None,
        embedded_servers: bool = True,
        grace: float = 10.0,
    ):
        names = [spec.name for spec in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"process names must be unique (they name the logs): {names}")
        self.specs = list(specs)
        self.env = dict(env or {})
        self.log_dir = Path(log_dir) if log_dir else None
        self.health_url = health_url
        self.instances = instances
        self.nats_url = nats_url
        self.redis_url = redis_url
        self.embedded_servers = embedded_servers
        self.grace = grace
        self._servers: list[EmbeddedServer] = []
        self._children: list[_Child] = []
        self._hurry = False

    # ---------------------------------------------------------------------------------------
    # Inspection

    @property
    def processes(self) -> dict[str, subprocess.Popen]:
        """The running (or exited) children by name, in start order."""
        return {child.spec.name: child.process for child in self._children}

    @property
    def servers(self) -> list[EmbeddedServer]:
        """The embedded servers this cluster started (NATS first)."""
        return list(self._servers)

    def log_path(self, name: str) -> Path:
        if self.log_dir is None:
            raise RuntimeError("the cluster has not been started")
        return self.log_dir / f"{name}.log"

    # ---------------------------------------------------------------------------------------
    # Lifecycle

    def start(self) -> None:
        if self._servers or self._children:
            raise RuntimeError("the cluster was already started")
        if self.log_dir is None:
            self.log_dir = Path(tempfile.mkdtemp(prefix="xllm-logs-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._hurry = False
        try:
            self._start_servers()
            env = self._child_env()
            for spec in self.specs:
                self._children.append(self._spawn(spec, env))
        except BaseException:  # also Ctrl-C halfway through: leave nothing behind
            self.stop()
            raise

    def _start_servers(self) -> None:
        if self.nats_url is None and self.embedded_servers:
            server = start_nats(log_file=self.log_path("nats-server"))
            self._servers.append(server)
            self.nats_url = server.url
        if self.redis_url is None and self.embedded_servers:
            server = start_valkey(log_file=self.log_path("valkey"))
            self._servers.append(server)
            self.redis_url = server.url

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"  # log lines reach the file when written, not at exit
        if self.nats_url is not None:
            env["XLLM_NATS_URL"] = self.nats_url
        if self.redis_url is not None:
            env["XLLM_REDIS_URL"] = self.redis_url
        env.update(self.env)
        return env

    def _spawn(self, spec: ProcessSpec, env: Mapping[str, str]) -> _Child:
        log_path = self.log_path(spec.name)
        with open(log_path, "wb") as log:  # the child keeps its own copy of the descriptor
            process = subprocess.Popen(
                list(spec.argv),
                env={**env, **spec.env},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: signalled by us, not the terminal
                preexec_fn=die_with_parent(),
            )
        return _Child(spec, process, log_path)

    def check(self) -> None:
        """Raise `ChildExited` for the first child (in start order) that is no longer running."""
        for child in self._children:
            code = child.process.poll()
            if code is not None:
                raise ChildExited(child.spec.name, code, child.log_path)

    def wait_ready(self, timeout: float) -> None:
        """Return once `health_url` answers 200 (at once without one) and every child runs."""
        deadline = time.monotonic() + timeout
        while True:
            self.check()
            if self.health_url is None or _healthy(self.health_url, self.instances):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(self._not_ready_message(timeout))
            time.sleep(HEALTH_INTERVAL)

    def _not_ready_message(self, timeout: float) -> str:
        tails = "\n".join(
            f"--- {child.log_path}\n{log_tail(child.log_path, 10)}" for child in self._children
        )
        wanted = f" with {self.instances} instances" if self.instances else ""
        return (
            f"{self.health_url} did not answer 200{wanted} within {timeout:.0f}s; "
            f"the processes' logs are in {self.log_dir}:\n{tails}"
        )

    def wait(self, timeout: float | None = None) -> None:
        """Block until a child exits (raising `ChildExited`) or `timeout` seconds pass."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while deadline is None or time.monotonic() < deadline:
            self.check()
            time.sleep(POLL_INTERVAL)
        self.check()

    def hurry(self) -> None:
        """Make a running or later `stop()` skip the grace period (signal-handler safe)."""
        self._hurry = True

    def stop(self, grace: float | None = None) -> None:
        """Stop the children (newest first), then the embedded servers; idempotent."""
        deadline = time.monotonic() + (self.grace if grace is None else grace)
        for child in reversed(self._children):
            _signal_group(child.process, signal.SIGTERM)
            self._wait_exit(child.process, deadline)
        for child in self._children:  # past the deadline, or hurried
            _signal_group(child.process, signal.SIGKILL)
            child.process.wait()
        for server in reversed(self._servers):  # Valkey, then NATS: services may drain via NATS
            server.stop()

    def _wait_exit(self, process: subprocess.Popen, deadline: float) -> None:
        while process.poll() is None and not self._hurry and time.monotonic() < deadline:
            time.sleep(POLL_INTERVAL / 2)

    def __enter__(self) -> Cluster:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


def _signal_group(process: subprocess.Popen, sig: signal.Signals) -> None:
    """Signal the child's whole process group (a service's own helpers, e.g. a compiler run
    building kernels, go too). Only while the child is unreaped: until then its pid, and
    so its group id, cannot belong to anyone else."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):  # exited between poll() and killpg()
        os.killpg(process.pid, sig)


def _healthy(url: str, instances: int) -> bool:
    """GET `url` answers 200 and, if `instances`, reports at least that many of them."""
    try:
        with _NO_PROXY.open(url, timeout=2.0) as response:
            status, body = response.status, response.read()
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError):
        return False  # refused, reset, 5xx (HTTPError), or not speaking HTTP yet
    if status != 200 or not instances:
        return status == 200
    try:
        reported = json.loads(body).get("instances")
    except (ValueError, AttributeError):
        return True  # no count to compare: the 200 is all we can know
    return not isinstance(reported, int) or reported >= instances

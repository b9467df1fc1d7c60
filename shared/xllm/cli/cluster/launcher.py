"""Process supervision for a local cluster: NATS and Valkey first, then every service.

`Cluster(specs, ...)` runs each `ProcessSpec` (a name, an argv, extra environment) as its own
subprocess and owns their whole lifetime; `xllm up`, the end-to-end tests and the benchmarks
all use it (`xllm.cli.cluster.topology` says which services a serving cluster consists of).

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
* With a `RestartPolicy` (what `xllm up` uses) the cluster supervises instead: a child that
  exits is reported with its exit reason and log tail and started again after an
  exponential backoff, and so are the embedded nats-server and Valkey (same port, same
  directory: JetStream's streams and Valkey's append-only file survive). A process that
  exits `max_restarts` times within `window` seconds is given up on and reported; the rest
  keep running. `wait()` then returns only at its timeout (a signal ends it); `wait_ready()`
  raises `ChildExited` only for a process given up on. Each process's state and restart
  count are written to `<log_dir>/processes.json` (path in every child's
  `XLLM_SUPERVISOR_STATE`), which the gateway shows in `/cluster` and `/metrics`.
* A child whose spec names `instance_ids` has its exit, whatever the policy, published to
  the scheduler within `EXIT_POLL` seconds (`ExitReporter`, a thread with its own NATS
  connection), so the cluster routes around a dead instance long before its heartbeats
  time out.
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
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from xllm.cli.cluster.embedded import (
    EmbeddedServer,
    EmbeddedServerError,
    die_with_parent,
    log_tail,
    start_mooncake_master,
    start_nats,
    start_valkey,
)
from xllm.cli.cluster.exit_reports import ExitReporter

POLL_INTERVAL = 0.1  # seconds between liveness checks
STATE_FILE = "processes.json"  # in log_dir: what the supervisor knows of each process
HEALTH_INTERVAL = 0.25  # seconds between health probes
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # ours is local


@dataclass(frozen=True)
class ProcessSpec:
    """One child process: `name` names its log file and appears in every report about it."""

    name: str
    argv: Sequence[str]
    env: Mapping[str, str] = field(default_factory=dict)
    instance_ids: tuple[str, ...] = ()
    """The instances this process serves (an instance, plus its encode endpoint if it has
    one): its exits are reported to the scheduler at once (`ExitReporter`), not left to the
    heartbeat timeout."""


@dataclass(frozen=True)
class RestartPolicy:
    """How a supervised cluster restarts a process that exited: `backoff` seconds after its
    first exit, doubling with each further exit within `window` seconds up to `max_backoff`;
    after `max_restarts` restarts within `window` it is given up on."""

    backoff: float = 0.5
    max_backoff: float = 8.0
    max_restarts: int = 5
    window: float = 60.0

    def delay(self, recent_exits: int) -> float:
        return min(self.max_backoff, self.backoff * 2 ** max(0, recent_exits - 1))


@dataclass
class _Restarts:
    """One process's restart bookkeeping."""

    count: int = 0
    exits: deque[float] = field(default_factory=deque)  # monotonic times, within the window
    restart_at: float | None = None  # when an exited process is due to start again
    given_up: bool = False
    last_exit: str = ""

    def state(self, running: bool) -> str:
        if self.given_up:
            return "failed"
        return "running" if running else "restarting"


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
    restarts: _Restarts = field(default_factory=_Restarts)


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
        kv_store: bool = False,
        kv_store_master: str | None = None,
        embedded_servers: bool = True,
        grace: float = 10.0,
        restart: RestartPolicy | None = None,
        report: Callable[[str], None] | None = None,
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
        self.kv_store = kv_store
        """Run the cluster KV tier: a Mooncake Store master (embedded unless
        `kv_store_master` names one), its address in every child's XLLM_KV_STORE_MASTER."""
        self.kv_store_master = kv_store_master
        self.embedded_servers = embedded_servers
        self.grace = grace
        self.restart = restart
        self.report = report or _print_stderr
        self._servers: list[EmbeddedServer] = []
        self._server_restarts: dict[str, _Restarts] = {}
        self._children: list[_Child] = []
        self._hurry = False
        self._env: dict[str, str] = {}
        self._exit_reporter: ExitReporter | None = None

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

    @property
    def state_path(self) -> Path:
        if self.log_dir is None:
            raise RuntimeError("the cluster has not been started")
        return self.log_dir / STATE_FILE

    def process_states(self) -> list[dict]:
        """Every process (servers first): name, pid, state, restarts, last exit."""
        rows = []
        for server in self._servers:
            restarts = self._server_restarts[server.name]
            rows.append(_state_row(server.name, server.process, restarts))
        rows += [_state_row(c.spec.name, c.process, c.restarts) for c in self._children]
        return rows

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
            self._env = self._child_env()
            for spec in self.specs:
                self._children.append(self._spawn(spec, self._env))
            self._write_state()
            self._start_exit_reporter()
        except BaseException:  # also Ctrl-C halfway through: leave nothing behind
            self.stop()
            raise

    def _start_servers(self) -> None:
        if self.nats_url is None and self.embedded_servers:
            server = start_nats(log_file=self.log_path("nats-server"))
            self._servers.append(server)
            self.nats_url = server.url
        if self.redis_url is None and self.embedded_servers:
            # Supervised, it may be restarted: keep the keys (the KV index) across that.
            persist = self.restart is not None
            server = start_valkey(log_file=self.log_path("valkey"), persist=persist)
            self._servers.append(server)
            self.redis_url = server.url
        if self.kv_store and self.kv_store_master is None and self.embedded_servers:
            # Restarted on its port, it comes back empty: instances recompute meanwhile.
            server = start_mooncake_master(log_file=self.log_path("mooncake-master"))
            self._servers.append(server)
            self.kv_store_master = server.url
        self._server_restarts = {server.name: _Restarts() for server in self._servers}

    def _start_exit_reporter(self) -> None:
        if self.nats_url is None or not any(spec.instance_ids for spec in self.specs):
            return
        self._exit_reporter = ExitReporter(self.nats_url, self._instance_processes)
        self._exit_reporter.start()

    def _instance_processes(self) -> list[tuple[str, subprocess.Popen]]:
        return [(iid, c.process) for c in self._children for iid in c.spec.instance_ids]

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"  # log lines reach the file when written, not at exit
        if self.nats_url is not None:
            env["XLLM_NATS_URL"] = self.nats_url
        if self.redis_url is not None:
            env["XLLM_REDIS_URL"] = self.redis_url
        if self.kv_store and self.kv_store_master is not None:
            env["XLLM_KV_STORE_MASTER"] = self.kv_store_master
        env["XLLM_SUPERVISOR_STATE"] = str(self.state_path)
        env.update(self.env)
        return env

    def _spawn(self, spec: ProcessSpec, env: Mapping[str, str], append: bool = False) -> _Child:
        log_path = self.log_path(spec.name)
        # A restarted child appends to its log, so the crash that caused it stays readable.
        with open(log_path, "ab" if append else "wb") as log:  # the child keeps its own copy
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

    def poll(self) -> None:
        """One round of watching: `check()` without a restart policy; with one, note what
        exited and start again what is due (servers first: the services need them)."""
        if self.restart is None:
            self.check()
            return
        changed = False
        now = time.monotonic()
        for server in self._servers:
            changed |= self._supervise_server(server, self._server_restarts[server.name], now)
        for child in self._children:
            changed |= self._supervise_child(child, now)
        if changed:
            self._write_state()

    def _supervise_child(self, child: _Child, now: float) -> bool:
        if child.process.poll() is not None and child.restarts.restart_at is None:
            if not child.restarts.given_up:
                self._note_exit(child.spec.name, child.process, child.log_path, child.restarts, now)
                return True
        elif child.restarts.restart_at is not None and now >= child.restarts.restart_at:
            fresh = self._spawn(child.spec, self._env, append=True)
            child.process = fresh.process
            child.restarts.restart_at = None
            child.restarts.count += 1
            self.report(f"{child.spec.name} restarted (pid {child.process.pid})")
            return True
        return False

    def _supervise_server(self, server: EmbeddedServer, restarts: _Restarts, now: float) -> bool:
        if server.is_running() and restarts.restart_at is None:
            return False
        if restarts.restart_at is None:
            if not restarts.given_up:
                self._note_exit(server.name, server.process, server.log_path, restarts, now)
                return True
            return False
        if now < restarts.restart_at:
            return False
        restarts.restart_at = None
        restarts.count += 1
        try:
            server.restart()  # blocks until it answers (seconds at most)
        except EmbeddedServerError as e:
            self.report(f"{server.name} did not come back: {e}")
            return True  # exited again: noted (and maybe given up on) next round
        self.report(f"{server.name} restarted on {server.url}")
        return True

    def _note_exit(
        self, name: str, process, log_path: Path, restarts: _Restarts, now: float
    ) -> None:
        assert self.restart is not None
        policy = self.restart
        restarts.last_exit = _describe_returncode(process.returncode)
        restarts.exits.append(now)
        while restarts.exits and now - restarts.exits[0] > policy.window:
            restarts.exits.popleft()
        tail = log_tail(log_path, 15)
        if len(restarts.exits) > policy.max_restarts:
            restarts.given_up = True
            self.report(
                f"{name} exited with {restarts.last_exit}, its {len(restarts.exits)}th exit in "
                f"{policy.window:g}s: giving up on it (the rest keep running); "
                f"last lines of {log_path}:\n{tail}"
            )
            return
        delay = policy.delay(len(restarts.exits))
        restarts.restart_at = now + delay
        self.report(
            f"{name} exited with {restarts.last_exit}; restarting it in {delay:.1f}s; "
            f"last lines of {log_path}:\n{tail}"
        )

    def _raise_if_given_up(self) -> None:
        for child in self._children:
            if child.restarts.given_up:
                raise ChildExited(child.spec.name, child.process.returncode, child.log_path)

    def _write_state(self) -> None:
        state = {"updated": time.time(), "processes": self.process_states()}
        partial = self.state_path.with_suffix(".partial")
        partial.write_text(json.dumps(state))
        partial.replace(self.state_path)  # readers never see half a file

    def wait_ready(self, timeout: float) -> None:
        """Return once `health_url` answers 200 (at once without one) and every child runs
        (or, supervised, until none was given up on)."""
        deadline = time.monotonic() + timeout
        while True:
            self.poll()
            self._raise_if_given_up()
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
        """Block until `timeout` seconds pass; unsupervised, a child that exits first raises
        `ChildExited`, supervised it is restarted (see the module doc)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while deadline is None or time.monotonic() < deadline:
            self.poll()
            time.sleep(POLL_INTERVAL)
        self.poll()

    def hurry(self) -> None:
        """Make a running or later `stop()` skip the grace period (signal-handler safe)."""
        self._hurry = True

    def stop(self, grace: float | None = None) -> None:
        """Stop the children (newest first), then the embedded servers; idempotent."""
        deadline = time.monotonic() + (self.grace if grace is None else grace)
        if self._exit_reporter is not None:  # stopping on purpose is no death to report
            self._exit_reporter.stop()
            self._exit_reporter = None
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


def _state_row(name: str, process: subprocess.Popen, restarts: _Restarts) -> dict:
    running = process.poll() is None
    return {
        "name": name,
        "pid": process.pid,
        "state": restarts.state(running),
        "restarts": restarts.count,
        "last_exit": restarts.last_exit or None,
    }


def _print_stderr(message: str) -> None:
    print(f"xllm: {message}", file=sys.stderr, flush=True)


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

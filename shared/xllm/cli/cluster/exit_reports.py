"""ExitReporter: the supervisor tells the scheduler the moment an instance process exits.

A SIGKILLed instance sends nothing more, and heartbeats take the scheduler's
`heartbeat_timeout` (seconds) to notice the silence. Its supervisor knows at once: the
child's exit status is there to read. So a thread of the supervisor's own checks the
instance processes every `EXIT_POLL` seconds and publishes an `InstanceExited` for each that
exited (`subjects.INSTANCE_EXITED`); the scheduler takes the instance out of rotation and
announces `InstanceLost`, and the gateways resume its requests elsewhere.

It is a thread, not part of `Cluster.poll()`, because the supervisor's main thread is not
always polling: a benchmark or a test that kills an instance is busy streaming meanwhile.
It has its own NATS connection on its own event loop (nats-py reconnects it when a
supervised nats-server restarts). An exit is reported once per process, whatever its
status: an instance never exits while it is meant to serve, and one being stopped on
purpose is not reported (`stop()` comes first).
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import threading
import time
from collections.abc import Callable, Iterable

from xllm.config import NatsConfig
from xllm.protocol import InstanceExited, encode, subjects
from xllm.service.runtime import connect_nats

log = logging.getLogger(__name__)

EXIT_POLL = 0.05
"""Seconds between checks of the instance processes: the most an exit waits to be seen."""

InstanceProcesses = Callable[[], Iterable[tuple[str, subprocess.Popen]]]
"""(instance id, its current process) for each supervised instance; a restart shows a new
process under the same id."""


class ExitReporter:
    def __init__(self, nats_url: str, instance_processes: InstanceProcesses):
        self.nats_url = nats_url
        self.instance_processes = instance_processes
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._connected = threading.Event()

    def start(self, connect_timeout: float = 5.0) -> None:
        """Start watching; returns once connected to NATS (or `connect_timeout` passed)."""
        self._thread = threading.Thread(target=self._main, name="exit-reporter", daemon=True)
        self._thread.start()
        if not self._connected.wait(connect_timeout):
            log.warning("exit reporter: no NATS connection yet; exits are reported once it has")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _main(self) -> None:
        asyncio.run(self._watch())

    async def _watch(self) -> None:
        try:
            nc = await connect_nats(NatsConfig(nats_url=self.nats_url), "xllm-supervisor")
        except RuntimeError:
            log.exception("exit reporter: cannot reach NATS, instance exits go unreported")
            return
        self._connected.set()
        reported: set[tuple[str, subprocess.Popen]] = set()  # a restart is a new Popen
        try:
            while not self._stop.is_set():
                for instance_id, process in list(self.instance_processes()):
                    code = process.poll()
                    if code is None or (instance_id, process) in reported:
                        continue
                    reported.add((instance_id, process))
                    await self._report(nc, instance_id, code)
                await asyncio.sleep(EXIT_POLL)
        finally:
            await nc.close()

    async def _report(self, nc, instance_id: str, code: int) -> None:
        exited = InstanceExited(instance_id=instance_id, returncode=code, exited_at=time.time())
        try:
            await nc.publish(subjects.INSTANCE_EXITED, encode(exited))
            await nc.flush(timeout=1)
        except Exception:  # NATS down: the heartbeat timeout still notices the death
            log.warning("exit reporter: could not report %s's exit", instance_id, exc_info=True)

"""An expert-parallel instance: one instance made of N rank processes (`--expert-parallel-size`).

Rank 0 is the instance as usual (NATS, heartbeats, requests in, tokens out). It starts ranks
1..N-1 itself, as its own children (`spawn_followers`): followers with no NATS, which only
compute their share of the expert slots. The MoE layers sum their outputs over the ranks
(an all-reduce inside each forward pass), so every rank must run the same engine steps on
the same requests, in lockstep:

* rank 0's engine is wrapped in a `GroupLeader`: the calls that change its requests
  (`add_request`, `abort_request`) go through to the engine and are recorded; `step()`
  first broadcasts what was recorded since the last step (one `ExpertGroupStep`, one
  collective of `group_wire.HEADER_BYTES`; a second one only for commands that do not
  fit), then steps;
* a follower (`follower_main`) loops: receive, apply the same commands in the same order,
  step. The engines, seeded alike and fed alike, schedule alike; each step's message also
  carries a digest of rank 0's previous outputs, so ranks that diverge fail loudly;
* while rank 0 idles, a keep-alive message every `KEEPALIVE_SECONDS` keeps the followers'
  wait inside the gloo timeout (`GROUP_TIMEOUT`), which bounds every wait on a wedged rank.

Failure is the group's: a follower that exits, or a collective that fails, stops rank 0
with an error (exit code 1), and the supervisor (`xllm up`) restarts the instance, which
starts fresh followers. Followers die with rank 0 (PR_SET_PDEATHSIG on Linux, and a failed
collective otherwise) and ignore SIGTERM/SIGINT: rank 0 tells them when to stop.

Offline requests are: their step budget is priced by measured step times, so each message
carries rank 0's, which the followers schedule by. Not served by an expert-parallel
instance yet (rejected, or refused at start-up by `check_supported`): PD roles, images,
speculative decoding (its adaptive switch is timed too) and KV tiers (loads finish in time).
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import datetime
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from xllm.config import EngineConfig
from xllm.instance.group_wire import outputs_digest, receive, send
from xllm.protocol import ExpertGroupStep, GroupRequest

log = logging.getLogger(__name__)

KEEPALIVE_SECONDS = 5.0
"""Most seconds rank 0 leaves the followers without a message."""
GROUP_TIMEOUT = datetime.timedelta(seconds=120)
"""gloo's timeout for the rendezvous and every collective: how long a wedged rank can
stall the others before they fail."""
NOT_IN_GROUPS = frozenset(("reserve_remote_prefill", "commit_remote_prefill", "release_prefilled"))
"""Engine calls (PD disaggregation) an expert-parallel instance does not serve."""


class GroupBroken(RuntimeError):
    """A rank of the expert-parallel group failed: the group must be restarted whole."""


def check_supported(role: str, serve_encode: bool, config: EngineConfig) -> None:
    """Raise ValueError for an option an expert-parallel instance does not serve."""
    if config.expert_parallel_size <= 1:
        return
    problems = [
        (role != "both", "--role both (no PD disaggregation)"),
        (serve_encode, "no --serve-encode"),
        (bool(config.speculative), "no --speculative"),
        (config.host_kv_gb > 0, "no --host-kv-gb (KV tiers)"),
    ]
    for bad, needs in problems:
        if bad:
            raise ValueError(f"--expert-parallel-size > 1 needs {needs}")


def rank_config(config: EngineConfig) -> EngineConfig:
    """The engine config every rank runs: without `--num-threads`, the cores shared out
    (N ranks each taking them all would oversubscribe them; and the ranks must agree, as
    the replicated attention must compute alike)."""
    if config.num_threads:
        return config
    threads = max(1, (os.cpu_count() or 1) // config.expert_parallel_size)
    return dataclasses.replace(config, num_threads=threads)


# -- rank 0 ------------------------------------------------------------------------------


def init_group(rank: int, world_size: int, port: int) -> None:
    """Join the group's gloo process group (rank 0 hosts the rendezvous on `port`)."""
    torch.distributed.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=GROUP_TIMEOUT,
    )


def spawn_followers(world_size: int, instance_argv: Sequence[str]) -> tuple[int, list]:
    """Start ranks 1..world_size-1 with the instance's own arguments; returns the
    rendezvous port and their processes. Call from the main thread (their death signal
    is tied to the thread that starts them)."""
    port = _free_port()
    followers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "xllm.instance.expert_group",
                str(rank),
                str(world_size),
                str(port),
                "--",
                *instance_argv,
            ],
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )
        for rank in range(1, world_size)
    ]
    return port, followers


class GroupLeader:
    """Rank 0's engine as the instance sees it: the engine itself (every attribute reads
    through), with the calls that change its requests sent to the followers before the
    next step, and `step()` run in lockstep with them."""

    def __init__(self, engine, followers: list[subprocess.Popen]):
        self._engine = engine
        self.followers = followers
        self._added: list[GroupRequest] = []
        self._aborted: list[str] = []
        self._digest = 0
        self._lock = threading.Lock()  # one message or step at a time, in one order
        self._last_sent = time.monotonic()
        self._closing = threading.Event()
        self.broken = ""
        """Why the group failed (a collective raised); empty while it is whole."""
        self._keepalive = threading.Thread(
            target=self._keep_alive, name="ep-keepalive", daemon=True
        )
        self._keepalive.start()

    def __getattr__(self, name: str):
        if name in NOT_IN_GROUPS:
            raise ValueError("PD disaggregation is not served by an expert-parallel instance")
        return getattr(self._engine, name)

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params,
        prefill_only: bool = False,
        priority: int = 0,
        images=None,
    ) -> None:
        """`Engine.add_request`, recorded for the followers once the engine accepted it."""
        if prefill_only or images:
            raise ValueError("PD prefill and images are not served by an expert-parallel instance")
        self._engine.add_request(request_id, prompt_token_ids, params, priority=priority)
        self._added.append(
            GroupRequest(
                request_id=request_id,
                prompt_token_ids=list(prompt_token_ids),
                sampling=params,
                priority=priority,
            )
        )

    def abort_request(self, request_id: str) -> bool:
        aborted = self._engine.abort_request(request_id)
        if aborted:
            self._aborted.append(request_id)
        return aborted

    def step(self) -> list:
        with self._lock:
            if self.broken:
                raise GroupBroken(self.broken)
            engine = self._engine
            msg = ExpertGroupStep(
                added=self._added,
                aborted=self._aborted,
                outputs_digest=self._digest,
                decode_step_seconds=engine.decode_step_seconds,
                prefill_seconds_per_token=engine.step_stats.recent_prefill_seconds_per_token,
            )
            self._added, self._aborted = [], []
            try:
                send(msg)
                outputs = self._engine.step()
            except Exception as e:
                self.broken = f"an expert-parallel step failed: {e}"
                raise GroupBroken(self.broken) from e
            self._digest = outputs_digest(outputs)
            self._last_sent = time.monotonic()
            return outputs

    def _keep_alive(self) -> None:
        while not self._closing.wait(KEEPALIVE_SECONDS / 4):
            with self._lock:
                if self.broken or time.monotonic() - self._last_sent < KEEPALIVE_SECONDS:
                    continue
                try:
                    send(ExpertGroupStep(step=False, outputs_digest=self._digest))
                except Exception as e:
                    self.broken = f"an expert-parallel keep-alive failed: {e}"
                    continue
                self._last_sent = time.monotonic()

    def failure(self) -> str:
        """Why the group cannot serve any more (empty while it can)."""
        for rank, follower in enumerate(self.followers, 1):
            if follower.poll() is not None:
                return f"expert-parallel rank {rank} exited with code {follower.returncode}"
        return self.broken

    async def watch(self, stop: asyncio.Event, failed: Callable[[str], None]) -> None:
        """Until `stop`: on a failure, report it and set `stop`."""
        while not stop.is_set():
            await asyncio.sleep(0.25)
            reason = self.failure()
            if reason:
                failed(reason)
                stop.set()

    def close(self, timeout: float = 30.0) -> None:
        """Tell the followers to stop (if they can still hear it) and reap them."""
        self._closing.set()
        self._keepalive.join()
        if not self.failure():
            with self._lock:
                try:
                    send(ExpertGroupStep(step=False, stop=True, outputs_digest=self._digest))
                except Exception:
                    log.warning("could not tell the expert-parallel followers to stop")
        for follower in self.followers:
            try:
                follower.wait(timeout)
            except subprocess.TimeoutExpired:
                follower.kill()
                follower.wait()
        torch.distributed.destroy_process_group()


async def serve_group(
    config: EngineConfig,
    instance_argv: Sequence[str],
    executor: ThreadPoolExecutor,
    stop: asyncio.Event,
    instance_of: Callable[[GroupLeader], Any],
) -> None:
    """Rank 0: start the followers, load the engine with them (on `executor`, the engine
    thread), serve it as `instance_of(leader)` until `stop`. RuntimeError if the group
    failed meanwhile (the process then exits 1, and its supervisor restarts the group)."""
    from xllm.engine.engine import Engine

    loop = asyncio.get_running_loop()
    world_size = config.expert_parallel_size
    port, followers = spawn_followers(world_size, instance_argv)
    try:
        await loop.run_in_executor(executor, init_group, 0, world_size, port)
        engine = await loop.run_in_executor(executor, Engine, rank_config(config))
    except BaseException:
        for follower in followers:
            follower.kill()
            follower.wait()
        raise
    leader = GroupLeader(engine, followers)
    log.info("expert-parallel instance: rank 0 of %d serving", world_size)
    failures: list[str] = []

    def failed(reason: str) -> None:
        log.error("%s: stopping the instance (its supervisor restarts the group)", reason)
        failures.append(reason)

    watch = asyncio.create_task(leader.watch(stop, failed))
    try:
        await instance_of(leader).serve(stop)
    finally:
        watch.cancel()
        await loop.run_in_executor(None, leader.close)
    if failures:
        raise RuntimeError(failures[0])


# -- ranks 1..N-1 -------------------------------------------------------------------------


def follow(engine) -> None:
    """A follower's life: apply rank 0's commands and step with it, until it stops."""
    digest = 0
    while True:
        msg = receive()
        if msg.outputs_digest != digest:
            raise GroupBroken("this rank's outputs differ from rank 0's: the ranks diverged")
        if msg.stop:
            return
        for req in msg.added:
            engine.add_request(
                req.request_id, req.prompt_token_ids, req.sampling, priority=req.priority
            )
        for request_id in msg.aborted:
            engine.abort_request(request_id)
        if msg.step:
            # Schedule by rank 0's clock: the offline budget is priced by measured times.
            engine.decode_step_seconds = msg.decode_step_seconds
            engine.step_stats.recent_prefill_seconds_per_token = msg.prefill_seconds_per_token
            digest = outputs_digest(engine.step())


def follower_main(argv: Sequence[str]) -> int:
    """`python -m xllm.instance.expert_group RANK WORLD_SIZE PORT -- <instance arguments>`."""
    from xllm.config import LogConfig, from_args
    from xllm.engine.engine import Engine
    from xllm.instance.main import instance_parser
    from xllm.service.runtime import setup_logging

    rank, world_size, port = (int(a) for a in argv[:3])
    args = instance_parser("both").parse_args(list(argv[4:]))
    setup_logging(from_args(LogConfig, args), f"expert-parallel rank {rank}")
    for sig in (signal.SIGTERM, signal.SIGINT):  # rank 0 says when (its group gets these)
        signal.signal(sig, signal.SIG_IGN)
    init_group(rank, world_size, port)
    engine = Engine(rank_config(from_args(EngineConfig, args)))
    log.info("expert-parallel rank %d of %d following rank 0", rank, world_size)
    try:
        follow(engine)
    except Exception:
        log.exception("expert-parallel rank %d failed", rank)
        return 1
    torch.distributed.destroy_process_group()
    return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it when its parent dies (Linux; else a no-op)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


if __name__ == "__main__":
    sys.exit(follower_main(sys.argv[1:]))

"""supervisor → scheduler: a supervised instance process exited.

A supervisor that started an instance's process (`xllm up`) sees it exit the moment it
does, SIGKILL included, while heartbeats take `heartbeat_timeout` to fall silent. It says so
on `INSTANCE_EXITED`; the scheduler then takes the instance out of rotation and announces
`InstanceLost` at once. Where no supervisor watches (compose, other hosts) heartbeat expiry
still notices the death, only later.
"""

from __future__ import annotations

from dataclasses import dataclass

from xllm.protocol.codec import message


@message("instance_exited", version=1)
@dataclass(frozen=True, slots=True, kw_only=True)
class InstanceExited:
    """supervisor → scheduler (`INSTANCE_EXITED`): the process serving `instance_id` exited."""

    instance_id: str
    """The instance whose process exited (its `--instance-id`)."""
    returncode: int
    """The process's exit status as `subprocess` gives it (negative: killed by that signal)."""
    exited_at: float
    """Unix time the supervisor saw the exit: a run of the instance that started after it
    (`Heartbeat.started_at` later than this) is a restart, not the run that died."""

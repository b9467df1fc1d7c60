"""The JetStream streams of offline jobs, created where they are missing.

Whoever touches them first creates them (every gateway's offline worker at start, and so
`xllm up`; `xllm jobs submit` too), against whatever NATS it uses: the embedded server or
an external `--nats-url`. Both are file-backed, so jobs and results survive a restart of
nats-server. Subjects and payloads: `xllm.protocol.subjects` (`OFFLINE_SUBMIT`,
`offline_result`).
"""

from __future__ import annotations

import contextlib

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig

from xllm.protocol import subjects

OFFLINE_STREAMS = (
    StreamConfig(
        name=subjects.OFFLINE_STREAM,
        subjects=[subjects.OFFLINE_SUBMIT],
        storage=StorageType.FILE,
        duplicate_window=subjects.OFFLINE_DUPLICATE_WINDOW,
    ),
    StreamConfig(
        name=subjects.OFFLINE_RESULTS_STREAM,
        subjects=[subjects.OFFLINE_RESULTS_PREFIX + ".>"],
        storage=StorageType.FILE,
        max_msgs_per_subject=1,  # one result per job, whatever races
        duplicate_window=subjects.OFFLINE_DUPLICATE_WINDOW,
    ),
)


async def ensure_offline_streams(js: JetStreamContext) -> None:
    """Create each offline stream that does not exist yet (idempotent, race-safe)."""
    for config in OFFLINE_STREAMS:
        try:
            await js.stream_info(config.name)
        except nats.js.errors.NotFoundError:
            with contextlib.suppress(nats.js.errors.BadRequestError):  # another one won
                await js.add_stream(config)

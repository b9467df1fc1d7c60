"""Offline jobs: OpenAI request bodies published on NATS, run at low priority, results stored.

The contract (subjects and JSON in `xllm.protocol.subjects`, `OFFLINE_SUBMIT` and
`offline_result`): a client publishes a completions or chat body plus `"endpoint"` to
`xllm.offline.submit` with the job id as `Nats-Msg-Id`; the result appears on
`xllm.offline.results.<job id>`. Both subjects are JetStream streams on file storage, so
jobs and results survive restarts of everything, nats-server included.

Every gateway runs an `OfflineWorker` (unless `--offline-concurrency 0`): the workers share
one durable pull consumer, so each job goes to one of them. A job runs through the same
parsing, `Generation` and rendering as the HTTP routes (so its result is byte for byte the
HTTP response), at priority 1, outside --max-inflight. Delivery is at least once; a job
runs to a result exactly once:

* the message is acked only after its result is stored (a worker killed mid-job leaves it
  unacked, and JetStream redelivers it after `ACK_WAIT`; a running job keeps its claim with
  in-progress acks);
* before running, a worker looks for a stored result and only acks if there is one; the
  result is published with `Nats-Msg-Id` = job id into a stream keeping one message per
  subject, so two racing runs still store one result;
* an unusable job (not a JSON object, no or an unknown endpoint, an invalid request) gets
  an error result at once, never a redelivery loop; a job that fails in a way that may pass
  (no instance, instance lost, timeout) is retried with a delay, and on its
  `MAX_ATTEMPTS`-th failure gets a dead-letter result; a job whose deliveries keep dying
  with their worker gets one at delivery `MAX_ATTEMPTS + 1` without being run again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable

import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js.api import ConsumerConfig

from services.gateway.errors import classify
from services.gateway.openai_routes import generate_offline
from services.gateway.state import Gateway
from xllm.protocol import subjects
from xllm.service.jetstream import ensure_offline_streams

log = logging.getLogger(__name__)

ENDPOINTS = {"/v1/completions": False, "/v1/chat/completions": True}
"""Endpoints a job may name → whether it is a chat."""
PRIORITY = 1
"""Offline jobs' priority class (0 is online)."""
MAX_ATTEMPTS = 5
"""Runs of a job that may fail retryably before it gets a dead-letter result."""
ACK_WAIT = 30.0
"""Seconds JetStream waits for an ack (or an in-progress ack) before redelivering."""
RETRY_DELAY = 2.0
"""Seconds before a retryably failed job is redelivered."""
FETCH_WAIT = 1.0
"""Seconds one pull waits for jobs."""


class UnusableJob(Exception):
    """The job cannot be run as sent; its result says why."""


class OfflineWorker:
    """Pulls jobs and runs up to `concurrency` of them at once (see the module doc)."""

    def __init__(
        self,
        gw: Gateway,
        nc: NATS,
        concurrency: int,
        cancelled: Callable[[str], Awaitable[bool]] | None = None,
    ):
        self.gw = gw
        self.cancelled = cancelled
        """Whether a job was withdrawn (its batch cancelled): answered, not run."""
        self.nc = nc
        self.js = nc.jetstream()
        self.concurrency = concurrency
        self.running: set[asyncio.Task] = set()
        self._sub = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        await ensure_offline_streams(self.js)
        self._sub = await self.js.pull_subscribe(
            subjects.OFFLINE_SUBMIT,
            durable=subjects.OFFLINE_CONSUMER,
            stream=subjects.OFFLINE_STREAM,
            config=ConsumerConfig(ack_wait=ACK_WAIT, max_deliver=MAX_ATTEMPTS + 1),
        )
        self._task = asyncio.create_task(self._pull())

    async def stop(self) -> None:
        """Stop pulling; jobs still running are handed back (nak) for another worker."""
        tasks = [t for t in (self._task, *self.running) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    async def queued(self) -> int | None:
        """Jobs waiting for any worker (None when this gateway runs none, or NATS is away)."""
        if self._sub is None:
            return None
        try:
            info = await self._sub.consumer_info()
        except Exception:
            return None
        return info.num_pending + info.num_ack_pending

    async def _pull(self) -> None:
        while True:
            if len(self.running) >= self.concurrency:
                await asyncio.wait(self.running, return_when=asyncio.FIRST_COMPLETED)
                continue
            try:
                msgs = await self._sub.fetch(self.concurrency - len(self.running), FETCH_WAIT)
            except TimeoutError:  # no job within FETCH_WAIT (nats' and asyncio's alike)
                continue
            except Exception as e:  # NATS reconnecting, or restarted: try again shortly
                log.warning("pulling offline jobs failed: %r", e)
                await asyncio.sleep(FETCH_WAIT)
                continue
            for msg in msgs:
                task = asyncio.create_task(self._handle(msg))
                self.running.add(task)
                task.add_done_callback(self.running.discard)

    async def _handle(self, msg) -> None:
        job_id = _job_id(msg)
        metrics = self.gw.metrics
        try:
            if await self._result_stored(job_id):
                await msg.ack()  # ran before; its ack was lost (a crash, a restart)
                return
            if self.cancelled is not None and await self.cancelled(job_id):
                result = _failed(job_id, None, 499, "the job's batch was cancelled", "cancelled")
                await self._finish(msg, job_id, result, "cancelled")
                return
            attempt = msg.metadata.num_delivered
            if attempt > MAX_ATTEMPTS:  # every earlier delivery died with its worker
                why = f"the job was delivered {attempt - 1} times and never finished"
                await self._finish(msg, job_id, _failed(job_id, None, 500, why), "dead_letter")
                return
            metrics.offline_running.inc()
            try:
                outcome, result = await self._run(msg, job_id)
            finally:
                metrics.offline_running.dec()
            if outcome == "retry" and attempt < MAX_ATTEMPTS:
                log.warning("offline job %s failed (attempt %d), retrying", job_id, attempt)
                await msg.nak(delay=RETRY_DELAY)
                return
            if outcome == "retry":  # the last attempt: say so beside the HTTP error
                why = f"gave up after {attempt} attempts"
                result["error"] = {"code": "dead_letter", "message": why}
                outcome = "dead_letter"
            await self._finish(msg, job_id, result, outcome)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await msg.nak()  # hand it to another worker now rather than after ACK_WAIT
            raise
        except Exception:
            log.exception("offline job %s: unexpected failure; it will be redelivered", job_id)

    async def _run(self, msg, job_id: str) -> tuple[str, dict]:
        """("ok" | "error" | "retry", the result line)."""
        custom_id = None
        keepalive = asyncio.create_task(_keep_claim(msg))
        try:
            body, chat, custom_id = _parse_job(msg.data)
            response = await generate_offline(self.gw, body, chat=chat, priority=PRIORITY)
            return "ok", _result(job_id, custom_id, 200, response)
        except UnusableJob as e:
            return "error", _failed(job_id, custom_id, 400, str(e))
        except Exception as e:
            err = classify(e)
            outcome = "retry" if err.status >= 500 or err.status == 429 else "error"
            return outcome, _result(job_id, custom_id, err.status, err.body())
        finally:
            keepalive.cancel()

    async def _finish(self, msg, job_id: str, result: dict, outcome: str) -> None:
        """Store the result, then ack: a crash between the two reruns nothing (it is found).
        A job delivered twice at once (its claim lost in a nats-server restart) finishes
        twice, but the results stream keeps one result per job id: only that one counts."""
        ack = await self.js.publish(
            subjects.offline_result(job_id),
            json.dumps(result, ensure_ascii=False).encode(),
            stream=subjects.OFFLINE_RESULTS_STREAM,
            headers={"Nats-Msg-Id": job_id},
        )
        await msg.ack()
        if not ack.duplicate:
            self.gw.metrics.offline_jobs.labels(outcome=outcome).inc()

    async def _result_stored(self, job_id: str) -> bool:
        try:
            await self.js.get_last_msg(
                subjects.OFFLINE_RESULTS_STREAM, subjects.offline_result(job_id)
            )
        except nats.js.errors.NotFoundError:
            return False
        return True


def _job_id(msg) -> str:
    """The `Nats-Msg-Id` header if it can be a subject token, else `seq-<stream sequence>`."""
    given = (msg.headers or {}).get("Nats-Msg-Id")
    if given:
        try:
            return subjects.token(given)
        except ValueError:
            log.warning("offline job id %r is not a subject token; using its sequence", given)
    return f"seq-{msg.metadata.sequence.stream}"


def _parse_job(data: bytes) -> tuple[dict, bool, str | None]:
    """(request body, is chat, custom_id) or UnusableJob."""
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise UnusableJob(f"the job is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise UnusableJob("the job must be a JSON object")
    custom_id = body.pop("custom_id", None)
    endpoint = body.pop("endpoint", None)
    if endpoint not in ENDPOINTS:
        raise UnusableJob(f"`endpoint` must be one of {', '.join(ENDPOINTS)}, got {endpoint!r}")
    return body, ENDPOINTS[endpoint], custom_id if isinstance(custom_id, str) else None


def _result(job_id: str, custom_id: str | None, status: int, body: dict) -> dict:
    """OpenAI Batch API's output line for one request."""
    return {
        "id": f"job-{job_id}",
        "job_id": job_id,
        "custom_id": custom_id,
        "response": {"status_code": status, "request_id": body.get("id", job_id), "body": body},
        "error": None,
    }


def _failed(job_id: str, custom_id: str | None, status: int, message: str, code: str = "") -> dict:
    """The result of a job that was not run (invalid, dead-lettered, or cancelled)."""
    code = code or ("invalid_job" if status < 500 else "dead_letter")
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return _result(job_id, custom_id, status, body) | {"error": {"code": code, "message": message}}


async def _keep_claim(msg) -> None:
    """In-progress acks while the job runs, so JetStream does not hand it to another."""
    while True:
        await asyncio.sleep(ACK_WAIT / 3)
        with contextlib.suppress(Exception):  # NATS reconnecting: the next one counts
            await msg.in_progress()

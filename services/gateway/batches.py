"""OpenAI's Files and Batch API on top of the offline job queue.

    POST /v1/files (multipart, purpose=batch)   GET /v1/files/{id}   GET /v1/files/{id}/content
    DELETE /v1/files/{id}   POST /v1/batches   GET /v1/batches[?limit&after]
    GET /v1/batches/{id}   POST /v1/batches/{id}/cancel

Everything lives in NATS JetStream, file-backed, so a gateway restart loses nothing and any
gateway can answer for any batch: file bytes in the object store `XLLM_FILES`, file and
batch objects (OpenAI's shapes) in the key-value bucket `XLLM_BATCHES`. Each line of a
batch becomes an offline job (`services.gateway.offline`) with id `<batch id>-<line>`, so
it runs through the same queue, priority and exactly-once result as any job.

The life of a batch is driven by `BatchDriver`, a loop in every gateway that reads the
stored state and moves each batch one step: validating (lines checked; a malformed file
fails the batch with per-line errors; the lines are published as jobs, idempotently) →
in_progress (request_counts from the stored results) → finalizing (output and error files
written) → completed; or → expired past `completion_window`; or cancelling → cancelled
(jobs not yet started are answered "cancelled" by the workers). Transitions are
compare-and-set on the bucket's revision, so two gateways never finalize a batch twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid

import nats.js.errors
from aiohttp import web
from nats.aio.client import Client as NATS
from nats.js.api import KeyValueConfig, ObjectStoreConfig, StorageType

from services.gateway.errors import ApiError, invalid
from xllm.protocol import ErrorCode, subjects
from xllm.service.jetstream import ensure_offline_streams

log = logging.getLogger(__name__)

FILES_BUCKET = "XLLM_FILES"
STATE_BUCKET = "XLLM_BATCHES"
ENDPOINTS = ("/v1/completions", "/v1/chat/completions")
WINDOWS = {"24h": 24 * 3600}
"""Completion windows OpenAI accepts → seconds."""
DRIVE_INTERVAL = 1.0
"""Seconds between the driver's passes over the batches."""
OPEN_STATES = ("validating", "in_progress", "finalizing", "cancelling")


def _now() -> int:
    return int(time.time())


class BatchStore:
    """File bytes (object store) and file / batch objects (key-value), in JetStream."""

    def __init__(self, nc: NATS):
        self.js = nc.jetstream()
        self.files = None
        self.state = None

    async def open(self) -> None:
        try:
            self.files = await self.js.object_store(FILES_BUCKET)
        except nats.js.errors.NotFoundError:
            config = ObjectStoreConfig(storage=StorageType.FILE)
            self.files = await self.js.create_object_store(FILES_BUCKET, config=config)
        try:
            self.state = await self.js.key_value(STATE_BUCKET)
        except nats.js.errors.NotFoundError:
            config = KeyValueConfig(bucket=STATE_BUCKET, storage=StorageType.FILE, history=1)
            self.state = await self.js.create_key_value(config=config)

    # -- objects: (value, revision) ---------------------------------------------------------

    async def get(self, key: str) -> tuple[dict, int] | None:
        try:
            entry = await self.state.get(key)
        except nats.js.errors.KeyNotFoundError:
            return None
        if entry.value is None:
            return None
        return json.loads(entry.value), entry.revision

    async def put(self, key: str, obj: dict, last: int | None = None) -> bool:
        """Store `obj`; with `last`, only if nobody changed it since that revision."""
        data = json.dumps(obj).encode()
        if last is None:
            await self.state.put(key, data)
            return True
        try:
            await self.state.update(key, data, last=last)
        except nats.js.errors.KeyWrongLastSequenceError:
            return False
        return True

    async def keys(self, prefix: str) -> list[str]:
        try:
            return [k for k in await self.state.keys() if k.startswith(prefix)]
        except nats.js.errors.NoKeysError:
            return []

    # -- files -----------------------------------------------------------------------------

    async def add_file(self, data: bytes, filename: str, purpose: str) -> dict:
        file = {
            "id": f"file-{uuid.uuid4().hex}",
            "object": "file",
            "bytes": len(data),
            "created_at": _now(),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
        }
        await self.files.put(file["id"], data)
        await self.put(f"file.{file['id']}", file)
        return file

    async def file(self, file_id: str) -> dict:
        found = await self.get(f"file.{_key(file_id)}")
        if found is None:
            raise ApiError(ErrorCode.NOT_FOUND, f"no file {file_id!r}")
        return found[0]

    async def content(self, file_id: str) -> bytes:
        await self.file(file_id)
        return (await self.files.get(file_id)).data

    async def delete_file(self, file_id: str) -> None:
        await self.file(file_id)
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await self.files.delete(file_id)
        await self.state.delete(f"file.{file_id}")


def _key(some_id: str) -> str:
    """An id usable as a key token (ids come from URLs)."""
    try:
        return subjects.token(some_id)
    except ValueError:
        raise ApiError(ErrorCode.NOT_FOUND, f"no object {some_id!r}") from None


def job_id(batch_id: str, line: int) -> str:
    return f"{batch_id}-{line}"


def batch_of(job: str) -> str | None:
    """The batch a job id belongs to (None for a plain job)."""
    return job.rsplit("-", 1)[0] if job.startswith("batch_") and "-" in job else None


# -- routes -------------------------------------------------------------------------------

STORE = web.AppKey("batch_store", BatchStore)


async def create_file(request: web.Request) -> web.Response:
    form = await request.post()
    purpose, upload = form.get("purpose"), form.get("file")
    if purpose != "batch":
        raise invalid("`purpose` must be 'batch' (the only purpose served here)", "purpose")
    if not isinstance(upload, web.FileField):
        raise invalid("send the file as the multipart field `file`", "file")
    data = upload.file.read()
    file = await request.app[STORE].add_file(data, upload.filename or "upload.jsonl", purpose)
    return web.json_response(file)


async def get_file(request: web.Request) -> web.Response:
    return web.json_response(await request.app[STORE].file(request.match_info["file_id"]))


async def file_content(request: web.Request) -> web.Response:
    data = await request.app[STORE].content(request.match_info["file_id"])
    return web.Response(body=data, content_type="application/jsonl")


async def delete_file(request: web.Request) -> web.Response:
    file_id = request.match_info["file_id"]
    await request.app[STORE].delete_file(file_id)
    return web.json_response({"id": file_id, "object": "file", "deleted": True})


async def create_batch(request: web.Request) -> web.Response:
    store = request.app[STORE]
    body = await request.json()
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    endpoint, window = body.get("endpoint"), body.get("completion_window", "24h")
    if endpoint not in ENDPOINTS:
        raise invalid(f"`endpoint` must be one of {', '.join(ENDPOINTS)}", "endpoint")
    if window not in WINDOWS:
        raise invalid(
            f"`completion_window` must be one of {', '.join(WINDOWS)}", "completion_window"
        )
    input_file = await store.file(str(body.get("input_file_id", "")))
    if input_file["purpose"] != "batch":
        raise invalid("the input file's purpose must be 'batch'", "input_file_id")
    metadata = body.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise invalid("`metadata` must be an object", "metadata")
    now = _now()
    batch = {
        "id": f"batch_{uuid.uuid4().hex}",
        "object": "batch",
        "endpoint": endpoint,
        "errors": None,
        "input_file_id": input_file["id"],
        "completion_window": window,
        "status": "validating",
        "output_file_id": None,
        "error_file_id": None,
        "created_at": now,
        "in_progress_at": None,
        "expires_at": now + WINDOWS[window],
        "finalizing_at": None,
        "completed_at": None,
        "failed_at": None,
        "expired_at": None,
        "cancelling_at": None,
        "cancelled_at": None,
        "request_counts": {"total": 0, "completed": 0, "failed": 0},
        "metadata": metadata,
    }
    await store.put(f"batch.{batch['id']}", batch)
    return web.json_response(batch)


async def get_batch(request: web.Request) -> web.Response:
    found = await request.app[STORE].get(f"batch.{_key(request.match_info['batch_id'])}")
    if found is None:
        raise ApiError(ErrorCode.NOT_FOUND, f"no batch {request.match_info['batch_id']!r}")
    return web.json_response(found[0])


async def list_batches(request: web.Request) -> web.Response:
    store = request.app[STORE]
    batches = [found[0] for k in await store.keys("batch.") if (found := await store.get(k))]
    batches.sort(key=lambda b: (b["created_at"], b["id"]), reverse=True)
    after = request.query.get("after")
    if after:
        ids = [b["id"] for b in batches]
        batches = batches[ids.index(after) + 1 :] if after in ids else []
    try:
        limit = int(request.query.get("limit", "20"))
    except ValueError:
        raise invalid("`limit` must be an integer", "limit") from None
    page = batches[: max(1, min(limit, 100))]
    return web.json_response(
        {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(batches) > len(page),
        }
    )


async def cancel_batch(request: web.Request) -> web.Response:
    store = request.app[STORE]
    key = f"batch.{_key(request.match_info['batch_id'])}"
    while True:
        found = await store.get(key)
        if found is None:
            raise ApiError(ErrorCode.NOT_FOUND, f"no batch {request.match_info['batch_id']!r}")
        batch, revision = found
        if batch["status"] not in ("validating", "in_progress"):
            return web.json_response(batch)  # finishing or finished: nothing to cancel
        batch |= {"status": "cancelling", "cancelling_at": _now()}
        if await store.put(key, batch, last=revision):
            return web.json_response(batch)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/files", create_file)
    app.router.add_get("/v1/files/{file_id}", get_file)
    app.router.add_get("/v1/files/{file_id}/content", file_content)
    app.router.add_delete("/v1/files/{file_id}", delete_file)
    app.router.add_post("/v1/batches", create_batch)
    app.router.add_get("/v1/batches", list_batches)
    app.router.add_get("/v1/batches/{batch_id}", get_batch)
    app.router.add_post("/v1/batches/{batch_id}/cancel", cancel_batch)


# -- the driver ---------------------------------------------------------------------------


class BatchDriver:
    """Moves every open batch one step per pass (see the module doc)."""

    def __init__(self, store: BatchStore, nc: NATS):
        self.store = store
        self.js = nc.jetstream()
        self._results: dict[str, dict[int, dict]] = {}  # batch id → line → result, cached

    async def run(self) -> None:
        await ensure_offline_streams(self.js)
        while True:
            try:
                for key in await self.store.keys("batch."):
                    await self._step(key)
            except Exception:  # NATS away, a bucket being created: the next pass retries
                log.warning("batch driver pass failed", exc_info=True)
            await asyncio.sleep(DRIVE_INTERVAL)

    async def cancelled(self, job: str) -> bool:
        """Whether `job` belongs to a batch being cancelled (the worker then skips it)."""
        batch_id = batch_of(job)
        if batch_id is None:
            return False
        found = await self.store.get(f"batch.{batch_id}")
        return found is not None and found[0]["status"] in ("cancelling", "cancelled")

    async def _step(self, key: str) -> None:
        found = await self.store.get(key)
        if found is None or found[0]["status"] not in OPEN_STATES:
            return
        batch, revision = found
        if batch["status"] == "validating":
            changed = await self._validate(batch)
        elif batch["status"] == "in_progress":
            changed = await self._progress(batch)
        elif batch["status"] == "finalizing":
            changed = await self._finalize(batch, "completed")
        else:
            changed = await self._finalize(batch, "cancelled")
        if changed is not None:
            await self.store.put(key, changed, last=revision)

    async def _validate(self, batch: dict) -> dict | None:
        data = await self.store.content(batch["input_file_id"])
        lines, errors = parse_batch_file(data, batch["endpoint"])
        if errors or not lines:
            errors = errors or [{"code": "empty_file", "message": "no requests", "line": None}]
            return batch | {"status": "failed", "failed_at": _now(), "errors": _list(errors)}
        for i, line in enumerate(lines):  # re-publishing after a crash: dropped as duplicates
            job = line["body"] | {"endpoint": line["url"], "custom_id": line["custom_id"]}
            await self.js.publish(
                subjects.OFFLINE_SUBMIT,
                json.dumps(job).encode(),
                stream=subjects.OFFLINE_STREAM,
                headers={"Nats-Msg-Id": job_id(batch["id"], i)},
            )
        counts = {"total": len(lines), "completed": 0, "failed": 0}
        return batch | {"status": "in_progress", "in_progress_at": _now(), "request_counts": counts}

    async def _progress(self, batch: dict) -> dict | None:
        results = await self._collect(batch)
        total = batch["request_counts"]["total"]
        counts = _counts(results, total)
        if len(results) == total:
            return batch | {
                "status": "finalizing",
                "finalizing_at": _now(),
                "request_counts": counts,
            }
        if _now() >= batch["expires_at"]:
            return await self._finalize(batch, "expired")
        return batch | {"request_counts": counts} if counts != batch["request_counts"] else None

    async def _finalize(self, batch: dict, final: str) -> dict:
        """Write the output and error files from the results there are; then `final`
        (completed, cancelled or expired) with its timestamp."""
        results = await self._collect(batch)
        ok = [_output_line(r) for _, r in sorted(results.items()) if _succeeded(r)]
        failed = [_output_line(r) for _, r in sorted(results.items()) if not _succeeded(r)]
        name = batch["id"]
        fields: dict = {"request_counts": _counts(results, batch["request_counts"]["total"])}
        if ok:
            file = await self.store.add_file(_jsonl(ok), f"{name}_output.jsonl", "batch_output")
            fields["output_file_id"] = file["id"]
        if failed:
            file = await self.store.add_file(_jsonl(failed), f"{name}_error.jsonl", "batch_output")
            fields["error_file_id"] = file["id"]
        self._results.pop(batch["id"], None)
        return batch | fields | {"status": final, f"{final}_at": _now()}

    async def _collect(self, batch: dict) -> dict[int, dict]:
        results = self._results.setdefault(batch["id"], {})
        for i in range(batch["request_counts"]["total"]):
            if i in results:
                continue
            subject = subjects.offline_result(job_id(batch["id"], i))
            try:
                msg = await self.js.get_last_msg(subjects.OFFLINE_RESULTS_STREAM, subject)
            except nats.js.errors.NotFoundError:
                continue
            results[i] = json.loads(msg.data)
        return results


def parse_batch_file(data: bytes, endpoint: str) -> tuple[list[dict], list[dict]]:
    """The input file's requests, and OpenAI-style errors for lines that are not one."""
    lines, errors, seen = [], [], set()
    for number, raw in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except ValueError as e:
            errors.append({"code": "invalid_json_line", "message": str(e), "line": number})
            continue
        problem = _line_problem(line, endpoint, seen)
        if problem:
            errors.append({"code": "invalid_request", "message": problem, "line": number})
            continue
        seen.add(line["custom_id"])
        lines.append(line)
    return lines, errors


def _line_problem(line, endpoint: str, seen: set) -> str | None:
    if not isinstance(line, dict):
        return "each line must be a JSON object"
    if not isinstance(line.get("custom_id"), str) or not line["custom_id"]:
        return "`custom_id` must be a non-empty string"
    if line["custom_id"] in seen:
        return f"duplicate custom_id {line['custom_id']!r}"
    if line.get("method") != "POST":
        return "`method` must be POST"
    if line.get("url") != endpoint:
        return f"`url` must be the batch's endpoint {endpoint}"
    if not isinstance(line.get("body"), dict):
        return "`body` must be a JSON object"
    return None


def _succeeded(result: dict) -> bool:
    return result.get("error") is None and result["response"]["status_code"] == 200


def _counts(results: dict[int, dict], total: int) -> dict:
    completed = sum(_succeeded(r) for r in results.values())
    return {"total": total, "completed": completed, "failed": len(results) - completed}


def _output_line(result: dict) -> dict:
    return {
        "id": f"batch_req_{result['job_id']}",
        "custom_id": result["custom_id"],
        "response": result["response"],
        "error": result["error"],
    }


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()


def _list(errors: list[dict]) -> dict:
    return {"object": "list", "data": errors}

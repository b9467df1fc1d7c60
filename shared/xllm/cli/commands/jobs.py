"""`xllm jobs`: submit offline jobs over NATS and read their results, from the shell.

    xllm jobs submit jobs.jsonl --nats-url nats://127.0.0.1:4222     # prints each job id
    xllm jobs results --job ID [--job ID ...] --wait 600               # those jobs' results
    xllm jobs results [--follow]                                       # every stored result

A line of `jobs.jsonl` is the body of `POST /v1/completions` or `/v1/chat/completions`
plus `"endpoint"` naming which; its `"job_id"` (or else its `"custom_id"`, when that is a
valid id) becomes the job id, sent as `Nats-Msg-Id`, so submitting the same file twice runs
nothing twice. Results are printed one JSON line each (the format of
`xllm.protocol.subjects.offline_result`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid

from xllm.config import NatsConfig, add_arguments, from_args


def add_parser(subparsers) -> None:
    jobs = subparsers.add_parser("jobs", help="offline jobs over NATS: submit, results")
    tools = jobs.add_subparsers(dest="jobs_command", required=True)
    submit = tools.add_parser("submit", help="publish each line of a JSONL file as a job")
    submit.add_argument("file", help="JSONL: one request body with `endpoint` per line")
    add_arguments(submit, NatsConfig)
    submit.set_defaults(func=lambda args: asyncio.run(_submit(args)))
    results = tools.add_parser("results", help="print stored results as JSON lines")
    results.add_argument("--job", action="append", default=[], help="only this job (repeat)")
    results.add_argument("--wait", type=float, default=0.0, help="seconds to wait for --job")
    results.add_argument("--follow", action="store_true", help="keep printing new results")
    add_arguments(results, NatsConfig)
    results.set_defaults(func=lambda args: asyncio.run(_results(args)))


def job_id_of(job: dict) -> str:
    """The job's id: `job_id`, else `custom_id` if it can name a subject, else a new one."""
    from xllm.protocol import subjects

    for key in ("job_id", "custom_id"):
        value = job.get(key)
        if isinstance(value, str):
            try:
                return subjects.token(value)
            except ValueError:
                if key == "job_id":
                    raise
    return uuid.uuid4().hex


async def _connect(args: argparse.Namespace):
    from xllm.service.runtime import connect_nats

    return await connect_nats(from_args(NatsConfig, args), "xllm-jobs")


async def _submit(args: argparse.Namespace) -> int:
    from xllm.protocol import subjects
    from xllm.service.jetstream import ensure_offline_streams

    nc = await _connect(args)
    try:
        js = nc.jetstream()
        await ensure_offline_streams(js)
        with open(args.file, encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    job = json.loads(line)
                    job_id = job_id_of(job) if isinstance(job, dict) else uuid.uuid4().hex
                except ValueError as e:  # sent anyway: the worker answers with an error result
                    print(f"line {number}: {e}", file=sys.stderr)
                    job, job_id = None, uuid.uuid4().hex
                if isinstance(job, dict):
                    job.pop("job_id", None)
                    line = json.dumps(job)
                ack = await js.publish(
                    subjects.OFFLINE_SUBMIT,
                    line.encode(),
                    stream=subjects.OFFLINE_STREAM,
                    headers={"Nats-Msg-Id": job_id},
                )
                print(json.dumps({"job_id": job_id, "duplicate": bool(ack.duplicate)}))
    finally:
        await nc.close()
    return 0


async def _results(args: argparse.Namespace) -> int:
    nc = await _connect(args)
    try:
        if args.job:
            return await _wanted_results(nc.jetstream(), args.job, args.wait)
        return await _all_results(nc.jetstream(), args.follow)
    finally:
        await nc.close()


async def _wanted_results(js, job_ids: list[str], wait: float) -> int:
    import nats.js.errors

    from xllm.protocol import subjects

    deadline = time.monotonic() + wait
    missing = list(job_ids)
    while True:
        for job_id in list(missing):
            try:
                msg = await js.get_last_msg(
                    subjects.OFFLINE_RESULTS_STREAM, subjects.offline_result(job_id)
                )
            except nats.js.errors.NotFoundError:
                continue
            print(msg.data.decode(), flush=True)
            missing.remove(job_id)
        if not missing or time.monotonic() >= deadline:
            break
        await asyncio.sleep(0.5)
    for job_id in missing:
        print(f"no result yet for job {job_id}", file=sys.stderr)
    return 1 if missing else 0


async def _all_results(js, follow: bool) -> int:
    import nats.errors

    from xllm.protocol import subjects

    sub = await js.subscribe(subjects.OFFLINE_RESULTS_PREFIX + ".>", ordered_consumer=True)
    info = await js.stream_info(subjects.OFFLINE_RESULTS_STREAM)
    if info.state.messages == 0 and not follow:
        return 0
    while True:
        try:
            msg = await sub.next_msg(timeout=None if follow else 5.0)
        except nats.errors.TimeoutError:
            return 0
        print(msg.data.decode(), flush=True)
        if not follow and msg.metadata.num_pending == 0:
            return 0

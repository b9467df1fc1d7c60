"""One streamed request to an OpenAI-compatible server, timed: `send()` → `RequestRecord`.

The request asks for exactly `output_len` tokens: `max_tokens` and `min_tokens` both set to it
and `ignore_eos: true` (vLLM, SGLang, llama.cpp and xLLM honour these; servers that do not
ignore unknown fields, and the length check below then tells). Usage is requested with
`stream_options.include_usage`; when the server sends it, `completion_tokens` is the output
count, else each chunk with text counts as one token.

Times are seconds on the benchmark's clock (`time.perf_counter()` minus its start), so the
records of one run can be laid on one time axis. TTFT and E2E are measured from when the
request was sent, not from its scheduled arrival: waiting for a concurrency slot is the
client's queue, shown apart in the records (`arrival` → `sent`).
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from xllm.cli.bench.workloads import BenchRequest


@dataclass(frozen=True)
class ClientConfig:
    base_url: str
    """API root, e.g. `http://127.0.0.1:8000/v1`."""
    model: str
    chat: bool = False
    api_key: str = ""
    temperature: float = 0.0
    check_length: bool = True
    """Record a request whose output count differs from the one asked as `wrong_length`."""
    extra_body: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.base_url + ("/chat/completions" if self.chat else "/completions")

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


@dataclass
class RequestRecord:
    """What happened to one request; every time in seconds on the benchmark's clock."""

    index: int
    input_len: int
    """Prompt tokens intended; `prompt_tokens` is what the server counted."""
    output_len: int
    """Output tokens asked for."""
    arrival: float
    """When it was due to be sent (its trace / Poisson time, or 0 for closed-loop runs)."""
    sent: float = 0.0
    end: float = 0.0
    ttft: float | None = None
    """Seconds from `sent` to the first chunk carrying text."""
    itl: list[float] = field(default_factory=list)
    """Gaps between successive chunks carrying text."""
    output_tokens: int = 0
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    """Prompt tokens the server took from its prefix cache (`prompt_tokens_details`), if told."""
    counted_by: str = "chunks"
    """`usage` when the server reported the output count, else `chunks` (one per chunk)."""
    error: str | None = None
    """Failure kind: `http_<status>`, `connection`, `timeout`, `stream_error` (an error in the
    stream), `bad_response`, `no_output` or `wrong_length`; None on success."""
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def e2e(self) -> float:
        return self.end - self.sent

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first; None for a single-token output."""
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def request_body(request: BenchRequest, config: ClientConfig) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": config.model,
        "max_tokens": request.output_len,
        "min_tokens": request.output_len,
        "ignore_eos": True,
        "temperature": config.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if config.chat:
        body["messages"] = [{"role": "user", "content": request.prompt}]
    else:
        body["prompt"] = request.prompt
    return body | config.extra_body


async def send(
    session: aiohttp.ClientSession,
    config: ClientConfig,
    request: BenchRequest,
    record: RequestRecord,
    clock_start: float,
) -> RequestRecord:
    """Send `request` now and fill `record` in; never raises for server or network errors."""
    record.sent = time.perf_counter() - clock_start
    text_chunks: list[float] = []  # when each chunk carrying text arrived
    try:
        body = request_body(request, config)
        async with session.post(config.url, json=body, headers=config.headers) as response:
            if response.status != 200:
                record.error = f"http_{response.status}"
                record.detail = (await response.text())[:300]
                return record
            async for payload in _sse_payloads(response):
                if _on_chunk(payload, record):
                    text_chunks.append(time.perf_counter() - clock_start)
    except (TimeoutError, aiohttp.ClientError) as e:
        record.error = "timeout" if isinstance(e, TimeoutError) else "connection"
        record.detail = repr(e)[:300]
    except _StreamError as e:
        record.error, record.detail = "stream_error", str(e)[:300]
    except ValueError as e:  # a data line that is not JSON
        record.error, record.detail = "bad_response", str(e)[:300]
    finally:
        record.end = time.perf_counter() - clock_start
    if text_chunks:
        record.ttft = text_chunks[0] - record.sent
        record.itl = [b - a for a, b in itertools.pairwise(text_chunks)]
    if record.error is None:
        _check(record, len(text_chunks), config.check_length)
    return record


class _StreamError(Exception):
    """The server put an error object in the stream."""


async def _sse_payloads(response: aiohttp.ClientResponse):
    """The JSON objects of the `data:` lines, up to `[DONE]`."""
    async for raw in response.content:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            return
        payload = json.loads(data)
        if "error" in payload:
            raise _StreamError(json.dumps(payload["error"]))
        yield payload


def _on_chunk(payload: dict, record: RequestRecord) -> bool:
    """Take the usage from one chunk, if any; whether the chunk carried output text."""
    usage = payload.get("usage")
    if usage:
        record.output_tokens = usage.get("completion_tokens", 0)
        record.prompt_tokens = usage.get("prompt_tokens")
        record.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
        record.counted_by = "usage"
    return any(_chunk_text(c) for c in payload.get("choices") or ())


def _chunk_text(choice: dict) -> str:
    if "text" in choice:  # /v1/completions
        return choice["text"] or ""
    delta = choice.get("delta") or {}
    return (delta.get("content") or "") + (delta.get("reasoning_content") or "")


def _check(record: RequestRecord, chunk_counts: int, check_length: bool) -> None:
    """Count tokens by chunks when there was no usage; flag empty or wrong-length outputs."""
    if record.counted_by == "chunks":
        record.output_tokens = chunk_counts
    if record.ttft is None:
        record.error, record.detail = "no_output", "the stream carried no text"
    elif check_length and record.output_tokens != record.output_len:
        record.error = "wrong_length"
        record.detail = f"asked for {record.output_len} tokens, got {record.output_tokens}"

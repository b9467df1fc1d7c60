"""The OpenAI-compatible routes: completions, chat completions, models; vLLM's tokenize and
detokenize.

A generation request goes: read the JSON body → `parsing` (validate, tokenize) → a --max-inflight
slot → `Generation` (subscribe, submit, token deltas; abort when it ends early) → `rendering`
(one JSON response, or SSE `data: {...}` chunks ending with `data: [DONE]`). Errors before the
first SSE byte become an HTTP error status (errors.error_middleware); after it, an SSE event
`data: {"error": {...}}` followed by `data: [DONE]`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace

from aiohttp import web

from services.gateway.errors import classify, invalid
from services.gateway.images import load_images
from services.gateway.parsing import (
    ApiRequest,
    chat_prompt,
    check_model,
    json_field,
    parse_chat,
    parse_completion,
    token_ids,
)
from services.gateway.rendering import make_renderer
from services.gateway.state import GATEWAY, Gateway
from services.gateway.streaming import Generation
from xllm.protocol import ProtocolError

log = logging.getLogger(__name__)

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
SSE_DONE = b"data: [DONE]\n\n"


async def read_json(request: web.Request) -> dict:
    """The body as a JSON object (413 beyond --max-body-bytes, 400 if not a JSON object)."""
    raw = await request.read()
    body = json.loads(raw)
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    return body


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=False)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=True)


async def _generate(request: web.Request, *, chat: bool) -> web.StreamResponse:
    gw = request.app[GATEWAY]
    body = await read_json(request)
    api = await parse_request(body, gw, chat=chat)
    with gw.admit():
        gen = gw.generation(api.gen)
        try:
            async with gen:
                if api.stream:
                    return await _stream(request, gw, api, gen)
                return web.json_response(await _collect(gw, api, gen), dumps=_dumps)
        finally:
            gw.metrics.observe_generation(gen)


async def generate_offline(gw: Gateway, body: dict, *, chat: bool, priority: int) -> dict:
    """The JSON response an HTTP client would get for `body`, for an offline job: the same
    parsing and rendering, never streamed, at `priority`, outside --max-inflight (offline
    work has its own concurrency). Raises what the HTTP route would turn into an error."""
    api = await parse_request(body, gw, chat=chat)
    api = replace(api, stream=False, gen=replace(api.gen, priority=priority))
    gen = gw.generation(api.gen)
    try:
        async with gen:
            return await _collect(gw, api, gen)
    finally:
        gw.metrics.observe_generation(gen)


async def parse_request(body: dict, gw: Gateway, *, chat: bool) -> ApiRequest:
    if not chat:
        return parse_completion(body, gw.model)
    return parse_chat(body, gw.model, await load_images(body, gw.model, gw.config))


async def _collect(gw: Gateway, api: ApiRequest, gen: Generation) -> dict:
    renderer = make_renderer(api, gw.model)
    async for out in gen.outputs():
        renderer.add(out)
    return renderer.response(gen.usage)


async def _stream(
    request: web.Request, gw: Gateway, api: ApiRequest, gen: Generation
) -> web.StreamResponse:
    response = web.StreamResponse(headers=SSE_HEADERS)
    await response.prepare(request)
    renderer = make_renderer(api, gw.model)
    try:
        async for out in gen.outputs():
            chunk = renderer.chunk(out)
            if chunk is not None:
                await _send(response, chunk)
        if api.include_usage:
            await _send(response, renderer.usage_chunk(gen.usage))
    except ProtocolError as e:
        log.warning("%s failed: %s", api.gen.request_id, e)
        await _send(response, classify(e).body())
    await response.write(SSE_DONE)
    await response.write_eof()
    return response


async def _send(response: web.StreamResponse, obj: dict) -> None:
    # A client that went away makes this raise ConnectionResetError, which ends the
    # Generation (and aborts it) on the way out.
    await response.write(b"data: " + _dumps(obj).encode() + b"\n\n")


def _dumps(obj: object) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


async def models(request: web.Request) -> web.Response:
    model = request.app[GATEWAY].model
    card = {
        "id": model.name,
        "object": "model",
        "created": model.created,
        "owned_by": "xllm",
        "root": model.path,
        "parent": None,
        "max_model_len": model.max_model_len,
    }
    return web.json_response({"object": "list", "data": [card]})


async def tokenize(request: web.Request) -> web.Response:
    """vLLM's /tokenize: {"prompt": str} or {"messages": [...]} → tokens, count, max_model_len."""
    model = request.app[GATEWAY].model
    body = await read_json(request)
    check_model(body, model)
    if "messages" in body:
        tokens = chat_prompt(body, model)
    else:
        prompt = json_field(body, "prompt", "a string")
        if prompt is None:
            raise invalid("give `prompt` (a string) or `messages` (a chat)", "prompt")
        add_special = json_field(body, "add_special_tokens", "a boolean", True)
        tokens = model.tokenizer.encode(prompt, add_special_tokens=add_special)
    body = {"tokens": tokens, "count": len(tokens), "max_model_len": model.max_model_len}
    return web.json_response(body)


async def detokenize(request: web.Request) -> web.Response:
    """vLLM's /detokenize: {"tokens": [...]} → {"prompt": str}."""
    model = request.app[GATEWAY].model
    body = await read_json(request)
    check_model(body, model)
    tokens = token_ids(json_field(body, "tokens", "an array", []), model, "tokens")
    skip_special = json_field(body, "skip_special_tokens", "a boolean", False)
    return web.json_response({"prompt": model.tokenizer.decode(tokens, skip_special)})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/detokenize", detokenize)

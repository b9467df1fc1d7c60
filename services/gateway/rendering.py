"""`Output`s → OpenAI JSON: stream chunks and whole responses, completions and chat.

    renderer = make_renderer(api_request, model)
    stream:      renderer.chunk(out) per Output (None = nothing to send), then
                 renderer.usage_chunk(usage) when stream_options.include_usage
    non-stream:  renderer.add(out) per Output, then renderer.response(usage)

Logprobs follow OpenAI: completions use the legacy shape (tokens / token_logprobs /
top_logprobs / text_offset, with text_offset counted over the token texts), chat the
`{"content": [{token, logprob, bytes, top_logprobs}]}` shape. Logprobs of -inf are sent as
-9999.0 (JSON has no infinity; OpenAI and vLLM do the same).

A chat with a forced tool call (tools.py) holds its text back and answers with
`message.tool_calls` and finish_reason "tool_calls"; streamed, the calls come whole in the
completion's last chunk (OpenAI's clients accumulate argument deltas, one delta is valid).
"""

from __future__ import annotations

import time
from typing import Any

from services.gateway.model import ModelInfo
from services.gateway.parsing import ApiRequest
from services.gateway.streaming import Output, Usage
from xllm.protocol import Logprob

MIN_LOGPROB = -9999.0


def make_renderer(api: ApiRequest, model: ModelInfo) -> Renderer:
    if api.tool_calling is not None:
        return ToolCallRenderer(api, model)
    return (ChatRenderer if api.chat else CompletionRenderer)(api, model)


class Renderer:
    object_name = ""
    chunk_object_name = ""

    def __init__(self, api: ApiRequest, model: ModelInfo):
        self.api = api
        self.model = model
        self.created = int(time.time())
        n = api.gen.sampling.n
        self.texts: list[list[str]] = [[] for _ in range(n)]
        self.finish_reasons: list[str | None] = [None] * n
        self.cumulative_logprobs: list[float | None] = [None] * n
        """Beam search's: each beam's summed logprob, in its choice (as vLLM's outputs)."""
        self.logprobs: list[Any] | None = None
        if api.logprobs is not None:
            self.logprobs = [self._empty_logprobs() for _ in range(n)]

    # -- streaming --------------------------------------------------------------------------

    def chunk(self, out: Output) -> dict | None:
        """The SSE chunk for `out`; None when it carries nothing the client can see."""
        logprobs = self._logprobs(out)
        if not out.text and out.finish_reason is None and logprobs is None and self._seen(out):
            return None
        choice = {"index": out.index, **self._delta(out)}
        choice |= {"logprobs": logprobs, "finish_reason": out.finish_reason}
        if out.cumulative_logprob is not None:
            choice["cumulative_logprob"] = out.cumulative_logprob
        chunk = self._header(self.chunk_object_name) | {"choices": [choice]}
        if self.api.include_usage:
            chunk["usage"] = None
        return chunk

    def usage_chunk(self, usage: Usage) -> dict:
        return self._header(self.chunk_object_name) | {"choices": [], "usage": usage.to_dict()}

    # -- whole response ---------------------------------------------------------------------

    def add(self, out: Output) -> None:
        self.texts[out.index].append(out.text)
        if out.finish_reason is not None:
            self.finish_reasons[out.index] = out.finish_reason
        if out.cumulative_logprob is not None:
            self.cumulative_logprobs[out.index] = out.cumulative_logprob
        logprobs = self._logprobs(out)
        if logprobs is not None and self.logprobs is not None:
            self._merge_logprobs(self.logprobs[out.index], logprobs)

    def response(self, usage: Usage) -> dict:
        choices = []
        for i, parts in enumerate(self.texts):
            logprobs = None if self.logprobs is None else self.logprobs[i]
            choice = {"index": i, **self._body("".join(parts))}
            choice |= {"logprobs": logprobs, "finish_reason": self.finish_reasons[i]}
            if self.cumulative_logprobs[i] is not None:
                choice["cumulative_logprob"] = self.cumulative_logprobs[i]
            choices.append(choice)
        return self._header(self.object_name) | {"choices": choices, "usage": usage.to_dict()}

    # -- per kind ---------------------------------------------------------------------------

    def _header(self, object_name: str) -> dict:
        gen = self.api.gen
        return {"id": gen.request_id, "object": object_name, "created": self.created,
                "model": gen.model}  # fmt: skip

    def _seen(self, out: Output) -> bool:
        """Whether completion `out.index` already had a chunk (chat sends the role first)."""
        return True

    def _delta(self, out: Output) -> dict:
        raise NotImplementedError

    def _body(self, text: str) -> dict:
        raise NotImplementedError

    def _empty_logprobs(self) -> Any:
        raise NotImplementedError

    def _logprobs(self, out: Output) -> Any:
        raise NotImplementedError

    def _merge_logprobs(self, into: Any, more: Any) -> None:
        raise NotImplementedError

    def _top(self, entry: Logprob) -> list[tuple[int, float]]:
        """The entry's alternatives, most likely first, as many as were asked for."""
        ranked = sorted(entry.top.items(), key=lambda item: -item[1])
        return ranked[: self.api.logprobs or 0]


class CompletionRenderer(Renderer):
    object_name = "text_completion"
    chunk_object_name = "text_completion"

    def __init__(self, api: ApiRequest, model: ModelInfo):
        super().__init__(api, model)
        self.text_offsets = [0] * api.gen.sampling.n

    def _delta(self, out: Output) -> dict:
        return {"text": out.text}

    def _body(self, text: str) -> dict:
        return {"text": text}

    def _empty_logprobs(self) -> dict:
        return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def _logprobs(self, out: Output) -> dict | None:
        if self.api.logprobs is None or not out.logprobs:
            return None
        result = self._empty_logprobs()
        token_text = self.model.token_text
        for entry in out.logprobs:
            text = token_text(entry.token_id)
            result["tokens"].append(text)
            result["token_logprobs"].append(_clamp(entry.logprob))
            top = {token_text(t): _clamp(lp) for t, lp in self._top(entry)}
            result["top_logprobs"].append(top)
            result["text_offset"].append(self.text_offsets[out.index])
            self.text_offsets[out.index] += len(text)
        return result

    def _merge_logprobs(self, into: dict, more: dict) -> None:
        for key, values in more.items():
            into[key].extend(values)


class ChatRenderer(Renderer):
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"

    def __init__(self, api: ApiRequest, model: ModelInfo):
        super().__init__(api, model)
        self.role_sent = [False] * api.gen.sampling.n

    def _seen(self, out: Output) -> bool:
        return self.role_sent[out.index]

    def _delta(self, out: Output) -> dict:
        delta: dict[str, str] = {}
        if not self.role_sent[out.index]:
            self.role_sent[out.index] = True
            delta["role"] = "assistant"
        if out.text or "role" in delta:
            delta["content"] = out.text
        return {"delta": delta}

    def _body(self, text: str) -> dict:
        return {"message": {"role": "assistant", "content": text}}

    def _empty_logprobs(self) -> dict:
        return {"content": []}

    def _logprobs(self, out: Output) -> dict | None:
        if self.api.logprobs is None or not out.logprobs:
            return None
        content = []
        for entry in out.logprobs:
            item = self._token(entry.token_id, entry.logprob)
            item["top_logprobs"] = [self._token(t, lp) for t, lp in self._top(entry)]
            content.append(item)
        return {"content": content}

    def _token(self, token_id: int, logprob: float) -> dict:
        text = self.model.token_text(token_id)
        return {"token": text, "logprob": _clamp(logprob), "bytes": list(text.encode())}

    def _merge_logprobs(self, into: dict, more: dict) -> None:
        into["content"].extend(more["content"])


class ToolCallRenderer(ChatRenderer):
    """Chat whose output is a forced tool call: rendered once the completion is over."""

    def chunk(self, out: Output) -> dict | None:
        self.add(out)
        if out.finish_reason is None:
            return None
        message, finish = self._message(out.index)
        delta = dict(message)
        if "tool_calls" in delta:
            delta["tool_calls"] = [{"index": k, **c} for k, c in enumerate(delta["tool_calls"])]
        logprobs = None if self.logprobs is None else self.logprobs[out.index]
        choice = {"index": out.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        chunk = self._header(self.chunk_object_name) | {"choices": [choice]}
        if self.api.include_usage:
            chunk["usage"] = None
        return chunk

    def response(self, usage: Usage) -> dict:
        response = super().response(usage)
        for choice in response["choices"]:
            choice["message"], choice["finish_reason"] = self._message(choice["index"])
        return response

    def _message(self, index: int) -> tuple[dict, str | None]:
        """Completion `index`'s message and finish reason: its tool calls if the output is
        complete ("stop") and parses as calls, else its text as it is."""
        text, finish = "".join(self.texts[index]), self.finish_reasons[index]
        assert self.api.tool_calling is not None
        calls = self.api.tool_calling.calls(text) if finish == "stop" else None
        if calls is None:
            return {"role": "assistant", "content": text}, finish
        return {"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls"


def _clamp(logprob: float) -> float:
    return max(logprob, MIN_LOGPROB)

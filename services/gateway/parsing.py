"""OpenAI request bodies → validated, tokenized `ApiRequest`s (or an `ApiError` naming the field).

Accepted: OpenAI's /v1/completions and /v1/chat/completions fields, plus vLLM's extra
sampling fields (`ignore_eos`, `min_tokens`, `top_k`, `min_p`, `repetition_penalty`,
`stop_token_ids`, `include_stop_str_in_output`, `skip_special_tokens`, `add_special_tokens`,
`add_generation_prompt`, `chat_template_kwargs`), structured output (`response_format`,
vLLM's `structured_outputs` and `guided_*`: structured.py) and, for chat, `tools` with
`tool_choice` (tools.py). Unknown fields are ignored, as vLLM does; known fields the gateway
cannot honour (batched prompts, echo, suffix, best_of != n, logit_bias, legacy `functions`)
are rejected with a 400 that says so.

Sampling is read into the one `SamplingParams` and validated here, once, for the whole
cluster: each of its scalar fields comes from the body field of the same name, with the JSON
type its annotation says and its own default, so a field added there is accepted here. The
rules live in `SamplingParams.validate`; this module checks JSON types, the context length
(`max_tokens` defaults to what is left of the context, as in vLLM) and what only the gateway
knows (the model name, the prompt).
"""

from __future__ import annotations

import dataclasses
import typing
import uuid
from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError

from services.gateway.errors import ApiError, invalid
from services.gateway.model import ModelInfo
from services.gateway.streaming import GenerationRequest
from services.gateway.structured import structured_output
from services.gateway.tools import ToolCalling, tool_calling
from xllm.protocol import ErrorCode, ImageData, SamplingParams, StructuredOutput

MAX_N = 128
"""Most completions per request: each costs the gateway a detokenizer and the engine a
sequence, so a huge `n` is refused before anything is allocated."""

_TYPES: dict[str, tuple[type, ...]] = {
    "an integer": (int,),
    "a number": (int, float),
    "a boolean": (bool,),
    "a string": (str,),
    "an array": (list,),
    "an object": (dict,),
}


@dataclass(frozen=True, slots=True)
class ApiRequest:
    """A generation request plus how to render its answer."""

    gen: GenerationRequest
    chat: bool
    stream: bool
    include_usage: bool
    logprobs: int | None
    """Top alternatives per token to render (completions' `logprobs`, chat's `top_logprobs`);
    None = no logprobs."""
    tool_calling: ToolCalling | None = None
    """Chat with a forced tool call: how to read the output as `tool_calls`."""


def json_field(body: dict, name: str, kind: str, default: Any = None) -> Any:
    """`body[name]` if it has the JSON type `kind` (a key of `_TYPES`); None → default."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and kind != "a boolean":
        raise invalid(f"`{name}` must be {kind}, got a boolean", name)
    if not isinstance(value, _TYPES[kind]):
        raise invalid(f"`{name}` must be {kind}, got {_json_type(value)}", name)
    return value


def check_model(body: dict, model: ModelInfo) -> None:
    name = json_field(body, "model", "a string", model.name)
    if name != model.name:
        raise ApiError(
            ErrorCode.NOT_FOUND,
            f"The model `{name}` does not exist; this server serves `{model.name}`.",
            "model",
        )


def parse_completion(body: dict, model: ModelInfo) -> ApiRequest:
    check_model(body, model)
    _unsupported(body, echo=False, suffix="", logit_bias={})
    prompt = _completion_prompt(body, model)
    logprobs = json_field(body, "logprobs", "an integer")
    best_of = json_field(body, "best_of", "an integer")
    if best_of is not None and best_of != json_field(body, "n", "an integer", 1):
        raise invalid("`best_of` different from `n` is not supported", "best_of")
    max_tokens = json_field(body, "max_tokens", "an integer")
    structured = structured_output(body)
    return _api_request(body, model, prompt, max_tokens, logprobs, structured, chat=False)


def parse_chat(body: dict, model: ModelInfo, images: list[ImageData] | None = None) -> ApiRequest:
    """`images`: the image parts' images, read and checked (images.load_images)."""
    check_model(body, model)
    _unsupported(body, functions=[], logit_bias={})
    calling, structured, tools = tool_calling(body)
    if (also := structured_output(body)) is not None:
        if structured is not None:
            raise invalid(
                "a forced tool call and an output constraint exclude each other", "tool_choice"
            )
        structured = also
    prompt = chat_prompt(body, model, tools, images)
    if images:
        images = placed_images(prompt, model, images)
    top = json_field(body, "top_logprobs", "an integer")
    if json_field(body, "logprobs", "a boolean", False):
        logprobs = 0 if top is None else top
    elif top is not None:
        raise invalid("`top_logprobs` needs `logprobs` set to true", "top_logprobs")
    else:
        logprobs = None
    max_tokens = json_field(body, "max_completion_tokens", "an integer")
    if max_tokens is None:
        max_tokens = json_field(body, "max_tokens", "an integer")
    api = _api_request(body, model, prompt, max_tokens, logprobs, structured, chat=True)
    gen = dataclasses.replace(api.gen, images=tuple(images or ()))
    return dataclasses.replace(api, tool_calling=calling, gen=gen)


def _api_request(
    body: dict,
    model: ModelInfo,
    prompt: list[int],
    max_tokens: int | None,
    logprobs: int | None,
    structured: StructuredOutput | None,
    *,
    chat: bool,
) -> ApiRequest:
    param = "messages" if chat else "prompt"
    room = check_prompt_length(prompt, model, param)
    max_tokens = room if max_tokens is None else max_tokens
    sampling = _sampling(body, model, max_tokens, logprobs, structured, chat)
    if sampling.max_tokens > room:
        raise ApiError(
            ErrorCode.CONTEXT_LENGTH_EXCEEDED,
            f"This model's maximum context length is {model.max_model_len} tokens. However, "
            f"you requested {len(prompt) + sampling.max_tokens} tokens ({len(prompt)} in the "
            f"{param}, {sampling.max_tokens} for the completion). Please reduce the length of "
            f"the {param} or of max_tokens.",
            "max_tokens",
        )
    stream = json_field(body, "stream", "a boolean", False)
    options = json_field(body, "stream_options", "an object", {})
    if options and not stream:
        raise invalid("`stream_options` is only allowed when `stream` is true", "stream_options")
    gen = GenerationRequest(
        request_id=f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
        model=model.name,
        prompt_token_ids=prompt,
        sampling=sampling,
        stop=_stop_strings(body),
        include_stop_str_in_output=json_field(
            body, "include_stop_str_in_output", "a boolean", False
        ),
        skip_special_tokens=json_field(body, "skip_special_tokens", "a boolean", True),
    )
    include_usage = bool(json_field(options, "include_usage", "a boolean", False))
    return ApiRequest(gen, chat, stream, include_usage, logprobs)


def check_prompt_length(prompt: list[int], model: ModelInfo, param: str) -> int:
    """Tokens left for the output; ApiError when the prompt is empty or fills the context."""
    if not prompt:
        raise invalid(f"the {param} is empty", param)
    if len(prompt) >= model.max_model_len:
        raise ApiError(
            ErrorCode.CONTEXT_LENGTH_EXCEEDED,
            f"This model's maximum context length is {model.max_model_len} tokens. However, "
            f"your {param} has {len(prompt)} tokens, which leaves no room for the completion. "
            f"Please reduce the length of the {param}.",
            param,
        )
    return model.max_model_len - len(prompt)


def _sampling(
    body: dict,
    model: ModelInfo,
    max_tokens: int,
    logprobs: int | None,
    structured: StructuredOutput | None,
    chat: bool,
) -> SamplingParams:
    stop_token_ids = json_field(body, "stop_token_ids", "an array", [])
    n = json_field(body, "n", "an integer", 1)
    if n > MAX_N:
        raise invalid(f"n must be at most {MAX_N}, got {n}", "n")
    params = SamplingParams(
        n=n,
        max_tokens=max_tokens,
        **_scalar_sampling_values(body),
        stop_token_ids=token_ids(stop_token_ids, model, "stop_token_ids"),
        logprobs=logprobs,
        structured=structured,
        **_beam_values(body, model),
    )
    try:
        params.validate(model.vocab_size)
    except ValueError as e:
        message = str(e)
        param = message.split(" ", 1)[0]  # validate's messages start with the field
        if param == "logprobs" and chat:
            param = "top_logprobs"
        raise invalid(message, param if param in _SAMPLING_FIELDS else None) from None
    return params


def _scalar_sampling_values(body: dict) -> dict[str, Any]:
    """The values of the `SamplingParams` fields read straight from the body."""
    values = {}
    for name, (kind, default) in _SCALAR_FIELDS.items():
        value = json_field(body, name, kind, default)
        values[name] = float(value) if kind == "a number" and value is not None else value
    return values


_READ_APART = frozenset(
    {"n", "max_tokens", "stop_token_ids", "logprobs", "structured"}
    | {"early_stopping", "item_trie", "allowed_items"}
)
"""Fields with rules of their own: a cap, the context's room, token ids of the vocabulary,
two spellings (completions' `logprobs`, chat's `logprobs` + `top_logprobs`), a grammar
read from several request fields (`structured`), and beam search's non-scalars
(`_beam_values`)."""


def _beam_values(body: dict, model: ModelInfo) -> dict[str, Any]:
    """Beam search's fields that are not plain scalars: `early_stopping` (true, false or
    "never", as transformers and vLLM take it), the item trie by name (`item_trie`) or
    inline (`allowed_items`, arrays of token ids of the vocabulary)."""
    early = body.get("early_stopping", False)
    if early is None:
        early = False
    if not (isinstance(early, bool) or early == "never"):
        raise invalid('`early_stopping` must be true, false or "never"', "early_stopping")
    items = json_field(body, "allowed_items", "an array", None)
    if items is not None:
        if not all(isinstance(item, list) for item in items):
            raise invalid("`allowed_items` must be an array of token id arrays", "allowed_items")
        items = [token_ids(item, model, "allowed_items") for item in items]
    item_trie = json_field(body, "item_trie", "a string", None)
    return {"early_stopping": early, "item_trie": item_trie, "allowed_items": items}


_JSON_KINDS = {int: "an integer", float: "a number", bool: "a boolean"}


def _scalar_field_kinds() -> dict[str, tuple[str, Any]]:
    """Every `SamplingParams` field but `_READ_APART`: name -> (its `json_field` kind, its
    default). A field of another type fails here, at import: it needs a rule of its own."""
    hints = typing.get_type_hints(SamplingParams)
    fields = {}
    for f in dataclasses.fields(SamplingParams):
        if f.name not in _READ_APART:
            # `int | None` (seed) reads as an integer; null already means the default.
            types = typing.get_args(hints[f.name]) or (hints[f.name],)
            scalar = next(t for t in types if t is not type(None))
            fields[f.name] = (_JSON_KINDS[scalar], f.default)
    return fields


_SCALAR_FIELDS = _scalar_field_kinds()
_SAMPLING_FIELDS = frozenset(f.name for f in dataclasses.fields(SamplingParams)) | {"top_logprobs"}


def token_ids(value: list, model: ModelInfo, param: str) -> list[int]:
    """`value` if it is a list of token ids of the model's vocabulary."""
    for t in value:
        if isinstance(t, bool) or not isinstance(t, int):
            raise invalid(f"`{param}` must be an array of integers (token ids)", param)
        if not 0 <= t < model.vocab_size:
            raise invalid(f"token id {t} in `{param}` is outside [0, {model.vocab_size})", param)
    return list(value)


def _stop_strings(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise invalid("`stop` must be a string or an array of strings", "stop")
    return tuple(s for s in stop if s)


def _completion_prompt(body: dict, model: ModelInfo) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    add_special = json_field(body, "add_special_tokens", "a boolean", True)
    if isinstance(prompt, str):
        return model.tokenizer.encode(prompt, add_special_tokens=add_special)
    if isinstance(prompt, list) and all(isinstance(p, int) for p in prompt):
        return token_ids(prompt, model, "prompt")
    if isinstance(prompt, list) and all(isinstance(p, (str, list)) for p in prompt):
        raise invalid(
            f"batched prompts ({len(prompt)} in one request) are not supported; "
            "send one request per prompt",
            "prompt",
        )
    raise invalid("`prompt` must be a string or an array of token ids", "prompt")


def chat_prompt(
    body: dict, model: ModelInfo, tools: list | None = None, images: list[ImageData] | None = None
) -> list[int]:
    """The chat template applied to `messages` (and `tools`, as HF templates take them),
    tokenized; with `images`, each image's placeholder repeated to its token count."""
    messages = json_field(body, "messages", "an array")
    if not messages:
        raise invalid("`messages` must be a non-empty array", "messages")
    kwargs = json_field(body, "chat_template_kwargs", "an object", {})
    if tools is not None:
        kwargs = {"tools": tools, **kwargs}
    add_generation_prompt = json_field(body, "add_generation_prompt", "a boolean", True)
    add_special = json_field(body, "add_special_tokens", "a boolean", False)
    tokenizer = model.tokenizer
    try:
        text = tokenizer.apply_chat_template(
            [_message(m, i, bool(images)) for i, m in enumerate(messages)],
            add_generation_prompt=add_generation_prompt,
            **kwargs,
        )
    except (ValueError, TypeError, TemplateError) as e:
        raise invalid(f"cannot apply the chat template: {e}", "messages") from None
    prompt = tokenizer.encode(text, add_special_tokens=add_special)
    return expand_image_placeholders(prompt, model, images) if images else prompt


def expand_image_placeholders(
    prompt: list[int], model: ModelInfo, images: list[ImageData]
) -> list[int]:
    """Each image's one placeholder (as the chat template renders it) -> `num_tokens` of
    them, so the context check and the usage count image tokens."""
    pad = model.image_token_id
    if prompt.count(pad) != len(images):
        raise invalid(
            f"the chat template rendered {prompt.count(pad)} image placeholders for "
            f"{len(images)} images",
            "messages",
        )
    counts = iter(image.num_tokens for image in images)
    return [t for token in prompt for t in ([token] * next(counts) if token == pad else [token])]


def placed_images(prompt: list[int], model: ModelInfo, images: list[ImageData]) -> list[ImageData]:
    """`images` with the `offset` of each one's run of placeholders in the expanded `prompt`
    (the runs are in the images' order, each `num_tokens` long)."""
    placed, start = [], 0
    for image in images:
        start = prompt.index(model.image_token_id, start)
        placed.append(dataclasses.replace(image, offset=start))
        start += image.num_tokens
    return placed


def _message(message: Any, i: int, with_images: bool = False) -> dict:
    param = f"messages[{i}]"
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise invalid(f"{param} must be an object with a string `role`", param)
    content = message.get("content")
    if content is None or isinstance(content, str):
        return message
    if not isinstance(content, list):
        raise invalid(f"{param}.content must be a string or an array of parts", param)
    texts, parts = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image_url" and with_images:  # read by images.load_images
            parts.append({"type": "image_url"})  # the template renders its placeholder
            continue
        if kind != "text":
            allowed = "text and image_url" if with_images else "text"
            raise invalid(f"{param}: only {allowed} content parts are supported", param)
        if not isinstance(part.get("text"), str):
            raise invalid(f"{param}: a text part needs a string `text`", param)
        texts.append(part["text"])
        parts.append({"type": "text", "text": part["text"]})
    if len(parts) > len(texts):  # images: the template places them among the text
        return message | {"content": parts}
    return message | {"content": "".join(texts)}


def _unsupported(body: dict, **neutral: Any) -> None:
    """Reject fields the gateway cannot honour unless they hold their neutral value."""
    for name, value in neutral.items():
        if body.get(name) not in (None, value):
            raise invalid(f"`{name}` is not supported by this server", name)


def _json_type(value: Any) -> str:
    names = {str: "a string", list: "an array", dict: "an object", float: "a number"}
    return names.get(type(value), "an integer" if isinstance(value, int) else type(value).__name__)

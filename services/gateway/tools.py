"""Tool calling on /v1/chat/completions, on top of structured output.

`tools` (OpenAI function tools) go to the chat template; `tool_choice` decides what the
output may be:

    "none"                       free text; tools are only shown to the model
    "required"                   a JSON array of calls, `[{"name": ..., "parameters": {...}}]`,
                                 each call following its tool's parameters schema (vLLM's form)
    {"type": "function", "function": {"name": n}}   the arguments object of tool n
    "auto" (the default)         NOTE: treated as "required". Telling a call from prose needs
                                 the model's own tool-call syntax (a per-model parser, which
                                 vLLM has and we do not); forcing the call is what we can do
                                 exactly.

The answer carries OpenAI's `message.tool_calls` (id, type "function", function {name,
arguments as JSON text}) and finish_reason "tool_calls"; an output cut by max_tokens is
not a call, and is returned as plain content with finish_reason "length".
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from services.gateway.errors import invalid
from services.gateway.structured import checked
from xllm.protocol import StructuredKind, StructuredOutput

_ANY_OBJECT: dict = {"type": "object"}


@dataclass(frozen=True, slots=True)
class ToolCalling:
    """How to read a completion as tool calls."""

    function: str | None
    """The forced function, whose arguments are the whole output; None = an array of calls."""

    def calls(self, text: str) -> list[dict] | None:
        """OpenAI `tool_calls` of the output `text`; None if it is not a complete call."""
        try:
            value = json.loads(text)
            if self.function is not None:
                return [_call(self.function, value)]
            return [_call(call["name"], call["parameters"]) for call in value]
        except (json.JSONDecodeError, KeyError, TypeError):  # cut short by max_tokens
            return None


def tool_calling(body: dict) -> tuple[ToolCalling | None, StructuredOutput | None, list | None]:
    """(how to read the output, its constraint, the tools for the chat template) of a chat
    body; (None, None, tools) when the output is free text."""
    tools = body.get("tools")
    if tools is None:
        if body.get("tool_choice") not in (None, "none"):
            raise invalid("`tool_choice` needs `tools`", "tool_choice")
        return None, None, None
    schemas = _tool_schemas(tools)
    choice = body.get("tool_choice", "auto")
    if choice == "none":
        return None, None, tools
    if choice in ("auto", "required"):
        schema = _calls_schema(schemas)
        return ToolCalling(None), _constraint(schema), tools
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(name, str) or choice.get("type") != "function":
        raise invalid(
            '`tool_choice` must be "none", "auto", "required" or '
            '{"type": "function", "function": {"name": ...}}',
            "tool_choice",
        )
    if name not in schemas:
        raise invalid(f"`tool_choice` names {name!r}, which is not in `tools`", "tool_choice")
    return ToolCalling(name), _constraint(schemas[name]), tools


def _tool_schemas(tools: Any) -> dict[str, dict]:
    """Each function tool's name → its parameters schema."""
    if not isinstance(tools, list) or not tools:
        raise invalid("`tools` must be a non-empty array of function tools", "tools")
    schemas = {}
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or tool.get("type") != "function":
            raise invalid(
                f'tools[{i}] must be {{"type": "function", "function": {{...}}}}', "tools"
            )
        name, parameters = function.get("name"), function.get("parameters", _ANY_OBJECT)
        if not isinstance(name, str) or not name:
            raise invalid(f"tools[{i}].function needs a string `name`", "tools")
        if not isinstance(parameters, dict):
            raise invalid(f"tools[{i}].function.parameters must be a JSON schema", "tools")
        schemas[name] = parameters
    return schemas


def _calls_schema(schemas: dict[str, dict]) -> dict:
    """A non-empty array of {"name": one tool, "parameters": that tool's arguments}."""
    calls = [
        {
            "type": "object",
            "properties": {"name": {"enum": [name]}, "parameters": parameters},
            "required": ["name", "parameters"],
        }
        for name, parameters in schemas.items()
    ]
    return {"type": "array", "minItems": 1, "items": {"anyOf": calls}}


def _constraint(schema: dict) -> StructuredOutput:
    spec = json.dumps(schema, ensure_ascii=False)
    return checked(StructuredOutput(kind=StructuredKind.JSON, spec=spec), "tools")


def _call(name: str, arguments: Any) -> dict:
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)},
    }

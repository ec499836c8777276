"""Constrained decoding: response_format and tools turned into llama.cpp grammars, and tool calls parsed back."""
from __future__ import annotations

import dataclasses
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from polargrid import errors as sdk_errors
from polargrid.types import ChatTool, ResponseFormat, ToolCall, ToolCallFunction

from ..errors import invalid
from ..limits import DEFAULT_LIMITS, Limits
from .schemas import OutputSchema, check_schema, to_gbnf

# Free text for tool_choice "auto": anything that does not open a JSON object.
_FREE_TEXT_GBNF = r'''free-text ::= [^{ \t\n] [^\x00]*'''
_ANY_OBJECT = {"type": "object"}
_TAGGED_GBNF = r'''tagged-call ::= "<tool_call>\n" tool-call "\n</tool_call>"'''


@dataclass(frozen=True, eq=False)
class Grammar:
    """What a constrained request's output must be: a JSON document fitting ``schema`` (any object when
    None), or, with ``free_text``, either that or text that does not open a JSON object (tool_choice auto).

    The schema is checked against the limits when the request is planned; the llama.cpp grammar (``gbnf``)
    is made on first use, on the model's worker, so planning a request needs no llama.cpp (a fake engine
    reads ``schema`` instead).
    """

    schema: dict[str, Any] | None
    what: str = "response_format"
    free_text: bool = False
    tagged: bool = False  # one or more calls, each inside <tool_call> tags (tool_dialects.py)
    limits: Limits = DEFAULT_LIMITS
    _gbnf: list[str] = field(default_factory=list, repr=False)

    @property
    def gbnf(self) -> str:
        if not self._gbnf:
            self._gbnf.append(self._convert())
        return self._gbnf[0]

    def _convert(self) -> str:
        grammar = to_gbnf(self.schema if self.schema is not None else _ANY_OBJECT, self.what, self.limits)
        if not (self.free_text or self.tagged):
            return grammar
        grammar = re.sub(r"^root ::=", "tool-call ::=", grammar, count=1, flags=re.M)
        if self.tagged:  # Qwen writes a newline after a call even when none follows: one more is not required there
            return f"root ::= tagged-call (\"\\n\" tagged-call)* \"\\n\"?\n{_TAGGED_GBNF}\n{grammar}\n"
        return f"root ::= tool-call | free-text\n{grammar}\n{_FREE_TEXT_GBNF}\n"


@dataclass
class ToolDialect:
    """Which tool-call dialect one request's model speaks: decided on the model's worker, where its template
    is known, before the first token (tool_dialects.bind_dialect); read by the request's chunker."""

    hermes: bool = False  # the template's own <tool_call> tags; False: our JSON object and system prompt


@dataclass(frozen=True)
class ToolPlan:
    """How a request with tools is decoded: an extra system prompt and a grammar (the JSON-object dialect),
    or the tools handed to a template that has its own (``dialect``, set on the model's worker)."""

    system_prompt: str
    grammar: Grammar
    required: bool
    arguments: dict[str, OutputSchema]  # by function name: what a call's arguments must satisfy
    offered: list[ChatTool] = field(default_factory=list)  # every tool of the request, for the template
    dialect: ToolDialect = field(default_factory=ToolDialect)


def response_format_grammar(response_format: ResponseFormat | None, limits: Limits = DEFAULT_LIMITS
                            ) -> tuple[Grammar, OutputSchema] | None:
    """Grammar and output schema for response_format: text -> None, json_object -> any object,
    json_schema -> that schema (checked against the limits now)."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return Grammar(None, "response_format", limits=limits), OutputSchema(_ANY_OBJECT, "response_format")
    spec = response_format.json_schema
    if not spec:
        raise invalid("response_format.json_schema is required when type is 'json_schema'",
                      field="response_format.json_schema")
    schema = spec.get("schema", spec if "type" in spec or "properties" in spec else None)
    if schema is None:
        raise invalid("response_format.json_schema must hold a 'schema' object", field="response_format.json_schema")
    output = OutputSchema(schema, "response_format.json_schema.schema")
    check_schema(schema, output.field, limits)
    return Grammar(schema, output.field, limits=limits), output


def plan_tools(tools: list[ChatTool] | None, tool_choice: Any, limits: Limits = DEFAULT_LIMITS) -> ToolPlan | None:
    """Decide how tools constrain this request; None when tools are absent or tool_choice is 'none'."""
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise invalid("tool_choice was given without tools")
        return None
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise invalid("tools have duplicate function names")
    for tool in tools:
        if not re.fullmatch(r"[A-Za-z0-9_\-]{1,64}", tool.function.name):
            raise invalid(f"tool name {tool.function.name!r} must be 1-64 letters, digits, '_' or '-'")
    choice = tool_choice if tool_choice is not None else "auto"
    if choice == "none":
        return None
    chosen = tools
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if choice.get("type", "function") == "function" else None
        if not name:
            raise invalid("tool_choice object must read {'type': 'function', 'function': {'name': ...}}")
        chosen = [t for t in tools if t.function.name == name]
        if not chosen:
            raise invalid(f"tool_choice names {name!r}, which is not among the tools ({', '.join(names)})")
    elif choice not in ("auto", "required"):
        raise invalid("tool_choice must be 'none', 'auto', 'required' or "
                      "{'type': 'function', 'function': {'name': ...}}")
    arguments = {t.function.name: _arguments_schema(t, tools.index(t), limits) for t in chosen}
    call_schema = {"anyOf": [_call_schema(t) for t in chosen]} if len(chosen) > 1 else _call_schema(chosen[0])
    call_limits = dataclasses.replace(
        limits, schema_max_depth=limits.schema_max_depth + 2,
        schema_max_bytes=limits.schema_max_bytes * len(chosen) + 1024,
        schema_max_properties=limits.schema_max_properties * len(chosen) + 2 * len(chosen),
        schema_max_enum=limits.schema_max_enum * len(chosen))
    check_schema(call_schema, "tools", call_limits)
    required = choice != "auto"
    grammar = Grammar(call_schema, "tools", free_text=not required, limits=call_limits)
    return ToolPlan(system_prompt=_tool_prompt(chosen, required), grammar=grammar, required=required,
                    arguments=arguments, offered=list(tools))


def _arguments_schema(tool: ChatTool, index: int, limits: Limits) -> OutputSchema:
    """A tool's parameters, checked (limits, meta-schema) on their own, so errors name the tool."""
    field = f"tools[{index}].function.parameters"
    params = tool.function.parameters or {"type": "object", "properties": {}}
    if not isinstance(params, dict) or params.get("type", "object") != "object":
        raise invalid(f"tool {tool.function.name!r}: parameters must be a JSON schema of type 'object'", field=field)
    try:
        check_schema(params, field, limits)
    except sdk_errors.ValidationError as exc:
        raise invalid(f"tool {tool.function.name!r}: {exc.message}", **(exc.details or {})) from None
    return OutputSchema(params, field)


def _call_schema(tool: ChatTool) -> dict[str, Any]:
    params = tool.function.parameters or {"type": "object", "properties": {}}
    return {"type": "object", "properties": {"name": {"const": tool.function.name}, "arguments": params},
            "required": ["name", "arguments"]}


def _tool_prompt(tools: list[ChatTool], required: bool) -> str:
    listing = "\n".join(json.dumps(t.function.model_dump(exclude_none=True)) for t in tools)
    how = ("Answer by calling one of these functions." if required else
           "If a function helps answer, call it; otherwise answer normally.")
    return (f"You can call functions. {how} To call a function, reply with only a JSON object "
            f'{{"name": <function name>, "arguments": <arguments object>}}.\nFunctions:\n{listing}')


def parse_tool_call(text: str, tools: list[ChatTool]) -> list[ToolCall] | None:
    """The tool call in the model's output, or None when the output is plain text."""
    stripped = text.strip()
    if not stripped.startswith("{"):
        return None
    try:
        data = json.loads(stripped)
    except json.JSONDecodeError:
        return None
    names = {t.function.name for t in tools}
    if not isinstance(data, dict) or data.get("name") not in names:
        return None
    arguments = data.get("arguments", {})
    return [ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", type="function",
                     function=ToolCallFunction(name=data["name"], arguments=json.dumps(arguments)))]

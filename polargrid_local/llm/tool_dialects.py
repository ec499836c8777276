"""Tool calls in a model's own dialect: Hermes-style ``<tool_call>`` tags (Qwen 2.5 and others).

A model whose chat template writes the tool list itself and tells the model to answer with
``<tool_call>{"name": ..., "arguments": ...}</tool_call>`` gets its tools through the template, not through
our system prompt. With tool_choice ``auto`` it decodes freely (a grammar here would cost time on every
token and, measured on Qwen2.5-Coder, gives worse calls); with ``required`` or a named function it decodes
under a grammar that writes the native tags, one or more calls. Models without such a template keep the
JSON-object dialect of constraints.py.

What Qwen2.5-Coder writes without a grammar is not always the tagged form: it often answers with the bare
call object, or the object in a ```json fence. A reply made only of such call objects is read as calls
too; any other JSON is text.
"""
from __future__ import annotations

import dataclasses
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from polargrid.types import ChatTool, ToolCall, ToolCallFunction

from .schemas import OutputSchema

if TYPE_CHECKING:
    from .constraints import ToolPlan
    from .generation import SamplingParams

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + r"(.*?)(?:" + re.escape(CLOSE) + r"|$)", re.S)
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*(?:```)?$", re.S)


def speaks_hermes(template: str | None) -> bool:
    """Whether a chat template lists the tools itself and asks for ``<tool_call>`` tags."""
    return template is not None and OPEN in template and "tools" in template


@dataclass
class CallWatcher:
    """Streams text that is not a tool call and holds back what is (or may become) one.

    ``feed`` returns the text safe to show now; ``held`` is what was held back when generation ends. With
    ``required`` everything is held (the grammar makes the whole output calls).
    """

    required: bool
    held: str = ""
    _state: str = "lead"  # lead: nothing shown yet; text: streaming; call: holding to the end
    _tail: str = field(default="", repr=False)

    def feed(self, text: str) -> str:
        if self.required or self._state == "call":
            self.held += text
            return ""
        if self._state == "lead":
            self.held += text
            verdict = _lead_verdict(self.held)
            if verdict != "text":
                if verdict == "call":
                    self._state = "call"
                return ""
            self._state, text, self.held = "text", self.held, ""
        return self._scan(text)

    def _scan(self, text: str) -> str:
        """Text mode: show everything up to an opening tag; keep back a tail that may be the tag's start."""
        buffer = self._tail + text
        start = buffer.find(OPEN)
        if start >= 0:
            self._state, self.held, self._tail = "call", buffer[start:], ""
            return buffer[:start]
        keep = next((n for n in range(min(len(OPEN) - 1, len(buffer)), 0, -1) if buffer.endswith(OPEN[:n])), 0)
        self._tail = buffer[len(buffer) - keep:]
        return buffer[:len(buffer) - keep]

    def flush(self) -> str:
        """At the end: the text still kept back while watching for a tag (it did not become one)."""
        tail, self._tail = self._tail, ""
        if self._state == "lead":  # ended while undecided: what was held is text unless it parses as calls
            self._state = "call"
        return tail


def _lead_verdict(text: str) -> str:
    """How a reply that begins with ``text`` reads: "call" (held to the end), "text", or "wait" (undecided)."""
    lead = text.lstrip()
    if not lead:
        return "wait"
    if lead.startswith((OPEN, "{")):
        return "call"
    if OPEN.startswith(lead) or "```".startswith(lead):
        return "wait"
    if lead.startswith("```"):
        rest = lead[3:]
        if "json".startswith(rest):
            return "wait"
        rest = rest[4:].lstrip() if rest.startswith("json") else rest.lstrip()
        if not rest:
            return "wait"
        return "call" if rest.startswith("{") else "text"
    return "text"


@dataclass(frozen=True)
class Parsed:
    """What a held reply holds: calls, text around them, and what is wrong with the calls (None: nothing)."""

    calls: list[ToolCall]
    text: str
    problem: str | None = None


def parse_calls(held: str, tools: list[ChatTool], allowed: dict[str, OutputSchema], required: bool) -> Parsed:
    """The calls in a held reply: tagged blocks, or a reply made only of call objects (bare or fenced)."""
    names = {t.function.name for t in tools}
    if OPEN in held:
        tagged: list[Any] = []
        text = _BLOCK.sub("", held).strip()
        for block in _BLOCK.findall(held):
            try:
                tagged.append(json.loads(block))
            except json.JSONDecodeError as exc:
                return Parsed([], text, f"a <tool_call> block is not complete JSON ({exc})")
        return _checked(tagged, allowed, text, required)
    objects = _call_objects(held, names)
    if objects is None:
        problem = "the output is not a complete call of one of the tools" if required else None
        return Parsed([], held, problem)
    return _checked(objects, allowed, "", required)


def _call_objects(held: str, names: set[str]) -> list[dict[str, Any]] | None:
    """The objects of a reply that is only calls of known tools (whitespace or a ```json fence around
    them), else None."""
    fenced = _FENCE.match(held.strip())
    body = fenced.group(1) if fenced else held.strip()
    decoder, objects, i = json.JSONDecoder(), [], 0
    while i < len(body):
        if body[i].isspace() or body[i] == ",":
            i += 1
            continue
        try:
            value, i = decoder.raw_decode(body, i)
        except json.JSONDecodeError:
            return None
        if not (isinstance(value, dict) and value.get("name") in names):
            return None
        objects.append(value)
    return objects or None


def _checked(objects: list[Any], allowed: dict[str, OutputSchema], text: str, required: bool) -> Parsed:
    calls: list[ToolCall] = []
    for value in objects:
        name = value.get("name") if isinstance(value, dict) else None
        if name not in allowed:
            what = f"it calls {name!r}, which " + ("tool_choice did not allow" if isinstance(name, str) else
                                                   "is not a function name")
            return Parsed([], text, what)
        arguments = value.get("arguments", value.get("parameters", {}))
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                return Parsed([], text, f"the arguments of {name!r} are not JSON")
        problem = allowed[name].problem_with(arguments)
        if problem:
            return Parsed([], text, f"{name}: {problem}")
        calls.append(ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", type="function",
                              function=ToolCallFunction(name=name, arguments=json.dumps(arguments))))
    if not calls and required:
        return Parsed([], text, "the output is not a complete call of one of the tools")
    return Parsed(calls, text)


def bind_dialect(plan: ToolPlan | None, params: SamplingParams, template: str | None
                 ) -> tuple[bool, SamplingParams, list[dict[str, Any]] | None]:
    """On the model's worker: whether its template speaks Hermes, the sampling to use, and the tools to hand
    the template. Records the dialect on the plan, for the chunker."""
    hermes = speaks_hermes(template)
    if plan is not None:
        plan.dialect.hermes = hermes
    if plan is None or not hermes:
        return hermes, params, None
    grammar = dataclasses.replace(plan.grammar, tagged=True, _gbnf=[]) if plan.required else None
    return True, dataclasses.replace(params, grammar=grammar), [t.model_dump(exclude_none=True) for t in plan.offered]

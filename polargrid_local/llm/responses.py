"""OpenAI's Responses API, translated onto the chat completion stream (so it batches with every other request).

A Responses request becomes one chat completion request (``plan_response``); the chat chunks that come back
become the Responses event stream (``ResponseTranslator``): ``response.created``, ``response.in_progress``,
an output item per message or function call with its deltas, then ``response.completed`` (or
``response.incomplete`` when ``max_output_tokens`` cut it). The non-streaming answer is the fold of that stream.

Stateless by choice: every request carries its whole conversation in ``input`` (as Codex CLI and other
``store: false`` clients do), and ``previous_response_id`` or an ``item_reference`` is a 400 that says so.
A server-side store would answer a follow-up only while the entry lived, on this process, until a restart
or eviction made the same request fail; a client that sends its history always works.
"""
from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from polargrid import errors as sdk
from pydantic import BaseModel, ConfigDict

from ..errors import invalid

# Fields clients send that change nothing here: accepted and ignored (echoed where the wire format has them).
IGNORED_FIELDS = frozenset({"store", "metadata", "user", "parallel_tool_calls", "truncation", "include", "reasoning",
                            "service_tier", "prompt_cache_key", "safety_identifier", "stream_options", "background"})
HANDLED_FIELDS = frozenset({"model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "tools",
                            "tool_choice", "text", "stream", "previous_response_id", "seed"})
ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
TEXT_PARTS = ("input_text", "output_text", "text", "summary_text")


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


class ResponseObject(BaseModel):
    """A Responses API ``response``: output items (messages, function calls) and usage, as OpenAI sends them."""

    model_config = ConfigDict(extra="allow")

    id: str
    object: str = "response"
    created_at: int
    status: str
    model: str
    output: list[dict[str, Any]] = []
    usage: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    incomplete_details: dict[str, Any] | None = None

    @property
    def output_text(self) -> str:
        """Every output_text part of every message, joined (as the openai client's property)."""
        return "".join(part.get("text", "") for item in self.output if item.get("type") == "message"
                       for part in item.get("content", []) if part.get("type") == "output_text")


class ResponseEvent(BaseModel):
    """One server-sent event of a streamed response: ``type``, ``sequence_number`` and the type's own fields."""

    model_config = ConfigDict(extra="allow")

    type: str
    sequence_number: int


@dataclass
class ResponsePlan:
    """A checked Responses request: the chat completion request it runs as, and what the response echoes."""

    chat: dict[str, Any]
    echo: dict[str, Any] = field(default_factory=dict)
    stream: bool = False


def _field(body: dict[str, Any], name: str, kinds: tuple[type, ...], what: str) -> Any:
    value = body.get(name)
    if value is not None and (not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool))):
        raise invalid(f"{name} must be {what}", field=name)
    return value


def plan_response(body: dict[str, Any]) -> ResponsePlan:
    """Check a Responses request (a dict, as sent over HTTP) and translate it into a chat completion request."""
    if not isinstance(body, dict):
        raise invalid("a Responses request must be an object")
    unknown = sorted(set(body) - HANDLED_FIELDS - IGNORED_FIELDS)
    if unknown:
        raise invalid(f"unknown parameter(s) for /v1/responses: {', '.join(unknown)}", field=unknown[0])
    if body.get("previous_response_id") is not None:
        raise invalid("previous_response_id is not supported: this server keeps no responses (it is stateless); "
                      "send the whole conversation in input, with the earlier output items",
                      field="previous_response_id")
    if body.get("background"):
        raise invalid("background responses are not supported; leave background false", field="background")
    model = _field(body, "model", (str,), "a string naming the model")
    if not model:
        raise invalid("model is required", field="model")
    stream = _field(body, "stream", (bool,), "a boolean") or False
    max_output = _field(body, "max_output_tokens", (int,), "a positive integer")
    if max_output is not None and max_output < 1:
        raise invalid("max_output_tokens must be a positive integer", field="max_output_tokens")
    instructions = _field(body, "instructions", (str,), "a string")
    messages = ([{"role": "system", "content": instructions}] if instructions else []) + _messages(body.get("input"))
    chat: dict[str, Any] = {"model": model, "messages": messages}
    for name, target in (("max_output_tokens", "max_tokens"), ("temperature", "temperature"), ("top_p", "top_p"),
                         ("seed", "seed")):
        if body.get(name) is not None:
            chat[target] = body[name]
    tools = _tools(body.get("tools"))
    if tools:
        chat["tools"] = tools
    if body.get("tool_choice") is not None:
        chat["tool_choice"] = _tool_choice(body["tool_choice"])
    text = _field(body, "text", (dict,), "an object like {'format': {'type': 'json_schema', ...}}") or {}
    response_format = _format(text.get("format"))
    if response_format is not None:
        chat["response_format"] = response_format
    echo = {"instructions": instructions, "max_output_tokens": max_output, "temperature": body.get("temperature"),
            "top_p": body.get("top_p"), "tools": body.get("tools") or [],
            "tool_choice": body.get("tool_choice", "auto"), "text": {"format": text.get("format") or {"type": "text"}},
            "parallel_tool_calls": body.get("parallel_tool_calls", True), "store": False,
            "metadata": body.get("metadata") or {}, "previous_response_id": None,
            "truncation": body.get("truncation", "disabled")}
    return ResponsePlan(chat, echo, stream)


def _messages(items: Any) -> list[dict[str, Any]]:
    if isinstance(items, str):
        if not items:
            raise invalid("input must not be empty", field="input")
        return [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise invalid("input must be a string or a non-empty list of input items", field="input")
    out: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise invalid(f"{where} must be an object", field=where)
        kind = item.get("type", "message")
        if kind == "message":
            role = ROLES.get(str(item.get("role")))
            if role is None:
                raise invalid(f"{where}.role must be one of {', '.join(ROLES)}", field=f"{where}.role")
            out.append({"role": role, "content": _text(item.get("content"), where)})
        elif kind == "function_call":
            call = {"id": _string(item, "call_id", where), "type": "function",
                    "function": {"name": _string(item, "name", where), "arguments": _string(item, "arguments", where)}}
            if out and out[-1]["role"] == "assistant" and out[-1].get("tool_calls"):
                out[-1]["tool_calls"].append(call)  # parallel calls of one turn: one assistant message
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            text = output if isinstance(output, str) else _text(output, where)
            out.append({"role": "tool", "tool_call_id": _string(item, "call_id", where), "content": text})
        elif kind == "reasoning":
            continue  # a reasoning model's notes from another server: nothing this model can read
        elif kind == "item_reference":
            raise invalid(f"{where} is an item_reference, but this server keeps no items (it is stateless); "
                          "send the item itself", field=where)
        else:
            raise invalid(f"{where} has type {kind!r}; this server reads message, function_call and "
                          "function_call_output items", field=f"{where}.type")
    return out


def _string(item: dict[str, Any], name: str, where: str) -> str:
    value = item.get(name)
    if not isinstance(value, str) or (name != "arguments" and not value):
        raise invalid(f"{where}.{name} must be a non-empty string", field=f"{where}.{name}")
    return value


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid(f"{where}.content must be a string or a list of content parts", field=f"{where}.content")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in TEXT_PARTS and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind in ("input_image", "input_file", "input_audio"):
            raise invalid(f"{where}.content[{j}] is {kind}, but this server's models read text only; "
                          "send input_text parts", field=f"{where}.content[{j}]")
        else:
            raise invalid(f"{where}.content[{j}] must be an input_text part with a text string",
                          field=f"{where}.content[{j}]")
    return "".join(texts)


def _tools(tools: Any) -> list[dict[str, Any]]:
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise invalid("tools must be a list of function tools", field="tools")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("name"), str):
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise invalid(f"tools[{i}] must be a function tool {{'type': 'function', 'name': ..., 'parameters': ...}}"
                          + (f"; built-in tools such as {kind!r} are not served locally" if kind else ""),
                          field=f"tools[{i}]")
        function = {"name": tool["name"], "parameters": tool.get("parameters") or {"type": "object", "properties": {}}}
        if tool.get("description"):
            function["description"] = tool["description"]
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice: Any) -> Any:
    if choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise invalid("tool_choice must be 'auto', 'none', 'required' or {'type': 'function', 'name': ...}",
                  field="tool_choice")


def _format(fmt: Any) -> dict[str, Any] | None:
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        if not isinstance(fmt.get("schema"), dict):
            raise invalid("text.format of type json_schema needs a schema object", field="text.format.schema")
        schema = {"name": fmt.get("name") or "response", "schema": fmt["schema"]}
        if fmt.get("strict") is not None:
            schema["strict"] = fmt["strict"]
        return {"type": "json_schema", "json_schema": schema}
    raise invalid("text.format.type must be 'text', 'json_object' or 'json_schema'", field="text.format")


class ResponseTranslator:
    """Chat completion chunks in, Responses events out; a state machine, so sync and async readers share it."""

    def __init__(self, model: str, echo: dict[str, Any]) -> None:
        self.id = _new_id("resp")
        self.created_at = int(time.time())
        self.model = model
        self.echo = echo
        self.output: list[dict[str, Any]] = []
        self.usage: dict[str, Any] | None = None
        self.finish: str | None = None
        self.response: ResponseObject | None = None   # the final response, once the stream has ended
        self._sequence = 0
        self._message: dict[str, Any] | None = None    # the message item being written

    def _event(self, kind: str, **fields: Any) -> ResponseEvent:
        event = ResponseEvent(type=kind, sequence_number=self._sequence, **fields)
        self._sequence += 1
        return event

    def snapshot(self, status: str, **extra: Any) -> ResponseObject:
        return ResponseObject(id=self.id, created_at=self.created_at, status=status, model=self.model,
                              output=json.loads(json.dumps(self.output)), usage=self.usage, **self.echo, **extra)

    def start(self) -> list[ResponseEvent]:
        created = self.snapshot("in_progress").model_dump(mode="json")
        return [self._event("response.created", response=created),
                self._event("response.in_progress", response=created)]

    def feed(self, chunk: Any) -> list[ResponseEvent]:
        events: list[ResponseEvent] = []
        if getattr(chunk, "usage", None) is not None:
            u = chunk.usage
            self.usage = {"input_tokens": u.prompt_tokens, "output_tokens": u.completion_tokens,
                          "total_tokens": u.total_tokens, "input_tokens_details": {"cached_tokens": 0},
                          "output_tokens_details": {"reasoning_tokens": 0}}
        for choice in chunk.choices:
            delta = choice.delta
            if delta.content:
                events += self._text(delta.content)
            for call in delta.tool_calls or []:
                events += self._close_message() + self._call(call)
            if choice.finish_reason:
                self.finish = choice.finish_reason
        return events

    def _text(self, text: str) -> list[ResponseEvent]:
        events = []
        index = len(self.output) - 1
        if self._message is None:
            self._message = {"id": _new_id("msg"), "type": "message", "status": "in_progress", "role": "assistant",
                             "content": []}
            self.output.append(self._message)
            index = len(self.output) - 1
            events.append(self._event("response.output_item.added", output_index=index,
                                      item={**self._message, "content": []}))
            self._message["content"].append({"type": "output_text", "text": "", "annotations": [], "logprobs": []})
            events.append(self._event("response.content_part.added", item_id=self._message["id"], output_index=index,
                                      content_index=0, part={"type": "output_text", "text": "", "annotations": []}))
        self._message["content"][0]["text"] += text
        events.append(self._event("response.output_text.delta", item_id=self._message["id"], output_index=index,
                                  content_index=0, delta=text, logprobs=[]))
        return events

    def _close_message(self) -> list[ResponseEvent]:
        message, self._message = self._message, None
        if message is None:
            return []
        index = self.output.index(message)
        part = message["content"][0]
        message["status"] = "completed"
        return [self._event("response.output_text.done", item_id=message["id"], output_index=index, content_index=0,
                            text=part["text"], logprobs=[]),
                self._event("response.content_part.done", item_id=message["id"], output_index=index,
                            content_index=0, part=dict(part)),
                self._event("response.output_item.done", output_index=index, item=json.loads(json.dumps(message)))]

    def _call(self, call: Any) -> list[ResponseEvent]:
        function = call.function or {}
        item = {"id": _new_id("fc"), "type": "function_call", "status": "in_progress", "call_id": call.id,
                "name": function.get("name", ""), "arguments": ""}
        arguments = function.get("arguments", "")
        self.output.append(item)
        index = len(self.output) - 1
        events = [self._event("response.output_item.added", output_index=index, item=dict(item)),
                  self._event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                              delta=arguments)]
        item.update(arguments=arguments, status="completed")
        return events + [self._event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                                     name=item["name"], arguments=arguments),
                         self._event("response.output_item.done", output_index=index, item=dict(item))]

    def end(self) -> list[ResponseEvent]:
        events = self._close_message()
        if self.finish == "length":
            self.response = self.snapshot("incomplete", incomplete_details={"reason": "max_output_tokens"})
            return events + [self._event("response.incomplete", response=self.response.model_dump(mode="json"))]
        self.response = self.snapshot("completed")
        return events + [self._event("response.completed", response=self.response.model_dump(mode="json"))]

    def fail(self, exc: sdk.PolarGridError, code: str) -> list[ResponseEvent]:
        """After streaming began: an ``error`` event, then ``response.failed`` with the same error."""
        self._message = None
        error = {"code": code, "message": exc.message}
        self.response = self.snapshot("failed", error=error)
        return [self._event("error", code=code, message=exc.message, param=None),
                self._event("response.failed", response=self.response.model_dump(mode="json"))]


class ResponseStream:
    """A response's events as the chat stream produces them; iterate it (sync or async), close it to stop.

    The chat stream's first chunk is read before ``response.created``, so a request the model refuses
    (context window, template) fails before any event, as the chat routes do before their 200.
    """

    def __init__(self, chat_stream: Any, plan: ResponsePlan) -> None:
        self.chat = chat_stream
        self.streaming = plan.stream   # what the request asked for (``stream: true``)
        self.translator = ResponseTranslator(plan.chat["model"], plan.echo)
        self._pending: list[ResponseEvent] = []
        self._started = False
        self._ended = False

    @property
    def response(self) -> ResponseObject | None:
        """The final response once the stream has ended (completed, incomplete or failed)."""
        return self.translator.response

    def _after(self, chunk: Any) -> None:
        if not self._started:
            self._started = True
            self._pending += self.translator.start()
        if chunk is not None:
            self._pending += self.translator.feed(chunk)
        else:
            self._ended = True
            self._pending += self.translator.end()

    def __iter__(self) -> Iterator[ResponseEvent]:
        return self

    def __next__(self) -> ResponseEvent:
        while not self._pending:
            if self._ended:
                raise StopIteration
            self._after(next(self.chat, None))
        return self._pending.pop(0)

    def __aiter__(self) -> ResponseStream:
        return self

    async def __anext__(self) -> ResponseEvent:
        while not self._pending:
            if self._ended:
                raise StopAsyncIteration
            try:
                chunk = await self.chat.__anext__()
            except StopAsyncIteration:
                chunk = None
            self._after(chunk)
        return self._pending.pop(0)

    def close(self) -> None:
        """Stop reading; the model stops generating for this request."""
        self.chat.close()

    def __enter__(self) -> ResponseStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_response(engine: Any, request: dict[str, Any]) -> ResponseStream:
    """Open a Responses request on ``engine``'s chat completion stream (usage included for the final event)."""
    plan = plan_response(dict(request))
    return ResponseStream(engine.chat_completion_stream(plan.chat, stream_options={"include_usage": True}), plan)


def fold_response(stream: ResponseStream) -> ResponseObject:
    """The non-streaming response: the fold of its stream (read to the end, then the final response)."""
    with stream:
        for _ in stream:
            pass
    if stream.response is None:
        raise sdk.ServerError("the response stream ended without a final response", 500)
    return stream.response

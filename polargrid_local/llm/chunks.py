"""Worker events to SDK chunks (the stream), and chunks folded into one response (the non-stream call)."""
from __future__ import annotations

import time
from collections.abc import Iterable

from polargrid.types import (
    ChatCompletionChoice,
    ChatCompletionChunkChoice,
    ChatDelta,
    ChatMessage,
    ChatTool,
    CompletionChoice,
    CompletionChunkChoice,
    PGMetadata,
    ToolCall,
    ToolCallDelta,
    ToolCallFunction,
)

from ..types import (
    ChatCompletionChunk,
    ChatCompletionResponse,
    CompletionChunk,
    CompletionResponse,
    CompletionTokensDetails,
    PromptTokensDetails,
    TokenUsage,
    new_id,
)
from ..types import PGMetadata as LocalMetadata
from .constraints import ToolPlan, parse_tool_call
from .generation import Started, TextDelta
from .schemas import OutputSchema
from .tool_dialects import CallWatcher, parse_calls


def local_usage(prompt: int, completion: int, cached: int, drafted: int, accepted: int) -> TokenUsage:
    """A local generation's usage: the prompt's details count its tokens the prompt cache supplied, the
    completion's the drafted tokens kept and dropped (speculative decoding)."""
    details = CompletionTokensDetails(accepted_prediction_tokens=accepted,
                                      rejected_prediction_tokens=drafted - accepted)
    return TokenUsage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                      prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
                      completion_tokens_details=details)


class ChatChunker:
    """Turns one chat job's events into ChatCompletionChunks, holding back text that is becoming a tool call.

    Constrained output (response_format, tool calls) is validated against its schema when it ends: one that
    stopped complete but does not satisfy the schema ends the stream with a ValidationError instead of a
    finish chunk; one cut by max_tokens ends with finish_reason "length", as OpenAI's does (incomplete).
    """

    def __init__(self, model: str, tools: list[ChatTool] | None, plan: ToolPlan | None, include_usage: bool,
                 output: OutputSchema | None = None) -> None:
        self.id = new_id("chatcmpl")
        self.created = int(time.time())
        self.model = model
        self.tools = tools or []
        self.plan = plan
        self.include_usage = include_usage
        self.usage: TokenUsage | None = None
        self._prompt_tokens = 0
        self.cached_tokens = 0
        self.cache: str | None = None   # where the cached part of the prompt came from: "memory" or "disk"
        self._held = ""
        self._holding = plan is not None
        self._watcher: CallWatcher | None = None  # the model's own tool-call dialect (tool_dialects.py)
        self.output = output
        self._content: list[str] = []

    def _chunk(self, delta: ChatDelta | None, finish: str | None = None,
               usage: TokenUsage | None = None) -> ChatCompletionChunk:
        choices = [] if delta is None else [ChatCompletionChunkChoice(index=0, delta=delta, finish_reason=finish)]
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)

    def feed(self, event: Started | TextDelta) -> list[ChatCompletionChunk]:
        if isinstance(event, Started):
            self._prompt_tokens = event.prompt_tokens
            self.cached_tokens, self.cache = event.cached_tokens, event.cache
            if self.plan is not None and self.plan.dialect.hermes:  # decided on the worker, before this event
                self._watcher, self._holding = CallWatcher(self.plan.required), False
            return [self._chunk(ChatDelta(role="assistant", content=""))]
        out: list[ChatCompletionChunk] = []
        text = event.text
        if self._watcher is not None:
            text = self._watcher.feed(text)
        elif self._holding and text:
            self._held += text
            lead = self._held.lstrip()
            assert self.plan is not None   # only a request with tools holds text back
            if lead and not lead.startswith("{") and not self.plan.required:
                text, self._held, self._holding = self._held, "", False
            else:
                text = ""
        if text:
            self._content.append(text)
            out.append(self._chunk(ChatDelta(content=text)))
        if event.finish_reason is not None:
            out.extend(self._finish(event))
        return out

    def _finish(self, event: TextDelta) -> list[ChatCompletionChunk]:
        out: list[ChatCompletionChunk] = []
        finish = event.finish_reason
        if self.output is not None and finish != "length":
            text = "".join(self._content)
            problem = self.output.problem(text)
            if problem:
                raise self.output.violation(text, problem)
        if self._watcher is not None:
            chunks, called = self._native_calls(finish)
            out.extend(chunks)
            finish = "tool_calls" if called else finish
        elif self._held:
            calls = self._checked_calls(self._held, finish)
            if calls:
                finish = "tool_calls"
                out.append(self._chunk(ChatDelta(tool_calls=_call_deltas(calls))))
            else:
                out.append(self._chunk(ChatDelta(content=self._held)))
            self._held = ""
        out.append(self._chunk(ChatDelta(), finish))
        self.usage = local_usage(self._prompt_tokens, event.completion_tokens, self.cached_tokens, event.drafted,
                                 event.accepted)
        if self.include_usage:
            out.append(self._chunk(None, usage=self.usage))
        return out

    def _native_calls(self, finish: str | None) -> tuple[list[ChatCompletionChunk], bool]:
        """The end of a reply in the model's own dialect: the text kept back, then the calls it holds."""
        assert self._watcher is not None and self.plan is not None  # only a request with tools has a watcher
        tail = self._watcher.flush()
        held = self._watcher.held
        parsed = parse_calls(held, self.tools, self.plan.arguments, self.plan.required)
        if parsed.problem and finish != "length":
            raise OutputSchema({}, "tools").violation(held, parsed.problem)
        text = tail + (parsed.text if parsed.calls else held)
        out = [self._chunk(ChatDelta(content=text))] if text else []
        if parsed.calls:
            out.append(self._chunk(ChatDelta(tool_calls=_call_deltas(parsed.calls))))
        return out, bool(parsed.calls)

    def _checked_calls(self, held: str, finish: str | None) -> list[ToolCall] | None:
        """The call in the held text, its arguments validated; None (text) when max_tokens cut it short."""
        calls = parse_tool_call(held, self.tools)
        assert self.plan is not None
        if calls:
            name = calls[0].function.name
            schema = self.plan.arguments.get(name, OutputSchema({}, "tool_choice"))
            problem = schema.problem(calls[0].function.arguments) if name in self.plan.arguments else (
                f"it calls {name!r}, which tool_choice did not allow")
        elif held.lstrip().startswith("{") or self.plan.required:
            schema, problem = OutputSchema({}, "tools"), "the output is not a complete call of one of the tools"
        else:
            return None
        if problem is None:
            return calls
        if finish == "length":
            return None
        raise schema.violation(held, problem)


def _call_deltas(calls: list[ToolCall]) -> list[ToolCallDelta]:
    return [ToolCallDelta(index=i, id=c.id, type="function",
                          function={"name": c.function.name, "arguments": c.function.arguments})
            for i, c in enumerate(calls)]


def fold_chat(chunks: Iterable[ChatCompletionChunk], usage_of: ChatChunker, metadata: PGMetadata | None = None
              ) -> ChatCompletionResponse:
    """The non-streaming response: every chunk of the stream, joined."""
    content: list[str] = []
    calls: dict[int, ToolCall] = {}
    finish = "stop"
    first = None
    for chunk in chunks:
        first = first or chunk
        for choice in chunk.choices:
            if choice.delta.content:
                content.append(choice.delta.content)
            for call in choice.delta.tool_calls or []:
                fn = call.function or {}
                calls[call.index] = ToolCall(id=call.id or new_id("call"), type="function",
                                             function=ToolCallFunction(name=fn.get("name", ""),
                                                                       arguments=fn.get("arguments", "")))
            if choice.finish_reason:
                finish = choice.finish_reason
    tool_calls = [calls[i] for i in sorted(calls)] or None
    message = ChatMessage(role="assistant", content=None if tool_calls and not content else "".join(content),
                          tool_calls=tool_calls)
    return ChatCompletionResponse(
        id=first.id if first else usage_of.id, created=usage_of.created, model=usage_of.model,
        choices=[ChatCompletionChoice(index=0, message=message, finish_reason=finish)],
        usage=usage_of.usage or TokenUsage(prompt_tokens=0, completion_tokens=0, total_tokens=0),
        pg_metadata=with_cache(metadata, usage_of))


def with_cache(metadata: PGMetadata | None, reader: object) -> PGMetadata | None:
    """The stream's metadata, plus where its prompt's cached part came from (a local reader knows; a remote's
    relay does not)."""
    if metadata is None or not hasattr(reader, "cache"):
        return metadata
    return LocalMetadata(**metadata.model_dump(), prompt_cache=reader.cache)


class CompletionChunker:
    """Turns one completion job's events into CompletionChunks (one choice index per prompt)."""

    def __init__(self, model: str, include_usage: bool) -> None:
        self.id = new_id("cmpl")
        self.created = int(time.time())
        self.model = model
        self.include_usage = include_usage
        self.prompt_tokens: dict[int, int] = {}
        self.cached: dict[int, tuple[int, str | None]] = {}
        self.completion_tokens: dict[int, int] = {}
        self.drafts: dict[int, tuple[int, int]] = {}   # per prompt: tokens drafted, accepted
        self.prompts_total = 0
        self.usage: TokenUsage | None = None

    @property
    def cache(self) -> str | None:
        """"disk" when any prompt's cached part came from the prompt cache, else "memory" if any had one."""
        sources = {source for _, source in self.cached.values()}
        return "disk" if "disk" in sources else "memory" if "memory" in sources else None

    def _chunk(self, choices: list[CompletionChunkChoice], usage: TokenUsage | None = None) -> CompletionChunk:
        return CompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)

    def feed(self, event: Started | TextDelta) -> list[CompletionChunk]:
        if isinstance(event, Started):
            self.prompt_tokens[event.index] = event.prompt_tokens
            self.cached[event.index] = (event.cached_tokens, event.cache)
            return []
        out = []
        if event.text or event.finish_reason:
            out.append(self._chunk([CompletionChunkChoice(text=event.text, index=event.index,
                                                          finish_reason=event.finish_reason)]))
        if event.finish_reason:
            self.completion_tokens[event.index] = event.completion_tokens
            self.drafts[event.index] = (event.drafted, event.accepted)
            prompt, completion = sum(self.prompt_tokens.values()), sum(self.completion_tokens.values())
            cached = sum(count for count, _ in self.cached.values())
            self.usage = local_usage(prompt, completion, cached, sum(d for d, _ in self.drafts.values()),
                                     sum(a for _, a in self.drafts.values()))
            if self.include_usage and len(self.completion_tokens) == self.prompts_total:
                out.append(self._chunk([], usage=self.usage))
        return out


def fold_completion(chunks: Iterable[CompletionChunk], usage_of: CompletionChunker,
                    metadata: PGMetadata | None = None) -> CompletionResponse:
    texts: dict[int, list[str]] = {}
    finishes: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts.setdefault(choice.index, []).append(choice.text)
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    choices = [CompletionChoice(text="".join(texts[i]), index=i, finish_reason=finishes.get(i, "stop"))
               for i in sorted(texts)]
    return CompletionResponse(id=usage_of.id, created=usage_of.created, model=usage_of.model, choices=choices,
                              usage=usage_of.usage or TokenUsage(prompt_tokens=0, completion_tokens=0, total_tokens=0),
                              pg_metadata=with_cache(metadata, usage_of))

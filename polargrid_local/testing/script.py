"""What the fake engines answer: rules (a pattern to a reply, a stream, a tool call, a fault), per kind.

``client.fake`` (a FakeScript) holds one script per model kind. A rule's pattern is a regular
expression searched in the request's text (the last user message of a chat, the prompt of a
completion, the input of embeddings and speech); ``None`` matches every request. The newest
matching rule wins; ``times=`` makes a rule serve that many requests, then expire (``times=1``
scripts a single call). Faults: ``error`` raised before anything is streamed, or after ``after``
pieces (a stream cut mid-way: an error frame over HTTP); ``delay`` seconds between pieces; ``stall``
seconds (``float('inf')``: until the caller gives up) before the first piece or after ``after``.
"""
from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

DEFAULT_REPLY = "This is a deterministic reply from the polargrid_local fake engine."


@dataclass
class Rule:
    """One scripted answer. ``pieces`` is the reply as it streams (None: the fake's own answer)."""

    pattern: re.Pattern[str] | None = None
    pieces: list[str] | None = None
    delay: float = 0.0
    error: BaseException | None = None
    after: int | None = None
    stall: float | None = None
    times: int | None = None
    model: str | None = None
    chunked: bool = False  # pieces stream as given (else the reply streams token by token)

    def matches(self, text: str, model: str | None) -> bool:
        if self.model is not None and model is not None and self.model.lower() != model.lower():
            return False
        return self.pattern is None or self.pattern.search(text) is not None


@dataclass(frozen=True)
class Seen:
    """A request a fake engine answered: which model, the text the rules were matched against, and more."""

    model: str
    text: str
    extra: dict[str, Any] = field(default_factory=dict)


def _compile(pattern: str | re.Pattern[str] | None) -> re.Pattern[str] | None:
    if pattern is None or isinstance(pattern, re.Pattern):
        return pattern
    return re.compile(pattern, re.S)


class Rules:
    """The rules of one model kind, safe to change from the test while workers read them."""

    def __init__(self) -> None:
        self._rules: list[Rule] = []
        self._lock = threading.Lock()
        self.seen: list[Seen] = []

    def add(self, rule: Rule) -> Rule:
        """Add a rule; newer rules are tried first."""
        with self._lock:
            self._rules.insert(0, rule)
        return rule

    def fail(self, pattern: str | None, error: BaseException, *, after: int | None = None, times: int | None = None,
             model: str | None = None) -> Rule:
        """Raise ``error`` (any polargrid error) for matching requests; with ``after=n``, after n pieces."""
        return self.add(Rule(_compile(pattern), error=error, after=after, times=times, model=model))

    def stall(self, pattern: str | None = None, *, seconds: float = float("inf"), after: int = 0,
              times: int | None = None, model: str | None = None) -> Rule:
        """Stop producing for ``seconds`` (default: until the caller closes the stream) after ``after`` pieces."""
        return self.add(Rule(_compile(pattern), stall=seconds, after=after, times=times, model=model))

    def slow(self, pattern: str | None = None, *, delay: float, times: int | None = None,
             model: str | None = None) -> Rule:
        """Answer as usual, ``delay`` seconds per piece."""
        return self.add(Rule(_compile(pattern), delay=delay, times=times, model=model))

    def match(self, text: str, model: str | None, **extra: Any) -> Rule | None:
        """The newest rule matching this request (its use counted), or None; the request is recorded."""
        with self._lock:
            self.seen.append(Seen(model or "", text, extra))
            for rule in self._rules:
                if rule.matches(text, model):
                    if rule.times is not None:
                        rule.times -= 1
                        if rule.times <= 0:
                            self._rules.remove(rule)
                    return rule
        return None

    def reset(self) -> None:
        with self._lock:
            self._rules.clear()
            self.seen.clear()


class ChatScript(Rules):
    """Chat and text completions: replies, streams, tool calls, echo, faults."""

    def __init__(self) -> None:
        super().__init__()
        self.default = DEFAULT_REPLY
        self.echoing = False

    def reply(self, pattern: str | None, reply: str | dict | list, *, delay: float = 0.0, times: int | None = None,
              model: str | None = None) -> Rule:
        """Answer matching requests with ``reply`` (a dict or list is sent as its JSON), token by token."""
        text = reply if isinstance(reply, str) else json.dumps(reply)
        return self.add(Rule(_compile(pattern), pieces=[text], delay=delay, times=times, model=model))

    def stream(self, pattern: str | None, pieces: Iterable[str], *, delay: float = 0.0, times: int | None = None,
               model: str | None = None) -> Rule:
        """Answer matching requests with exactly these stream pieces (one chunk each), ``delay`` apart."""
        return self.add(Rule(_compile(pattern), pieces=list(pieces), delay=delay, times=times, model=model,
                             chunked=True))

    def tool_call(self, pattern: str | None, name: str, arguments: dict[str, Any] | None = None, *,
                  times: int | None = None, model: str | None = None) -> Rule:
        """Call the tool ``name`` with ``arguments`` (the request must offer that tool)."""
        call = json.dumps({"name": name, "arguments": arguments or {}})
        return self.add(Rule(_compile(pattern), pieces=[call], times=times, model=model))

    def echo(self, on: bool = True) -> None:
        """Unscripted requests get their own last user message (or prompt) back."""
        self.echoing = on

    def reset(self) -> None:
        super().reset()
        self.default = DEFAULT_REPLY
        self.echoing = False


class SpeechScript(Rules):
    """Text-to-speech: faults and pacing by input text; ``seconds_per_char`` sets the clip length."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds_per_char = 0.06

    def reset(self) -> None:
        super().reset()
        self.seconds_per_char = 0.06


class TranscriptScript(Rules):
    """Speech-to-text: scripted transcripts; otherwise the text the fake TTS put into the audio."""

    def __init__(self) -> None:
        super().__init__()
        self.default = ""

    def reset(self) -> None:
        super().reset()
        self.default = ""

    def transcript(self, text: str, *, times: int | None = None, model: str | None = None) -> Rule:
        """Transcribe any audio as ``text``."""
        return self.add(Rule(None, pieces=[text], times=times, model=model))


class EmbeddingScript(Rules):
    """Embeddings: faults by input text; ``dimensions`` overrides the model's vector size."""

    def __init__(self) -> None:
        super().__init__()
        self.dimensions: int | None = None

    def reset(self) -> None:
        super().reset()
        self.dimensions = None


class FakeScript:
    """Everything the fake engines of one LocalEngine answer; ``client.fake`` with ``fake=True``."""

    def __init__(self) -> None:
        self.chat = ChatScript()
        self.embeddings = EmbeddingScript()
        self.tts = SpeechScript()
        self.stt = TranscriptScript()

    def reset(self) -> None:
        """Forget every rule and setting, and what was seen (the plugin does this between tests)."""
        for script in (self.chat, self.embeddings, self.tts, self.stt):
            script.reset()

"""From the SDK's request objects to what runs on a model's worker: prompts, sampling and jobs."""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from typing import Any

from polargrid.types import ChatCompletionRequest, CompletionRequest, Message

from ..errors import check_text, invalid
from ..limits import DEFAULT_LIMITS, Limits
from ..runtime.interfaces import Job, JobContext
from .backend import LlamaBackend
from .batching import PromptJob
from .constraints import Grammar, ToolPlan, plan_tools, response_format_grammar
from .generation import SamplingParams, Started, TextDelta
from .schemas import OutputSchema
from .tool_dialects import bind_dialect

DEFAULT_TOP_K = 40


def sampling_for(request: ChatCompletionRequest | CompletionRequest, *, seed: int | None = None,
                 grammar: Grammar | None = None, min_p: Any = None, repetition_penalty: Any = None,
                 speculative: bool | None = None) -> SamplingParams:
    """Sampling settings of a chat or completion request (a completion request has no min_p,
    repetition_penalty or seed fields: those come as keywords or take their neutral values). ``speculative``
    False: no drafts for this request (the local extra; None or True: as the model is set)."""
    return SamplingParams(
        temperature=0.7 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        top_k=DEFAULT_TOP_K if request.top_k is None else _top_k(request.top_k),
        min_p=_min_p(min_p if min_p is not None else getattr(request, "min_p", None)),
        frequency_penalty=request.frequency_penalty or 0.0,
        presence_penalty=request.presence_penalty or 0.0,
        repetition_penalty=_repetition(repetition_penalty if repetition_penalty is not None
                                       else getattr(request, "repetition_penalty", None)),
        seed=_seed(seed if seed is not None else getattr(request, "seed", None)),
        grammar=grammar,
        speculative=speculative is not False,
    )


def _seed(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"seed must be an integer, not {type(value).__name__}", field="seed")
    return value


def _check_fields(request: Any, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(request, name, None)
        if value is not None:
            check_text(value.model_dump(exclude_none=True) if hasattr(value, "model_dump") else
                       [v.model_dump(exclude_none=True) if hasattr(v, "model_dump") else v for v in value]
                       if isinstance(value, list) else value, name)


def _texts(value: Any, field: str, required: str, most: int, limit: str, unit: str) -> list[str]:
    """A text field that may be a string or a list: non-empty strings, at most ``most`` of them."""
    texts = [value] if isinstance(value, str) else list(value)
    if not texts or any(not isinstance(t, str) or not t for t in texts):
        raise invalid(required, field=field)
    if len(texts) > most:
        raise invalid(f"{field} has {len(texts)} {unit}; at most {most} per request (the {limit} limit)",
                      field=field, limit=limit)
    return texts


def completion_prompts(request: CompletionRequest, limits: Limits) -> list[str]:
    """The prompts of a completions request: non-empty text, at most ``limits.max_prompts`` of them."""
    prompts = _texts(request.prompt, "prompt", "Prompt is required", limits.max_prompts, "max_prompts", "prompts")
    _check_fields(request, ("prompt", "stop", "suffix"))
    return prompts


def embedding_inputs(request: Any, limits: Limits) -> list[str]:
    """The strings of an embeddings request: non-empty text, at most ``limits.max_embedding_inputs``."""
    texts = _texts(request.input, "input", "Input is required: a non-empty string or a list of non-empty strings",
                   limits.max_embedding_inputs, "max_embedding_inputs", "strings")
    check_text(texts if isinstance(request.input, list) else texts[0], "input")
    return texts


def _top_k(value: int) -> int:
    if value < 0:
        raise invalid("top_k must be 0 (off) or a positive integer", field="top_k")
    return value


def _min_p(value: Any) -> float:
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise invalid("min_p must be a number from 0 to 1", field="min_p")
    return float(value)


def _repetition(value: Any) -> float:
    if value is None:
        return 1.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 10.0:
        raise invalid("repetition_penalty must be greater than 0 and at most 10", field="repetition_penalty")
    return value


def check_stops(stop: list[str] | None) -> list[str]:
    stops = list(stop or [])
    if any(not isinstance(s, str) or not s for s in stops):
        raise invalid("stop sequences must be non-empty strings", field="stop")
    return stops


@dataclasses.dataclass(frozen=True)
class ChatPlan:
    """Everything about a chat request that can be checked before it reaches the model."""

    messages: list[Message]
    params: SamplingParams
    max_tokens: int
    stop: list[str]
    tools: ToolPlan | None
    output: OutputSchema | None = None  # what response_format's output must satisfy when complete


def plan_chat(request: ChatCompletionRequest, model_id: str, limits: Limits | None = None,
              speculative: bool | None = None) -> ChatPlan:
    """Validate a chat request and decide its sampling, grammar and tools (schemas within ``limits``)."""
    limits = limits or DEFAULT_LIMITS
    if not request.messages:
        raise invalid("Messages array is required and cannot be empty", field="messages")
    _check_fields(request, ("messages", "tools", "stop", "response_format", "tool_choice"))
    for i, message in enumerate(request.messages):
        if isinstance(message.content, list):
            for part in message.content:
                if getattr(part, "type", None) == "image_url":
                    raise invalid(f"messages[{i}] has an image, but model {model_id!r} has no vision support; "
                                  "send text content only", field=f"messages[{i}].content")
        if message.role == "tool" and not message.tool_call_id:
            raise invalid(f"messages[{i}] has role 'tool' but no tool_call_id", field=f"messages[{i}].tool_call_id")
    tools = plan_tools(request.tools, request.tool_choice, limits)
    formatted = response_format_grammar(request.response_format, limits)
    if tools is not None and formatted is not None:
        raise invalid("response_format and tools cannot constrain the same request; use one")
    grammar, output = formatted or (None, None)
    params = sampling_for(request, grammar=tools.grammar if tools else grammar, speculative=speculative)
    return ChatPlan(list(request.messages), params, request.max_tokens or 150, check_stops(request.stop), tools,
                    output)


def template_messages(messages: list[Message], backend: LlamaBackend, tools: ToolPlan | None,
                      hermes: bool = False) -> list[dict[str, Any]]:
    """Messages as the chat template expects them: text content, tool turns written out when the template has none
    (``hermes``: the template writes tool calls, results and the tool list itself)."""
    native_tools = hermes or backend.template_mentions_tools
    out: list[dict[str, Any]] = []
    for message in messages:
        text = _text_of(message.content)
        if message.role == "assistant" and message.tool_calls:
            calls = [{"name": c.function.name, "arguments": _loads(c.function.arguments)} for c in message.tool_calls]
            written = json.dumps(calls[0] if len(calls) == 1 else calls)
            out.append({"role": "assistant", "content": text, "tool_calls": [{"type": "function", "function": c}
                                                                             for c in calls]} if hermes else
                       {"role": "assistant", "content": text or written})
        elif message.role == "tool" and not native_tools:
            out.append({"role": "user", "content": f"Result of tool call {message.tool_call_id}: {text}"})
        else:
            entry: dict[str, Any] = {"role": message.role, "content": text}
            if message.role == "tool":
                entry["tool_call_id"] = message.tool_call_id
            out.append(entry)
    if tools is not None and not hermes:
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{tools.system_prompt}"}
        else:
            out.insert(0, {"role": "system", "content": tools.system_prompt})
    return out


def _text_of(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(getattr(part, "text", "") or "" for part in content)


def _loads(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except (TypeError, json.JSONDecodeError):
        return arguments


def fit_prompt(tokens: list[int], backend: LlamaBackend, model_id: str, index: int = 0) -> None:
    if len(tokens) >= backend.n_ctx:
        where = f"prompt[{index}]" if index else "prompt"
        raise invalid(f"The {where} is {len(tokens)} tokens, but model {model_id!r} has a context window of "
                      f"{backend.n_ctx} tokens; shorten the input", field="messages", prompt_tokens=len(tokens))


def chat_prompt(plan: ChatPlan, backend: LlamaBackend, model_id: str) -> tuple[str, SamplingParams]:
    """The prompt through the model's template, and the sampling for it (the template's tool dialect decides)."""
    hermes, params, tools = bind_dialect(plan.tools, plan.params, backend.chat_template)
    try:
        return backend.render_chat(template_messages(plan.messages, backend, plan.tools, hermes), tools=tools), params
    except Exception as exc:
        raise invalid(f"the chat template of {model_id!r} rejected these messages: {exc}") from exc


def chat_job(plan: ChatPlan, model_id: str, pin: Any = None) -> Job:
    """What a worker runs for one chat request (``pin``: cache_prompt's Future, see batching.PromptJob)."""

    def run(backend, ctx: JobContext):
        prompt, params = chat_prompt(plan, backend, model_id)
        tokens = backend.tokenize(prompt, add_bos=backend.add_bos_for_template(prompt))
        fit_prompt(tokens, backend, model_id)
        if hasattr(backend, "scheduler"):
            return [PromptJob(tokens, params, plan.max_tokens, plan.stop, ctx.stream, ctx=ctx, pin=pin)]
        if pin is not None:
            raise invalid(f"model {model_id!r} serves one request at a time (n_parallel = 1), without a prompt cache")
        return _plain(backend, ctx, [tokens], params, plan.max_tokens, plan.stop)

    return Job(run, batched=True)


def completion_job(prompts: list[str], params: SamplingParams, max_tokens: int, stop: list[str], model_id: str,
                   pin: Any = None) -> Job:
    """What a worker runs for one completion request (one choice per prompt; each takes a slot). ``pin``:
    cache_prompt's Future for its one prompt (see batching.PromptJob)."""

    def run(backend, ctx: JobContext):
        encoded = [backend.tokenize(p, add_bos=True, special=False) for p in prompts]
        for index, tokens in enumerate(encoded):
            fit_prompt(tokens, backend, model_id, index)
        if hasattr(backend, "scheduler"):
            siblings = [len(encoded)]
            return [PromptJob(tokens, params, max_tokens, stop, ctx.stream, index, siblings, ctx=ctx, pin=pin)
                    for index, tokens in enumerate(encoded)]
        if pin is not None:
            raise invalid(f"model {model_id!r} serves one request at a time (n_parallel = 1), without a prompt cache")
        return _plain(backend, ctx, encoded, params, max_tokens, stop)

    return Job(run, cost=len(prompts), batched=True)


def _plain(backend: LlamaBackend, ctx: JobContext, encoded: list[list[int]], params: SamplingParams,
           max_tokens: int, stop: list[str]) -> Iterator[Started | TextDelta]:
    """One request at a time, on a backend without a batch scheduler."""
    for index, tokens in enumerate(encoded):
        yield Started(prompt_tokens=len(tokens), index=index)
        for delta in backend.stream(tokens, params, max_tokens, stop, cancelled=lambda: ctx.cancelled):
            yield dataclasses.replace(delta, index=index)


"""The default chat model (Qwen2.5-Coder-0.5B) and its own tool dialect: the GGUF's template lists the tools and
writes calls and results; calls come back as Hermes ``<tool_call>`` blocks (or the bare call objects Qwen-Coder
writes when nothing constrains it), parsed into the SDK's tool_calls, streamed and folded alike."""
from __future__ import annotations

import json

import jsonschema
import polargrid
import pytest
from conftest import CHAT, DEFAULT_CHAT, QWEN
from polargrid.types import ChatCompletionRequest
from test_structured import WEATHER

from polargrid_local.llm.chunks import ChatChunker, fold_chat
from polargrid_local.llm.constraints import plan_tools
from polargrid_local.llm.generation import Started, TextDelta
from polargrid_local.llm.requests import chat_prompt, plan_chat
from polargrid_local.llm.tool_dialects import CallWatcher

TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current local time in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                   "required": ["city"]}}}
PARIS = {"city": "Paris", "unit": "c"}


def ask(content, **extra):
    messages = [{"role": "user", "content": content}] if isinstance(content, str) else content
    return {"model": DEFAULT_CHAT, "messages": messages, "max_tokens": 96, "temperature": 0, **extra}


def calls_of(reply) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in reply.choices[0].message.tool_calls or []]


def backend_of(engine, model: str):
    return engine.pool.worker(engine.registry.get(model))[0].backend


# -- the template ------------------------------------------------------------------------------

def test_the_default_aliases_serve_qwen_and_smollm2_keeps_its_names(registry):
    for alias in ("llama-3.1-8b", "gpt-4o-mini", "gpt-3.5-turbo", "qwen2.5-coder-0.5b"):
        assert registry.get(alias).id == QWEN
    assert registry.default("chat").id == QWEN
    assert registry.get("smollm2").id == registry.get("smollm2-135m").id == CHAT
    assert registry.get("qwen2.5-coder-1.5b").id == "qwen2.5-coder-1.5b-instruct"


def test_qwen_template_lists_tools_and_writes_calls_and_results_natively(engine):
    backend = backend_of(engine, QWEN)
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps(PARIS)}}
    request = ChatCompletionRequest(**ask([
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'}], tools=[WEATHER]))
    prompt, params = chat_prompt(plan_chat(request, QWEN), backend, QWEN)
    assert "<tools>\n" + json.dumps(WEATHER) + "\n</tools>" in prompt
    assert "You can call functions" not in prompt, "our JSON-dialect system prompt is for other templates"
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": ' + json.dumps(PARIS) in prompt
    assert '<|im_start|>user\n<tool_response>\n{"temp": 21}\n</tool_response><|im_end|>' in prompt
    assert params.grammar is None, "tool_choice auto decodes freely in the native dialect"
    required, params = chat_prompt(plan_chat(request.model_copy(update={"tool_choice": "required"}), QWEN),
                                   backend, QWEN)
    assert params.grammar.tagged and '"<tool_call>\\n"' in params.grammar.gbnf


def test_smollm2_keeps_the_json_dialect(engine):
    request = ChatCompletionRequest(**ask("Weather in Paris?", model=CHAT, tools=[WEATHER]))
    prompt, params = chat_prompt(plan_chat(request, CHAT), backend_of(engine, CHAT), CHAT)
    assert "You can call functions" in prompt and "<tools>" not in prompt
    assert params.grammar is not None and params.grammar.free_text and not params.grammar.tagged


# -- calls from the real model -----------------------------------------------------------------

def test_auto_calls_the_right_tool_from_a_natural_request(client):
    reply = client.chat_completion(ask("What is the weather in Paris right now, in celsius?", tools=[WEATHER, TIME]))
    assert reply.choices[0].finish_reason == "tool_calls"
    assert calls_of(reply) == [("get_weather", PARIS)]
    assert reply.choices[0].message.tool_calls[0].id.startswith("call_")


def test_auto_answers_in_text_when_no_tool_fits(client):
    reply = client.chat_completion(ask("What is 2 + 2? Answer with the number only.", tools=[WEATHER]))
    assert reply.choices[0].finish_reason == "stop" and reply.choices[0].message.tool_calls is None
    assert reply.choices[0].message.content.strip() == "4"


def test_required_writes_tagged_calls_streamed_and_folded_alike(client):
    request = ask("What time is it in Tokyo?", tools=[WEATHER, TIME], tool_choice="required")
    chunks = list(client.chat_completion_stream(request))
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert [(d.function["name"], json.loads(d.function["arguments"])) for d in deltas] == [("get_time",
                                                                                            {"city": "Tokyo"})]
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    folded = client.chat_completion(request)
    assert calls_of(folded) == [("get_time", {"city": "Tokyo"})] and folded.choices[0].message.content is None


def test_named_tool_choice_calls_that_function(client):
    reply = client.chat_completion(ask("What is the weather in Paris, in celsius?", tools=[WEATHER, TIME],
                                       tool_choice={"type": "function", "function": {"name": "get_time"}}))
    [(name, arguments)] = calls_of(reply)
    assert name == "get_time"
    jsonschema.validate(arguments, TIME["function"]["parameters"])


def test_several_calls_in_one_answer(client):
    reply = client.chat_completion(ask("Call get_weather for Paris in celsius, then call get_weather for Rome in "
                                       "celsius.", tools=[WEATHER], tool_choice="required", max_tokens=120))
    assert calls_of(reply) == [("get_weather", PARIS), ("get_weather", {"city": "Rome", "unit": "c"})]


def test_a_tool_result_fed_back_is_answered(client):
    first = client.chat_completion(ask("What is the weather in Paris right now, in celsius?", tools=[WEATHER],
                                       tool_choice="required"))
    call = first.choices[0].message.tool_calls[0]
    reply = client.chat_completion(ask([
        {"role": "user", "content": "What is the weather in Paris right now, in celsius?"},
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "sunny"}'}], tools=[WEATHER]))
    # The 0.5B answers by restating the call and its result (the 1.5B answers in words); either way the
    # result reached the model, and the restated call is not taken for a new one.
    assert reply.choices[0].finish_reason == "stop" and reply.choices[0].message.tool_calls is None
    assert "21" in reply.choices[0].message.content


def test_json_schema_stops_and_usage_on_the_default(client):
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "city": {"type": "string"}},
              "required": ["name", "city"], "additionalProperties": False}
    reply = client.chat_completion(ask("Maria Lopez moved from Lyon to Toronto in 2019. Extract her name and the city "
                                       "she lives in now.", response_format={"type": "json_schema", "json_schema": {
                                           "name": "person", "schema": schema}}))
    assert json.loads(reply.choices[0].message.content) == {"name": "Maria Lopez", "city": "Toronto"}
    stopped = client.chat_completion(ask("Count from 1 to 10, separated by commas.", stop=["5"]))
    assert stopped.choices[0].finish_reason == "stop" and "5" not in stopped.choices[0].message.content
    assert "4" in stopped.choices[0].message.content
    usage = stopped.usage
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens and usage.completion_tokens > 0


# -- the chunker, on what the dialect may stream ----------------------------------------------

def chunker_for(text_pieces: list[str], tool_choice="auto", finish="stop"):
    tools = [polargrid.types.ChatTool(**WEATHER), polargrid.types.ChatTool(**TIME)]
    plan = plan_tools(tools, tool_choice)
    plan.dialect.hermes = True
    chunker = ChatChunker("m", tools, plan, include_usage=True)
    chunks = chunker.feed(Started(prompt_tokens=5))
    for piece in text_pieces:
        chunks += chunker.feed(TextDelta(piece))
    chunks += chunker.feed(TextDelta("", finish_reason=finish, prompt_tokens=5, completion_tokens=len(text_pieces)))
    return chunks, fold_chat(chunks, chunker)


def test_text_before_calls_streams_and_the_calls_follow():
    pieces = ["Let me", " check", " both.", "\n<", "tool", "_call>\n", '{"name": "get_weather", "arguments": ',
              json.dumps(PARIS), "}\n</tool_call>\n<tool_call>\n",
              '{"name": "get_time", "arguments": {"city": "Rome"}}', "\n</tool_call>"]
    chunks, folded = chunker_for(pieces)
    streamed = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert streamed == ["Let me", " check", " both.", "\n"], "text streams as it comes; the tag is held back"
    assert folded.choices[0].message.content == "Let me check both.\n"
    assert calls_of(folded) == [("get_weather", PARIS), ("get_time", {"city": "Rome"})]
    assert folded.choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("reply", [json.dumps({"name": "get_time", "arguments": {"city": "Rome"}}),
                                   '```json\n{\n  "name": "get_time",\n  "arguments": {"city": "Rome"}\n}\n```'])
def test_bare_and_fenced_call_objects_are_calls(reply):
    _, folded = chunker_for([reply[:7], reply[7:]])
    assert calls_of(folded) == [("get_time", {"city": "Rome"})] and folded.choices[0].message.content is None


@pytest.mark.parametrize("reply", ['{"temperature": 21}', '{"name": "tell_joke", "arguments": {}}',
                                   "```python\nprint(1)\n```", "Use <b>bold</b> for a < b."])
def test_other_replies_stay_text(reply):
    chunks, folded = chunker_for([reply[:3], reply[3:]])
    assert folded.choices[0].message.content == reply and folded.choices[0].message.tool_calls is None
    assert folded.choices[0].finish_reason == "stop"


def test_a_broken_tagged_call_is_a_validation_error_unless_cut_short():
    broken = ["<tool_call>\n", '{"name": "get_weather", "arguments": {"city": "Paris"}}', "\n</tool_call>"]
    with pytest.raises(polargrid.ValidationError, match="unit"):
        chunker_for(broken)
    _, folded = chunker_for(broken[:2], finish="length")
    assert folded.choices[0].finish_reason == "length" and folded.choices[0].message.content.startswith("<tool_call>")


def test_the_watcher_releases_text_that_only_looked_like_a_tag():
    watcher = CallWatcher(required=False)
    shown = watcher.feed("a <to") + watcher.feed("morrow> b <tool")
    assert shown == "a <tomorrow> b ", "a tail that may open a tag waits for the next piece"
    assert watcher.flush() == "<tool" and watcher.held == ""

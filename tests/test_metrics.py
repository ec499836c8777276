"""GET /metrics: the Prometheus text format, read back with prometheus_client's own parser."""
from __future__ import annotations

import json
import time

import httpx
import pytest
from conftest import CHAT
from prometheus_client.parser import text_string_to_metric_families

from polargrid_local import LocalEngine, Registry
from polargrid_local.server import running

KEY = {"Authorization": "Bearer metrics-key"}


def scrape(server, headers=KEY) -> dict[str, list]:
    """Every sample of the exposition, by metric family name (as the parser names them)."""
    response = httpx.get(server.url + "/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=")
    return {family.name: family.samples for family in text_string_to_metric_families(response.text)}


def value(samples, name, missing=None, **labels) -> float:
    found = [s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    if not found and missing is not None:
        return missing
    assert found, f"no sample {name} {labels}"
    return found[0]


@pytest.fixture(scope="module")
def server(engine):
    with running(engine, api_keys=["metrics-key"]) as srv:
        yield srv


def test_requests_tokens_first_token_and_models_are_counted(server):
    prefix = "polargrid_local"
    before = scrape(server)
    stream = httpx.post(server.url + "/v1/chat/completions", headers=KEY, timeout=120, json={
        "model": CHAT, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "stream": True})
    assert stream.status_code == 200 and stream.text.endswith("data: [DONE]\n\n")
    assert httpx.post(server.url + "/v1/chat/completions", headers=KEY, json={"model": "nope", "messages": [
        {"role": "user", "content": "x"}]}).status_code == 404
    assert httpx.get(server.url + "/v1/models/no-such-model", headers=KEY).status_code == 404
    assert httpx.get(server.url + "/no/route", headers=KEY).status_code == 404
    after = scrape(server)

    requests = after[f"{prefix}_http_requests"]
    assert value(requests, f"{prefix}_http_requests_total", route="/v1/chat/completions", status="200") >= 1
    assert value(requests, f"{prefix}_http_requests_total", route="/v1/chat/completions", status="404") >= 1
    assert value(requests, f"{prefix}_http_requests_total", route="/v1/models/(?P<model_id>.+)", status="404") >= 1
    assert value(requests, f"{prefix}_http_requests_total", route="unmatched", method="GET") >= 1  # no raw paths
    assert not [s for s in requests if "no-such-model" in str(s.labels) or "/no/route" in str(s.labels)]
    latency = after[f"{prefix}_http_request_duration_seconds"]
    assert value(latency, f"{prefix}_http_request_duration_seconds_count", route="/v1/chat/completions") >= 2
    first = after[f"{prefix}_time_to_first_token_seconds"]
    grew = value(first, f"{prefix}_time_to_first_token_seconds_count", model=CHAT) - value(
        before[f"{prefix}_time_to_first_token_seconds"], f"{prefix}_time_to_first_token_seconds_count", 0, model=CHAT)
    assert grew == 1 and value(first, f"{prefix}_time_to_first_token_seconds_sum", model=CHAT) > 0
    assert value(first, f"{prefix}_time_to_first_token_seconds_bucket", model=CHAT, le="+Inf") >= 1
    assert value(after[f"{prefix}_prompt_tokens"], f"{prefix}_prompt_tokens_total", model=CHAT) > 5
    assert 1 <= value(after[f"{prefix}_generated_tokens"], f"{prefix}_generated_tokens_total", model=CHAT)
    assert value(after[f"{prefix}_model_loaded"], f"{prefix}_model_loaded", model=CHAT, kind="chat") == 1
    assert value(after[f"{prefix}_model_memory_bytes"], f"{prefix}_model_memory_bytes", model=CHAT) > 50e6
    assert value(after[f"{prefix}_queue_depth"], f"{prefix}_queue_depth", model=CHAT) == 0
    assert value(after[f"{prefix}_http_requests_in_flight"], f"{prefix}_http_requests_in_flight") >= 1  # the scrape
    reply = httpx.post(server.url + "/v1/completions", headers=KEY, timeout=120, json={
        "model": CHAT, "prompt": "red, green, blue, red, green, blue, red, green, blue, red,", "max_tokens": 24,
        "temperature": 0}).json()
    fed = scrape(server)

    def grew(name: str) -> float:
        return value(fed[f"{prefix}_{name}"], f"{prefix}_{name}_total", 0, model=CHAT) - value(
            after[f"{prefix}_{name}"], f"{prefix}_{name}_total", 0, model=CHAT)

    drafts = reply["usage"]["completion_tokens_details"]   # speculative decoding and the prompt cache, as reported
    assert grew("draft_tokens") == drafts["accepted_prediction_tokens"] + drafts["rejected_prediction_tokens"]
    assert grew("draft_tokens_accepted") == drafts["accepted_prediction_tokens"]
    assert grew("prompt_cache_tokens") == reply["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_a_generations_usage_feeds_the_draft_and_cache_events():
    from polargrid_local.runtime.events import EngineEvents
    from polargrid_local.types import CompletionTokensDetails, PromptTokensDetails, TokenUsage

    events, heard = EngineEvents(), []
    events.subscribe(lambda kind, payload: heard.append((kind, payload)))
    events.generation(CHAT, TokenUsage(prompt_tokens=40, completion_tokens=20, total_tokens=60,
                                       prompt_tokens_details=PromptTokensDetails(cached_tokens=32),
                                       completion_tokens_details=CompletionTokensDetails(
                                           accepted_prediction_tokens=9, rejected_prediction_tokens=3)), 0.5)
    assert [kind for kind, _ in heard] == ["generation", "drafted", "prompt_cache"]
    assert heard[1][1] == (CHAT, 12, 9) and heard[2][1] == (CHAT, True, 32)


def test_engine_events_for_drafts_and_cache_reach_the_declared_counters(server, engine):
    names = ("draft_tokens", "draft_tokens_accepted", "prompt_cache_hits", "prompt_cache_tokens")

    def counts():
        got = scrape(server)
        return [value(got[f"polargrid_local_{n}"], f"polargrid_local_{n}_total", 0, model=CHAT) for n in names]

    before = counts()
    engine.events.drafted(CHAT, 8, 5)
    engine.events.prompt_cache(CHAT, True, 120)
    assert [b - a for a, b in zip(before, counts(), strict=True)] == [8, 5, 1, 120]


def test_every_server_has_its_own_registry(engine, server):
    with running(engine, api_keys=["metrics-key"]) as other:
        fresh = scrape(other)["polargrid_local_http_requests"]
        assert [s.labels["route"] for s in fresh if s.name.endswith("_total")] == []  # the first scrape counts after
    assert other.metrics.on_event not in engine.events._listeners, "a closed server stops listening to the engine"


def test_a_key_is_needed_unless_metrics_open(engine, tmp_path):
    with running(engine, api_keys=["metrics-key"]) as closed, \
            running(engine, api_keys=["metrics-key"], metrics_open=True) as opened:
        refused = httpx.get(closed.url + "/metrics")
        assert refused.status_code == 401 and json.loads(refused.text)["error"]["type"] == "authentication_error"
        assert "polargrid_local_http_requests" in scrape(opened, headers={})
        assert httpx.get(opened.url + "/v1/models").status_code == 401, "metrics_open opens /metrics only"


def test_a_remote_model_reports_whether_it_answers(tmp_path):
    models = tmp_path / "models.toml"
    models.write_text('[[models]]\nid = "far-away"\nkind = "chat"\n[models.remote]\n'
                      'base_url = "http://127.0.0.1:9/v1"\nmodel = "x"\ntimeout = 1\nmax_retries = 0\n')
    engine = LocalEngine(Registry.load(models, tmp_path, models_only=True))
    try:
        with running(engine, metrics_open=True) as server:
            deadline = time.monotonic() + 30   # the first probe runs in the background: "unknown" until it ends
            while (remote := scrape(server, headers={})["polargrid_local_remote_up"])[0].labels["status"] == \
                    "unknown" and time.monotonic() < deadline:
                time.sleep(0.1)
            assert value(remote, "polargrid_local_remote_up", model="far-away") == 0
            assert remote[0].labels["status"] in ("down", "offline")
    finally:
        engine.close()

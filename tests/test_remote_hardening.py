"""The gateway against remotes that misbehave (issue 22): each test names the defect it guards against.

The remote is tests/upstream.py's stub on 127.0.0.1, whose behaviours write raw HTTP: dripped headers and
bodies, answers past every bound, redirects, HTML pages, empty streams, keys echoed back, NaN vectors.
The gateway is a real LocalEngine (its local fallback a real SmolLM2) and, where status codes matter,
the real HTTP facade in front of it.
"""
from __future__ import annotations

import http.client
import json
import threading
import time
import tracemalloc
from pathlib import Path

import pytest
from conftest import CHAT, MODELS_FILE
from polargrid import errors as sdk
from upstream import Handler, Upstream, chunk_for, event, good_answer

from polargrid_local import LocalEngine, Registry
from polargrid_local.limits import Limits
from polargrid_local.remote import probes
from polargrid_local.server import running
from polargrid_local.server.drain import drain

REQUEST_LIMIT = 3.0      # the gateway's request_timeout_s: every remote call must end by it
SLACK = 2.0              # time past it allowed for the error to reach the caller on a busy 2-core machine
KEY_ENV, KEY = "GW22_REMOTE_KEY", "sk-gw22-very-secret-0123456789"
MiB = 1024 * 1024
BOUNDS = {"max_response_bytes": MiB, "max_sse_line_bytes": 64 * 1024, "max_sse_event_bytes": 256 * 1024,
          "max_chunks": 50}
FLOOD = 64 * MiB         # what a flooding remote offers; bounded reads take a small part of it


def entry(model_id: str, base_url: str, kind: str = "chat", fallback: tuple[str, ...] = (), **remote) -> str:
    """A models.toml entry for a remote model; ``remote`` adds [models.remote] keys (bounds, retries, ...)."""
    settings = {"timeout": 2, "max_retries": 0, **remote}
    lines = [f'[[models]]\nid = "{model_id}"\nkind = "{kind}"']
    if fallback:
        lines.append("fallback = [" + ", ".join(f'"{f}"' for f in fallback) + "]")
    lines.append(f'[models.remote]\nbase_url = "{base_url}"\nmodel = "m"')
    lines += [f"{key} = {json.dumps(value)}" for key, value in settings.items()]
    return "\n".join(lines) + "\n\n"


def load_registry(tmp_path: Path, entries: str, cache_dir: Path) -> Registry:
    path = tmp_path / "models.toml"
    path.write_text(MODELS_FILE.read_text() + "\n" + entries)
    return Registry.load(path, cache_dir)


# -- the remote's behaviours -------------------------------------------------------------------

def drip_head(h: Handler, route: str, body: bytes) -> None:
    """The status line and headers, one byte a second: per-read timeouts never fire."""
    content_type, answer = good_answer(route)
    h.drip(h.head(200, content_type, len(answer)) + answer)


def drip_body(h: Handler, route: str, body: bytes) -> None:
    """Headers at once, then the body one byte a second."""
    content_type, answer = good_answer(route)
    h.raw(h.head(200, content_type, len(answer) + 64))
    h.drip(answer + b" " * 64)


def never_reads(h: Handler, route: str, body: bytes) -> None:
    """Leaves the upload unread (so the gateway's write blocks once the socket buffers fill) and says nothing."""
    time.sleep(REQUEST_LIMIT + 10)


def flood_json(h: Handler, route: str, body: bytes) -> None:
    h.flood(200, "application/json", FLOOD, b"0,", prefix=b'{"data": [')


def flood_json_undeclared(h: Handler, route: str, body: bytes) -> None:
    h.flood(200, "application/json", FLOOD, b"0,", prefix=b'{"data": [', declare=False)


def long_line(h: Handler, route: str, body: bytes) -> None:
    h.flood(200, "text/event-stream", FLOOD, b"x", prefix=b"data: ", declare=False)


def long_event(h: Handler, route: str, body: bytes) -> None:
    h.flood(200, "text/event-stream", FLOOD, b"data: xxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\n", declare=False)


def endless_stream(h: Handler, route: str, body: bytes) -> None:
    h.flood(200, "text/event-stream", FLOOD, event(chunk_for(route, "x")), declare=False)


def many_chunks(h: Handler, route: str, body: bytes) -> None:
    h.answer(200, "text/event-stream", b"".join(event(chunk_for(route, "x")) for _ in range(200))
             + b"data: [DONE]\n\n")


def flood_error(h: Handler, route: str, body: bytes) -> None:
    h.flood(500, "application/json", FLOOD, b"e", prefix=b'{"error": {"message": "', declare=False)


def flood_audio(h: Handler, route: str, body: bytes) -> None:
    h.flood(200, "audio/wav", FLOOD, b"\0", prefix=b"RIFF", declare=False)


def redirect(h: Handler, route: str, body: bytes) -> None:
    h.answer(302, "text/html", b"<a href='/elsewhere'>moved</a>", [("Location", "http://127.0.0.1:9/elsewhere")])


def html_page(h: Handler, route: str, body: bytes) -> None:
    h.answer(200, "text/html", b"<html><body>Please log in to the captive portal</body></html>")


def done_only(h: Handler, route: str, body: bytes) -> None:
    h.answer(200, "text/event-stream", b"data: [DONE]\n\n")


def empty_stream(h: Handler, route: str, body: bytes) -> None:
    h.answer(200, "text/event-stream", b"")


def echo_key(h: Handler, route: str, body: bytes) -> None:
    """A 401 whose message echoes the Authorization header, then rambles on for 100 kB."""
    said = f"invalid credentials in header: {h.headers.get('Authorization')}. " + "details " * 12500
    h.answer(401, "application/json", json.dumps({"error": {"message": said}}).encode())


def echo_key_in_stream(h: Handler, route: str, body: bytes) -> None:
    h.answer(200, "text/event-stream", event(chunk_for(route)) + event(
        {"error": {"message": f"quota exhausted for {h.headers.get('Authorization')}", "code": 429}}))


def echo_key_malformed(h: Handler, route: str, body: bytes) -> None:
    h.answer(200, "text/event-stream", b"data: not json " + h.headers.get("Authorization", "").encode() + b"\n\n")


def bad_usage(h: Handler, route: str, body: bytes) -> None:
    h.answer(200, "text/event-stream", event(chunk_for(route, "Hello", "stop"))
             + event(b'{"id": "u", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [], '
                     b'"usage": {"prompt_tokens": "lots", "completion_tokens": NaN, "total_tokens": [1]}}')
             + b"data: [DONE]\n\n")


def nan_vector(h: Handler, route: str, body: bytes) -> None:
    h.answer(200, "application/json", b'{"data": [{"index": 0, "embedding": [0.5, NaN, 1e400]}], '
             b'"usage": {"prompt_tokens": 1, "total_tokens": 1}}')


def nan_vector_base64(h: Handler, route: str, body: bytes) -> None:
    import base64

    import numpy as np

    packed = base64.b64encode(np.array([0.5, np.nan, np.inf], "<f4").tobytes()).decode()
    h.answer(200, "application/json", json.dumps({"data": [{"index": 0, "embedding": packed}]}).encode())


def unavailable_once(h: Handler, route: str, body: bytes) -> None:
    """503 (Retry-After: 0) to the first request for this behaviour, then a good answer."""
    name = h.path.split("/")[1]
    if h.server.upstream.calls[(name, route)] == 1:
        h.answer(503, "application/json", b'{"error": {"message": "warming up"}}', [("Retry-After", "0")])
        return
    content_type, answer = good_answer(route)
    h.answer(200, content_type, answer)


def models_drip(h: Handler, route: str, body: bytes) -> None:
    h.drip(h.head(200, "application/json", 2) + b"{}")


def models_flood(h: Handler, route: str, body: bytes) -> None:
    h.flood(200, "application/json", FLOOD, b"0,", prefix=b"[")


def models_html(h: Handler, route: str, body: bytes) -> None:
    h.answer(200, "text/html", b"<html>portal</html>")


BEHAVIOURS = {
    "drip-head": drip_head, "drip-body": drip_body, "flood-json": flood_json,
    "flood-json-undeclared": flood_json_undeclared, "long-line": long_line, "long-event": long_event,
    "endless-stream": endless_stream, "many-chunks": many_chunks, "flood-error": flood_error,
    "flood-audio": flood_audio, "redirect": redirect, "html": html_page, "done-only": done_only,
    "empty-stream": empty_stream, "echo-key": echo_key, "echo-key-stream": echo_key_in_stream,
    "echo-key-malformed": echo_key_malformed, "bad-usage": bad_usage, "nan-vector": nan_vector,
    "nan-vector-base64": nan_vector_base64, "503-retried": unavailable_once, "503-not-retried": unavailable_once,
    "models-drip": models_drip, "models-flood": models_flood, "models-html": models_html,
}


@pytest.fixture(scope="module")
def upstream():
    up = Upstream()
    for name, behaviour in BEHAVIOURS.items():
        up.on(name, behaviour)
    up.on("never-reads", never_reads, unread_body=True)
    yield up
    up.close()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, registry, upstream):
    """Our engine: one remote entry per behaviour and kind that a test needs, all on the stub, with small bounds."""
    url = upstream.url
    entries = "".join(entry(f"{name}-{kind}", url(name), kind, **BOUNDS)
                      for name in ("drip-head", "drip-body", "html", "redirect")
                      for kind in ("chat", "embedding", "stt", "tts"))
    entries += "".join(entry(name, url(name), **BOUNDS) for name in (
        "long-line", "long-event", "endless-stream", "many-chunks", "done-only", "empty-stream", "bad-usage"))
    entries += entry("flood-error", url("flood-error"), timeout=30)
    entries += "".join(entry(name, url(name), "embedding", **BOUNDS) for name in (
        "flood-json", "flood-json-undeclared", "nan-vector", "nan-vector-base64"))
    entries += entry("flood-audio", url("flood-audio"), "tts", **BOUNDS)
    entries += entry("never-reads", url("never-reads"), "stt")
    entries += entry("redirect-fallback", url("redirect"), fallback=(CHAT,))
    entries += entry("html-fallback", url("html"), fallback=(CHAT,))
    entries += entry("done-only-fallback", url("done-only"), fallback=(CHAT,))
    entries += "".join(entry(name, url(name), api_key_env=KEY_ENV)
                       for name in ("echo-key", "echo-key-stream", "echo-key-malformed"))
    entries += entry("503-retried", url("503-retried"), "embedding", max_retries=1)
    entries += entry("503-not-retried", url("503-not-retried"), "embedding", max_retries=0)
    registry_ = load_registry(tmp_path_factory.mktemp("gateway22"), entries, registry.cache_dir)
    eng = LocalEngine(registry_, limits=Limits(request_timeout_s=REQUEST_LIMIT))
    yield eng
    eng.close()


def ask(gateway: LocalEngine, model: str, kind: str, stream: bool = False):
    """One request of ``kind`` to ``model``, read to its end (a stream's chunks as a list)."""
    if kind == "chat":
        request = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        if stream:
            with gateway.chat_completion_stream(request) as chunks:
                return list(chunks)
        return gateway.chat_completion(request)
    if kind == "embedding":
        return gateway.embeddings({"model": model, "input": "hi"})
    if kind == "stt":
        return gateway.transcribe(b"RIFF" + b"\0" * (24 * MiB if model == "never-reads" else 40), {"model": model})
    if kind == "tts":
        if stream:
            with gateway.text_to_speech_stream({"model": model, "input": "hi", "voice": "alloy"}) as pieces:
                return list(pieces)
        return gateway.text_to_speech({"model": model, "input": "hi", "voice": "alloy", "response_format": "wav"})
    raise AssertionError(kind)


def outcome_within(seconds: float, fn, *args, **kwargs) -> tuple[float, object]:
    """(seconds taken, the result or the exception raised), or a failure if ``fn`` is still running after
    ``seconds``: a hang fails the test instead of holding the run."""
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["result"] = fn(*args, **kwargs)
        except BaseException as exc:   # the outcome under test
            box["result"] = exc

    started = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{getattr(fn, '__name__', fn)}{args} still running after {seconds:g}s"
    return time.monotonic() - started, box["result"]


def peak_mib(fn, *args) -> tuple[float, object]:
    """(peak MiB of Python memory while ``fn`` ran, its outcome)."""
    tracemalloc.start()
    try:
        _, outcome = outcome_within(60, fn, *args)
        return tracemalloc.get_traced_memory()[1] / MiB, outcome
    finally:
        tracemalloc.stop()


# -- 3. every remote call ends at the request deadline ------------------------------------------

DEADLINE_CASES = [(b, k, s) for b in ("drip-head", "drip-body") for k, s in
                  (("chat", False), ("chat", True), ("embedding", False), ("stt", False), ("tts", False),
                   ("tts", True))]


@pytest.mark.parametrize(("behaviour", "kind", "stream"), DEADLINE_CASES)
def test_every_remote_call_ends_at_the_request_deadline(gateway, behaviour, kind, stream):
    """Issue 22 item 3: a remote that sends one byte a second never trips a per-read timeout (2 s here); the
    request limit (3 s) ends the call all the same, whether it drips its headers or its body."""
    seconds, outcome = outcome_within(REQUEST_LIMIT + 15, ask, gateway, f"{behaviour}-{kind}", kind, stream)
    assert isinstance(outcome, sdk.TimeoutError), outcome
    assert "request_timeout_s" in str(outcome)
    assert seconds < REQUEST_LIMIT + SLACK


def test_an_upload_the_remote_never_reads_ends_at_the_request_deadline(gateway):
    """A transcription's audio (24 MiB) to a remote that reads none of it: the write blocks once the socket
    buffers are full, and the deadline ends it."""
    seconds, outcome = outcome_within(REQUEST_LIMIT + 15, ask, gateway, "never-reads", "stt")
    assert isinstance(outcome, sdk.TimeoutError), outcome
    assert seconds < REQUEST_LIMIT + SLACK


# -- 2. bounds on what a remote sends back ---------------------------------------------------------

@pytest.mark.parametrize(("model", "kind", "stream", "setting"), [
    ("flood-json", "embedding", False, "max_response_bytes) (Content-Length"),   # refused before reading
    ("flood-json-undeclared", "embedding", False, "max_response_bytes"),
    ("long-line", "chat", False, "max_sse_line_bytes"),
    ("long-line", "chat", True, "max_sse_line_bytes"),
    ("long-event", "chat", False, "max_sse_event_bytes"),
    ("endless-stream", "chat", True, "max_response_bytes"),
    ("many-chunks", "chat", False, "max_chunks"),
    ("flood-audio", "tts", False, "max_response_bytes"),
])
def test_an_answer_past_a_bound_is_a_502_naming_it(gateway, upstream, model, kind, stream, setting):
    """Issue 22 item 2: 64 MiB offered as one JSON body, one SSE line, one endless event, endless chunks or
    audio; the answer is a 502 naming the bound, and memory stays a small multiple of the 1 MiB bound."""
    before = upstream.sent(model)
    peak, outcome = peak_mib(ask, gateway, model, kind, stream)
    assert isinstance(outcome, sdk.ServerError) and outcome.status_code == 502, outcome
    assert f"remote.{setting}" in str(outcome) and model in str(outcome)
    assert peak < 24, f"{peak:.0f} MiB held while refusing {model}"
    assert upstream.sent(model) - before < FLOOD / 2   # the rest was never read


def test_chunks_are_bounded_only_when_collected(gateway):
    """max_chunks bounds a non-streamed answer (its chunks are all held at once); a stream passes them on."""
    assert len(ask(gateway, "many-chunks", "chat", stream=True)) == 200


def test_an_error_body_is_read_only_so_far(gateway, upstream):
    """A 500 with 64 MiB of message (no time limit in the way: 30 s per read, the default request limit): the
    remote's status is passed on with the start of its message, and only the start is read."""
    patient = LocalEngine(gateway.registry)
    try:
        peak, outcome = peak_mib(ask, patient, "flood-error", "chat")
    finally:
        patient.close()
    assert isinstance(outcome, sdk.ServerError) and outcome.status_code == 500, outcome
    assert len(str(outcome)) < 700 and peak < 24, f"{peak:.0f} MiB held for an error message"


# -- 6. only a 2xx of the expected type is an answer --------------------------------------------

@pytest.mark.parametrize("kind", ["chat", "embedding", "stt", "tts"])
@pytest.mark.parametrize(("behaviour", "says"), [("redirect", "HTTP 302"), ("html", "text/html")])
def test_a_redirect_or_a_page_is_a_502(gateway, behaviour, says, kind):
    """Issue 22 item 6: a 302, or a 200 text/html page (a captive portal), used to become an empty answer."""
    _, outcome = outcome_within(30, ask, gateway, f"{behaviour}-{kind}", kind)
    assert isinstance(outcome, sdk.ServerError) and outcome.status_code == 502, outcome
    assert says in str(outcome)


@pytest.mark.parametrize("model", ["done-only", "empty-stream"])
def test_a_stream_without_events_is_a_502(gateway, model):
    for stream in (False, True):
        _, outcome = outcome_within(30, ask, gateway, model, "chat", stream)
        assert isinstance(outcome, sdk.ServerError) and outcome.status_code == 502, outcome
        assert "no events" in str(outcome)


def test_a_broken_remote_hands_over_to_its_fallback(gateway):
    """The 502 is what lets fallback run (an empty stream is found out before the stream is handed over): a
    local SmolLM2 answers instead (under the default request limit: a local generation on a busy 2-core
    machine can take longer than the 3 s the other tests use)."""
    patient = LocalEngine(gateway.registry)
    try:
        for model in ("redirect-fallback", "html-fallback", "done-only-fallback"):
            reply = ask(patient, model, "chat")
            assert reply.pg_metadata.region == "local" and reply.choices[0].message.content
    finally:
        patient.close()


# -- 7. no credentials in base_url ----------------------------------------------------------------

@pytest.mark.parametrize(("base_url", "says"), [
    ("http://user:hunter2@127.0.0.1:9/v1", "user name or password"),
    ("http://:hunter2@127.0.0.1:9/v1", "user name or password"),
    ("https://127.0.0.1:9/v1?api_key=hunter2", "query string"),
    ("https://127.0.0.1:9/v1#hunter2", "query string"),
    ("http://127.0.0.1:notaport/v1", "not a valid URL"),
])
def test_base_url_with_credentials_or_a_query_is_refused(tmp_path, registry, base_url, says):
    """Issue 22 item 7: a password in base_url showed in model listings, pg_metadata, errors, logs and
    cassettes; keys belong in the variable api_key_env names."""
    from polargrid_local.store.registry import RegistryError

    with pytest.raises(RegistryError, match=says) as refused:
        load_registry(tmp_path, entry("far", base_url), registry.cache_dir)
    assert "hunter2" not in str(refused.value)


# -- 8. the key never comes back in a relayed message ---------------------------------------------

@pytest.mark.parametrize(("model", "error"), [("echo-key", sdk.AuthenticationError),
                                              ("echo-key-stream", sdk.RateLimitError),
                                              ("echo-key-malformed", sdk.ServerError)])
def test_relayed_messages_never_carry_the_key(gateway, monkeypatch, model, error):
    """Issue 22 item 8: an upstream that echoes the Authorization header gave our caller the key."""
    monkeypatch.setenv(KEY_ENV, KEY)
    for stream in (False, True):
        _, outcome = outcome_within(30, ask, gateway, model, "chat", stream)
        assert isinstance(outcome, error), outcome
        assert KEY not in str(outcome) and "[redacted]" in str(outcome)
        assert len(str(outcome)) < 700


# -- 9. bad values from upstream ------------------------------------------------------------------

def test_malformed_usage_is_read_leniently(gateway):
    """Issue 22 item 9: a non-numeric usage gave a 500 (non-streamed) or a stream cut without [DONE]."""
    reply = ask(gateway, "bad-usage", "chat")
    assert reply.choices[0].message.content == "Hello"
    assert reply.usage.prompt_tokens == 0 and reply.usage.completion_tokens == 0
    with running(gateway) as server:
        conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
        conn.request("POST", "/v1/chat/completions", json.dumps({
            "model": "bad-usage", "messages": [{"role": "user", "content": "hi"}], "stream": True,
            "stream_options": {"include_usage": True}}), {"Content-Type": "application/json"})
        response = conn.getresponse()
        body = response.read()
        conn.close()
    assert response.status == 200 and body.endswith(b"data: [DONE]\n\n"), body[-300:]
    assert b'"error"' not in body


@pytest.mark.parametrize("model", ["nan-vector", "nan-vector-base64"])
def test_non_finite_vectors_are_a_502_in_valid_json(gateway, model):
    """Issue 22 item 9: NaN/Infinity in an embedding reached the client as invalid JSON."""
    with pytest.raises(sdk.ServerError, match="finite") as refused:
        ask(gateway, model, "embedding")
    assert refused.value.status_code == 502
    with running(gateway) as server:
        conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
        conn.request("POST", "/v1/embeddings", json.dumps({"model": model, "input": "hi"}),
                     {"Content-Type": "application/json"})
        response = conn.getresponse()
        body = response.read()
        conn.close()
    assert response.status == 502
    json.loads(body, parse_constant=strict_constant)


def strict_constant(name: str):
    raise AssertionError(f"{name} in an answer: not JSON")


def test_answers_are_serialised_without_nan():
    """Issue 22 item 9: every JSON answer and SSE frame is written with allow_nan=False, so a NaN is a typed
    500 that says so instead of a body no strict parser reads."""
    from polargrid_local.server.app import json_response
    from polargrid_local.server.routes import _frame

    for write in (json_response, _frame):
        with pytest.raises(sdk.ServerError, match="could not be written as JSON"):
            write({"embedding": [float("nan")]})
        with pytest.raises(sdk.ServerError):
            write({"score": float("inf")})


# -- also: a 503 is retried ---------------------------------------------------------------------------

def test_a_503_is_retried(gateway, upstream):
    """An upstream 503 (Retry-After: 0) is retried within max_retries: one retry turns it into an answer,
    none leaves the 503 with the remote's message."""
    reply = gateway.embeddings({"model": "503-retried", "input": "hi"})
    assert reply.data[0].embedding == [0.5, -0.25, 1.0]
    assert upstream.calls[("503-retried", "embeddings")] == 2
    with pytest.raises(sdk.ServerError, match="warming up") as refused:
        gateway.embeddings({"model": "503-not-retried", "input": "hi"})
    assert refused.value.status_code == 503 and upstream.calls[("503-not-retried", "embeddings")] == 1


# -- 1. health answers at once, from what the background probes found -------------------------------

@pytest.fixture
def probed(tmp_path, registry, upstream, monkeypatch):
    """An engine whose remotes answer /models by dripping, by flooding, and with an HTML page."""
    monkeypatch.setattr(probes, "PROBE_TTL", 60.0)   # one probe per remote for the whole test
    entries = (entry("far-drip", upstream.url("models-drip")) + entry("far-flood", upstream.url("models-flood"))
               + entry("far-html", upstream.url("models-html")))
    eng = LocalEngine(load_registry(tmp_path, entries, registry.cache_dir))
    yield eng
    eng.close()


def test_health_answers_at_once_while_probes_run_one_at_a_time(probed, upstream):
    """Issue 22 item 1: a remote that drips /models held /health for over 25 s, each concurrent caller started
    its own probe, and a 64 MiB /models body was read whole. Now health answers from cached state at once;
    one probe per remote runs in the background, ends within its time cap, and reads no body."""
    calls_before = upstream.calls[("models-drip", "models")]
    flood_before = upstream.sent("models-flood")
    timings: list[float] = []

    def health() -> None:
        started = time.monotonic()
        assert probed.health().status == "healthy"
        timings.append(time.monotonic() - started)

    callers = [threading.Thread(target=health) for _ in range(8)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join(30)
    assert len(timings) == 8 and max(timings) < 1.0, timings
    assert probed.health().remotes == {"far-drip": "unknown", "far-flood": "unknown", "far-html": "unknown"}
    deadline = time.monotonic() + probes_cap() + SLACK + 2
    while "unknown" in probed.health().remotes.values() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert probed.health().remotes == {"far-drip": "down", "far-flood": "up", "far-html": "down"}
    assert upstream.calls[("models-drip", "models")] - calls_before == 1   # one probe, however many callers
    assert upstream.sent("models-flood") - flood_before < 16 * MiB      # the 64 MiB body was not read


def probes_cap() -> float:
    from polargrid_local.remote.backend import PROBE_TIMEOUT

    return PROBE_TIMEOUT


def test_a_drain_never_waits_on_a_probe(probed):
    """Issue 22 item 1: SIGTERM's drain waited for /health calls stuck on probes. /health over HTTP answers at
    once while the dripping remote is being probed, so the drain finds nothing in flight."""
    with running(probed) as server:
        started = time.monotonic()
        conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
        conn.request("GET", "/health")
        response = conn.getresponse()
        assert response.status == 200 and json.loads(response.read())["remotes"]["far-drip"] == "unknown"
        conn.close()
        assert time.monotonic() - started < 1.0
        assert drain(server, 10.0) and time.monotonic() - started < 2.0

"""Property-based fuzzing of the gateway with Hypothesis: a hostile upstream whose answers are generated.

The remote models of a real LocalEngine point at tests/upstream.py's stub on loopback; each example draws
what the stub answers (status, content type, a good answer or drawn values in its shape, event-stream
framings, garbage, floods past the bounds, lengths that lie, slow delivery) and one request through the
real HTTP facade (chat and completions, streamed or not, embeddings, transcription, speech).

The properties, for every example, as tests/test_hostile_http.py has them for hostile clients: the answer is
a well-formed HTTP response within the request limit (no hang); a status >= 400 carries a JSON error body
and no internal error; a 200 only ever stands for a 2xx upstream answer of the expected content type;
a 5xx is only a declared one (502 for a bad upstream, 504 for a timeout, or the
upstream's own 5xx passed on); a stream ends with ``data: [DONE]`` and every frame is strict JSON (no NaN);
Python memory stays bounded while the example runs; and the server still answers /health afterwards.

CI runs a bounded number of examples (profile "ci"); ``make fuzz`` runs many more (HYPOTHESIS_PROFILE=fuzz).
"""
from __future__ import annotations

import http.client
import json
import time
import tracemalloc
import uuid
from dataclasses import dataclass, field

import pytest
from conftest import MODELS_FILE
from hypothesis import given
from hypothesis import strategies as st
from test_hostile_http import PROFILE, fuzz_settings  # the same profiles: "ci" bounded, "fuzz" for make fuzz
from upstream import Handler, Upstream, chunk_for, event, good_answer

from polargrid_local import LocalEngine, Registry
from polargrid_local.limits import Limits
from polargrid_local.server import running

REQUEST_LIMIT = 3.0    # the gateway's request_timeout_s
TIMEOUT = 30           # seconds a client socket waits: past it the example fails as a hang
KiB, MiB = 1024, 1024 * 1024
BOUNDS = {"max_response_bytes": 256 * KiB, "max_sse_line_bytes": 16 * KiB, "max_sse_event_bytes": 64 * KiB,
          "max_chunks": 64}
MEMORY_MIB = 24        # Python memory an example may hold at its peak: the bounds are far below it
DECLARED_5XX = {502, 504}
STATUSES: dict[str, int] = {}   # our answers, by status, for the summary line


# -- what the upstream answers --------------------------------------------------------------------

@dataclass
class Answer:
    """One drawn upstream answer: status line and headers, a body, and how it is delivered."""

    status: int
    content_type: str | None
    body: bytes = b""
    flood: tuple[bytes, int] | None = None     # (piece, total bytes) written after ``body``
    declared: int | None = None                # Content-Length sent (may lie), None: close-delimited
    pieces: int = 1                            # the body in this many writes...
    pause: float = 0.0                         # ...this many seconds apart
    extra: list[tuple[str, str]] = field(default_factory=list)

    def write(self, h: Handler, route: str) -> None:
        total = len(self.body) + (self.flood[1] if self.flood else 0)
        h.raw(h.head(self.status, self.content_type, self.declared if self.declared is not None else None,
                     self.extra))
        step = max(1, len(self.body) // self.pieces + 1)
        for start in range(0, len(self.body), step):
            h.raw(self.body[start:start + step])
            if self.pause:
                time.sleep(self.pause)
        if self.flood:
            piece, size = self.flood
            block = piece * max(1, (64 * KiB) // len(piece))
            sent = len(self.body)
            while sent < total:
                h.raw(block[:total - sent])
                sent += min(len(block), total - sent)


ROUTES = ["chat", "chat-stream", "completion", "completion-stream", "embeddings", "transcription", "speech"]
UPSTREAM_ROUTE = {"chat": "chat/completions", "chat-stream": "chat/completions", "completion": "completions",
                  "completion-stream": "completions", "embeddings": "embeddings",
                  "transcription": "audio/transcriptions", "speech": "audio/speech"}

text = st.text(max_size=12)
numbers = st.one_of(st.integers(-2, 2 ** 70), st.floats(allow_nan=False, allow_infinity=False),
                    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "-0", "1e-400"]))
values = st.recursive(st.one_of(st.none(), st.booleans(), numbers, text),
                      lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
                      max_leaves=6)


def raw_json(value) -> bytes:
    """JSON text in which the strings NaN/Infinity/1e400... become bare literals, as a broken server writes them."""
    text_ = json.dumps(value)
    for literal in ("NaN", "Infinity", "-Infinity", "1e400", "-0", "1e-400"):
        text_ = text_.replace(f'"{literal}"', literal)
    return text_.encode()


def maybe(value_strategy, good):
    """The good value most of the time, a drawn one otherwise."""
    return st.one_of(st.just(good), st.just(good), value_strategy)


@st.composite
def chunks(draw, route: str) -> bytes:
    """An event stream of drawn chunks in drawn framings."""
    end = draw(st.sampled_from([b"\n", b"\r\n", b"\r"]))
    out = b""
    for _ in range(draw(st.integers(0, 6))):
        chunk = chunk_for(route, draw(maybe(text, "Hi")), draw(st.sampled_from([None, None, "stop", "length", "x"])))
        for key in draw(st.lists(st.sampled_from(["id", "created", "choices", "usage", "model", "object"]),
                                 max_size=2)):
            chunk[key] = draw(values)
        if draw(st.integers(0, 5)) == 0:
            chunk = {"error": draw(maybe(values, {"message": "upstream broke", "code": 500})),
                     **draw(st.dictionaries(st.sampled_from(["status"]), values, max_size=1))}
        data = raw_json(chunk)
        if draw(st.integers(0, 4)) == 0:   # data split over several lines, with comments and fields around
            cut = draw(st.integers(0, len(data)))
            out += b": keep-alive" + end + b"event: message" + end + b"data: " + data[:cut] + end + b"data:" \
                + data[cut:] + end + end
        else:
            out += b"data: " + data + end + end
    if draw(st.booleans()):
        out += b"data: [DONE]" + end + end
    if draw(st.integers(0, 5)) == 0:
        out += draw(st.binary(max_size=64))
    return out


@st.composite
def json_body(draw, route: str) -> bytes:
    """An answer of the route's JSON shape with drawn values in drawn places."""
    _, good = good_answer(route)
    data = json.loads(good)
    if route == "embeddings":
        data["data"][0]["embedding"] = draw(st.one_of(st.lists(numbers, max_size=4), values,
                                                      st.just("AACAPwAAgH8="), st.just("!!notbase64")))
        data["data"][0]["index"] = draw(maybe(values, 0))
        data["usage"] = draw(maybe(values, data["usage"]))
        if draw(st.integers(0, 4)) == 0:
            data["data"] = draw(values)
    else:
        for key in draw(st.lists(st.sampled_from(["text", "language", "duration", "segments", "words", "x"]),
                                 max_size=2)):
            data[key] = draw(values)
    if draw(st.integers(0, 6)) == 0:
        data = draw(values)
    return raw_json(data)


@st.composite
def answers(draw, route: str) -> Answer:
    upstream_route = UPSTREAM_ROUTE[route]
    expected_type, good = good_answer(upstream_route)
    status = draw(st.sampled_from([200] * 30 + [201, 204, 301, 302, 400, 401, 403, 404, 408, 413, 422, 429, 500,
                                                502, 503, 504, 599]))
    content_type = draw(st.one_of(*[st.just(expected_type)] * 6, st.sampled_from(
        ["application/json", "text/event-stream", "text/html", "text/plain", "audio/wav", "application/x-ndjson",
         "", None, f"{expected_type}; charset=utf-8", expected_type.upper()])))
    kind = draw(st.sampled_from(["good", "good", "values", "values", "values", "garbage", "flood", "error"]))
    answer = Answer(status, content_type)
    if kind == "good":
        answer.body = good
    elif kind == "values":
        answer.body = draw(chunks(upstream_route)) if expected_type == "text/event-stream" else \
            draw(json_body(upstream_route)) if expected_type == "application/json" else draw(st.binary(max_size=256))
    elif kind == "garbage":
        answer.body = draw(st.binary(max_size=2048))
    elif kind == "error":
        answer.body = raw_json(draw(maybe(values, {"error": {"message": "no", "param": "model"}})))
    else:
        piece = draw(st.sampled_from([b"x", b"0,", b"data: x\n", event(chunk_for(upstream_route)), b"\n"]))
        answer.body = good[:draw(st.integers(0, len(good)))]
        answer.flood = (piece, draw(st.sampled_from([100 * KiB, 300 * KiB, 2 * MiB, 32 * MiB])))
    size = len(answer.body) + (answer.flood[1] if answer.flood else 0)
    declared = draw(st.sampled_from(["true", "true", "none", "more", "less"]))
    answer.declared = {"true": size, "none": None, "more": size + 100, "less": max(0, size - 10)}[declared]
    delivery = draw(st.sampled_from(["once"] * 8 + ["pieces", "slow"]))
    if delivery != "once":
        answer.pieces = draw(st.integers(2, 8))
        answer.pause = 0.01 if delivery == "pieces" else draw(st.sampled_from([0.3, 0.8]))
    if draw(st.integers(0, 4)) == 0:
        answer.extra.append(draw(st.sampled_from([("Retry-After", "0"), ("Retry-After", "1e400"),
                                                  ("Retry-After", "Wed, 21 Oct 2099 07:28:00 GMT"),
                                                  ("Retry-After", "-5"), ("Location", "http://127.0.0.1:9/x"),
                                                  ("Content-Encoding", "gzip"), ("Transfer-Encoding", "chunked")])))
    return answer


# -- the gateway ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def upstream():
    up = Upstream()
    up.plan = None
    up.on("gen", lambda h, route, body: up.plan.write(h, route))
    yield up
    up.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory, registry, upstream):
    entries = ""
    for model_id, kind in (("far-chat", "chat"), ("far-embed", "embedding"), ("far-stt", "stt"),
                           ("far-tts", "tts")):
        remote = {"base_url": upstream.url("gen"), "model": "m", "timeout": 1, "max_retries": 1, **BOUNDS}
        entries += (f'[[models]]\nid = "{model_id}"\nkind = "{kind}"\n[models.remote]\n'
                    + "".join(f"{k} = {json.dumps(v)}\n" for k, v in remote.items()) + "\n")
    path = tmp_path_factory.mktemp("hostile-upstream") / "models.toml"
    path.write_text(MODELS_FILE.read_text() + "\n" + entries)
    engine = LocalEngine(Registry.load(path, registry.cache_dir), limits=Limits(request_timeout_s=REQUEST_LIMIT))
    with running(engine, limits=Limits(request_timeout_s=REQUEST_LIMIT, header_timeout_s=3.0, body_timeout_s=3.0,
                                       keep_alive_timeout_s=3.0)) as srv:
        yield srv
    engine.close()
    print(f"\nhostile upstream ({PROFILE} profile): our answers by status {dict(sorted(STATUSES.items()))}")


def request_for(route: str) -> tuple[str, bytes, str]:
    """(path, body, content type) of one request to the gateway for ``route``."""
    stream = route.endswith("-stream")
    if route.startswith("chat"):
        return "/v1/chat/completions", json.dumps({"model": "far-chat", "stream": stream, "messages": [
            {"role": "user", "content": "hi"}], "stream_options": {"include_usage": True} if stream else None}
        ).encode(), "application/json"
    if route.startswith("completion"):
        return "/v1/completions", json.dumps({"model": "far-chat", "prompt": "hi", "stream": stream}).encode(), \
            "application/json"
    if route == "embeddings":
        return "/v1/embeddings", json.dumps({"model": "far-embed", "input": ["a", "b"]}).encode(), "application/json"
    if route == "speech":
        return "/v1/audio/speech", json.dumps({"model": "far-tts", "input": "hi", "voice": "alloy",
                                               "response_format": "wav"}).encode(), "application/json"
    boundary = uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\nfar-stt\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
            f"Content-Type: audio/wav\r\n\r\n").encode() + b"RIFF" + b"\0" * 40 + f"\r\n--{boundary}--\r\n".encode()
    return "/v1/audio/transcriptions", body, f"multipart/form-data; boundary={boundary}"


def strict_constant(name: str):
    raise AssertionError(f"{name} in an answer: not JSON")


def declared(status: int, message: str, answer: Answer) -> bool:
    """A 5xx is declared when it is a bad gateway or a timeout, or the upstream's own 5xx (its status line, or
    the status of an error it sent in its stream) passed on as such: the message then ends with that status."""
    return status in DECLARED_5XX or message.endswith(f", HTTP {status})")


def check(status: int, body: bytes, route: str, answer: Answer) -> None:
    STATUSES[status] = STATUSES.get(status, 0) + 1
    if status >= 400:
        error = json.loads(body, parse_constant=strict_constant)
        message = error["error"]["message"]
        assert message and error["status"] == status, error
        assert not message.startswith("internal error"), message
        assert status < 500 or declared(status, message, answer), (status, message)
        return
    assert status == 200, status
    expected_type, _ = good_answer(UPSTREAM_ROUTE[route])
    media_type = (answer.content_type or "").split(";")[0].strip().lower()
    assert 200 <= answer.status < 300 and media_type == expected_type, "a broken upstream answer became a 200"
    if route.endswith("-stream"):
        assert body.endswith(b"data: [DONE]\n\n"), body[-300:]
        for frame in body.split(b"\n\n"):
            if frame.startswith(b"data: {"):
                payload = json.loads(frame[6:], parse_constant=strict_constant)
                if "error" in payload:
                    message = payload["error"]["message"]
                    assert not message.startswith("internal error"), payload
                    assert payload["status"] < 500 or declared(payload["status"], message, answer), payload
    elif route != "speech":
        json.loads(body, parse_constant=strict_constant)


def send(server, path: str, body: bytes, content_type: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=TIMEOUT)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": content_type})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def still_serving(server) -> None:
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=TIMEOUT)
    conn.request("GET", "/health")
    response = conn.getresponse()
    assert response.status == 200 and json.loads(response.read())["status"] == "healthy"
    conn.close()


# -- the property -------------------------------------------------------------------------------------

@fuzz_settings
@given(data=st.data(), route=st.sampled_from(ROUTES))
def test_a_hostile_upstream_never_crashes_hangs_or_leaks_a_5xx(server, upstream, data, route):
    answer = data.draw(answers(route), label="upstream answer")
    upstream.plan = answer
    path, body, content_type = request_for(route)
    tracemalloc.start()
    started = time.monotonic()
    try:
        status, reply = send(server, path, body, content_type)
        peak = tracemalloc.get_traced_memory()[1] / MiB
    finally:
        tracemalloc.stop()
    assert time.monotonic() - started < REQUEST_LIMIT + 10, "the answer took longer than the request limit"
    check(status, reply, route, answer)
    assert peak < MEMORY_MIB, f"{peak:.1f} MiB at the peak"
    still_serving(server)

"""Property-based fuzzing of every HTTP route with Hypothesis: JSON bodies (valid-shaped and garbage),
multipart uploads, query strings, headers and raw request lines, against the real models.

The properties, for every example: the answer is a well-formed HTTP response; a status >= 400 carries a
JSON error body; nothing is a 5xx (the models are real and the inputs cheap, so an engine failure here is
a bug); no connection hangs (every socket has a timeout, and the server's read deadlines are short); and
the server still answers /health afterwards.

CI runs a bounded number of examples (profile "ci"); ``make fuzz`` runs many more (HYPOTHESIS_PROFILE=fuzz).
"""
from __future__ import annotations

import http.client
import io
import json
import os
import socket
import uuid
import wave

import numpy as np
import pytest
from conftest import CHAT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from polargrid_local.limits import Limits
from polargrid_local.server import running

_COMMON = dict(deadline=None, derandomize=False, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                      HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", 50)), **_COMMON)
settings.register_profile("fuzz", max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", 1000)), **_COMMON)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
fuzz_settings = settings(settings.get_profile(PROFILE))

TIMEOUT = 120          # seconds a socket may wait: a hang fails the example instead of the whole run
CHEAP_TOKENS = 3       # generation stays cheap: every max_tokens is clamped to this
DECLARED_REFUSALS = {501, 505}   # HTTP-level "not implemented" answers, declared for raw framing only
COUNTS: dict[str, int] = {}     # examples run, by property
STATUSES: dict[str, dict[int, int]] = {}   # answers, by property and status


@pytest.fixture(scope="module")
def server(engine):
    limits = Limits(header_timeout_s=3.0, body_timeout_s=3.0, keep_alive_timeout_s=3.0)
    with running(engine, limits=limits) as srv:
        yield srv
    COUNTS.pop("_current", None)
    print(f"\nhypothesis examples run ({PROFILE} profile): {COUNTS} total={sum(COUNTS.values())}; "
          f"statuses: { {kind: dict(sorted(t.items())) for kind, t in STATUSES.items()} }")


# -- strategies ----------------------------------------------------------------------------------

# Text includes lone surrogates sometimes: json.dumps writes them as \ud800 escapes, as a hostile client would.
text = st.text(st.one_of(st.characters(), st.characters(categories=["Cs"]), st.sampled_from("\x00\n\"\\{}")),
               max_size=24)
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(min_value=-2**70, max_value=2**70),
                    st.floats(allow_nan=False, allow_infinity=False), text)
anything = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
                        max_leaves=8)


def mostly(good, bad=anything):
    """Valid-shaped three times in four, so examples get past validation into the engine as often as not."""
    return st.one_of(good, good, good, bad)


models = mostly(st.sampled_from([CHAT, "smollm2", "text-embedding-3-small", "whisper-1", "tts-1", "nope", ""]))
message = st.fixed_dictionaries({"role": mostly(st.sampled_from(["user", "system", "assistant", "tool", "x"])),
                                 "content": mostly(text)})
sampling = {"max_tokens": mostly(st.integers(-2, 5)), "temperature": mostly(st.floats(-1, 3)),
            "top_p": mostly(st.floats(-1, 2)), "stop": mostly(text | st.lists(text, max_size=5)),
            "seed": mostly(st.integers(-2**64, 2**64)), "n": mostly(st.integers(0, 3)),
            "stream": mostly(st.booleans()), "stream_options": mostly(st.fixed_dictionaries(
                {"include_usage": st.booleans()}))}
chat_body = st.fixed_dictionaries(
    {"model": models, "messages": mostly(st.lists(message, min_size=1, max_size=3))},
    optional={**sampling, "max_completion_tokens": st.integers(-1, 5) | anything,
              "response_format": st.sampled_from([{"type": "json_object"}, {"type": "text"}, {"type": "x"}]) | anything,
              "tool_choice": st.sampled_from(["auto", "none", "required"]) | anything,
              "tools": st.lists(st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
                  {"name": text, "parameters": st.just({"type": "object", "properties": {}})})}), max_size=2)
              | anything})
completion_body = st.fixed_dictionaries({"model": models, "prompt": mostly(text | st.lists(text, max_size=3))},
                                        optional=sampling)
embedding_body = st.fixed_dictionaries({"model": models, "input": mostly(text | st.lists(text, max_size=3))},
                                       optional={"encoding_format": st.sampled_from(["float", "base64", "x"]) | anything,
                                                 "dimensions": anything})
speech_body = st.fixed_dictionaries(
    {"model": models, "input": text, "voice": st.sampled_from(["alloy", "nova", "joe", "x"]) | anything},
    optional={"response_format": st.sampled_from(["mp3", "wav", "pcm", "opus", "aac", "flac", "x"]) | anything,
              "speed": st.floats(-1, 5) | anything, "stream": st.booleans() | anything})
admin_body = st.fixed_dictionaries({}, optional={"model_name": models, "force": anything, "force_reload": anything,
                                                 "model": models})
JSON_ROUTES = {"/v1/chat/completions": chat_body, "/v1/completions": completion_body,
               "/v1/completions/stream": completion_body, "/v1/embeddings": embedding_body,
               "/v1/audio/speech": speech_body, "/v1/models/load": admin_body, "/v1/models/unload": admin_body,
               "/v1/gpu/purge": admin_body, "/v1/models/unload-all": admin_body}
GET_PATHS = ["/health", "/v1/models", "/v1/models/status", "/v1/gpu/status", "/v1/gpu/memory", "/v1/status",
             "/v1/usage", "/v1/audio/transcriptions", "/v1/audio/transcriptions/jobs", "/v1/models/{x}",
             "/v1/audio/transcriptions/jobs/{x}", "/v1/audio/transcriptions/jobs/{x}/result"]
QUERY_KEYS = ["job_id", "limit", "status", "start_date", "end_date", "model", "sync", "x"]


def _cheap(body):
    """Clamp what would make an example expensive (long generations), keep everything else as drawn."""
    if isinstance(body, dict):
        for key in ("max_tokens", "max_completion_tokens"):
            value = body.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > CHEAP_TOKENS:
                body[key] = CHEAP_TOKENS
        body.setdefault("max_tokens", CHEAP_TOKENS)
    return body


@st.composite
def wav_files(draw) -> bytes:
    rate = draw(st.sampled_from([8000, 16000, 22050, 44100]))
    samples = draw(st.integers(0, rate // 2))
    noise = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).integers(-3000, 3000, samples, dtype=np.int16)
    out = io.BytesIO()
    with wave.open(out, "wb") as wav:
        wav.setnchannels(draw(st.sampled_from([1, 2])))
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(noise.tobytes())
    return out.getvalue()


field_values = mostly(st.sampled_from([b"whisper-1", b"json", b"text", b"srt", b"verbose_json", b"vtt", b"en",
                                           b"fr", b"xx", b"true", b"false", b"0.2", b"nan", b"word", b"segment"]),
                      st.binary(max_size=12) | text.map(lambda t: t.encode("utf-8", "surrogatepass")))
form_fields = st.dictionaries(st.sampled_from(["model", "response_format", "language", "temperature", "prompt",
                                               "stream", "timestamp_granularities[]", "x"]), field_values, max_size=5)


@st.composite
def multipart_bodies(draw) -> tuple[bytes, str]:
    boundary = draw(mostly(st.sampled_from(["b", uuid.uuid4().hex]), st.sampled_from(["a b", "--", "x\"y"])))
    fields = draw(form_fields)
    if draw(st.integers(0, 4)):
        fields.setdefault("model", b"whisper-1")
    parts = [b"--%s\r\nContent-Disposition: form-data; name=\"%s\"\r\n\r\n%s\r\n" % (
        boundary.encode(), name.encode(), value) for name, value in fields.items()]
    if draw(st.integers(0, 5)):
        audio = draw(mostly(wav_files(), st.binary(max_size=64)))
        parts.append(b"--%s\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
                     b"Content-Type: audio/wav\r\n\r\n%s\r\n" % (boundary.encode(), audio))
    body = b"".join(parts) + (b"--%s--\r\n" % boundary.encode() if draw(st.booleans()) else draw(st.binary(max_size=8)))
    content_type = draw(mostly(st.sampled_from([f"multipart/form-data; boundary={boundary}",
                                                f'multipart/form-data; boundary="{boundary}"']),
                               st.sampled_from(["multipart/form-data", "application/json", ""])))
    return body, content_type


token = st.text(st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_!#$%&'*+.^`|~"),
                min_size=1, max_size=12)
header_value = st.text(st.characters(min_codepoint=0, max_codepoint=255, exclude_characters="\r\n"), max_size=20)
raw_headers = st.lists(st.tuples(st.sampled_from(["Content-Length", "Transfer-Encoding", "Host", "Connection",
                                                  "Expect", "Authorization", "Content-Type"]) | token,
                                 st.sampled_from(["0", "5", "+5", "-1", "1_5", "chunked", "gzip", "close",
                                                  "keep-alive", "100-continue", "Bearer x"]) | header_value),
                       max_size=5)


@st.composite
def raw_requests(draw) -> bytes:
    method = draw(st.sampled_from(["GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH", "BREW"]) | token)
    path = draw(st.sampled_from(list(JSON_ROUTES) + GET_PATHS + ["/", "*", "//x", "/v1/../health"])
                | st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=30))
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/0.9", "HTTX/1.1", ""]))
    line = " ".join(p for p in (method, path, version) if p)
    if draw(st.booleans()):
        line = draw(st.sampled_from(["", " ", "GET", "GET /", "GET /health HTTP/1.1 extra"])) or line
    headers = "".join(f"{k}: {v}\r\n" for k, v in draw(raw_headers))
    body = draw(st.binary(max_size=32))
    return (line + "\r\n" + headers + "Connection: close\r\n\r\n").encode("latin-1") + body


# -- checks ----------------------------------------------------------------------------------------

def count(kind: str) -> None:
    COUNTS[kind] = COUNTS.get(kind, 0) + 1
    COUNTS["_current"] = kind


def check_answer(status: int, body: bytes, head: bool = False, allowed: set[int] = frozenset()) -> None:
    tally = STATUSES.setdefault(COUNTS.get("_current", "?"), {})
    tally[status] = tally.get(status, 0) + 1
    assert 100 <= status < 600
    if status >= 400 and not head:
        error = json.loads(body)
        assert error["error"]["message"] and error["status"] == status, error
    assert status < 500 or status in allowed, body[:500]
    if body.startswith(b"data: "):   # a stream: every error frame is a client mistake, never a 5xx
        for frame in body.decode().split("\n\n"):
            if frame.startswith("data: {") and '"error"' in frame:
                assert json.loads(frame[6:])["status"] < 500, frame


def still_serving(server) -> None:
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=TIMEOUT)
    conn.request("GET", "/health")
    response = conn.getresponse()
    assert response.status == 200 and json.loads(response.read())["status"] == "healthy"
    conn.close()


def send(server, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=TIMEOUT)
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


# -- properties ------------------------------------------------------------------------------------

@fuzz_settings
@given(route=st.sampled_from(sorted(JSON_ROUTES)), data=st.data())
def test_json_routes_answer_every_body_without_a_5xx(server, route, data):
    body = data.draw(st.one_of(JSON_ROUTES[route].map(_cheap), anything.map(_cheap)), label="body")
    raw = json.dumps(body).encode()
    count("json")
    status, answer = send(server, "POST", route, raw, {"Content-Type": "application/json"})
    check_answer(status, answer)
    still_serving(server)


@fuzz_settings
@given(route=st.sampled_from(sorted(JSON_ROUTES)),
       raw=st.one_of(st.binary(max_size=64), st.sampled_from([b"[" * 3000, b'{"a": 1' + b"0" * 5000 + b"}", b"{}",
                                                              b'{"model": NaN}', b'{"model": -Infinity}', b"\xef\xbb\xbf{}",
                                                              b'{"model": "\\ud800"}', b"null", b'"x"'])))
def test_json_routes_answer_garbage_bytes_with_400(server, route, raw):
    count("bytes")
    status, answer = send(server, "POST", route, raw, {"Content-Type": "application/json"})
    check_answer(status, answer)
    takes_no_body = route == "/v1/models/unload-all" or route == "/v1/gpu/purge" and raw in (b"", b"{}")
    assert status != 200 or takes_no_body
    still_serving(server)


@fuzz_settings
@given(route=st.sampled_from(["/v1/audio/transcriptions", "/v1/audio/translations"]), upload=multipart_bodies(),
       query=st.dictionaries(st.sampled_from(QUERY_KEYS), st.text(max_size=8), max_size=2))
def test_audio_uploads_answer_without_a_5xx(server, route, upload, query):
    from urllib.parse import urlencode

    body, content_type = upload
    count("multipart")
    status, answer = send(server, "POST", route + ("?" + urlencode(query) if query else ""), body,
                          {"Content-Type": content_type})
    check_answer(status, answer)
    still_serving(server)


@fuzz_settings
@given(path=st.sampled_from(GET_PATHS), part=st.text(max_size=12),
       query=st.dictionaries(st.sampled_from(QUERY_KEYS), st.text(max_size=12), max_size=3),
       method=st.sampled_from(["GET", "HEAD", "DELETE", "PUT"]))
def test_get_routes_answer_any_query_without_a_5xx(server, path, part, query, method):
    from urllib.parse import quote, urlencode

    target = path.replace("{x}", quote(part.encode("utf-8", "surrogatepass"), safe="") or "x")
    if query:
        target += "?" + urlencode({k: v.encode("utf-8", "surrogatepass") for k, v in query.items()})
    count("get")
    status, answer = send(server, method, target, None, {})
    check_answer(status, answer, head=method == "HEAD")
    still_serving(server)


@fuzz_settings
@given(raw=raw_requests())
def test_raw_requests_get_one_well_formed_answer(server, raw):
    count("raw")
    with socket.create_connection(server.server_address[:2], timeout=TIMEOUT) as sock:
        sock.sendall(raw)
        response = http.client.HTTPResponse(sock, method="HEAD" if raw.startswith(b"HEAD ") else "GET")
        try:
            response.begin()   # raises on anything that is not a well-formed HTTP/1.x status line and headers
        except http.client.RemoteDisconnected:
            pytest.fail(f"no answer to {raw!r}")
        body = response.read()
    check_answer(response.status, body, head=raw.startswith(b"HEAD "), allowed=DECLARED_REFUSALS)
    still_serving(server)

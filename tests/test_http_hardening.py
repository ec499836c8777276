"""The HTTP facade against hostile clients: one regression test per class of defect (issue 9, HTTP side).

Raw sockets on 127.0.0.1 only. Every socket has a timeout, so a server that hangs fails the test instead
of hanging it.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import CHAT, MODELS_FILE

from polargrid_local.limits import Limits
from polargrid_local.server import running

KEY = "pg_hardening_key"


@pytest.fixture
def servers(engine):
    """Start servers with their own settings: ``servers(rate_limit=2)``; all of them stop after the test."""
    with contextlib.ExitStack() as stack:
        yield lambda **config: stack.enter_context(running(engine, **config))


@pytest.fixture(scope="module")
def server(engine):
    with running(engine) as srv:
        yield srv


def connect(server, timeout=120.0) -> socket.socket:  # generous: a loaded machine is slow, not hung
    return socket.create_connection(server.server_address[:2], timeout=timeout)


def read_all(sock: socket.socket) -> bytes:
    """Everything until the server closes (a socket timeout fails the test: the server must close)."""
    data = b""
    while True:
        try:
            piece = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not piece:
            return data
        data += piece


def responses(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Split a byte stream of Content-Length-framed HTTP/1.1 responses."""
    out = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        out.append((status, headers, rest[:length]))
        data = rest[length:]
    return out


def request_bytes(method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: x\r\n"
    for key, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
        head += f"{key}: {value}\r\n"
    return head.encode() + b"\r\n" + body


# -- defect 4: request desync ----------------------------------------------------------------

def test_a_request_smuggled_in_a_refused_body_is_never_run(servers, engine, monkeypatch):
    calls = []
    monkeypatch.setattr(engine, "unload_all_models", lambda: calls.append("unload-all"))
    srv = servers(api_keys=[KEY])
    inner = request_bytes("POST", "/v1/models/unload-all", b"{}", {"Authorization": f"Bearer {KEY}"})
    for outer_path in ("/v1/models/load", "/v1/no-such-route", "/health"):   # 401, 404, 405
        with connect(srv) as sock:
            sock.sendall(request_bytes("POST", outer_path, inner))
            answers = responses(read_all(sock))
        assert len(answers) == 1 and answers[0][0] in (401, 404, 405), answers
        assert answers[0][1].get("connection") == "close"
    assert calls == [], "the body of a refused request was run as a request"


@pytest.mark.parametrize("headers, status", [
    ({"Content-Length": "+5"}, 400), ({"Content-Length": "1_5"}, 400), ({"Content-Length": "-1"}, 400),
    ({"Content-Length": "5, 5"}, 400), ({"Content-Length": "0x5"}, 400),
    ({"Transfer-Encoding": "gzip"}, 501), ({"Transfer-Encoding": "chunked, gzip"}, 501),
    ({"Transfer-Encoding": "chunked"}, 411), ({"Transfer-Encoding": "chunked", "Content-Length": "5"}, 400),
])
def test_ambiguous_framing_is_refused_and_the_connection_closed(server, headers, status):
    head = "POST /v1/models/unload-all HTTP/1.1\r\nHost: x\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    with connect(server) as sock:
        sock.sendall(head.encode() + b"\r\nhello" + request_bytes("GET", "/health"))
        answers = responses(read_all(sock))
    assert [a[0] for a in answers] == [status]
    assert answers[0][1]["connection"] == "close" and json.loads(answers[0][2])["status"] == status


@pytest.mark.parametrize("raw", [
    b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",   # duplicates, even equal
    b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxx",
    b"GET /health HTTP/1.1\r\nX: a\r\n b\r\n\r\n",                           # obs-fold
    b"GET /health HTTP/1.1\r\nContent-Length : 0\r\n\r\n",                   # space before the colon
    b"GET /health HTTP/1.1\r\nno colon here\r\n\r\n",
    b"GET /\r\n",                                                          # HTTP/0.9
    b"GET  /health HTTP/1.1\r\n\r\n", b"GET /health HTTP/2.0\r\n\r\n", b"\x16\x03\x01\x02\x00\x01\r\n\r\n",
])
def test_malformed_requests_get_a_json_error_and_a_close(server, raw):
    with connect(server) as sock:
        sock.sendall(raw)
        answers = responses(read_all(sock))
    assert len(answers) == 1 and answers[0][0] in (400, 505)
    assert json.loads(answers[0][2])["error"]["message"]


# -- defect 5: slow clients and too many connections -----------------------------------------

def test_slow_and_idle_clients_are_cut_off(servers):
    srv = servers(limits=Limits(header_timeout_s=1.0, body_timeout_s=1.0, keep_alive_timeout_s=1.0))
    idle, half_head, half_body = connect(srv), connect(srv), connect(srv)
    half_head.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
    half_body.sendall(b'POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"model": "x", "inp')
    with idle, half_head, half_body:
        assert read_all(idle) == b""                      # idle: closed quietly
        assert [a[0] for a in responses(read_all(half_head))] == [408]
        got = read_all(half_body)
    assert [a[0] for a in responses(got)] == [408]


def test_a_drip_fed_header_is_cut_off_at_its_deadline(servers):
    srv = servers(limits=Limits(header_timeout_s=1.0, socket_timeout_s=30.0))
    with connect(srv) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\n")
        started = time.monotonic()
        closed = False
        while time.monotonic() - started < 10 and not closed:   # one byte every 0.2 s: no read ever idles
            try:
                sock.sendall(b"X")
            except OSError:
                closed = True
            time.sleep(0.2)
        assert closed or b" 408 " in read_all(sock)


def test_past_the_connection_cap_a_client_gets_503(servers):
    srv = servers(limits=Limits(max_connections=2))
    held = [connect(srv), connect(srv)]
    time.sleep(0.3)
    with connect(srv) as third:
        third.sendall(request_bytes("GET", "/health"))
        answers = responses(read_all(third))
    assert [a[0] for a in answers] == [503] and answers[0][1]["connection"] == "close"
    for sock in held:
        sock.close()
    deadline = time.monotonic() + 10
    while srv.open_connections and time.monotonic() < deadline:
        time.sleep(0.05)
    with connect(srv) as fourth:
        fourth.sendall(request_bytes("GET", "/health", headers={"Connection": "close"}))
        assert responses(read_all(fourth))[0][0] == 200


# -- defect 7: work outlives its caller ------------------------------------------------------

def _tokens(engine) -> int:
    return engine.pool.worker(engine.registry.get(CHAT))[0].backend.tokens_generated


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Count from 1 to 5000."}]}),
    ("/v1/completions", {"prompt": "1, 2, 3, 4,"}),
])
def test_a_non_streaming_request_stops_when_its_client_leaves(server, engine, path, body):
    payload = json.dumps({"model": CHAT, "max_tokens": 3000, "temperature": 0, **body}).encode()
    before = _tokens(engine)
    sock = connect(server)
    sock.sendall(request_bytes("POST", path, payload, {"Content-Type": "application/json"}))
    deadline = time.monotonic() + 60
    while _tokens(engine) - before < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _tokens(engine) - before >= 5, "generation never started"
    sock.close()
    spec = engine.registry.get(CHAT)
    deadline = time.monotonic() + 10
    while engine.pool.queue_depth(spec) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.pool.queue_depth(spec) == 0, "the generation ran on after its client left"
    stopped_at = _tokens(engine)
    time.sleep(1.0)
    assert _tokens(engine) == stopped_at and stopped_at - before < 2000


def test_a_transcription_stops_when_its_client_leaves(server, engine, monkeypatch):
    from conftest import SENTENCES

    audio = engine.text_to_speech({"model": "tts-1", "input": " ".join(SENTENCES * 3), "voice": "alloy",
                                   "response_format": "wav"})
    seen = []
    real = engine.speech.transcribe

    def recording(*args, **kwargs):
        opened = kwargs["on_open"]
        kwargs["on_open"] = lambda stream: (seen.append(stream), opened(stream))[1]
        return real(*args, **kwargs)

    monkeypatch.setattr(engine.speech, "transcribe", recording)
    boundary = "hardening"
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
            f"Content-Type: audio/wav\r\n\r\n").encode() + audio + f"\r\n--{boundary}--\r\n".encode()
    sock = connect(server)
    sock.sendall(request_bytes("POST", "/v1/audio/transcriptions", form,
                               {"Content-Type": f"multipart/form-data; boundary={boundary}"}))
    deadline = time.monotonic() + 30
    while not seen and time.monotonic() < deadline:
        time.sleep(0.01)
    assert seen, "the transcription never started"
    sock.close()
    deadline = time.monotonic() + 10
    while not seen[0]._results.cancelled and time.monotonic() < deadline:
        time.sleep(0.02)
    assert seen[0]._results.cancelled, "the transcription was not cancelled when its client left"


# -- defect 10: client mistakes are 400s naming the field ------------------------------------

OK_CHAT = json.dumps({"model": CHAT, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}).encode()


def _post(server, path, body: bytes, content_type="application/json"):
    with connect(server) as sock:
        sock.sendall(request_bytes("POST", path, body, {"Content-Type": content_type, "Connection": "close"}))
        return responses(read_all(sock))[0]


@pytest.mark.parametrize("path, body, field", [
    ("/v1/chat/completions", b'{"model": "x", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}", None),
    ("/v1/chat/completions", b'{"model": "x", "messages": ' + b"[" * 100 + b"]" * 100 + b"}", "messages" + "[0]" * 64),
    ("/v1/chat/completions", b'{"model": "x", "max_tokens": 1' + b"0" * 5000 + b', "messages": []}', None),
    ("/v1/chat/completions", OK_CHAT.replace(b'"max_tokens": 1', b'"temperature": NaN'), None),
    ("/v1/chat/completions", OK_CHAT.replace(b'"max_tokens": 1', b'"temperature": 1e999'), None),
    ("/v1/chat/completions", b'{"model": "x", "messages": [{"role": "user", "content": "\\ud800"}]}',
     "messages[0].content"),
    ("/v1/completions", b'{"model": "x", "prompt": ["ok", "\\udfff"]}', "prompt[1]"),
    ("/v1/embeddings", b'{"model": "x", "input": "\\ud800x"}', "input"),
    ("/v1/chat/completions", b'{"model": "x", "stream": "x", "messages": [{"role": "user", "content": "hi"}]}',
     "stream"),
    ("/v1/chat/completions", b'{"model": "x", "stream": -1, "messages": [{"role": "user", "content": "hi"}]}',
     "stream"),
    ("/v1/completions", b'{"model": "x", "stream": {}, "prompt": "hi"}', "stream"),
    ("/v1/completions", b'{"model": "x", "seed": "abc", "prompt": "hi"}', "seed"),
    ("/v1/completions", b'{"model": "x", "seed": 1.5, "prompt": "hi"}', "seed"),
    ("/v1/chat/completions", b'{"model": "x", "n": "2", "messages": []}', "n"),
    ("/v1/chat/completions", b'{"model": "x", "stream_options": [], "stream": true, "messages": []}',
     "stream_options"),
    ("/v1/audio/speech", b'{"model": "tts-1", "input": "hi", "voice": "alloy", "stream": "yes"}', "stream"),
    ("/v1/embeddings", b'{"model": "x", "input": "a", "encoding_format": 7}', "encoding_format"),
    ("/v1/chat/completions", b'\xff\xfe{}', None),
])
def test_client_mistakes_are_400_naming_the_field(server, path, body, field):
    status, _headers, payload = _post(server, path, body)
    error = json.loads(payload)
    assert status == 400, error
    if field is not None:
        assert error["error"]["param"] == field and field.split("[")[0].split(".")[0] in error["message"]


def test_multipart_fields_that_are_not_utf8_are_400(server):
    boundary = "b"
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"language\"\r\n\r\n").encode() + b"\xff\xfe" + (
        f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\nRIFF"
        f"\r\n--{boundary}--\r\n").encode()
    status, _headers, payload = _post(server, "/v1/audio/transcriptions", form, f"multipart/form-data; boundary={boundary}")
    assert status == 400 and json.loads(payload)["error"]["param"] == "language"
    form = form.replace(b'name="language"', b'name="stream"').replace(b"\xff\xfe", b"maybe")
    status, _headers, payload = _post(server, "/v1/audio/transcriptions", form, f"multipart/form-data; boundary={boundary}")
    assert status == 400 and json.loads(payload)["error"]["param"] == "stream"


# -- defect 11: guessing keys, and what the server tells strangers ---------------------------

def ask_with_key(srv, key, source="127.0.0.1"):
    """One request from ``source`` (any 127/8 address is this machine) with ``key``: (status, headers, body)."""
    sock = socket.socket()
    sock.settimeout(120)
    try:
        sock.bind((source, 0))
        sock.connect(srv.server_address[:2])
        sock.sendall(request_bytes("GET", "/v1/models", headers={"Authorization": f"Bearer {key}",
                                                                 "Connection": "close"}))
        return responses(read_all(sock))[0]
    finally:
        sock.close()


def test_failed_key_checks_are_rate_limited_per_address(servers):
    # The server's own tracker, built from its configured limit (no tracker swapped in): the window slides
    # over the last 60 s, so this test cannot straddle a window boundary.
    srv = servers(api_keys=[KEY], limits=Limits(auth_failures_per_minute=3))

    def ask(key):
        return ask_with_key(srv, key)

    assert [ask(f"guess{i}")[0] for i in range(3)] == [401, 401, 401]
    status, headers, _ = ask(KEY)          # even the right key: the address is not checked at all now
    assert status == 429 and 1 <= int(headers["retry-after"]) <= 60
    assert ask("x")[0] == 429


def test_nothing_over_http_names_the_host_or_the_model_cache(server, engine, monkeypatch):
    cache = str(engine.registry.cache_dir)
    for path in ("/health", "/v1/models/status", "/v1/models", "/v1/status", "/v1/gpu/status"):
        with connect(server) as sock:
            sock.sendall(request_bytes("GET", path, headers={"Connection": "close"}))
            status, _headers, body = responses(read_all(sock))[0]
        assert status == 200 and cache.encode() not in body, path
        assert socket.gethostname().encode() not in body or socket.gethostname() == "local", path
    from polargrid import NotFoundError

    def missing(model_id):
        raise NotFoundError(f"Model {model_id!r} is not downloaded: {cache}/models/x.gguf is missing")

    monkeypatch.setattr(engine, "get_model", missing)
    with connect(server) as sock:
        sock.sendall(request_bytes("GET", "/v1/models/foo", headers={"Connection": "close"}))
        status, _headers, body = responses(read_all(sock))[0]
    assert status == 404 and cache.encode() not in body and b"<model cache>" in body


# -- SIGTERM: a graceful drain ---------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_sigterm_drains_streams_refuses_new_work_and_exits_in_time(tmp_path):
    port, drain = _free_port(), 8.0
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "polargrid_local", "--models", str(MODELS_FILE), "serve",
                             "--port", str(port), "--drain-timeout-s", str(drain), "--preload", CHAT,
                             "--threads", "1"],   # one thread: the long stream cannot finish within the drain
                            stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).parent.parent,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.monotonic() + 120
        while "serving on" not in (tmp_path / "serve.log").read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            time.sleep(0.2)

        class Server:
            server_address = ("127.0.0.1", port)

        def open_stream(tokens):
            sock = connect(Server, timeout=60)
            body = json.dumps({"model": CHAT, "max_tokens": tokens, "temperature": 0, "stream": True,
                               "prompt": "1, 2, 3, 4, 5,"}).encode()    # a count the model does not end early
            sock.sendall(request_bytes("POST", "/v1/completions", body))
            first = sock.recv(65536)
            assert first.startswith(b"HTTP/1.1 200"), first
            return sock, first

        short, long_ = open_stream(2), open_stream(1500)   # one finishes within the drain, one cannot
        plain = connect(Server, timeout=60)                 # and a non-streaming one that cannot either
        plain.sendall(request_bytes("POST", "/v1/completions", json.dumps(
            {"model": CHAT, "max_tokens": 1500, "temperature": 0, "prompt": "1, 2, 3, 4, 5,"}).encode()))
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        time.sleep(0.5)
        try:
            with connect(Server, timeout=10) as late:
                late.sendall(request_bytes("GET", "/health"))
                answer = read_all(late)
            assert answer.startswith(b"HTTP/1.1 503") and b"shutting down" in answer
        except ConnectionRefusedError:
            pass                                              # already closed: also a refusal
        endings = []
        for sock, first in (short, long_):
            with sock:
                text = (first + read_all(sock)).decode()
            assert text.endswith("data: [DONE]\n\n\r\n0\r\n\r\n"), text[-300:]   # [DONE], then the last chunk
            endings.append("shutting down" in text)
        assert endings == [False, True], "the short stream must finish; the long one must end with an error frame"
        with plain:
            status, headers, body = responses(read_all(plain))[0]
        assert status == 503 and headers["connection"] == "close" and b"shutting down" in body
        assert proc.wait(timeout=drain + 15) == 0
        assert time.monotonic() - signalled < drain + 10
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def test_the_in_process_api_rejects_lone_surrogates_too(client):
    import polargrid

    with pytest.raises(polargrid.ValidationError) as info:
        client.chat_completion({"model": CHAT, "messages": [{"role": "user", "content": "a\ud800"}], "max_tokens": 2})
    assert info.value.details == {"field": "messages[0].content"}
    with pytest.raises(polargrid.ValidationError, match=r"input\[1\]"):
        client.embeddings({"model": "text-embedding-3-small", "input": ["ok", "\udfff"]})


def test_a_clip_shorter_than_one_analysis_window_is_transcribed_not_a_500(server):
    import io
    import wave

    out = io.BytesIO()
    with wave.open(out, "wb") as wav:       # found by the hostile suite: 1 sample at 8 kHz was a 500
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(8000)
        wav.writeframes(b"\x37\x00")
    form = (b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n--b\r\nContent-Disposition: '
            b'form-data; name="file"; filename="a.wav"\r\n\r\n' + out.getvalue() + b"\r\n--b--\r\n")
    status, _headers, body = _post(server, "/v1/audio/transcriptions", form, "multipart/form-data; boundary=b")
    assert status == 200, body


def test_an_unknown_language_code_is_a_400_naming_the_field(server):
    form = (b'--b\r\nContent-Disposition: form-data; name="language"\r\n\r\nwhisper-1\r\n'   # found by the fuzz
            b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n'
            b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\nRIFF\r\n--b--\r\n')
    status, _headers, body = _post(server, "/v1/audio/transcriptions", form, "multipart/form-data; boundary=b")
    assert status == 400 and json.loads(body)["error"]["param"] == "language", body


# -- issue 22 item 11: limits per address cannot be dodged by changing address ----------------------

def test_one_address_cannot_hold_every_connection(servers):
    srv = servers(limits=Limits(max_connections=8, max_connections_per_address=3))
    held = [connect(srv) for _ in range(3)]
    time.sleep(0.3)
    try:
        with connect(srv) as fourth:
            fourth.sendall(request_bytes("GET", "/health"))
            answers = responses(read_all(fourth))
        assert [a[0] for a in answers] == [503]
        assert "max_connections_per_address" in json.loads(answers[0][2])["message"]
        other = socket.socket()
        other.settimeout(120)
        try:   # another address (127.0.0.2 is this machine too) still gets in
            other.bind(("127.0.0.2", 0))
            other.connect(srv.server_address[:2])
            other.sendall(request_bytes("GET", "/health", headers={"Connection": "close"}))
            assert responses(read_all(other))[0][0] == 200
        finally:
            other.close()
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 10
    while srv.open_connections and time.monotonic() < deadline:
        time.sleep(0.05)
    with connect(srv) as again:   # the count goes down as connections close
        again.sendall(request_bytes("GET", "/health", headers={"Connection": "close"}))
        assert responses(read_all(again))[0][0] == 200


def test_key_guessing_from_many_addresses_meets_a_global_budget(servers):
    srv = servers(api_keys=[KEY], limits=Limits(auth_failures_per_minute=3, auth_failures_global_per_minute=5))
    statuses = [ask_with_key(srv, f"guess{i}", f"127.0.0.{2 + i}")[0] for i in range(5)]
    assert statuses == [401] * 5, "each address is under its own limit"
    status, headers, body = ask_with_key(srv, KEY, "127.0.0.50")   # a fresh address, even with the right key
    assert status == 429 and 1 <= int(headers["retry-after"]) <= 60
    assert "auth_failures_global_per_minute" in json.loads(body)["message"]


def test_ipv6_clients_are_counted_by_their_64_prefix():
    from polargrid_local.server.security import AuthFailures, RateLimiter, address_group

    assert address_group("2001:db8:1:2:aaaa::1") == address_group("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert address_group("2001:db8:1:3::1") != address_group("2001:db8:1:2::1")
    assert address_group("::ffff:192.0.2.7") == "192.0.2.7" and address_group("192.0.2.7") == "192.0.2.7"
    failures = AuthFailures(3, 1000, clock=lambda: 50.0)
    for i in range(3):
        failures.failed(address_group(f"2001:db8::{i + 1:x}"))
    assert failures.retry_after(address_group("2001:db8::ffff")) is not None, "the next address in the /64"
    assert failures.retry_after(address_group("2001:db8:0:1::1")) is None, "another /64"
    limiter = RateLimiter(2, clock=lambda: 30.0)
    assert [limiter.check(address_group(f"2001:db8::{i}")) for i in range(1, 4)][-1] is not None


def test_an_ipv6_server_counts_its_clients_by_prefix(servers):
    srv = servers(host="::1", api_keys=[KEY], limits=Limits(auth_failures_per_minute=2))

    def ask(key):
        with socket.create_connection(("::1", srv.server_address[1]), timeout=120) as sock:
            sock.sendall(request_bytes("GET", "/v1/models", headers={"Authorization": f"Bearer {key}",
                                                                     "Connection": "close"}))
            return responses(read_all(sock))[0]

    assert srv.url.startswith("http://[::1]:")
    assert [ask("x")[0], ask("y")[0], ask(KEY)[0]] == [401, 401, 429]
    assert list(srv.auth_failures.tracked()) == ["::/64"]


def test_tracking_many_addresses_stays_bounded_and_forgets_the_expired():
    from polargrid_local.server.security import TRACKED_ADDRESSES, AuthFailures, RateLimiter

    now = {"t": 0.0}
    failures = AuthFailures(3, 10 ** 9, clock=lambda: now["t"])
    limiter = RateLimiter(5, clock=lambda: now["t"])
    for i in range(TRACKED_ADDRESSES + 5000):
        address = f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"
        failures.failed(address)
        limiter.check(address)
    assert len(failures.tracked()) <= TRACKED_ADDRESSES and len(limiter.tracked()) <= TRACKED_ADDRESSES
    now["t"] = 61.0   # a minute later every entry has expired: the next call drops them
    failures.failed("10.255.255.255")
    limiter.check("10.255.255.255")
    assert len(failures.tracked()) == 1 and len(limiter.tracked()) == 1

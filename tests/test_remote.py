"""Remote models against real OpenAI-compatible servers on loopback: llama-cpp-python's own server
(`python -m llama_cpp.server` on the SmolLM2 GGUF) and a second polargrid_local facade.

Nothing here connects outside 127.0.0.1; the offline-guard test names a TEST-NET-1 address only
with the guard on, and refuses (and records) every non-loopback connect while it runs.
"""
from __future__ import annotations

import asyncio
import contextlib
import http.server
import ipaddress
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import CHAT, MODELS_FILE, chat_request
from polargrid import errors as sdk
from polargrid import types as sdk_types

from polargrid_local import LocalEngine, Registry
from polargrid_local.server import running
from polargrid_local.server.security import RateLimiter

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8,"  # the model keeps counting: a generation that does not stop early


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def remote_entry(model_id: str, base_url: str, model: str, *, timeout: float = 30, retries: int = 3,
                 fallback: tuple[str, ...] = (), kind: str = "chat", key_env: str | None = None) -> str:
    lines = [f'[[models]]\nid = "{model_id}"\nkind = "{kind}"']
    if fallback:
        lines.append("fallback = [" + ", ".join(f'"{f}"' for f in fallback) + "]")
    lines.append(f'[models.remote]\nbase_url = "{base_url}"\nmodel = "{model}"\ntimeout = {timeout}\n'
                 f"max_retries = {retries}")
    if key_env:
        lines.append(f'api_key_env = "{key_env}"')
    return "\n".join(lines) + "\n\n"


def local_entry(model_id: str, gguf: Path, *, fallback: tuple[str, ...] = (), extra: str = "") -> str:
    fb = ("fallback = [" + ", ".join(f'"{f}"' for f in fallback) + "]\n") if fallback else ""
    return (f'[[models]]\nid = "{model_id}"\nkind = "chat"\nlocal = "{gguf}"\n{fb}'
            f"[models.engine]\nn_ctx = 1024\n{extra}\n\n")


def registry_with(tmp_path: Path, entries: str, cache_dir: Path) -> Registry:
    path = tmp_path / "models.toml"
    path.write_text(MODELS_FILE.read_text() + "\n" + entries)
    return Registry.load(path, cache_dir)


def chat(model: str, content: str = "Write one sentence about cats.", **extra):
    return chat_request(content, **{"model": model, "max_tokens": 24, **extra})


# -- the remotes -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gguf(registry) -> Path:
    return registry.get(CHAT).path_in(registry.cache_dir)


@pytest.fixture(scope="module")
def llama_server(gguf):
    """llama-cpp-python's own OpenAI-compatible server, serving SmolLM2 as 'smol'."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
                             "--port", str(port), "--n_threads", "1", "--n_ctx", "2048", "--model_alias", "smol"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("llama_cpp.server did not start (is the [server] extra installed?)", pytrace=False)
        time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(30)


@pytest.fixture(scope="module")
def remote_engine(registry):
    """The engine behind the second facade: the 'cluster' our gateway forwards to."""
    eng = LocalEngine(registry)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def remote_facade(remote_engine):
    with running(remote_engine) as server:
        yield server


@pytest.fixture(scope="module")
def closed_port() -> int:
    return free_port()  # bound then released: nothing listens there


@pytest.fixture(scope="module")
def blackhole():
    """A loopback socket that completes the handshake and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    sock.close()


@pytest.fixture(scope="module")
def limited(remote_engine):
    """A facade in front of the same engine with --rate-limit 2 (its minute starts 1s before its end)."""
    with running(remote_engine, rate_limit=2) as server:
        yield server


@pytest.fixture(scope="module")
def keyed(remote_engine):
    with running(remote_engine, api_keys=["remote-secret"]) as server:
        yield server


class StallingRemote(http.server.BaseHTTPRequestHandler):
    """An OpenAI-style server that streams one chunk, then goes silent with the connection open: a remote
    that hangs mid-generation. It notes when its client hangs up."""

    protocol_version = "HTTP/1.1"
    hung_up = threading.Event()
    EVENTS = (b'data: {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m", '
              b'"choices": [{"index": 0, "delta": {"content": "Hello"}, "finish_reason": null}]}\n\n')

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.write(b"%x\r\n%s\r\n" % (len(self.EVENTS), self.EVENTS))
        self.wfile.flush()
        self.connection.settimeout(60)
        try:
            if self.connection.recv(1) == b"":   # blocks until the client hangs up
                type(self).hung_up.set()
        except OSError:
            type(self).hung_up.set()

    def log_message(self, *args) -> None:
        pass


class LingeringRemote(StallingRemote):
    """Streams one chunk and ``data: [DONE]``, then keeps the body open: the answer is complete, the body is not."""

    hung_up = threading.Event()   # its own: a lingering connection closing must not count for StallingRemote
    EVENTS = (b'data: {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m", '
              b'"choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": "stop"}]}\n\n'
              b"data: [DONE]\n\n")


@pytest.fixture(scope="module")
def lingering():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), LingeringRemote)
    server.daemon_threads = True
    server.block_on_close = False
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def stalling():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), StallingRemote)
    server.daemon_threads = True
    server.block_on_close = False   # a handler still waiting on a failed test's client must not hold teardown
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def working_remotes(llama_server, remote_facade) -> str:
    """Entries for remotes that answer: llama-cpp-python's server and a second facade (every kind)."""
    far = f"{remote_facade.url}/v1"
    return (remote_entry("far-llama", llama_server, "smol")
            + remote_entry("far-chat", far, CHAT)
            + remote_entry("far-embed", far, "smollm2-135m-embed", kind="embedding")
            + remote_entry("far-missing", far, "no-such-model")
            + remote_entry("far-tts", far, "tts-1", kind="tts")
            + remote_entry("far-stt", far, "whisper-1", kind="stt"))


@pytest.fixture(scope="module")
def failing_remotes(closed_port, blackhole, limited, keyed) -> str:
    """Entries for remotes that refuse: nothing listening, a black hole, a rate limit, a key; some with fallbacks."""
    dead = f"http://127.0.0.1:{closed_port}/v1"
    return (remote_entry("far-closed", dead, CHAT, timeout=2)
            + remote_entry("far-closed-fallback", dead, CHAT, timeout=2, fallback=("local-tight",))
            + remote_entry("far-closed-nowhere", dead, CHAT, timeout=2, fallback=("local-unpulled",))
            + remote_entry("far-blackhole", blackhole, CHAT, timeout=1, retries=0)
            + remote_entry("far-limited", f"{limited.url}/v1", "smollm2-135m-embed", kind="embedding", retries=1)
            + remote_entry("far-limited-once", f"{limited.url}/v1", "smollm2-135m-embed", kind="embedding",
                           retries=0)
            + remote_entry("far-keyed", f"{keyed.url}/v1", CHAT, key_env="H13_REMOTE_KEY"))


@pytest.fixture(scope="module")
def misbehaving_remotes(stalling, lingering) -> str:
    """Entries for the stub remotes: one that stalls mid-stream, one that leaves its body open after [DONE]."""
    return (remote_entry("far-stalling", stalling, "m", timeout=60)
            + remote_entry("far-lingering", lingering, "m", timeout=60))


@pytest.fixture(scope="module")
def local_fallbacks(gguf) -> str:
    """Local models that hand requests on to far-chat: one with a tiny queue, one that is not pulled."""
    return (local_entry("local-tight", gguf, fallback=("far-chat",), extra="n_parallel = 2\nmax_queue = 0")
            + '[[models]]\nid = "local-unpulled"\nkind = "chat"\nfallback = ["far-chat"]\nentry = "x.gguf"\n'
              'files = [{ path = "x.gguf", size = 1, pypi = "nothing==0:x.gguf" }]\n\n')


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, registry, working_remotes, failing_remotes, misbehaving_remotes, local_fallbacks):
    """Our engine, with remote entries for every remote above (all loopback) and local fallbacks."""
    entries = working_remotes + failing_remotes + misbehaving_remotes + local_fallbacks
    eng = LocalEngine(registry_with(tmp_path_factory.mktemp("gateway"), entries, registry.cache_dir))
    yield eng
    eng.close()


def direct_chat(url: str, body: dict) -> str:
    """The remote's own answer, asked without us in between."""
    response = httpx.post(f"{url}/chat/completions", json=body, timeout=120)
    response.raise_for_status()
    return response.json()["choices"][0]["message"]["content"]


def joined(stream) -> str:
    return "".join(c.delta.content or "" for chunk in stream for c in chunk.choices)


# -- forwarding ------------------------------------------------------------------------------

def test_chat_through_llama_cpp_server_equals_its_own_answer(gateway, llama_server):
    own = direct_chat(llama_server, chat("smol"))
    reply = gateway.chat_completion(chat("far-llama"))
    assert isinstance(reply, sdk_types.ChatCompletionResponse)
    assert reply.choices[0].message.content == own and own
    assert reply.model == "far-llama"
    assert reply.pg_metadata.region == "remote:" + llama_server.split("//")[1].split("/")[0]
    with gateway.chat_completion_stream(chat("far-llama")) as stream:
        chunks = list(stream)
    assert all(isinstance(c, sdk_types.ChatCompletionChunk) for c in chunks)
    assert "".join(c.delta.content or "" for chunk in chunks for c in chunk.choices) == own


def test_chat_and_completion_through_a_polargrid_facade(gateway, remote_engine, remote_facade):
    own = direct_chat(f"{remote_facade.url}/v1", chat(CHAT))
    assert own == remote_engine.chat_completion(chat(CHAT)).choices[0].message.content
    reply = gateway.chat_completion(chat("far-chat"))
    assert reply.choices[0].message.content == own
    assert reply.usage.completion_tokens > 0  # the remote's usage chunk, relayed
    with gateway.chat_completion_stream(chat("far-chat"), stream_options={"include_usage": True}) as stream:
        chunks = list(stream)
    assert joined(chunks) == own and chunks[-1].usage is not None
    request = {"model": "far-chat", "prompt": COUNTING, "max_tokens": 8, "temperature": 0}
    expected = remote_engine.completion({**request, "model": CHAT}).choices[0].text
    assert gateway.completion(request).choices[0].text == expected
    with gateway.completion_stream(request) as stream:
        assert "".join(c.text for chunk in stream for c in chunk.choices) == expected


def test_finished_streams_give_their_connection_back_for_the_next_request(gateway, remote_facade, monkeypatch):
    """A relay reads the remote's body to its end (past ``data: [DONE]``), so its keep-alive connection serves
    the next request: a new TCP connection (and a new handler thread at the remote) per request cost the
    gateway a connect and the remote an accept on every token stream."""
    accepted = []
    original = remote_facade.process_request
    monkeypatch.setattr(remote_facade, "process_request",
                        lambda request, address: (accepted.append(address), original(request, address)))
    request = {"model": "far-chat", "prompt": COUNTING, "max_tokens": 4, "temperature": 0}
    for _ in range(4):
        with gateway.completion_stream(request) as stream:
            assert "".join(c.text for chunk in stream for c in chunk.choices)
        gateway.chat_completion(chat("far-chat", max_tokens=4))
    assert len(accepted) <= 1, f"{len(accepted)} connections for 8 requests, one after another"


def test_completion_sampling_extras_reach_the_remote(gateway, remote_engine):
    """min_p and repetition_penalty are not in the SDK's completion request; a remote gets them all the same."""
    plain = {"prompt": COUNTING, "max_tokens": 16, "temperature": 0}
    penalised = {**plain, "repetition_penalty": 1.8}
    expected = remote_engine.completion({**penalised, "model": CHAT}).choices[0].text
    assert expected != remote_engine.completion({**plain, "model": CHAT}).choices[0].text  # the knob shows
    assert gateway.completion({**penalised, "model": "far-chat"}).choices[0].text == expected


def test_embeddings_through_a_polargrid_facade(gateway, remote_engine):
    texts = ["the cat sat", "on the mat"]
    own = remote_engine.embeddings({"model": "smollm2-135m-embed", "input": texts})
    got = gateway.embeddings({"model": "far-embed", "input": texts})
    assert isinstance(got, sdk_types.EmbeddingResponse) and got.model == "far-embed"
    assert len(got.data) == 2
    for mine, theirs in zip(got.data, own.data):
        assert mine.embedding == pytest.approx(theirs.embedding, abs=1e-6)
    assert got.usage.prompt_tokens == own.usage.prompt_tokens


# -- errors ----------------------------------------------------------------------------------

def test_remote_errors_become_sdk_errors_with_the_remote_message(gateway):
    with pytest.raises(sdk.NotFoundError, match="no-such-model.*is not a known chat model"):
        gateway.chat_completion(chat("far-missing"))
    with pytest.raises(sdk.ValidationError, match="top_k must be 0") as bad:
        gateway.chat_completion(chat("far-chat", top_k=-1))
    assert bad.value.details["field"] == "top_k"
    with pytest.raises(sdk.ServerError, match="top_k") as failed:  # llama_cpp.server answers a bad top_k with 500
        gateway.chat_completion(chat("far-llama", top_k=-1))
    assert failed.value.status_code == 500


def test_connection_refused_is_a_clear_502_after_retries(gateway):
    started = time.monotonic()
    with pytest.raises(sdk.ServerError, match="connection refused.*is the server running") as refused:
        gateway.chat_completion(chat("far-closed"))
    assert refused.value.status_code == 502
    assert 0.5 < time.monotonic() - started < 10  # retried with backoff, within the model's 2s deadline


def test_a_remote_that_never_answers_times_out(gateway):
    started = time.monotonic()
    with pytest.raises(sdk.TimeoutError, match="did not answer within 1s"):
        gateway.chat_completion(chat("far-blackhole"))
    assert time.monotonic() - started < 10


def test_429_is_retried_after_retry_after_then_mapped(gateway, limited):
    def fresh_window() -> dict:
        """A real minute window, held at its last second until ``start`` is set, then running in real time."""
        clock = {"start": float("inf")}
        limited.limiter = RateLimiter(2, clock=lambda: 59.0 + max(0.0, time.monotonic() - clock["start"]))
        return clock

    clock = fresh_window()
    gateway.embeddings({"model": "far-limited", "input": "text 1"})
    gateway.embeddings({"model": "far-limited", "input": "text 2"})
    clock["start"] = started = time.monotonic()
    gateway.embeddings({"model": "far-limited", "input": "text 3"})  # 429, Retry-After: 1, then served
    assert time.monotonic() - started >= 0.9  # it waited out the remote's Retry-After (one retry allowed)

    clock = fresh_window()
    gateway.embeddings({"model": "far-limited-once", "input": "a"})
    gateway.embeddings({"model": "far-limited-once", "input": "b"})
    clock["start"] = time.monotonic()
    with pytest.raises(sdk.RateLimitError, match="Rate limit of 2 requests per minute") as limited_error:
        gateway.embeddings({"model": "far-limited-once", "input": "c"})
    assert limited_error.value.retry_after == 1


def test_api_key_comes_from_the_named_environment_variable(gateway, monkeypatch):
    monkeypatch.delenv("H13_REMOTE_KEY", raising=False)
    with pytest.raises(sdk.AuthenticationError, match=r"\$H13_REMOTE_KEY, which is not set"):
        gateway.chat_completion(chat("far-keyed"))
    monkeypatch.setenv("H13_REMOTE_KEY", "wrong")
    with pytest.raises(sdk.AuthenticationError, match="Invalid or missing API key"):
        gateway.chat_completion(chat("far-keyed"))
    monkeypatch.setenv("H13_REMOTE_KEY", "remote-secret")
    assert gateway.chat_completion(chat("far-keyed")).choices[0].message.content


# -- streams: concurrent, and cancelled upstream ---------------------------------------------

def long_request(model: str) -> dict:
    return {"model": model, "prompt": COUNTING, "max_tokens": 600, "temperature": 0}


def test_remote_streams_flow_concurrently(gateway, remote_engine):
    remote_spec = remote_engine.registry.get(CHAT)
    streams = [gateway.completion_stream(long_request("far-chat")) for _ in range(4)]
    try:
        for stream in streams:  # the first piece of text of each, in turn
            next(c for chunk in stream for c in chunk.choices if c.text)
        # Had the relays run one after another, the first stream would have ended (at the remote too)
        # before the last one produced anything.
        assert remote_engine.pool.queue_depth(remote_spec) == 4
    finally:
        for stream in streams:
            stream.close()


def remote_tokens(engine: LocalEngine) -> int:
    return sum(m.tokens for m in engine.get_usage().usage.by_model if m.model_id == CHAT)


def test_closing_a_stream_stops_the_remote_generation(gateway, remote_engine):
    remote_spec = remote_engine.registry.get(CHAT)
    deadline = time.monotonic() + 120
    while remote_engine.pool.queue_depth(remote_spec) and time.monotonic() < deadline:
        time.sleep(0.1)  # earlier tests' streams are gone
    before = remote_tokens(remote_engine)
    stream = gateway.completion_stream(long_request("far-chat"))
    for _ in range(3):
        next(stream)
    assert remote_engine.pool.queue_depth(remote_spec) == 1
    stream.close()
    deadline = time.monotonic() + 120
    while remote_engine.pool.queue_depth(remote_spec) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert remote_engine.pool.queue_depth(remote_spec) == 0
    # A generation that ran to its end books its 600 tokens at the remote; a cancelled one books none.
    assert remote_tokens(remote_engine) - before < 300


def wait_until_idle(engine: LocalEngine, seconds: float = 120) -> None:
    spec = engine.registry.get(CHAT)
    deadline = time.monotonic() + seconds
    while engine.pool.queue_depth(spec) and time.monotonic() < deadline:
        time.sleep(0.05)


def test_async_clients_stream_from_a_remote_and_a_cancelled_task_stops_it(gateway, remote_engine):
    """``async for`` reads a remote stream on a pump thread; cancelling the task interrupts a blocked read."""
    from polargrid_local import PolarGrid

    wait_until_idle(remote_engine)
    own = remote_engine.chat_completion(chat(CHAT)).choices[0].message.content
    client = PolarGrid(engine=gateway)
    remote_spec = remote_engine.registry.get(CHAT)

    async def scenario() -> int:
        chunks = [c async for c in client.chat_completion_stream(chat("far-chat"))]
        assert joined(chunks) == own
        assert (await client.chat_completion(chat("far-chat"))).choices[0].message.content == own
        wait_until_idle(remote_engine)
        before = remote_tokens(remote_engine)

        async def read_long() -> None:
            async for _chunk in client.completion_stream(long_request("far-chat")):
                pass

        task = asyncio.create_task(read_long())
        deadline = time.monotonic() + 60
        while not remote_engine.pool.queue_depth(remote_spec) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return before

    before = asyncio.run(scenario())
    wait_until_idle(remote_engine)
    assert remote_engine.pool.queue_depth(remote_spec) == 0
    assert remote_tokens(remote_engine) - before < 300    # a generation run to its end books 600


class BackgroundReader:
    """Reads the rest of a stream on its own thread (blocked on the remote, as a handler would be), so the test
    can stop it from here; ``outcome`` is None for a clean end, else what the reader caught."""

    def __init__(self, stream) -> None:
        self.stream, self.ended = stream, threading.Event()
        self.outcome: BaseException | None = None
        threading.Thread(target=self._read, daemon=True).start()
        time.sleep(0.3)   # let it block in the read

    def _read(self) -> None:
        try:
            for _chunk in self.stream:
                pass
        except BaseException as exc:  # the reader's view, checked by the test
            self.outcome = exc
        self.ended.set()


def test_unloading_a_remote_model_ends_a_blocked_read_with_a_503(gateway, remote_engine):
    """The reader of a remote stream is blocked on the remote's next token when the model is unloaded: it gets
    the unload's 503 at once, and the remote stops generating."""
    wait_until_idle(remote_engine)
    before = remote_tokens(remote_engine)
    stream = gateway.completion_stream(long_request("far-chat"))
    for _ in range(3):
        next(stream)
    reader = BackgroundReader(stream)
    started = time.monotonic()
    gateway.unload_model({"model_name": "far-chat"})
    assert reader.ended.wait(30) and time.monotonic() - started < 15
    assert isinstance(reader.outcome, sdk.ServerError) and reader.outcome.status_code == 503
    wait_until_idle(remote_engine)
    assert remote_tokens(remote_engine) - before < 300
    assert gateway.completion({**long_request("far-chat"), "max_tokens": 4}).choices[0].text  # loads again


def test_closing_a_stream_whose_remote_stalled_hangs_up_at_once(gateway):
    """The remote sent one token and went silent: closing the stream from another thread (as the HTTP facade's
    watch does when its client leaves) interrupts the blocked read and hangs up on the remote, rather than
    waiting for the remote's 60 s timeout."""
    StallingRemote.hung_up.clear()
    stream = gateway.chat_completion_stream(chat("far-stalling"))
    assert next(c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content) == "Hello"
    reader = BackgroundReader(stream)
    started = time.monotonic()
    stream.close()
    assert reader.ended.wait(10) and time.monotonic() - started < 2
    assert reader.outcome is None           # a close ends the stream cleanly
    assert StallingRemote.hung_up.wait(5)


def test_an_answer_complete_at_done_is_not_held_by_a_body_left_open(gateway):
    """After [DONE] the relay reads the body's end only briefly (for keep-alive): a remote that leaves the body
    open costs its connection, not the caller's time, and the answer stays a success."""
    started = time.monotonic()
    reply = gateway.chat_completion(chat("far-lingering"))
    assert reply.choices[0].message.content == "Hi" and reply.choices[0].finish_reason == "stop"
    assert time.monotonic() - started < 5      # the remote's timeout is 60 s


def test_unloading_a_stalled_remote_model_frees_it_at_once(gateway):
    stream = gateway.chat_completion_stream(chat("far-stalling"))
    next(iter(stream))
    reader = BackgroundReader(stream)
    started = time.monotonic()
    reply = gateway.unload_model({"model_name": "far-stalling"})
    assert time.monotonic() - started < 2, reply    # not the 10 s unload wait: the client was freed at once
    assert reader.ended.wait(10), "the reader was still blocked 10 s after the unload"
    assert isinstance(reader.outcome, sdk.ServerError) and reader.outcome.status_code == 503


# -- fallback ------------------------------------------------------------------------------

def test_local_falls_back_to_remote_when_its_queue_is_full(gateway):
    busy = [gateway.completion_stream(long_request("local-tight")) for _ in range(2)]
    try:
        reply = gateway.chat_completion(chat("local-tight"))
        assert reply.pg_metadata.region.startswith("remote:")
        assert reply.model == "local-tight"
    finally:
        for stream in busy:
            stream.close()


def test_unpulled_local_falls_back_to_remote(gateway):
    assert gateway.chat_completion(chat("local-unpulled")).pg_metadata.region.startswith("remote:")


def test_load_refused_for_memory_falls_back_to_remote(gateway):
    tight = LocalEngine(gateway.registry, memory_budget_mb=1)
    try:
        reply = tight.chat_completion(chat("local-tight"))
        assert reply.pg_metadata.region.startswith("remote:")
        assert tight.pool.state(gateway.registry.get("local-tight")) == "failed"
    finally:
        tight.close()


def test_unreachable_remote_falls_back_to_local(gateway):
    reply = gateway.chat_completion(chat("far-closed-fallback"))
    assert reply.pg_metadata.region == "local" and reply.choices[0].message.content
    with pytest.raises(sdk.ServerError, match="connection refused.*fallbacks failed too: local-unpulled"):
        gateway.chat_completion(chat("far-closed-nowhere"))


# -- status and health -----------------------------------------------------------------------

def test_health_and_status_report_remotes_without_failing(tmp_path, registry, remote_facade, closed_port):
    entries = (remote_entry("far-up", f"{remote_facade.url}/v1", CHAT)
               + remote_entry("far-down", f"http://127.0.0.1:{closed_port}/v1", CHAT, timeout=2))
    eng = LocalEngine(registry_with(tmp_path, entries, registry.cache_dir))
    try:
        health = eng.health()   # at once: the probes start in the background
        assert isinstance(health, sdk_types.HealthResponse)
        assert health.status == "healthy" and health.backend.healthy
        assert health.remotes == {"far-up": "unknown", "far-down": "unknown"}
        deadline = time.monotonic() + 30
        while "unknown" in eng.health().remotes.values() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert eng.health().remotes == {"far-up": "up", "far-down": "down"}
        models = {m.id: m for m in eng.list_models().data}
        assert models["far-up"].pg_remote.status == "up" and models["far-down"].pg_remote.status == "down"
        assert models["far-down"].pg_regions == [f"remote:127.0.0.1:{closed_port}"]
        assert models[CHAT].pg_remote is None
        assert eng.get_model_status().remote == {"far-up": "up", "far-down": "down"}
    finally:
        eng.close()


# -- the offline guard -----------------------------------------------------------------------

def test_offline_guard_fails_fast_without_a_connection(tmp_path, registry, gguf, remote_facade, monkeypatch):
    attempts: list[object] = []
    real_connect = socket.socket.connect

    def guarded_connect(sock, address):
        host = address[0] if isinstance(address, tuple) else None
        if host is not None and not ipaddress.ip_address(host).is_loopback:
            attempts.append(address)
            raise OSError("test guard: non-loopback connect refused")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    import polargrid_local.host.offline as offline

    monkeypatch.setattr(offline, "offline_enabled", lambda: True)
    entries = (remote_entry("far-offline", "http://192.0.2.1:9/v1", CHAT)
               + remote_entry("far-offline-fallback", "http://192.0.2.1:9/v1", CHAT, fallback=("local-fb",))
               + remote_entry("far-loopback", f"{remote_facade.url}/v1", CHAT)
               + local_entry("local-fb", gguf))
    eng = LocalEngine(registry_with(tmp_path, entries, registry.cache_dir))
    try:
        started = time.monotonic()
        with pytest.raises(sdk.ServerError, match="offline mode is on.*not contacted") as refused:
            eng.chat_completion(chat("far-offline"))
        assert refused.value.status_code == 503 and time.monotonic() - started < 1
        assert eng.chat_completion(chat("far-offline-fallback")).pg_metadata.region == "local"
        assert eng.chat_completion(chat("far-loopback")).pg_metadata.region.startswith("remote:127.0.0.1")
        assert eng.health().remotes["far-offline"] == "offline"
    finally:
        eng.close()
    assert attempts == []


# -- the HTTP facade as a gateway ------------------------------------------------------------

def test_serve_is_a_gateway_with_our_keys_in_front(gateway, remote_facade):
    import openai

    with running(gateway, api_keys=["ours"]) as server:
        own = direct_chat(f"{remote_facade.url}/v1", chat(CHAT))
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="ours", max_retries=0)
        stream = client.chat.completions.create(stream=True, **chat("far-chat"))
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == own
        reply = client.chat.completions.create(**chat("far-chat"))
        assert reply.choices[0].message.content == own
        with pytest.raises(openai.NotFoundError, match="no-such-model"):
            client.chat.completions.create(**chat("far-missing"))
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{server.url}/v1", api_key="theirs", max_retries=0).chat.completions.create(
                **chat("far-chat"))


def test_a_client_leaving_the_gateway_hangs_up_on_a_stalled_remote(gateway):
    """Through the HTTP facade: the client reads the first token, then leaves while the remote is silent. The
    facade's watch thread closes the stream, which interrupts the handler's blocked read and hangs up."""
    StallingRemote.hung_up.clear()
    with running(gateway) as server:
        with socket.create_connection(("127.0.0.1", server.server_address[1])) as sock:
            body = json.dumps({**chat("far-stalling"), "stream": True}).encode()
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            received = b""
            sock.settimeout(10)
            while b"Hello" not in received:
                data = sock.recv(4096)
                assert data, "the gateway closed before the first token"
                received += data
        assert StallingRemote.hung_up.wait(5)     # the remote's own timeout is 60 s


# -- speech, where the remote offers it ------------------------------------------------------

def test_speech_and_transcription_through_a_polargrid_facade(gateway, remote_engine):
    from conftest import SENTENCES, word_error_rate

    spoken = gateway.text_to_speech({"model": "far-tts", "input": SENTENCES[0], "voice": "alloy",
                                     "response_format": "wav"})
    assert spoken[:4] == b"RIFF" and len(spoken) > 20000
    own = remote_engine.transcribe(spoken, {"model": "whisper-1"})
    heard = gateway.transcribe(spoken, {"model": "far-stt"})
    assert isinstance(heard, sdk_types.TranscriptionResponse)
    assert heard.text == own.text and word_error_rate(SENTENCES[0], heard.text) < 0.3
    assert gateway.transcribe(spoken, {"model": "far-stt", "response_format": "text"}).strip() == own.text.strip()
    with gateway.text_to_speech_stream({"model": "far-tts", "input": SENTENCES[1], "voice": "alloy",
                                        "response_format": "pcm"}) as stream:
        pieces = list(stream)
    assert stream.metadata().region.startswith("remote:127.0.0.1") and sum(map(len, pieces)) > 20000


# -- the registry ----------------------------------------------------------------------------

def test_registry_takes_remote_entries_and_refuses_keys_and_strangers(tmp_path, registry):
    from polargrid_local.store.pull import is_pulled
    from polargrid_local.store.registry import RegistryError

    reg = registry_with(tmp_path, remote_entry("far", "http://127.0.0.1:9/v1/", "m", fallback=(CHAT,)),
                        registry.cache_dir)
    spec = reg.get("far")
    assert spec.remote.base_url == "http://127.0.0.1:9/v1" and spec.fallback == (CHAT,) and is_pulled(reg, spec)
    with pytest.raises(RegistryError, match="never write a key into models.toml"):
        registry_with(tmp_path, remote_entry("far", "http://127.0.0.1:9/v1", "m") + 'api_key = "sk-123"\n',
                      registry.cache_dir)
    with pytest.raises(RegistryError, match="falls back to 'nowhere'"):
        registry_with(tmp_path, remote_entry("far", "http://127.0.0.1:9/v1", "m", fallback=("nowhere",)),
                      registry.cache_dir)
    with pytest.raises(RegistryError, match="falls back to 'smollm2-135m-embed', which is not another chat"):
        registry_with(tmp_path, remote_entry("far", "http://127.0.0.1:9/v1", "m", fallback=("smollm2-135m-embed",)),
                      registry.cache_dir)
    with pytest.raises(RegistryError, match="base_url must be an http"):
        registry_with(tmp_path, remote_entry("far", "ftp://127.0.0.1/v1", "m"), registry.cache_dir)

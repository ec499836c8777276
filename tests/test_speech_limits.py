"""Audio that would cost minutes or gigabytes, and client mistakes in speech requests: refused with a typed
error naming the field or the limit (400 / 429 / 504), never a 500, a hang or a silent truncation."""
from __future__ import annotations

import io
import json
import struct
import tracemalloc
import uuid

import av
import numpy as np
import polargrid
import pytest
from conftest import SENTENCES

from polargrid_local.audio import decode as decode_module
from polargrid_local.audio import decode_audio
from polargrid_local.limits import DEFAULT_LIMITS, Limits


def wav(samples: np.ndarray, rate: int = 16000, *, tag: int = 1, bits: int = 16, data_size: int | None = None
        ) -> bytes:
    """A WAV file written by hand, so that its header can say what a hostile client wants."""
    data = samples.astype("<f4").tobytes() if tag == 3 else (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()
    block = bits // 8
    size = len(data) if data_size is None else data_size
    return (b"RIFF" + struct.pack("<I", (36 + size) & 0xFFFFFFFF) + b"WAVEfmt " +
            struct.pack("<IHHIIHH", 16, tag, 1, rate, rate * block, block, bits) + b"data" + struct.pack("<I", size)
            + data)


def flac_silence(minutes: int) -> bytes:
    """Compressed silence: a few hundred KB that would decode to hundreds of MB."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="flac") as out:
        stream = out.add_stream("flac", rate=16000, layout="mono")
        zeros = np.zeros((1, 16000 * 60), np.int16)
        for minute in range(minutes):
            frame = av.AudioFrame.from_ndarray(zeros, format="s16", layout="mono")
            frame.sample_rate, frame.pts = 16000, minute * 16000 * 60
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buffer.getvalue()


@pytest.fixture
def limits(engine, monkeypatch):
    """Set the engine's limits for one test (engine.limits is read wherever it is set)."""
    def use(**fields):
        monkeypatch.setattr(engine, "limits", Limits(**fields), raising=False)
    return use


# -- the file itself --------------------------------------------------------------------------------

@pytest.mark.timeout(120)   # before the fix, whisper spent 160-370 s on 16 KB of NaN
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_samples_are_refused(client, value):
    samples = np.full(4000, value, np.float32)
    samples[::2] = 0.1
    with pytest.raises(polargrid.ValidationError, match="not finite") as info:
        client.transcribe(wav(samples, tag=3, bits=32), {"model": "whisper-1"})
    assert info.value.details == {"field": "file"}


def test_duration_is_checked_from_the_container_before_decoding(client):
    hour = flac_silence(61)
    assert len(hour) < 1_000_000
    tracemalloc.start()
    try:
        with pytest.raises(polargrid.ValidationError, match="max_audio_seconds"):
            client.transcribe(hour, {"model": "whisper-1"})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20e6, f"refusing an over-long file used {peak / 1e6:.0f} MB (decoding it used ~700 MB)"


def test_memory_stays_bounded_when_the_container_does_not_say_how_long_it_is(monkeypatch):
    monkeypatch.setattr(decode_module, "_declared_seconds", lambda container, stream: None)
    data = wav(np.random.default_rng(0).uniform(-0.5, 0.5, 16000 * 40))
    tracemalloc.start()
    try:
        with pytest.raises(polargrid.ValidationError, match="max_audio_seconds"):
            decode_audio(data, 16000, limits=Limits(max_audio_seconds=10))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 10 * 16000 * 4, f"decoding past the limit held {peak / 1e6:.1f} MB"
    assert decode_audio(data, 16000, limits=Limits(max_audio_seconds=60)).duration == pytest.approx(40, abs=0.01)


@pytest.mark.parametrize("rate", [500, 400_000])
def test_sample_rates_outside_the_limits_are_refused(client, rate):
    with pytest.raises(polargrid.ValidationError, match="1000..384000 Hz") as info:
        client.transcribe(wav(np.zeros(rate // 2), rate), {"model": "whisper-1"})
    assert info.value.details == {"field": "file"}


def test_an_odd_high_rate_decodes_correctly_without_the_slow_path():
    rate = 383_999                               # no polyphase table fits: libswresample does this pair
    t = np.arange(rate) / rate
    decoded = decode_audio(wav(0.5 * np.sin(2 * np.pi * 1000 * t), rate), 16000)
    assert decoded.duration == pytest.approx(1.0, abs=0.01)
    spectrum = np.abs(np.fft.rfft(decoded.samples * np.hanning(decoded.samples.size)))
    assert abs(np.argmax(spectrum) * 16000 / decoded.samples.size - 1000) < 5


@pytest.mark.parametrize("tag", [0x1234, 0xFFFE - 1])
def test_wav_with_an_unknown_codec_is_a_validation_error(client, tag):
    with pytest.raises(polargrid.ValidationError) as info:
        client.transcribe(wav(np.zeros(1600), tag=tag), {"model": "whisper-1"})
    assert info.value.details == {"field": "file"}


# -- the request ------------------------------------------------------------------------------------

@pytest.mark.parametrize("language", ["xx", "english", "EN-US", "zz"])
def test_unknown_language_codes_name_the_field(client, speech_wav, language):
    with pytest.raises(polargrid.ValidationError, match="Unknown language") as info:
        client.transcribe(speech_wav, {"model": "whisper-1", "language": language})
    assert info.value.details == {"field": "language"}
    assert client.transcribe(speech_wav, {"model": "whisper-1", "language": "EN"}).text


@pytest.mark.parametrize("text", ["Hello\x00world.", "\x00", "Hi \ud800 there."])
def test_speech_input_with_nul_or_lone_surrogates_names_the_field(client, text):
    with pytest.raises(polargrid.ValidationError) as info:
        client.text_to_speech({"model": "tts-1", "input": text, "voice": "alloy"})
    assert info.value.details == {"field": "input"}


# -- budgets and the queue --------------------------------------------------------------------------

def test_a_transcription_past_its_time_budget_ends_with_a_timeout(client, speech_wav, limits):
    limits(transcription_seconds_base=0.0, transcription_seconds_per_audio_second=0.0)
    with pytest.raises(polargrid.TimeoutError, match="time budget"):
        client.transcribe(speech_wav, {"model": "whisper-1"})


def test_a_transcription_past_its_token_budget_ends_with_a_timeout(client, speech_wav, limits):
    limits(transcription_tokens_base=2, transcription_tokens_per_audio_second=0.0)
    with pytest.raises(polargrid.TimeoutError, match="tokens"):
        client.transcribe(speech_wav, {"model": "whisper-1", "language": "en"})
    events = client.transcribe_stream(speech_wav, {"model": "whisper-1", "language": "en"})
    with pytest.raises(polargrid.TimeoutError):
        list(events)


def _fill_until_refused(open_one, attempts: int = 4):
    """Open streams until one is refused; the streams opened are closed again (cancelling their work)."""
    opened = []
    try:
        for _ in range(attempts):
            opened.append(open_one())
    except polargrid.RateLimitError as exc:
        return exc, len(opened)
    finally:
        for stream in opened:
            stream.close()
    return None, len(opened)


def test_the_speech_queue_is_bounded(client, engine, limits):
    long_audio = client.text_to_speech({"model": "tts-1", "input": " ".join(SENTENCES * 2), "voice": "alloy",
                                        "response_format": "wav"})
    limits(max_speech_queue=1)
    error, opened = _fill_until_refused(
        lambda: engine.transcribe_stream(long_audio, {"model": "whisper-base", "language": "en"}))
    assert error is not None and error.retry_after and opened <= 2, "the STT queue took every request"
    assert "max_speech_queue" in str(error)
    error, opened = _fill_until_refused(
        lambda: engine.text_to_speech_stream({"model": "tts-1", "input": " ".join(SENTENCES * 4), "voice": "alloy"}))
    assert error is not None and error.retry_after and opened <= 2, "the TTS queue took every request"
    limits(max_speech_queue=DEFAULT_LIMITS.max_speech_queue)
    assert client.transcribe(long_audio, {"model": "whisper-base", "language": "en"}).text


# -- over HTTP: the same refusals as 400 / 429 / 504 naming the field, never 500 ----------------------

def _multipart(fields: dict[str, str], audio: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
                 "Content-Type: audio/wav\r\n\r\n".encode() + audio + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_http_answers_speech_mistakes_with_400_naming_the_field(engine, speech_wav):
    import http.client

    from polargrid_local.server import running

    with running(engine) as server:
        host, port = server.server_address[:2]

        def post(path, body, content_type):
            conn = http.client.HTTPConnection(host, port, timeout=120)
            conn.request("POST", path, body=body, headers={"Content-Type": content_type})
            response = conn.getresponse()
            payload = json.loads(response.read() or b"{}")
            conn.close()
            return response.status, payload

        nan = np.full(4000, np.nan, np.float32)
        cases = [({"model": "whisper-1", "language": "xx"}, speech_wav, "language"),
                 ({"model": "whisper-1"}, wav(nan, tag=3, bits=32), "file"),
                 ({"model": "whisper-1"}, wav(np.zeros(1600), tag=0x1234), "file"),
                 ({"model": "whisper-1"}, wav(np.zeros(100), 500), "file"),
                 ({"model": "whisper-1", "vad_filter": "maybe"}, speech_wav, "vad_filter")]
        for fields, audio, field in cases:
            body, content_type = _multipart(fields, audio)
            status, payload = post("/v1/audio/transcriptions", body, content_type)
            assert (status, payload["error"]["param"]) == (400, field), (fields, payload)
        status, payload = post("/v1/audio/speech", json.dumps({"model": "tts-1", "input": "a\u0000b",
                                                               "voice": "alloy"}).encode(), "application/json")
        assert (status, payload["error"]["param"]) == (400, "input"), payload
        body, content_type = _multipart({"model": "whisper-1", "vad_filter": "false"}, speech_wav)
        assert post("/v1/audio/transcriptions", body, content_type)[0] == 200

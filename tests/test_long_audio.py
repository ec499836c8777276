"""Long audio in bounded windows (issue 22 item 15): memory flat with duration, transcripts the same in meaning.

The windows here are made short (Limits.transcription_window_s) so that minutes of audio cross many of them.
"""
from __future__ import annotations

import tracemalloc

import numpy as np
import polargrid
import pytest
from conftest import SENTENCES, word_error_rate
from test_speech import _wav16 as wav16
from test_speech_limits import flac_silence

from polargrid_local.audio import decode_audio
from polargrid_local.limits import Limits
from polargrid_local.speech.long_audio import find_cut, windows


@pytest.fixture
def window(engine, monkeypatch):
    """Set the engine's transcription window (engine.limits is read wherever it is set)."""
    def use(seconds: float) -> None:
        monkeypatch.setattr(engine, "limits", Limits(transcription_window_s=seconds), raising=False)
    return use


@pytest.fixture(scope="module")
def spoken(client):
    """Three sentences, each followed by a 4 s pause, three times over (~50 s): where each one starts."""
    pieces = [decode_audio(client.text_to_speech({"model": "tts-1", "input": s, "voice": "alloy",
                                                  "response_format": "wav"})).samples for s in SENTENCES]
    gap = np.zeros(16000 * 4, np.float32)
    parts, starts, at = [], [], 0
    for piece in pieces * 3:
        starts.append(at / 16000)
        parts += [piece, gap]
        at += piece.size + gap.size
    return np.concatenate(parts), starts


def peak_traced(call) -> int:
    tracemalloc.start()
    try:
        call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_of_a_transcription_stays_flat_with_the_duration(client, window):
    """Before the fix, the whole decoded file (and VAD over all of it) was held at once: 4x the audio, 4x the
    memory. Now one window is: 8 minutes of silence cost what 2 minutes cost."""
    window(30)
    short, long = flac_silence(2), flac_silence(8)
    assert client.transcribe(short, {"model": "whisper-1"}).text == ""   # warm: models loaded, kernels compiled
    peaks = {}
    for name, data in (("2 min", short), ("8 min", long)):
        peaks[name] = peak_traced(lambda d=data: client.transcribe(d, {"model": "whisper-1"}))
    assert peaks["8 min"] < 1.5 * peaks["2 min"], {k: f"{v / 1e6:.1f} MB" for k, v in peaks.items()}
    assert peaks["8 min"] < 30e6, f"8 min of silence held {peaks['8 min'] / 1e6:.0f} MB (one 30 s window is 2 MB)"


def test_speech_across_many_windows_reads_the_same_with_absolute_times(client, window, spoken):
    audio, starts = spoken
    data = wav16(audio)
    window(1000)   # one window: the whole file at once, as before
    whole = client.transcribe(data, {"model": "whisper-1", "response_format": "verbose_json"})
    window(15)     # ~50 s over windows of 15 s, each cut in a pause
    parts = client.transcribe(data, {"model": "whisper-1", "response_format": "verbose_json",
                                     "timestamp_granularities": ["word", "segment"]})
    assert word_error_rate(" ".join(SENTENCES * 3), parts.text) < 0.15, parts.text
    assert word_error_rate(whole.text, parts.text) < 0.1, (whole.text, parts.text)
    bounds = [(s.start, s.end) for s in parts.segments]
    assert all(a[1] <= b[0] + 0.01 for a, b in zip(bounds, bounds[1:], strict=False)), bounds   # in order
    assert [s.id for s in parts.segments] == list(range(len(parts.segments)))
    assert len(parts.segments) > len(whole.segments), "more windows than the whole file's chunks"
    word_starts = [w.start for w in parts.words]
    assert word_starts == sorted(word_starts)
    for start in starts:   # each sentence's first word is heard where the sentence was placed
        assert min(abs(w - start) for w in word_starts) < 1.0, (start, word_starts)
    assert parts.words[-1].end <= audio.size / 16000 + 0.5
    assert parts.language == whole.language == "en"
    assert abs(parts.duration - audio.size / 16000) < 0.05


def test_a_streamed_transcription_across_windows_ends_with_the_whole_text(client, window, spoken):
    audio, _starts = spoken
    window(15)
    events = list(client.transcribe_stream(wav16(audio), {"model": "whisper-1"}))
    deltas = "".join(e.delta for e in events if e.type == "transcript.text.delta")
    done = events[-1]
    assert done.type == "transcript.text.done" and done.text == deltas
    assert word_error_rate(" ".join(SENTENCES * 3), done.text) < 0.15, done.text
    assert abs(done.duration - audio.size / 16000) < 0.05


def test_bad_audio_past_the_first_window_is_still_a_validation_error(client, window):
    window(5)
    samples = np.zeros(16000 * 12, np.float32)
    samples[16000 * 9] = np.nan   # in the second window: found while transcribing, not before
    data = wav16(np.zeros(16000 * 12))[:44] + samples.astype("<f4").tobytes()
    header = bytearray(data[:44])
    header[20:22] = (3).to_bytes(2, "little")            # IEEE float
    header[34:36] = (32).to_bytes(2, "little")           # 32 bits a sample
    header[28:32] = (16000 * 4).to_bytes(4, "little")    # bytes a second
    header[32:34] = (4).to_bytes(2, "little")            # bytes a frame
    header[40:44] = (samples.size * 4).to_bytes(4, "little")
    header[4:8] = (36 + samples.size * 4).to_bytes(4, "little")
    with pytest.raises(polargrid.ValidationError, match="not finite") as info:
        client.transcribe(bytes(header) + samples.astype("<f4").tobytes(), {"model": "whisper-1"})
    assert info.value.details == {"field": "file"}


def test_windows_are_cut_in_pauses_and_lose_nothing(spoken):
    """The real VAD cuts ~50 s of speech into windows of at least 10 s: every cut lies in a pause between
    sentences, and the windows put back together are the audio."""
    from faster_whisper.vad import VadOptions, get_speech_timestamps

    audio, starts = spoken

    def speech_of(samples):
        return get_speech_timestamps(samples, VadOptions(min_silence_duration_ms=500))

    blocks = [audio[i:i + 4096] for i in range(0, audio.size, 4096)]
    cut = list(windows(blocks, 16000 * 10, speech_of))
    assert len(cut) >= 4
    assert np.array_equal(np.concatenate([w for _o, w, _s in cut]), audio)
    assert [o for o, _w, _s in cut] == list(np.cumsum([0] + [w.size for _o, w, _s in cut[:-1]]))
    whole = speech_of(audio)
    for offset, samples, _speech in cut[:-1]:
        end = offset + samples.size
        assert not any(s["start"] + 1600 < end < s["end"] - 1600 for s in whole), f"cut at {end / 16000:.1f} s"


@pytest.mark.parametrize("speech, size, expected", [
    ([], 100, 100),                                                    # silence: all of it
    ([{"start": 10, "end": 40}], 100, 40),                             # ends in a pause: after the utterance
    ([{"start": 10, "end": 40}, {"start": 60, "end": 100}], 100, 40),  # an utterance runs on: before it
    ([{"start": 30, "end": 100}], 100, 30),
    ([{"start": 0, "end": 100}], 100, 100),                            # speech throughout: at the end
])
def test_where_a_window_is_cut(speech, size, expected):
    assert find_cut(speech, size) == expected


def test_the_test_kits_fake_stt_still_hears_long_audio_whole():
    """The fake STT backend has no VAD: it gets the whole audio, as before, however long it is."""
    from polargrid_local import PolarGridSync

    pg = PolarGridSync(fake=True, limits=Limits(transcription_window_s=2))
    try:
        text = "This clip is long enough to span several windows. It has two sentences."
        audio = pg.text_to_speech({"model": "tts-1", "input": text, "voice": "alloy", "response_format": "wav"})
        assert decode_audio(audio).duration > 4
        assert pg.transcribe(audio, {"model": "whisper-1"}).text == text
    finally:
        pg.close()

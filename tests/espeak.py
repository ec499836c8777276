"""Speech in other languages for tests: libespeak-ng (bundled by espeakng-loader) through its C API.

Piper's voice speaks English only; to test language detection and translation on speech that is not
English, eSpeak NG synthesises French, German, Spanish... sentences. Its C API is driven with ctypes:
synchronous output, a callback that collects the 16-bit samples.
"""
from __future__ import annotations

import ctypes
import threading

import numpy as np

AUDIO_OUTPUT_SYNCHRONOUS = 2
ESPEAK_CHARS_UTF8 = 1
POS_CHARACTER = 1
ESPEAK_RATE = 1
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)

_lock = threading.Lock()
_state: dict = {}


def _library():
    if "lib" not in _state:
        import espeakng_loader

        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                     ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        rate = lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0, espeakng_loader.get_data_path().encode(), 0)
        if rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed ({rate})")
        chunks: list[np.ndarray] = []

        def collect(wav, n, _events):
            if n > 0 and wav:
                chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
            return 0

        callback = _CALLBACK(collect)
        lib.espeak_SetSynthCallback(callback)
        _state.update(lib=lib, rate=rate, chunks=chunks, callback=callback)  # the callback must stay alive
    return _state["lib"]


def synthesize(text: str, voice: str, words_per_minute: int = 140) -> tuple[np.ndarray, int]:
    """``text`` spoken by eSpeak NG's ``voice`` (e.g. "fr", "de", "es"): float32 mono samples and their rate."""
    with _lock:
        lib = _library()
        if lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"eSpeak NG has no voice {voice!r}")
        lib.espeak_SetParameter(ESPEAK_RATE, words_per_minute, 0)
        chunks = _state["chunks"]
        chunks.clear()
        data = text.encode("utf-8") + b"\0"
        status = lib.espeak_Synth(data, len(data), 0, POS_CHARACTER, 0, ESPEAK_CHARS_UTF8, None, None)
        lib.espeak_Synchronize()
        if status != 0 or not chunks:
            raise RuntimeError(f"espeak_Synth failed ({status})")
        samples = np.concatenate(chunks).astype(np.float32) / 32768.0
        chunks.clear()
    return samples, _state["rate"]


def wav_bytes(text: str, voice: str, words_per_minute: int = 140) -> bytes:
    """The same, as a 16-bit WAV file."""
    import io
    import wave

    samples, rate = synthesize(text, voice, words_per_minute)
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return buffer.getvalue()

"""Audio in and out: decoding any container to 16 kHz mono, encoding speech, and the signal kernels.

Re-exported lazily: importing ``polargrid_local.audio.decode`` (for its AudioInput type) must not load
numba or PyAV; the kernels and codecs load with the first audio a process handles.
"""
from importlib import import_module

_EXPORTS = {"AudioInput": ".decode", "decode_audio": ".decode", "FORMATS": ".encode", "StreamEncoder": ".encode",
            "encode_audio": ".encode", "log_mel_spectrogram": "..kernels", "resample": "..kernels",
            "to_mono": "..kernels", "Resampler": "..kernels.resample"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name], __name__), name)

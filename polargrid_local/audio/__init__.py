"""Audio in and out: decoding any container to 16 kHz mono, encoding speech, and the signal kernels."""
from ..kernels import log_mel_spectrogram, resample, to_mono
from ..kernels.resample import Resampler
from .decode import AudioInput, decode_audio
from .encode import FORMATS, StreamEncoder, encode_audio

__all__ = ["AudioInput", "FORMATS", "Resampler", "StreamEncoder", "decode_audio", "encode_audio",
           "log_mel_spectrogram", "resample", "to_mono"]

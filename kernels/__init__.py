"""Audio signal kernels: numba implementations, each beside the plain-numpy reference it is tested against.

Installed as ``polargrid_local.kernels``. Compiled code is cached on disk (numba ``cache=True``),
so a second process loads it instead of compiling again.
"""
from .logmel import log_mel_spectrogram, log_mel_spectrogram_numpy, mel_filters
from .mono import to_mono, to_mono_numpy
from .resample import resample, resample_numpy
from .timestretch import time_stretch, time_stretch_numpy

__all__ = ["log_mel_spectrogram", "log_mel_spectrogram_numpy", "mel_filters", "resample", "resample_numpy",
           "time_stretch", "time_stretch_numpy", "to_mono", "to_mono_numpy"]

"""TensorFlow / Keras 3 backend (float32): the canonical model in one tf.function, plus its physics.

Besides :class:`TensorFlowBackend`, the physics steps are exposed here as NumPy-in, NumPy-out
functions running the very TensorFlow code the model's graph uses (``backends.tensorflow.physics``
holds the tensor versions), so tests and layer-local checks can drive one step at a time without
building a model.
"""

from __future__ import annotations

from typing import Any

# First: TensorFlow imported without its start-up lines (and TF_CPP_MIN_LOG_LEVEL defaulted to 2).
from backends.tensorflow import _startup  # noqa: F401  # isort: skip

import numpy as np
import tensorflow as tf

from backends.tensorflow import physics
from backends.tensorflow.backend import TensorFlowBackend, tf_device
from backends.tensorflow.model import PtychoModel

__all__ = [
    "PtychoModel",
    "TensorFlowBackend",
    "diffract",
    "intensity",
    "merge",
    "reextract",
    "translate",
]


def _run(fn: Any, *args: Any, device: str) -> np.ndarray:
    with tf.device(tf_device(device)):
        return np.asarray(fn(*args).numpy())


def translate(images: np.ndarray, offsets: np.ndarray, device: str = "cpu") -> np.ndarray:
    """Bilinear translation by [dx, dy] per image (see physics.translate), in float32 / complex64."""
    images = np.asarray(images)
    dtype = np.complex64 if np.iscomplexobj(images) else np.float32
    return _run(
        physics.translate, images.astype(dtype, copy=False), np.asarray(offsets, dtype=np.float32), device=device
    )


def merge(patches: np.ndarray, offsets: np.ndarray, M: int, device: str = "cpu") -> np.ndarray:
    """Canvas (B, 1, M, M) from complex patches (B, C, N, N) at offsets (B, C, 2) (object_big=true)."""
    return _run(
        physics.merge, np.asarray(patches, dtype=np.complex64), np.asarray(offsets, dtype=np.float32), M, device=device
    )


def reextract(canvas: np.ndarray, offsets: np.ndarray, N: int, device: str = "cpu") -> np.ndarray:
    """Patches (B, C, N, N) cut from canvas (B, 1, M, M) at the raw offsets (B, C, 2)."""
    return _run(
        physics.reextract,
        np.asarray(canvas, dtype=np.complex64),
        np.asarray(offsets, dtype=np.float32),
        N,
        device=device,
    )


def diffract(field: np.ndarray, device: str = "cpu") -> np.ndarray:
    """Centred far-field amplitude (float32) of a complex field (..., N, N)."""
    return _run(physics.diffract, np.asarray(field, dtype=np.complex64), device=device)


def intensity(field: np.ndarray, device: str = "cpu") -> np.ndarray:
    """Unshifted |fft2(field)|^2 / N^2 (float32) of a complex field (..., N, N)."""
    return _run(physics.intensity, np.asarray(field, dtype=np.complex64), device=device)

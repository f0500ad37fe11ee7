"""PyTorch backend (float32 / complex64, CPU or CUDA).

Besides :class:`TorchBackend`, the physics steps are exposed here as NumPy-in, NumPy-out functions
running the very torch code the model uses (``backends.torch.physics`` holds the tensor versions), so
tests and layer-local checks can drive one step at a time without building a model.
"""

from __future__ import annotations

import numpy as np
import torch

from backends.torch import physics
from backends.torch.backend import TorchBackend

__all__ = ["TorchBackend", "diffract", "merge", "reextract", "translate"]


def _t(arr: np.ndarray) -> torch.Tensor:
    a = np.asarray(arr)
    dtype = np.complex64 if np.iscomplexobj(a) else np.float32
    return torch.tensor(a.astype(dtype, copy=False))


def _np(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().numpy())


def translate(images: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Bilinear translation by [dx, dy] per image (see physics.translate), in float32 / complex64."""
    with torch.inference_mode():
        return _np(physics.translate(_t(images), _t(offsets)))


def merge(patches: np.ndarray, offsets: np.ndarray, M: int) -> np.ndarray:
    """Canvas (B, 1, M, M) from patches (B, C, N, N) at offsets (B, C, 2) (object_big=true)."""
    with torch.inference_mode():
        return _np(physics.merge(_t(patches), _t(offsets), M))


def reextract(canvas: np.ndarray, offsets: np.ndarray, N: int) -> np.ndarray:
    """Patches (B, C, N, N) cut from canvas (B, 1, M, M) at the raw offsets (B, C, 2)."""
    with torch.inference_mode():
        return _np(physics.reextract(_t(canvas), _t(offsets), N))


def diffract(field: np.ndarray) -> np.ndarray:
    """Centred far-field amplitude of a complex field (..., N, N)."""
    with torch.inference_mode():
        return _np(physics.diffract(_t(field)))

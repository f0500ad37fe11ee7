"""The error model's elementwise passes around a convolution, compiled (numba).

``error_model.conv_scale`` wraps a float32 product (``ops.conv2d`` of the squared kernel) in
elementwise work on full-size float64 fields: the squared input errors and values, their peak per
sample, the rescale to float32, then the output's rescale, bias, square root and floor: in NumPy,
eight passes and four temporaries the size of the field, plus a ninth and a fifth where the input
is a ReLU output whose inactive units pass no error on (``error_model.relu_pass_on``). Here the
input side is two reads of x and S_x (the peaks, then the float32 field), gating S_x as it reads
it, and the output side one read of the product. They run on the calling thread: spread over the
cores they were no faster (docs/decisions.md, "Speed"). Every element is computed with the same
float64 operations in the same order as the NumPy expressions they replace, so the scales are the
same bit for bit (tests/backends/test_reference_fused.py).

Imported on first use, as ``parity.kernels`` is: numba's import is not paid by loading the
reference backend.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numba import njit


@njit(cache=True, inline="always")
def _squares(v: float, e: float, gated: bool) -> float:
    """q = S² + x² of one element (S counted only where x > 0 when ``gated``), rounded as NumPy's
    ``q = s * s; q += x * x`` was."""
    if gated and not v > 0.0:
        e = 0.0
    q = e * e
    q += v * v
    return q


@njit(cache=True, nogil=True)
def _peaks(x: Any, s: Any, gated: bool) -> Any:
    """Per sample of (B, C, H, W) fields, the largest q = S² + x² (S counted only where x > 0 when
    ``gated``); NaN where any q is NaN, as ``np.max`` gives."""
    B, C, H, W = x.shape
    out = np.empty(B, np.float64)
    for b in range(B):
        peak = 0.0
        nan = False
        for c in range(C):
            for i in range(H):
                for j in range(W):
                    q = _squares(x[b, c, i, j], s[b, c, i, j], gated)
                    if q > peak:
                        peak = q
                    elif math.isnan(q):
                        nan = True
        out[b] = np.nan if nan else peak
    return out


@njit(cache=True, nogil=True)
def _scaled(x: Any, s: Any, gated: bool, divisor: Any, out: Any) -> None:
    """out = float32(q / divisor[sample]), q as in ``_peaks``."""
    B, C, H, W = x.shape
    for b in range(B):
        d = divisor[b]
        for c in range(C):
            for i in range(H):
                for j in range(W):
                    q = _squares(x[b, c, i, j], s[b, c, i, j], gated)
                    out[b, c, i, j] = np.float32(q / d)


@njit(cache=True, nogil=True)
def _finished(acc: Any, peak: Any, offset: Any, floor: float, out: Any) -> None:
    """out = sqrt(acc·peak[sample] + offset[channel]) + floor, in float64."""
    B, C, H, W = acc.shape
    for b in range(B):
        p = peak[b]
        for c in range(C):
            o = offset[c]
            for i in range(H):
                for j in range(W):
                    v = np.float64(acc[b, c, i, j]) * p
                    v += o
                    out[b, c, i, j] = np.sqrt(v) + floor


def scaled_squares(x: np.ndarray, s: np.ndarray, gated: bool) -> tuple[np.ndarray, np.ndarray]:
    """(q / peak as float32, peak per sample) for q = S² + x² over (B, C, H, W) float64 fields, the
    peak the largest q of each sample (1 where that is zero or NaN).

    ``gated``: x is a ReLU output and only its active units pass their error on (S counts where
    x > 0 only, ``error_model.relu_pass_on``), read here instead of from a gated copy of S."""
    peak = _peaks(x, s, gated)
    peak = np.where(peak > 0, peak, 1.0)
    out = np.empty(x.shape, np.float32)
    _scaled(x, s, gated, peak, out)
    return out, peak


def finished_scale(acc: np.ndarray, peak: np.ndarray, offset: np.ndarray, floor: float) -> np.ndarray:
    """sqrt(acc·peak + offset) + floor in float64, for a (B, C, H, W) float32 product, ``peak`` per
    sample and ``offset`` per channel (any float dtype: converted exactly)."""
    out = np.empty(acc.shape, np.float64)
    _finished(acc, peak, np.asarray(offset, np.float64), floor, out)
    return out

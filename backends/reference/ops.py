"""Network operations of the float64 reference, written out in plain NumPy.

Every operation keeps the canonical (B, channels, H, W) layout at its boundary so a tap is the very
array the next stage consumes. Convolutions are BLAS matrix products on channels-last copies: im2col
in general (the canonical kernel layout (kh, kw, in, out) is exactly the row order of a channels-last
im2col matrix), and an output-side sum where the outputs are far fewer than the inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from numpy.typing import DTypeLike

Array = np.ndarray
Activation = Callable[[Array], Array]

# Bound on the im2col matrix per BLAS call (elements, 64 MB): no slower than one big product here,
# and larger harness batches then run in constant extra memory instead of growing with B.
_IM2COL_MAX_ELEMENTS = 8_000_000


def conv2d(x: Array, kernel: Array, bias: Array, dtype: DTypeLike = np.float64) -> Array:
    """3x3 stride-1 cross-correlation with one pixel of zero padding on each side, plus bias.

    ``dtype`` is the working precision: float64 for the model, float32 for error scales.
    """
    B, cin, H, W = x.shape
    kh, kw, kin, cout = kernel.shape
    if (kh, kw) != (3, 3) or kin != cin:
        raise ValueError(f"conv2d: kernel {kernel.shape} does not fit input {x.shape}")
    padded = padded_channels_last(x, dtype)
    if 9 * cout <= cin:
        out = _conv2d_output_side(padded, kernel.astype(dtype, copy=False), H, W)
    else:
        # Every 3x3 window flattened as (kh, kw, in), which is the kernel's row order, times the
        # kernel: one BLAS product per chunk of images.
        weights = kernel.astype(dtype, copy=False).reshape(9 * cin, cout)
        out = np.empty((B, H, W, cout), dtype=dtype)
        for chunk, cols in im2col(padded):
            out[chunk] = (cols @ weights).reshape(-1, H, W, cout)
    out += bias
    return out.transpose(0, 3, 1, 2)


def padded_channels_last(x: Array, dtype: DTypeLike) -> Array:
    """(B, H + 2, W + 2, in): the zero-padded channels-last copy of x (B, in, H, W) that every 3x3
    'same' convolution here reads its windows from."""
    B, cin, H, W = x.shape
    padded = np.zeros((B, H + 2, W + 2, cin), dtype=dtype)
    padded[:, 1:-1, 1:-1, :] = x.transpose(0, 2, 3, 1)
    return padded


def im2col(padded: Array) -> Iterator[tuple[slice, Array]]:
    """(chunk of images, its im2col matrix (b·H·W, 9·in)) for ``padded_channels_last`` output: rows
    (b, y, x), columns (kh, kw, in), the canonical kernel's row order. The matrix moves 9x the input
    through memory, so chunks of images keep each one under _IM2COL_MAX_ELEMENTS."""
    B, Hp, Wp, cin = padded.shape
    H, W = Hp - 2, Wp - 2
    windows = sliding_window_view(padded, (3, 3), axis=(1, 2))  # (B, H, W, in, kh, kw)
    step = max(1, _IM2COL_MAX_ELEMENTS // (H * W * 9 * cin))
    for start in range(0, B, step):
        chunk = slice(start, min(start + step, B))
        yield chunk, windows[chunk].transpose(0, 1, 2, 4, 5, 3).reshape(-1, 9 * cin)


def _conv2d_output_side(padded: Array, kernel: Array, H: int, W: int) -> Array:
    """For few output channels (the heads' 64 -> 4): each input pixel times all nine taps of the
    kernel in one product, then the nine shifted partial outputs summed. That moves 9 x out values
    per pixel instead of im2col's 9 x in, which is what made those convolutions the slowest."""
    B, cin, cout = padded.shape[0], kernel.shape[2], kernel.shape[3]
    by_tap = kernel.transpose(2, 0, 1, 3).reshape(cin, 9 * cout)
    partial = (padded.reshape(-1, cin) @ by_tap).reshape(B, H + 2, W + 2, 3, 3, cout)
    out: Array = np.zeros((B, H, W, cout), dtype=padded.dtype)
    for dy in range(3):
        for dx in range(3):
            out += partial[:, dy : dy + H, dx : dx + W, dy, dx, :]
    return out


def max_pool2(x: Array) -> Array:
    """2x2 max-pool with stride 2 (H and W are always even here)."""
    B, C, H, W = x.shape
    return np.asarray(x.reshape(B, C, H // 2, 2, W // 2, 2).max(axis=(3, 5)))


def upsample2(x: Array) -> Array:
    """Nearest-neighbour upsampling by 2 in both spatial directions."""
    return x.repeat(2, axis=-2).repeat(2, axis=-1)


def pad_spatial(x: Array, width: int) -> Array:
    """Zero padding of ``width`` pixels on every side of the last two axes."""
    pad = [(0, 0)] * (x.ndim - 2) + [(width, width), (width, width)]
    return np.pad(x, pad)


def relu(x: Array) -> Array:
    return np.asarray(np.maximum(x, 0.0))


def sigmoid(x: Array) -> Array:
    # exp of a non-positive argument only, so large |x| neither overflows nor warns.
    e = np.exp(-np.abs(x))
    return np.asarray(np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)))


def swish(x: Array) -> Array:
    return np.asarray(x * sigmoid(x))


def softplus(x: Array) -> Array:
    # log(1 + exp(x)) without overflow for large x.
    return np.asarray(np.logaddexp(0.0, x))


def pi_tanh(x: Array) -> Array:
    """The phase head activation: keeps the phase in (-pi, pi)."""
    return np.asarray(np.pi * np.tanh(x))


AMP_ACTIVATIONS: dict[str, Activation] = {
    "sigmoid": sigmoid,
    "swish": swish,
    "softplus": softplus,
    "relu": relu,
}

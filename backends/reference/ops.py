"""Network operations of the float64 reference, written out in plain NumPy.

Every operation keeps the canonical (B, channels, H, W) layout at its boundary so a tap is the very
array the next stage consumes. The forward convolution works in that layout end to end, so its
output is contiguous and is a tap as it stands: per image, three products of a kernel row with the
image's horizontal windows (``row_windows``, ``_conv2d_rows``), or an output-side sum where the
outputs are far fewer than the inputs. The adjoints' kernel products read the same window matrices.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
from numpy.typing import DTypeLike

Array = np.ndarray
Activation = Callable[[Array], Array]

# Bound on the output side's partial outputs per BLAS call (elements, 64 MB): no slower than one big
# product here, and larger harness batches then run in constant extra memory instead of growing with B.
_OUTPUT_SIDE_MAX_ELEMENTS = 8_000_000
# Columns (padded rows x width) a product of ``_conv2d_rows`` takes at least: images of smaller maps
# share one, since per-image products that small leave BLAS idle.
_MIN_COLUMNS = 1024


def conv2d(x: Array, kernel: Array, bias: Array, dtype: DTypeLike = np.float64) -> Array:
    """3x3 stride-1 cross-correlation with one pixel of zero padding on each side, plus bias.

    ``dtype`` is the working precision: float64 for the model, float32 for error scales. The result
    is C-contiguous (B, out, H, W).
    """
    B, cin, H, W = x.shape
    kh, kw, kin, cout = kernel.shape
    if (kh, kw) != (3, 3) or kin != cin:
        raise ValueError(f"conv2d: kernel {kernel.shape} does not fit input {x.shape}")
    k = kernel.astype(dtype, copy=False)
    out = np.empty((B, cout, H, W), dtype=dtype)
    if 9 * cout <= cin:
        padded = np.zeros((B, cin, H + 2, W + 2), dtype=dtype)
        padded[:, :, 1:-1, 1:-1] = x
        _conv2d_output_side(padded, k, out)
    else:
        _conv2d_rows(x, k, out)
    out += bias.astype(dtype, copy=False)[:, None, None]
    return out


def row_windows(x: Array, dtype: DTypeLike) -> Iterator[tuple[slice, Array]]:
    """(chunk of images, their window matrix (in·3, images·(H + 2)·W)) for x (B, in, H, W): rows
    (in, kw), columns (image, padded row, x), the horizontal 3-pixel windows of the zero-padded
    images. Kernel row kh reads the matrix from padded row kh on, a contiguous offset of kh·W
    columns, so this one matrix, three copies of the input, serves all three kernel rows where a 3x3
    window matrix (im2col) held nine (docs/decisions.md, "Speed"); in a chunk of several images the
    two output rows of each that read across into the next are computed and dropped. The copies are
    written straight from x into a buffer whose zero padding is never written, so no padded copy of
    x is made either, and the buffer is reused: use each matrix before asking for the next."""
    B, cin, H, W = x.shape
    Hp = H + 2
    step = -(-_MIN_COLUMNS // (Hp * W))
    windows = None
    for start in range(0, B, step):
        n = min(step, B - start)
        if windows is None or windows.shape[2] != n:
            windows = np.zeros((cin, 3, n, Hp, W), dtype=dtype)  # (in, kw, image, padded row, x)
        chunk = x[start : start + n].transpose(1, 0, 2, 3)
        windows[:, 0, :, 1:-1, 1:] = chunk[..., :-1]
        windows[:, 1, :, 1:-1] = chunk
        windows[:, 2, :, 1:-1, :-1] = chunk[..., 1:]
        yield slice(start, start + n), windows.reshape(3 * cin, n * Hp * W)


def _conv2d_rows(x: Array, kernel: Array, out: Array) -> None:
    """out = Σ_kh kernel row kh, an (out, in·3) matrix, times ``row_windows`` read from row kh on."""
    cin, H, W = x.shape[1:]
    cout, image = kernel.shape[-1], (H + 2) * W
    rows = kernel.transpose(0, 3, 2, 1).reshape(3, cout, 3 * cin)  # [kh] (out, (in, kw))
    partial = None
    for chunk, cols in row_windows(x, out.dtype):
        n = chunk.stop - chunk.start
        length = n * image - 2 * W  # the output columns every kernel row can read
        acc = out[chunk.start].reshape(cout, H * W) if n == 1 else np.empty((cout, length), dtype=out.dtype)
        if partial is None or partial.shape[1] != length:
            partial = np.empty((cout, length), dtype=out.dtype)
        np.matmul(rows[0], cols[:, :length], out=acc)
        for kh in (1, 2):
            np.matmul(rows[kh], cols[:, kh * W : kh * W + length], out=partial)
            acc += partial
        if n > 1:
            for i in range(n):
                out[chunk.start + i] = acc[:, i * image : i * image + H * W].reshape(cout, H, W)


def _conv2d_output_side(padded: Array, kernel: Array, out: Array) -> None:
    """For few output channels (the heads' 64 -> 4): every input pixel times all nine taps of the
    kernel in one product per image, then the nine shifted partial outputs summed. That moves 9 x out
    values per pixel instead of the window matrix's 9 x in, which is what made those convolutions
    the slowest."""
    B, cin, Hp, Wp = padded.shape
    H, W, cout = Hp - 2, Wp - 2, kernel.shape[-1]
    by_tap = kernel.transpose(0, 1, 3, 2).reshape(9 * cout, cin)  # rows (kh, kw, out)
    step = max(1, _OUTPUT_SIDE_MAX_ELEMENTS // (9 * cout * Hp * Wp))
    for start in range(0, B, step):
        chunk = slice(start, min(start + step, B))
        partial = np.matmul(by_tap, padded[chunk].reshape(-1, cin, Hp * Wp)).reshape(-1, 3, 3, cout, Hp, Wp)
        acc = out[chunk]
        acc[...] = partial[:, 0, 0, :, :H, :W]
        for dy in range(3):
            for dx in range(3):
                if dy or dx:
                    acc += partial[:, dy, dx, :, dy : dy + H, dx : dx + W]


def max_pool2(x: Array) -> Array:
    """2x2 max-pool with stride 2 (H and W are always even here). The four corners of the windows
    as strided views, and their maximum elementwise: a reduction over two axes of length 2 runs
    NumPy's reduction machinery per window, ten times slower here. NaN propagates either way."""
    return np.asarray(
        np.maximum(np.maximum(x[..., ::2, ::2], x[..., ::2, 1::2]), np.maximum(x[..., 1::2, ::2], x[..., 1::2, 1::2]))
    )


def upsample2(x: Array) -> Array:
    """Nearest-neighbour upsampling by 2 in both spatial directions: one copy of a broadcast view
    (two ``repeat`` calls made an intermediate twice x's size first)."""
    *lead, H, W = x.shape
    wide = np.broadcast_to(x[..., :, None, :, None], (*lead, H, 2, W, 2))
    return np.ascontiguousarray(wide).reshape(*lead, 2 * H, 2 * W)


def pad_spatial(x: Array, width: int) -> Array:
    """Zero padding of ``width`` pixels on every side of the last two axes."""
    pad = [(0, 0)] * (x.ndim - 2) + [(width, width), (width, width)]
    return np.pad(x, pad)


def relu(x: Array, in_place: bool = False) -> Array:
    """``in_place`` for a fresh array nothing else holds (a conv's output): no second allocation."""
    return np.asarray(np.maximum(x, 0.0, out=x if in_place else None))


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

"""The differentiable physics of the forward model in TensorFlow ops (forward-model.md, section 4).

Everything here works in the canonical (B, C, H, W) layout: the FFT acts on the two innermost axes,
so keeping the physics channels-first avoids transposes around every step. Only the network in
``model.py`` runs channels-last.

The translation is written out as a bilinear gather rather than delegated to
``ImageProjectiveTransformV3`` or tensorflow-addons so that the edge rule of the spec (each neighbour
outside the image contributes 0, its weight is not redistributed, the output pixel is not zeroed) is
visible in the code instead of resting on an op's fill-mode semantics. It uses the same float32
coordinates and the same association of products as that op's bilinear kernel, and the tests check
that the two agree bit for bit on CPU (the original PtychoPINN translates with that op).

Every function takes and returns TensorFlow tensors (they are what the model's graph calls), under
the same names as the other backends' physics modules; ``backends.tensorflow`` wraps a few of them
as NumPy-in, NumPy-out functions for tests and layer-local checks. The masks are NumPy float32
arrays built here, not imported from ``parity``: each backend keeps its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf

Tensor = Any  # tf.Tensor; TensorFlow ships no type stubs
Translate = Callable[[Tensor, Tensor], Tensor]

MERGE_EPSILON = 0.001  # added to the merge denominator (spec, section 4)
NLL_FLOOR = 1e-12  # clamp inside the Poisson log (spec, section 4)


def centre_mask(N: int) -> np.ndarray:
    """Ones on rows and columns [N/4, 3N/4), zero elsewhere; float32 (N, N)."""
    mask = np.zeros((N, N), dtype=np.float32)
    mask[N // 4 : 3 * N // 4, N // 4 : 3 * N // 4] = 1.0
    return mask


def border_mask(N: int) -> np.ndarray:
    """1 - centre_mask: where the border branch predicts; float32 (N, N)."""
    return np.asarray(1.0 - centre_mask(N), dtype=np.float32)


def disk_mask(N: int) -> np.ndarray:
    """The hard probe disk, float32 (N, N): pixel centres at i - N/2 + 0.5, inside when r^2 < (N/4)^2.

    Squared radii are compared in float64, where they are exact, so the boundary pixels are the
    spec's own.
    """
    c = np.arange(N, dtype=np.float64) - N / 2 + 0.5
    r2 = c[:, None] ** 2 + c[None, :] ** 2
    return (r2 < (N / 4) ** 2).astype(np.float32)


_default_centre_mask = centre_mask  # merge's keyword of the same name hides the function


def _translate_real(images: Tensor, offsets: Tensor) -> Tensor:
    """Bilinear translation of real images (K, H, W) by offsets (K, 2) = [dx, dy]."""
    H, W = int(images.shape[-2]), int(images.shape[-1])
    K = tf.shape(images)[0]
    # One zero pixel on every side: any neighbour index outside [0, size) is clipped into that
    # ring, so it reads an exact 0 while the bilinear weights stay as computed.
    padded = tf.reshape(tf.pad(images, [[0, 0], [1, 1], [1, 1]]), [K, (H + 2) * (W + 2)])
    dx = tf.reshape(offsets[:, 0], [-1, 1, 1])
    dy = tf.reshape(offsets[:, 1], [-1, 1, 1])
    # Sampling coordinates per output pixel, in float32 as the spec requires of float32 backends.
    x = tf.broadcast_to(tf.range(W, dtype=tf.float32)[None, None, :] - dx, [K, H, W])
    y = tf.broadcast_to(tf.range(H, dtype=tf.float32)[None, :, None] - dy, [K, H, W])
    x0 = tf.floor(x)
    y0 = tf.floor(y)
    x1 = x0 + 1.0
    y1 = y0 + 1.0

    def to_index(coord: Tensor, size: int) -> Tensor:
        # Clipping in float before the cast keeps far-away or infinite coordinates well defined; a
        # NaN coordinate reads the zero ring, and its NaN weights still make the output pixel NaN.
        safe = tf.where(tf.math.is_nan(coord), -1.0, coord)
        return tf.cast(tf.clip_by_value(safe, -1.0, float(size)), tf.int32) + 1

    # Each row and column index and each weight once: the graph is traced for every instance, and
    # its ops, not its arithmetic, are what tracing costs.
    rows = [to_index(yy, H) * (W + 2) for yy in (y0, y1)]
    cols = [to_index(xx, W) for xx in (x0, x1)]

    # gather_nd on (image, pixel) pairs rather than gather with batch_dims=1: the same reads, but its
    # gradient is one scatter_nd, where the batched gather's is dozens of index ops, which were 40 %
    # of the gradient graph's tracing (default config: 4788 -> 3042 ops; docs/decisions.md).
    image = tf.broadcast_to(tf.range(K)[:, None], [K, H * W])

    def sample(row: Tensor, col: Tensor) -> Tensor:
        pairs = tf.stack([image, tf.reshape(row + col, [K, H * W])], axis=-1)
        return tf.reshape(tf.gather_nd(padded, pairs), [K, H, W])

    # Same association as TensorFlow's own bilinear kernel: interpolate along x on the two rows,
    # then along y. With integer offsets the weights are exactly 1 and 0, so the shift is exact.
    left, right = x1 - x, x - x0
    top = left * sample(rows[0], cols[0]) + right * sample(rows[0], cols[1])
    bottom = left * sample(rows[1], cols[0]) + right * sample(rows[1], cols[1])
    return (y1 - y) * top + (y - y0) * bottom


def translate(images: Tensor, offsets: Tensor) -> Tensor:
    """Translate images (..., H, W) by offsets (..., 2) = [dx, dy]: out(x, y) = in(x - dx, y - dy).

    Complex images are translated as real and imaginary parts with the same weights.
    """
    images = tf.convert_to_tensor(images)
    offsets = tf.convert_to_tensor(offsets, dtype=tf.float32)
    H, W = int(images.shape[-2]), int(images.shape[-1])
    out_shape = tf.shape(images)
    flat_off = tf.reshape(offsets, [-1, 2])
    if images.dtype.is_complex:
        flat = tf.reshape(images, [-1, H, W])
        parts = tf.concat([tf.math.real(flat), tf.math.imag(flat)], axis=0)
        moved = _translate_real(parts, tf.concat([flat_off, flat_off], axis=0))
        re, im = tf.split(moved, 2, axis=0)
        return tf.reshape(tf.complex(re, im), out_shape)
    flat = tf.reshape(tf.cast(images, tf.float32), [-1, H, W])
    return tf.reshape(_translate_real(flat, flat_off), out_shape)


def pad_to_canvas(images: Tensor, M: int) -> Tensor:
    """Zero-pad the last two axes symmetrically from N to M ((M - N) / 2 on each side)."""
    p = (M - int(images.shape[-1])) // 2
    return tf.pad(images, [[0, 0]] * (len(images.shape) - 2) + [[p, p], [p, p]])


def crop_centre(images: Tensor, N: int) -> Tensor:
    """The central N x N window of the last two axes (start (M - N) // 2)."""
    p = (int(images.shape[-1]) - N) // 2
    return images[..., p : p + N, p : p + N]


def merge(
    patches: Tensor,
    offsets: Tensor,
    M: int,
    *,
    translate: Translate = translate,
    centre_mask: Any = None,
    epsilon: float = MERGE_EPSILON,
) -> Tensor:
    """Canvas (B, 1, M, M) from patches (B, C, N, N) placed at -(offset - batch mean offset).

    The numerator sums the full patches while the denominator counts only the moved ``centre_mask``
    windows (default this module's); that mismatch is the original's behaviour and is kept on
    purpose (spec, section 4). ``translate`` is the caller's, so a model that moves images
    differently moves them differently here too.
    """
    N = int(patches.shape[-1])
    window = _default_centre_mask(N) if centre_mask is None else centre_mask
    offsets = tf.convert_to_tensor(offsets, dtype=tf.float32)
    dbar = tf.reduce_mean(offsets, axis=[0, 1])  # over all B*C offsets, dx and dy separately
    shift = -(offsets - dbar)
    padded = pad_to_canvas(patches, M)
    mask = pad_to_canvas(tf.convert_to_tensor(window, dtype=tf.float32)[None, None], M)
    masks = tf.broadcast_to(mask, tf.shape(padded))
    # The patches' real and imaginary parts and the masks move by the same shifts: one translation
    # of the three stacked, not one per tensor. Each image is moved on its own, so the values are
    # the same; the graph traces one translation fewer (docs/decisions.md, "Speed").
    stacked = tf.stack([tf.math.real(padded), tf.math.imag(padded), masks])
    re, im, moved_masks = tf.unstack(translate(stacked, tf.stack([shift, shift, shift])))
    numerator = tf.reduce_sum(tf.complex(re, im), axis=1, keepdims=True)
    denominator = tf.reduce_sum(moved_masks, axis=1, keepdims=True) + epsilon
    return tf.complex(tf.math.real(numerator) / denominator, tf.math.imag(numerator) / denominator)


def reextract(canvas: Tensor, offsets: Tensor, N: int, *, translate: Translate = translate) -> Tensor:
    """Patches (B, C, N, N): the group's canvas (B, 1, M, M) moved by each raw offset, centre-cropped."""
    offsets = tf.convert_to_tensor(offsets, dtype=tf.float32)
    M = int(canvas.shape[-1])
    tiled = tf.broadcast_to(canvas, tf.concat([tf.shape(offsets)[:2], [M, M]], axis=0))
    return crop_centre(translate(tiled, offsets), N)


def illuminate(patches: Tensor, probe: Tensor, mask: Any = None) -> Tensor:
    """probe * patch (probe (N, N) broadcast over B and C), then times the disk mask if given."""
    psi = tf.convert_to_tensor(probe, dtype=tf.complex64)[None, None] * patches
    if mask is None:
        return psi
    m = tf.convert_to_tensor(mask, dtype=tf.float32)
    # Real and imaginary parts scaled separately: a multiply by complex(m, 0) would be the same
    # in exact arithmetic but adds 0*x terms that are not exact for non-finite values.
    return tf.complex(tf.math.real(psi) * m, tf.math.imag(psi) * m)


def intensity(field: Tensor) -> Tensor:
    """|fft2(field)|^2 / N^2 over the two innermost axes, not yet shifted."""
    F = tf.signal.fft2d(tf.convert_to_tensor(field, dtype=tf.complex64))
    re, im = tf.math.real(F), tf.math.imag(F)
    n2 = float(int(field.shape[-2]) * int(field.shape[-1]))
    return (re * re + im * im) / n2


def diffract(field: Tensor) -> Tensor:
    """Amplitude sqrt(fftshift(|fft2(field)|^2 / N^2)), the shift over the spatial axes only.

    sqrt has no derivative at 0: its gradient's inf there turns into inf/NaN gradients wherever a faint
    field's spectrum is exactly 0. The spec's subgradient there is 0 (reference backward.diffract_vjp);
    the values are sqrt's, bit for bit."""
    shifted = tf.signal.fftshift(intensity(field), axes=(-2, -1))
    dark = tf.equal(shifted, 0.0)  # not "> 0": a NaN must stay a NaN
    return tf.where(dark, tf.zeros_like(shifted), tf.sqrt(tf.where(dark, tf.ones_like(shifted), shifted)))


def losses(amplitude: Tensor, intensity: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-group Poisson NLL I - x^2 log(max(I, 1e-12)) and MAE |A - x|, means over (C, H, W);
    each of shape (B, 1, 1, 1)."""
    nll = intensity - tf.square(x) * tf.math.log(tf.maximum(intensity, NLL_FLOOR))
    mae = tf.abs(amplitude - x)
    return tf.reduce_mean(nll, axis=[1, 2, 3], keepdims=True), tf.reduce_mean(mae, axis=[1, 2, 3], keepdims=True)

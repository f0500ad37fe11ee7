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

The ``*_tf`` functions take and return TensorFlow tensors (they are what the model's graph calls);
the plain names are thin NumPy-in/NumPy-out wrappers for tests and for layer-local comparisons.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from parity.errors import ParityInputError

Tensor = Any  # tf.Tensor; TensorFlow ships no type stubs

MERGE_EPSILON = 0.001  # added to the merge denominator (spec, section 4)
NLL_FLOOR = 1e-12  # clamp inside the Poisson log (spec, section 4)


def centre_mask(N: int) -> np.ndarray:
    """Ones on rows and columns [N/4, 3N/4), zero elsewhere; float32 (N, N)."""
    mask = np.zeros((N, N), dtype=np.float32)
    mask[N // 4 : 3 * N // 4, N // 4 : 3 * N // 4] = 1.0
    return mask


def _translate_real_tf(images: Tensor, offsets: Tensor) -> Tensor:
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

    def index(yy: Tensor, xx: Tensor) -> Tensor:
        return tf.reshape(to_index(yy, H) * (W + 2) + to_index(xx, W), [K, H * W])

    def sample(yy: Tensor, xx: Tensor) -> Tensor:
        return tf.reshape(tf.gather(padded, index(yy, xx), batch_dims=1), [K, H, W])

    # Same association as TensorFlow's own bilinear kernel: interpolate along x on the two rows,
    # then along y. With integer offsets the weights are exactly 1 and 0, so the shift is exact.
    top = (x1 - x) * sample(y0, x0) + (x - x0) * sample(y0, x1)
    bottom = (x1 - x) * sample(y1, x0) + (x - x0) * sample(y1, x1)
    return (y1 - y) * top + (y - y0) * bottom


def translate_tf(images: Tensor, offsets: Tensor) -> Tensor:
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
        moved = _translate_real_tf(parts, tf.concat([flat_off, flat_off], axis=0))
        re, im = tf.split(moved, 2, axis=0)
        return tf.reshape(tf.complex(re, im), out_shape)
    flat = tf.reshape(tf.cast(images, tf.float32), [-1, H, W])
    return tf.reshape(_translate_real_tf(flat, flat_off), out_shape)


def merge_tf(patches: Tensor, offsets: Tensor, M: int) -> Tensor:
    """Canvas (B, 1, M, M) from patches (B, C, N, N) placed at -(offset - batch mean offset).

    The numerator sums the full patches while the denominator counts only their central windows;
    that mismatch is the original's behaviour and is kept on purpose (spec, section 4).
    """
    N = int(patches.shape[-1])
    p = (M - N) // 2
    offsets = tf.convert_to_tensor(offsets, dtype=tf.float32)
    dbar = tf.reduce_mean(offsets, axis=[0, 1])  # over all B*C offsets, dx and dy separately
    shift = -(offsets - dbar)
    pad = [[0, 0], [0, 0], [p, p], [p, p]]
    numerator = tf.reduce_sum(translate_tf(tf.pad(patches, pad), shift), axis=1, keepdims=True)
    mask = tf.pad(tf.constant(centre_mask(N))[None, None], pad)
    masks = tf.broadcast_to(mask, tf.concat([tf.shape(shift)[:2], [M, M]], axis=0))
    denominator = tf.reduce_sum(translate_tf(masks, shift), axis=1, keepdims=True) + MERGE_EPSILON
    return tf.complex(tf.math.real(numerator) / denominator, tf.math.imag(numerator) / denominator)


def pad_canvas_tf(patch: Tensor, M: int) -> Tensor:
    """object_big=false: the one patch (B, 1, N, N) zero-padded to the canvas (B, 1, M, M)."""
    p = (M - int(patch.shape[-1])) // 2
    return tf.pad(patch, [[0, 0], [0, 0], [p, p], [p, p]])


def trim_tf(canvas: Tensor, N: int) -> Tensor:
    """Centre N x N crop of a canvas (B, 1, M, M)."""
    p = (int(canvas.shape[-1]) - N) // 2
    return canvas[:, :, p : p + N, p : p + N]


def reextract_tf(canvas: Tensor, offsets: Tensor, N: int) -> Tensor:
    """Patches (B, C, N, N): the group's canvas translated by each raw offset, centre-cropped."""
    offsets = tf.convert_to_tensor(offsets, dtype=tf.float32)
    M = int(canvas.shape[-1])
    tiled = tf.broadcast_to(canvas, tf.concat([tf.shape(offsets)[:2], [M, M]], axis=0))
    return trim_tf(translate_tf(tiled, offsets), N)


def illuminate_tf(patches: Tensor, probe: Tensor, mask: Tensor | None = None) -> Tensor:
    """probe * patch (probe (N, N) broadcast over B and C), then times the disk mask if given."""
    psi = tf.convert_to_tensor(probe, dtype=tf.complex64)[None, None] * patches
    if mask is None:
        return psi
    m = tf.convert_to_tensor(mask, dtype=tf.float32)
    # Real and imaginary parts scaled separately: a multiply by complex(m, 0) would be the same
    # in exact arithmetic but adds 0*x terms that are not exact for non-finite values.
    return tf.complex(tf.math.real(psi) * m, tf.math.imag(psi) * m)


def intensity_tf(field: Tensor) -> Tensor:
    """|fft2(field)|^2 / N^2 over the two innermost axes, not yet shifted."""
    F = tf.signal.fft2d(tf.convert_to_tensor(field, dtype=tf.complex64))
    re, im = tf.math.real(F), tf.math.imag(F)
    n2 = float(int(field.shape[-2]) * int(field.shape[-1]))
    return (re * re + im * im) / n2


def diffract_tf(field: Tensor) -> Tensor:
    """Amplitude sqrt(fftshift(|fft2(field)|^2 / N^2)), the shift over the spatial axes only."""
    return tf.sqrt(tf.signal.fftshift(intensity_tf(field), axes=(-2, -1)))


def poisson_nll_tf(intensity: Tensor, x: Tensor) -> Tensor:
    """Per-group mean over (C, H, W) of I - x^2 log(max(I, 1e-12)); shape (B, 1, 1, 1)."""
    nll = intensity - tf.square(x) * tf.math.log(tf.maximum(intensity, NLL_FLOOR))
    return tf.reduce_mean(nll, axis=[1, 2, 3], keepdims=True)


def mae_tf(amplitude: Tensor, x: Tensor) -> Tensor:
    """Per-group mean over (C, H, W) of |A - x|; shape (B, 1, 1, 1)."""
    return tf.reduce_mean(tf.abs(amplitude - x), axis=[1, 2, 3], keepdims=True)


# NumPy wrappers ---------------------------------------------------------------------------------

_DEVICES = {"cpu": "/CPU:0", "cuda": "/GPU:0"}


def device_problem(device: str) -> str | None:
    """Why TensorFlow cannot run on ``device`` here, or None."""
    if device not in _DEVICES:
        return f"device {device!r} is not supported by the tensorflow backend; use 'cpu' or 'cuda'"
    if device == "cuda" and not tf.config.list_physical_devices("GPU"):
        return (
            "tensorflow backend: device 'cuda' was requested but TensorFlow sees no GPU "
            "(tf.config.list_physical_devices('GPU') is empty); install tensorflow[and-cuda] on a "
            "CUDA machine, or run with device 'cpu'"
        )
    return None


def tf_device(device: str) -> str:
    """TensorFlow device string for the harness's device option; fails loudly, never falls back."""
    problem = device_problem(device)
    if problem is not None:
        raise ParityInputError(problem)
    return _DEVICES[device]


def _run(fn: Any, *args: Any, device: str) -> np.ndarray:
    with tf.device(tf_device(device)):
        return np.asarray(fn(*args).numpy())


def translate(images: np.ndarray, offsets: np.ndarray, device: str = "cpu") -> np.ndarray:
    """NumPy wrapper of :func:`translate_tf` (float32 or complex64 images)."""
    images = np.asarray(images)
    dtype = np.complex64 if np.iscomplexobj(images) else np.float32
    return _run(translate_tf, images.astype(dtype, copy=False), np.asarray(offsets, dtype=np.float32), device=device)


def merge(patches: np.ndarray, offsets: np.ndarray, M: int, device: str = "cpu") -> np.ndarray:
    """NumPy wrapper of :func:`merge_tf`: (B, C, N, N) complex patches → (B, 1, M, M) canvas."""
    return _run(
        merge_tf, np.asarray(patches, dtype=np.complex64), np.asarray(offsets, dtype=np.float32), M, device=device
    )


def reextract(canvas: np.ndarray, offsets: np.ndarray, N: int, device: str = "cpu") -> np.ndarray:
    """NumPy wrapper of :func:`reextract_tf`: (B, 1, M, M) canvas → (B, C, N, N) patches."""
    return _run(
        reextract_tf, np.asarray(canvas, dtype=np.complex64), np.asarray(offsets, dtype=np.float32), N, device=device
    )


def diffract(field: np.ndarray, device: str = "cpu") -> np.ndarray:
    """NumPy wrapper of :func:`diffract_tf`: complex field (..., N, N) → float32 amplitude."""
    return _run(diffract_tf, np.asarray(field, dtype=np.complex64), device=device)


def intensity(field: np.ndarray, device: str = "cpu") -> np.ndarray:
    """NumPy wrapper of :func:`intensity_tf` (unshifted |fft2|^2 / N^2)."""
    return _run(intensity_tf, np.asarray(field, dtype=np.complex64), device=device)

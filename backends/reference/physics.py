"""The physics layer of the forward model (forward-model.md, section 4) in float64 NumPy.

These functions are public: the float32 backends' tests and the layer-local parity checks call them on
plain arrays. Complex values are always handled as two real arrays put back together, because the
spec defines translation, masking and the canvas division on the real and imaginary parts separately;
NumPy's complex-by-real arithmetic would promote the real factor to complex first, which adds terms
like ``imag * 0`` (NaN for an infinite part) that the spec does not have.
"""

from __future__ import annotations

import math

import numpy as np

from backends.reference.ops import Array, pad_spatial

# Added to the canvas denominator so pixels no central window covers divide by 0.001, not by 0.
MERGE_EPSILON = 0.001
# Clamp inside the Poisson log (spec, section 4).
NLL_FLOOR = 1e-12


def complex_from_parts(real: Array, imag: Array) -> Array:
    out = np.empty(np.broadcast_shapes(real.shape, imag.shape), dtype=np.complex128)
    out.real = real
    out.imag = imag
    return out


def scale_complex(z: Array, factor: Array) -> Array:
    """``z`` times a real ``factor``, part by part."""
    return complex_from_parts(z.real * factor, z.imag * factor)


def divide_complex(z: Array, divisor: Array) -> Array:
    """``z`` divided by a real ``divisor``, part by part."""
    return complex_from_parts(z.real / divisor, z.imag / divisor)


def centre_mask(N: int) -> Array:
    """1 on rows and columns [N/4, 3N/4) of an N x N patch, 0 elsewhere."""
    inside = np.zeros(N, dtype=bool)
    inside[N // 4 : 3 * N // 4] = True
    return (inside[:, None] & inside[None, :]).astype(np.float64)


def border_mask(N: int) -> Array:
    return 1.0 - centre_mask(N)


def disk_mask(N: int) -> Array:
    """The hard disk of probe_mask: pixel centres at (i - N/2 + 0.5, j - N/2 + 0.5), inside when the
    radius is below N/4. The reference keeps its own copy: an arbiter must not share the harness's
    (parity.batch) or a bug there would be copied into the arbiter too."""
    c = np.arange(N) - N / 2 + 0.5
    r2 = c[:, None] ** 2 + c[None, :] ** 2
    return (r2 < (N / 4) ** 2).astype(np.float64)


def translate(images: Array, offsets: Array, coordinates: type = np.float64) -> Array:
    """Bilinear translation: out[i, j] samples the zero-extended image at (x=j-dx, y=i-dy).

    images: (..., H, W) real or complex; offsets: (..., 2) as [dx, dy], broadcast against the
    leading axes of ``images``. A neighbour outside the image contributes 0 with its weight
    unchanged. The coordinates are computed per output pixel in float64, where ``j - dx`` is exact
    for float32 offsets, so an integer offset gives an exact shift. ``coordinates=np.float32``
    rounds them as a float32 backend does (the rest stays float64): the error model's tests use it.
    """
    images = np.asarray(images)
    if np.iscomplexobj(images):
        return complex_from_parts(
            translate(images.real, offsets, coordinates), translate(images.imag, offsets, coordinates)
        )
    offsets = np.asarray(offsets, dtype=np.float64)
    H, W = images.shape[-2:]
    lead = np.broadcast_shapes(images.shape[:-2], offsets.shape[:-1])
    img = np.broadcast_to(np.asarray(images, dtype=np.float64), (*lead, H, W)).reshape(-1, H, W)
    off: Array = np.broadcast_to(offsets, (*lead, 2)).reshape(-1, 2).astype(coordinates)
    if coordinates is np.float64 and np.all(np.abs(off) < _SHIFTED_MAX_OFFSET):
        return _translate_shifted(img, off).reshape(*lead, H, W)

    x = (np.arange(W, dtype=coordinates)[None, None, :] - off[:, 0, None, None]).astype(np.float64)  # (K, 1, W)
    y = (np.arange(H, dtype=coordinates)[None, :, None] - off[:, 1, None, None]).astype(np.float64)  # (K, H, 1)
    x_floor, y_floor = np.floor(x), np.floor(y)
    fx, fy = x - x_floor, y - y_floor
    x0, y0 = x_floor.astype(np.intp), y_floor.astype(np.intp)
    k = np.arange(img.shape[0])[:, None, None]

    out = np.zeros(img.shape, dtype=np.float64)
    for yi, wy in ((y0, 1.0 - fy), (y0 + 1, fy)):
        for xi, wx in ((x0, 1.0 - fx), (x0 + 1, fx)):
            inside = (yi >= 0) & (yi < H) & (xi >= 0) & (xi < W)
            values = img[k, np.clip(yi, 0, H - 1), np.clip(xi, 0, W - 1)]
            out += (wy * wx) * np.where(inside, values, 0.0)
    return out.reshape(*lead, H, W)


# Finite offsets below this (pixels) take ``_translate_shifted``; others (NaN, inf, absurd) the
# per-pixel gathers, which give what a float32 backend's clipped indices give for them.
_SHIFTED_MAX_OFFSET = 2.0**20


def _translate_shifted(img: Array, off: Array) -> Array:
    """``translate`` of (K, H, W) by finite float64 offsets (K, 2), as four shifted slices per image.

    One shift per image makes every pixel's sample point j - dx fall the same distance past the
    same integer shift: floor(j - dx) = j + floor(-dx), and its fraction is (-dx) - floor(-dx).
    So the four neighbours are whole shifted copies of the image, each times one weight, summed in
    the order and with the weights the per-pixel form uses (for float32 offsets, where j - dx is
    exact, the result is the same bit for bit; for other float64 offsets it differs by the rounding
    of j - dx). No index arrays, no gathers: the translation was a tenth of a forward pass."""
    K, H, W = img.shape
    out = np.zeros(img.shape, dtype=np.float64)
    for k in range(K):
        neg_x, neg_y = -off[k, 0], -off[k, 1]
        sx, sy = math.floor(neg_x), math.floor(neg_y)
        fx, fy = neg_x - sx, neg_y - sy
        for a, wy in ((0, 1.0 - fy), (1, fy)):
            dy = sy + a  # out row i reads row i + dy
            rows_out = slice(max(0, -dy), min(H, H - dy))
            if rows_out.start >= rows_out.stop:
                continue
            rows_in = slice(rows_out.start + dy, rows_out.stop + dy)
            for b, wx in ((0, 1.0 - fx), (1, fx)):
                dx = sx + b
                cols_out = slice(max(0, -dx), min(W, W - dx))
                if cols_out.start >= cols_out.stop:
                    continue
                cols_in = slice(cols_out.start + dx, cols_out.stop + dx)
                out[k, rows_out, cols_out] += (wy * wx) * img[k, rows_in, cols_in]
    return out


def crop_centre(images: Array, size: int) -> Array:
    """Rows and columns [(M - size)/2, (M - size)/2 + size) of the last two axes."""
    start = (images.shape[-1] - size) // 2
    return images[..., start : start + size, start : start + size]


def merge(patches: Array, offsets: Array, M: int) -> Array:
    """Patches (B, C, N, N) at offsets (B, C, 2) averaged onto one (B, 1, M, M) canvas per group.

    Each patch is padded to M and moved by -(d - d̄), d̄ being the mean over the whole batch. The
    numerator sums full patches while the denominator counts only their central windows, as the
    original does, so outside every central window the canvas is about 1000x the patch values.
    """
    return merge_shifted(patches, merge_shift(offsets), M)


def merge_shift(offsets: Array) -> Array:
    """The shift ``merge`` moves each padded patch by: -(d - d̄), d̄ the batch mean."""
    d = np.asarray(offsets, dtype=np.float64)
    return np.asarray(-(d - d.reshape(-1, 2).mean(axis=0)))


def merge_shifted(patches: Array, shift: Array, M: int) -> Array:
    """``merge`` with each patch's shift (B, C, 2) given, so one patch's can be moved alone."""
    N = patches.shape[-1]
    pad = (M - N) // 2
    numerator = translate(pad_spatial(patches, pad), shift).sum(axis=1, keepdims=True)
    coverage = translate(pad_spatial(centre_mask(N), pad), shift).sum(axis=1, keepdims=True)
    return divide_complex(numerator, coverage + MERGE_EPSILON)


def pad_to_canvas(patch: Array, M: int) -> Array:
    """The object_big=false canvas: the single patch of each group zero-padded to M x M."""
    return pad_spatial(patch, (M - patch.shape[-1]) // 2)


def reextract(canvas: Array, offsets: Array, N: int) -> Array:
    """Canvas (B, 1, M, M) moved by each raw offset (B, C, 2), centre N x N kept: (B, C, N, N)."""
    return crop_centre(translate(canvas, offsets), N)


def illuminate(patches: Array, probe: Array, mask: Array | None = None) -> Array:
    """psi = probe * patch, optionally times a real mask (the hard disk when probe_mask is set)."""
    psi = probe * patches
    return psi if mask is None else scale_complex(psi, mask)


def diffract(field: Array) -> Array:
    """Far-field amplitude: sqrt(fftshift(|fft2(field)|^2 / N^2)), shifted over H and W only."""
    N = field.shape[-1]
    if field.shape[-2] != N:
        raise ValueError(f"diffract: expected square fields, got {field.shape}")
    spectrum = np.fft.fft2(field, axes=(-2, -1))
    intensity = (spectrum.real**2 + spectrum.imag**2) / N**2
    return np.asarray(np.sqrt(np.fft.fftshift(intensity, axes=(-2, -1))))


def losses(amplitude: Array, intensity: Array, x: Array) -> tuple[Array, Array]:
    """Per-group Poisson NLL (clamped log) and MAE, means over (C, H, W); x is the unscaled input."""
    axes = (1, 2, 3)
    nll = (intensity - x**2 * np.log(np.maximum(intensity, NLL_FLOOR))).mean(axis=axes, keepdims=True)
    mae = np.abs(amplitude - x).mean(axis=axes, keepdims=True)
    return nll, mae

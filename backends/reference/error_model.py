"""A running model of float32 rounding error for every tap of the canonical model.

The float64 reference computes, beside each tap, an *error scale* S (same shape as the tap, real,
in the tap's own units): the float32 error a faithful implementation makes at that element is
expected to be about u·S, u = 2⁻²⁴ the float32 unit roundoff. The harness turns S into a tolerance
(``parity.tolerances``: a dimensionless factor per family of taps times u times S), so a tolerance
follows the magnitude of what it compares, element by element, with nothing fitted to one machine.

How S is built, operation by operation (u-units; "x" a value, "S_x" its error scale):

- a conv z = W∗x + b sums 9·C_in products whose own roundings and whose inherited errors are
  independent: S_z² = (W²)∗(S_x² + x²) + b². This is the square-root-of-sum-of-squares ("expected",
  not worst-case) error of a dot product; the worst-case bound |W|∗|x| grows like √K times too fast
  over the 17 convs of the deepest path and would make every tolerance useless.
- ReLU: the output may differ by the input's error (1-Lipschitz), so the tap keeps S_z. Only units
  that are active in the reference pass error on to the next layer; units within float32 noise of
  zero are a vanishing fraction and their error is no larger than their neighbours'.
- smooth activations: S_out = |f'(z)|·S_z + c·|f(z)|, f' read from the output (sigmoid, tanh,
  softplus) or bounded by its Lipschitz constant (swish: 1.1).
- max-pool and upsampling copy values: S is pooled (max) or upsampled with them.
- a bilinear translation by a float32 offset: the weights are positive, so S translates with them;
  the sampling coordinate j − dx is rounded to float32 (error ≤ u·extent), which moves the sample
  point and changes the value by at most u·extent·|∇x|, ∇x the slope of the one cell the sample
  lies in (both cells beside a whole pixel, where the rounding may cross into the next one).
- the merge divides the summed patches by the summed masks plus 0.001: S_canvas = S_num/den +
  |canvas|·S_den/den, which is what makes the tolerance follow the ~1000× ring outside the central
  windows instead of being set by it.
- the FFT: input errors spread over all frequencies (Parseval), and the worst of N² frequencies
  lies about √(2·ln N²) above that average: S_F = √(2·ln N²)·‖S_ψ‖₂ per element. The FFT's own
  rounding is about log₂(N²)·u·‖ψ‖₂ per element, uniform over frequencies, so the far tails of a
  diffraction pattern get an absolute, not a relative, tolerance. Values that may be lost
  to underflow (ψ below float32's normal range, or I = |F|²/N² below it) are carried linearly.
- squares, logs and means: first-order propagation; the log is taken over a band of ±BAND·u·S so a
  value near the 1e-12 clamp is not linearised past its domain; a mean of n terms adds log₂(n)
  roundings of the mean magnitude (pairwise or blocked summation, as both frameworks use).
- every operation may underflow to zero (flush-to-zero is common on CPUs and GPUs): S ≥ TINY/u.

The constants here are the textbook counts of roundings per operation. What this model cannot know
(how a framework orders a sum, which conv algorithm it picks) is absorbed by the per-family factors
in the tolerance file, measured with ``ptycho-parity measure-tolerances``.

Every function takes the stage's reference input and its error scale and returns the output's
error scale, so a stage can be checked on its own (layer-local parity) with the input scale set to
zero.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from backends.reference import physics
from backends.reference.ops import Array, conv2d, max_pool2, pad_spatial, upsample2

U32 = 2.0**-24
# Smallest normal float32: below it a float32 backend may flush to zero (FTZ/DAZ), in u-units.
TINY = float(np.finfo(np.float32).tiny) / U32
# Half-width, in units of u·S, of the band over which a non-linear step (the clamped log) is
# linearised: wider than any tolerance factor, so the band covers every value a backend may hold.
BAND = 1024.0
NLL_FLOOR = physics.NLL_FLOOR


def conv_scale(x: Array, s_x: Array, kernel: Array, bias: Array, gated: bool = False) -> Array:
    """S of z = W∗x + b: sqrt((W²)∗(S_x² + x²) + b²).

    The squared fields are rescaled per sample to a maximum of 1 and convolved in float32: the result
    is an error estimate, so float32 is plenty, it halves the cost, and the rescaling keeps squares
    of large or tiny values inside float32's range. ``gated``: x is a ReLU output whose active units
    alone pass their error on, the same as passing ``relu_pass_on(x, s_x)`` without making it. The
    elementwise work on either side of the product runs compiled (``fused``).
    """
    from backends.reference import fused

    scaled, peak = fused.scaled_squares(x, s_x, gated)
    k2 = (kernel.astype(np.float64) ** 2).astype(np.float32)
    acc = conv2d(scaled, k2, np.zeros(kernel.shape[-1], dtype=np.float32), dtype=np.float32)
    return fused.finished_scale(acc, peak, bias * bias, TINY)


def relu_pass_on(value: Array, s: Array) -> Array:
    """The error a ReLU output passes to the next layer: only from units active in the reference.

    The tap itself keeps the full S (a unit within float32 noise of zero may come out slightly
    positive); passing that on from every dead unit would double the estimated error variance at
    every layer, while the units really within noise of zero are a vanishing fraction.
    """
    return np.where(value > 0, s, 0.0)


def activation_scale(name: str, out: Array, s_z: Array, z_bound: Array | None = None) -> Array:
    """S of a head activation's output, from its output values and the pre-activation's S."""
    if name == "sigmoid":
        slope = out * (1.0 - out)
    elif name == "pi_tanh":
        t = out / math.pi
        slope = math.pi * (1.0 - t * t)
    elif name == "softplus":
        slope = -np.expm1(-out)  # sigmoid(z) = 1 - exp(-softplus(z))
    elif name == "relu":
        return np.asarray(s_z + activation_rounding(name, out) + TINY)
    elif name == "swish":
        slope = np.full_like(out, 1.1)  # |d/dz z·sigmoid(z)| <= 1.0998
    else:
        raise ValueError(f"no error model for activation {name!r}")
    return np.asarray(np.abs(slope) * s_z + activation_rounding(name, out) + TINY)


def activation_rounding(name: str, out: Array) -> Array:
    """The head activation's own rounding in its S (the rest is the pre-activation's error carried)."""
    return np.asarray((1.0 if name == "relu" else 3.0) * np.abs(out))


def pool_scale(s: Array) -> Array:
    """A pooled value is one of its window's values, each off by at most its own error."""
    return max_pool2(s)


def upsample_scale(s: Array) -> Array:
    return upsample2(s)


def patches_scale(amplitude: Array, phase_scale: Array, amplitude_scale: Array) -> Array:
    """S of O = A·cos φ + i·A·sin φ: |δO|² = δA² + A²·δφ², plus the cos/sin/product roundings."""
    return np.asarray(np.sqrt(amplitude_scale**2 + (amplitude * phase_scale) ** 2) + 3.0 * np.abs(amplitude) + TINY)


def _extent(shape: tuple[int, ...], offsets: Array) -> float:
    """Largest |sampling coordinate|: bounds the float32 rounding of j − dx as u·extent."""
    return float(max(shape[-1], shape[-2]) + np.abs(offsets).max(initial=0.0))


def ringed(a: Array) -> Array:
    """``a`` with a ring of one zero pixel around its last two axes: the pixels a bilinear sample
    just beyond the edge reads. A translation is shift-invariant, so translating a ringed field and
    cropping the ring (``unringed``) is translating the field itself, except that the ring's own
    values now count: the coordinate term of the pixel beside the edge lives there."""
    return pad_spatial(a, 1)


def unringed(a: Array) -> Array:
    return np.asarray(a[..., 1:-1, 1:-1])


def _cell_margin(extent: float) -> float:
    """How close to a whole pixel (in pixels) a sample coordinate may lie and still fall in the next
    cell in a float32 implementation: many times the coordinate's own rounding (u·extent, and the
    few roundings of an offset's mean or a normalised grid before it), never under 2⁻¹² pixel."""
    return max(2.0**-12, 64.0 * U32 * extent)


def _near_whole(d: Array, extent: float) -> Array:
    """Where a coordinate moved by ``d`` lies within ``_cell_margin`` of a whole pixel: there a
    float32 implementation's sample may fall on either side of it (a kink of the translation)."""
    frac = -d - np.floor(-d)
    margin = _cell_margin(extent)
    return np.asarray((frac < margin) | (frac > 1.0 - margin))


def _coordinate_slope(ring: Array, offsets: Array, extent: float) -> Array:
    """|∂x| + |∂y| of the bilinear interpolant at every sample of ``translate(ring, offsets)``.

    Every sample of one image lies the same fraction past the same whole shift, so it lies inside
    one known cell per axis, and the interpolant's slope along an axis is that cell's difference
    (bilinear along the other axis). Moving its coordinate by the float32 rounding changes the
    sample by that slope alone, unless the fraction is within ``_cell_margin`` of a whole pixel,
    where the sample may cross into the neighbouring cell: then the larger of the two cells counts.
    The bound this replaced took the steepest of the three cells around a pixel's neighbours:
    beside the merge's mask edge, a pixel the mask never reaches got the edge's whole step over the
    denominator's 0.001, and the canvas's ring had a thousand times the error a float32
    implementation makes there (2026-12-05: the 90 largest scales of the default config's canvas
    held 90 % of its norm; torch's error there stayed under 0.0015 of them).

    Near a whole pixel on both axes (whole offsets: every gridsize-1 merge) a sample may fall in
    the diagonal cell too. Its error there is second order, but at a corner of the mask, where the
    sample's own row and column are flat, it is all the error there is, and a normalised grid
    (torch's affine_grid and grid_sample) makes it: a thousand roundings of nothing, against a
    tolerance of nothing, without the rows beside (``read``).
    """
    d = np.asarray(offsets, dtype=np.float64)
    lead = np.broadcast_shapes(ring.shape[:-2], d.shape[:-1])
    ring, d = np.broadcast_to(ring, (*lead, *ring.shape[-2:])), np.broadcast_to(d, (*lead, 2))
    whole = -np.floor(-d)  # translating by it reads, for output pixel j, cell j + floor(-dx)
    frac = -d - np.floor(-d)
    margin = _cell_margin(extent)
    near_whole = _near_whole(d, extent)

    def read(step: Array, shift: Array, other: int) -> Array:
        # Within the margin of a whole pixel along the other axis, a sample may also read up to
        # ``margin`` of the row beside it: second order in the coordinates' errors, but where its
        # own row is flat (a corner of the mask) it is the whole error.
        slope = physics.translate(step, shift)
        near = near_whole[..., other]
        if np.any(near):
            rows = []
            for side in (1.0, -1.0):
                beside = shift.copy()
                beside[..., other] = np.round(d[..., other]) + side
                rows.append(physics.translate(step, beside))
            slope = np.where(near[..., None, None], slope + margin * np.maximum(*rows), slope)
        return slope

    total = np.zeros(ring.shape, dtype=np.float64)
    for axis in (0, 1):  # offsets are [dx, dy]; x is the last array axis
        step = np.abs(np.diff(ring, axis=-1 - axis, append=np.zeros_like(ring[..., :1, :] if axis else ring[..., :1])))
        along = d.copy()
        along[..., axis] = whole[..., axis]
        slope = read(step, along, 1 - axis)
        for near, cell in ((frac[..., axis] < margin, 1.0), (frac[..., axis] > 1.0 - margin, -1.0)):
            if np.any(near):
                beside = along.copy()
                beside[..., axis] += cell
                slope = np.where(near[..., None, None], np.maximum(slope, read(step, beside, 1 - axis)), slope)
        total += slope
    return np.asarray(extent * total)


def translate_scale(img: Array, s_img: Array, offsets: Array) -> Array:
    """S of a float32 bilinear translation of ``img`` (real or complex) by ``offsets``.

    Translated on a ring one pixel wider than the image (``ringed``): a sample between the last
    pixel and the zero beyond it moves with its coordinate by that pixel's whole value per pixel,
    whatever its weight on it. Without the ring that slope sat on the image's pixel only and reached
    the sample through its weight, 5e-4 in a long-sweep case (N=64, a canvas without margin, an
    offset of -0.99946), where both frameworks then needed 13 times the tolerance.
    """
    d = np.asarray(offsets, dtype=np.float64)
    ring = ringed(img)
    moved = physics.translate(ringed(s_img) + 4.0 * np.abs(ring), d)
    return unringed(moved + _coordinate_slope(ring, d, _extent(img.shape, d))) + TINY


def merge_scale(patches: Array, s_patches: Array, offsets: Array, canvas: Array, M: int) -> Array:
    """S of the merged canvas (object_big): numerator and denominator errors, then the division."""
    N = patches.shape[-1]
    pad = (M - N) // 2
    d = np.asarray(offsets, dtype=np.float64)
    shift = -(d - d.reshape(-1, 2).mean(axis=0))
    C = patches.shape[1]
    extent = _extent((M, M), shift)
    # numerator and denominator translated on a ring one pixel wider than the canvas (translate_scale)
    ring = pad_spatial(patches, pad + 1)
    source = pad_spatial(s_patches, pad + 1) + (4.0 + C) * np.abs(ring)
    moved = physics.translate(source, shift) + _coordinate_slope(ring, shift, extent)
    s_num = unringed(moved).sum(axis=1, keepdims=True)
    mask = np.broadcast_to(pad_spatial(physics.centre_mask(N), pad), patches.shape[:-2] + (N + 2 * pad,) * 2)
    den = physics.translate(mask, shift).sum(axis=1, keepdims=True) + physics.MERGE_EPSILON
    s_den = unringed(_coordinate_slope(ringed(mask), shift, extent)).sum(axis=1, keepdims=True) + C * den
    return np.asarray(s_num / den + np.abs(canvas) * s_den / den + 2.0 * np.abs(canvas)) + TINY


def illumination_scale(patches: Array, s_patches: Array, probe: Array, mask: Array | None) -> Array:
    """S of ψ = P·O (times the disk): the patch error scaled by |P|, the complex product's roundings,
    and an operand below float32's normal range read as zero."""
    p = np.abs(probe)
    o = np.abs(patches)
    s = p * s_patches + 4.0 * p * o + TINY * (1.0 + p + o)
    return np.asarray(s if mask is None else s * mask + TINY)


def squared_underflows(diffraction: Array) -> Array:
    """Where float32's I = |F|²/N², formed before the square root of the diffraction amplitude
    sqrt(I), may be below the smallest normal number, which TensorFlow flushes to 0 (torch keeps it
    subnormal): there the amplitude is 0 and the whole value is lost. The division makes I the
    smallest value on the way; a test of |F|² alone (N² larger) missed it: a patch whose amplitude
    peaked at 4.5e-20 was 0 in TensorFlow and 669 tolerances off (the long sweep, seed 20261211).
    The factor 2 covers I's own rounding and the parts re², im² squared apart."""
    return np.asarray(diffraction < 2.0 * math.sqrt(TINY * U32))


def diffraction_scale(field: Array, s_field: Array, diffraction: Array) -> Array:
    """S of sqrt(fftshift(|fft2 ψ|²)/N²) per element: propagated input error and the FFT's own
    rounding; then the modulus and the square root.

    The FFT's own rounding is spread evenly over the frequencies (Parseval: ‖ψ‖₂ per element). So is
    the error carried in, on average; but the element compared is the worst of N² frequencies, and
    the largest of N² incoherent spreads lies about √(2·ln N²) times above their average (a complex
    Gaussian's tail). Without that peak factor, a field whose error sat on a few hundred pixels (a
    canvas without margin, a disk-masked probe) let a faithful backend exceed the diffraction's
    tolerance by 15 % (the long false-alarm sweep).

    Flushing to zero is not random: values of ψ below float32's normal range may all be lost at once
    (a faint field, a dim probe), and the FFT sums them coherently, so their sum, and one flush per
    element, are carried linearly.
    """
    N = field.shape[-1]
    magnitude = np.abs(field)
    l2 = np.sqrt(np.sum(magnitude**2, axis=(-2, -1), keepdims=True))
    carried = math.sqrt(2.0 * math.log(N * N)) * np.sqrt(np.sum(s_field**2, axis=(-2, -1), keepdims=True))
    subnormal = np.where(magnitude < TINY * U32, magnitude, 0.0)
    flushed = np.sum(subnormal, axis=(-2, -1), keepdims=True) / U32 + N * N * TINY
    s_spectrum = carried + flushed + math.log2(N * N) * l2
    # I = |F|²/N² is formed in float32: below the smallest normal number it may be flushed to 0,
    # and the square root of that zero loses the whole value (4.5e-20 becomes 0, not 4.5e-20 ± 1e-26).
    squared_away = np.where(squared_underflows(diffraction), diffraction, 0.0) / U32
    return np.asarray(s_spectrum / N + 3.0 * diffraction + squared_away) + TINY


def amplitude_scale(diffraction: Array, s_diffraction: Array, amplitude: Array, log_scale: float) -> Array:
    return np.asarray(s_diffraction * math.exp(log_scale) + 2.0 * np.abs(amplitude)) + TINY


def intensity_scale(amplitude: Array, s_amplitude: Array, intensity: Array) -> Array:
    return np.asarray(2.0 * np.abs(amplitude) * s_amplitude + U32 * s_amplitude**2 + np.abs(intensity)) + TINY


def _mean_scale(s_terms: Array, terms: Array) -> Array:
    """S of a per-group mean over (C, H, W): carried errors add up (correlated, so linearly), and the
    reduction rounds log₂(n) times at the scale of the mean magnitude."""
    n = int(np.prod(terms.shape[1:]))
    axes = tuple(range(1, terms.ndim))
    carried = s_terms.mean(axis=axes, keepdims=True)
    return np.asarray(carried + (math.log2(n) + 1.0) * np.abs(terms).mean(axis=axes, keepdims=True)) + TINY


def poisson_nll_scale(intensity: Array, s_intensity: Array, x: Array) -> Array:
    """S of mean(I − x²·log(max(I, 1e-12))): the log's change over the band I ± BAND·u·S, per unit."""
    width = BAND * U32 * s_intensity
    hi = np.log(np.maximum(intensity + width, NLL_FLOOR))
    lo = np.log(np.maximum(intensity - width, NLL_FLOOR))
    x2 = x * x
    log_slope = np.divide(hi - lo, 2.0 * BAND * U32, out=np.zeros_like(hi), where=width > 0)
    terms = intensity - x2 * np.log(np.maximum(intensity, NLL_FLOOR))
    s_terms = (
        s_intensity + x2 * log_slope + 3.0 * (np.abs(intensity) + x2 * np.abs(np.log(np.maximum(intensity, NLL_FLOOR))))
    )
    return _mean_scale(s_terms, terms)


def mae_scale(amplitude: Array, s_amplitude: Array, x: Array) -> Array:
    terms = amplitude - x
    return _mean_scale(s_amplitude + np.abs(amplitude) + np.abs(x), terms)


def input_scale(values: Array) -> Array:
    """S of what a backend received: the bytes are identical, so only their own size."""
    return np.asarray(np.abs(values) + TINY)


def scaled_input_scale(scaled: Array) -> Array:
    """S of x / exp(log_scale): the exp and the division each round once."""
    return np.asarray(2.0 * np.abs(scaled) + TINY)


def masked(s: Array, mask: Array) -> Array:
    return np.asarray(s * mask + TINY)


def summed(a: Array, s_a: Array, b: Array, s_b: Array) -> Array:
    return np.asarray(np.sqrt(s_a**2 + s_b**2) + np.abs(a + b) + TINY)


def padded(s: Array, width: int) -> Array:
    return pad_spatial(s, width) + TINY


def crop(s: Array, size: int) -> Array:
    return physics.crop_centre(s, size)


def as_scales(taps: Mapping[str, Array]) -> dict[str, Array]:
    """Make every scale a C-contiguous float64 array (the harness compares against it element by element)."""
    return {name: np.ascontiguousarray(np.asarray(s, dtype=np.float64)) for name, s in taps.items()}

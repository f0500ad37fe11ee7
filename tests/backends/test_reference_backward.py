"""Tests of the float64 reference's hand-written backward pass (backends/reference/backward.py).

Two independent checks: every stage adjoint passes the dot-product test <J v, w> = <v, Jᵀ w> against
the forward function it inverts (``ops`` / ``physics``), and the whole backward matches central finite
differences of the whole float64 forward, along random directions in parameter space and in x, for
every configuration of the parity matrix. A deliberately broken adjoint must fail the same check.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from backends.reference import ReferenceBackend, backward, physics
from backends.reference.model import Conv, ConvBlock, ReferenceModel, Taps
from backends.reference.ops import (
    AMP_ACTIVATIONS,
    Activation,
    conv2d,
    max_pool2,
    pad_spatial,
    pi_tanh,
    relu,
    swish,
    upsample2,
)
from parity.batch import random_batch
from parity.config import ModelConfig
from parity.sweep import PARITY_MATRIX
from parity.taps import LOSSES, gradient_tap_specs
from parity.weights import generate_weights

Array = np.ndarray
DEFAULT = ModelConfig()


def inner(a: Array, b: Array) -> float:
    """The real inner product; a complex value counts as the pair (real, imag), as in backward."""
    return float(np.vdot(a, b).real)


def assert_adjoint(forward_side: float, adjoint_side: float, rtol: float = 1e-12) -> None:
    """Both sides of a dot-product test agree to ``rtol`` of their size (random vectors: no
    cancellation to speak of, so rounding is ~1e-16·sqrt(n) of it)."""
    assert abs(forward_side - adjoint_side) <= rtol * max(abs(forward_side), abs(adjoint_side)), (
        forward_side,
        adjoint_side,
    )


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


# ---- 1. per-stage adjoints: dot-product tests -------------------------------------------------


@pytest.mark.parametrize(("cin", "cout"), [(3, 5), (5, 3)], ids=["widening", "narrowing"])
def test_conv_adjoint(rng: np.random.Generator, cin: int, cout: int) -> None:
    """Both input-adjoint paths (col2im when the layer widens, flipped-kernel conv otherwise), the
    kernel and the bias; non-square maps so rows and columns cannot be swapped unnoticed."""
    B, H, W = 2, 7, 6
    x, kernel, bias = rng.standard_normal((B, cin, H, W)), rng.standard_normal((3, 3, cin, cout)), np.zeros(cout)
    w = rng.standard_normal((1, B, cout, H, W))
    dx, dkernel, dbias = backward.conv2d_vjp(x, kernel, w)

    v = rng.standard_normal(x.shape)
    assert_adjoint(inner(conv2d(v, kernel, bias), w[0]), inner(v, dx[0]))
    V = rng.standard_normal(kernel.shape)
    assert_adjoint(inner(conv2d(x, V, bias), w[0]), inner(V, dkernel[0]))
    u = rng.standard_normal(cout)
    assert_adjoint(inner(conv2d(np.zeros_like(x), np.zeros_like(kernel), u), w[0]), inner(u, dbias[0]))


def test_conv_stacked_cotangents_are_independent(rng: np.random.Generator) -> None:
    """S stacked cotangents give exactly what S separate passes give (they share only im2col)."""
    x, kernel = rng.standard_normal((2, 3, 5, 5)), rng.standard_normal((3, 3, 3, 4))
    dy = rng.standard_normal((2, 2, 4, 5, 5))
    stacked = backward.conv2d_vjp(x, kernel, dy)
    for s in range(2):
        single = backward.conv2d_vjp(x, kernel, dy[s : s + 1])
        for both, one in zip(stacked, single, strict=True):
            np.testing.assert_allclose(both[s], one[0], rtol=1e-13, atol=1e-13)


def test_conv_activation_vjp_is_activation_then_conv(rng: np.random.Generator) -> None:
    """The fused head-conv adjoint equals the activation's adjoint followed by the conv's."""
    x, kernel, bias = rng.standard_normal((2, 3, 6, 6)), rng.standard_normal((3, 3, 3, 2)), rng.standard_normal(2)
    dy = rng.standard_normal((2, 2, 2, 6, 6))
    fused = backward.conv2d_activation_vjp(Conv("c", kernel, bias), x, swish, dy)
    dz = backward.activation_vjp(swish, conv2d(x, kernel, bias), dy)
    for a, b in zip(fused, backward.conv2d_vjp(x, kernel, dz), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-14)


def test_max_pool_adjoint(rng: np.random.Generator) -> None:
    """Max-pool is linear around a point without ties: with distinct integers (gaps >= 1) and a
    perturbation below 1/2 no window changes its maximum, so the difference quotient is J v exactly."""
    shape = (2, 3, 8, 6)
    x = rng.permutation(int(np.prod(shape))).reshape(shape).astype(np.float64)
    v, w = rng.uniform(-1, 1, shape), rng.standard_normal((1, 2, 3, 4, 3))
    eps = 0.25
    jv = (max_pool2(x + eps * v) - max_pool2(x)) / eps
    assert_adjoint(inner(jv, w[0]), inner(v, backward.max_pool2_vjp(x, w)[0]))


def test_max_pool_ties_go_to_the_first_maximum_in_row_major_order() -> None:
    """The documented tie rule: the first maximal element of the window flattened as (dy, dx)."""
    windows = {  # window (row-major: top-left, top-right, bottom-left, bottom-right) -> receiver
        (1.0, 1.0, 1.0, 1.0): 0,
        (0.0, 2.0, 2.0, 1.0): 1,
        (0.0, 1.0, 3.0, 3.0): 2,
        (0.0, 0.0, 0.0, 5.0): 3,
    }
    for values, receiver in windows.items():
        x = np.asarray(values).reshape(1, 1, 2, 2)
        grad = backward.max_pool2_vjp(x, np.full((1, 1, 1, 1, 1), 7.0))[0].ravel()
        expected = np.zeros(4)
        expected[receiver] = 7.0
        np.testing.assert_array_equal(grad, expected, err_msg=str(values))


def test_upsample_and_padding_adjoints(rng: np.random.Generator) -> None:
    v, w = rng.standard_normal((2, 3, 4, 5)), rng.standard_normal((1, 2, 3, 8, 10))
    assert_adjoint(inner(upsample2(v), w[0]), inner(v, backward.upsample2_vjp(w)[0]))
    w = rng.standard_normal((1, 2, 3, 10, 11))
    assert_adjoint(inner(pad_spatial(v, 3), w[0]), inner(v, backward.pad_spatial_vjp(w, 3)[0]))
    crop_w = rng.standard_normal((1, 2, 3, 4, 4))
    canvas = rng.standard_normal((2, 3, 10, 10))
    assert_adjoint(
        inner(physics.crop_centre(canvas, 4), crop_w[0]), inner(canvas, backward.crop_centre_vjp(crop_w, 10)[0])
    )


# Sub-pixel, integer, partly and entirely out of range (a 16 x 16 image), positive and negative.
TRANSLATION_OFFSETS = np.array([[0.3, -1.7], [2.0, -3.0], [-0.5, 0.25], [7.6, 12.4], [-15.5, 3.0], [40.5, -2.2]])


@pytest.mark.parametrize("complex_", [False, True], ids=["real", "complex"])
def test_translation_adjoint(rng: np.random.Generator, complex_: bool) -> None:
    K = len(TRANSLATION_OFFSETS)
    shape = (K, 16, 16)

    def draw(*s: int) -> Array:
        z = rng.standard_normal(s)
        return z + 1j * rng.standard_normal(s) if complex_ else z

    v, w = draw(*shape), draw(1, *shape)
    lhs = inner(physics.translate(v, TRANSLATION_OFFSETS), w[0])
    assert_adjoint(lhs, inner(v, backward.translate_vjp(w, TRANSLATION_OFFSETS)[0]))
    # Each offset on its own too: a sum over offsets could hide a per-image mix-up.
    for k in range(K):
        lhs = inner(physics.translate(v[k], TRANSLATION_OFFSETS[k]), w[0, k])
        assert_adjoint(lhs, inner(v[k], backward.translate_vjp(w[:, k], TRANSLATION_OFFSETS[k])[0]))


def test_translation_adjoint_equals_the_inverse_translation_here(rng: np.random.Generator) -> None:
    """For one shift per image the bilinear operator is a 2-tap convolution per axis with zero
    boundaries, whose transpose is the same operator at -offsets. So swapping the adjoint for the
    inverse translation changes nothing (to rounding) and is NOT a usable planted gradient bug;
    translating by +offsets instead is (test_a_broken_adjoint_fails_the_finite_difference_check)."""
    w = rng.standard_normal((len(TRANSLATION_OFFSETS), 16, 16))
    np.testing.assert_allclose(
        backward.translate_vjp(w, TRANSLATION_OFFSETS), physics.translate(w, -TRANSLATION_OFFSETS), atol=1e-14
    )
    assert (
        np.abs(backward.translate_vjp(w, TRANSLATION_OFFSETS) - physics.translate(w, TRANSLATION_OFFSETS)).max() > 0.1
    )


def _offsets(rng: np.random.Generator, B: int, C: int) -> Array:
    """Sub-pixel offsets whose batch mean is not zero, so merge's d̄ is exercised."""
    return rng.uniform(-4, 4, size=(B, C, 2)) + np.array([0.7, -0.4])


def _complex(rng: np.random.Generator, *shape: int) -> Array:
    return rng.standard_normal(shape) + 1j * rng.standard_normal(shape)


def test_merge_and_canvas_adjoints(rng: np.random.Generator) -> None:
    B, C, N, M = 2, 4, 16, 26
    offsets = _offsets(rng, B, C)
    v, w = _complex(rng, B, C, N, N), _complex(rng, 1, B, 1, M, M)
    assert_adjoint(inner(physics.merge(v, offsets, M), w[0]), inner(v, backward.merge_vjp(w, offsets, N)[0]))
    v1 = _complex(rng, B, 1, N, N)
    assert_adjoint(inner(physics.pad_to_canvas(v1, M), w[0]), inner(v1, backward.pad_to_canvas_vjp(w, N)[0]))


def test_reextract_adjoint(rng: np.random.Generator) -> None:
    B, C, N, M = 2, 4, 16, 26
    offsets = _offsets(rng, B, C)
    v, w = _complex(rng, B, 1, M, M), _complex(rng, 1, B, C, N, N)
    assert_adjoint(inner(physics.reextract(v, offsets, N), w[0]), inner(v, backward.reextract_vjp(w, offsets, M)[0]))


@pytest.mark.parametrize("masked", [False, True])
def test_illumination_adjoint(rng: np.random.Generator, masked: bool) -> None:
    N = 16
    probe, mask = _complex(rng, 1, 1, N, N), physics.disk_mask(N) if masked else None
    v, w = _complex(rng, 2, 4, N, N), _complex(rng, 1, 2, 4, N, N)
    assert_adjoint(
        inner(physics.illuminate(v, probe, mask), w[0]), inner(v, backward.illuminate_vjp(w, probe, mask)[0])
    )


def _central_difference(f: Callable[[float], Array], h: float) -> Array:
    return (f(h) - f(-h)) / (2 * h)


def test_diffraction_adjoint(rng: np.random.Generator) -> None:
    """The FFT chain is nonlinear: J v comes from an independent forward-mode derivation
    (da = fftshift(2 Re(conj(F) dF) / N²) / (2a), dF = fft2(dψ)), itself checked against finite
    differences of ``physics.diffract``; then the dot-product test against the reverse mode."""
    N = 16
    psi, v, w = _complex(rng, 2, 3, N, N), _complex(rng, 2, 3, N, N), rng.standard_normal((1, 2, 3, N, N))
    a = physics.diffract(psi)
    F, dF = np.fft.fft2(psi), np.fft.fft2(v)
    jv = np.fft.fftshift(2 * (F.conj() * dF).real / N**2, axes=(-2, -1)) / (2 * a)
    np.testing.assert_allclose(_central_difference(lambda t: physics.diffract(psi + t * v), 1e-6), jv, rtol=1e-6)
    assert_adjoint(inner(jv, w[0]), inner(v, backward.diffract_vjp(psi, a, w)[0]))


def test_diffraction_adjoint_is_zero_where_the_amplitude_is_zero() -> None:
    """sqrt has no derivative at 0: the documented choice is 0 there, finite, without a warning."""
    psi = np.zeros((1, 1, 8, 8), dtype=np.complex128)
    with np.errstate(all="raise"):
        grad = backward.diffract_vjp(psi, physics.diffract(psi), np.ones((1, 1, 1, 8, 8)))
    np.testing.assert_array_equal(grad, 0)


def test_complex_object_adjoint(rng: np.random.Generator) -> None:
    """O = A·exp(iφ); J (dA, dφ) = (dA + i·A·dφ)·exp(iφ), checked against finite differences, then
    the dot-product test with a complex cotangent carried as g_re + i·g_im."""
    A, phi = rng.uniform(0.1, 2, (2, 4, 8, 8)), rng.uniform(-3, 3, (2, 4, 8, 8))
    dA, dphi, w = rng.standard_normal(A.shape), rng.standard_normal(A.shape), _complex(rng, 2, 4, 8, 8)

    def obj(t: float) -> Array:
        a, p = A + t * dA, phi + t * dphi
        return physics.complex_from_parts(a * np.cos(p), a * np.sin(p))

    jv = (dA + 1j * A * dphi) * np.exp(1j * phi)
    np.testing.assert_allclose(_central_difference(obj, 1e-6), jv, rtol=1e-8, atol=1e-9)
    gA, gphi = backward.complex_object_vjp(A, phi, w)
    assert_adjoint(inner(jv, w), inner(dA, gA) + inner(dphi, gphi))


@pytest.mark.parametrize("activation", [*AMP_ACTIVATIONS.values(), pi_tanh], ids=[*AMP_ACTIVATIONS, "pi_tanh"])
def test_activation_derivatives(rng: np.random.Generator, activation: Activation) -> None:
    z = rng.uniform(-12, 12, 400)
    z = z[np.abs(z) > 1e-3]  # away from ReLU's kink, where the central difference is meaningless
    # h = 1e-5: truncation ~1e-10·|f'''| and rounding ~1e-16·|f|/h ~ 3e-11 (pi·tanh), hence the atol.
    fd = _central_difference(lambda t: activation(z + t), 1e-5)
    np.testing.assert_allclose(backward.activation_vjp(activation, z, np.ones_like(z)), fd, rtol=1e-7, atol=1e-9)


def test_relu_derivative_at_zero_is_zero() -> None:
    np.testing.assert_array_equal(backward.relu_vjp(np.array([0.0, -0.0, 1.0]), np.ones(3)), [0.0, 0.0, 1.0])
    np.testing.assert_array_equal(backward.activation_vjp(relu, np.array([0.0, 2.0]), np.ones(2)), [0.0, 1.0])


def test_losses_adjoint(rng: np.random.Generator) -> None:
    """Both losses summed over the batch, against finite differences of ``physics.losses``, with
    some intensities under the NLL's clamp (there only the I term moves) and A - x away from 0."""
    shape = (2, 3, 4, 4)
    x = rng.uniform(0.5, 2, shape)
    amplitude = x + rng.choice([-1, 1], shape) * rng.uniform(0.1, 1, shape)
    intensity = rng.uniform(0.5, 3, shape)
    intensity[0, 0, 0, :2] = [1e-14, 5e-13]  # clamped: stays under 1e-12 within the step below
    d_amp, d_int, d_x = backward.losses_vjp(amplitude, intensity, x)
    va, vi, vx = (rng.standard_normal(shape) for _ in range(3))
    vi[0, 0, 0, :2] = 0.0

    def total(t: float, s: int) -> Array:
        return np.asarray(physics.losses(amplitude + t * va, intensity + t * vi, x + t * vx)[s].sum())

    for s in range(len(LOSSES)):
        fd = float(_central_difference(lambda t, s=s: total(t, s), 1e-6))
        analytic = inner(d_amp[s], va) + inner(d_int[s], vi) + inner(d_x[s], vx)
        assert abs(fd - analytic) <= 1e-7 * abs(analytic), (LOSSES[s], fd, analytic)
    np.testing.assert_allclose(d_int[0][0, 0, 0, :2], 1 / x[0].size)  # the clamp holds the log constant


# ---- 2. the whole model against finite differences ------------------------------------------------
#
# Why the check looks the way it does (measured on the default config, B=2):
# * ReLU kinks. There are ~10⁶ ReLU units and max-pool windows; a relative step of 1e-6 crosses 2-3
#   of them, and each crossing costs ~1e-4 of the directional derivative. Steps that verifiably cross
#   none (<= 1e-7) leave the float64 rounding of the loss (~1e-13 of it) at ~1e-7 of the derivative:
#   no step is both. So the difference quotient is taken of the same forward with its kink decisions
#   (ReLU active sets, max-pool choices, the ReLU head activation, the NLL clamp, the MAE's signs)
#   fixed at the base point. That function is the model's own stages with each non-smooth choice
#   replaced by the one the base point made, so it equals the forward on the base point's piece
#   (test_frozen_forward_is_the_forward), is smooth, and has the same derivative there.
# * Curvature. At random_batch's x the untrained model predicts intensities down to 1e-7 where
#   x² ~ 1e5, and x²·log(I) makes the NLL's third derivative ~10⁶ times its first: central differences
#   then bottom out at ~1e-6. So x is drawn around the model's own predicted amplitude,
#   x = A·U(0.5, 1.5), as for a model that fits its data; the adjoints are the same code at any x,
#   and the harness's own kind of point is checked too, at 1e-5 (test_gradients_at_the_harness_batch).
# * Step. Central differences at h = 3e-6 then have truncation and rounding errors of a few 1e-9
#   each; the worst error over all configurations, directions and losses is 2e-8 (1e-7 is the bar).
# * Scale. Errors are relative to Σ |<grad_p, v_p>| over the parameter tensors p (and x): equal to
#   |directional derivative| when the tensors' contributions do not cancel, and robust when they do
#   by accident (one softplus direction's MAE derivative is 2e-4 of its terms). |grad|·|v| would be
#   ~500x larger for a random direction in 10⁶ dimensions, so a gradient wrong by a few per mille
#   would still pass; this scale keeps the check that strict.
# Directions: two in parameter space (each kernel and bias N(0, 1) times its own RMS, a relative step;
# log_scale N(0, 1)) and one in x (N(0, 1) times the RMS of x).

FD_STEP = 3e-6
FD_RTOL = 1e-7
FD_BATCH = 2


def _windows(y: Array) -> Array:
    B, C, H, W = y.shape
    return y.reshape(B, C, H // 2, 2, W // 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(B, C, H // 2, W // 2, 4)


@dataclass
class Kinks:
    """Where the base point sits on each non-smooth operation: ReLU active sets (by conv), max-pool
    choices (by block), the ReLU head activation's active set (by branch), the NLL clamp, MAE signs."""

    relu: dict[str, Array]
    pool: dict[str, Array]
    head: dict[str, Array]
    lit: Array
    sign: Array

    @classmethod
    def of(cls, model: ReferenceModel, taps: Taps, x: Array) -> Kinks:
        relu_sets = {conv.name: taps[conv.name] > 0 for conv in model.convs() if conv.name in taps}
        pool = {
            block.prefix: _windows(taps[block.conv1.name]).argmax(axis=-1)[..., None]
            for block in model.encoder
            if block.resample_tap == "pool"
        }
        head = {}
        for h, branch in model.heads.items():
            if branch.activation is relu:
                head[h] = taps[f"{h}.head.centre" if branch.centre is not None else f"{h}.head.full.out"] > 0
        lit = taps["output.intensity"] > physics.NLL_FLOOR
        return cls(relu_sets, pool, head, lit, np.sign(taps["output.amplitude"] - x))


@dataclass(eq=False)
class FrozenBlock(ConvBlock):
    """A conv block whose ReLU active sets and max-pool choices are fixed (those of a base point)."""

    masks: tuple[Array, Array] = (np.empty(0), np.empty(0))
    route: Array | None = None

    @classmethod
    def of(cls, block: ConvBlock, kinks: Kinks) -> FrozenBlock:
        masks = (kinks.relu[block.conv0.name], kinks.relu[block.conv1.name])
        route = kinks.pool.get(block.prefix)
        return cls(block.prefix, block.conv0, block.conv1, block.resample, block.resample_tap, masks, route)

    def __call__(self, x: Array, taps: Taps | None = None) -> Array:
        y0 = np.where(self.masks[0], self.conv0(x), 0.0)
        y1 = np.where(self.masks[1], self.conv1(y0), 0.0)
        out = upsample2(y1) if self.route is None else np.take_along_axis(_windows(y1), self.route, axis=-1)[..., 0]
        if taps is not None:
            taps.update({self.conv0.name: y0, self.conv1.name: y1, f"{self.prefix}.{self.resample_tap}": out})
        return out


def frozen_losses(point: FdPoint, weights: dict[str, Array], x: Array) -> Array:
    """Both losses, summed over the batch, of the forward at (weights, x) with every kink decision
    fixed at ``point``'s: the model's own stages, with each non-smooth choice replaced by the choice
    the base point made (np.where(mask, z, 0) for relu(z), the recorded window element for the max)."""
    model = ReferenceModel(point.config, weights)
    kinks = point.kinks
    model.encoder = [FrozenBlock.of(b, kinks) for b in model.encoder]
    for h, head in model.heads.items():
        head.decoder = [FrozenBlock.of(b, kinks) for b in head.decoder]
        if head.border is not None:
            head.border = FrozenBlock.of(head.border, kinks)
        if head.full is not None:
            head.full = FrozenBlock.of(head.full, kinks)
        if h in kinks.head:
            head.activation = lambda z, active=kinks.head[h]: np.where(active, z, 0.0)
    taps: Taps = {}
    model.forward(x, point.offsets, point.probe, taps)
    intensity, amplitude = taps["output.intensity"], taps["output.amplitude"]
    log_i = np.where(kinks.lit, np.log(np.where(kinks.lit, intensity, 1.0)), np.log(physics.NLL_FLOOR))
    nll = (intensity - x**2 * log_i).mean(axis=(1, 2, 3))
    mae = (kinks.sign * (amplitude - x)).mean(axis=(1, 2, 3))
    return np.array([nll.sum(), mae.sum()])


@dataclass
class FdPoint:
    """A base point: float64 weights and inputs, the taps of its forward and its kink decisions."""

    config: ModelConfig
    weights: dict[str, Array]
    x: Array
    offsets: Array
    probe: Array
    taps: Taps
    kinks: Kinks

    @classmethod
    def at(cls, config: ModelConfig, seed: int, fitted_x: bool = True) -> FdPoint:
        batch = random_batch(config, FD_BATCH, seed)
        weights = {k: v.astype(np.float64) for k, v in generate_weights(config, seed).items()}
        offsets = batch.offsets.astype(np.float64)
        probe = batch.probe.astype(np.complex128).reshape(1, 1, config.N, config.N)
        model = ReferenceModel(config, weights)
        x = batch.x.astype(np.float64)
        if fitted_x:
            taps: Taps = {}
            model.forward(x, offsets, probe, taps)
            x = taps["output.amplitude"] * np.random.default_rng(seed).uniform(0.5, 1.5, x.shape)
        taps = {}
        model.forward(x, offsets, probe, taps)
        return cls(config, weights, x, offsets, probe, taps, Kinks.of(model, taps, x))

    def gradients(self) -> dict[str, Array]:
        return backward.backward(ReferenceModel(self.config, self.weights), self.taps, self.x, self.offsets, self.probe)


@dataclass
class Direction:
    name: str
    weights: dict[str, Array]  # zero where the direction has no parameter component
    x: Array

    def contributions(self, grads: dict[str, Array], loss: str) -> Array:
        """<gradient, direction> per parameter tensor and for x; their sum is the directional derivative."""
        terms = [inner(grads[f"grad.{loss}.{k}"], v) for k, v in self.weights.items()]
        return np.array([*terms, inner(grads[f"grad.{loss}.input.x"], self.x)])


def directions(point: FdPoint, seed: int) -> Iterator[Direction]:
    rng = np.random.default_rng(seed + 1)
    zero_x = np.zeros_like(point.x)
    for i in range(2):
        v = {
            k: rng.standard_normal(w.shape) * (1.0 if k == "log_scale" else np.sqrt(np.mean(w**2)))
            for k, w in point.weights.items()
        }
        yield Direction(f"parameters{i}", v, zero_x)
    vx = rng.standard_normal(point.x.shape) * np.sqrt(np.mean(point.x**2))
    yield Direction("x", {k: np.zeros_like(w) for k, w in point.weights.items()}, vx)


@dataclass
class FdResult:
    direction: Direction
    difference: Array  # (len(LOSSES),) central difference quotients


def finite_differences(point: FdPoint, seed: int, h: float = FD_STEP) -> list[FdResult]:
    results = []
    for d in directions(point, seed):
        ends = [
            frozen_losses(point, {k: w + s * h * d.weights[k] for k, w in point.weights.items()}, point.x + s * h * d.x)
            for s in (1, -1)
        ]
        results.append(FdResult(d, (ends[0] - ends[1]) / (2 * h)))
    return results


def relative_errors(results: list[FdResult], grads: dict[str, Array]) -> dict[str, float]:
    """|finite difference - directional derivative| per (direction, loss), relative to the sum of the
    magnitudes of the per-tensor contributions to that derivative (see the comment above)."""
    errors = {}
    for r in results:
        for s, loss in enumerate(LOSSES):
            terms = r.direction.contributions(grads, loss)
            errors[f"{r.direction.name}/{loss}"] = abs(float(r.difference[s]) - terms.sum()) / np.abs(terms).sum()
    return errors


@pytest.mark.parametrize("config", PARITY_MATRIX, ids=[c.short_id() for c in PARITY_MATRIX])
def test_gradients_match_finite_differences(config: ModelConfig) -> None:
    point = FdPoint.at(config, seed=5)
    errors = relative_errors(finite_differences(point, seed=5), point.gradients())
    worst = max(errors, key=lambda k: errors[k])
    assert errors[worst] <= FD_RTOL, f"{worst}: {errors[worst]:.2e}; all: {errors}"


def _losses(taps: Taps) -> Array:
    return np.array([taps[f"loss.{loss}"].sum() for loss in LOSSES])


def test_frozen_forward_is_the_forward() -> None:
    """The function differenced above is the model's forward: exactly at the base point, and at a
    step small enough that no kink decision changes, as the unmodified forward's taps verify."""
    config = DEFAULT.replace(amp_activation="relu", n_filters_scale=1)
    point = FdPoint.at(config, seed=3)
    np.testing.assert_array_equal(frozen_losses(point, point.weights, point.x), _losses(point.taps))

    d, h = next(directions(point, seed=3)), 1e-9
    for s in (1, -1):
        weights = {k: w + s * h * d.weights[k] for k, w in point.weights.items()}
        model, taps = ReferenceModel(config, weights), {}
        model.forward(point.x, point.offsets, point.probe, taps)
        moved, fixed = Kinks.of(model, taps, point.x), point.kinks
        for kind in ("relu", "pool", "head"):
            mine, theirs = getattr(moved, kind), getattr(fixed, kind)
            assert mine.keys() == theirs.keys() and all(np.array_equal(mine[k], theirs[k]) for k in theirs), kind
        assert np.array_equal(moved.lit, fixed.lit) and np.array_equal(moved.sign, fixed.sign)
        np.testing.assert_allclose(frozen_losses(point, weights, point.x), _losses(taps), rtol=1e-15)


def test_gradients_at_the_harness_batch() -> None:
    """At random_batch's own x the NLL's curvature limits central differences to ~1e-6 (see above):
    the same check there with that tolerance, so the harness's kind of point is not left unchecked."""
    point = FdPoint.at(DEFAULT.replace(n_filters_scale=1), seed=5, fitted_x=False)
    errors = relative_errors(finite_differences(point, seed=5), point.gradients())
    assert max(errors.values()) <= 1e-5, errors


@pytest.fixture(scope="module")
def cheap_fd() -> tuple[FdPoint, list[FdResult]]:
    """One small configuration's base point and finite differences, shared by the broken adjoints."""
    point = FdPoint.at(DEFAULT.replace(n_filters_scale=1), seed=9)
    return point, finite_differences(point, seed=9)


def _translate_forward_instead(dout: Array, offsets: Array) -> Array:
    return physics.translate(dout, offsets)


def _drop_bias(x: Array, kernel: Array, dy: Array) -> tuple[Array, Array, Array]:
    dx, dkernel, dbias = CORRECT_CONV_VJP(x, kernel, dy)
    return dx, dkernel, np.zeros_like(dbias)


CORRECT_CONV_VJP = backward.conv2d_vjp
BROKEN: dict[str, tuple[str, Callable[..., Any]]] = {
    "translation adjoint replaced by the forward translation": ("translate_vjp", _translate_forward_instead),
    "bias gradients of the ReLU convs dropped": ("conv2d_vjp", _drop_bias),
}


def test_the_finite_difference_check_passes_the_correct_adjoints(cheap_fd: tuple[FdPoint, list[FdResult]]) -> None:
    point, results = cheap_fd
    errors = relative_errors(results, point.gradients())
    assert max(errors.values()) <= FD_RTOL, errors


@pytest.mark.parametrize("bug", BROKEN, ids=["translate_forward", "drop_bias"])
def test_a_broken_adjoint_fails_the_finite_difference_check(
    cheap_fd: tuple[FdPoint, list[FdResult]], monkeypatch: pytest.MonkeyPatch, bug: str
) -> None:
    point, results = cheap_fd
    name, broken = BROKEN[bug]
    monkeypatch.setattr(backward, name, broken)
    errors = relative_errors(results, point.gradients())
    assert max(errors.values()) > 1e3 * FD_RTOL, errors


# ---- 3. the backend ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes", [{}, {"pad_object": False, "gridsize": 1, "n_filters_scale": 1}], ids=["default", "full_head"]
)
def test_backend_gradients_follow_the_gradient_tap_specs(changes: dict[str, Any]) -> None:
    config = DEFAULT.replace(**changes)
    weights = generate_weights(config, seed=4)
    backend = ReferenceBackend(config, weights)
    assert backend.computes_gradients
    batch = random_batch(config, 2, seed=4)
    grads = backend.gradients(batch)

    specs = gradient_tap_specs(config, 2)
    assert list(grads) == [s.name for s in specs]
    for spec in specs:
        assert grads[spec.name].shape == spec.shape, spec.name
        assert grads[spec.name].dtype == np.float64, spec.name
        assert grads[spec.name].flags.c_contiguous, spec.name
        assert np.all(np.isfinite(grads[spec.name])), spec.name
    if changes:  # (once is enough, on the cheap config) widened exactly as forward widens the batch
        probe = batch.probe.astype(np.complex128).reshape(1, 1, config.N, config.N)
        direct = backward.gradients(
            ReferenceModel(config, weights), batch.x.astype(np.float64), batch.offsets.astype(np.float64), probe
        )
        for name, value in grads.items():
            np.testing.assert_array_equal(value, direct[name], err_msg=name)


def test_backend_gradients_validate_the_batch() -> None:
    backend = ReferenceBackend(DEFAULT, generate_weights(DEFAULT, seed=4))
    with pytest.raises(ValueError, match="'x'"):
        backend.gradients(random_batch(DEFAULT.replace(gridsize=1), 2))


# ---- 4. no side effects -------------------------------------------------------------------------


def test_gradients_change_neither_the_forward_nor_the_weights() -> None:
    config = DEFAULT.replace(amp_activation="swish", n_filters_scale=1)
    backend = ReferenceBackend(config, generate_weights(config, seed=6))
    batch = random_batch(config, 2, seed=6)
    inputs = {k: getattr(batch, k).copy() for k in ("x", "offsets", "probe")}
    weights, taps = backend.export_weights(), backend.forward(batch)

    backend.gradients(batch)

    after = backend.forward(batch)
    assert list(after) == list(taps)
    for name, value in taps.items():
        assert after[name].tobytes() == value.tobytes(), name
    exported = backend.export_weights()
    for name, value in weights.items():
        assert exported[name].tobytes() == value.tobytes(), name
    for key, value in inputs.items():
        assert getattr(batch, key).tobytes() == value.tobytes(), key


def test_the_backward_pass_loads_no_framework() -> None:
    """The arbiter's adjoints are its own: importing them (and the backend) pulls in no autodiff."""
    code = "import backends.reference.backward, backends.reference.backend, sys; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert not {m for m in out.stdout.split() if m.split(".")[0] in ("torch", "tensorflow", "keras", "jax")}

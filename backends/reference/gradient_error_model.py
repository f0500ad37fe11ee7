"""A model of float32 error for every gradient tap: the backward counterpart of ``error_model``.

Beside each gradient ``grad.<loss>.<param>`` (and ``grad.<loss>.input.x``) the reference computes an
error scale S, real, of the gradient's shape and in its units, such that a faithful float32
implementation's gradient is expected to be off by about u·S, u = 2⁻²⁴. The harness turns S into a
tolerance exactly as for forward taps (``factor·u·S`` per family, ``parity/tolerances.toml``).

S is built by one backward sweep that mirrors ``backward.backward`` stage by stage. Beside every
cotangent g it carries E, the error scale of the cotangent a float32 backend holds at that point (in
g's units divided by u). The forward error scales (``ReferenceModel.error_scales``) supply the errors
of the forward values the adjoints' coefficients are made of. Choices, and why:

- **Quadrature.** Independent errors add as a sum of squares (the "expected", not the worst-case
  bound), as the forward conv model does: over the ~20 adjoints of the deepest path, worst-case
  bounds grow far faster than real errors. Each operation's own rounding is a textbook count of u's
  at the magnitude of its result.
- **Kinks are all or nothing, weighted by their probability.** A ReLU mask, a max-pool's argmax, the
  MAE's sign: where the forward value that decides the branch (the pre-activation z, the gap between
  a window's top two values, A − x) lies within float32 noise of the switch, a float32 backend may
  take the other branch and pass (or withhold) the whole cotangent g there. The switch happens with
  probability p = ½·erfc(|z| / (√2·KINK_SIGMA·u·S_z)) (S_z the forward error scale of the deciding
  value, KINK_SIGMA its measured spread in units of u·S_z), and its variance p·g² enters E² as
  p·(g/u)². A unit far from the kink adds nothing; a unit inside the band adds its full |g|/u. The
  pre-activations are not taps, so they are recomputed, in float64 as the forward computed them:
  recomputed in float32 they were off by about u·S_z, and where |z| is a few bands out the erfc
  tail is steep enough that this moved some gradient scales by up to 25 % (RMS by 2 %) with nothing
  but the conv's summation order changed. A first model that counted a whole band (p = 1 inside
  ±c·u·S) gave scales 10⁴–10¹⁰ too large: the band holds many units but few switch.
- **The Poisson NLL's ill-conditioning, saturated and sampled.** ∂NLL/∂A = 2(A − x²/A)/K. Its
  error from the amplitude's own error δA is 2(1 + x²/A²)·δA/K, and so is the error of the spectrum's
  phase (δθ = δA/A) that the FFT adjoint multiplies it with. Where the model predicts far less than
  was measured (x²/A² up to 1e13) this dominates every NLL gradient. δA here is not the forward
  scale of ``output.amplitude``, which bounds the largest error of that tap for its tolerance and
  is 10³–10⁴ times the typical error of a dark pixel (measured): it is the RMS error of a float32
  amplitude, the field's relative error spread evenly over the spectrum (Parseval),
  (1 + AMP_KAPPA·‖|P|·C_O‖₂/‖ψ‖₂ + √log₂(N²))·u·‖A‖₂/N per patch plus two roundings of A
  (``_amplitude_noise``), C_O the part of the object's forward scale the network carries into it
  (its heads' own rounding taken out), moved onto the patch and weighed by the probe as ψ is.
  Where that relative error q = δA/A would exceed 1, float32 holds an amplitude of the size of its
  noise, not of A, and its x²/A is *smaller* than the reference's, not arbitrarily large: the term
  enters with the saturated relative error q/(1 + q), linear while q ≪ 1 and the term's whole size
  once A is lost in noise. The same saturation bounds the phase error and the direct
  ∂NLL/∂x = −2x·log(max(I, 1e-12))/K (error 2|x|·log1p(2q)/K). These errors are independent per
  frequency, but after the FFT adjoint each is a plane wave over the whole patch, and every later
  adjoint sums it against smooth weights, where it largely cancels; squared adjoints (below) assume
  independent pixels and overstated the NLL's bias and log_scale scales 10–1000 times. So this one
  error is carried as MC_SAMPLES seeded random realisations through the reference's own (linear)
  adjoints, which keep every cancellation, and enters E² as their mean square, averaged over each
  kernel's 3x3 taps and over 3x3 neighbourhoods of x to steady a 4-sample estimate (``_sampled``).
  The MAE's sign switches and its spectrum phase error are per-frequency errors too and are sampled
  the same way (squared, they gave the MAE's phase head scales 10⁴ times its float32 error).
- **Errors of one sign are carried whole.** Where A is lost in noise, float32's x²/A is smaller at
  every such pixel, in the same direction: its mean, the term times ρ², is one deterministic
  perturbation through the adjoints. Where the reference clamps the NLL (I ≤ 1e-12), float32's noise
  can lift the pixel above the clamp, and it then holds −x²/A₃₂ for any A₃₂ down to √1e-12: that
  bound is carried per pixel, along the spectrum's phase and across it (float32's phase there is
  its noise). Measured: the Nyquist corner of a smooth field, 2e-7 in float64 and 1e-6 to 1e-5 in
  float32, moved every NLL gradient of its batch by percents in both frameworks.
  The MAE's cotangent has one size at every frequency, so where float32's spectrum is noise its
  phase is noise too, and on average the cotangent along the reference's phase is lost, the mean of
  cos δθ − 1 (``_phase_loss``), with its sign at every such frequency: carried whole as well, beside
  the zero-mean phase noise the samples carry.
- **Correlated errors are carried as the algebra cancels them, not as independent terms.**
  ∂NLL/∂log_scale sums ∂NLL/∂A·A = 2(I − x²)/K: a float32 backend forms it from one amplitude, so
  the error of A cancels in A·x²/A² and only δI remains. Adding A²·δ(∂/∂A)² and (∂/∂A)²·δA² as if
  independent overstates it by the ill-conditioning above.
- **Convolution adjoints**, for dz the cotangent of a conv's output and x its input:
  input cotangent E_dx² = (W²)ᵀ∗(E_dz² + dz²) (the carried errors and the dot products' own
  rounding, as the forward conv); kernel E² = Σ_pixels x²·(E_dz² + (1 + log₂n)·dz²) + S_x²·dz²,
  n = B·H·W the pixels summed (a reduction this long rounds at every level of a pairwise or blocked
  sum); bias E² = Σ_pixels (E_dz² + (1 + log₂n)·dz²). Only units active in the reference carry the
  forward error S_x (``error_model.relu_pass_on``). Both also round at the size of the total,
  (1 + log₂n)·g² (``_reduction_rounding``): where the terms share a sign the partial sums approach
  it, and the terms' own magnitudes understate that by up to √n (torch, 4096 pixels: 100u of the
  total, against a scale of 0.7 of it).
- **Sums over the batch as vectorised reductions form them.** log_scale's sums (its output terms
  and its input path's) are also formed in float32 as interleaved lanes, each in order, and their
  largest error is added (``_lane_rounding``): where a few pixels carry the sum, every small term
  after one in its lane rounds at its size or is lost, which no pairwise model holds. A bias's sum
  is also formed one pixel after another, as TensorFlow's bias gradient adds a channel's rows
  (``_sequential_rounding``).
- **Smooth head activations:** E_dz² = f'(z)²·E_dy² + (f''(z)·dy·S_z)² + (2·f'(z)·dy)², f' and f''
  exact at the reference's z; ReLU as a kink. The sigmoid and tanh are differentiated from their
  float32 outputs (y(1 − y), 1 − t²), whose error of about u does not shrink as f' does where they
  saturate: that adds (dy·|∂f'/∂y|·2|y|)² (``_derivative_from_output``; at weights ×2.8 it is 3 %
  of the largest phase-kernel gradient, and without it a sweep example failed at 9.4·10⁴ times
  its tolerance). Where the output rounds to ±1 that derivative is exactly 0, and the cotangent is
  lost whole at every such pixel, with its sign: that loss is carried exactly through the adjoints
  for each saturation threshold up to 8u, not as noise (``_saturated_outputs``; in quadrature a
  sweep example at weights ×2.5 needed 20 to 46 times its tolerances). The f''·dy·S_z term is
  independent per pixel, but the adjoints after the head spread each pixel's error with the kernels'
  signs and a bias sums it back: squared adjoints weigh each path alone, (Σ w)² becomes Σ w². Where
  the term is not negligible (a saturated head whose few live pixels are cancellations of large
  terms) it is also carried as realisations (``_preactivation_realisations``; squared, two phase-
  branch biases got a tenth of their variance and TensorFlow was 1.02 tolerances off).
- **Where first order fails, the secant.** f''·S_z assumes u·S_z is small against f'/f''. Where a
  head's pre-activations are ~10⁵ (N=128, weights ×2.9), u·S_z reaches 0.27, and at a
  pixel with |z| ~ 5 both tanh' and the cotangent (through the phase's sine) move as e^{2|Δz|}: a
  float32 z 1.15 off made TensorFlow's phase-branch gradients 100 times the reference's. Where f'
  changes by more than 1.5 times over ±KINK_SIGMA·u·S_z, the gradients are recomputed with those
  pixels' z moved by that much, each way, and the larger change over KINK_SIGMA enters E²
  (``_nonlinear_heads``): the secant slope, which is the tangent's where f' is linear.
- **The sampling coordinates' rounding moves whole patches.** A float32 backend rounds j − d to
  float32 once per patch and axis, by up to u·extent. That error is coherent over the patch, not
  the per-pixel noise the rest assumes, and beside a merged patch's rim, where the coverage is a
  small fraction of a pixel, it is large (0.7 % of a spectrum pixel, the same in both frameworks).
  Each coordinate is moved by u·extent both ways through the reference's physics
  (``_coordinate_moves``: a secant at the rounding's own size, since the rim is far from linear),
  and its move of the amplitude and of the spectrum's phase enters log_scale's output part
  (``_coordinate_rounding``), x's direct NLL term (its move of log I) and the MAE's sign switches,
  and, with a random sign per coordinate, the realisations ``_sampled`` carries through the
  adjoints (``_coordinate_realisations``), whose mean square then holds each coordinate's effect.
  At a whole pixel (a kink) a coordinate rounded once is exact, but a normalised grid (torch's
  ``affine_grid`` and ``grid_sample``) computes each column's and row's coordinate from its own
  index and rounds each on its own, by up to about u·extent, in no common direction; there each
  line of the sample grid is also moved alone (``_line_moves``), one more coordinate each. At
  gridsize 1 (every shift zero), the grid's own coordinate errors, put into the reference's merge
  in float64, moved the NLL's log_scale output term by 2.1e9 u where the whole-patch moves allowed
  6.7e8 (root sum of squares) and the lines alone 2.5e9; the MAE's by 4.1e5 against 8.2e4 and 4.9e5.
- **Max-pool:** the cotangent follows the argmax; where another value of the window is within
  noise of its top value (positive), p·(dy/u)² goes to it, and the largest such p to the top: any
  unit may be float32's maximum, not only the runner-up (where the top two tied exactly, a third
  unit 1e-8 below them was both frameworks' maximum). An exact tie of the first block is not
  noise: it comes from identical values of the scaled input, which float32 convolves identically, so
  the tie rule routes it (to the first maximum, as the spec and both frameworks do) and a backend
  that routes ties elsewhere stays detectable. Deeper, TensorFlow's convolutions round identical
  windows differently by position and break such ties, so there p = ½; that switch only moves a
  cotangent inside its window, so the bias of the conv before the pool does not get it. The ReLU
  before the pool makes compound switches: where every unit of a window is 0 in the reference, a
  unit whose pre-activation float32 rounds above 0 becomes the maximum and passes all of dy (found
  on one thread: a kernel gradient 971 off). Every unit of a window may so receive dy·√q, q the
  chance that the maximum is not where the reference has it (1 in a window of dead units), which
  its ReLU's kink weighs by its own flip probability. Upsampling's adjoint sums four cotangents.
- **Translation adjoints** (reextraction, merge): the bilinear weights are positive, so E translates
  with them as in the forward model, plus the float32 sampling coordinate's rounding
  (u·extent·|∇g|) and four roundings; the C patches' errors add in quadrature. The merge's division
  by the coverage carries the coverage's error like the forward ``merge_scale``.
- **FFT adjoint:** ψ̄ = 2·ifft2(ds·F) has |ds·F| = N·|∂/∂a|/2 per frequency; errors spread over all
  pixels (Parseval), so per pixel E_ψ̄ = √(Σ_freq E_w² + log₂(N²)²·Σ_freq |∂/∂a|²)/N, the second term
  the FFT's own rounding. No peak factor: ψ̄ is summed again by every later adjoint, so its RMS is what
  propagates; the tail of the largest compared element is the tolerance factor's business.
- **Complex object, illumination, pad/crop, scale_input, outputs:** first-order propagation,
  E_Ā² = E_g² + |g|²·S_φ² + (2|g|)², E_φ̄² = A²·(E_g² + |g|²·S_φ²) + |g|²·S_A² + (3A|g|)²;
  conj(P)·ψ̄ scales E by |P|; crops and pads move E with the cotangent.
- **Floors:** every scale is at least TINY (what flush-to-zero may lose), and a derivative of a head
  activation below float32's normal range may be lost whole. TensorFlow's kernels flush subnormal
  inputs and results to zero (torch keeps them), so a conv's cotangent below float32's smallest
  normal number is lost whole, and a kernel or bias sum may lose up to n terms each below it
  (n·TINY, carried whole: where a saturated sigmoid head makes the NLL's cotangents 1e-31 to 1e-40
  those losses are of one sign). Each gradient tap also gets one
  rounding at its RMS magnitude (per sample for x): float32 convolution algorithms (blocked GEMM,
  Winograd, FFT) mix values across a tile, so an element that is tiny in exact arithmetic (a bias
  of a channel with two live units, 10⁻³³ of the tap's largest value) still carries the rounding
  of its neighbours; without it such elements needed factors of 10⁵–10²⁰.

What the model cannot know (how a framework orders a sum, which kernel it picks, the tail of the
largest of ~10⁶ compared elements) is left to the per-family factors measured by
``ptycho-parity measure-tolerances --gradients``.

Cost: one sweep with the squared fields in float64 (a float64 conv recomputing the pre-activations,
two transposed convs and two kernel sums per conv), and the reference's adjoints carried for nine realisations (four per
loss sampled, in float32 (``_sampled``); one for the NLL's one-signed bias and a few more where the
clamp is lifted, in float64); where a head's pre-activation error is not negligible, eight more
through the network alone (float32); where a head is not first order, two more float64 gradient
passes.
The carried realisations are still the larger part: in the parity suite's four gradient tests,
profiled, they took 10.7 s of the 18.5 s of gradient scales. The squared fields were once summed in
float32, rescaled to each sample's or column's peak as ``error_model.conv_scale`` does: behind a
saturated head they span far more than float32's range within one sample (a pixel whose cotangent is
1e-26 beside others of 1e10, its squared error 1e-56 of the peak), and the elements such a pixel
makes alone lost its error (TensorFlow with oneDNN at AVX2 1.7 tolerances off them). float64 costs
about the same: the rescaling and conversions were as dear as the float32 products they saved
(``benchmarks/bench_gradient_scales.py``, docs/decisions.md).
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from numpy.typing import DTypeLike

from backends.reference import backward as bw
from backends.reference import error_model as em
from backends.reference import physics
from backends.reference.model import ACTIVATION_NAMES, Conv, ConvBlock, Head, ReferenceModel
from backends.reference.ops import (
    Activation,
    Array,
    conv2d,
    pad_spatial,
    pi_tanh,
    relu,
    sigmoid,
    softplus,
    swish,
)
from parity.taps import GRAD, LOSSES

U32 = em.U32
TINY = em.TINY
# Spread of a float32 pre-activation around the reference's, in units of u·S_z (S_z its forward
# error scale), as it enters a switch's probability. Measured over the live units of every ReLU conv
# (default config, random batches): RMS 4.1 (torch) and 1.5 (TensorFlow), 99th percentile 15 and 4.5,
# largest 55 and 12; the forward network families needed up to 116 over the whole measurement. A
# switch is a tail event, so the tail sets this: with 4 (the RMS), an encoder kernel of a wide
# (n_filters_scale=4) random case needed a factor of 1700; with 16 it needed 22, and the default
# config's scales grew by less than 1.5x.
KINK_SIGMA = 16.0

# The float32 amplitude's error at the loss, per pixel: the field's relative error spread evenly over
# the spectrum (Parseval), ε·u·‖A‖₂/N per patch with ε = 1 + AMP_KAPPA·‖|P|·C_O‖₂/‖ψ‖₂ + √log₂(N²):
# the object's own roundings (about one u, measured), the error the network carries into it (C_O:
# the object's forward scale without its heads' rounding terms, which are ~4x the real rounding at
# small weights), moved onto each patch as the object is and weighed by the probe that lights it,
# and the FFT's rounding as an RMS, not a bound; plus two roundings of A itself. Measured (draws 0-39
# of [20261206, i], first batch, every patch, torch and TensorFlow, natively, under
# ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 and under one thread with oneDNN off and ATen's
# default kernels; the float32 sampling coordinates' share taken out, it is ``_coordinate_moves``'):
# where the network's error dominates, the real relative error is 0 to 9.4 times ‖|P|·C_O‖₂/‖ψ‖₂
# (9.4: TensorFlow natively, draw 7, an object_big merge), and where it does not, the floor alone
# holds it (at most 0.54 of ε). AMP_KAPPA covers the largest. The MAE's sign switches sit in the
# tail of this noise, so an under-estimate costs them most. The unweighted ‖C_O‖₂/‖O‖₂ this replaced
# was 13 times short where the probe lit the object's worst-predicted part (draw 50: 14 against 184,
# the real error 165 natively and 521 at AVX2 in torch), a false alarm on the NLL's kernel gradients.
AMP_KAPPA = 10.0

# Realisations per loss of the loss stage's per-frequency errors carried through the adjoints (_sampled).
MC_SAMPLES = 4
_MC_SEED = 20261201

# A head's pre-activation error is also carried as realisations (``_preactivation_realisations``)
# where, in some loss, its E² is at least this share of the E² of its conv's bias (the sum of its
# cotangent's). Were the paths' sharing to multiply it 100 times downstream (a channel's 9·C kernel
# taps all of one sign), a smaller share would still move no scale by more than 1 %. At the parity
# suite's configs (weights as initialised) the share is below 1e-9: nothing is carried there.
_PREACTIVATION_SHARE = 1e-4

# The ways a vectorised float32 sum may be formed (``_lane_rounding``): interleaved lanes, each summed
# in order, as four accumulating registers of 4, 8 or 16 floats (SSE, AVX, AVX-512) hold them, over
# the whole tap or over 2 or 4 contiguous blocks (threads) whose results are then added.
_LANES = (16, 32, 64)
_BLOCKS = (1, 2, 4)


# ---- sums of squared error fields ---------------------------------------------------------------


def _input_adjoint(kernel: Array, dy: Array) -> Array:
    """Wᵀ∗dy for stacked dy (S, B, out, H, W), in float64 (module docstring, "Cost")."""
    return bw._input_vjp(kernel, np.asarray(dy, dtype=np.float64))


def _kernel_sum(a: Array, q: Array) -> Array:
    """Σ_pixels windows(a)ᵀ·q, the kernel adjoint's product: a (B, in, H, W), q (S, B, out, H, W)
    -> (S, 3, 3, in, out), in float64 (module docstring, "Cost")."""
    return bw._kernel_vjp(np.asarray(a, dtype=np.float64), np.asarray(q, dtype=np.float64))


def _erfc(t: Array) -> Array:
    """erfc for t >= 0 (Abramowitz & Stegun 7.1.26: absolute error < 1.5e-7, and exp(-t²) keeps the
    tail's relative size): a probability of a switch needs no more, and NumPy has no erfc."""
    t = np.asarray(t, dtype=np.float64)
    k = 1.0 / (1.0 + 0.3275911 * t)
    poly = k * (0.254829592 + k * (-0.284496736 + k * (1.421413741 + k * (-1.453152027 + k * 1.061405429))))
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        return np.asarray(np.where(np.isfinite(t), poly * np.exp(-t * t), 0.0))


def _flip_probability(z: Array, s_z: Array) -> Array:
    """Probability that float32 puts z on the other side of 0: ½·erfc(|z| / (√2·σ)), σ = KINK_SIGMA·u·S_z."""
    sigma = KINK_SIGMA * U32 * np.asarray(s_z, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(sigma > 0, np.abs(z) / (math.sqrt(2.0) * np.where(sigma > 0, sigma, 1.0)), np.inf)
    return np.asarray(0.5 * _erfc(t))


def _saturated(q: Array) -> Array:
    """A relative error q = u·S/|value| that cannot exceed the whole value: q / (1 + q)."""
    return np.asarray(q / (1.0 + q))


# ---- stage adjoints: (cotangent, its error scale) -> (input cotangent, its error scale) ---------


class _Sweep:
    """State of one backward error sweep: the model, its taps and forward scales, the results."""

    def __init__(self, model: ReferenceModel, taps: Mapping[str, Array], scales: Mapping[str, Array]) -> None:
        self.model = model
        self.taps = taps
        self.S = scales
        self.kernel_sq: dict[str, tuple[Array, Array]] = {}  # conv name -> (E² kernel (S, ...), E² bias (S, out))
        # conv name -> how many pixels its kernel and bias gradients sum (B·H·W)
        self.summed: dict[str, int] = {}
        # head conv name -> (its smooth activation, its pre-activation z, z's forward scale S_z)
        self.smooth: dict[str, tuple[Activation, Array, Array]] = {}
        # head conv name -> its pre-activation error f''·dy·S_z (u-units, (S, B, C, H, W)), where it
        # is also carried by realisations, beside its share of E² (``_preactivation_realisations``)
        self.preactivation_errors: dict[str, Array] = {}

    def passed_on(self, name: str) -> Array:
        """The forward error a tap's consumer receives: only from units active in the reference."""
        return em.relu_pass_on(self.taps[name], self.S[name])

    # -- convolutions --

    def conv(
        self, conv: Conv, x: Array, s_x: Array, dz: Array, e_dz2: Array, moves_within: Array | None = None
    ) -> tuple[Array, Array]:
        """Adjoint of z = W∗x + b at the cotangent dz of z (E² e_dz2); stores the parameter E².
        ``moves_within`` is the part of e_dz2 that only moves a cotangent between pixels, which the
        bias, a plain sum over pixels, does not see (a max-pool tie routed to its other maximum)."""
        n = dz.shape[1] * dz.shape[3] * dz.shape[4]
        self.summed[conv.name] = n
        dz2 = dz * dz
        # TensorFlow's kernels flush subnormal inputs and results to zero (FTZ and DAZ; torch keeps
        # them): a cotangent below float32's smallest normal number is lost whole, and so is every
        # term of a kernel or bias sum below it, up to n of them, each less than that number (a
        # saturated sigmoid head's NLL cotangents, 1e-31 to 1e-40: TensorFlow's decoder kernels
        # were 1.8 tolerances off, the long sweep on one thread, seed 20261210).
        e_dz2 = e_dz2 + np.where(np.abs(dz) < TINY * U32, dz2 / U32**2, 0.0)
        reduction = e_dz2 + (1.0 + math.log2(max(n, 2))) * dz2
        k2 = _kernel_sum(x * x, reduction) + _kernel_sum(s_x * s_x, dz2) + (n * TINY) ** 2
        b2 = (reduction if moves_within is None else reduction - moves_within).sum(axis=(1, 3, 4)) + (n * TINY) ** 2
        b2 = b2 + _sequential_rounding(dz) ** 2
        self.kernel_sq[conv.name] = (k2, b2)
        w2 = conv.kernel * conv.kernel
        dx = _input_adjoint(conv.kernel, dz)
        e_dx2 = _input_adjoint(w2, e_dz2 + dz2)
        return dx, e_dx2

    def relu(
        self, conv: Conv, x: Array, y: Array, dy: Array, e_dy2: Array, reach: Array | None = None
    ) -> tuple[Array, Array]:
        """ReLU adjoint at conv's output y = relu(z): the mask, and the kink's switches. ``reach``:
        the cotangent a unit may receive if it switches (``_pool_adjoint``), by default dy.

        z is the reference's own pre-activation, float64 as the forward computed it (module
        docstring: a float32 z made p depend on the summation order)."""
        z = conv(x)
        p = _flip_probability(z, self.S[conv.name])
        live = y > 0
        dz = np.where(live, dy, 0.0)
        e2 = np.where(live, e_dy2, 0.0) + p * ((dy if reach is None else reach) / U32) ** 2
        return dz, e2

    def activation(
        self, activation: Activation, conv: Conv, x: Array, s_x: Array, dy: Array, e_dy2: Array
    ) -> tuple[Array, Array]:
        """Adjoint of a head activation at its recomputed pre-activation (float64, see ``relu``): f',
        f'' and the kink of ReLU."""
        z = conv(x)
        s_z = em.conv_scale(x, s_x, conv.kernel, conv.bias)
        if activation is relu:
            live = z > 0
            p = _flip_probability(z, s_z)
            return np.where(live, dy, 0.0), np.where(live, e_dy2, 0.0) + p * (dy / U32) ** 2
        self.smooth[conv.name] = (activation, z, s_z)
        d1, d2 = _derivatives(activation, z)
        dz = dy * d1
        # A derivative below float32's normal range (σ(z) for z < -87) is subnormal or flushed to
        # zero: its whole value may be lost (carried linearly, as the forward model does).
        lost = np.where(d1 < TINY * U32, d1, 0.0) / U32
        from_output = _derivative_from_output(activation, z)
        e2 = d1 * d1 * e_dy2 + (d2 * dy * s_z) ** 2 + (2.0 * dz) ** 2 + ((lost + from_output) * dy) ** 2
        # z's error reaches every later gradient through sums that keep its sign (module docstring):
        # where it is not negligible it is also carried as realisations.
        n = dz.shape[1] * dz.shape[3] * dz.shape[4]
        term = d2 * dy * s_z
        own = np.sum(term * term, axis=(1, 2, 3, 4))
        total = np.sum(e2 + (1.0 + math.log2(max(n, 2))) * dz * dz, axis=(1, 2, 3, 4))
        if np.any((own > 0) & (own >= _PREACTIVATION_SHARE * total)):
            self.preactivation_errors[conv.name] = term
        return dz, e2

    def block(self, block: ConvBlock, x: Array, s_x: Array, dy: Array, e_dy2: Array) -> tuple[Array, Array]:
        """Adjoint of a down or up block whose input was x (forward error s_x passed on)."""
        conv0, conv1 = block.conv0, block.conv1
        y0, y1 = self.taps[conv0.name], self.taps[conv1.name]
        ties = reach = None
        if block.resample_tap == "pool":
            # Only the first block's ties are exact in float32 too: its input is the scaled measurement,
            # whose identical values every float32 conv treats identically. Deeper inputs are float32
            # conv outputs, and TensorFlow's convolutions round identical windows differently by position
            # (measured: a 95 %-zero low-photon input, 84 of 12,178 exact ties of blocks 1 and 2 broken,
            # 48 routed elsewhere; torch broke none): there a tie may go either way.
            d, e2, ties, reach = _pool_adjoint(y1, self.S[conv1.name], dy, e_dy2, block.prefix != "encoder.block0")
        else:
            d = bw.upsample2_vjp(dy)
            e2 = bw.upsample2_vjp(e_dy2) + (2.0 * d) ** 2
        d, e2 = self.relu(conv1, y0, y1, d, e2, reach)
        d, e2 = self.conv(conv1, y0, self.passed_on(conv0.name), d, e2, ties)
        d, e2 = self.relu(conv0, x, y0, d, e2)
        return self.conv(conv0, x, s_x, d, e2)

    def head(self, head: Head, features: Array, s_features: Array, dy: Array, e_dy2: Array) -> tuple[Array, Array]:
        """Adjoint of one branch's head w.r.t. its decoder's output."""
        m, h = self.model, head.name
        if head.full is not None and head.full_out is not None:
            up_name = f"{h}.head.full.up"
            up, s_up = self.taps[up_name], self.passed_on(up_name)
            d, e2 = self.activation(head.activation, head.full_out, up, s_up, dy, e_dy2)
            d, e2 = self.conv(head.full_out, up, s_up, d, e2)
            return self.block(head.full, features, s_features, d, e2)
        assert head.centre is not None
        dfeatures = np.zeros((*dy.shape[:2], *features.shape[1:]))
        efeatures = np.zeros_like(dfeatures)
        width = m.N // 4
        dc, ec = bw.pad_spatial_vjp(dy, width), bw.pad_spatial_vjp(e_dy2, width)
        xc, sc = features[:, :-4], s_features[:, :-4]
        dc, ec = self.activation(head.activation, head.centre, xc, sc, dc, ec)
        dfeatures[:, :, :-4], efeatures[:, :, :-4] = self.conv(head.centre, xc, sc, dc, ec)
        if head.border is not None and head.border_out is not None:
            up_name = f"{h}.head.border.up"
            up, s_up = self.taps[up_name], self.passed_on(up_name)
            mask = m.border_mask
            db, eb = self.activation(swish, head.border_out, up, s_up, dy * mask, e_dy2 * mask)
            db, eb = self.conv(head.border_out, up, s_up, db, eb)
            dfeatures[:, :, -4:], efeatures[:, :, -4:] = self.block(
                head.border, features[:, -4:], s_features[:, -4:], db, eb
            )
        return dfeatures, efeatures


def _derivatives(activation: Activation, z: Array) -> tuple[Array, Array]:
    """f'(z) and |f''(z)| of a smooth head activation, in forms that keep their precision."""
    s, sn = sigmoid(z), sigmoid(-z)
    ds = s * sn  # σ'
    if activation is sigmoid:
        return ds, np.abs(ds * (sn - s))
    if activation is softplus:
        return s, ds
    if activation is swish:
        return s * (1.0 + z * sn), np.abs(ds * (2.0 + z * (sn - s)))
    if activation is pi_tanh:
        e = np.exp(-2.0 * np.abs(z))
        sech2 = 4.0 * e / (1.0 + e) ** 2
        return math.pi * sech2, np.abs(2.0 * math.pi * np.tanh(z) * sech2)
    raise ValueError(f"gradient error model: no derivatives for activation {activation!r}")


def _derivative_from_output(activation: Activation, z: Array) -> Array:
    """Error (u-units) of f'(z) where float32 autograd forms it from the rounded output, not from z.

    torch and TensorFlow differentiate sigmoid and tanh from their saved outputs: σ' = y(1 − y) and
    tanh' = 1 − t². Where the activation saturates, y rounds to within u of 1 and f' keeps an error
    of about u while itself going to 0, so its relative error is unbounded (phase head, weights ×2.8:
    both frameworks 3 % off the largest kernel gradient, in opposite directions). The error is the
    derivative's slope in the output times the output's error, two roundings (exp, the division or
    tanh's own): 2·|1 − 2y|·y for the sigmoid, 4π·t² for π·tanh. Activations differentiated from z
    (softplus, swish) keep a relative error."""
    if activation is sigmoid:
        y = sigmoid(z)
        return np.asarray(2.0 * np.abs(1.0 - 2.0 * y) * y)
    if activation is pi_tanh:
        return np.asarray(4.0 * math.pi * np.tanh(z) ** 2)
    return np.zeros_like(z)


def _pool_adjoint(
    x: Array, s_x: Array, dy: Array, e_dy2: Array, ties_are_noise: bool = False
) -> tuple[Array, Array, Array, Array]:
    """Max-pool adjoint with its error: the cotangent and its E² follow the argmax (first maximum, as
    ``backward.max_pool2_vjp``); any other unit of a window whose top value is positive may be
    float32's maximum instead, with p its chance to switch, adding p·(dy/u)² there and the largest
    of the p's at the top. An exact tie routes by the tie rule unless ``ties_are_noise``
    (then either way, p = ½).

    x is a ReLU output. Where every unit of a window is 0 in the reference, a float32 backend that
    rounds one pre-activation within noise of 0 to a positive value makes that unit the window's
    maximum, and the whole dy passes through it (measured: TensorFlow on one thread, a unit at
    2.6e-8 where the reference has 0; a kernel gradient 673 where the reference has -298). So
    beside the routed dy, every other unit of a window may receive dy·√q, q the chance that the
    window's maximum is not where the reference has it (1 where every unit is dead); the ReLU's
    kink weighs that by the unit's own flip probability. Returns (dx, E², the part of E² from exact
    ties, the cotangent each unit may receive)."""
    B, C, H, W = x.shape
    h, w = H // 2, W // 2

    def windows(a: Array) -> Array:
        return np.asarray(a.reshape(B, C, h, 2, w, 2).transpose(0, 1, 2, 4, 3, 5).reshape(B, C, h, w, 4))

    def back(a: Array) -> Array:
        lead = a.shape[:-2]
        return np.ascontiguousarray(a.reshape(*lead, w, 2, 2).swapaxes(-3, -2).reshape(*lead[:-1], H, W))

    v, sv = windows(x), windows(s_x)
    first = v.argmax(axis=-1)[..., None]
    route = first == np.arange(4)
    top = np.take_along_axis(v, first, axis=-1)[..., 0]
    s_top = np.take_along_axis(sv, first, axis=-1)[..., 0]
    # Every other unit of the window may be float32's maximum, not only the runner-up: where the top
    # two tie exactly, a third unit 1e-8 below them was torch's and TensorFlow's maximum (encoder
    # block 1, the long sweep, seed 20261208; a kernel gradient 1300 u·S off).
    gap = top[..., None] - v
    rival = (top > 0)[..., None] & ~route
    # An exact tie (gap 0 in float64) comes from identical inputs (a flat region, a padded border):
    # where float32 computes those identically too, the tie rule decides, not noise.
    tie = rival & (gap == 0) if ties_are_noise else np.zeros(v.shape, dtype=bool)
    p = np.where(rival & (gap > 0), _flip_probability(gap, np.hypot(s_top[..., None], sv)), np.where(tie, 0.5, 0.0))
    # The chance that the top unit loses dy: at least its likeliest rival's. Not their sum: rivals
    # of one value (the dead units of a window) switch together or not at all.
    p_top = p.max(axis=-1)
    dx = back(np.where(route, dy[..., None], 0.0))
    dy2 = (dy / U32) ** 2
    e2 = np.where(route, (e_dy2 + p_top * dy2)[..., None], p * dy2[..., None])
    p_tied = np.where(tie, p, 0.0)
    tied = np.where(route, (p_tied.max(axis=-1) * dy2)[..., None], p_tied * dy2[..., None])
    # The chance that the window's maximum is not where the reference has it: certain where every
    # unit is dead, else a switch to another unit or the top unit itself within noise of 0.
    q = np.where(top <= 0, 1.0, np.maximum(p_top, _flip_probability(top, s_top)))
    reach = back(np.where(route, dy[..., None], (np.sqrt(q) * dy)[..., None]))
    return dx, back(e2), back(tied), reach


def _slope(g: Array) -> Array:
    """|∂x| + |∂y| bound of |g|: per axis the larger of the forward and backward differences (zero
    outside), so it bounds the interpolant's gradient at any sample between a pixel's neighbours.
    The forward model now takes the one cell each sample lies in (``error_model._coordinate_slope``);
    the gradient families' factors were measured with this wider bound, so the gradient keeps it."""
    img = np.abs(g)
    pad = [(0, 0)] * (img.ndim - 2) + [(1, 1), (1, 1)]
    p = np.pad(img, pad)
    c = p[..., 1:-1, 1:-1]
    dx = np.maximum(np.abs(p[..., 1:-1, 2:] - c), np.abs(c - p[..., 1:-1, :-2]))
    dy = np.maximum(np.abs(p[..., 2:, 1:-1] - c), np.abs(c - p[..., :-2, 1:-1]))
    return np.asarray(dx + dy)


def _den_scale(mask: Array, shift: Array, extent: float) -> Array:
    """The translated masks' coordinate error before the C roundings of their sum, the merge's
    denominator, with the wider bound of ``_slope``, on a ring one pixel wider than the canvas."""
    ring = em.ringed(mask)
    return np.asarray(em.unringed(physics.translate(extent * _slope(ring), shift)).sum(axis=1, keepdims=True))


def _translate_adjoint(g: Array, e2: Array, shift: Array, extent: float) -> tuple[Array, Array]:
    """translate_vjp of a complex cotangent and its E (linear with the positive weights, plus the
    coordinate's rounding and four roundings); returns (value, E²). The E's are carried on a ring
    one pixel wider than the images (``error_model.translate_scale``): the image's edge pixel
    receives from the sample beside it, outside, whose coordinate moves its whole cotangent."""
    ring = em.ringed(g)
    source = np.sqrt(em.ringed(e2)) + extent * _slope(ring) + 4.0 * np.abs(ring)
    return bw.translate_vjp(g, shift), em.unringed(bw.translate_vjp(source, shift)) ** 2


# ---- the sweep ------------------------------------------------------------------------------------


def _amplitude_noise(model: ReferenceModel, taps: Mapping[str, Array], S: Mapping[str, Array]) -> Array:
    """The typical (RMS) error of the float32 predicted amplitude per pixel, in u-units (AMP_KAPPA).

    The network's error reaches the spectrum through the illuminated field, so it is weighed where
    the field is: carried onto the canvas and re-extracted as the object is, times |P| (and the
    disk), over each patch's ‖ψ‖₂. The object's unweighted ‖C_O‖₂/‖O‖₂ was 13 times short where the
    probe lit the object's worst-predicted part (draw [20261206, 50]: 14 against 184)."""
    A = taps["output.amplitude"]
    N = model.N
    amp, phase = _final_tap(model.heads["amp"]), _final_tap(model.heads["phase"])
    a, phi = taps[amp], taps[phase]
    carried_a = np.maximum(S[amp] - em.activation_rounding(ACTIVATION_NAMES[model.heads["amp"].activation], a), 0.0)
    carried_phi = np.maximum(S[phase] - em.activation_rounding("pi_tanh", phi), 0.0)
    carried = np.sqrt(carried_a**2 + (a * carried_phi) ** 2)  # (B, 1, N, N), the object's RMS error
    psi = taps["physics.illuminated"]
    B, C = psi.shape[:2]
    offsets = np.asarray(taps["input.offsets"], dtype=np.float64).reshape(B, C, 2)
    if model.object_big:
        canvas = physics.merge(carried, offsets, model.M).real  # a real field merges to a real canvas
    else:
        canvas = physics.pad_to_canvas(carried, model.M)
    lit = np.abs(np.asarray(taps["input.probe"])) * physics.reextract(canvas, offsets, N)
    if model.illumination_mask is not None:
        lit = lit * model.illumination_mask
    norm = np.sqrt(np.sum(np.abs(psi) ** 2, axis=(-2, -1), keepdims=True))
    rel = np.sqrt(np.sum(lit**2, axis=(-2, -1), keepdims=True)) / np.where(norm > 0, norm, 1.0)
    eps = 1.0 + AMP_KAPPA * rel + math.sqrt(math.log2(N * N))
    l2 = np.sqrt(np.sum(A * A, axis=(-2, -1), keepdims=True))
    return np.asarray(eps * l2 / N + 2.0 * np.abs(A) + TINY)


@dataclass(frozen=True)
class _Move:
    """One float32 sampling coordinate's rounding (u·extent along one axis), carried to the spectrum:
    the move of the diffraction amplitude a and of the spectrum's phase at every pixel (B, C, N, N),
    per unit u. ``per_patch``: each patch's coordinate rounds on its own (the re-extraction's);
    otherwise one coordinate moves every patch of its group (a merged patch's). ``line``: one line of
    a sample grid (``_line_moves``), one of hundreds."""

    amplitude: Array
    phase: Array
    per_patch: bool
    line: bool = False


def _line(m: _Move) -> _Move:
    """A line's move, kept in float32: a patch has hundreds of lines, and an error estimate needs no
    more digits (N=128, gridsize 1, a batch of 2: the peak memory of the gradient scales rose by
    265 MiB with the lines' moves in float64, 139 MiB in float32)."""
    return replace(m, amplitude=m.amplitude.astype(np.float32), phase=m.phase.astype(np.float32), line=True)


_LINES_AT_ONCE = 16  # lines whose spectra are computed in one stack (memory: 16 copies of the source)


def _line_moves(
    source: Array, sides: Sequence[Array], step: float, k: int, spectrum: Callable[[Array], Array]
) -> Iterator[tuple[Array, Array]]:
    """The spectra with one line of ``source``'s sample grid moved by ``step`` each way, a line at a
    time: a column (k = 0, the x coordinate) or a row (k = 1). ``sides`` holds what a whole move of
    one pixel up and down changes (a one-sided difference: at a whole pixel the sample moves into
    the next cell), so a move by ``step`` changes the line by ``step`` times it. Lines no move
    changes are left out (their spectra are the unmoved one)."""
    axis = source.ndim - 1 - k
    others = tuple(i for i in range(source.ndim) if i != axis)
    changed = np.flatnonzero(np.any(sides[0] != 0, axis=others) | np.any(sides[1] != 0, axis=others))
    for start in range(0, changed.size, _LINES_AT_ONCE):
        lines = changed[start : start + _LINES_AT_ONCE]
        one = np.zeros((lines.size, source.shape[axis]))
        one[np.arange(lines.size), lines] = 1.0
        shape = [lines.size] + [1] * source.ndim
        shape[1 + axis] = source.shape[axis]
        one = one.reshape(shape)
        plus = spectrum(source + step * one * sides[0])
        minus = spectrum(source + step * one * sides[1])
        yield from zip(plus, minus, strict=True)


def _coordinate_moves(model: ReferenceModel, taps: Mapping[str, Array], offsets: Array, probe: Array) -> list[_Move]:
    """The spectrum's response to each float32 sampling coordinate, by central differences through
    the reference's physics, each coordinate moved by u·extent, the rounding's own size: a secant, not
    a slope. A merged patch's rim is far from linear in its coordinate where its coverage is a small
    fraction of a pixel (the merge divides by coverage + 1e-3): there a step of 1e-3 pixel, wider than
    the coverage, gave a spectrum pixel's move 17 times too small.

    A float32 backend rounds j − d to float32 (an error of up to u·extent), the same for the whole
    patch (its sign and size depend on d's low bits), so it moves every pixel of the patch together:
    a coherent error, which the per-pixel amplitude noise (``_amplitude_noise``) does not hold. Beside
    an edge it is large: a merged canvas's rim, where the coverage is a small fraction of a pixel,
    moved by 3e-4 of the canvas's largest value, and a dark spectrum pixel by 0.7 %, the same in both
    frameworks (the long sweep on one thread, seed 20261209)."""
    N, M = model.N, model.M
    mask = model.illumination_mask
    off = np.asarray(offsets, dtype=np.float64)

    def patch_spectrum(patches: Array) -> Array:
        field = physics.illuminate(patches, probe, mask)
        return np.asarray(np.fft.fftshift(np.fft.fft2(field, axes=(-2, -1)), axes=(-2, -1)) / N)

    def spectrum(canvas: Array, d: Array) -> Array:
        return patch_spectrum(physics.reextract(canvas, d, N))

    canvas = taps["object.canvas"]

    @functools.cache
    def base() -> Array:  # the unmoved spectrum, wanted only where a coordinate sits at a kink
        return spectrum(canvas, off)

    def move(plus: Array, minus: Array, per_patch: bool, kink: Array | bool) -> _Move:
        per_u = 1.0 / (2.0 * U32)
        amplitude = (np.abs(plus) - np.abs(minus)) * per_u
        phase = np.angle(plus * np.conj(minus)) * per_u
        if np.any(kink):
            # At a whole pixel the translation has a kink: each way moves a sample into another cell,
            # and the central difference keeps only the odd part of the two moves. A coordinate a
            # float32 backend rounds there (a normalised grid rounds a zero shift too) may move
            # either way, so the larger one-sided secant counts (a grid's log_scale gradients were
            # 1.9 % off at gridsize 1, 5.9 times their tolerance, with the central one).
            centre = base()
            sides = [(np.abs(plus) - np.abs(centre)) / U32, (np.abs(centre) - np.abs(minus)) / U32]
            turns = [np.angle(plus * np.conj(centre)) / U32, np.angle(centre * np.conj(minus)) / U32]
            one_sided = np.where(np.abs(sides[0]) >= np.abs(sides[1]), sides[0], sides[1])
            one_turn = np.where(np.abs(turns[0]) >= np.abs(turns[1]), turns[0], turns[1])
            amplitude = np.where(kink, one_sided, amplitude)
            phase = np.where(kink, one_turn, phase)
        return _Move(amplitude, phase, per_patch)

    moves = []
    extent = em._extent((M, M), off)
    kinks = [em._near_whole(off[..., k], extent)[..., None, None] for k in (0, 1)]  # (B, C, 1, 1): per patch
    for k in (0, 1):
        step = U32 * extent * np.eye(2)[k]
        moves.append(move(spectrum(canvas, off + step), spectrum(canvas, off - step), True, kinks[k]))
    # Each line of a re-extracted patch at a whole pixel, alone (``_line_moves``).
    patch = physics.reextract(canvas, off, N) if np.any(kinks) else None
    for k, kink in enumerate(kinks):
        if patch is None or not np.any(kink):
            continue
        # A coordinate one pixel up reads the next pixel: translate samples j − d.
        sides = [np.where(kink, physics.reextract(canvas, off - s * np.eye(2)[k], N) - patch, 0.0) for s in (1.0, -1.0)]
        for plus, minus in _line_moves(patch, sides, U32 * extent, k, patch_spectrum):
            moves.append(_line(move(plus, minus, True, True)))
    if model.object_big:
        patches, shift = taps["object.patches"], physics.merge_shift(off)
        m_extent = em._extent((M, M), shift)
        # (B, 1, 1, 1) per patch c and axis k: one coordinate per group
        merge_kinks = em._near_whole(shift, m_extent)[:, :, :, None, None, None]
        for c in range(off.shape[1]):
            for k in (0, 1):
                step = np.zeros_like(shift)
                step[:, c, k] = U32 * m_extent
                plus = spectrum(physics.merge_shifted(patches, shift + step, M), off)
                minus = spectrum(physics.merge_shifted(patches, shift - step, M), off)
                moves.append(move(plus, minus, False, merge_kinks[:, c, k]))
        # Each line of a merged patch's sample grid at a whole pixel, alone: the patch's numerator
        # and its coverage read the next pixel on that line, and the group's canvas is divided again.
        padded = pad_spatial(patches, (M - N) // 2)
        window = pad_spatial(physics.centre_mask(N), (M - N) // 2)
        num = physics.translate(padded, shift)  # (B, C, M, M)
        cov = physics.translate(window, shift)
        totals = np.stack([num.sum(axis=1), cov.sum(axis=1)], axis=1)  # (B, 2, M, M): numerator, coverage

        def group_spectrum(totals: Array) -> Array:
            canvas = physics.divide_complex(totals[..., 0:1, :, :], totals[..., 1:2, :, :].real + physics.MERGE_EPSILON)
            return spectrum(canvas, off)

        for c in range(off.shape[1]):
            for k in (0, 1):
                kink = merge_kinks[:, c, k]
                if not np.any(kink):
                    continue
                sides = []
                for s in (1.0, -1.0):
                    moved = shift[:, c] - s * np.eye(2)[k]
                    read = np.stack([physics.translate(padded[:, c], moved), physics.translate(window, moved)], axis=1)
                    sides.append(np.where(kink, read - np.stack([num[:, c], cov[:, c]], axis=1), 0.0))
                for plus, minus in _line_moves(totals, sides, U32 * m_extent, k, group_spectrum):
                    moves.append(_line(move(plus, minus, False, True)))
    return moves


def _coordinate_rounding(model: ReferenceModel, taps: Mapping[str, Array], moves: Sequence[_Move], x: Array) -> Array:
    """E² (u-units) per loss of log_scale's output path from the float32 sampling coordinates.

    In log_scale's Σ 2(I − x²)/K and Σ sign·A/K a coordinate's move does not average out as the
    per-pixel errors in quadrature assume (N=128, a canvas 16000x brighter than the data: both
    frameworks off by 17 u·|∂/∂log_scale|, the same in both, while the quadrature model allowed 2.2).
    Coordinates round independently, so their moves add in quadrature.
    """
    K = x[0].size
    A = taps["output.amplitude"]
    # ∂(∂loss/∂log_scale)/∂a per loss: NLL ∂(2A²/K)/∂A, MAE sign(A − x)/K, times ∂A/∂a = e^log_scale.
    weights = np.stack([4.0 * A, np.sign(A - x)]) * (math.exp(float(model.log_scale)) / K)
    e2 = np.zeros(len(LOSSES))
    for m in moves:
        sensitivity = np.sum(weights * m.amplitude, axis=(-2, -1))  # (S, B, C)
        if not m.per_patch:
            sensitivity = sensitivity.sum(axis=-1)
        e2 += np.sum(sensitivity**2, axis=tuple(range(1, sensitivity.ndim)))
    return e2


def _coordinate_realisations(
    model: ReferenceModel, taps: Mapping[str, Array], moves: Sequence[_Move], x: Array, d_a: Array
) -> list[Array]:
    """Per loss, MC_SAMPLES realisations (K, B, C, N, N) of the cotangent error at the diffraction
    amplitude (real part) and across the spectrum's phase (imaginary part) from the float32 sampling
    coordinates, in real units, for ``_sampled`` to carry with its own: every coordinate rounded by
    u·extent with a random sign of its own (seeded), so the realisations' mean square is the sum of
    the coordinates' effects, each carried whole through the adjoints (a move is coherent over its
    patch, which independent per-pixel samples are not).

    The NLL's cotangent 2(A − x²/A)/K moves with the amplitude, its x²/A part with the saturated
    relative move (as ``_loss_stage``'s); both losses' cotangents turn with the spectrum's phase."""
    a = taps["physics.diffraction"]
    B, C = a.shape[:2]
    g = math.exp(float(model.log_scale))
    K = x[0].size
    rng = np.random.default_rng(_MC_SEED + 2)
    amplitude = np.zeros((MC_SAMPLES, *a.shape))
    phase = np.zeros_like(amplitude)
    for m in moves:
        signs = rng.choice([-1.0, 1.0], size=(MC_SAMPLES, B, C if m.per_patch else 1, 1, 1))
        amplitude += signs * (U32 * m.amplitude)
        phase += signs * (U32 * m.phase)
    A = g * a
    above = taps["output.intensity"] > physics.NLL_FLOOR
    safe_A = np.where(A > 0, A, 1.0)
    moved = g * amplitude
    relative = np.where(A > 0, np.abs(moved) / safe_A, np.inf)
    ill = (
        np.sign(moved)
        * np.where(A > 0, x * x / safe_A, 0.0)
        * np.where(np.isfinite(relative), _saturated(np.where(np.isfinite(relative), relative, 0.0)), 1.0)
    )
    nll = np.where(above, g * 2.0 * (moved + ill) / K, 0.0)
    return [
        physics.complex_from_parts(nll, d_a[0] * phase),
        physics.complex_from_parts(np.zeros_like(nll), d_a[1] * phase),
    ]


def _loss_stage(
    model: ReferenceModel, taps: Mapping[str, Array], S: Mapping[str, Array], x: Array, moves: Sequence[_Move] = ()
) -> tuple[Array, Array, Array, Array, Array, Array, Array, Array, Array, Array]:
    """Cotangents at the diffraction amplitude a (values and E²), the log_scale parts from the
    outputs, and x's direct parts. Returns (d_a, E²_w (the error of d_a·e^{iθ} but the NLL's
    ill-conditioned part), the NLL's ill-conditioned amplitude error (real units), the saturated
    relative amplitude error ρ, dls_out, E²_dls_out, dx_direct, E²_dx_direct, the NLL's cotangent a
    float32 backend may gain where the reference clamps, the RMS of the MAE's sign switches (both
    real units)), stacked (S, ...) in LOSSES order where they have a loss axis."""
    A, intensity = taps["output.amplitude"], taps["output.intensity"]
    s_A = _amplitude_noise(model, taps, S)
    s_I = 2.0 * A * s_A + np.abs(intensity)
    ls = float(model.log_scale)
    g = math.exp(ls)
    K = x[0].size
    d_amp, d_int, dx_direct = bw.losses_vjp(A, intensity, x)
    d_a, dls_out = bw.outputs_vjp(A, ls, d_amp, d_int)
    safe_A = np.where(A > 0, A, 1.0)
    q = np.where(A > 0, U32 * s_A / safe_A, np.inf)
    rho = np.where(np.isfinite(q), _saturated(np.where(np.isfinite(q), q, 0.0)), 1.0)
    above = intensity > physics.NLL_FLOOR
    x2 = x * x
    # Poisson NLL: d_a = e^ls·2(A − x²/A)/K; the x²/A part with the saturated relative error.
    sensitive = np.where(above, g * 2.0 * x2 / safe_A / K, 0.0)
    e_nll = g * 2.0 * s_A / K  # the ill-conditioned part (sensitive·rho) is sampled, see _sampled
    # At or below the NLL's floor the reference clamps (no x² term); float32's noise can lift the
    # pixel above it, and then it holds −x²/A₃₂ for an amplitude anywhere down to √floor (measured:
    # the Nyquist corner of a smooth field, 2e-7 in float64, 1e-6 to 1e-5 in float32, so one pixel
    # per patch moved every NLL gradient by percents). The bound at √floor, one sign, is carried whole.
    clamped = (~above) & (A + U32 * s_A > math.sqrt(physics.NLL_FLOOR))
    lifted = np.where(clamped, g * 2.0 * x2 / math.sqrt(physics.NLL_FLOOR) / K, 0.0)
    # Where I = |F|²/N² underflows float32 (a faint field), a float32 backend holds the amplitude 0: it passes
    # nothing through the square root (its subgradient there) while the reference passes d_a, and the
    # MAE's sign(A − x) is taken at 0 (the forward model's ``squared_away``, carried backwards).
    lost = em.squared_underflows(taps["physics.diffraction"])
    # The sampling coordinates' moves of A (``_coordinate_moves``), in quadrature over coordinates.
    coordinate2 = np.zeros_like(A)
    for m in moves:
        coordinate2 += (g * m.amplitude) ** 2
    # MAE: d_a = e^ls·sign(A − x)/K; a sign switch changes it by 2e^ls/K. Where the coordinates can
    # move A across x, it may switch.
    within = np.abs(A - x) < U32 * np.sqrt(coordinate2)
    p_sign = np.where(lost | within, 1.0, _flip_probability(A - x, s_A))
    # The switches, like the spectrum's phase error (δθ = δA/A saturated) of both losses, are
    # independent per frequency and sampled (``_sampled``, from the returned ``flips``).
    flips = np.sqrt(p_sign) * 2.0 * g / K
    e2_w = np.stack([e_nll**2, np.zeros_like(e_nll)]) + (3.0 * d_a) ** 2
    # log_scale through the outputs: Σ ∂/∂A·A = Σ 2(I − x²)/K (NLL), Σ sign·A/K (MAE).
    red = 1.0 + math.log2(max(K, 2))  # the reduction's depth (per group; the batch adds a level or two)
    nll_terms = 2.0 * (intensity - x2) / K
    e2_ls_nll = np.sum((2.0 * s_I / K) ** 2 + red * nll_terms**2 + (2.0 * (np.abs(intensity) + x2) / K) ** 2)
    e2_ls_nll += (np.sum(np.where(clamped, 2.0 * x2 / K, 0.0)) / U32) ** 2  # the clamp's −x² term, one sign
    e2_ls_mae = np.sum((s_A / K) ** 2 + p_sign * (2.0 * A / K / U32) ** 2 + red * (A / K) ** 2)
    # The sums over the batch as a vectorised reduction forms them (a few bright pixels carry them).
    e2_ls_nll += _lane_rounding(nll_terms) ** 2
    e2_ls_mae += _lane_rounding(np.sign(A - x) * A / K) ** 2
    # x directly: NLL −2x·log(max(I, floor))/K, error 2|x|·log1p(2q)/K; MAE −sign/K switches.
    log_err = 2.0 * np.abs(x) * np.log1p(2.0 * np.where(np.isfinite(q), q, 1e30)) / K / U32
    e2_x_nll = log_err**2 + (3.0 * dx_direct[0]) ** 2
    lines2 = np.zeros_like(A)
    for m in moves:  # each coordinate's move of log I, coherent over its patch: not in q's noise
        moved = np.divide(U32 * g * np.abs(m.amplitude), A, out=np.where(m.amplitude != 0, 1e30, 0.0), where=A > 0)
        if m.line:
            lines2 += moved * moved
        else:
            e2_x_nll += (2.0 * np.abs(x) * np.log1p(2.0 * moved) / K / U32) ** 2
    # The lines' moves of A add in quadrature before the logarithm: a dark pixel's intensity moves by
    # all of them at once, and the logarithm saturates once. Each line's log1p, squared and summed,
    # counted it once a line (a hundred and more at gridsize 1).
    e2_x_nll += (2.0 * np.abs(x) * np.log1p(2.0 * np.sqrt(lines2)) / K / U32) ** 2
    e2_x_mae = p_sign * (2.0 / K / U32) ** 2
    return (
        d_a,
        e2_w,
        sensitive * rho,
        rho,
        dls_out,
        np.array([e2_ls_nll, e2_ls_mae]),
        dx_direct,
        np.stack([e2_x_nll, e2_x_mae]),
        lifted,
        flips,
    )


def _phase_loss(rho: Array) -> Array:
    """1 − E[cos δθ] for float32's spectrum phase error δθ, Gaussian with RMS q, q from the saturated
    relative amplitude error ρ = q/(1 + q): 1 − e^{−q²/2}, second order where q is small, 1 where the
    phase is noise (ρ = 1: A is 0)."""
    q = np.divide(rho, 1.0 - rho, out=np.full(np.shape(rho), np.inf), where=rho < 1.0)
    return np.asarray(np.where(np.isfinite(q), -np.expm1(-0.5 * np.where(np.isfinite(q), q, 0.0) ** 2), 1.0))


def _final_tap(head: Head) -> str:
    return bw._final_tap(head)


def gradient_error_scales(
    model: ReferenceModel,
    taps: Mapping[str, Array],
    scales: Mapping[str, Array],
    offsets: Array,
    probe: Array,
    gradients: Mapping[str, Array] | None = None,
) -> dict[str, Array]:
    """The error scale of every gradient tap (``parity.taps.gradient_tap_specs`` names) of one batch.

    ``taps`` are the reference's forward taps of the batch (float64 or the float32 inputs),
    ``scales`` their forward error scales (``ReferenceModel.error_scales``), offsets (B, C, 2) and
    probe (1, 1, N, N) as the model takes them; ``gradients``, the reference's gradient taps of the
    batch, add the tile floor (one rounding at the tap's RMS magnitude, see the module docstring).
    Returns float64 arrays of the gradients' shapes.
    """
    N, M = model.N, model.M
    x = np.asarray(taps["input.x"], dtype=np.float64)
    ls = float(model.log_scale)
    sw = _Sweep(model, taps, scales)

    moves = _coordinate_moves(model, taps, offsets, probe)
    d_a, e2_w, ill, rho, dls_out, e2_ls_out, _, e2_x_direct, lifted, flips = _loss_stage(model, taps, scales, x, moves)
    # the NLL's ill-conditioned amplitude error, the MAE's sign switches, both losses' phase error,
    # and the sampling coordinates' moves
    coherent = _coordinate_realisations(model, taps, moves, x, d_a)
    sampled = _sampled(model, taps, offsets, probe, [(ill, rho * d_a[0]), (flips, rho * d_a[1])], coherent)
    # FFT adjoint: ψ̄ = 2·ifft2(ds·F); per pixel error √(Σ E_w² + log₂(N²)²·Σ|d_a|²)/N.
    field, diffraction = taps["physics.illuminated"], taps["physics.diffraction"]
    dpsi = bw.diffract_vjp(field, diffraction, d_a)
    spatial = (-2, -1)
    fft_round = math.log2(N * N) ** 2 * np.sum(d_a**2, axis=spatial, keepdims=True)
    e2_psi = np.broadcast_to((np.sum(e2_w, axis=spatial, keepdims=True) + fft_round) / (N * N), dpsi.shape)
    # illumination: conj(P)·mask·ψ̄.
    p_abs = np.abs(probe)
    if model.illumination_mask is not None:
        p_abs = p_abs * model.illumination_mask
    dre = bw.illuminate_vjp(dpsi, probe, model.illumination_mask)
    e2_re = p_abs**2 * (e2_psi + (2.0 * np.abs(dpsi)) ** 2)
    # re-extraction: crop adjoint (pad), translation adjoint, sum over the C patches in quadrature.
    off = np.asarray(offsets, dtype=np.float64)
    extent = em._extent((M, M), off)
    g_pad = bw.crop_centre_vjp(dre, M)
    e_pad = bw.crop_centre_vjp(e2_re, M)
    moved, e2_moved = _translate_adjoint(g_pad, e_pad, off, extent)
    dcanvas = moved.sum(axis=-3, keepdims=True)
    e2_canvas = e2_moved.sum(axis=-3, keepdims=True) + (math.log2(max(off.shape[1], 2)) * np.abs(dcanvas)) ** 2
    # merge (object_big) or the canvas's padding.
    if model.object_big:
        pad = (M - N) // 2
        shift = physics.merge_shift(off)
        mask = pad_spatial(physics.centre_mask(N), pad)
        den = physics.translate(mask, shift).sum(axis=1, keepdims=True) + physics.MERGE_EPSILON
        m_extent = em._extent((M, M), shift)
        s_den = _den_scale(mask, shift, m_extent) + off.shape[1] * den
        dnum = physics.divide_complex(dcanvas, den)
        e2_num = e2_canvas / den**2 + (np.abs(dnum) * s_den / den) ** 2 + (np.abs(dnum)) ** 2
        C = off.shape[1]
        wide = (*dnum.shape[:-3], C, M, M)
        moved_p, e2_p = _translate_adjoint(np.broadcast_to(dnum, wide), np.broadcast_to(e2_num, wide), shift, m_extent)
        dpatches = bw.pad_spatial_vjp(moved_p, pad)
        e2_patches = bw.pad_spatial_vjp(e2_p, pad)
    else:
        dpatches = bw.pad_to_canvas_vjp(dcanvas, N)
        e2_patches = bw.pad_to_canvas_vjp(e2_canvas, N)
    # complex object O = A·exp(iφ).
    amp_tap, phase_tap = _final_tap(model.heads["amp"]), _final_tap(model.heads["phase"])
    A_h, phi = taps[amp_tap], taps[phase_tap]
    s_Ah, s_phi = scales[amp_tap], scales[phase_tap]
    d_amp_h, d_phase_h = bw.complex_object_vjp(A_h, phi, dpatches)
    gmag2 = np.abs(dpatches) ** 2
    e2_amp_h = e2_patches + gmag2 * s_phi**2 + 4.0 * gmag2
    e2_phase_h = A_h**2 * (e2_patches + gmag2 * s_phi**2) + gmag2 * s_Ah**2 + 9.0 * A_h**2 * gmag2
    # network.
    depth = len(model.encoder)
    feat_name = f"encoder.block{depth - 1}.pool"
    features = taps[feat_name]
    dfeatures = np.zeros((len(LOSSES), *features.shape))
    e2_features = np.zeros_like(dfeatures)
    s_feat = sw.passed_on(feat_name)
    for h, dy, e2 in (("amp", d_amp_h, e2_amp_h), ("phase", d_phase_h, e2_phase_h)):
        head = model.heads[h]
        last = f"{h}.decoder.block{len(head.decoder) - 1}.up"
        d, e = sw.head(head, taps[last], sw.passed_on(last), dy, e2)
        for i in range(len(head.decoder) - 1, -1, -1):
            if i:
                name = f"{h}.decoder.block{i - 1}.up"
                block_in, s_in = taps[name], sw.passed_on(name)
            else:
                block_in, s_in = features, s_feat
            d, e = sw.block(head.decoder[i], block_in, s_in, d, e)
        dfeatures += d
        e2_features += e
    d, e = dfeatures, e2_features
    for i in range(depth - 1, -1, -1):
        if i:
            name = f"encoder.block{i - 1}.pool"
            block_in, s_in = taps[name], sw.passed_on(name)
        else:
            block_in, s_in = taps["input.scaled"], scales["input.scaled"]
        d, e = sw.block(model.encoder[i], block_in, s_in, d, e)
    # scale_input: x_s = x / e^ls; d_x = d_s / e^ls, d_ls = −Σ d_s·x_s.
    scaled, s_scaled = taps["input.scaled"], scales["input.scaled"]
    inv = math.exp(-ls)
    e2_x = (e + (2.0 * d) ** 2) * inv**2 + e2_x_direct
    lead = d.shape[0]
    n_in = scaled.size
    red = 1.0 + math.log2(max(n_in, 2))
    e2_ls_in = (scaled**2 * (e + red * d * d) + d * d * s_scaled**2).reshape(lead, -1).sum(axis=1)
    e2_ls_in += np.array([_lane_rounding(d[i] * scaled) ** 2 for i in range(lead)])
    e2_ls_out = e2_ls_out + _coordinate_rounding(model, taps, moves, x)
    e2_ls = e2_ls_out + e2_ls_in + (2.0 * (np.abs(dls_out) + np.abs((d * scaled).reshape(lead, -1).sum(axis=1)))) ** 2

    out: dict[str, Array] = {}
    convs = list(model.convs())
    for s, loss in enumerate(LOSSES):
        prefix = f"{GRAD}.{loss}"
        for conv in reversed(convs):
            k2, b2 = sw.kernel_sq[conv.name]
            out[f"{prefix}.{conv.name}.kernel"] = np.sqrt(k2[s]) + TINY
            out[f"{prefix}.{conv.name}.bias"] = np.sqrt(b2[s]) + TINY
        out[f"{prefix}.log_scale"] = np.asarray(math.sqrt(float(e2_ls[s])) + TINY)
        out[f"{prefix}.input.x"] = np.sqrt(e2_x[s]) + TINY
    saturated = _saturated_outputs(model, taps, {"amp": d_amp_h, "phase": d_phase_h})
    nonlinear = _nonlinear_heads(model, taps, sw.smooth, offsets, probe, gradients)
    preactivation = _preactivation_realisations(model, taps, sw.preactivation_errors)
    for extra in (sampled, *(e or [{} for _ in LOSSES] for e in (saturated, nonlinear, preactivation))):
        for s, loss in enumerate(LOSSES):
            for name, e2 in extra[s].items():
                out[f"{GRAD}.{loss}.{name}"] = np.sqrt(out[f"{GRAD}.{loss}.{name}"] ** 2 + e2)
    nll = f"{GRAD}.{LOSSES[0]}"
    # The NLL's dark pixels are also biased: where the reference's A is below float32's noise, a
    # float32 amplitude is the size of the noise, so x²/A is smaller at every such pixel, in the same
    # direction: a coherent error that the zero-mean samples above cannot show (N=128, weights ×0.37:
    # both frameworks 2.5 % off a phase kernel's largest gradient, on the same side). Its mean, the
    # term times ρ² (the whole term once A is lost in noise, second order where it is not), is carried
    # whole through the adjoints. The MAE's dark pixels lose their cotangent on average: it is
    # e^ls·sign/K at every frequency, whatever A, and where float32's spectrum is noise its phase is
    # too, so the cotangent along the reference's phase is lost by λ = 1 − E[cos δθ] (``_phase_loss``)
    # at every such frequency, with its sign. Sampled as zero-mean phase noise, the MAE's phase-branch
    # decoder gradients of both frameworks were 173 times their scale off, all on one side (N=128,
    # weights x0.40, the Nyquist rows below 1e-7 of the spectrum's peak); carried whole, 1.5 to 1.8
    # times what the frameworks were off. The NLL's dark cotangent is its x²/A term, carried above.
    mean_errors = np.stack([ill * rho, -_phase_loss(rho) * d_a[1]]).astype(complex)
    for name, e2 in _carried_square(model, taps, offsets, probe, mean_errors).items():
        for s, loss in enumerate(LOSSES):
            out[f"{GRAD}.{loss}.{name}"] = np.sqrt(out[f"{GRAD}.{loss}.{name}"] ** 2 + e2[s])
    if np.any(lifted):
        for name, e2 in _lifted_square(model, taps, offsets, probe, lifted).items():
            out[f"{nll}.{name}"] = np.sqrt(out[f"{nll}.{name}"] ** 2 + e2)
    lost = em.squared_underflows(taps["physics.diffraction"])
    if lost.any():
        for name, e2 in _underflow_lost(model, taps, offsets, probe, d_a, lost).items():
            for s, loss in enumerate(LOSSES):
                out[f"{GRAD}.{loss}.{name}"] = np.sqrt(out[f"{GRAD}.{loss}.{name}"] ** 2 + e2[s])
    if gradients is not None:
        for name, value in gradients.items():
            if name in out:
                g = np.asarray(value, dtype=np.float64)
                out[name] = np.hypot(out[name], _tile_floor(g))
                summed = sw.summed.get(name.split(".", 2)[2].rsplit(".", 1)[0])
                if summed is not None and name.endswith((".kernel", ".bias")):
                    out[name] = np.hypot(out[name], _reduction_rounding(g, summed))
    return {name: np.asarray(v, dtype=np.float64, order="C") for name, v in out.items()}


def _carried(
    model: ReferenceModel,
    taps: Mapping[str, Array],
    offsets: Array,
    probe: Array,
    perturbation: Array,
    dtype: DTypeLike = np.float64,
) -> tuple[bw.ConvGradients, Array, Array]:
    """Perturbations (K, B, C, N, N) of the cotangent at the diffraction amplitude (real part) and of
    the spectrum's phase (imaginary part), carried through the reference's own linear adjoints to
    every parameter, x and log_scale's input path: (conv gradients, dx, dls), K leading. The network's
    adjoints, nearly all of the work, run in ``dtype`` (the physics' in float64)."""
    N, M = model.N, model.M
    a = taps["physics.diffraction"]
    lit = a > 0
    ds = np.where(lit, perturbation / np.where(lit, 2.0 * a, 1.0), 0.0)
    spectrum = np.fft.fft2(taps["physics.illuminated"], axes=(-2, -1))
    dpsi = 2.0 * np.fft.ifft2(np.fft.ifftshift(ds, axes=(-2, -1)) * spectrum, axes=(-2, -1))
    off = np.asarray(offsets, dtype=np.float64)
    dre = bw.illuminate_vjp(dpsi, probe, model.illumination_mask)
    dcanvas = bw.reextract_vjp(dre, off, M)
    dpatches = bw.merge_vjp(dcanvas, off, N) if model.object_big else bw.pad_to_canvas_vjp(dcanvas, N)
    final = {h: taps[_final_tap(head)] for h, head in model.heads.items()}
    d_amp, d_phase = bw.complex_object_vjp(final["amp"], final["phase"], dpatches)
    return _carried_network(model, taps, [("amp", d_amp), ("phase", d_phase)], dtype)


def _carried_network(
    model: ReferenceModel, taps: Mapping[str, Array], branches: list[tuple[str, Array]], dtype: DTypeLike
) -> tuple[bw.ConvGradients, Array, Array]:
    """Cotangents (K, B, C, N, N) at the heads' outputs, carried through the reference's own linear
    adjoints of the network to every parameter, x and log_scale's input path, in ``dtype``."""

    def head_adjoint(h: str, dy: Array) -> Callable[[bw.ConvGradients], Array]:
        head = model.heads[h]
        features = taps[f"{h}.decoder.block{len(head.decoder) - 1}.up"]
        return lambda grads: bw._head_vjp(model, head, features, dict(taps), dy.astype(dtype, copy=False), grads)

    return _carried_below_heads(model, taps, [(h, head_adjoint(h, dy)) for h, dy in branches], dtype)


def _carried_from_preactivations(
    model: ReferenceModel, taps: Mapping[str, Array], dz: Mapping[str, Array], dtype: DTypeLike
) -> tuple[bw.ConvGradients, Array, Array]:
    """Cotangents (K, B, C, H, W) at head convs' pre-activations (by conv name), carried like
    ``_carried_network``'s; a head conv not named passes nothing, and its parameters get none."""
    K = next(iter(dz.values())).shape[0]

    def head_adjoint(head: Head) -> Callable[[bw.ConvGradients], Array]:
        def adjoint(grads: bw.ConvGradients) -> Array:
            h = head.name
            features = taps[f"{h}.decoder.block{len(head.decoder) - 1}.up"]
            if head.full is not None and head.full_out is not None:
                up = taps[f"{h}.head.full.up"]
                d = bw._conv_vjp(head.full_out, up, dz[head.full_out.name].astype(dtype, copy=False), grads)
                return bw._block_vjp(head.full, features, dict(taps), d, grads)
            out = np.zeros((K, *features.shape), dtype=dtype)
            if head.centre is not None and head.centre.name in dz:
                d = dz[head.centre.name].astype(dtype, copy=False)
                out[:, :, :-4] = bw._conv_vjp(head.centre, features[:, :-4], d, grads)
            if head.border is not None and head.border_out is not None and head.border_out.name in dz:
                up = taps[f"{h}.head.border.up"]
                d = bw._conv_vjp(head.border_out, up, dz[head.border_out.name].astype(dtype, copy=False), grads)
                out[:, :, -4:] = bw._block_vjp(head.border, features[:, -4:], dict(taps), d, grads)
            return out

        return adjoint

    heads = [
        (h, head_adjoint(head))
        for h, head in model.heads.items()
        if any(c is not None and c.name in dz for c in (head.full_out, head.centre, head.border_out))
    ]
    return _carried_below_heads(model, taps, heads, dtype)


def _carried_below_heads(
    model: ReferenceModel,
    taps: Mapping[str, Array],
    heads: Sequence[tuple[str, Callable[[bw.ConvGradients], Array]]],
    dtype: DTypeLike,
) -> tuple[bw.ConvGradients, Array, Array]:
    """Each head's adjoint (which stores its own parameters' gradients and returns the cotangent of
    its decoder's output, K leading), then the decoders', the encoder's and the input scaling's."""
    depth = len(model.encoder)
    features = taps[f"encoder.block{depth - 1}.pool"]
    grads: bw.ConvGradients = {}
    dfeatures: Array | None = None
    for h, adjoint in heads:
        head = model.heads[h]
        d = adjoint(grads)
        for i in range(len(head.decoder) - 1, -1, -1):
            block_in = taps[f"{h}.decoder.block{i - 1}.up"] if i else features
            d = bw._block_vjp(head.decoder[i], block_in, dict(taps), d, grads)
        dfeatures = d if dfeatures is None else dfeatures + d
    assert dfeatures is not None, "no head to carry"
    d = dfeatures
    for i in range(depth - 1, -1, -1):
        block_in = taps[f"encoder.block{i - 1}.pool"] if i else taps["input.scaled"]
        d = bw._block_vjp(model.encoder[i], block_in, dict(taps), d, grads)
    dx, dls = bw.scale_input_vjp(taps["input.scaled"], float(model.log_scale), d)
    return grads, dx, dls


# How close to ±1, in units of u, a float32 sigmoid or tanh output may be rounded to ±1 exactly. The
# frameworks differ: TensorFlow's tanh (Eigen's rational form) returns 1 from |z| = 7.905 on, where
# 1 − tanh is 4.6u; torch's from about 9.1 (0.4u). Each threshold is carried on its own, because
# pixels lost together can cancel, so the loss of a larger set does not bound that of a smaller one.
_SATURATION_THRESHOLDS = (0.5, 1.0, 2.0, 4.0, 8.0)


def _saturation_gap(activation: Activation, z: Array) -> Array:
    """How far a sigmoid's output lies below 1, or a tanh's magnitude below 1, at z (float64)."""
    if activation is sigmoid:
        return np.asarray(sigmoid(-z))
    e = np.exp(-2.0 * np.abs(z))
    return np.asarray(2.0 * e / (1.0 + e))


def _saturation_masks(model: ReferenceModel, taps: Mapping[str, Array], head: Head) -> Array | None:
    """(thresholds, B, C, N, N): where, at the head's N x N output, its sigmoid or tanh output lies
    within each threshold's u of 1 in magnitude; None for activations differentiated from z."""
    if head.activation not in (sigmoid, pi_tanh):
        return None
    features = taps[f"{head.name}.decoder.block{len(head.decoder) - 1}.up"]
    if head.full is not None and head.full_out is not None:
        z = head.full_out(taps[f"{head.name}.head.full.up"])
    else:
        assert head.centre is not None
        z = head.centre(features[:, :-4])
    gap = _saturation_gap(head.activation, z)
    masks = np.stack([gap <= k * U32 for k in _SATURATION_THRESHOLDS])
    if head.full is None:
        masks = pad_spatial(masks, model.N // 4)
    return np.asarray(masks)


def _saturated_outputs(
    model: ReferenceModel, taps: Mapping[str, Array], cotangents: Mapping[str, Array]
) -> list[dict[str, Array]] | None:
    """E² (u-units) per loss and gradient tap of what a float32 backend loses where a sigmoid or tanh
    head saturates: torch and TensorFlow form f' from the output (y(1 − y), 1 − t²), which is exactly
    0 once the output rounds to ±1, so the cotangent is lost whole at every such pixel, each with its
    sign: one deterministic perturbation, carried exactly through the adjoints like the underflow's,
    not as independent noise. In quadrature the lost pixels of a phase head at weights x2.5 were under-
    counted 20 to 45 times (the long sweep with gradients, seed 20261203). ``cotangents``: the
    reference's cotangent (S, B, C, N, N) at each head's output. None where nothing saturates."""
    found = {h: _saturation_masks(model, taps, model.heads[h]) for h in cotangents}
    masks = {h: m for h, m in found.items() if m is not None and m[-1].any()}
    if not masks:
        return None
    # Thresholds that select the same pixels in every head are carried once.
    distinct = [0] + [
        k for k in range(1, len(_SATURATION_THRESHOLDS)) if any((m[k] != m[k - 1]).any() for m in masks.values())
    ]
    T = len(distinct)
    branches = [(h, (cotangents[h][:, None] * m[distinct][None]).reshape(-1, *m.shape[1:])) for h, m in masks.items()]
    grads, dx, dls = _carried_network(model, taps, branches, np.float64)
    S = next(iter(cotangents.values())).shape[0]

    def worst(a: Array) -> Array:
        return np.asarray(np.abs(a).reshape(S, T, *a.shape[1:]).max(axis=1) / U32) ** 2

    out: list[dict[str, Array]] = [{} for _ in range(S)]
    parts = {f"{name}.{kind}": g for name, (dk, db) in grads.items() for kind, g in (("kernel", dk), ("bias", db))}
    parts["log_scale"] = np.asarray(dls)
    parts["input.x"] = dx
    for name, g in parts.items():
        e2 = worst(g)
        for s in range(S):
            out[s][name] = e2[s]
    return out


# Where an activation's derivative changes by more than this factor over the range a float32 pre-
# activation reaches (±KINK_SIGMA·u·S_z), first order is no longer a model of its error.
_LINEAR_LIMIT = 1.5


@dataclass
class _ShiftedConv(Conv):
    """A head conv whose output (the pre-activation) is moved by a fixed field: the forward and the
    backward, which recomputes the pre-activation from the conv, both see the moved one."""

    shift: Array = field(default_factory=lambda: np.zeros(0))

    def __call__(self, x: Array, dtype: DTypeLike = np.float64) -> Array:
        return np.asarray(conv2d(x, self.kernel, self.bias, dtype) + self.shift.astype(dtype, copy=False))


def _nonlinear_heads(
    model: ReferenceModel,
    taps: Mapping[str, Array],
    smooth: Mapping[str, tuple[Activation, Array, Array]],
    offsets: Array,
    probe: Array,
    gradients: Mapping[str, Array] | None = None,
) -> list[dict[str, Array]] | None:
    """E² (u-units) per loss and gradient tap where a head's pre-activation error is too large for
    first order: the secant over the range float32 reaches, not the tangent.

    A head's gradient is f'(z)·dy, and dy itself depends on the head's output through the physics
    (the phase's sine, the spectrum). Where u·S_z is not small against f'/f'' (a tanh of |z| ~ 5 among
    pre-activations of ~10⁵), both factors move exponentially with z, together: a faithful float32
    backend whose z is 1.15 off at one pixel (6 u·S_z) held the phase branch's gradients 100 times
    the reference's (the long sweep with gradients, seed 20261204), and first order, f''·dy·S_z, saw
    a few percent of it. So where f' changes by more than _LINEAR_LIMIT over ±KINK_SIGMA·u·S_z (the
    measured spread of a float32 pre-activation, as the ReLU and max-pool switches use it), the
    reference's gradients are recomputed in float64 with those pixels' z moved by KINK_SIGMA·u·S_z
    the way f' grows, and once the other way. The larger change of each element, divided by
    KINK_SIGMA to express it per u·S_z as every other term is, enters E². The move is coherent over
    those pixels and nonlinear, forward and backward, so both coupled factors are in it. None where
    every head is first-order (default weights: u·S_z below 10⁻⁸ on random batches)."""
    moves: dict[str, Array] = {}
    for name, (activation, z, s_z) in smooth.items():
        reach = KINK_SIGMA * U32 * s_z
        d1, up, down = (np.abs(_derivatives(activation, z + d)[0]) for d in (0.0, reach, -reach))
        far = np.maximum(up, down) > _LINEAR_LIMIT * d1
        if far.any():
            # Each pixel moves the way its f' grows (towards 0 for a tanh), all together, and then
            # all the other way: the coherent extremes of what float32 may do at those pixels.
            moves[name] = np.where(far, np.where(up >= down, reach, -reach), 0.0)
    if not moves:
        return None
    x = np.asarray(taps["input.x"], dtype=np.float64)
    moved_gradients = []
    for sign in (1.0, -1.0):
        moved = copy.copy(model)
        moved.heads = {h: _moved_head(head, moves, sign) for h, head in model.heads.items()}
        moved_gradients.append(bw.gradients(moved, x, offsets, probe))
    # The reference's own gradients when given in full and in float64: the same function of the same
    # inputs, so an element no move reaches differs by exactly 0 (a float32 copy would add its rounding).
    given = gradients or {}
    if any(np.asarray(given.get(name, 0.0)).dtype != np.float64 for name in moved_gradients[0]):
        given = bw.gradients(model, x, offsets, probe)
    out: list[dict[str, Array]] = [{} for _ in LOSSES]
    for s, loss in enumerate(LOSSES):
        prefix = f"{GRAD}.{loss}."
        for name in (n for n in moved_gradients[0] if n.startswith(prefix)):
            change = np.maximum(*(np.abs(g[name] - given[name]) for g in moved_gradients))
            out[s][name[len(prefix) :]] = (change / (KINK_SIGMA * U32)) ** 2
    return out


def _moved_head(head: Head, moves: Mapping[str, Array], sign: float) -> Head:
    """The head with each of its convs named in ``moves`` shifted by sign·move."""
    convs = {f: getattr(head, f) for f in ("centre", "border_out", "full_out")}
    shifted: dict[str, Any] = {
        f: _ShiftedConv(conv.name, conv.kernel, conv.bias, sign * moves[conv.name])
        for f, conv in convs.items()
        if conv is not None and conv.name in moves
    }
    return replace(head, **shifted)


def _underflow_lost(
    model: ReferenceModel, taps: Mapping[str, Array], offsets: Array, probe: Array, d_a: Array, lost: Array
) -> dict[str, Array]:
    """E² (u-units) per loss and gradient tap of what float32 loses where I = |F|²/N² underflows: there it
    holds the amplitude 0 and passes no cotangent through the square root, the reference passes d_a.
    That loss is one deterministic perturbation, the same in every float32 backend, so it is carried
    exactly through the adjoints (linear in the cotangent), not as a variance: in quadrature, the
    hundreds of lost pixels of a faint field under-counted it (biases needed 1.1x their factor)."""
    return _carried_square(model, taps, offsets, probe, np.where(lost, d_a, 0.0).astype(complex))


# Up to this many lifted pixels are carried one by one; more are sampled (MC_SAMPLES realisations).
_LIFTED_EXACT = 8


def _lifted_square(
    model: ReferenceModel, taps: Mapping[str, Array], offsets: Array, probe: Array, lifted: Array
) -> dict[str, Array]:
    """E² (u-units) per NLL gradient tap of the cotangent float32 may gain where the reference clamps.

    There float32's spectrum is its own noise, so its phase is unrelated to the reference's: each
    pixel's cotangent points anywhere in the complex plane, independently of the other pixels'. So
    pixels add in quadrature, each carried along the reference's spectrum phase and across it (one
    by one when few, as random complex combinations otherwise: the same mean square)."""
    where = np.argwhere(lifted != 0)
    if len(where) <= _LIFTED_EXACT:
        stack = np.zeros((2 * len(where), *lifted.shape), dtype=complex)
        for i, pixel in enumerate(map(tuple, where)):
            stack[(2 * i, *pixel)] = lifted[pixel]
            stack[(2 * i + 1, *pixel)] = 1j * lifted[pixel]
        return {name: e2.sum(axis=0) for name, e2 in _carried_square(model, taps, offsets, probe, stack).items()}
    rng = np.random.default_rng(_MC_SEED + 1)
    shape = (MC_SAMPLES, *lifted.shape)
    stack = physics.complex_from_parts(rng.standard_normal(shape) * lifted, rng.standard_normal(shape) * lifted)
    return {name: e2.mean(axis=0) for name, e2 in _carried_square(model, taps, offsets, probe, stack).items()}


def _carried_square(
    model: ReferenceModel, taps: Mapping[str, Array], offsets: Array, probe: Array, perturbation: Array
) -> dict[str, Array]:
    """E² (u-units) per gradient tap of one deterministic perturbation (K, B, C, N, N) of the loss
    stage (``_carried``), K leading: a systematic error, carried whole rather than as a variance."""
    grads, dx, dls = _carried(model, taps, offsets, probe, perturbation)
    out: dict[str, Array] = {}
    for name, (dk, db) in grads.items():
        out[f"{name}.kernel"] = dk**2 / U32**2
        out[f"{name}.bias"] = db**2 / U32**2
    out["log_scale"] = np.asarray(dls) ** 2 / U32**2
    out["input.x"] = dx**2 / U32**2
    return out


def _sampled(
    model: ReferenceModel,
    taps: Mapping[str, Array],
    offsets: Array,
    probe: Array,
    parts: list[tuple[Array, Array]],
    coherent: list[Array] | None = None,
) -> list[dict[str, Array]]:
    """E² (u-units) per loss of the gradients from the loss stage's dark-pixel errors, by sampling.

    ``parts`` holds, per loss, the RMS error of the cotangent at the amplitude and of the spectrum's
    phase term (real units, (B, C, N, N) each). These errors are independent per frequency, but after
    the FFT adjoint each is a plane wave over the whole patch, and every later adjoint sums it against
    smooth weights, where it largely cancels. A variance propagated through squared adjoints assumes
    independent pixels and misses that cancellation (10–1000× too large on the NLL's biases and
    log_scale, 10⁴× on the MAE's phase head, measured). So these errors are carried as MC_SAMPLES
    random realisations per loss (seeded, so a scale is reproducible) through the reference's own
    linear adjoints, which keep every cancellation; E² is their mean square, averaged over each
    kernel's 3x3 taps and x's 3x3 pixel neighbourhoods to steady the estimate.

    The network's adjoints carry the realisations in float32, at half the cost: their rounding
    (~1e-7) is far below the sampling noise of MC_SAMPLES realisations. Each loss's realisations are
    divided by a power of two near their largest value first (the adjoints are linear, so the scale
    is put back exactly afterwards), which keeps them far from float32's underflow and overflow.
    """
    K = MC_SAMPLES
    rng = np.random.default_rng(_MC_SEED)
    realisations, units = [], []
    for i, (real, imag) in enumerate(parts):
        shape = (K, *real.shape)
        sample = physics.complex_from_parts(rng.standard_normal(shape) * real, rng.standard_normal(shape) * imag)
        if coherent is not None:
            sample = sample + coherent[i]
        largest = float(max(np.max(np.abs(sample.real)), np.max(np.abs(sample.imag))))
        unit = math.ldexp(1.0, math.frexp(largest)[1]) if largest > 0 else 1.0
        realisations.append(sample / unit)
        units.append(unit)
    carried = _carried(model, taps, offsets, probe, np.concatenate(realisations), dtype=np.float32)
    return [_realised_e2(carried, slice(i * K, (i + 1) * K), unit) for i, unit in enumerate(units)]


def _realised_e2(
    carried: tuple[bw.ConvGradients, Array, Array], mine: slice, unit: float, steady: bool = True
) -> dict[str, Array]:
    """E² (u-units) per gradient tap from the realisations ``mine`` of ``carried`` (carried divided
    by ``unit``): their mean square; with ``steady``, averaged over each kernel's 3x3 taps and x's 3x3
    pixel neighbourhoods to steady an estimate from a few realisations (which also gives an element
    its neighbours' size where its own is far smaller)."""
    grads, dx, dls = carried
    out: dict[str, Array] = {}
    kernel_axes = (0, 1, 2) if steady else 0
    for name, (dk, db) in grads.items():
        out[f"{name}.kernel"] = np.broadcast_to(_mean_square(dk[mine], kernel_axes, unit), dk.shape[1:]) / U32**2
        out[f"{name}.bias"] = _mean_square(db[mine], 0, unit) / U32**2
    out["log_scale"] = _mean_square(dls[mine], None, unit) / U32**2
    box = _mean_square(dx[mine], 0, unit)
    if steady:
        p = np.pad(box, [(0, 0), (0, 0), (1, 1), (1, 1)], mode="edge")
        box = sliding_window_view(p, (3, 3), axis=(-2, -1)).mean(axis=(-2, -1))
    out["input.x"] = box / U32**2
    return out


def _preactivation_realisations(
    model: ReferenceModel, taps: Mapping[str, Array], errors: Mapping[str, Array]
) -> list[dict[str, Array]] | None:
    """E² (u-units) per loss and gradient tap of the heads' pre-activation errors, by sampling.

    ``errors``: per head conv, the error f''·dy·S_z of its cotangent that z's own error makes (u-units,
    (S, B, C, H, W)), which ``_Sweep.activation`` also puts in E². It is independent per pixel, so E²
    is right at the head conv's own parameters; but every later adjoint spreads a pixel's error over
    a neighbourhood with the kernel's signs, and a bias sums that neighbourhood again: what reaches a
    bias is (Σ_taps w)²·σ², which the squared adjoints count as Σ_taps w²·σ². Where a saturated head
    leaves a few live pixels whose z is a cancellation of terms 10³ times larger, this error
    dominates, and a channel whose kernel taps share a sign got a tenth of its variance (the long
    sweep with gradients, seed 20261210: TensorFlow's phase-branch biases 1.02 tolerances off).
    Carried as MC_SAMPLES realisations per loss through the reference's adjoints (random signs per
    pixel, in float32 at unit size as ``_sampled``'s), their mean square keeps what the paths share.
    It is added to E², not put in place of the squared count: four realisations' mean square is a
    noisy estimate (under a quarter of its expectation one time in eleven), and the squared count
    keeps the scale where the tolerance factors were measured. Since that count is the floor, the
    estimate is not averaged over kernel taps or x's neighbourhoods as ``_sampled``'s is: averaged,
    elements whose own share is far below their neighbours' took the neighbours' (a kernel element
    of that sweep example 730 times its squared count). None where no error was recorded."""
    if not errors:
        return None
    S = next(iter(errors.values())).shape[0]
    K = MC_SAMPLES
    rng = np.random.default_rng(_MC_SEED + 2)
    units = []
    for s in range(S):
        largest = max(float(np.max(np.abs(e[s]))) for e in errors.values()) * U32
        units.append(math.ldexp(1.0, math.frexp(largest)[1]) if largest > 0 else 1.0)
    dz = {}
    for name, e in errors.items():
        sample = rng.standard_normal((S, K, *e.shape[1:])) * (e[:, None] * U32)  # in the gradients' units
        dz[name] = (sample / np.asarray(units).reshape(S, 1, 1, 1, 1, 1)).reshape(S * K, *e.shape[1:])
    carried = _carried_from_preactivations(model, taps, dz, np.float32)
    return [_realised_e2(carried, slice(s * K, (s + 1) * K), units[s], steady=False) for s in range(S)]


def _mean_square(values: Array, axis: int | tuple[int, ...] | None, unit: float) -> Array:
    """Mean square, in float64, of realisations that were carried divided by ``unit``."""
    return np.asarray(np.mean(np.square(values, dtype=np.float64), axis=axis) * unit**2)


def _sequential_rounding(dz: Array) -> Array:
    """(S, C): the error (in u) of a float32 sum of each channel's cotangent over its B·H·W pixels
    added one after another, as TensorFlow's bias gradient (``BiasAddGrad``) adds each channel's
    rows, over the whole batch or over 2 or 4 contiguous blocks (threads) added at the end; the
    largest of the three. Where the terms share a sign and a few carry the sum, every later term
    rounds at their size or is lost (``_lane_rounding``); 4096 such rows, measured: TensorFlow 353 u
    of the total off, the sequential sum exactly. The order of a channel's pixels is the same in
    both memory layouts."""
    S, B, C, H, W = dz.shape
    worst = np.zeros((S, C))
    with np.errstate(over="ignore", invalid="ignore"):  # past float32's range: inf, a mismatch at any scale
        rows = np.moveaxis(dz, 2, 1).reshape(S, C, B * H * W).astype(np.float32)
        exact = rows.sum(axis=-1, dtype=np.float64)
        for blocks in _BLOCKS:
            total = np.zeros((S, C), np.float32)
            for part in np.array_split(rows, blocks, axis=-1):
                if part.shape[-1]:
                    total = total + np.cumsum(part, axis=-1, dtype=np.float32)[..., -1]
            err = np.abs(total - exact)
            worst = np.maximum(worst, np.where(np.isfinite(err), err, 0.0))
    return worst / U32


def _lane_sum(flat: Array, lanes: int) -> float:
    """A float32 sum of ``flat`` (float32) as ``lanes`` interleaved accumulators form it: element i
    into lane i mod lanes, each lane in order, the lanes then added pairwise."""
    pad = (-flat.size) % lanes
    rows = np.concatenate([flat, np.zeros(pad, np.float32)]).reshape(-1, lanes)
    acc = np.cumsum(rows, axis=0, dtype=np.float32)[-1]  # each lane's additions in order, in float32
    while acc.size > 1:
        acc = acc[: acc.size // 2] + acc[acc.size // 2 :]
    return float(acc[0])


def _lane_rounding(terms: Array) -> float:
    """The error (in u) of a float32 sum of ``terms`` as vectorised reductions form it, the largest
    over ``_LANES`` x ``_BLOCKS`` and both memory orders of a (B, C, H, W) field (channels first and
    last). Each lane adds its terms in order, so once a lane holds a large term every small one added
    after it rounds at that term's size, and one smaller than half its spacing is lost whole: not
    noise of either sign but the small terms themselves, one-sided where they are. (1 + log₂n)
    roundings of the total (``_reduction_rounding``) or of each term in quadrature describe a
    pairwise sum; where a few pixels carry most of a sum (the diffraction's central peak at 2.5e11
    photons: 8 terms half of it, the median term 2e-9 of it), TensorFlow's sum of log_scale's 32768
    terms was 13 u of the total off (TensorFlow's value reproduced bit for bit by 64 lanes in one
    block, or 32 in four), the model's scale 2.7 u of it; with 16 lanes the same sum is 86 u off.
    Terms rounded to float32 first; the error is against their float64 sum."""
    t = np.asarray(terms, dtype=np.float64)
    orders = [t] if t.ndim != 4 or t.shape[1] == 1 else [t, np.moveaxis(t, 1, -1)]
    worst = 0.0
    with np.errstate(over="ignore", invalid="ignore"):  # past float32's range: inf, a mismatch at any scale
        for order in orders:
            flat = np.ascontiguousarray(order, dtype=np.float32).ravel()
            exact = float(np.sum(flat, dtype=np.float64))
            for blocks in _BLOCKS:
                for lanes in _LANES:
                    parts = [_lane_sum(part, lanes) for part in np.array_split(flat, blocks) if part.size]
                    total = np.float32(0.0)
                    for p in parts:
                        total = np.float32(total + np.float32(p))
                    err = abs(float(total) - exact)
                    if math.isfinite(err):
                        worst = max(worst, err)
    return worst / U32


def _reduction_rounding(value: Array, n: int) -> Array:
    """The rounding of a float32 sum of n terms at the magnitude of its partial sums: (1 + log₂n)
    roundings at the total's size. Where the terms share a sign the partial sums approach the total,
    and a blocked or sequential sum rounds each at that size, which the terms' own magnitudes
    ((1 + log₂n)·Σ terms², in ``_Sweep.conv``) understate by up to √n: an amplitude head's kernel
    gradient, 4096 pixels of positive features times mostly positive cotangents, was 100u of itself
    off in torch, 1.02 times its tolerance (the long sweep, seed 20261205). Where the terms cancel,
    the total is small and this adds nothing."""
    return np.asarray(math.sqrt(1.0 + math.log2(max(n, 2))) * np.abs(value))


def _tile_floor(value: Array) -> Array:
    """One rounding at the RMS magnitude of a gradient (per sample for input.x, whole for a parameter)."""
    if value.ndim == 4:  # input.x: per sample
        return np.asarray(np.sqrt(np.mean(value * value, axis=(1, 2, 3), keepdims=True)) + np.zeros_like(value))
    return np.asarray(np.sqrt(np.mean(value * value)) + np.zeros_like(value))

"""The reference's model of float32 error for gradient taps (backends/reference/gradient_error_model.py).

What a user relies on: every gradient tap gets a usable scale; the scale follows the magnitudes it
is made of; a ReLU unit inside float32 noise of its kink, or a dark pixel where the Poisson NLL is
ill-conditioned, raises the scale of what it feeds, and nothing else does; and against real float32
gradients (torch) the bundled tolerances hold while an error of a few percent of one element does not.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import warnings
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from backends.reference import ReferenceBackend, backward
from backends.reference import gradient_error_model as gem
from backends.reference.model import Conv
from parity.batch import CanonicalBatch, random_batch
from parity.config import ModelConfig
from parity.taps import GRAD, gradient_tap_specs
from parity.tolerances import load_tolerances
from parity.weights import generate_weights

_spec = importlib.util.spec_from_file_location(
    "float32_coordinates", Path(__file__).with_name("float32_coordinates.py")
)
assert _spec is not None and _spec.loader is not None
coords: Any = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(coords)

U = 2.0**-24
SMALL = ModelConfig(gridsize=1, n_filters_scale=1, probe_big=False)


def _scales(config: ModelConfig, seed: int = 0) -> tuple[ReferenceBackend, CanonicalBatch, dict, dict]:
    backend = ReferenceBackend(config, generate_weights(config, seed))
    batch = random_batch(config, 2, seed)
    taps = {**backend.forward(batch), **backend.gradients(batch)}
    return backend, batch, taps, backend.error_scales(batch, taps)


@pytest.mark.parametrize(
    "config",
    [SMALL, ModelConfig(object_big=False, probe_mask=True, amp_activation="relu", n_filters_scale=1)],
    ids=ModelConfig.short_id,
)
def test_every_gradient_tap_gets_a_positive_finite_scale_of_its_shape(config):
    _, batch, taps, scales = _scales(config)
    specs = gradient_tap_specs(config, batch.size)
    for spec in specs:
        s = scales[spec.name]
        assert s.shape == spec.shape == np.shape(taps[spec.name]), spec.name
        assert s.dtype == np.float64 and np.all(np.isfinite(s)) and np.all(s > 0), spec.name
    # the forward taps keep their scales
    assert all(name in scales for name in taps if not name.startswith(GRAD + "."))


def test_scales_are_reproducible_and_need_only_the_batch():
    """The sampled part is seeded, and error_scales runs the passes it needs itself."""
    backend, batch, taps, scales = _scales(SMALL)
    again = backend.error_scales(batch, {n: v for n, v in taps.items() if n.startswith(GRAD + ".")})
    for name, s in again.items():
        np.testing.assert_array_equal(s, scales[name], err_msg=name)


# ---- stage by stage -------------------------------------------------------------------------------


def _sweep(conv: Conv, x: np.ndarray, s_conv: np.ndarray) -> gem._Sweep:
    return gem._Sweep(SimpleNamespace(), {conv.name: np.maximum(x, 0)}, {conv.name: s_conv})  # type: ignore[arg-type]


def test_conv_adjoint_scales_follow_the_cotangent_and_the_input():
    rng = np.random.default_rng(0)
    x = rng.gamma(1.0, 1.0, size=(2, 3, 8, 8))
    conv = Conv("c", rng.uniform(-0.3, 0.3, size=(3, 3, 3, 5)), rng.uniform(-0.05, 0.05, size=5))
    dz = rng.standard_normal((2, 2, 5, 8, 8))
    e2 = (1e3 * np.abs(dz)) ** 2
    sw = _sweep(conv, x, np.ones((2, 5, 8, 8)))
    s_x = np.zeros_like(x)
    dx, e_dx2 = sw.conv(conv, x, s_x, dz, e2)
    k2, b2 = sw.kernel_sq["c"]
    # times 8, not 10: the bias's float32 sum pixel after pixel (_sequential_rounding) then rounds
    # exactly as before, scaled
    dx8, e_dx2_8 = sw.conv(conv, x, s_x, 8 * dz, 64 * e2)
    k2_8, b2_8 = sw.kernel_sq["c"]
    np.testing.assert_allclose(dx8, 8 * dx, rtol=1e-5)
    for big, small in ((e_dx2_8, e_dx2), (k2_8, k2), (b2_8, b2)):
        np.testing.assert_allclose(big, 64 * small, rtol=1e-5)
    # the kernel's scale follows the input it multiplies; the input cotangent's does not
    sw.conv(conv, 4 * x, s_x, dz, e2)
    np.testing.assert_allclose(sw.kernel_sq["c"][0], 16 * k2, rtol=1e-5)
    # a forward error of the input adds to the kernel's scale only
    _, e_dx2_s = sw.conv(conv, x, np.ones_like(x) * 1e6, dz, e2)
    assert np.all(sw.kernel_sq["c"][0] > k2 * 1.01)
    np.testing.assert_allclose(e_dx2_s, e_dx2, rtol=1e-6)


def test_conv_adjoint_scales_keep_errors_far_below_the_largest_of_their_field():
    """A saturated head leaves the cotangents of a few pixels 1e-30 of the rest, and the gradient
    elements those pixels make carry their errors alone. Summed in float32 at the field's peak, their
    squares (1e-60 of it) underflowed: TensorFlow with oneDNN at AVX2 was 1.7 tolerances off such
    elements (tests/parity/test_sweep.py, ELSEWHERE["saturated_avx2"])."""
    rng = np.random.default_rng(2)
    x = np.zeros((1, 2, 8, 8))
    x[0, 0, :, :3] = rng.uniform(1.0, 2.0, size=(8, 3))  # channel 0 feeds the left, channel 1 the right
    x[0, 1, :, 6:] = rng.uniform(1.0, 2.0, size=(8, 2))
    dz = np.full((1, 1, 1, 8, 8), 1e-26)
    dz[..., :4] = 1e10
    e2 = (1e-2 * dz / U) ** 2  # a 1 % error everywhere
    conv = Conv("c", rng.uniform(0.5, 1.0, size=(3, 3, 2, 1)), np.zeros(1))
    sw = _sweep(conv, x, np.zeros((1, 1, 8, 8)))
    _, e_dx2 = sw.conv(conv, x, np.zeros_like(x), dz, e2)
    k2, _ = sw.kernel_sq["c"]
    # Channel 1's kernel gradient sums only tiny cotangents (at most 24 terms of one sign): its scale
    # keeps their 1 % error, at least 1 %/√24 of the sum in quadrature.
    g1 = backward._kernel_vjp(x, dz)[0, :, :, 1, 0]
    assert np.all(U * np.sqrt(k2[0, :, :, 1, 0]) >= 2e-3 * np.abs(g1))
    # The input cotangent at the right edge reads only tiny ones (at most 9 terms of one sign).
    dx = backward._input_vjp(conv.kernel, dz)[0, 0, :, :, 6:]
    assert np.all(U * np.sqrt(e_dx2[0, 0, :, :, 6:]) >= 3e-3 * np.abs(dx))


def test_a_relu_unit_inside_the_noise_band_raises_the_scale_and_one_far_from_the_kink_does_not():
    """Pre-activations z = bias (a zero kernel); S_z = 1e6, so u·S_z ≈ 0.06."""
    shape = (1, 1, 4, 4)
    x = np.ones((1, 1, 4, 4))
    s_z = np.full(shape, 1e6)
    dy = np.ones((2, *shape))
    e_dy2 = np.zeros_like(dy)

    def relu_e2(z: float) -> np.ndarray:
        conv = Conv("c", np.zeros((3, 3, 1, 1)), np.array([z]))
        sw = _sweep(conv, np.full(shape, z), s_z)
        return sw.relu(conv, x, np.full(shape, max(z, 0.0)), dy, e_dy2)[1]

    near_live, near_dead = relu_e2(1e-3 * U * 1e6), relu_e2(-1e-3 * U * 1e6)
    far_live, far_dead = relu_e2(1e4 * U * 1e6), relu_e2(-1e4 * U * 1e6)
    whole = (1.0 / U) ** 2  # the whole cotangent, in u-units, squared
    for near in (near_live, near_dead):
        np.testing.assert_allclose(near, 0.5 * whole, rtol=1e-2)  # a coin flip
    assert np.all(far_live == 0) and np.all(far_dead == 0)
    # and a kernel gradient fed by the band gets a scale of the size of the switched contribution
    conv = Conv("c", np.zeros((3, 3, 1, 1)), np.zeros(1))
    sw = _sweep(conv, x, s_z)
    sw.conv(conv, x, np.zeros_like(x), dy * 0, near_live)
    sw_far = _sweep(conv, x, s_z)
    sw_far.conv(conv, x, np.zeros_like(x), dy * 0, far_live)
    assert np.all(np.sqrt(sw.kernel_sq["c"][0]) * U > 0.5)
    # far from the kink: nothing but the floor of what flushing subnormals may lose (n terms)
    floor = sw_far.summed["c"] * np.finfo(np.float32).tiny
    np.testing.assert_allclose(np.sqrt(sw_far.kernel_sq["c"][0]) * U, floor, rtol=1e-12)


def test_a_max_pool_near_tie_routes_error_to_both_and_a_clear_winner_or_exact_tie_does_not():
    x = np.array([[[[1.0, 1.0 + 1e-9], [0.2, 0.0]]]])
    clear = np.array([[[[1.0, 2.0], [0.2, 0.0]]]])
    s = np.full_like(x, 1e3)
    dy = np.ones((1, 1, 1, 1, 1))
    _, e_tie, _, _ = gem._pool_adjoint(x, s, dy, np.zeros_like(dy))
    _, e_clear, _, _ = gem._pool_adjoint(clear, s, dy, np.zeros_like(dy))
    assert e_tie[0, 0, 0, 0, 0] > 0.1 / U**2 and e_tie[0, 0, 0, 0, 1] > 0.1 / U**2
    assert np.all(e_clear == 0)
    # an exact tie of the first block comes from identical inputs, which float32 computes
    # identically: the tie rule routes it, so a backend routing ties elsewhere stays detectable
    # (tests/test_mutations.py)
    exact = np.array([[[[1.0, 1.0], [0.2, 0.0]]]])
    _, e_exact, tied, _ = gem._pool_adjoint(exact, s, dy, np.zeros_like(dy))
    assert np.all(e_exact == 0) and np.all(tied == 0)
    # deeper, TensorFlow's convolutions break such ties by position: either way, p = ½, at both
    # maxima, and reported apart (the bias of the conv before the pool cannot see it)
    _, e_deep, tied, _ = gem._pool_adjoint(exact, s, dy, np.zeros_like(dy), ties_are_noise=True)
    np.testing.assert_array_equal(e_deep, tied)
    assert e_deep[0, 0, 0, 0, 0] == e_deep[0, 0, 0, 0, 1] == 0.5 / U**2
    assert np.count_nonzero(e_deep) == 2


def test_kernel_and_bias_sums_keep_what_flushing_subnormals_to_zero_loses():
    """TensorFlow's kernels flush subnormal inputs and results to zero (torch keeps them). Where a
    saturated sigmoid head makes the NLL's cotangents 1e-31 to 1e-40 (long sweep on one thread, seed
    20261210), TensorFlow's decoder kernels were 1.8 tolerances off. A float32 sum that drops every
    cotangent and every product below float32's smallest normal number stays within u·S; without the
    flush terms it does not."""
    rng = np.random.default_rng(1)
    tiny = np.finfo(np.float32).tiny
    x = rng.uniform(0.01, 10.0, size=(1, 1, 16, 16))
    dz = rng.choice([-1.0, 1.0], size=(1, 1, 1, 16, 16)) * 10.0 ** rng.uniform(-40, -36, size=(1, 1, 1, 16, 16))
    dz[..., :8, :] = np.abs(dz[..., :8, :])  # half the image one-signed: the losses add up
    conv = Conv("c", np.zeros((3, 3, 1, 1)), np.zeros(1))
    sw = _sweep(conv, x, np.zeros_like(x))
    sw.conv(conv, x, np.zeros_like(x), dz, np.zeros_like(dz))
    k2, b2 = sw.kernel_sq["c"]
    kept = np.where(np.abs(dz) >= tiny, dz, 0.0)  # DAZ: a subnormal cotangent reads as 0
    products = x * kept[0]
    ftz = np.where(np.abs(products) >= tiny, products, 0.0)  # FTZ: a subnormal product is 0
    lost_kernel = abs(float((x * dz[0]).sum() - ftz.sum()))  # the centre tap sums every pixel
    lost_bias = abs(float(dz.sum() - kept.sum()))
    assert lost_kernel > 10 * tiny and lost_bias > 10 * tiny  # real losses, not rounding
    assert lost_kernel <= U * math.sqrt(k2[0, 1, 1, 0, 0])
    assert lost_bias <= U * math.sqrt(b2[0, 0])
    # the flush terms are what covers it: the rest of the scale is far smaller
    rest = (1.0 + math.log2(256)) * float((x * x * dz[0] ** 2).sum())
    assert lost_kernel > 10 * U * math.sqrt(rest)


def test_a_max_pool_may_switch_to_any_unit_within_noise_of_its_maximum_not_only_the_runner_up():
    """Encoder block 1 of a sweep case (long profile, seed 20261208): two units tied exactly at a
    window's maximum and a third 1e-8 below them. torch and TensorFlow both rounded the third above
    the pair and routed dy there, a kernel gradient 1300 u·S off, which a model of the top two
    alone (the tied pair) cannot see."""
    x = np.array([[[[0.9, 1.0 - 1e-9], [1.0, 1.0]]]])  # windows read (0,0), (0,1), (1,0), (1,1)
    s = np.full_like(x, 1e3)
    dy = np.ones((1, 1, 1, 1, 1))
    _, e2, tied, _ = gem._pool_adjoint(x, s, dy, np.zeros_like(dy), ties_are_noise=True)
    e2, tied = e2[0, 0, 0], tied[0, 0, 0]
    assert e2[0, 1] > 0.4 / U**2  # the third unit, 1e-9 below the pair: a coin flip
    assert e2[1, 1] == tied[1, 1] == 0.5 / U**2  # the exact tie, as before
    assert e2[0, 0] == 0  # 0.9: clear of the maximum
    # the top loses dy with its likeliest rival's chance, not the sum of its rivals' (dead units
    # of one window switch together or not at all)
    assert 0.5 / U**2 <= e2[1, 0] < 0.51 / U**2


def test_a_dead_unit_near_the_kink_in_a_window_of_dead_units_may_take_the_whole_pooled_cotangent():
    """Every unit of the window is 0 after the ReLU in the reference; one pre-activation is within
    noise of 0. If float32 rounds it positive it becomes the window's maximum and passes all of dy
    (TensorFlow on one thread did exactly that: a kernel gradient 971 off). The runner-up of a
    window whose top unit is within noise of 0 may take the route too, weighed by that chance; a
    dead unit in a window with a clear positive maximum can not."""
    conv = Conv("c", np.zeros((3, 3, 1, 1)), np.zeros(1))
    conv.kernel[1, 1, 0, 0] = 1.0  # z = the input itself
    near, far = -1e-3 * U * 1e6, -1e4 * U * 1e6  # u·S_z ≈ 0.06: a coin flip, and never
    s_z = np.full((1, 1, 2, 2), 1e6)
    dy = np.ones((1, 1, 1, 1, 1))

    def pooled_relu(z: np.ndarray) -> np.ndarray:
        y = np.maximum(z, 0.0)
        d, e2, _, reach = gem._pool_adjoint(y, s_z, dy, np.zeros_like(dy))
        return _sweep(conv, z, s_z).relu(conv, z, y, d, e2, reach)[1][0, 0, 0]

    dead = pooled_relu(np.array([[[[far, far], [near, far]]]]))
    np.testing.assert_allclose(dead[1, 0], 0.5 / U**2, rtol=1e-2)  # not the routed unit (0, 0)
    assert dead[0, 0] == dead[0, 1] == dead[1, 1] == 0
    behind_a_winner = pooled_relu(np.array([[[[1e3, far], [near, far]]]]))
    assert behind_a_winner[1, 0] == 0
    # the top unit itself within noise of 0: it may drop out, and the near unit take its place
    tiny_top = pooled_relu(np.array([[[[-near, far], [near, far]]]]))
    np.testing.assert_allclose(tiny_top[1, 0], 0.25 / U**2, rtol=2e-2)
    assert tiny_top[0, 1] == tiny_top[1, 1] == 0


def _loss_model(A: np.ndarray) -> tuple[Any, dict, dict]:
    """A stand-in model for the loss stage: a unit object under a unit probe, whose heads carry only
    their rounding."""
    from backends.reference.ops import pi_tanh, sigmoid

    heads = {
        h: SimpleNamespace(name=h, centre=object(), border=None, activation=f)
        for h, f in (("amp", sigmoid), ("phase", pi_tanh))
    }
    N = A.shape[-1]
    model = SimpleNamespace(log_scale=0.0, N=N, M=N, heads=heads, object_big=False, illumination_mask=None)
    patches = np.ones((1, 1, N, N), dtype=complex)
    amp, phase = np.ones((1, 1, N, N)), np.zeros((1, 1, N, N))
    taps = {
        "output.amplitude": A,
        "output.intensity": A**2,
        "object.patches": patches,
        "input.offsets": np.zeros((1, 1, 1, 2)),
        "input.probe": np.ones((1, 1, N, N), dtype=complex),
        "physics.illuminated": patches,
        "physics.diffraction": A,
        "amp.head.padded": amp,
        "phase.head.padded": phase,
    }
    return model, taps, {"object.patches": np.abs(patches), "amp.head.padded": 3 * amp, "phase.head.padded": phase}


def test_the_amplitude_noise_weighs_the_carried_error_by_the_probe_that_lights_it():
    """The network's error reaches the spectrum through ψ = P·O: the same carried error on the
    quarter of the patch the probe lights raises the amplitude noise about 150 times more than on a
    quarter it leaves dark (the object's unweighted relative error is the same for both)."""
    N = 8
    model, taps, S = _loss_model(np.full((1, 1, N, N), 10.0))
    probe = np.full((1, 1, N, N), 1e-3, dtype=complex)
    probe[..., : N // 2, : N // 2] = 1.0
    taps = {**taps, "input.probe": probe, "physics.illuminated": probe * taps["object.patches"]}

    def noise(rows: slice, cols: slice) -> float:
        carried = np.zeros((1, 1, N, N))
        carried[..., rows, cols] = 100.0
        s = {**S, "amp.head.padded": S["amp.head.padded"] + carried}
        return float(np.mean(gem._amplitude_noise(model, taps, s)))

    lit, dark = noise(slice(0, N // 2), slice(0, N // 2)), noise(slice(N // 2, N), slice(N // 2, N))
    assert lit > 20 * dark, (lit, dark)


def test_the_poisson_nll_ill_conditioning_raises_the_scale_where_the_prediction_is_dark():
    N = 8
    x = np.full((1, 1, N, N), 10.0)
    A = np.full_like(x, 10.0)
    A[0, 0, 2, 3] = 1e-4  # predicted dark where the data is bright
    model, taps, S = _loss_model(A)
    ill = gem._loss_stage(model, taps, S, x)[2]
    dark, lit = ill[0, 0, 2, 3], ill[0, 0, 5, 5]
    assert dark > 1e6 * lit
    # and it follows x²/A: a darker prediction is worse
    A2 = A.copy()
    A2[0, 0, 2, 3] = 1e-5
    model, taps, S = _loss_model(A2)
    ill2 = gem._loss_stage(model, taps, S, x)[2]
    assert ill2[0, 0, 2, 3] > 50 * dark
    # a prediction lost in its own noise saturates: the error is the whole term, not more
    x4 = np.full_like(x, 1e4)
    A3 = x4.copy()
    A3[0, 0, 2, 3] = 2e-6  # I = 4e-12, just above the clamp; u·S_A ≈ 2e-3
    model, taps, S = _loss_model(A3)
    _, _, ill3, rho3, *_ = gem._loss_stage(model, taps, S, x4)
    assert rho3[0, 0, 2, 3] > 0.99
    whole = 2 * 1e8 / 2e-6 / (N * N)  # e^ls·2x²/(A·K)
    assert ill3[0, 0, 2, 3] == pytest.approx(whole * rho3[0, 0, 2, 3], rel=1e-9) and ill3[0, 0, 2, 3] <= whole
    # where the clamp max(I, 1e-12) holds, the reference's gradient is the constant 1/K: nothing
    # ill-conditioned, but float32's noise (u·S_A ≈ 2e-3 here) can lift the pixel above the clamp,
    # where it holds −x²/A₃₂ for any A₃₂ down to √1e-12: that bound, and only there
    A3[0, 0, 2, 3] = 1e-9
    model, taps, S = _loss_model(A3)
    stage = gem._loss_stage(model, taps, S, x4)
    assert stage[2][0, 0, 2, 3] == 0.0
    lifted = stage[8]
    assert lifted[0, 0, 2, 3] == pytest.approx(2 * 1e8 / 1e-6 / (N * N), rel=1e-12)
    assert np.count_nonzero(lifted) == 1
    # a field whose noise cannot reach √1e-12 keeps the clamp in float32 too
    faint = np.full_like(x, 1e-9)
    model, taps, S = _loss_model(faint)
    assert not np.any(gem._loss_stage(model, taps, S, x4)[8])


def test_the_sampled_dark_pixel_error_reaches_the_gradients_of_both_losses(monkeypatch):
    """On a random batch the dark pixels matter: without their sampled error (the NLL's
    ill-conditioning, the MAE's sign switches, both losses' spectrum phase) every scale drops or
    stays, and the NLL's somewhere by more than 2x."""
    _, _, _, with_dark = _scales(SMALL)
    monkeypatch.setattr(gem, "_sampled", lambda *args: [{}, {}])
    _, _, _, without = _scales(SMALL)
    nll = [n for n in with_dark if n.startswith(f"{GRAD}.poisson_nll.")]
    assert all(np.all(with_dark[n] >= without[n]) for n in with_dark if n.startswith(f"{GRAD}."))
    assert max(float(np.max(with_dark[n] / without[n])) for n in nll) > 2.0


def _sampling_inputs() -> tuple[Any, dict, np.ndarray, np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    backend, batch, taps, _ = _scales(SMALL)
    N = SMALL.N
    rng = np.random.default_rng(7)
    shape = taps["physics.diffraction"].shape
    parts = [(rng.uniform(0, 1e-9, shape), rng.uniform(0, 1e-9, shape)) for _ in range(2)]
    probe = batch.probe.astype(np.complex128).reshape(1, 1, N, N)
    return backend.model, taps, batch.offsets.astype(np.float64), probe, parts


def test_realisations_carried_in_float32_agree_with_float64():
    """The network's adjoints carry the sampled realisations in float32: against the same
    realisations in float64, every gradient is within 1e-3 of its largest value, far inside the
    sampling noise of four realisations (tens of percent)."""
    model, taps, offsets, probe, parts = _sampling_inputs()
    rng = np.random.default_rng(8)
    shape = (2 * gem.MC_SAMPLES, *parts[0][0].shape)
    perturbation = rng.standard_normal(shape) + 1j * rng.standard_normal(shape)
    g64, dx64, dls64 = gem._carried(model, taps, offsets, probe, perturbation)
    g32, dx32, dls32 = gem._carried(model, taps, offsets, probe, perturbation, dtype=np.float32)
    assert g32 and all(k.dtype == np.float32 for k, _ in g32.values())
    pairs = [(g32[n][i], g64[n][i]) for n in g64 for i in (0, 1)] + [(dx32, dx64), (dls32, dls64)]
    for got, want in pairs:
        assert np.max(np.abs(got - want)) <= 1e-3 * np.max(np.abs(want))


def test_sampled_scales_follow_the_error_exactly_whatever_its_size():
    """Errors 2^-120 times smaller (far below float32's smallest normal number once carried) give
    scales exactly 2^-240 times smaller: the realisations are carried at unit size, the scale
    put back after."""
    model, taps, offsets, probe, parts = _sampling_inputs()
    tiny = [(real * 2.0**-120, imag * 2.0**-120) for real, imag in parts]
    for normal, small in zip(
        gem._sampled(model, taps, offsets, probe, parts), gem._sampled(model, taps, offsets, probe, tiny), strict=True
    ):
        assert normal.keys() == small.keys()
        for name in normal:
            assert np.any(normal[name] > 0), name
            assert np.array_equal(small[name], normal[name] * 2.0**-240), name


# ---- against real float32 gradients --------------------------------------------------------------

FIXTURE_CONFIGS = [ModelConfig(), ModelConfig(gridsize=1, object_big=False, amp_activation="relu")]


def _torch_gradients(config: ModelConfig, weights: dict, batch: CanonicalBatch) -> dict:
    from parity.plugin import import_framework

    import_framework("torch")
    from backends.torch import TorchBackend

    return TorchBackend(config, weights).gradients(batch)


def _torch_forward(config: ModelConfig, weights: dict, batch: CanonicalBatch) -> dict:
    from parity.plugin import import_framework

    import_framework("torch")
    from backends.torch import TorchBackend

    return TorchBackend(config, weights).forward(batch)


def _fixture_batch(config: ModelConfig) -> CanonicalBatch:
    from parity.fixture import iter_batches, load_fixture
    from parity.session import resolve_fixture

    return next(iter_batches(load_fixture(resolve_fixture(None, config), config), config, 2, 2))


def _over(tol, name: str, got: np.ndarray, want: np.ndarray, s: np.ndarray) -> float:
    """Largest |got − want| over its tolerance (> 1 fails)."""
    bound = tol.atol(name, s) + tol.rtol() * np.abs(want)
    return float(np.max(np.abs(got - want) / bound))


@pytest.mark.parametrize("config", FIXTURE_CONFIGS, ids=ModelConfig.short_id)
def test_float32_gradients_pass_and_planted_errors_do_not(config):
    """torch's float32 gradients of the bundled fixture pass every gradient tap; an error of the
    size of a tap's largest element (a dropped or doubled term), planted there, fails every tap but
    at most one per loss (measured: the NLL's amp.head.border.conv0.kernel at the default config,
    whose scale there exceeds its largest value); one of 5 % fails at least 15 % of the taps
    (measured at the default config: 42 of 46 for the NLL, 9 of 46 for the MAE)."""
    weights = generate_weights(config)
    ref = ReferenceBackend(config, weights)
    batch = _fixture_batch(config)
    want = ref.gradients(batch)
    scales = ref.error_scales(batch, {**ref.forward(batch), **want})
    got = _torch_gradients(config, weights, batch)
    tol = load_tolerances()
    worst = {n: _over(tol, n, np.asarray(got[n], np.float64), want[n], scales[n]) for n in want}
    assert max(worst.values()) <= 1.0, sorted(worst.items(), key=lambda kv: -kv[1])[:5]
    for loss in ("poisson_nll", "mae"):
        names = [n for n in want if n.startswith(f"{GRAD}.{loss}.")]
        missed: dict[float, list[str]] = {}
        for plant in (1.0, 0.05):
            missed[plant] = []
            for name in names:
                value = np.asarray(want[name], dtype=np.float64)
                planted = np.array(value, copy=True)
                i = np.unravel_index(np.argmax(np.abs(planted)), planted.shape) if planted.ndim else ()
                planted[i] += plant * abs(planted[i])
                if _over(tol, name, planted, value, scales[name]) <= 1.0:
                    missed[plant].append(name)
        assert len(missed[1.0]) <= 1, (loss, missed[1.0])
        assert len(missed[0.05]) <= 0.85 * len(names), (loss, missed[0.05])


def test_the_scale_follows_the_error_across_weight_scales():
    """From weights scaled by 0.5 to 2 the gradients grow (measured: 1.8 decades, median over taps);
    the factor a float32 backend needs (its error over u·S) grows far less, and both runs pass
    (measured 3.6 -> 3.2; 7.4 -> 9.6 before the amplitude noise was weighed by the probe, and
    4.8 -> 72 before it followed the error the network carries into the object, docs/tolerances.md)."""
    config = SMALL
    needs, sizes = [], []
    tol = load_tolerances()
    for f in (0.5, 2.0):
        w = {
            k: (v * np.float32(f)).astype(np.float32) if k.endswith(".kernel") else v
            for k, v in generate_weights(config, 2).items()
        }
        ref = ReferenceBackend(config, w)
        batch = random_batch(config, 2, 2)
        want = ref.gradients(batch)
        scales = ref.error_scales(batch, {**ref.forward(batch), **want})
        got = _torch_gradients(config, w, batch)
        needs.append(
            max(float(np.max(np.abs(np.asarray(got[n], np.float64) - want[n]) / (U * scales[n]))) for n in want)
        )
        sizes.append(np.array([float(np.max(np.abs(want[n]))) for n in want]))
        assert all(_over(tol, n, np.asarray(got[n], np.float64), want[n], scales[n]) <= 1.0 for n in want)
    change = float(np.median(np.abs(np.log10(sizes[1] / sizes[0]))))
    assert change > 1.0, change  # the gradients moved by more than a decade (median over taps)
    # a scale that ignored the magnitudes would need the whole change; this one needs less
    assert abs(math.log10(needs[1] / needs[0])) < change, (needs, change)


def test_the_amplitude_noise_holds_torch_s_amplitude_where_the_probe_lights_the_worst_predicted_object():
    """The NLL's conditioning multiplies the float32 amplitude's RMS error (``_amplitude_noise``),
    so it must hold the real one. Draw [20261206, 50] of the sweep (a wide net, a disk-masked probe)
    lights the part of the object the network predicts worst: the object's relative error over the
    whole patch was 14 u, the lit field's 184 u (measured), and torch's amplitude was 165 u of its
    norm off (521 u under oneDNN's AVX2 kernels) where the unweighted model allowed 118, a false alarm
    on the NLL's kernel gradients at AVX2. Per patch, the error must be within the model's RMS."""
    from parity.fixture import iter_batches
    from parity.simulate import simulate
    from parity.sweep import random_case

    case = random_case(np.random.default_rng([20261206, 50]))
    weights = case.weights()
    ref = ReferenceBackend(case.config, weights)
    batch = next(iter(iter_batches(simulate(case.data), case.config, case.batch_size, case.groups)))
    taps = ref.forward(batch)
    noise = gem._amplitude_noise(ref.model, taps, ref.error_scales(batch, taps))
    got = _torch_forward(case.config, weights, batch)["output.amplitude"]
    error = np.asarray(got, np.float64) - taps["output.amplitude"]
    actual = np.sqrt(np.sum(error**2, axis=(-2, -1)))
    allowed = U * np.sqrt(np.sum(noise**2, axis=(-2, -1)))
    assert np.all(actual <= allowed), (actual / allowed).ravel()


@pytest.mark.parametrize("dx, dy", [(0.99945718, 0.24765833), (-0.9993, 0.9991), (0.3, 0.99961)])
def test_translate_adjoint_covers_float32_coordinates_beside_the_edge(dx, dy):
    """The adjoint of a translation whose samples sit between an edge pixel and the zero beyond it:
    the edge pixel's cotangent takes that sample's with a weight of 5e-4 or so, and float32's
    coordinate moves the weight by its rounding, that is the sample's whole cotangent per pixel.
    E (carried on a ring one pixel wider than the image) covers the adjoint of the translation with
    float32 coordinates, built column by column from ``physics.translate``."""
    from backends.reference import backward as bw
    from backends.reference import error_model as em
    from backends.reference import physics

    rng = np.random.default_rng(11)
    H = W = 24
    g = 1.0 + rng.normal(size=(H, W)) + 1j * rng.normal(size=(H, W))  # no zero edge
    d = np.array([dx, dy], dtype=np.float32).astype(np.float64)
    exact = bw.translate_vjp(g, d)
    coarse = np.zeros((H, W), dtype=complex)
    for k in range(H * W):  # input pixel k's cotangent: what it contributes to each output, times g
        basis = np.zeros(H * W)
        basis[k] = 1.0
        coarse.flat[k] = np.sum(physics.translate(basis.reshape(H, W), d, np.float32) * g)
    _, e2 = gem._translate_adjoint(g, np.zeros((H, W)), d, em._extent((H, W), d))
    ratio = float(np.max(np.abs(coarse - exact) / (U * np.sqrt(e2))))
    assert 0.01 < ratio < 2.0, ratio


def test_float32_sampling_coordinates_move_log_scale_within_the_coordinate_term(monkeypatch):
    """A float32 backend rounds each patch's sampling coordinate j − d to float32, which moves the
    whole patch at once; in log_scale's output part (a sum over every pixel) that does not average
    out. Run the reference with float32 coordinates and everything else float64: the change in
    ∂loss/∂log_scale's output part is within u·S of the coordinate term, and not far inside it."""
    from backends.reference import backward as bw
    from backends.reference import physics

    config = ModelConfig(n_filters_scale=1)
    backend = ReferenceBackend(config, generate_weights(config, 0))
    batch = random_batch(config, 2, 0)
    offsets = batch.offsets.astype(np.float64)
    probe = batch.probe.astype(np.complex128).reshape(1, 1, config.N, config.N)
    x = batch.x.astype(np.float64)

    def output_part(taps: dict) -> np.ndarray:
        A = taps["output.amplitude"]
        d_amp, d_int, _ = bw.losses_vjp(A, taps["output.intensity"], x)
        return bw.outputs_vjp(A, float(backend.model.log_scale), d_amp, d_int)[1]

    exact = backend.forward(batch)
    moves = gem._coordinate_moves(backend.model, exact, offsets, probe)
    bound = U * np.sqrt(gem._coordinate_rounding(backend.model, exact, moves, x))
    original = physics.translate
    monkeypatch.setattr(physics, "translate", lambda im, off, *_: original(im, off, np.float32))
    moved = np.abs(output_part(backend.forward(batch)) - output_part(exact)) / bound
    assert np.all(moved <= 1.0), moved
    assert np.all(moved > 0.02), moved


def test_float32_sampling_coordinates_move_every_gradient_within_the_model(monkeypatch):
    """Where a merged patch's shift lies just past an integer (3.0006 here), the rim of its coverage is
    a small fraction of a pixel, the merge divides by it, and a float32 coordinate moves the canvas by
    3e-4 of its largest value and a spectrum pixel by 0.7 %. Both frameworks made that same error: the
    NLL's gradient at x (−2x·log I/K) was 19 tolerances off (the long sweep on one thread, seed
    20261209). The reference run with float32 coordinates, everything else float64, is that error
    alone: every gradient stays within a few u·S of the model (x within one), and without the
    coordinates' moves x is thousands of u·S off. With the moves taken as slopes over 1e-3 pixel
    instead of over the rounding's own size, x was 10 u·S off."""
    from backends.reference import physics
    from parity.fixture import iter_batches
    from parity.simulate import SimulationParams, simulate
    from parity.sweep import Case

    config = ModelConfig(
        gridsize=2, n_filters_scale=1, amp_activation="sigmoid", probe_big=False, pad_object=False,
        probe_scale=16.7721262701296, nphotons=418166543888.2194, offset=0, max_position_jitter=0,
    )  # fmt: skip
    data = SimulationParams(
        kind="grf", N=64, gridsize=2, seed=20231104, scan_shape=(4, 4), step=5.319720505239957,
        jitter=0.4865746141025863, nphotons=552584233373.058, probe_phase=0.5938661033604729,
    )  # fmt: skip
    case = Case(config=config, data=data, weights_seed=1870, weight_scale=0.5, batch_size=3, groups=3)
    batch = next(iter(iter_batches(simulate(data), config, case.batch_size, case.groups)))
    backend = ReferenceBackend(config, case.weights())
    exact = {**backend.forward(batch), **backend.gradients(batch)}

    def off_by(scales: dict) -> dict[str, float]:
        return {
            name: float(np.max(np.abs(np.asarray(moved[name]) - exact[name]) / (U * scales[name]))) for name in moved
        }

    scales = backend.error_scales(batch, exact)
    original = physics.translate
    with monkeypatch.context() as m:
        m.setattr(physics, "translate", lambda im, off, *_: original(im, off, np.float32))
        moved = backend.gradients(batch)
    within = off_by(scales)
    assert max(within.values()) < 4.0, max(within.items(), key=lambda kv: kv[1])
    assert within[f"{GRAD}.poisson_nll.input.x"] < 1.0, within[f"{GRAD}.poisson_nll.input.x"]
    monkeypatch.setattr(gem, "_coordinate_moves", lambda *_: [])
    assert off_by(backend.error_scales(batch, exact))[f"{GRAD}.poisson_nll.input.x"] > 100.0


@pytest.mark.parametrize("name", ["sigmoid", "pi_tanh"])
def test_a_saturated_activation_s_derivative_from_its_rounded_output_is_within_the_model(name):
    """torch and TensorFlow form σ' = y(1 − y) and tanh' = 1 − t² from the float32 output. Where the
    activation saturates, that derivative keeps an absolute error of about u while going to 0 itself,
    so its relative error grows without bound (weights ×2.8: 3 % of a phase kernel's gradient). The
    model's term bounds it, is not loose where it matters, and without it the derivative's usual
    relative error (two roundings) misses by orders of magnitude."""
    from backends.reference.ops import pi_tanh, sigmoid

    activation = {"sigmoid": sigmoid, "pi_tanh": pi_tanh}[name]
    z32 = np.linspace(-14.0, 14.0, 20001, dtype=np.float32)
    z = z32.astype(np.float64)
    exact, _ = gem._derivatives(activation, z)
    if name == "sigmoid":
        y = (1.0 / (1.0 + np.exp(-z32))).astype(np.float32)
        float32 = y * (np.float32(1.0) - y)
    else:
        t = np.tanh(z32)
        float32 = np.float32(np.pi) * (np.float32(1.0) - t * t)
    err = np.abs(float32.astype(np.float64) - exact) / U  # in u-units, as the model's terms
    relative = 2.0 * exact  # two roundings of f' itself, what the model had before
    model = gem._derivative_from_output(activation, z) + relative
    assert np.all(err <= model), float(np.max(err / model))
    assert np.max(err / model) > 0.5
    assert np.max(err / relative) > 1e4


@pytest.mark.parametrize("name", ["sigmoid", "pi_tanh"])
def test_every_output_the_frameworks_round_to_one_is_inside_the_saturation_masks(name):
    """Where a framework's float32 sigmoid or tanh returns exactly ±1, the derivative it forms from
    that output is exactly 0 and the cotangent is lost whole: the model carries that loss for the
    pixels within the widest threshold of 1. TensorFlow's tanh returns 1 from |z| = 7.905 on, where
    1 − tanh is still 4.6u: a threshold of one or two u would miss it."""
    import tensorflow as tf
    import torch

    from backends.reference.ops import pi_tanh, sigmoid

    activation = {"sigmoid": sigmoid, "pi_tanh": pi_tanh}[name]
    z32 = np.linspace(0.0, 20.0, 40001, dtype=np.float32)
    outputs = {
        "torch": (torch.sigmoid if name == "sigmoid" else torch.tanh)(torch.from_numpy(z32)).numpy(),
        "tensorflow": (tf.math.sigmoid if name == "sigmoid" else tf.math.tanh)(z32).numpy(),
    }
    gap = gem._saturation_gap(activation, z32.astype(np.float64))
    widest = max(gem._SATURATION_THRESHOLDS) * U
    for framework, y in outputs.items():
        rounded = y == 1.0
        assert rounded.any(), framework
        assert np.all(gap[rounded] <= widest), (framework, float(gap[rounded].max() / U))
    # and the masks are not loose: far from saturation nothing is lost whole
    assert not np.any(gap[z32 < 7.0] <= widest)


def test_nothing_is_carried_for_saturation_where_no_head_saturates():
    """The saturation term costs a backward pass through the network; at the default weights no
    head saturates and it is skipped."""
    backend, _, taps, _ = _scales(SMALL)
    model = backend.model
    cot = {h: np.ones((2, *taps[gem._final_tap(head)].shape)) for h, head in model.heads.items()}
    assert gem._saturated_outputs(model, taps, cot) is None


def test_a_moved_pre_activation_is_what_the_forward_and_the_backward_both_see():
    """The secant term recomputes the gradients with head pre-activations moved: a move of 0 gives
    the reference's gradients bit for bit, and a uniform move of one output channel gives exactly
    those of a model whose bias is larger by as much (both passes see the move)."""
    backend, batch, _, _ = _scales(SMALL)
    model = backend.model
    x, offsets = batch.x.astype(np.float64), batch.offsets.astype(np.float64)
    probe = batch.probe.astype(np.complex128).reshape(1, 1, SMALL.N, SMALL.N)
    want = backward.gradients(model, x, offsets, probe)
    head = model.heads["phase"]
    conv = head.centre if head.centre is not None else head.full_out
    z = np.zeros((batch.size, conv.out_channels, SMALL.N // 2, SMALL.N // 2))
    still = copy.copy(model)
    still.heads = {**model.heads, "phase": gem._moved_head(head, {conv.name: z}, 1.0)}
    for name, value in backward.gradients(still, x, offsets, probe).items():
        np.testing.assert_array_equal(value, want[name], err_msg=name)
    move = np.zeros_like(z)
    move[:, 0] = 0.25
    moved = copy.copy(model)
    moved.heads = {**model.heads, "phase": gem._moved_head(head, {conv.name: move}, 1.0)}
    bias = np.array(conv.bias, copy=True)
    bias[0] += 0.25
    biased = copy.copy(model)
    biased.heads = {**model.heads, "phase": replace(head, centre=Conv(conv.name, conv.kernel, bias))}
    got, expected = backward.gradients(moved, x, offsets, probe), backward.gradients(biased, x, offsets, probe)
    assert not np.allclose(got[f"{GRAD}.poisson_nll.{conv.name}.bias"], want[f"{GRAD}.poisson_nll.{conv.name}.bias"])
    for name, value in got.items():
        scale = np.abs(expected[name]).max()
        np.testing.assert_allclose(value, expected[name], rtol=1e-10, atol=1e-12 * scale, err_msg=name)


def test_nothing_is_recomputed_where_every_head_is_first_order(monkeypatch):
    """The secant term costs two more float64 gradient passes; at the default weights every head's
    pre-activation error is far inside its activation's linear range and the term is skipped."""
    seen: list[tuple[dict, object]] = []
    original = gem._nonlinear_heads

    def spy(model, taps, smooth, offsets, probe, gradients=None):
        out = original(model, taps, smooth, offsets, probe, gradients)
        seen.append((dict(smooth), out))
        return out

    monkeypatch.setattr(gem, "_nonlinear_heads", spy)
    _scales(SMALL)
    assert seen and all(out is None for _, out in seen)
    assert {"amp.head.centre", "phase.head.centre"} <= set(seen[0][0])


def test_a_float32_sum_of_terms_of_one_sign_is_within_the_kernel_tolerance():
    """A kernel gradient sums B·H·W products; where they share a sign the partial sums approach the
    total and a sequential float32 sum rounds at that size (measured in torch: an amplitude head's
    kernel gradient 100u of itself off). Over 20 seeded sums of 4096 positive terms, summed in
    float32 in order (np.cumsum), every error is within the kernel tolerance with the rounding at the
    total's magnitude, and without it (the terms' own magnitudes alone) some are not."""
    tol = load_tolerances()
    name = f"{GRAD}.poisson_nll.amp.head.full.out.kernel"
    n = 4096
    within, beyond = [], []
    for seed in range(20):
        rng = np.random.default_rng(seed)
        terms = rng.uniform(0.0, 1.0, n) * rng.uniform(0.5, 1.5, n)
        exact = np.array([terms.sum()])
        summed = np.cumsum(terms.astype(np.float32), dtype=np.float32)[-1:]
        own = np.array([math.sqrt((1.0 + math.log2(n)) * np.sum(terms**2))])
        full = np.hypot(own, gem._reduction_rounding(exact, n))
        within.append(_over(tol, name, summed.astype(np.float64), exact, full))
        beyond.append(_over(tol, name, summed.astype(np.float64), exact, own))
    assert max(within) <= 0.1, within
    assert max(beyond) > 1.0, beyond


def test_a_coordinate_at_a_whole_pixel_moves_the_spectrum_by_either_one_sided_move():
    """At a whole pixel the translation has a kink: a coordinate rounded one way moves each sample
    into one cell, the other way into the other, and the two moves need not cancel. A normalised
    grid rounds a zero shift either way (tests/test_equivalent_implementations.py). The central
    difference kept only the odd part of the two; the move the model carries covers either side."""
    from backends.reference import error_model as em
    from backends.reference import physics

    config = ModelConfig(gridsize=1)
    backend = ReferenceBackend(config, generate_weights(config, 0))
    batch = random_batch(config, 2, 0)
    offsets = batch.offsets.astype(np.float64)
    assert np.all(offsets == 0)  # gridsize 1: every coordinate at a whole pixel
    probe = batch.probe.astype(np.complex128).reshape(1, 1, config.N, config.N)
    taps = backend.forward(batch)
    moves = gem._coordinate_moves(backend.model, taps, offsets, probe)

    def spectrum(d: np.ndarray) -> np.ndarray:
        canvas = taps["object.canvas"]
        field = physics.illuminate(physics.reextract(canvas, d, config.N), probe, backend.model.illumination_mask)
        return np.abs(np.fft.fftshift(np.fft.fft2(field, axes=(-2, -1)), axes=(-2, -1)) / config.N)

    step = np.zeros_like(offsets)
    step[..., 0] = U * em._extent((backend.model.M,) * 2, offsets)  # the re-extraction's x: moves[0]
    base = spectrum(offsets)
    for side in (1.0, -1.0):
        one_sided = np.abs(spectrum(offsets + side * step) - base) / U
        assert np.all(np.abs(moves[0].amplitude) >= one_sided * (1 - 1e-9)), side


@pytest.mark.parametrize("probe_big", [True, False])
def test_a_normalised_grids_own_coordinates_move_log_scale_within_the_coordinate_term(probe_big, monkeypatch):
    """At gridsize 1 every shift is zero: a coordinate rounded once keeps it exact, a normalised grid
    rounds each column's and row's coordinate on its own. The merge and the re-extraction sampled at
    such a grid's float32 coordinates (values in float64, so only the coordinates' error is left)
    move log_scale's output terms, Σ ∂loss/∂A·A per group, by less than the coordinate term of its
    error scale (``_coordinate_rounding``, u units). Moves of whole patches alone allowed a fourth to
    a twentieth of what the aligned grid did: the known false alarm before ``_line_moves``."""
    from backends.reference import physics

    config = ModelConfig(gridsize=1, probe_big=probe_big)
    backend = ReferenceBackend(config, generate_weights(config, 0))
    model, batch = backend.model, random_batch(config, 2, 0)
    offsets = batch.offsets.astype(np.float64)
    probe = batch.probe.astype(np.complex128).reshape(1, 1, config.N, config.N)
    taps = backend.forward(batch)
    x = np.asarray(taps["input.x"], dtype=np.float64)
    allowed = np.sqrt(gem._coordinate_rounding(model, taps, gem._coordinate_moves(model, taps, offsets, probe), x))
    monkeypatch.setattr(gem, "_line_moves", lambda *args: iter(()))
    whole = np.sqrt(gem._coordinate_rounding(model, taps, gem._coordinate_moves(model, taps, offsets, probe), x))

    A = taps["output.amplitude"]
    per_amplitude = np.stack([4.0 * A, np.sign(A - x)]) * (math.exp(float(model.log_scale)) / x[0].size)
    for kind in ("aligned grid", "grid"):
        canvas = coords.merged(taps["object.patches"], offsets, model.M, kind)
        patch = physics.crop_centre(coords.translate_on_a_grid(canvas, offsets, kind == "aligned grid"), config.N)
        field = physics.illuminate(patch, probe, model.illumination_mask)
        amplitude = np.abs(np.fft.fftshift(np.fft.fft2(field, axes=(-2, -1)), axes=(-2, -1)) / config.N)
        moved = np.sum(per_amplitude * (amplitude - taps["physics.diffraction"]), axis=(-3, -2, -1)) / U
        actual = np.sqrt(np.sum(moved**2, axis=1))  # per loss, the groups' in quadrature as the model's
        assert np.all(actual < allowed), (kind, actual, allowed)
        if kind == "aligned grid":
            assert np.any(actual > 3.0 * whole), (actual, whole)


def _scaled_weights(config: ModelConfig, factor: float, seed: int = 0) -> dict:
    w = generate_weights(config, seed)
    return {k: (v * np.float32(factor)).astype(np.float32) if k.endswith(".kernel") else v for k, v in w.items()}


def _preactivation_errors(backend: ReferenceBackend, batch: CanonicalBatch, taps: dict, monkeypatch) -> dict:
    """The pre-activation errors the sweep recorded for carrying (``_Sweep.preactivation_errors``)."""
    seen: list[dict] = []
    original = gem._preactivation_realisations

    def spy(model, taps, errors):
        seen.append(dict(errors))
        return original(model, taps, errors)

    monkeypatch.setattr(gem, "_preactivation_realisations", spy)
    backend.error_scales(batch, taps)
    assert len(seen) == 1
    return seen[0]


def test_no_pre_activation_error_is_carried_at_initialised_weights(monkeypatch):
    """The realisations cost a pass through the network's adjoints; at the weights as initialised a
    head's pre-activation error is far below its cotangent's rounding and nothing is carried. Kernels
    three times larger make a head's pre-activations cancellations of large terms, and it is (ten
    times larger saturate every pixel, and nothing arrives to carry)."""
    backend, batch, taps, _ = _scales(SMALL)
    assert _preactivation_errors(backend, batch, taps, monkeypatch) == {}
    big = ReferenceBackend(SMALL, _scaled_weights(SMALL, 3.0))
    big_taps = {**big.forward(batch), **big.gradients(batch)}
    errors = _preactivation_errors(big, batch, big_taps, monkeypatch)
    assert errors and set(errors) <= {
        "amp.head.centre",
        "phase.head.centre",
        "amp.head.border.out",
        "phase.head.border.out",
    }


def test_a_pre_activation_error_reaches_every_later_gradient_through_the_adjoints_it_shares():
    """One pixel's z error reaches a bias through every path at once, with the kernels' signs: each
    realisation is a multiple of that pixel's error carried exactly, so every bias and log_scale get
    the same multiple of its square (the squared adjoints would weigh each path alone)."""
    backend, _, taps, _ = _scales(SMALL)
    model = backend.model
    conv = model.heads["phase"].centre
    assert conv is not None
    features = taps[f"phase.decoder.block{len(model.heads['phase'].decoder) - 1}.up"]
    error = np.zeros((2, *conv(features[:, :-4]).shape))
    error[:, 1, 0, 5, 7] = [3.0, 5.0]  # u-units, one pixel, both losses
    got = gem._preactivation_realisations(model, taps, {conv.name: error})
    assert got is not None
    grads, _, dls = gem._carried_from_preactivations(model, taps, {conv.name: error * U}, np.float64)
    for s in range(2):
        exact = {f"{name}.bias": db[s] / U for name, (_, db) in grads.items()} | {"log_scale": dls[s] / U}
        ratios = np.concatenate(
            [(got[s][name] / exact[name] ** 2).ravel() for name in exact if np.all(exact[name] != 0)]
        )
        assert len(ratios) > 10
        np.testing.assert_allclose(ratios, ratios[0], rtol=1e-4)
        assert 0.01 < ratios[0] < 100  # a mean of squared standard normals


def test_a_cotangent_at_a_head_s_pre_activation_is_carried_as_the_reference_s_adjoints_carry_it():
    """A cotangent dz at the centre conv's pre-activation is the reference's own adjoint of dy = dz/f'(z)
    at the head's output there: every parameter's gradient and x's agree with backward's head adjoint."""
    backend, _, taps, _ = _scales(SMALL)
    model = backend.model
    head = model.heads["phase"]
    assert head.centre is not None
    features = taps[f"phase.decoder.block{len(head.decoder) - 1}.up"]
    z = head.centre(features[:, :-4])
    dz = np.zeros((2, *z.shape))
    dz[:, 1, 0, 5, 7] = [3.0, -5.0]
    quarter = SMALL.N // 4
    dy = np.zeros((2, *taps[gem._final_tap(head)].shape))
    dy[:, 1, 0, 5 + quarter, 7 + quarter] = dz[:, 1, 0, 5, 7] / gem._derivatives(head.activation, z)[0][1, 0, 5, 7]
    assert model.border_mask[..., 5 + quarter, 7 + quarter].max() == 0  # only the centre branch sees it
    got = gem._carried_from_preactivations(model, taps, {head.centre.name: dz}, np.float64)
    want = gem._carried_network(model, taps, [("phase", dy)], np.float64)
    assert set(got[0]) == set(want[0])
    for name in got[0]:
        for g, w in zip(got[0][name], want[0][name], strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-12 * np.abs(w).max(), err_msg=name)
    for g, w in zip(got[1:], want[1:], strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-12 * np.abs(w).max())


def test_a_head_s_pre_activation_error_is_recorded_for_carrying_by_its_share_of_the_bias_e2():
    """Recorded where z's error is at least _PREACTIVATION_SHARE of its conv's bias E² in some loss:
    not where the cotangent's carried error dwarfs it, nor where no cotangent arrives."""
    rng = np.random.default_rng(1)
    x = rng.gamma(1.0, 1.0, size=(1, 3, 8, 8))
    conv = Conv("c", rng.uniform(-0.3, 0.3, size=(3, 3, 3, 1)), np.zeros(1))
    dy = rng.standard_normal((2, 1, 1, 8, 8))
    for s_x, carried, cotangent, recorded in ((1e6, 10.0, dy, True), (0.0, 1e6, dy, False), (1e6, 10.0, 0 * dy, False)):
        sw = _sweep(conv, x, np.ones((1, 1, 8, 8)))
        sw.activation(gem.pi_tanh, conv, x, np.full_like(x, s_x), cotangent, (carried * cotangent) ** 2)
        assert ("c" in sw.preactivation_errors) is recorded, (s_x, carried, recorded)


@pytest.mark.parametrize("config", [ModelConfig(n_filters_scale=1), ModelConfig(n_filters_scale=1, pad_object=False)])
def test_a_cotangent_at_a_border_or_full_head_s_pre_activation_is_carried_as_the_reference_s(config):
    """The same for the border's output conv (a pixel of the border ring, which the centre branch does
    not reach) and for a full head's output conv: each is backward's head adjoint of dz/f'(z)."""
    backend, _, taps, _ = _scales(config)
    model = backend.model
    head = model.heads["phase"]
    if head.full_out is not None:
        conv, activation, z = head.full_out, head.activation, head.full_out(taps["phase.head.full.up"])
        row = col = 9
    else:
        assert head.border_out is not None
        conv, activation, z = head.border_out, gem.swish, head.border_out(taps["phase.head.border.up"])
        row = col = 1
        assert model.border_mask[..., row, col].min() == 1
    dz = np.zeros((2, *z.shape))
    dz[:, 0, 0, row, col] = [3.0, -5.0]
    dy = np.zeros((2, *taps[gem._final_tap(head)].shape))
    dy[:, 0, 0, row, col] = dz[:, 0, 0, row, col] / gem._derivatives(activation, z)[0][0, 0, row, col]
    got = gem._carried_from_preactivations(model, taps, {conv.name: dz}, np.float64)
    want = gem._carried_network(model, taps, [("phase", dy)], np.float64)
    assert set(got[0]) <= set(want[0]) and conv.name in got[0]
    for name in want[0]:
        for i, w in enumerate(want[0][name]):
            g = got[0][name][i] if name in got[0] else np.zeros_like(w)  # a branch the move does not reach
            np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-12 * max(np.abs(w).max(), 1e-300), err_msg=name)
    for g, w in zip(got[1:], want[1:], strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-12 * np.abs(w).max())


def test_a_sum_a_few_terms_carry_is_within_its_tolerance_however_a_vectorised_sum_forms_it():
    """log_scale's gradient sums every pixel of the batch; where a few pixels carry most of it (the
    diffraction's central peak at high photon counts) a float32 sum in interleaved lanes, each in
    order (TensorFlow's, 64 lanes on the machine that found it), rounds every small term added after
    a peak pixel at the peak's size, or loses it: errors of one sign, not noise. Formed here in 16,
    32 and 64 lanes by a plain loop, the sum is within log_scale's tolerance with the lane rounding
    (``_lane_rounding``) and not with the pairwise rounding alone."""
    tol = load_tolerances()
    name = f"{GRAD}.poisson_nll.log_scale"
    rng = np.random.default_rng(3)
    terms = rng.lognormal(-9.0, 2.0, (2, 1, 128, 128))  # a median of 1e-4, a long tail
    terms[:, 0, 64, 63:66] = 9.6e3  # the peak: a few terms carry half of the sum
    terms[:, 0, 65, 64] = 5.0e3
    exact = np.array([terms.sum()])
    flat = terms.astype(np.float32).ravel()
    errors = []
    for lanes in (16, 32, 64):
        acc = np.zeros(lanes, np.float32)
        for row in flat.reshape(-1, lanes):
            acc = acc + row  # float32, each lane in order
        errors.append(abs(float(np.sum(acc.astype(np.float64))) - exact[0]))
    n = terms.size
    pairwise = math.sqrt((1.0 + math.log2(n)) * np.sum(terms**2) + (2.0 * exact[0]) ** 2)
    lane = gem._lane_rounding(terms)
    assert lane * gem.U32 >= max(errors) * (1 - 1e-6)  # the lanes' combination adds a rounding or two
    for err in errors:
        got = exact + err
        assert _over(tol, name, got, exact, np.array([math.hypot(pairwise, lane)])) <= 1.0
    assert max(_over(tol, name, exact + err, exact, np.array([pairwise])) for err in errors) > 1.0


def test_a_bias_sum_a_few_pixels_carry_is_within_its_tolerance_summed_pixel_after_pixel():
    """TensorFlow's bias gradient adds each channel's pixels one after another (BiasAddGrad; for
    4096 rows its error equals a sequential float32 sum's). Where the cotangent is of one sign and a
    few pixels carry it, every later pixel rounds at their size or is lost. Summed so by a plain
    loop, in one block and in two, such a bias is within the bias tolerance with
    ``_sequential_rounding``, and in one block not with the pairwise roundings alone."""
    tol = load_tolerances()
    name = f"{GRAD}.poisson_nll.amp.decoder.block1.conv1.bias"
    rng = np.random.default_rng(5)
    dz = rng.lognormal(-9.0, 2.0, (1, 8, 3, 64, 64))  # (S, B, C, H, W): one sign, a long tail
    dz[0, 0, :, 0, :4] = 1e3  # a few pixels first in every channel carry most of each sum
    exact = dz.sum(axis=(1, 3, 4))[0]
    rows = np.moveaxis(dz[0], 1, 0).reshape(3, -1).astype(np.float32)
    n = rows.shape[1]
    pairwise = np.sqrt((1.0 + math.log2(n)) * (np.sum(rows.astype(np.float64) ** 2, axis=1) + exact**2))
    sequential = gem._sequential_rounding(dz)[0]
    without = []
    for blocks in (1, 2):
        got = np.zeros(3, np.float32)
        for part in np.array_split(rows, blocks, axis=1):
            acc = np.zeros(3, np.float32)
            for column in part.T:
                acc = acc + column  # float32, one pixel after another
            got = got + acc
        got = got.astype(np.float64)
        assert np.all(sequential * gem.U32 >= np.abs(got - exact) * (1 - 1e-6))
        assert _over(tol, name, got, exact, np.hypot(pairwise, sequential)) <= 1.0
        without.append(_over(tol, name, got, exact, pairwise))
    assert max(without) > 1.0, without  # in one block (one thread)


def test_a_sum_past_float32s_range_adds_nothing_and_warns_of_nothing():
    """A cotangent beyond float32's range is inf in a float32 backend, a mismatch whatever the
    tolerance: the simulated sums then add nothing (no inf or NaN scale, which the runner refuses)."""
    dz = np.ones((1, 1, 2, 4, 4))
    dz[0, 0, 0, 0, 0] = 1e300
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.array_equal(gem._sequential_rounding(dz), np.zeros((1, 2)))
        assert gem._lane_rounding(dz[0]) == 0.0

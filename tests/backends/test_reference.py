"""Tests of the float64 NumPy reference backend on its own (no other framework involved).

The reference is the arbiter of every parity comparison, so besides the backend contract these tests
check its building blocks against independent, deliberately naive implementations.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from backends.reference import (
    ReferenceBackend,
    centre_mask,
    crop_centre,
    diffract,
    merge,
    pad_to_canvas,
    reextract,
    translate,
)
from backends.reference.ops import conv2d, max_pool2, upsample2
from parity.batch import CanonicalBatch, disk_mask, random_batch
from parity.config import ModelConfig
from parity.errors import WeightsError
from parity.taps import tap_specs
from parity.weights import count_conv_parameters, generate_weights

DEFAULT = ModelConfig()

FORWARD_CONFIGS = {
    "default": {},
    "gridsize1": {"gridsize": 1},
    "object_big_false": {"object_big": False},
    "probe_big_false": {"probe_big": False},
    "pad_object_false": {"pad_object": False},
    "probe_mask_true": {"probe_mask": True},
    "swish": {"amp_activation": "swish"},
    "softplus": {"amp_activation": "softplus"},
    "relu": {"amp_activation": "relu"},
    "n128": {"N": 128, "n_filters_scale": 1},
}


def build(config: ModelConfig, seed: int = 7) -> ReferenceBackend:
    return ReferenceBackend(config, generate_weights(config, seed=seed))


@pytest.fixture(scope="module")
def default_backend() -> ReferenceBackend:
    return build(DEFAULT)


@pytest.fixture(scope="module")
def default_taps(default_backend: ReferenceBackend) -> dict[str, np.ndarray]:
    return default_backend.forward(random_batch(DEFAULT, 2, seed=3))


def shift_zero_fill(img: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """np.roll by (dy, dx) with the wrapped-around part set to zero."""
    out = np.roll(img, (dy, dx), axis=(-2, -1))
    H, W = img.shape[-2:]
    rows, cols = np.arange(H) - dy, np.arange(W) - dx
    keep = ((rows >= 0) & (rows < H))[:, None] & ((cols >= 0) & (cols < W))[None, :]
    return np.where(keep, out, 0)


# ---- 1. parameter counts ---------------------------------------------------------------------


def test_conv_parameter_count(spec_parameter_count: tuple[dict[str, Any], int]) -> None:
    changes, expected = spec_parameter_count
    config = DEFAULT.replace(**changes)
    backend = build(config)
    assert backend.parameter_count() == count_conv_parameters(config) == expected


# ---- 2. forward: taps, shapes, dtypes, input echo -----------------------------------------------


@pytest.mark.parametrize("changes", FORWARD_CONFIGS.values(), ids=list(FORWARD_CONFIGS))
def test_forward_returns_every_tap(changes: dict[str, Any]) -> None:
    config = DEFAULT.replace(**changes)
    B = 2
    batch = random_batch(config, B, seed=11)
    taps = build(config).forward(batch)

    specs = tap_specs(config, B)
    assert list(taps) == [s.name for s in specs]
    for spec in specs:
        value = taps[spec.name]
        assert value.shape == spec.shape, spec.name
        assert np.iscomplexobj(value) == spec.complex, spec.name
        if not spec.name.startswith("input."):
            assert value.dtype == (np.complex128 if spec.complex else np.float64), spec.name
        assert np.all(np.isfinite(value)), spec.name

    N, C = config.N, config.C
    expected_inputs = {
        "input.x": batch.x,
        "input.offsets": batch.offsets.reshape(B, C, 1, 2),
        "input.probe": batch.probe.reshape(1, 1, N, N),
    }
    for name, expected in expected_inputs.items():
        assert taps[name].dtype == expected.dtype, name
        assert taps[name].shape == expected.shape, name
        assert taps[name].tobytes() == expected.tobytes(), name


def test_forward_is_deterministic(default_backend: ReferenceBackend) -> None:
    batch = random_batch(DEFAULT, 2, seed=5)
    first, second = default_backend.forward(batch), default_backend.forward(batch)
    for name in first:
        assert first[name].tobytes() == second[name].tobytes(), name


def test_forward_rejects_a_batch_of_the_wrong_shape(default_backend: ReferenceBackend) -> None:
    batch = random_batch(DEFAULT.replace(gridsize=1), 2)
    with pytest.raises(ValueError, match="'x'"):
        default_backend.forward(batch)


def test_taps_follow_the_spec_wiring(default_taps: dict[str, np.ndarray]) -> None:
    """Each stage's output relates to its inputs as forward-model.md says (catches mis-wired stages)."""
    t = default_taps
    N, M = DEFAULT.N, DEFAULT.M
    q = N // 4
    inside = centre_mask(N).astype(bool)
    log_scale = float(generate_weights(DEFAULT, seed=7)["log_scale"])

    np.testing.assert_allclose(t["input.scaled"], t["input.x"].astype(np.float64) / math.exp(log_scale), rtol=1e-15)
    for h in ("amp", "phase"):
        padded, masked = t[f"{h}.head.padded"], t[f"{h}.head.border.masked"]
        np.testing.assert_array_equal(padded[..., q : 3 * q, q : 3 * q], t[f"{h}.head.centre"])
        assert not padded[..., ~inside].any()
        assert not masked[..., inside].any()
        np.testing.assert_array_equal(masked[..., ~inside], t[f"{h}.head.border.out"][..., ~inside])
        np.testing.assert_array_equal(t[f"{h}.head.sum"], padded + masked)
    assert np.all(np.abs(t["phase.head.centre"]) < np.pi)

    A, phi = t["amp.head.sum"], t["phase.head.sum"]
    np.testing.assert_allclose(t["object.patches"], A * np.exp(1j * phi), rtol=1e-14)
    pad = (M - N) // 2
    np.testing.assert_array_equal(t["object.trimmed"], t["object.canvas"][..., pad : pad + N, pad : pad + N])
    probe = t["input.probe"].astype(np.complex128)
    np.testing.assert_allclose(t["physics.illuminated"], probe * t["object.reextracted"], rtol=1e-14)
    np.testing.assert_allclose(t["output.amplitude"], t["physics.diffraction"] * math.exp(log_scale), rtol=1e-15)
    np.testing.assert_array_equal(t["output.intensity"], t["output.amplitude"] ** 2)

    x = t["input.x"].astype(np.float64)
    intensity, amplitude = t["output.intensity"], t["output.amplitude"]
    nll = np.mean(intensity - x**2 * np.log(np.maximum(intensity, 1e-12)), axis=(1, 2, 3))
    np.testing.assert_allclose(t["loss.poisson_nll"].ravel(), nll, rtol=1e-14)
    np.testing.assert_allclose(t["loss.mae"].ravel(), np.mean(np.abs(amplitude - x), axis=(1, 2, 3)), rtol=1e-14)


NAIVE_ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "sigmoid": lambda v: 1.0 / (1.0 + np.exp(-v)),
    "swish": lambda v: v / (1.0 + np.exp(-v)),
    "softplus": lambda v: np.log1p(np.exp(v)),
    "relu": lambda v: np.where(v > 0, v, 0.0),
    "phase": lambda v: np.pi * np.tanh(v),
}


@pytest.mark.parametrize(
    "changes",
    [{"amp_activation": a} for a in ("sigmoid", "swish", "softplus", "relu")] + [{"pad_object": False}],
    ids=["sigmoid", "swish", "softplus", "relu", "full_head"],
)
def test_head_activations_and_channel_split(changes: dict[str, Any]) -> None:
    """Centre conv reads channels [0, F-4), the border branch the last 4; activations as specified."""
    config = DEFAULT.replace(**changes)
    weights = {k: v.astype(np.float64) for k, v in generate_weights(config, seed=7).items()}
    taps = build(config).forward(random_batch(config, 1, seed=4))
    F = config.F

    def conv(name: str, x: np.ndarray) -> np.ndarray:
        return conv2d(x, weights[f"{name}.kernel"], weights[f"{name}.bias"])

    for h in ("amp", "phase"):
        act = NAIVE_ACTIVATIONS[config.amp_activation if h == "amp" else "phase"]
        features = taps[f"{h}.decoder.block1.up"]
        if config.pad_object:
            expected = act(conv(f"{h}.head.centre", features[:, : F - 4]))
            np.testing.assert_allclose(taps[f"{h}.head.centre"], expected, rtol=1e-12, atol=1e-15)
            border_in = np.maximum(conv(f"{h}.head.border.conv0", features[:, F - 4 :]), 0)
            np.testing.assert_allclose(taps[f"{h}.head.border.conv0"], border_in, rtol=1e-12, atol=1e-15)
            out = NAIVE_ACTIVATIONS["swish"](conv(f"{h}.head.border.out", taps[f"{h}.head.border.up"]))
            np.testing.assert_allclose(taps[f"{h}.head.border.out"], out, rtol=1e-12, atol=1e-15)
        else:
            full_in = np.maximum(conv(f"{h}.head.full.conv0", features), 0)
            np.testing.assert_allclose(taps[f"{h}.head.full.conv0"], full_in, rtol=1e-12, atol=1e-15)
            out = act(conv(f"{h}.head.full.out", taps[f"{h}.head.full.up"]))
            np.testing.assert_allclose(taps[f"{h}.head.full.out"], out, rtol=1e-12, atol=1e-15)


def test_object_big_false_canvas_is_the_padded_patch() -> None:
    config = DEFAULT.replace(object_big=False)
    taps = build(config).forward(random_batch(config, 2, seed=1))
    pad = (config.M - config.N) // 2
    expected = np.pad(taps["object.patches"], ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    np.testing.assert_array_equal(taps["object.canvas"], expected)


def test_probe_mask_applies_the_hard_disk() -> None:
    config = DEFAULT.replace(probe_mask=True)
    taps = build(config).forward(random_batch(config, 1, seed=2))
    outside = disk_mask(config.N) == 0
    assert not taps["physics.illuminated"][..., outside].any()
    probe = taps["input.probe"].astype(np.complex128)
    np.testing.assert_array_equal(
        taps["physics.illuminated"][..., ~outside], (probe * taps["object.reextracted"])[..., ~outside]
    )


# ---- building blocks against naive implementations ---------------------------------------------


@pytest.mark.parametrize(
    ("cin", "cout", "H", "W"),
    [(3, 4, 5, 6), (3, 5, 17, 18), (20, 2, 5, 6), (20, 2, 17, 18)],
    ids=["small map", "larger map", "output side (9 x out <= in)", "output side, larger map"],
)
@pytest.mark.parametrize("per_product", [3, 1, 2], ids=["all images a product", "one", "two, then one"])
def test_conv2d_is_cross_correlation_with_zero_padding_and_bias(
    cin: int, cout: int, H: int, W: int, per_product: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from backends.reference import ops

    if per_product < 3:  # images a product: the row path's columns, the output side's elements
        monkeypatch.setattr(ops, "_MIN_COLUMNS", (per_product - 1) * (H + 2) * W + 1)
        monkeypatch.setattr(ops, "_OUTPUT_SIDE_MAX_ELEMENTS", per_product * 9 * cout * (H + 2) * (W + 2))
    else:
        monkeypatch.setattr(ops, "_MIN_COLUMNS", 3 * (H + 2) * W)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, cin, H, W))
    kernel = rng.normal(size=(3, 3, cin, cout))
    bias = rng.normal(size=cout)
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    expected = np.zeros((3, cout, H, W))
    for kh in range(3):
        for kw in range(3):
            expected += np.einsum("bchw,co->bohw", padded[:, :, kh : kh + H, kw : kw + W], kernel[kh, kw])
    expected += bias[None, :, None, None]
    out = conv2d(x, kernel, bias)
    assert out.flags.c_contiguous  # a tap as it stands
    np.testing.assert_allclose(out, expected, rtol=1e-13, atol=1e-13)
    single = conv2d(x, kernel, bias, dtype=np.float32)
    assert single.dtype == np.float32
    np.testing.assert_allclose(single, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())

    # A single 1 at the top-left kernel tap reads the pixel up and to the left (not flipped).
    corner = np.zeros((3, 3, cin, cout))
    corner[0, 0, 0, 0] = 1.0
    img = rng.normal(size=(1, cin, 4, 4))
    out = conv2d(img, corner, np.zeros(cout))
    np.testing.assert_array_equal(out[0, 0, 1:, 1:], img[0, 0, :-1, :-1])
    assert not out[0, 0, 0, :].any() and not out[0, 0, :, 0].any()


def test_pool_and_upsample() -> None:
    x = np.arange(16.0).reshape(1, 1, 4, 4)
    np.testing.assert_array_equal(max_pool2(x)[0, 0], [[5.0, 7.0], [13.0, 15.0]])
    x[0, 0, 3, 2] = np.nan  # a NaN anywhere in a window makes its maximum NaN, as np.max would
    np.testing.assert_array_equal(max_pool2(x)[0, 0], [[5.0, 7.0], [13.0, np.nan]])
    up = upsample2(np.array([[[[1.0, 2.0], [3.0, 4.0]]]]))
    np.testing.assert_array_equal(up[0, 0], [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]])


@pytest.mark.parametrize("offset", [(0.3, -1.7), (2.5, 0.25), (-0.5, 0.5), (-6.2, 0.9), (1e-3, -3.999)])
def test_translate_matches_naive_bilinear(offset: tuple[float, float], spec_translate: Any) -> None:
    img = np.random.default_rng(1).normal(size=(5, 6))
    np.testing.assert_allclose(translate(img, np.array(offset)), spec_translate(img, *offset), atol=1e-14)


def test_translate_by_shifted_slices_is_the_per_pixel_form_bit_for_bit(monkeypatch: pytest.MonkeyPatch) -> None:
    """The shifted-slice path (``physics._translate_shifted``) against the per-pixel gathers it
    replaced, on float32 offsets (the batch's), including shifts past every edge and integer ones;
    NaN or absurd offsets still take the gathers."""
    from backends.reference import physics

    rng = np.random.default_rng(5)
    img = rng.normal(size=(4, 3, 9, 12))
    off = rng.uniform(-14, 14, size=(4, 3, 2)).astype(np.float32)
    off[0] = [[0, 0], [3, -2], [-0.5, 8.75]]
    off[1, 0] = [12.5, -9.25]  # entirely outside: zeros
    fast = translate(img, off)
    monkeypatch.setattr(physics, "_SHIFTED_MAX_OFFSET", 0.0)  # every offset to the gathers
    np.testing.assert_array_equal(fast, translate(img, off))
    assert not np.any(fast[1, 0])
    monkeypatch.undo()
    off[2, 1, 0] = np.nan
    with np.errstate(invalid="ignore"):
        out = translate(img, off)
    assert np.isnan(out[2, 1]).all() and np.isfinite(np.delete(out.reshape(12, 9, 12), 7, axis=0)).all()


def test_translate_edge_pixels_keep_their_inside_weight() -> None:
    # Half a pixel right: column 0 samples x = -0.5, half of it from the zero outside, half from column 0.
    out = translate(np.ones((4, 4)), np.array([0.5, 0.0]))
    np.testing.assert_array_equal(out[:, 0], 0.5)
    np.testing.assert_array_equal(out[:, 1:], 1.0)


def test_translate_complex_parts_separately() -> None:
    rng = np.random.default_rng(2)
    z = rng.normal(size=(3, 7, 7)) + 1j * rng.normal(size=(3, 7, 7))
    off = rng.uniform(-2, 2, size=(3, 2))
    out = translate(z, off)
    np.testing.assert_array_equal(out.real, translate(z.real, off))
    np.testing.assert_array_equal(out.imag, translate(z.imag, off))


# ---- 3. physics --------------------------------------------------------------------------------


@pytest.mark.parametrize("offset", [(0, 0), (3, 0), (0, -2), (-5, 4), (7, -9), (40, 1)])
def test_integer_offset_is_an_exact_shift(offset: tuple[int, int]) -> None:
    img = np.random.default_rng(3).normal(size=(2, 32, 32))
    off = np.array(offset, dtype=np.float32)  # the batch's dtype
    np.testing.assert_array_equal(translate(img, off), shift_zero_fill(img, *offset))


def test_fftshift_acts_on_spatial_axes_only() -> None:
    rng = np.random.default_rng(4)
    B, C, N = 3, 2, 16
    psi = rng.normal(size=(B, C, N, N)) + 1j * rng.normal(size=(B, C, N, N))
    amp = diffract(psi)
    expected = np.sqrt(np.fft.fftshift(np.abs(np.fft.fft2(psi)) ** 2 / N**2, axes=(-2, -1)))
    np.testing.assert_allclose(amp, expected, rtol=1e-12)
    for b in range(B):  # sample b depends on sample b alone
        np.testing.assert_array_equal(diffract(psi[b : b + 1]), amp[b : b + 1])
    # Constant fields: all energy at the centred DC pixel (N/2, N/2), sample order unchanged.
    flat = np.ones((B, 1, N, N)) * np.arange(1, B + 1)[:, None, None, None]
    dc = diffract(flat)
    np.testing.assert_allclose(dc[:, 0, N // 2, N // 2], N * np.arange(1, B + 1), rtol=1e-14)
    dc[:, 0, N // 2, N // 2] = 0
    assert np.max(dc) < 1e-12


def test_diffraction_conserves_energy(default_taps: dict[str, np.ndarray]) -> None:
    psi = default_taps["physics.illuminated"]
    energy_in = np.sum(np.abs(psi) ** 2, axis=(-2, -1))
    energy_out = np.sum(default_taps["physics.diffraction"] ** 2, axis=(-2, -1))
    np.testing.assert_allclose(energy_out, energy_in, rtol=1e-12)


def _patches_from_one_object(N: int, positions: np.ndarray, seed: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Patches cut from one larger complex object: patch c is centred at object centre + positions[c].

    Returns (patches (1, C, N, N), offsets (1, C, 2)) with offsets = -(position - mean), the harness's
    group-relative convention.
    """
    rng = np.random.default_rng(seed)
    size = N + 2 * int(np.abs(positions).max()) + 2
    obj = rng.uniform(0.5, 1.0, (size, size)) * np.exp(1j * rng.uniform(-1, 1, (size, size)))
    c0 = (size - N) // 2
    patches = np.stack([obj[c0 + dy : c0 + dy + N, c0 + dx : c0 + dx + N] for dx, dy in positions])
    offsets = -(positions - positions.mean(axis=0))
    return patches[None], offsets[None].astype(np.float32)


def test_merge_then_reextract_returns_each_patch_centre() -> None:
    """Agreeing patches, masked to their central window as the pad_object head without border
    produces them: every pixel of patch c's central window is k * value / (k + 0.001), k being the
    number of central windows covering it."""
    config = DEFAULT
    N, M = config.N, config.M
    positions = np.array([[-2, -3], [3, -1], [-1, 2], [0, 2]])  # integer, sum to zero
    patches, offsets = _patches_from_one_object(N, positions)
    masked = patches * centre_mask(N)
    out = reextract(merge(masked, offsets, M), offsets, N)

    q = N // 4
    # Count, in object coordinates, how many central windows cover each pixel.
    size = N + 2 * int(np.abs(positions).max()) + 2
    c0 = (size - N) // 2
    cover = np.zeros((size, size))
    for dx, dy in positions:
        cover[c0 + dy + q : c0 + dy + 3 * q, c0 + dx + q : c0 + dx + 3 * q] += 1
    for c, (dx, dy) in enumerate(positions):
        k = cover[c0 + dy + q : c0 + dy + 3 * q, c0 + dx + q : c0 + dx + 3 * q]
        expected = patches[0, c, q : 3 * q, q : 3 * q] * k / (k + 0.001)
        np.testing.assert_allclose(out[0, c, q : 3 * q, q : 3 * q], expected, rtol=1e-13)
        np.testing.assert_allclose(out[0, c, q : 3 * q, q : 3 * q], patches[0, c, q : 3 * q, q : 3 * q], rtol=1.001e-3)


def test_integer_offsets_merge_and_reextract_are_exact() -> None:
    """No rounding anywhere for integer offsets: merge and re-extract equal a pure slicing version
    of the same arithmetic bit for bit (in float32 backends the same holds up to float32 rounding
    of the patch values only, never of the sampling positions)."""
    rng = np.random.default_rng(6)
    config = DEFAULT
    B, C, N, M = 2, config.C, config.N, config.M
    patches = rng.normal(size=(B, C, N, N)) + 1j * rng.normal(size=(B, C, N, N))
    offsets = rng.integers(-4, 5, size=(B, C, 2)).astype(np.float32)
    # A zero batch mean keeps every merge shift -(d - d̄) an integer.
    offsets[0, 0] -= offsets.reshape(-1, 2).sum(axis=0)
    assert np.all(offsets.reshape(-1, 2).sum(axis=0) == 0)

    pad = (M - N) // 2
    padded = np.pad(patches, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    padded_mask = np.pad(centre_mask(N), pad)
    numerator = np.zeros((B, C, M, M), dtype=np.complex128)
    coverage = np.zeros((B, C, M, M))
    for b in range(B):
        for c in range(C):
            dx, dy = (-offsets[b, c]).astype(int)
            numerator[b, c] = shift_zero_fill(padded[b, c], dx, dy)
            coverage[b, c] = shift_zero_fill(padded_mask, dx, dy)
    num, den = numerator.sum(axis=1, keepdims=True), coverage.sum(axis=1, keepdims=True) + 0.001
    expected_canvas = num.real / den + 1j * (num.imag / den)
    canvas = merge(patches, offsets, M)
    np.testing.assert_array_equal(canvas, expected_canvas)

    expected = np.empty((B, C, N, N), dtype=np.complex128)
    for b in range(B):
        for c in range(C):
            dx, dy = offsets[b, c].astype(int)
            expected[b, c] = crop_centre(shift_zero_fill(canvas[b, 0], dx, dy), N)
    np.testing.assert_array_equal(reextract(canvas, offsets, N), expected)


def test_merge_centres_offsets_on_the_batch_mean() -> None:
    """d̄ is one mean over all B*C offsets: a common shift changes nothing, and moving group 0
    moves group 1's canvas too (it would not if offsets were centred per group)."""
    rng = np.random.default_rng(7)
    B, C, N, M = 2, 4, 64, 78
    patches = rng.normal(size=(B, C, N, N)) + 1j * rng.normal(size=(B, C, N, N))
    offsets = np.array([[[1, 2], [-1, 0], [0, -3], [0, 1]], [[2, -2], [-2, 2], [1, 1], [-1, -1]]], np.float32)
    canvas = merge(patches, offsets, M)
    np.testing.assert_array_equal(merge(patches, offsets + np.array([3, -2], dtype=np.float32), M), canvas)

    moved = offsets.copy()
    moved[0, :, 0] += 2  # group 0 moves 2 px in x, so the batch mean moves 1 px
    expected_group1 = translate(canvas[1], np.array([1.0, 0.0]))
    np.testing.assert_array_equal(merge(patches, moved, M)[1], expected_group1)


def test_pad_to_canvas() -> None:
    patch = np.ones((1, 1, 4, 4), dtype=np.complex128)
    canvas = pad_to_canvas(patch, 8)
    assert canvas.shape == (1, 1, 8, 8)
    np.testing.assert_array_equal(crop_centre(canvas, 4), patch)
    assert np.sum(np.abs(canvas)) == 16


# ---- 4. weights ---------------------------------------------------------------------------------


@pytest.mark.parametrize("changes", [{}, {"pad_object": False}, {"probe_big": False, "gridsize": 1}])
def test_export_round_trip_is_bit_exact(changes: dict[str, Any]) -> None:
    config = DEFAULT.replace(**changes)
    weights = generate_weights(config, seed=9)
    exported = ReferenceBackend(config, weights).export_weights()
    assert set(exported) == set(weights)
    for name, value in weights.items():
        assert exported[name].dtype == value.dtype == np.float32, name
        assert exported[name].shape == value.shape, name
        assert np.array_equal(exported[name], value), name


def _corrupt(kind: str) -> tuple[dict[str, np.ndarray], str]:
    weights = generate_weights(DEFAULT, seed=1)
    if kind == "missing":
        del weights["amp.head.border.out.bias"]
        return weights, "amp.head.border.out.bias"
    if kind == "extra":
        weights["amp.head.full.out.kernel"] = np.zeros((3, 3, 64, 4), np.float32)
        return weights, "amp.head.full.out.kernel"
    if kind == "shape":
        weights["encoder.block1.conv0.kernel"] = np.zeros((3, 3, 64, 64), np.float32)
        return weights, "encoder.block1.conv0.kernel"
    weights["phase.head.centre.bias"] = weights["phase.head.centre.bias"].astype(np.float64)
    return weights, "phase.head.centre.bias"


@pytest.mark.parametrize("kind", ["missing", "extra", "shape", "dtype"])
def test_invalid_weights_raise_naming_the_parameter(kind: str) -> None:
    weights, name = _corrupt(kind)
    with pytest.raises(WeightsError, match=name.replace(".", r"\.")):
        ReferenceBackend(DEFAULT, weights)


# ---- 5. environment and effective config ---------------------------------------------------------


def test_environment(default_backend: ReferenceBackend) -> None:
    env = default_backend.environment()
    json.dumps(env)
    assert env["framework"] == "numpy"
    assert env["framework_version"] == env["numpy_version"] == np.__version__
    assert env["device"] == "cpu"
    assert env["dtype"] == "float64"
    assert env["complex_dtype"] == "complex128"
    assert env["tf32"] is False
    assert env["deterministic"] is True
    assert default_backend.name == "reference" and default_backend.precision == "float64"


def test_only_cpu_device() -> None:
    with pytest.raises(ValueError, match="device='cuda'"):
        ReferenceBackend(DEFAULT, generate_weights(DEFAULT), device="cuda")


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"gridsize": 1, "object_big": False, "amp_activation": "relu"},
        {"N": 128, "pad_object": False, "probe_big": False, "n_filters_scale": 1},
        {"probe_mask": True, "probe_big": False, "amp_activation": "softplus", "n_filters_scale": 4},
        {"offset": 6, "max_position_jitter": 8, "nphotons": 1e6, "probe_scale": 10.0},
    ],
)
def test_effective_config_matches_the_requested_one(changes: dict[str, Any]) -> None:
    config = DEFAULT.replace(**changes)
    assert build(config).effective_config() == config.resolved_dict()


def test_forward_accepts_only_the_canonical_batch_type(default_backend: ReferenceBackend) -> None:
    batch = random_batch(DEFAULT, 1)
    bad = CanonicalBatch(x=batch.x.astype(np.float64), offsets=batch.offsets, probe=batch.probe)
    with pytest.raises(ValueError, match="dtype"):
        default_backend.forward(bad)

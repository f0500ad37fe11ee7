"""Tests of the TensorFlow backend on its own: structure, physics, weights, controls, build hooks.

Comparisons against the other backends live with the harness; everything here checks the TF model
against the spec directly (exact properties, or small NumPy float64 computations).
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from parity.plugin import import_framework

tf = import_framework("tensorflow")

import keras  # noqa: E402
from numpy.lib.stride_tricks import sliding_window_view  # noqa: E402

from backends.tensorflow import TensorFlowBackend, diffract, intensity, merge, reextract, translate  # noqa: E402
from backends.tensorflow import physics as tfp  # noqa: E402
from backends.tensorflow._startup import STARTUP_LINES, lines_dropped  # noqa: E402
from backends.tensorflow.model import PtychoModel  # noqa: E402
from parity.batch import CanonicalBatch, random_batch  # noqa: E402
from parity.batch import disk_mask as spec_disk_mask  # noqa: E402
from parity.config import ModelConfig  # noqa: E402
from parity.errors import ParityInputError, WeightsError  # noqa: E402
from parity.fixture import bundled_fixture, iter_batches, load_fixture  # noqa: E402
from parity.stages import stages  # noqa: E402
from parity.taps import tap_specs  # noqa: E402
from parity.weights import count_conv_parameters, generate_weights, parameter_shapes  # noqa: E402

_BACKENDS: dict[ModelConfig, TensorFlowBackend] = {}


def backend_for(**changes: Any) -> TensorFlowBackend:
    """Backends are cached per config: tracing the graph is the slow part of a first forward."""
    config = ModelConfig().replace(**changes)
    if config not in _BACKENDS:
        _BACKENDS[config] = TensorFlowBackend(config, generate_weights(config, seed=11))
    return _BACKENDS[config]


FORWARD_VARIANTS: list[dict[str, Any]] = [
    {},
    {"gridsize": 1},
    {"object_big": False},
    {"probe_big": False},
    {"pad_object": False},
    {"probe_mask": True},
    {"amp_activation": "swish"},
    {"amp_activation": "softplus"},
    {"amp_activation": "relu"},
]


def _id(changes: dict[str, Any]) -> str:
    return ModelConfig().replace(**changes).short_id()


# 1. Parameter counts --------------------------------------------------------------------------------


def test_conv_parameter_count_matches_spec(spec_parameter_count: tuple[dict[str, Any], int]) -> None:
    changes, expected = spec_parameter_count
    config = ModelConfig().replace(**changes)
    model = TensorFlowBackend(config, generate_weights(config)).model
    keras_count = sum(layer.count_params() for layer in model.conv_layers().values())
    assert keras_count == expected == count_conv_parameters(config)
    kernels = [name.removesuffix(".kernel") for name in parameter_shapes(config) if name.endswith(".kernel")]
    assert list(model.conv_layers()) == kernels
    # log_scale is one more weight, outside the conv count.
    assert model.log_scale.shape == ()


# 2. Forward: taps, shapes, inputs --------------------------------------------------------------------


@pytest.mark.parametrize("changes", FORWARD_VARIANTS, ids=_id)
def test_forward_returns_every_tap_in_order(changes: dict[str, Any]) -> None:
    be = backend_for(**changes)
    B = 2
    batch = random_batch(be.config, B, seed=1)
    taps = be.forward(batch)
    specs = tap_specs(be.config, B)
    assert list(taps) == [s.name for s in specs]
    for spec in specs:
        value = taps[spec.name]
        assert value.shape == spec.shape, spec.name
        assert value.dtype == (np.complex64 if spec.complex else np.float32), spec.name
        assert np.all(np.isfinite(value)), spec.name
    C, N = be.config.C, be.config.N
    for name, expected in [
        ("input.x", batch.x),
        ("input.offsets", batch.offsets.reshape(B, C, 1, 2)),
        ("input.probe", batch.probe.reshape(1, 1, N, N)),
    ]:
        assert taps[name].dtype == expected.dtype
        assert taps[name].tobytes() == expected.tobytes(), name


def _conv3x3(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Float64 'same' cross-correlation on (B, C, H, W) with a (3, 3, in, out) kernel."""
    xp = np.pad(np.asarray(x, np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    win = sliding_window_view(xp, (3, 3), axis=(2, 3))  # B, C, H, W, 3, 3
    out = np.einsum("bchwij,ijco->bohw", win, kernel.astype(np.float64), optimize=True)
    return np.asarray(out + bias.astype(np.float64)[None, :, None, None])


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.asarray(1.0 / (1.0 + np.exp(-x)))


def _swish(x: np.ndarray) -> np.ndarray:
    return np.asarray(x * _sigmoid(x))


def _softplus(x: np.ndarray) -> np.ndarray:
    return np.asarray(np.log1p(np.exp(x)))


def _relu(x: np.ndarray) -> np.ndarray:
    return np.asarray(np.maximum(x, 0.0))


def _pi_tanh(x: np.ndarray) -> np.ndarray:
    return np.asarray(np.pi * np.tanh(x))


_ACTIVATIONS = {"sigmoid": _sigmoid, "swish": _swish, "softplus": _softplus, "relu": _relu}


@pytest.mark.parametrize("changes", [v for v in FORWARD_VARIANTS if "amp_activation" in v] + [{}], ids=_id)
def test_heads_take_the_right_channels_and_activations(changes: dict[str, Any]) -> None:
    """Centre conv sees channels [0, F-4), the border branch the last 4; activations as specified."""
    be = backend_for(**changes)
    w = be.export_weights()
    taps = be.forward(random_batch(be.config, 1, seed=2))
    F = be.config.F
    last = len(be.config.decoder_filters) - 1
    for h, act in (("amp", _ACTIVATIONS[be.config.amp_activation]), ("phase", _pi_tanh)):
        features = taps[f"{h}.decoder.block{last}.up"]
        centre = act(_conv3x3(features[:, : F - 4], w[f"{h}.head.centre.kernel"], w[f"{h}.head.centre.bias"]))
        np.testing.assert_allclose(taps[f"{h}.head.centre"], centre, rtol=1e-5, atol=1e-6)
        border0 = np.maximum(
            _conv3x3(features[:, F - 4 :], w[f"{h}.head.border.conv0.kernel"], w[f"{h}.head.border.conv0.bias"]), 0
        )
        np.testing.assert_allclose(taps[f"{h}.head.border.conv0"], border0, rtol=1e-5, atol=1e-6)
        up = taps[f"{h}.head.border.up"]
        out = _conv3x3(up, w[f"{h}.head.border.out.kernel"], w[f"{h}.head.border.out.bias"])
        np.testing.assert_allclose(taps[f"{h}.head.border.out"], _swish(out), rtol=1e-5, atol=1e-6)


def test_full_head_activation() -> None:
    be = backend_for(pad_object=False, amp_activation="softplus")
    w = be.export_weights()
    taps = be.forward(random_batch(be.config, 1, seed=2))
    for h, act in (("amp", _ACTIVATIONS["softplus"]), ("phase", _pi_tanh)):
        out = act(_conv3x3(taps[f"{h}.head.full.up"], w[f"{h}.head.full.out.kernel"], w[f"{h}.head.full.out.bias"]))
        np.testing.assert_allclose(taps[f"{h}.head.full.out"], out, rtol=1e-5, atol=1e-6)


def test_one_trace_for_all_batch_sizes_and_bitwise_repeatable() -> None:
    be = backend_for(n_filters_scale=1)
    batch = random_batch(be.config, 2, seed=3)
    first = be.forward(batch)
    second = be.forward(batch)
    be.forward(random_batch(be.config, 3, seed=4))
    assert be.tracing_count() == 1
    for name in first:
        assert np.array_equal(first[name], second[name]), name


@pytest.mark.parametrize(
    "changes",
    [{}, {"gridsize": 1, "object_big": False, "probe_mask": True}, {"pad_object": False, "amp_activation": "swish"}],
    ids=_id,
)
def test_eager_stages_fed_the_forwards_taps_give_its_taps_to_float32_rounding(changes: dict[str, Any]) -> None:
    """Stages run eagerly (tracing one per stage cost more than running it), the forward in its
    tf.function. Fed the forward's own inputs, a stage returns the forward's taps to within a few
    float32 roundings: it computes what the model computes. Not bit for bit on every CPU: on oneDNN
    builds grappler fuses conv + bias + swish in the graph, and the fused swish rounds differently
    from eager's separate sigmoid and multiply (up to 5 ulps of the element on an AVX2-only Xeon;
    bitwise with remapping or oneDNN off, and bitwise on the AMD EPYC this test was written on)."""
    be = backend_for(**changes)
    taps = be.forward(random_batch(be.config, 2, seed=6))
    for stage in stages(be.config):
        produced = be.run_stage(stage, {n: taps[n] for n in stage.inputs})
        assert list(produced) == list(stage.outputs), stage.name
        for name in stage.outputs:
            ours, graph = produced[name], taps[name]
            assert ours.dtype == graph.dtype and ours.shape == graph.shape, name
            assert np.array_equal(np.isnan(ours), np.isnan(graph)), name
            # Two float32 implementations of one activation, each within a few ulps of the exact
            # value: 5 ulps apart at most where measured. 32 ulps of the tap's largest magnitude
            # leaves room for oneDNN's other instruction-set paths (not measured), and is still
            # ~4e-6 of the peak: a stage that computes something else (another activation, a missing
            # bias) is off by orders more.
            peak = np.float32(np.nanmax(np.abs(graph))) if graph.size else np.float32(0)
            bound = 32 * np.spacing(peak)
            assert np.nanmax(np.abs(ours - graph), initial=0) <= bound, (name, float(bound))


def test_forward_rejects_a_malformed_batch() -> None:
    be = backend_for()
    batch = random_batch(be.config, 1)
    bad = CanonicalBatch(x=batch.x.astype(np.float64), offsets=batch.offsets, probe=batch.probe)
    with pytest.raises(ParityInputError, match="'x'"):
        be.forward(bad)


# 3. Physics -------------------------------------------------------------------------------------------


def _shift_zero_fill(img: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """np.roll with the wrapped-around rows and columns zeroed: content moves by +[dx, dy]."""
    out = np.roll(img, (dy, dx), axis=(-2, -1))
    H, W = img.shape[-2:]
    if dy > 0:
        out[..., :dy, :] = 0
    elif dy < 0:
        out[..., H + dy :, :] = 0
    if dx > 0:
        out[..., :, :dx] = 0
    elif dx < 0:
        out[..., :, W + dx :] = 0
    return out


def test_integer_offsets_shift_exactly() -> None:
    rng = np.random.default_rng(0)
    shifts = [(0, 0), (3, -2), (-5, 7), (1, 0), (0, -1), (-11, -13), (20, 4)]
    img = rng.normal(size=(len(shifts), 24, 20)).astype(np.float32)
    offsets = np.array(shifts, dtype=np.float32)
    out = translate(img, offsets)
    expected = np.stack([_shift_zero_fill(img[k], dx, dy) for k, (dx, dy) in enumerate(shifts)])
    assert np.array_equal(out, expected)
    cimg = (img + 1j * rng.normal(size=img.shape)).astype(np.complex64)
    cout = translate(cimg, offsets)
    assert cout.dtype == np.complex64
    assert np.array_equal(cout, np.stack([_shift_zero_fill(cimg[k], dx, dy) for k, (dx, dy) in enumerate(shifts)]))


def test_subpixel_translation_follows_the_spec_rule(spec_translate: Any) -> None:
    rng = np.random.default_rng(1)
    img = rng.normal(size=(3, 9, 11)).astype(np.float32)
    offsets = np.array([[0.3, -0.7], [-2.25, 1.5], [10.6, -3.1]], dtype=np.float32)
    out = translate(img, offsets)
    for k in range(3):
        np.testing.assert_allclose(out[k], spec_translate(img[k], *offsets[k], coords=np.float32), rtol=1e-5, atol=1e-6)


def test_outside_neighbours_contribute_zero_without_renormalising() -> None:
    ones = np.ones((2, 4, 4), np.float32)
    out = translate(ones, np.array([[0.25, 0.0], [-0.25, 0.0]], np.float32))
    # Column 0 samples x = -0.25: the left neighbour is outside, the right one keeps weight 0.75.
    assert np.all(out[0][:, 0] == 0.75) and np.all(out[0][:, 1:] == 1.0)
    assert np.all(out[1][:, 3] == 0.75) and np.all(out[1][:, :3] == 1.0)
    assert np.all(translate(ones, np.array([[4.0, 0.0], [1e9, -1e9]], np.float32)) == 0.0)


def test_non_finite_offsets_give_nan_not_an_error() -> None:
    """A NaN must reach the comparison (where positions are checked), not crash the gather."""
    out = translate(np.ones((2, 4, 4), np.float32), np.array([[np.nan, 0.0], [np.inf, 0.0]], np.float32))
    assert np.all(np.isnan(out[0]))
    assert np.all(np.isnan(out[1]))  # weights (x0 + 1) - x are inf - inf


def test_translation_is_bitwise_tensorflows_own_bilinear_transform() -> None:
    """The gather equals ImageProjectiveTransformV3 (the op the original model used) bit for bit."""
    rng = np.random.default_rng(2)
    K, H, W = 16, 30, 26
    img = rng.normal(size=(K, H, W)).astype(np.float32)
    offsets = rng.uniform(-8, 8, size=(K, 2)).astype(np.float32)
    transforms = np.zeros((K, 8), np.float32)
    transforms[:, 0] = transforms[:, 4] = 1.0
    transforms[:, 2], transforms[:, 5] = -offsets[:, 0], -offsets[:, 1]
    with tf.device("/CPU:0"):
        theirs = tf.raw_ops.ImageProjectiveTransformV3(
            images=img[..., None],
            transforms=transforms,
            output_shape=[H, W],
            fill_value=0.0,
            interpolation="BILINEAR",
            fill_mode="CONSTANT",
        ).numpy()[..., 0]
    assert np.array_equal(translate(img, offsets), theirs)


@pytest.mark.parametrize("free_size", [False, True], ids=["static-size", "free-size"])
@pytest.mark.parametrize("shape", [(3, 8, 8, 64), (2, 16, 12, 5)])
def test_nearest_upsampling_is_bitwise_keras_upsampling2d(shape: tuple[int, int, int, int], free_size: bool) -> None:
    """The model's upsampling (built for cheaper tracing) against Keras's UpSampling2D, forward and
    gradient, in graph mode with a free batch size as the model runs (and with height and width free
    too). The cotangent spans eight decades, so a gradient that summed the four copies in another
    order would not round the same."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=shape).astype(np.float32)
    B, H, W, C = shape
    cotangent = (rng.normal(size=(B, 2 * H, 2 * W, C)) * 10.0 ** rng.uniform(-4, 4, (B, 2 * H, 2 * W, C))).astype(
        np.float32
    )
    h, w = (None, None) if free_size else (H, W)
    spec = [
        tf.TensorSpec([None, h, w, C], tf.float32),
        tf.TensorSpec([None, None if free_size else 2 * H, None if free_size else 2 * W, C], tf.float32),
    ]

    def run(layer: Any) -> tuple[np.ndarray, np.ndarray]:
        def body(x: Any, dy: Any) -> tuple[Any, Any]:
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x)
            return y, tape.gradient(y, x, output_gradients=dy)

        y, dx = tf.function(body, autograph=False).get_concrete_function(*spec)(tf.constant(x), tf.constant(cotangent))
        return y.numpy(), dx.numpy()

    ours = run(PtychoModel(ModelConfig()).make_upsample())
    keras_own = run(keras.layers.UpSampling2D(2, interpolation="nearest"))
    assert ours[0].shape == (B, 2 * H, 2 * W, C)
    assert np.array_equal(ours[0], keras_own[0])
    assert np.array_equal(ours[1], keras_own[1])


def _random_field(shape: tuple[int, ...], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(np.complex64)


def test_fftshift_touches_only_the_spatial_axes() -> None:
    field = _random_field((3, 2, 16, 16), seed=3)
    field[1] *= 5.0  # samples differ, so a shift over the batch axis would show
    field[2, 1] = 0.0
    amp = diffract(field)
    assert amp.shape == field.shape and amp.dtype == np.float32
    for b in range(3):
        assert np.array_equal(amp[b], diffract(field[b : b + 1])[0])
    assert np.array_equal(amp, np.sqrt(np.fft.fftshift(intensity(field), axes=(-2, -1))))
    f64 = field.astype(np.complex128)
    expected = np.sqrt(np.fft.fftshift(np.abs(np.fft.fft2(f64)) ** 2 / 16**2, axes=(-2, -1)))
    np.testing.assert_allclose(amp, expected, rtol=1e-5, atol=1e-5 * expected.max())


def test_diffraction_conserves_energy() -> None:
    field = _random_field((2, 4, 64, 64), seed=4)
    amp = diffract(field).astype(np.float64)
    energy_in = np.sum(np.abs(field.astype(np.complex128)) ** 2, axis=(-2, -1))
    np.testing.assert_allclose(np.sum(amp**2, axis=(-2, -1)), energy_in, rtol=1e-5)


def _coverage(offsets: np.ndarray, N: int, M: int, window: slice) -> np.ndarray:
    """How many of a group's patches (restricted to ``window`` of each) cover each canvas pixel."""
    p = (M - N) // 2
    counts = np.zeros((M, M))
    for dx, dy in offsets.astype(int):
        top, left = p - dy, p - dx
        counts[top + window.start : top + window.stop, left + window.start : left + window.stop] += 1
    return counts


@pytest.mark.parametrize("centre_only", [False, True], ids=["full-patches", "centre-patches"])
def test_merge_then_reextract_recovers_patches(centre_only: bool) -> None:
    """Patches cut from one object at integer offsets come back after merge and re-extraction."""
    config = ModelConfig()
    N, M, C = config.N, config.M, config.C
    p, q = (M - N) // 2, N // 4
    obj = _random_field((M, M), seed=5)
    offsets = np.array([[[-2, -1], [2, -1], [-2, 1], [2, 1]], [[3, 0], [-1, -3], [-1, 2], [-1, 1]]], dtype=np.float32)
    window = np.zeros((N, N), np.float32)
    window[q : 3 * q, q : 3 * q] = 1
    patches = np.zeros((2, C, N, N), np.complex64)
    for b in range(2):
        for c, (dx, dy) in enumerate(offsets[b].astype(int)):
            patches[b, c] = obj[p - dy : p - dy + N, p - dx : p - dx + N]
            if centre_only:
                patches[b, c] *= window
    canvas = merge(patches, offsets, M)
    assert canvas.shape == (2, 1, M, M) and canvas.dtype == np.complex64
    back = reextract(canvas, offsets, N)
    assert back.shape == (2, C, N, N)
    for b in range(2):
        centres = _coverage(offsets[b], N, M, slice(q, 3 * q))
        covered = centres if centre_only else _coverage(offsets[b], N, M, slice(0, N))
        # Numerator counts full (or centre-only) patches, denominator the centre windows + 0.001.
        expected = obj * covered / (centres + 0.001)
        np.testing.assert_allclose(canvas[b, 0], expected, rtol=2e-6, atol=0)
        for c in range(C):
            np.testing.assert_allclose(back[b, c], expected[_patch_window(offsets[b, c], p, N)], rtol=2e-6)
    if centre_only:
        # Where patches agree and only centres are merged, a patch's centre returns up to 0.001/count.
        np.testing.assert_allclose(back[..., q : 3 * q, q : 3 * q], patches[..., q : 3 * q, q : 3 * q], rtol=1e-3)


def _patch_window(offset: np.ndarray, p: int, N: int) -> tuple[slice, slice]:
    dx, dy = offset.astype(int)
    return slice(p - dy, p - dy + N), slice(p - dx, p - dx + N)


def test_merge_centres_offsets_on_the_batch_mean() -> None:
    """A common shift of every offset in the batch leaves the canvas unchanged (d̄ is subtracted)."""
    rng = np.random.default_rng(6)
    patches = _random_field((2, 4, 64, 64), seed=6)
    offsets = rng.integers(-4, 5, size=(2, 4, 2)).astype(np.float32)
    assert np.array_equal(merge(patches, offsets, 78), merge(patches, offsets + np.float32(3.0), 78))


# 4. Weights --------------------------------------------------------------------------------------------


def test_export_round_trip_is_bit_exact() -> None:
    config = ModelConfig()
    weights = generate_weights(config, seed=7)
    exported = TensorFlowBackend(config, weights).export_weights()
    assert list(exported) == list(weights)
    for name, value in weights.items():
        assert exported[name].dtype == value.dtype == np.float32, name
        assert exported[name].shape == value.shape, name
        assert np.array_equal(exported[name], value), name


@pytest.mark.parametrize("corruption", ["missing", "extra", "shape", "dtype"])
def test_invalid_weights_are_rejected_by_name(corruption: str) -> None:
    config = ModelConfig()
    weights = generate_weights(config)
    target = "phase.head.border.conv1.bias"
    if corruption == "missing":
        del weights[target]
    elif corruption == "extra":
        target = "amp.head.full.out.kernel"
        weights[target] = np.zeros((3, 3, 64, 4), np.float32)
    elif corruption == "shape":
        weights[target] = np.zeros((7,), np.float32)
    else:
        weights[target] = weights[target].astype(np.float64)
    with pytest.raises(WeightsError, match=target.replace(".", r"\.")):
        TensorFlowBackend(config, weights)


# 5. Environment and effective configuration ------------------------------------------------------------


def test_environment_reports_the_controls_as_set() -> None:
    env = backend_for().environment()
    json.dumps(env)
    assert env["framework"] == "tensorflow"
    assert env["framework_version"] == tf.__version__
    assert env["device"] == "cpu" and env["tf_device"] == "/CPU:0"
    assert env["dtype"] == "float32"
    assert env["execution"] == "tf.function" and env["jit_compile"] is False
    assert env["tf32_enabled"] is False
    assert env["op_determinism"] is True
    assert env["onednn_opts"] == os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default")
    assert env["numpy_version"] == np.__version__
    assert isinstance(env["intra_op_threads"], int) and isinstance(env["inter_op_threads"], int)


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"N": 128, "gridsize": 1, "n_filters_scale": 1},
        {"object_big": False, "probe_mask": True, "amp_activation": "relu", "max_position_jitter": 6},
        {"pad_object": False, "probe_big": False, "offset": 6, "probe_scale": 10.0, "nphotons": 1e6},
        {"pad_object": False, "amp_activation": "softplus"},
        {"probe_big": False, "amp_activation": "swish", "n_filters_scale": 1, "nphotons": 1e10},
    ],
    ids=_id,
)
def test_effective_config_matches_the_built_model(changes: dict[str, Any]) -> None:
    config = ModelConfig().replace(**changes)
    effective = TensorFlowBackend(config, generate_weights(config)).effective_config()
    assert effective == config.resolved_dict()
    # A valid config of the schema; canvas_size comes back resolved, as built.
    assert ModelConfig.from_mapping(effective) == config.replace(canvas_size=config.M)


def test_unknown_device_and_missing_gpu_fail_clearly() -> None:
    config = ModelConfig()
    weights = generate_weights(config)
    with pytest.raises(ParityInputError, match="'tpu'"):
        TensorFlowBackend(config, weights, device="tpu")
    if tf.config.list_physical_devices("GPU"):  # a GPU machine: cuda must build and run there
        assert "GPU" in TensorFlowBackend(config, weights, device="cuda").environment()["device"].upper()
        return
    with pytest.raises(ParityInputError, match="no GPU"):
        TensorFlowBackend(config, weights, device="cuda")
    assert "no GPU" in (TensorFlowBackend.device_problem("cuda") or "")
    assert TensorFlowBackend.device_problem("cpu") is None


# 6. Physics in tensors: masks, keyword defaults, losses ---------------------------------------------------


@pytest.mark.parametrize("N", [8, 15, 64, 128])
def test_masks_are_the_specs_and_the_backends_own(N: int) -> None:
    centre, border, disk = tfp.centre_mask(N), tfp.border_mask(N), tfp.disk_mask(N)
    for mask in (centre, border, disk):
        assert mask.dtype == np.float32 and mask.shape == (N, N)
    assert np.array_equal(border, 1.0 - centre)
    assert np.array_equal(disk, spec_disk_mask(N).astype(np.float32))


def test_merge_keywords_default_to_the_canonical_merge() -> None:
    rng = np.random.default_rng(8)
    patches = tf.constant(_random_field((2, 4, 16, 16), seed=8))
    offsets = tf.constant(rng.uniform(-3, 3, size=(2, 4, 2)).astype(np.float32))
    default = tfp.merge(patches, offsets, 24).numpy()
    spelled = tfp.merge(
        patches, offsets, 24, translate=tfp.translate, centre_mask=tfp.centre_mask(16), epsilon=tfp.MERGE_EPSILON
    ).numpy()
    assert default.tobytes() == spelled.tobytes()
    assert np.array_equal(merge(patches.numpy(), offsets.numpy(), 24), default)
    moved: list[Any] = []

    def recording(images: Any, offs: Any) -> Any:
        moved.append(offs)
        return tfp.translate(images, offs)

    assert tfp.merge(patches, offsets, 24, translate=recording).numpy().tobytes() == default.tobytes()
    assert len(moved) == 1  # the patches' two parts and the centre masks, stacked: one translation
    ones = tfp.merge(patches, offsets, 24, centre_mask=np.ones((16, 16), np.float32)).numpy()
    assert not np.array_equal(ones, default)
    back = tfp.reextract(tf.constant(default), offsets, 16).numpy()
    assert back.tobytes() == tfp.reextract(tf.constant(default), offsets, 16, translate=recording).numpy().tobytes()
    assert len(moved) == 2


def test_losses_take_amplitude_then_intensity() -> None:
    rng = np.random.default_rng(9)
    amplitude = rng.uniform(0.1, 2, size=(2, 4, 8, 8)).astype(np.float32)
    intensity_ = rng.uniform(0.1, 2, size=(2, 4, 8, 8)).astype(np.float32)
    x = rng.uniform(0, 2, size=(2, 4, 8, 8)).astype(np.float32)
    nll, mae = (t.numpy() for t in tfp.losses(tf.constant(amplitude), tf.constant(intensity_), tf.constant(x)))
    a, i, x64 = (v.astype(np.float64) for v in (amplitude, intensity_, x))
    np.testing.assert_allclose(nll, np.mean(i - x64**2 * np.log(i), axis=(1, 2, 3), keepdims=True), rtol=1e-5)
    np.testing.assert_allclose(mae, np.mean(np.abs(a - x64), axis=(1, 2, 3), keepdims=True), rtol=1e-5)


# 7. Stage names and build hooks: the seam through which tests plant porting bugs ------------------------


def test_stage_methods_have_the_uniform_names_and_argument_orders() -> None:
    expected = {
        "scale_input": ["x"],
        "encode": ["h"],
        "decode": ["branch", "z"],
        "head": ["branch", "features"],
        "object_patches": ["amplitude", "phase"],
        "merge": ["patches", "offsets"],
        "trim": ["canvas"],
        "reextract": ["canvas", "offsets"],
        "illuminate": ["patches", "probe"],
        "diffract": ["field"],
        "outputs": ["diffraction"],
        "losses": ["amplitude", "intensity", "x"],
        "make_activation": ["name"],
        "make_pool": [],
        "make_upsample": [],
        "make_centre_mask": ["N"],
        "make_border_mask": ["N"],
        "make_disk_mask": ["N"],
        "load_weights": ["weights"],
        "translate": ["images", "offsets"],
    }
    for name, params in expected.items():
        assert list(inspect.signature(getattr(PtychoModel, name)).parameters)[1:] == params, name
    assert TensorFlowBackend.model_class is PtychoModel


def test_build_hooks_are_called_once_per_use() -> None:
    calls: list[str] = []

    class Recording(PtychoModel):
        def make_activation(self, name: str) -> Any:
            calls.append(f"activation:{name}")
            return super().make_activation(name)

        def make_pool(self) -> Any:
            calls.append("pool")
            return super().make_pool()

        def make_upsample(self) -> Any:
            calls.append("upsample")
            return super().make_upsample()

        def make_centre_mask(self, N: int) -> np.ndarray:
            calls.append("centre")
            return super().make_centre_mask(N)

        def make_border_mask(self, N: int) -> np.ndarray:
            calls.append("border")
            return super().make_border_mask(N)

        def make_disk_mask(self, N: int) -> np.ndarray:
            calls.append("disk")
            return super().make_disk_mask(N)

    config = ModelConfig(amp_activation="swish", probe_mask=True)
    Recording(config)
    n_up = 2 * (len(config.decoder_filters) + 1)  # decoder blocks and the border branch, per head
    assert sorted(calls) == sorted(
        ["activation:swish", "centre", "border", "disk"] + ["pool"] * len(config.encoder_filters) + ["upsample"] * n_up
    )
    calls.clear()
    Recording(ModelConfig(pad_object=False))
    assert calls.count("upsample") == 2 * (len(ModelConfig().decoder_filters) + 1)  # the full heads
    assert "disk" not in calls


@pytest.fixture(scope="module")
def fixture_batch() -> CanonicalBatch:
    config = ModelConfig()
    return next(iter_batches(load_fixture(bundled_fixture("n64_g2_lines"), config), config, batch_size=2))


def _mutant(model: type[PtychoModel], **changes: Any) -> TensorFlowBackend:
    """A backend built from a PtychoModel subclass: naming it as model_class is all it takes."""

    class Mutant(TensorFlowBackend):
        model_class = model

    config = ModelConfig().replace(**changes)
    return Mutant(config, generate_weights(config, seed=11))  # the weights of backend_for's


def _changed(ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray]) -> list[str]:
    """Taps whose bytes differ, in tap order (both dicts come in that order)."""
    assert list(ours) == list(theirs)
    return [name for name in ours if ours[name].tobytes() != theirs[name].tobytes()]


class AveragePool(PtychoModel):
    def make_pool(self) -> Any:
        return keras.layers.AveragePooling2D(2, strides=2, padding="valid")


class BilinearUp(PtychoModel):
    def make_upsample(self) -> Any:
        return keras.layers.UpSampling2D(2, interpolation="bilinear")


class HalfSigmoid(PtychoModel):
    def make_activation(self, name: str) -> Callable[[Any], Any]:
        return lambda x: 0.5 * tf.sigmoid(x)


class NoBorderMask(PtychoModel):
    def make_border_mask(self, N: int) -> np.ndarray:
        return np.ones((N, N), np.float32)


class FullWindowMerge(PtychoModel):
    def make_centre_mask(self, N: int) -> np.ndarray:
        return np.ones((N, N), np.float32)


class QuarterPixelShift(PtychoModel):
    def translate(self, images: Any, offsets: Any) -> Any:
        return super().translate(images, offsets + 0.25)


class WideDisk(PtychoModel):
    def make_disk_mask(self, N: int) -> np.ndarray:
        return np.ones((N, N), np.float32)


@pytest.mark.parametrize(
    ("model", "changes", "first", "also"),
    [
        (AveragePool, {}, "encoder.block0.pool", ["encoder.block1.conv0"]),
        (BilinearUp, {}, "amp.decoder.block0.up", ["phase.decoder.block0.up", "amp.head.border.up"]),
        (HalfSigmoid, {}, "amp.head.centre", ["amp.head.sum", "object.patches"]),
        (NoBorderMask, {}, "amp.head.border.masked", ["amp.head.sum", "phase.head.border.masked"]),
        (FullWindowMerge, {}, "object.canvas", ["object.reextracted"]),
        (QuarterPixelShift, {}, "object.canvas", ["object.trimmed", "object.reextracted"]),
        (WideDisk, {"probe_mask": True}, "physics.illuminated", ["output.amplitude", "loss.mae"]),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else None,
)
def test_a_subclass_hook_changes_the_model_from_its_tap_on(
    model: type[PtychoModel], changes: dict[str, Any], first: str, also: list[str], fixture_batch: CanonicalBatch
) -> None:
    """Everything before the hooked piece stays bit-identical; the hooked tap and what follows move."""
    default = backend_for(**changes)
    mutant = _mutant(model, **changes)
    ours, theirs = mutant.forward(fixture_batch), default.forward(fixture_batch)
    changed = _changed(ours, theirs)
    assert changed and changed[0] == first, changed[:3]
    assert set(also) <= set(changed)
    # The mutation is numerical, not structural: the harness compares it rather than stopping on config.
    assert mutant.effective_config() == default.effective_config() == default.config.resolved_dict()


def test_a_pool_hook_shows_in_its_block_and_its_stage(fixture_batch: CanonicalBatch) -> None:
    default, mutant = backend_for(), _mutant(AveragePool)
    ours, theirs = mutant.forward(fixture_batch), default.forward(fixture_batch)
    assert ours["encoder.block0.conv1"].tobytes() == theirs["encoder.block0.conv1"].tobytes()
    assert not np.array_equal(ours["encoder.block0.pool"], theirs["encoder.block0.pool"])
    # Layer-local: fed the default's input, the mutant's block differs at the pool and only there.
    stage = next(s for s in stages(default.config) if s.name == "encoder.block0")
    inputs = {n: theirs[n] for n in stage.inputs}
    local = _changed(mutant.run_stage(stage, inputs), default.run_stage(stage, inputs))
    assert local == ["encoder.block0.pool"]


def test_a_translate_override_moves_both_merge_and_reextract(fixture_batch: CanonicalBatch) -> None:
    default, mutant = backend_for(), _mutant(QuarterPixelShift)
    theirs = default.forward(fixture_batch)
    for name in ("object.merge", "object.reextract"):
        stage = next(s for s in stages(default.config) if s.name == name)
        inputs = {n: theirs[n] for n in stage.inputs}
        assert _changed(mutant.run_stage(stage, inputs), default.run_stage(stage, inputs)) == list(stage.outputs)


def test_effective_config_survives_an_activation_it_cannot_name() -> None:
    effective = _mutant(HalfSigmoid, amp_activation="relu").effective_config()
    assert effective["amp_activation"] == "relu"


# ---- start-up lines -------------------------------------------------------------------------------

_NOISE = b"".join(f"{line} (at import)\n".encode() for line in ("I0000 x", *STARTUP_LINES))


def test_startup_lines_are_dropped_and_every_other_line_kept(monkeypatch, capfd):
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    with lines_dropped():
        os.write(2, b"before\n" + _NOISE + b"after, no newline")
    assert capfd.readouterr().err == "before\nI0000 x (at import)\nafter, no newline"
    with pytest.raises(RuntimeError), lines_dropped():
        os.write(2, _NOISE + b"why it failed\n")
        raise RuntimeError
    assert capfd.readouterr().err == "I0000 x (at import)\nwhy it failed\n"
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")  # the user asked for INFO lines
    with lines_dropped():
        os.write(2, _NOISE)
    assert capfd.readouterr().err == _NOISE.decode()


def test_importing_the_backend_prints_none_of_tensorflow_s_startup_lines():
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    done = subprocess.run(
        [sys.executable, "-c", "import backends.tensorflow"], check=False, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert not any(line in done.stderr for line in STARTUP_LINES), done.stderr

"""Tests of the PyTorch backend on its own: structure, physics, weights, controls.

Cross-backend parity is tested elsewhere; here every expectation comes from the spec, from NumPy, or
from exact integer geometry, so a failure points at this backend and nothing else.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from functools import cache
from typing import Any

import numpy as np
import pytest

from parity.plugin import import_framework

torch = import_framework("torch")

import backends.torch as bt  # noqa: E402
from backends.torch import TorchBackend  # noqa: E402
from backends.torch.model import PtychoPINN  # noqa: E402
from parity.batch import CanonicalBatch, disk_mask, random_batch  # noqa: E402
from parity.config import ModelConfig  # noqa: E402
from parity.errors import ParityInputError, WeightsError  # noqa: E402
from parity.taps import tap_specs  # noqa: E402
from parity.weights import count_conv_parameters, generate_weights, parameter_shapes  # noqa: E402

DEFAULT = ModelConfig()

FORWARD_CONFIGS: dict[str, dict[str, Any]] = {
    "default": {},
    "gridsize1": {"gridsize": 1},
    "object_big_false": {"object_big": False},
    "probe_big_false": {"probe_big": False},
    "pad_object_false": {"pad_object": False},
    "probe_mask_true": {"probe_mask": True},
    "swish": {"amp_activation": "swish"},
    "softplus": {"amp_activation": "softplus"},
    "relu": {"amp_activation": "relu"},
    "N128": {"N": 128},
}


@cache
def _weights(config: ModelConfig) -> dict[str, np.ndarray]:
    return generate_weights(config)


@cache
def _backend(config: ModelConfig) -> TorchBackend:
    return TorchBackend(config, _weights(config))


# --- 1. parameter counts -------------------------------------------------------------------------


def _framework_conv_count(model: PtychoPINN) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if name != "log_scale")


def test_conv_parameter_count_matches_spec_table(spec_parameter_count: tuple[dict[str, object], int]) -> None:
    changes, expected = spec_parameter_count
    config = DEFAULT.replace(**changes)
    assert _framework_conv_count(PtychoPINN(config)) == count_conv_parameters(config) == expected


def test_backend_model_counts_parameters_itself() -> None:
    model = _backend(DEFAULT).model
    assert _framework_conv_count(model) == 2_340_208
    assert model.log_scale.numel() == 1


# --- 2. taps -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(FORWARD_CONFIGS))
def test_forward_returns_exactly_the_spec_taps(name: str) -> None:
    config = DEFAULT.replace(**FORWARD_CONFIGS[name])
    B = 1 if config.N == 128 else 2
    batch = random_batch(config, B, seed=5)
    taps = _backend(config).forward(batch)
    specs = tap_specs(config, B)
    assert list(taps) == [s.name for s in specs]
    for spec in specs:
        arr = taps[spec.name]
        assert arr.shape == spec.shape, spec.name
        assert arr.dtype == (np.complex64 if spec.complex else np.float32), spec.name
        assert np.all(np.isfinite(arr)), spec.name
    # The input taps are what the backend received, byte for byte.
    assert taps["input.x"].tobytes() == batch.x.tobytes()
    assert taps["input.offsets"].tobytes() == batch.offsets.tobytes()
    assert taps["input.offsets"].shape == (B, config.C, 1, 2)
    assert taps["input.probe"].tobytes() == batch.probe.tobytes()
    assert taps["input.probe"].dtype == np.complex64
    assert not np.shares_memory(taps["input.x"], batch.x)


def test_forward_is_deterministic_and_rejects_bad_batch() -> None:
    be = _backend(DEFAULT)
    batch = random_batch(DEFAULT, 2, seed=7)
    a, b = be.forward(batch), be.forward(batch)
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)
    bad = CanonicalBatch(x=batch.x.astype(np.float64), offsets=batch.offsets, probe=batch.probe)
    with pytest.raises(ParityInputError, match="'x'"):
        be.forward(bad)


def test_forward_taps_follow_the_spec_formulas() -> None:
    """Relations between taps that the spec states exactly (checked in float64 against float32 taps)."""
    config = DEFAULT.replace(probe_mask=True)
    batch = random_batch(config, 2, seed=11)
    be = _backend(config)
    t = be.forward(batch)
    w = _weights(config)
    s = math.exp(float(w["log_scale"]))
    np.testing.assert_allclose(t["input.scaled"], batch.x / s, rtol=2e-7)
    A, phi = t["amp.head.sum"].astype(np.float64), t["phase.head.sum"].astype(np.float64)
    np.testing.assert_allclose(t["object.patches"], A * np.exp(1j * phi), rtol=0, atol=1e-6)
    c = np.abs(t["phase.head.centre"])
    assert c.max() < math.pi
    N, q = config.N, config.N // 4
    np.testing.assert_array_equal(t["amp.head.padded"][..., q : 3 * q, q : 3 * q], t["amp.head.centre"])
    assert not np.any(np.delete(t["amp.head.padded"], np.s_[q : 3 * q], axis=-1))
    o = t["amp.head.border.out"].astype(np.float64)
    np.testing.assert_array_equal(t["amp.head.border.masked"][..., q : 3 * q, q : 3 * q], 0)
    np.testing.assert_array_equal(t["amp.head.border.masked"][..., :q, :], t["amp.head.border.out"][..., :q, :])
    assert o.min() >= -0.2785  # swish's minimum
    p = (config.M - N) // 2
    np.testing.assert_array_equal(t["object.trimmed"], t["object.canvas"][..., p : p + N, p : p + N])
    psi = batch.probe.astype(np.complex128) * t["object.reextracted"] * disk_mask(N)
    np.testing.assert_allclose(t["physics.illuminated"], psi, rtol=0, atol=1e-6 * np.abs(psi).max())
    amp = t["physics.diffraction"].astype(np.float64) * s
    np.testing.assert_allclose(t["output.amplitude"], amp, rtol=1e-6)
    np.testing.assert_allclose(t["output.intensity"], amp**2, rtol=3e-6)
    for name, arr in t.items():
        if name.endswith((".conv0", ".conv1", ".pool", ".up")):
            assert arr.min() >= 0, f"{name} is not after a ReLU"
    intensity, x = t["output.intensity"].astype(np.float64), batch.x.astype(np.float64)
    nll = np.mean(intensity - x**2 * np.log(np.maximum(intensity, 1e-12)), axis=(1, 2, 3), keepdims=True)
    mae = np.mean(np.abs(t["output.amplitude"] - x), axis=(1, 2, 3), keepdims=True)
    np.testing.assert_allclose(t["loss.poisson_nll"], nll, rtol=1e-4)
    np.testing.assert_allclose(t["loss.mae"], mae, rtol=1e-5)


def test_head_stage_splits_feature_channels_as_specified() -> None:
    """Centre conv reads channels [0, F-4), the border branch the last 4, called as a lone stage."""
    model = _backend(DEFAULT).model
    F_ = DEFAULT.F
    decoded = torch.rand((1, F_, 32, 32), generator=torch.Generator().manual_seed(0))
    changed_tail, changed_head = decoded.clone(), decoded.clone()
    changed_tail[:, F_ - 4 :] += 1.0
    changed_head[:, : F_ - 4] += 1.0
    with torch.inference_mode():
        _, base = model.head("amp", decoded)
        _, tail = model.head("amp", changed_tail)
        _, head = model.head("amp", changed_head)
    assert torch.equal(base["amp.head.centre"], tail["amp.head.centre"])
    assert not torch.equal(base["amp.head.border.conv0"], tail["amp.head.border.conv0"])
    assert torch.equal(base["amp.head.border.out"], head["amp.head.border.out"])
    assert not torch.equal(base["amp.head.centre"], head["amp.head.centre"])


# --- 3. physics ----------------------------------------------------------------------------------


def _shift_with_zero_fill(img: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """np.roll by (dy, dx) over the last two axes, with the wrapped-around part set to zero."""
    out = np.roll(img, (dy, dx), axis=(-2, -1))
    H, W = img.shape[-2:]
    if dy >= 0:
        out[..., : min(dy, H), :] = 0
    else:
        out[..., max(H + dy, 0) :, :] = 0
    if dx >= 0:
        out[..., :, : min(dx, W)] = 0
    else:
        out[..., :, max(W + dx, 0) :] = 0
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.complex64])
def test_integer_offsets_shift_exactly(dtype: type) -> None:
    rng = np.random.default_rng(0)
    shifts = [(0, 0), (3, -2), (-5, 7), (1, 1), (-17, 0), (40, -40), (0, -78)]
    img = rng.standard_normal((len(shifts), 1, 20, 24))
    if dtype is np.complex64:
        img = img + 1j * rng.standard_normal(img.shape)
    img = img.astype(dtype)
    offsets = np.array(shifts, dtype=np.float32).reshape(len(shifts), 1, 2)
    out = bt.translate(img, offsets)
    assert out.dtype == dtype
    for k, (dx, dy) in enumerate(shifts):
        assert np.array_equal(out[k, 0], _shift_with_zero_fill(img[k, 0], dx, dy)), (dx, dy)


def test_subpixel_translation_matches_the_formula(spec_translate: Any) -> None:
    rng = np.random.default_rng(1)
    img = (rng.standard_normal((4, 12, 12)) + 1j * rng.standard_normal((4, 12, 12))).astype(np.complex64)
    offs = np.array([[0.25, -0.5], [-3.7, 2.2], [11.5, 0.5], [-0.001, 12.9]], dtype=np.float32)
    out = bt.translate(img, offs)
    for k in range(4):
        ref = spec_translate(img[k].astype(np.complex128), float(offs[k, 0]), float(offs[k, 1]))
        np.testing.assert_allclose(out[k], ref, rtol=0, atol=2e-6)


def test_translation_keeps_inside_neighbours_at_the_border() -> None:
    """Sample point outside the image: the inside neighbour still contributes with its own weight."""
    img = np.ones((1, 4, 4), dtype=np.float32)
    out = bt.translate(img, np.array([[0.5, 0.0]], dtype=np.float32))
    np.testing.assert_array_equal(out[0, :, 0], 0.5)  # x = -0.5: only x = 0 is inside, weight 0.5
    np.testing.assert_array_equal(out[0, :, 1:], 1.0)


def test_fftshift_touches_only_the_spatial_axes() -> None:
    rng = np.random.default_rng(2)
    shape = (3, 2, 16, 16)
    field = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)
    field *= np.arange(1, 4, dtype=np.float32)[:, None, None, None]  # samples clearly differ
    out = bt.diffract(field)
    F = np.fft.fft2(field.astype(np.complex128), axes=(-2, -1))
    ref = np.sqrt(np.fft.fftshift(np.abs(F) ** 2 / 16**2, axes=(-2, -1)))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6 * ref.max())
    wrong = np.sqrt(np.fft.fftshift(np.abs(F) ** 2 / 16**2))
    assert not np.allclose(out, wrong, rtol=1e-3)
    for b in range(3):
        np.testing.assert_allclose(bt.diffract(field[b : b + 1])[0], out[b], rtol=1e-6, atol=0)


def test_diffraction_conserves_energy() -> None:
    batch = random_batch(DEFAULT, 2, seed=3)
    t = _backend(DEFAULT).forward(batch)
    psi = t["physics.illuminated"].astype(np.complex128)
    amp = t["physics.diffraction"].astype(np.float64)
    np.testing.assert_allclose(np.sum(amp**2, axis=(-2, -1)), np.sum(np.abs(psi) ** 2, axis=(-2, -1)), rtol=1e-5)


def test_merge_then_reextract_recovers_patch_centres() -> None:
    """Patches cut at integer offsets from one object, zero outside their central window (as the
    centre head makes them): after merge and re-extract each central window holds the object again,
    scaled by m / (m + 0.001), m the number of central windows covering the pixel."""
    rng = np.random.default_rng(4)
    N, M, B, C, q = 16, 32, 2, 4, 4
    obj = (rng.uniform(0.5, 1.0, (B, 48, 48)) * np.exp(1j * rng.uniform(-1, 1, (B, 48, 48)))).astype(np.complex64)
    offsets = np.array([[[2, 1], [-3, 2], [0, -4], [1, 1]], [[-1, -1], [4, 0], [-2, 3], [-1, -2]]], dtype=np.float32)
    assert not np.any(offsets.sum(axis=1))
    centre = np.zeros((N, N), dtype=np.float32)
    centre[q : 3 * q, q : 3 * q] = 1
    top = 16  # the group centre's patch top-left in the object; patch c sits at top - d_bc
    patches = np.zeros((B, C, N, N), dtype=np.complex64)
    count = np.zeros((B, 48, 48))
    for b in range(B):
        for c in range(C):
            dx, dy = (int(v) for v in offsets[b, c])
            r, k = top - dy, top - dx
            patches[b, c] = obj[b, r : r + N, k : k + N] * centre
            count[b, r + q : r + 3 * q, k + q : k + 3 * q] += 1
    canvas = bt.merge(patches, offsets, M)
    assert canvas.shape == (B, 1, M, M) and canvas.dtype == np.complex64
    back = bt.reextract(canvas, offsets, N)
    assert back.shape == (B, C, N, N)
    for b in range(B):
        for c in range(C):
            dx, dy = (int(v) for v in offsets[b, c])
            r, k = top - dy + q, top - dx + q
            m = count[b, r : r + 2 * q, k : k + 2 * q]
            expected = obj[b, r : r + 2 * q, k : k + 2 * q] * (m / (m + 0.001))
            got = back[b, c, q : 3 * q, q : 3 * q]
            np.testing.assert_allclose(got, expected, rtol=1e-6, atol=0)
            np.testing.assert_allclose(got, obj[b, r : r + 2 * q, k : k + 2 * q], rtol=1.1e-3)


def test_merge_centres_offsets_on_the_batch_mean() -> None:
    rng = np.random.default_rng(6)
    patches = (rng.standard_normal((2, 4, 16, 16)) + 1j).astype(np.complex64)
    offsets = rng.integers(-4, 5, size=(2, 4, 2)).astype(np.float32)
    shifted = offsets + np.array([3, -2], dtype=np.float32)
    assert np.array_equal(bt.merge(patches, offsets, 32), bt.merge(patches, shifted, 32))


# --- 4. weights ----------------------------------------------------------------------------------


@pytest.mark.parametrize("changes", [{}, {"pad_object": False}])
def test_export_round_trip_is_bit_exact(changes: dict[str, object]) -> None:
    config = DEFAULT.replace(**changes)
    weights = _weights(config)
    exported = _backend(config).export_weights()
    assert list(exported) == list(parameter_shapes(config))
    for name, arr in weights.items():
        assert exported[name].dtype == arr.dtype and exported[name].shape == arr.shape, name
        assert np.array_equal(exported[name], arr), name


def test_kernel_layout_is_cross_correlation_in_canonical_orientation() -> None:
    """A canonical kernel with a single 1 at (kh=0, kw=2) must read input pixel (i - 1, j + 1)."""
    weights = dict(_weights(DEFAULT))
    kernel = np.zeros_like(weights["encoder.block0.conv0.kernel"])
    kernel[0, 2, 1, 3] = 1.0  # input channel 1 -> output channel 3
    weights["encoder.block0.conv0.kernel"] = kernel
    weights["encoder.block0.conv0.bias"] = np.zeros_like(weights["encoder.block0.conv0.bias"])
    be = TorchBackend(DEFAULT, weights)
    img = np.random.default_rng(8).standard_normal((1, 4, 8, 8)).astype(np.float32)
    conv = dict(be.model.named_modules())["encoder.block0.conv0"]
    with torch.inference_mode():
        out = conv(torch.from_numpy(img)).numpy()
    expected = np.zeros((8, 8), dtype=np.float32)
    expected[1:, :-1] = img[0, 1, :-1, 1:]
    np.testing.assert_array_equal(out[0, 3], expected)
    assert not np.any(out[0, :3]) and not np.any(out[0, 4:])


@pytest.mark.parametrize("fault", ["missing", "extra", "shape"])
def test_bad_weights_raise_naming_the_parameter(fault: str) -> None:
    weights = dict(_weights(DEFAULT))
    name = "phase.head.border.conv1.bias"
    if fault == "missing":
        del weights[name]
    elif fault == "extra":
        name = "phase.head.full.out.kernel"
        weights[name] = np.zeros((3, 3, 64, 4), dtype=np.float32)
    else:
        weights[name] = np.zeros((3,), dtype=np.float32)
    with pytest.raises(WeightsError, match=name.replace(".", r"\.")):
        TorchBackend(DEFAULT, weights)


# --- 5. environment and effective config --------------------------------------------------------


def test_environment_reports_the_controls_as_set() -> None:
    env = _backend(DEFAULT).environment()
    assert env["framework"] == "torch"
    assert env["framework_version"] == torch.__version__
    assert env["device"] == "cpu" and env["dtype"] == "float32"
    assert env["numpy_version"] == np.__version__
    assert env["deterministic_algorithms"] is True and env["deterministic_warn_only"] is False
    assert env["cudnn_allow_tf32"] is False and env["cuda_matmul_allow_tf32"] is False
    assert env["float32_matmul_precision"] == "highest"
    assert env["cudnn_deterministic"] is True and env["cudnn_benchmark"] is False
    assert env["threads"] == torch.get_num_threads() and env["threads"] >= 1
    assert isinstance(env["mkldnn_enabled"], bool)
    assert torch.are_deterministic_algorithms_enabled()
    json.dumps(env)


def test_deterministic_algorithms_are_on_without_loading_inductor() -> None:
    """Building the backend turns ATen's deterministic algorithms on and leaves TorchInductor
    unloaded (its import is about a second of every process). Where the private setter fails, the
    public call sets the flag; once Inductor is loaded, the public call sets Inductor's own flag
    too. In a fresh interpreter: this process has long loaded what it loads."""
    code = """
import sys, torch
from backends.torch import TorchBackend
from backends.torch.backend import use_deterministic_algorithms
from parity.config import ModelConfig
from parity.weights import generate_weights
TorchBackend(ModelConfig(), generate_weights(ModelConfig()))
print(torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
      "torch._inductor" in sys.modules)
setter = torch._C._set_deterministic_algorithms
setter(False)
calls = []
def changed(*args, **kwargs):  # a setter whose signature changed; the public call knows the new one
    calls.append(args)
    if len(calls) == 1:
        raise TypeError("_set_deterministic_algorithms() got an unexpected keyword argument")
    return setter(*args, **kwargs)
torch._C._set_deterministic_algorithms = changed
use_deterministic_algorithms()
print(torch.are_deterministic_algorithms_enabled(), "torch._inductor" in sys.modules)
torch._C._set_deterministic_algorithms = setter
setter(False)
import torch._inductor.config as inductor
inductor.deterministic = False
use_deterministic_algorithms()
print(torch.are_deterministic_algorithms_enabled(), inductor.deterministic)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "False", "False", "True", "True", "True", "True"], out.stdout + out.stderr


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"gridsize": 1, "object_big": False, "amp_activation": "relu"},
        {"pad_object": False, "probe_big": False, "n_filters_scale": 1, "amp_activation": "softplus"},
        {"N": 128, "probe_mask": True, "amp_activation": "swish", "offset": 6, "max_position_jitter": 8},
    ],
)
def test_effective_config_is_read_back_from_the_model(changes: dict[str, object]) -> None:
    config = DEFAULT.replace(**changes)
    be = _backend(config) if config.N == 64 else TorchBackend(config, _weights(config))
    assert be.effective_config() == config.resolved_dict()


def test_device_errors_are_clear() -> None:
    with pytest.raises(ParityInputError, match="'tpu'"):
        TorchBackend(DEFAULT, _weights(DEFAULT), device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ParityInputError, match=r"torch\.cuda\.is_available\(\) is False"):
            TorchBackend(DEFAULT, _weights(DEFAULT), device="cuda")
        assert "is_available() is False" in (TorchBackend.device_problem("cuda:0") or "")
    assert TorchBackend.device_problem("cpu") is None
    assert "not supported" in (TorchBackend.device_problem("gpu") or "")

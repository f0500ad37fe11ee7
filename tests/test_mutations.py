"""The mutation catalogue: realistic porting bugs planted in either framework must be caught, named at
their tap end to end and locally, and blamed on the right backend.

Each bug is planted the documented way (docs/mutations.md, "Seams"): a subclass of the backend's
model overrides one stage method or build hook, copied from the real one with one mistake, and a
subclass of the backend builds it (``model_class``). Nothing in the product code switches a bug on,
and nothing is monkeypatched. The harness then runs the bundled fixture through the float64
reference, the mutated backend and the clean other framework, and must

- fail the run;
- name as first divergence exactly the first tap, in order of computation, whose values the bug
  changes (``Mutation.first_tap``, worked out from the model's structure);
- name the same tap as the first that differs locally (its stage fed the reference's inputs);
- blame the mutated backend alone, and show why: the other framework still agrees there.

Every run has two groups per batch, so bugs along the batch axis show. ``test_unmutated_backends_pass``
runs each config and fixture with the same settings and no bug: it is what makes a failure above
attributable to the planted bug and nothing else.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
import tensorflow as tf
import torch
from torch import nn

from backends.reference.backend import ReferenceBackend
from backends.tensorflow import physics as tf_physics
from backends.tensorflow.backend import TensorFlowBackend
from backends.tensorflow.model import PtychoModel
from backends.torch import physics as torch_physics
from backends.torch.backend import TorchBackend
from backends.torch.model import PtychoPINN
from parity.backend import Backend
from parity.compare import ComparisonResult
from parity.config import ModelConfig
from parity.fixture import bundled_fixture, iter_batches, load_fixture
from parity.report import write_reports
from parity.runner import ParityResult
from parity.session import RunSpec, resolve_weights, run

CONFIG = ModelConfig()  # N=64, gridsize 2, object_big, probe_big, sigmoid: four patches per group
BATCH_SIZE = 2  # two groups per batch: an fftshift or a mean over the batch moves data across groups
MAX_GROUPS = 2
OFFCENTRE = "n64_g2_offcentre"  # offsets relative to each group's first member: the batch mean d̄ ≠ 0

Tensor = Any


def _spec(config: ModelConfig, fixture: str | None) -> RunSpec:
    # require=True: a missing framework must fail these tests, not drop a backend silently.
    return RunSpec(config=config, fixture=fixture, batch_size=BATCH_SIZE, max_groups=MAX_GROUPS, require=True)


def _edit_weights(edit: Callable[[dict[str, np.ndarray]], None]) -> Callable[[Any, Mapping[str, np.ndarray]], None]:
    """A load_weights that feeds the real one arrays a faulty conversion step has edited."""

    def load_weights(self: Any, weights: Mapping[str, np.ndarray]) -> None:
        converted = {name: np.array(arr, copy=True) for name, arr in weights.items()}
        edit(converted)
        super(type(self), self).load_weights(converted)

    return load_weights


def _torch_model(name: str, **overrides: Any) -> type[PtychoPINN]:
    return type(name, (PtychoPINN,), overrides)


def _tf_model(name: str, **overrides: Any) -> type[PtychoModel]:
    return type(name, (PtychoModel,), overrides)


# --- bugs planted in the torch model ------------------------------------------------------------------


def _t_merge_sign(self: PtychoPINN, patches: Tensor, offsets: Tensor) -> Tensor:
    return PtychoPINN.merge(self, patches, -offsets)  # BUG: moves patches by +(d - d̄), not -(d - d̄)


def _t_silu(self: PtychoPINN, name: str) -> nn.Module:
    # BUG: nn.SiLU ("Sigmoid Linear Unit") taken for the sigmoid. The model still says "sigmoid", as a
    # port's own name table would, so only the values can give it away.
    return nn.SiLU() if name == "sigmoid" else PtychoPINN.make_activation(self, name)


def _t_head_without_border(self: PtychoPINN, h: str, decoded: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    head = self.branch(h).head
    assert head.centre is not None
    F_ = decoded.shape[1]
    centre = head.activation(head.centre(decoded[:, : F_ - 4]))
    q = self.patch_size // 4
    padded = torch.nn.functional.pad(centre, (q, q, q, q))
    return padded, {f"{h}.head.centre": centre, f"{h}.head.padded": padded}  # BUG: border never added


def _t_reextract_reversed(self: PtychoPINN, canvas: Tensor, offsets: Tensor) -> Tensor:
    return PtychoPINN.reextract(self, canvas, offsets).flip(1)  # BUG: patch c lands in slot C-1-c


def _drop_phase_bias(weights: dict[str, np.ndarray]) -> None:
    name = "phase.decoder.block1.conv0.bias"
    weights[name] = np.zeros_like(weights[name])  # BUG: this bias is lost on load and left at zero


def _t_bilinear_up(self: PtychoPINN) -> nn.Module:
    return nn.Upsample(scale_factor=2, mode="bilinear")  # BUG: the spec upsamples nearest


def _t_scale_multiplied(self: PtychoPINN, x: Tensor) -> Tensor:
    return x * torch.exp(self.log_scale)  # BUG: the input is divided by exp(log_scale)


def _t_merge_across_groups(self: PtychoPINN, patches: Tensor, offsets: Tensor) -> Tensor:
    # BUG: every patch of the batch merged into one canvas (a reshape that folds B into C), then
    # handed to each group: groups see each other's patches.
    B, C, N = patches.shape[0], patches.shape[1], patches.shape[-1]
    canvas = PtychoPINN.merge(self, patches.reshape(1, B * C, N, N), offsets.reshape(1, B * C, 2))
    return canvas.expand(B, *canvas.shape[1:])


def _t_mae_squared(self: PtychoPINN, amplitude: Tensor, intensity: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    nll, _ = PtychoPINN.losses(self, amplitude, intensity, x)
    return nll, (amplitude - x).square().mean(dim=(1, 2, 3), keepdim=True)  # BUG: MAE is |a - x|


def _t_merge_ignores_mean_offset(self: PtychoPINN, patches: Tensor, offsets: Tensor) -> Tensor:
    M, p = self.canvas_size, torch_physics.pad_to_canvas
    shift = -offsets  # BUG: the spec moves each patch by -(d - d̄), d̄ the batch's mean offset
    window = p(self.centre_mask, M).expand(*patches.shape[:-2], M, M)
    numerator = self.translate(p(patches, M), shift).sum(dim=1, keepdim=True)
    denominator = self.translate(window, shift).sum(dim=1, keepdim=True) + torch_physics.MERGE_EPSILON
    return torch.complex(numerator.real / denominator, numerator.imag / denominator)


def _t_merge_epsilon(self: PtychoPINN, patches: Tensor, offsets: Tensor) -> Tensor:
    return torch_physics.merge(
        patches, offsets, self.canvas_size, translate=self.translate, centre_mask=self.centre_mask, epsilon=1e-4
    )  # BUG: the spec adds 0.001 to the denominator


def _disk_without_half_pixel(self: Any, N: int) -> np.ndarray:
    c = np.arange(N) - N / 2  # BUG: pixel centres are at +0.5
    r2 = c[:, None] ** 2 + c[None, :] ** 2
    return (r2 < (N / 4) ** 2).astype(np.float32)


def _t_disk_half_pixel(self: PtychoPINN, N: int) -> Tensor:
    return torch.from_numpy(_disk_without_half_pixel(self, N))


def _t_canvas_centre_brightened(self: PtychoPINN, patches: Tensor, offsets: Tensor) -> Tensor:
    # BUG: confined to the central windows (count >= 1), whose values are ~1000x below the ring's with
    # pad_object=false: 0.2 % there, nothing elsewhere.
    canvas = PtychoPINN.merge(self, patches, offsets)
    M = self.canvas_size
    shift = -(offsets - offsets.reshape(-1, 2).mean(dim=0))
    window = torch_physics.pad_to_canvas(self.centre_mask, M).expand(*patches.shape[:-2], M, M)
    covered = self.translate(window, shift).sum(dim=1, keepdim=True) >= 1.0
    return torch.where(covered, canvas * (1 + 2e-3), canvas)


def _scale_one_bias(weights: dict[str, np.ndarray]) -> None:
    name = "amp.decoder.block1.conv1.bias"  # BUG: one bias off by 0.1 % (a unit applied twice)
    weights[name] = (weights[name] * np.float32(1.001)).astype(np.float32)


# --- bugs planted in the TensorFlow model -------------------------------------------------------------


def _f_avg_pool(self: PtychoModel) -> Any:
    return keras.layers.AveragePooling2D(2, strides=2, padding="valid")  # BUG: the spec max-pools


def _f_relu_for_softplus(self: PtychoModel, name: str) -> Callable[[Tensor], Tensor]:
    if name == "softplus":
        return tf.nn.relu  # BUG: "softplus" mapped to its limit, ReLU
    return PtychoModel.make_activation(self, name)


def _f_no_log_scale(self: PtychoModel, diffraction: Tensor) -> tuple[Tensor, Tensor]:
    return diffraction, tf.square(diffraction)  # BUG: amplitude = diffraction * exp(log_scale)


def _f_fftshift_all_axes(self: PtychoModel, field: Tensor) -> Tensor:
    N = int(field.shape[-1])
    spectrum = tf.signal.fft2d(field)
    intensity = (tf.square(tf.math.real(spectrum)) + tf.square(tf.math.imag(spectrum))) / float(N * N)
    return tf.sqrt(tf.signal.fftshift(intensity))  # BUG: no axes=(-2, -1): batch and channels shift too


def _f_border_mask_inverted(self: PtychoModel, N: int) -> np.ndarray:
    return tf_physics.centre_mask(N)  # BUG: the border branch keeps the centre instead of the border


def _drop_full_out_bias(weights: dict[str, np.ndarray]) -> None:
    name = "amp.head.full.out.bias"
    weights[name] = np.zeros_like(weights[name])  # BUG: the last conv's bias lost on load


def _swap_kernel_in_out(weights: dict[str, np.ndarray]) -> None:
    name = "encoder.block1.conv1.kernel"  # 64 -> 64 channels: the shape cannot give it away
    weights[name] = np.ascontiguousarray(weights[name].transpose(0, 1, 3, 2))  # BUG: (kh, kw, out, in)


def _f_trim_off_by_one(self: PtychoModel, canvas: Tensor) -> Tensor:
    p = (int(canvas.shape[-1]) - self.N) // 2 + 1  # BUG: the crop starts one pixel late
    return canvas[:, :, p : p + self.N, p : p + self.N]


def _f_nll_over_batch(self: PtychoModel, amplitude: Tensor, intensity: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    nll, mae = PtychoModel.losses(self, amplitude, intensity, x)
    # BUG: the Poisson NLL averaged over the whole batch, not per group
    return tf.broadcast_to(tf.reduce_mean(nll), tf.shape(nll)), mae


def _f_targets_of_another_group(
    self: PtychoModel, amplitude: Tensor, intensity: Tensor, x: Tensor
) -> tuple[Tensor, Tensor]:
    # BUG: the measurements taken in another order than the predictions (reversed along the batch)
    return PtychoModel.losses(self, amplitude, intensity, tf.reverse(x, axis=[0]))


def _f_per_group_mean_offset(self: PtychoModel, patches: Tensor, offsets: Tensor) -> Tensor:
    # BUG: d̄ taken per group (over C), not over all B·C offsets of the batch. The real merge moves by
    # -(o - mean over the batch of o); offsets centred per group have a batch mean of 0.
    return PtychoModel.merge(self, patches, offsets - tf.reduce_mean(offsets, axis=1, keepdims=True))


def _f_rounded_offsets(self: PtychoModel, patches: Tensor, offsets: Tensor) -> Tensor:
    return PtychoModel.merge(self, patches, tf.round(offsets * 8) / 8)  # BUG: positions kept at 1/8 px


def _f_conjugate_probe(self: PtychoModel, patches: Tensor, probe: Tensor) -> Tensor:
    return PtychoModel.illuminate(self, patches, tf.math.conj(probe))  # BUG: the probe's phase flipped


def _f_phase_sign(self: PtychoModel, amplitude: Tensor, phase: Tensor) -> Tensor:
    return PtychoModel.object_patches(self, amplitude, -phase)  # BUG: A·exp(-iφ)


def _f_diffraction_unnormalised(self: PtychoModel, field: Tensor) -> Tensor:
    N = int(field.shape[-1])
    return PtychoModel.diffract(self, field) * float(N)  # BUG: |fft2|² not divided by N²


@dataclass(frozen=True)
class Mutation:
    backend: str  # where the bug is planted: "torch" or "tensorflow"
    model: type  # the mutated model class
    first_tap: str  # the first tap, in order of computation, whose values the bug changes
    why: str
    config: ModelConfig = CONFIG
    fixture: str | None = None  # None: the config's bundled default
    subtle: bool = False  # near float32 noise: its margin is what the tolerance model is judged by


def _t(name: str, first_tap: str, why: str, **kw: Any) -> Mutation:
    overrides = kw.pop("overrides")
    return Mutation("torch", _torch_model(name, **overrides), first_tap, why, **kw)


def _f(name: str, first_tap: str, why: str, **kw: Any) -> Mutation:
    overrides = kw.pop("overrides")
    return Mutation("tensorflow", _tf_model(name, **overrides), first_tap, why, **kw)


MUTATIONS: dict[str, Mutation] = {
    # signs
    "merge_sign_flipped": _t(
        "MergeSign",
        "object.canvas",
        "the merge is the first step that uses the offsets",
        overrides={"merge": _t_merge_sign},
    ),
    "phase_sign_flipped": _f(
        "PhaseSign",
        "object.patches",
        "the phase first enters where the object is formed",
        config=ModelConfig(N=128, gridsize=1),
        overrides={"object_patches": _f_phase_sign},
    ),
    "probe_conjugated": _f(
        "ConjProbe",
        "physics.illuminated",
        "the probe enters at the illumination",
        config=ModelConfig(gridsize=1),
        overrides={"illuminate": _f_conjugate_probe},
    ),
    # axes
    "fftshift_all_axes": _f(
        "ShiftAll",
        "physics.diffraction",
        "the shift is the last step of the diffraction; with two groups of four patches it moves data",
        overrides={"diffract": _f_fftshift_all_axes},
    ),
    "kernel_in_out_swapped": _f(
        "KernelInOut",
        "encoder.block1.conv1",
        "encoder.block1.conv0 and everything before it use other weights",
        overrides={"load_weights": _edit_weights(_swap_kernel_in_out)},
    ),
    # scaling
    "log_scale_not_applied": _f(
        "NoLogScale",
        "output.amplitude",
        "physics.diffraction is defined before exp(log_scale); the factor enters at the output",
        config=ModelConfig(N=128),
        overrides={"outputs": _f_no_log_scale},
    ),
    "input_multiplied_by_scale": _t(
        "ScaleTimes",
        "input.scaled",
        "the first computed tap",
        config=ModelConfig(gridsize=1),
        overrides={"scale_input": _t_scale_multiplied},
    ),
    "diffraction_not_normalised": _f(
        "Unnormalised",
        "physics.diffraction",
        "the 1/N² belongs to the diffraction",
        config=ModelConfig(probe_mask=True),
        overrides={"diffract": _f_diffraction_unnormalised},
    ),
    # activations
    "silu_for_sigmoid": _t(
        "SiLU",
        "amp.head.centre",
        "the amplitude activation is first applied to the centre conv's output",
        overrides={"make_activation": _t_silu},
    ),
    "relu_for_softplus": _f(
        "ReluSoftplus",
        "amp.head.centre",
        "the amplitude activation is first applied to the centre conv's output",
        config=ModelConfig(amp_activation="softplus"),
        overrides={"make_activation": _f_relu_for_softplus},
    ),
    # padding and crops
    "trim_off_by_one": _f(
        "TrimLate",
        "object.trimmed",
        "the canvas is right; only its centre crop is taken one pixel late",
        config=ModelConfig(object_big=False),
        overrides={"trim": _f_trim_off_by_one},
    ),
    "border_branch_missing": _t(
        "NoBorder",
        "amp.head.border.conv0",
        "the first border tap of the amplitude head, right after amp.head.padded",
        overrides={"head": _t_head_without_border},
    ),
    # masks
    "border_mask_inverted": _f(
        "BorderInverted",
        "amp.head.border.masked",
        "the mask multiplies the border branch's output",
        overrides={"make_border_mask": _f_border_mask_inverted},
    ),
    # pooling and upsampling
    "average_pool_for_max": _f(
        "AvgPool", "encoder.block0.pool", "the first pool of the encoder", overrides={"make_pool": _f_avg_pool}
    ),
    "bilinear_upsampling": _t(
        "Bilinear",
        "amp.decoder.block0.up",
        "the first up block is the amplitude decoder's first",
        config=ModelConfig(N=128),
        overrides={"make_upsample": _t_bilinear_up},
    ),
    # lost biases
    "bias_dropped": _t(
        "NoBias",
        "phase.decoder.block1.conv0",
        "the encoder, the whole amplitude branch and phase.decoder.block0 come first and use other weights",
        overrides={"load_weights": _edit_weights(_drop_phase_bias)},
    ),
    "full_head_bias_dropped": _f(
        "NoFullBias",
        "amp.head.full.out",
        "the last conv of the amplitude head, which pad_object=false builds",
        config=ModelConfig(pad_object=False),
        overrides={"load_weights": _edit_weights(_drop_full_out_bias)},
    ),
    # loss terms
    "mae_squared": _t(
        "MaeSquared",
        "loss.mae",
        "the loss is the last step; the Poisson NLL before it is right",
        config=ModelConfig(gridsize=1),
        overrides={"losses": _t_mae_squared},
    ),
    # patch and batch order
    "reextraction_reversed": _t(
        "Reversed",
        "object.reextracted",
        "the canvas and trimmed object do not depend on the order of re-extraction",
        overrides={"reextract": _t_reextract_reversed},
    ),
    "groups_merged_together": _t(
        "AcrossGroups",
        "object.canvas",
        "the merge is where patches of different groups could meet",
        overrides={"merge": _t_merge_across_groups},
    ),
    # the mean offset (offsets not centred per group, so d̄ ≠ 0)
    "merge_ignores_mean_offset": _t(
        "NoMeanOffset",
        "object.canvas",
        "d̄ only enters the merge",
        fixture=OFFCENTRE,
        overrides={"merge": _t_merge_ignores_mean_offset},
    ),
    "mean_offset_per_group": _f(
        "GroupMean",
        "object.canvas",
        "d̄ only enters the merge",
        fixture=OFFCENTRE,
        overrides={"merge": _f_per_group_mean_offset},
    ),
    # subtle: effects near float32 noise, from the tolerance issue; margins in docs/mutations.md
    "merge_epsilon_1e-4": _t(
        "Epsilon",
        "object.canvas",
        "the epsilon only enters the merge's denominator; with probe_big=false only the central windows "
        "(count >= 1) change, by about 1e-3 relative",
        config=ModelConfig(probe_big=False),
        subtle=True,
        overrides={"merge": _t_merge_epsilon},
    ),
    "offsets_rounded_to_eighth_pixel": _f(
        "Rounded",
        "object.canvas",
        "the merge is the first step that uses the offsets",
        subtle=True,
        overrides={"merge": _f_rounded_offsets},
    ),
    "one_bias_scaled_1.001": _t(
        "BiasScaled",
        "amp.decoder.block1.conv1",
        "that conv's output is the first value the bias enters",
        subtle=True,
        overrides={"load_weights": _edit_weights(_scale_one_bias)},
    ),
    "disk_mask_half_pixel_off": _t(
        "Disk",
        "physics.illuminated",
        "with probe_mask the disk multiplies the illuminated field; the harness normalises the probe itself",
        config=ModelConfig(probe_mask=True),
        subtle=True,
        overrides={"make_disk_mask": _t_disk_half_pixel},
    ),
    "canvas_centre_off_0.2%": _t(
        "CentreBright",
        "object.canvas",
        "confined to the central windows, ~1000x below the ring with pad_object=false: the tolerance must "
        "follow the local magnitude to see it",
        config=ModelConfig(pad_object=False),
        subtle=True,
        overrides={"merge": _t_canvas_centre_brightened},
    ),
}

BACKEND_CLASSES: dict[str, type[Backend]] = {"torch": TorchBackend, "tensorflow": TensorFlowBackend}


# --- runs ---------------------------------------------------------------------------------------------


@cache
def _clean(name: str, config: ModelConfig) -> Backend:
    """One clean backend per framework and config, shared by the runs (TensorFlow traces once)."""
    cls: type[Backend] = ReferenceBackend if name == "reference" else BACKEND_CLASSES[name]
    return cls(config, resolve_weights(_spec(config, None)), "cpu")


def mutant_backend(mutation: Mutation) -> Backend:
    """The mutated backend, built the documented way: a subclass whose ``model_class`` is the mutant."""
    base = BACKEND_CLASSES[mutation.backend]
    cls = type(f"Mutated{base.__name__}", (base,), {"model_class": mutation.model})
    return cls(mutation.config, resolve_weights(_spec(mutation.config, None)), "cpu")


def run_mutation(mutation: Mutation | None, config: ModelConfig = CONFIG, fixture: str | None = None) -> ParityResult:
    """One harness run with ``mutation`` planted (None: no bug) and the clean other backends."""
    if mutation is not None:
        config, fixture = mutation.config, mutation.fixture
    overrides = {n: _clean(n, config) for n in ("reference", "torch", "tensorflow")}
    if mutation is not None:
        overrides[mutation.backend] = mutant_backend(mutation)
    return run(_spec(config, fixture), backend_overrides=overrides)


@pytest.fixture(scope="module")
def mutated_run() -> Callable[[str], ParityResult]:
    cache_: dict[str, ParityResult] = {}

    def get(bug: str) -> ParityResult:
        if bug not in cache_:
            cache_[bug] = run_mutation(MUTATIONS[bug])
        return cache_[bug]

    return get


def _comparison(result: ParityResult, tap: str, kind: str, a: str) -> ComparisonResult:
    (found,) = [
        c for t in result.taps if t.name == tap for c in [*t.comparisons, *t.local] if c.kind == kind and c.a == a
    ]
    return found


def test_the_catalogue_spans_both_frameworks_the_config_matrix_and_the_kinds_of_bug():
    assert len(MUTATIONS) >= 20
    by_backend = {m.backend for m in MUTATIONS.values()}
    assert by_backend == {"torch", "tensorflow"}
    configs = {m.config for m in MUTATIONS.values()}
    for wanted in (
        ModelConfig(pad_object=False),
        ModelConfig(N=128),
        ModelConfig(gridsize=1),
        ModelConfig(probe_mask=True),
        ModelConfig(amp_activation="softplus"),
        ModelConfig(object_big=False),
    ):
        assert wanted in configs, wanted.short_id()
    assert any(m.fixture == OFFCENTRE for m in MUTATIONS.values())


@pytest.mark.parametrize("bug", list(MUTATIONS))
def test_planted_bug_is_named_at_its_tap_end_to_end_and_locally_and_blamed(
    bug: str, mutated_run: Callable[[str], ParityResult], tmp_path: Path
) -> None:
    m = MUTATIONS[bug]
    other = "tensorflow" if m.backend == "torch" else "torch"
    result = mutated_run(bug)

    assert result.verdict == "fail" and not result.passed, result.describe_failure()
    assert not result.config_diff  # the bug is in the values, not in the reported config
    fd = result.first_divergence
    assert fd is not None
    assert fd["tap"] == m.first_tap, f"{m.why}\n{result.describe_failure()}"
    assert fd["blamed"] == [m.backend], result.describe_failure()
    local = result.first_local_divergence
    assert local is not None and local["tap"] == m.first_tap, result.describe_failure()
    assert local["backends"] == [m.backend]
    # The other framework still matches the float64 reference there, end to end and locally ...
    assert _comparison(result, m.first_tap, "vs_reference", other).passed
    assert _comparison(result, m.first_tap, "local_vs_reference", other).passed
    # ... and the mutated one does not.
    assert not _comparison(result, m.first_tap, "vs_reference", m.backend).passed

    paths = write_reports(result, tmp_path, html=False)
    report = json.loads(paths["json"].read_text(encoding="utf-8"))
    assert report["passed"] is False
    assert report["first_divergence"] == fd and report["first_local_divergence"] == local


def margin_table(results: Mapping[str, ParityResult]) -> list[dict[str, object]]:
    """One row per planted bug: where it must show, where it showed end to end and locally, who was
    blamed, and by what margin (error over tolerance at the worst element; 1 is on the edge)."""
    rows = []
    for bug, result in results.items():
        m = MUTATIONS[bug]
        other = "tensorflow" if m.backend == "torch" else "torch"
        fd = result.first_divergence or {}
        local = result.first_local_divergence or {}
        margins = fd.get("margins", {})
        rows.append(
            {
                "bug": bug,
                "backend": m.backend,
                "config": m.config.short_id() + (f" ({m.fixture})" if m.fixture else ""),
                "expected tap": m.first_tap,
                "reported tap": fd.get("tap"),
                "local tap": local.get("tap"),
                "blamed": ",".join(fd.get("blamed", [])) or "-",
                "margin": margins.get(m.backend),
                "local margin": local.get("margins", {}).get(m.backend),
                "other backend's margin": margins.get(other),
                "subtle": m.subtle,
            }
        )
    return rows


def test_subtle_bugs_stand_clear_of_float32_noise(mutated_run: Callable[[str], ParityResult]) -> None:
    """The subtle bugs are caught with room to spare, and the clean backend stays well inside."""
    rows = margin_table({b: mutated_run(b) for b, m in MUTATIONS.items() if m.subtle})
    for row in rows:
        assert row["margin"] is not None and row["margin"] > 2.0, row
        assert row["local margin"] is not None and row["local margin"] > 2.0, row
        assert row["other backend's margin"] is not None and row["other backend's margin"] < 0.5, row


def test_missing_border_branch_is_reported_as_missing_taps_not_as_values(
    mutated_run: Callable[[str], ParityResult],
) -> None:
    result = mutated_run("border_branch_missing")
    border = [t for t in result.taps if ".head.border." in t.name or t.name.endswith(".head.sum")]
    assert len(border) == 12
    for t in border:
        assert t.shapes["torch"] is None and t.shapes["tensorflow"] is not None, t.name
        assert _comparison(result, t.name, "vs_reference", "torch").reason == "tap missing from torch", t.name
        assert _comparison(result, t.name, "vs_reference", "tensorflow").passed, t.name


def _perturb_conv(weights: dict[str, np.ndarray]) -> None:
    name = "encoder.block2.conv0.kernel"  # a stale checkpoint for one layer: 1 % off
    weights[name] = (weights[name] * np.float32(1.01)).astype(np.float32)


def test_a_downstream_bug_behind_an_upstream_error_is_named_locally() -> None:
    """One conv's weights are off upstream (its error is carried into everything after it) and the
    border mask is wrong downstream: end to end only the conv can be named; locally both are, and
    the stages between them, fed the reference's inputs, pass."""
    mutation = Mutation(
        "torch",
        _torch_model(
            "ConvAndMask",
            load_weights=_edit_weights(_perturb_conv),
            make_border_mask=lambda self, N: torch_physics.centre_mask(N),  # BUG: keeps the centre
        ),
        "encoder.block2.conv0",
        "two bugs",
    )
    result = run_mutation(mutation)

    assert result.first_divergence["tap"] == "encoder.block2.conv0"
    assert result.first_divergence["blamed"] == ["torch"]
    # End to end, the masked border is off too, but behind the conv's carried error nothing says so.
    assert not _comparison(result, "amp.head.border.masked", "vs_reference", "torch").passed
    failed_locally = [t.name for t in result.taps if any(c.a == "torch" and not c.passed for c in t.local)]
    assert failed_locally[0] == "encoder.block2.conv0"
    assert "amp.head.border.masked" in failed_locally
    assert set(failed_locally) <= {
        "encoder.block2.conv0",
        "encoder.block2.conv1",
        "encoder.block2.pool",
        "amp.head.border.masked",
        "amp.head.sum",
        "phase.head.border.masked",
        "phase.head.sum",
    }, failed_locally
    for between in ("amp.decoder.block0.conv0", "amp.head.centre", "amp.head.border.out"):
        assert _comparison(result, between, "local_vs_reference", "torch").passed, between


LOSS_ORDER = {
    "nll_averaged_over_batch": _f_nll_over_batch,
    "targets_of_another_group": _f_targets_of_another_group,
}


@pytest.mark.parametrize("bug", list(LOSS_ORDER))
def test_a_loss_bug_of_a_ten_thousandth_is_caught_at_the_loss(bug: str) -> None:
    """Two batch-order bugs in the losses change them by 1e-4 (NLL) to 1e-2 (MAE) relative. Fed the
    reference's own outputs, the loss stage alone fails, on TensorFlow only; end to end, the NLL
    fails too (until 2026-12-05 the merge's coordinate term let every loss move by 1e-3 end to end,
    and both bugs were caught locally only)."""
    mutation = Mutation("tensorflow", _tf_model(bug, losses=LOSS_ORDER[bug]), "loss.poisson_nll", bug)
    result = run_mutation(mutation)

    assert result.first_divergence["tap"] == "loss.poisson_nll", result.describe_failure()
    assert result.first_divergence["blamed"] == ["tensorflow"]
    assert result.first_local_divergence["tap"] == "loss.poisson_nll"
    assert result.first_local_divergence["backends"] == ["tensorflow"]
    assert result.first_local_divergence["margins"]["tensorflow"] > 10
    assert _comparison(result, "loss.poisson_nll", "local_vs_reference", "torch").passed


def _t_half_decoder_block(self: Any, h: str, i: int, x: Tensor) -> Any:
    """BUG: the amplitude decoder's first block run in float16 (a mixed-precision leftover)."""
    y, taps = PtychoPINN.decoder_block(self, h, i, x.half().float() if (h, i) == ("amp", 0) else x)
    if (h, i) == ("amp", 0):
        y, taps = y.half().float(), {k: v.half().float() for k, v in taps.items()}
    return y, taps


def _f_half_encoder_block(self: Any, i: int, x: Tensor) -> Any:
    """BUG: the last encoder block's output held in float16."""
    y, taps = PtychoModel.encoder_block(self, i, x)
    if i == 2:
        y, taps = _f_half(y), {k: _f_half(v) for k, v in taps.items()}
    return y, taps


def _f_half(v: Tensor) -> Tensor:
    return tf.cast(tf.cast(v, tf.float16), tf.float32)


BLOCK_SEAM = {
    "torch": Mutation(
        "torch", _torch_model("HalfDecoder", decoder_block=_t_half_decoder_block), "amp.decoder.block0.conv0", ""
    ),
    "tensorflow": Mutation(
        "tensorflow", _tf_model("HalfEncoder", encoder_block=_f_half_encoder_block), "encoder.block2.conv0", ""
    ),
}


@pytest.mark.parametrize("backend", list(BLOCK_SEAM))
def test_a_bug_planted_in_one_block_shows_end_to_end_and_when_the_block_runs_alone(backend: str) -> None:
    """``encode`` and ``decode`` chain the blocks through ``encoder_block`` and ``decoder_block``, and
    layer-local parity runs a block through the same method: a bug there is named at the block's
    first tap both ways (a stage that skipped the seam would compute the block without the bug)."""
    mutation = BLOCK_SEAM[backend]
    result = run_mutation(mutation)

    assert result.first_divergence["tap"] == mutation.first_tap and result.first_divergence["blamed"] == [backend]
    assert result.first_local_divergence["tap"] == mutation.first_tap, result.describe_failure()
    assert result.first_local_divergence["backends"] == [backend]


def _sqrt_floor_diffract(self: Any, field: Tensor) -> Tensor:
    """BUG: amplitude = sqrt(max(|F|²/N², 1e-7)), a floor added "for numerical safety"."""
    N = field.shape[-1]
    spectrum = torch.fft.fft2(field, dim=(-2, -1))
    intensity = torch.fft.fftshift((spectrum.real.square() + spectrum.imag.square()) / float(N * N), dim=(-2, -1))
    return torch.sqrt(intensity.clamp_min(1e-7))


def _scaled_outputs(self: Any, diffraction: Tensor) -> Tensor:
    """BUG: the predicted amplitude 0.8 % high (an intensity scale 1.6 % off)."""
    amplitude = diffraction * torch.exp(self.log_scale) * 1.008
    return amplitude, amplitude.square()


NO_STAGES = {
    "sqrt_floor_in_the_diffraction": (ModelConfig(), _torch_model("SqrtFloor", diffract=_sqrt_floor_diffract)),
    "amplitude_scale_0.8_percent": (ModelConfig(gridsize=1), _torch_model("Scaled", outputs=_scaled_outputs)),
}


@pytest.mark.parametrize("bug", list(NO_STAGES))
def test_a_physics_bug_of_a_backend_that_cannot_run_stages_is_caught_at_its_stage(bug: str) -> None:
    """A backend without run_stage (every wrapped original): the reference runs each stage on the
    backend's own inputs instead, and the bug fails at its own stage. End to end, the floor fails at
    the diffraction too; both bugs once passed there, while the merge's coordinate term gave every
    tap after it a thousand times its error (docs/tolerances.md, "Layer-local parity"). The 0.8 %
    amplitude is still within what the network's carried error allows end to end at gridsize 1."""
    config, model = NO_STAGES[bug]
    no_stages = type("NoStages", (TorchBackend,), {"model_class": model, "runs_stages": False})
    overrides = {
        "reference": _clean("reference", config),
        "torch": no_stages(config, resolve_weights(_spec(config, None)), "cpu"),
    }
    spec = replace(_spec(config, None), backends=("reference", "torch"))
    result = run(spec, backend_overrides=overrides)

    first_tap = "physics.diffraction" if "sqrt" in bug else "output.amplitude"
    assert result.verdict == "fail" and result.local_recomputed == ["torch"]
    assert result.first_local_divergence["tap"] == first_tap, result.describe_failure()
    assert result.first_local_divergence["margins"]["torch"] > 10
    assert "(the reference run on that backend's inputs to it): " in result.describe_failure()
    if "sqrt" in bug:
        assert result.first_divergence["tap"] == first_tap and result.first_divergence["blamed"] == ["torch"]
    else:
        assert result.first_divergence is None, result.describe_failure()


CLEAN = sorted({(m.config, m.fixture or "") for m in MUTATIONS.values()}, key=lambda cf: (cf[0].short_id(), cf[1]))


@pytest.mark.parametrize("config,fixture", CLEAN, ids=[f"{c.short_id()}{'-' + f if f else ''}" for c, f in CLEAN])
def test_unmutated_backends_pass(config: ModelConfig, fixture: str) -> None:
    """Same config, fixture, groups and construction path, no bug: nothing diverges, end to end or
    locally (no false alarms)."""
    result = run_mutation(None, config, fixture or None)

    assert result.passed, result.describe_failure()
    assert result.first_divergence is None and result.first_local_divergence is None
    assert result.groups == MAX_GROUPS and result.batches == 1
    names = [t.name for t in result.taps]
    assert {m.first_tap for m in MUTATIONS.values() if m.config == config} <= set(names)
    for t in result.taps:
        assert {c.a for c in t.comparisons if c.kind == "vs_reference"} == {"torch", "tensorflow"}, t.name
        if not t.name.startswith("input.") or t.name == "input.scaled":
            assert {c.a for c in t.local} == {"torch", "tensorflow"}, t.name


def test_default_that_differs_stops_the_run_with_the_differing_key(tmp_path: Path) -> None:
    """A port whose default for object_big differs: reported as a config difference, before any forward."""
    spec = _spec(CONFIG, None)
    drifted = ModelConfig(object_big=False)
    torch_be = TorchBackend(drifted, resolve_weights(RunSpec(config=drifted)), spec.device)
    calls = []
    original = torch_be.forward
    torch_be.forward = lambda batch: calls.append(1) or original(batch)  # type: ignore[method-assign]

    result = run(spec, backend_overrides={"torch": torch_be})

    assert result.verdict == "config_mismatch" and not result.passed
    assert result.config_diff == {"object_big": {"reference": True, "torch": False, "tensorflow": True}}
    assert not calls and not result.taps
    assert "object_big: reference=True, torch=False, tensorflow=True" in result.describe_failure()
    paths = write_reports(result, tmp_path, html=True)
    report = json.loads(paths["json"].read_text(encoding="utf-8"))
    assert report["verdict"] == "config_mismatch"


# --- gradient parity: bugs only the backward pass shows ----------------------------------------------


def _t_amp_decoder_detached(self: PtychoPINN, h: str, features: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    y, taps = PtychoPINN.decode(self, h, features)
    return (y.detach() if h == "amp" else y), taps  # BUG: a stop-gradient left in from debugging


def _f_log_scale_output_constant(self: PtychoModel, diffraction: Tensor) -> tuple[Tensor, Tensor]:
    amplitude = diffraction * tf.stop_gradient(tf.exp(self.log_scale))  # BUG: log_scale's output path cut
    return amplitude, tf.square(amplitude)


def _translation_op(backward_sign: float) -> Any:
    """A hand-written translation op, as a port adds for speed: the forward shifts by +d, the backward
    shifts the cotangent by ``backward_sign``·d. The adjoint of a bilinear shift with zero fill is the
    shift by -d (the same two weights, read from the other side), so -1 is right and +1 a bug."""

    class Translate(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, images: Tensor, offsets: Tensor) -> Tensor:
            ctx.save_for_backward(offsets)
            return torch_physics.translate(images, offsets)

        @staticmethod
        def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
            (offsets,) = ctx.saved_tensors
            return torch_physics.translate(grad, backward_sign * offsets), None

    return Translate


_TranslateBackwardWrongSign = _translation_op(+1.0)  # BUG: shifts by +d again
_TranslateBackwardInverse = _translation_op(-1.0)  # the inverse, which is the adjoint: no bug


class _PoolTiesToLast(torch.autograd.Function):
    """A hand-written 2x2 max-pool whose backward sends a tie's gradient to the last maximal element."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return torch.nn.functional.max_pool2d(x, 2, 2)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        B, C, H, W = x.shape
        windows = x.reshape(B, C, H // 2, 2, W // 2, 2).permute(0, 1, 2, 4, 3, 5).reshape(B, C, H // 2, W // 2, 4)
        last = 3 - windows.flip(-1).argmax(dim=-1)  # BUG: the spec (and both frameworks) route to the first
        routed = torch.nn.functional.one_hot(last, 4).to(grad.dtype) * grad[..., None]
        return routed.reshape(B, C, H // 2, W // 2, 2, 2).permute(0, 1, 2, 4, 3, 5).reshape(B, C, H, W)


class _PoolModule(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return _PoolTiesToLast.apply(x)


def _t_translate_backward_wrong_sign(self: PtychoPINN, images: Tensor, offsets: Tensor) -> Tensor:
    return _TranslateBackwardWrongSign.apply(images, offsets)


def _t_translate_backward_inverse(self: PtychoPINN, images: Tensor, offsets: Tensor) -> Tensor:
    return _TranslateBackwardInverse.apply(images, offsets)


def _t_pool_ties_to_last(self: PtychoPINN) -> nn.Module:
    return _PoolModule()


def _f_merge_patches_detached(self: PtychoModel, patches: Tensor, offsets: Tensor) -> Tensor:
    return PtychoModel.merge(self, tf.stop_gradient(patches), offsets)  # BUG: a stop-gradient left in


def _f_probe_detached(self: PtychoModel, patches: Tensor, probe: Tensor) -> Tensor:
    return PtychoModel.illuminate(self, patches, tf.stop_gradient(probe))  # the probe is an input: harmless


GRADIENT_MUTATIONS = {
    # The amplitude decoder's output is detached: every forward tap is identical, and in backward order
    # the first gradient it changes is the amplitude decoder's last conv (the heads' own parameters and
    # the whole phase branch still get theirs).
    "amp_decoder_detached": _t(
        "amp_decoder_detached",
        "grad.poisson_nll.amp.decoder.block1.conv1.kernel",
        "stop-gradient on the amplitude decoder's output",
        overrides={"decode": _t_amp_decoder_detached},
    ),
    # log_scale's gradient keeps only its input path: nothing else changes, so log_scale is named.
    "log_scale_output_constant": _f(
        "log_scale_output_constant",
        "grad.poisson_nll.log_scale",
        "exp(log_scale) treated as a constant at the output",
        overrides={"outputs": _f_log_scale_output_constant},
    ),
    # The merge's patches detached: the network's parameters get no gradient at all, log_scale and x
    # keep only their paths around the network; the first in backward order is the last conv's kernel.
    "merge_patches_detached": _f(
        "merge_patches_detached",
        "grad.poisson_nll.phase.head.border.out.kernel",
        "stop-gradient on the merge's input patches",
        overrides={"merge": _f_merge_patches_detached},
    ),
    # A custom translation whose backward shifts the cotangent by +d instead of -d: the merge and the
    # re-extraction carry every parameter's gradient, so the first in backward order is named.
    "translate_backward_wrong_sign": _t(
        "translate_backward_wrong_sign",
        "grad.poisson_nll.phase.head.border.out.kernel",
        "a custom translation whose backward is its forward shift, not its adjoint",
        overrides={"translate": _t_translate_backward_wrong_sign},
    ),
    # Ties exist only where the input is flat (the beamstop's shadow), in the first block's pool; there
    # the tied windows read identical patches, so every parameter's gradient is unchanged and only the
    # input's moves (float64: 12 % of its largest value for the NLL, 42 % for the MAE).
    "pool_ties_to_last": _t(
        "pool_ties_to_last",
        "grad.poisson_nll.input.x",
        "a max-pool whose backward routes a tie to the last maximal element",
        overrides={"make_pool": _t_pool_ties_to_last},
        fixture="n64_g2_beamstop",
    ),
}

# Stop-gradients and "wrong" backwards that change nothing: the harness must stay green. The probe is
# an input, not differentiated; a bilinear shift's inverse is its adjoint (docs/mutations.md).
HARMLESS_GRADIENT_CHANGES = {
    "probe_detached": _f(
        "probe_detached", "", "stop-gradient on the probe", overrides={"illuminate": _f_probe_detached}
    ),
    "translate_backward_inverse": _t(
        "translate_backward_inverse",
        "",
        "a custom translation whose backward is its inverse",
        overrides={"translate": _t_translate_backward_inverse},
    ),
}


def _gradient_run(mutation: Mutation | None) -> ParityResult:
    overrides = {n: _clean(n, CONFIG) for n in ("reference", "torch", "tensorflow")}
    if mutation is not None:
        overrides[mutation.backend] = mutant_backend(mutation)
    fixture = None if mutation is None else mutation.fixture
    spec = RunSpec(
        config=CONFIG, fixture=fixture, batch_size=BATCH_SIZE, max_groups=MAX_GROUPS, require=True, gradients=True
    )
    return run(spec, backend_overrides=overrides)


@pytest.mark.parametrize("bug", list(GRADIENT_MUTATIONS))
def test_gradient_bug_is_named_at_its_first_gradient_in_backward_order(bug: str) -> None:
    m = GRADIENT_MUTATIONS[bug]
    result = _gradient_run(m)

    assert not result.passed and result.gradients and not result.gradients_unsupported
    fd = result.first_divergence
    assert fd is not None and fd["tap"] == m.first_tap, result.describe_failure()
    assert fd["blamed"] == [m.backend], result.describe_failure()
    failing = {c.tap for c in result.failures()}
    assert all(t.startswith("grad.") for t in failing), failing  # the forward pass is untouched
    other = "tensorflow" if m.backend == "torch" else "torch"
    assert _comparison(result, m.first_tap, "vs_reference", other).passed


def test_gradients_of_unmutated_backends_pass_and_follow_the_forward_taps() -> None:
    result = _gradient_run(None)

    assert result.passed, result.describe_failure()
    names = [t.name for t in result.taps]
    first_gradient = names.index("grad.poisson_nll.phase.head.border.out.kernel")
    assert not any(n.startswith("grad.") for n in names[:first_gradient])
    assert names[-1] == "grad.mae.input.x" and names[first_gradient - 1] == "loss.mae"
    for t in result.taps[first_gradient:]:
        assert {c.a for c in t.comparisons if c.kind == "vs_reference"} == {"torch", "tensorflow"}, t.name


@pytest.mark.parametrize("change", list(HARMLESS_GRADIENT_CHANGES))
def test_gradient_changes_that_change_no_gradient_pass(change: str) -> None:
    result = _gradient_run(HARMLESS_GRADIENT_CHANGES[change])
    assert result.passed and result.gradients, result.describe_failure()


def test_the_beamstop_fixture_gives_the_clean_backends_tied_pools_and_no_false_alarm() -> None:
    """What makes ``pool_ties_to_last`` a fair test: on this fixture the clean backends route ties as
    the reference does, and there are ties (the mutant would pass on a fixture without them)."""
    clean = _gradient_run(replace(GRADIENT_MUTATIONS["pool_ties_to_last"], model=PtychoPINN))
    assert clean.passed, clean.describe_failure()
    reference = _clean("reference", CONFIG)
    fixture = load_fixture(bundled_fixture("n64_g2_beamstop"), CONFIG)
    batch = next(iter_batches(fixture, CONFIG, BATCH_SIZE, max_groups=MAX_GROUPS))
    pooled = reference.forward(batch)["encoder.block0.conv1"]
    B, C, H, W = pooled.shape
    windows = pooled.reshape(B, C, H // 2, 2, W // 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(B, C, H // 2, W // 2, 4)
    top = windows.max(axis=-1)
    assert np.sum(((windows == top[..., None]).sum(axis=-1) > 1) & (top > 0)) > 100

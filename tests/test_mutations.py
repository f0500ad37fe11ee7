"""The mutation suite: realistic porting bugs injected into the PyTorch backend must be caught and localised.

Each test plants one bug of the kind that kept PtychoPINN's TensorFlow model and its PyTorch port apart
(a flipped merge sign, a wrong activation, a lost branch, a lost scale, reordered patches, an fftshift
over every axis, a dropped bias, a transposed kernel) into the torch backend, IN THIS TEST ONLY: by
monkeypatching functions of ``backends.torch`` (undone as soon as the run ends) or by building the
torch model through a faulty weight loader. The harness then runs on a bundled fixture with the real
float64 reference and the real TensorFlow backend, and must

- fail the run;
- name as first divergence exactly the first tap, in order of computation, whose values the bug changes
  (worked out from the model structure, see ``MUTATIONS``);
- blame torch alone, and show why: TensorFlow still agrees with the reference at that tap;
- write the same first divergence into the JSON report.

``test_unmutated_torch_backend_passes`` runs the same config with the same settings on an unmutated
torch instance: it is what makes a failure above attributable to the planted bug and nothing else.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as fn
from torch import nn

import backends.torch.backend as torch_backend_module
import backends.torch.model as torch_model
from backends.torch import physics
from backends.torch.backend import TorchBackend
from backends.torch.model import PtychoPINN
from parity.compare import ComparisonResult
from parity.config import ModelConfig
from parity.report import write_reports
from parity.runner import ParityResult
from parity.session import RunSpec, resolve_weights, run

# Defaults: N=64, gridsize 2 (four patches per group at distinct offsets, so a merge sign or a patch
# order is visible), object_big and probe_big (the border branch exists), amp_activation sigmoid.
CONFIG = ModelConfig()
FIXTURE = "n64_g2_lines"
# Two groups in one batch: the batch axis has two entries, so an fftshift over it moves data too.
BATCH_SIZE = 2
MAX_GROUPS = 2

Tensor = torch.Tensor


def _spec(config: ModelConfig = CONFIG) -> RunSpec:
    # require=True: a missing TensorFlow must fail these tests, not drop the arbiter silently.
    fixture = FIXTURE if config.gridsize == 2 and config.N == 64 else None
    return RunSpec(config=config, fixture=fixture, batch_size=BATCH_SIZE, max_groups=MAX_GROUPS, require=True)


def _torch_backend(spec: RunSpec) -> TorchBackend:
    """A torch backend built as the session builds its own: same config, weights and device."""
    return TorchBackend(spec.config, resolve_weights(spec), spec.device)


# --- the bugs ------------------------------------------------------------------------------------------
# Each one is written the way a porter would write it: a copy of the real function with one mistake.


def _merge_translated_by_plus(patches: Tensor, offsets: Tensor, M: int) -> Tensor:
    """physics.merge with the translation sign flipped: +(d - d̄) instead of -(d - d̄)."""
    N = patches.shape[-1]
    dbar = offsets.reshape(-1, 2).mean(dim=0)
    shift = offsets - dbar  # BUG: the spec moves each patch by -(d - d̄)
    mask = physics.pad_to(physics.centre_mask(N, patches.device), M).expand(*patches.shape[:-2], M, M)
    moved = physics.translate(physics.pad_to(patches, M), shift)
    counts = physics.translate(mask, shift)
    numerator = moved.sum(dim=1, keepdim=True)
    denominator = counts.sum(dim=1, keepdim=True) + physics.MERGE_EPSILON
    return torch.complex(numerator.real / denominator, numerator.imag / denominator)


def _reextract_reversed(canvas: Tensor, offsets: Tensor, N: int) -> Tensor:
    """physics.reextract that stacks the cut patches in reverse order (patch c lands in slot C-1-c)."""
    B, C = offsets.shape[:2]
    moved = physics.translate(canvas.expand(B, C, *canvas.shape[-2:]), offsets)
    return physics.crop_centre(moved, N).flip(1)  # BUG: the patch order must be kept


def _diffract_shift_all_axes(field: Tensor) -> Tensor:
    """physics.diffract with fftshift over every axis (batch and channel too), not just (-2, -1)."""
    N = field.shape[-1]
    spectrum = torch.fft.fft2(field, dim=(-2, -1))
    intensity = (spectrum.real.square() + spectrum.imag.square()) / float(N * N)
    return torch.sqrt(torch.fft.fftshift(intensity))  # BUG: no dim=(-2, -1)


def _head_without_border(self: PtychoPINN, h: str, decoded: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """PtychoPINN.head that stops after the centre: the border branch is built (and its weights loaded)
    but never run, so the model reports probe_big true while computing probe_big false."""
    head = self.branch(h).head
    assert head.centre is not None
    F_ = decoded.shape[1]
    centre = head.activation(head.centre(decoded[:, : F_ - 4]))
    q = self.patch_size // 4
    padded = fn.pad(centre, (q, q, q, q))
    return padded, {f"{h}.head.centre": centre, f"{h}.head.padded": padded}  # BUG: border never added


def _outputs_without_scale(self: PtychoPINN, diffraction: Tensor) -> tuple[Tensor, Tensor]:
    """PtychoPINN.outputs that forgets the factor exp(log_scale)."""
    return diffraction, diffraction.square()  # BUG: amplitude = diffraction * exp(log_scale)


def _loader_with(
    edit: Callable[[dict[str, np.ndarray]], None],
) -> Callable[[PtychoPINN, Mapping[str, np.ndarray]], None]:
    """The real weight loader, fed canonical arrays that a faulty conversion step has edited."""
    real = torch_model.load_canonical_weights

    def load(model: PtychoPINN, weights: Mapping[str, np.ndarray]) -> None:
        converted = {name: np.array(arr, copy=True) for name, arr in weights.items()}
        edit(converted)
        real(model, converted)

    return load


def _drop_bias(weights: dict[str, np.ndarray]) -> None:
    # BUG: this conv's bias is lost on load and left at zero.
    weights["phase.decoder.block1.conv0.bias"] = np.zeros_like(weights["phase.decoder.block1.conv0.bias"])


def _swap_kernel_axes(weights: dict[str, np.ndarray]) -> None:
    # BUG: (kh, kw, in, out) read as (kw, kh, in, out) for this one kernel.
    weights["encoder.block1.conv1.kernel"] = weights["encoder.block1.conv1.kernel"].transpose(1, 0, 2, 3)


_REAL_MAKE_ACTIVATION = torch_model.make_activation


def _sigmoid_as_silu(name: str) -> nn.Module:
    # BUG: nn.SiLU ("Sigmoid Linear Unit") taken for the sigmoid; every other activation is right.
    return nn.SiLU() if name == "sigmoid" else _REAL_MAKE_ACTIVATION(name)


def _plant_merge_sign(mp: pytest.MonkeyPatch) -> None:
    mp.setattr(physics, "merge", _merge_translated_by_plus)


def _plant_silu(mp: pytest.MonkeyPatch) -> None:
    mp.setattr(torch_model, "make_activation", _sigmoid_as_silu)
    # The porter's own name table calls the module "sigmoid", so the effective config does not give the
    # bug away before any forward pass: only the values can.
    mp.setitem(torch_model.ACTIVATION_NAMES, nn.SiLU, "sigmoid")


def _plant_no_border(mp: pytest.MonkeyPatch) -> None:
    mp.setattr(PtychoPINN, "head", _head_without_border)


def _plant_no_scale(mp: pytest.MonkeyPatch) -> None:
    mp.setattr(PtychoPINN, "outputs", _outputs_without_scale)


def _plant_reversed_patches(mp: pytest.MonkeyPatch) -> None:
    mp.setattr(physics, "reextract", _reextract_reversed)


def _plant_fftshift_all_axes(mp: pytest.MonkeyPatch) -> None:
    mp.setattr(physics, "diffract", _diffract_shift_all_axes)


def _plant_dropped_bias(mp: pytest.MonkeyPatch) -> None:
    mp.setattr(torch_backend_module, "load_canonical_weights", _loader_with(_drop_bias))


def _plant_swapped_kernel(mp: pytest.MonkeyPatch) -> None:
    mp.setattr(torch_backend_module, "load_canonical_weights", _loader_with(_swap_kernel_axes))


def _plant_merge_epsilon(mp: pytest.MonkeyPatch) -> None:
    mp.setattr(physics, "MERGE_EPSILON", 1e-4)  # BUG: the spec adds 0.001 to the merge's denominator


_REAL_MERGE = physics.merge


def _merge_with_rounded_offsets(patches: Tensor, offsets: Tensor, M: int) -> Tensor:
    # BUG: positions kept at 1/8 pixel, as a port storing them in fixed point would.
    return _REAL_MERGE(patches, torch.round(offsets * 8) / 8, M)


def _plant_rounded_offsets(mp: pytest.MonkeyPatch) -> None:
    mp.setattr(physics, "merge", _merge_with_rounded_offsets)


def _scale_one_bias(weights: dict[str, np.ndarray]) -> None:
    # BUG: one bias off by 0.1 % (a unit conversion applied twice, a stale checkpoint for one layer).
    name = "amp.decoder.block1.conv1.bias"
    weights[name] = (weights[name] * np.float32(1.001)).astype(np.float32)


def _plant_scaled_bias(mp: pytest.MonkeyPatch) -> None:
    mp.setattr(torch_backend_module, "load_canonical_weights", _loader_with(_scale_one_bias))


def _disk_without_half_pixel(N: int, device: torch.device | str = "cpu") -> Tensor:
    c = torch.arange(N, dtype=torch.float64, device=device) - N / 2  # BUG: pixel centres are at +0.5
    r2 = c[:, None] ** 2 + c[None, :] ** 2
    return (r2 < (N / 4) ** 2).to(torch.float32)


def _plant_shifted_disk(mp: pytest.MonkeyPatch) -> None:
    mp.setattr(physics, "disk_mask", _disk_without_half_pixel)


def _merge_centre_brightened(patches: Tensor, offsets: Tensor, M: int) -> Tensor:
    # BUG: confined to the central windows (where the count is at least one), where values are ~1000x
    # smaller than in the ring around them with pad_object=false: 0.2 % there, nothing elsewhere.
    canvas = _REAL_MERGE(patches, offsets, M)
    N = patches.shape[-1]
    shift = -(offsets - offsets.reshape(-1, 2).mean(dim=0))
    mask = physics.pad_to(physics.centre_mask(N, patches.device), M).expand(*patches.shape[:-2], M, M)
    covered = physics.translate(mask, shift).sum(dim=1, keepdim=True) >= 1.0
    return torch.where(covered, canvas * (1 + 2e-3), canvas)


def _plant_centre_brightened(mp: pytest.MonkeyPatch) -> None:
    mp.setattr(physics, "merge", _merge_centre_brightened)


@dataclass(frozen=True)
class Mutation:
    plant: Callable[[pytest.MonkeyPatch], None]
    first_tap: str  # the first tap, in order of computation, whose values the bug changes
    why: str
    config: ModelConfig = CONFIG
    subtle: bool = False  # near float32 noise: its margin is what the tolerance model is judged by


MUTATIONS: dict[str, Mutation] = {
    "merge_sign_flipped": Mutation(
        _plant_merge_sign,
        "object.canvas",
        "the merge is the first step that uses the offsets; patches before it are untouched",
    ),
    "silu_for_sigmoid": Mutation(
        _plant_silu,
        "amp.head.centre",
        "the amplitude activation is applied first to the centre conv's output",
    ),
    "border_branch_missing": Mutation(
        _plant_no_border,
        "amp.head.border.conv0",
        "the first border tap of the amplitude head, which comes right after amp.head.padded",
    ),
    "log_scale_not_applied": Mutation(
        _plant_no_scale,
        "output.amplitude",
        "physics.diffraction is defined before exp(log_scale); the factor enters at the output",
    ),
    "reextraction_reversed": Mutation(
        _plant_reversed_patches,
        "object.reextracted",
        "the canvas and trimmed object do not depend on the order of re-extraction",
    ),
    "fftshift_all_axes": Mutation(
        _plant_fftshift_all_axes,
        "physics.diffraction",
        "the shift is the last step of the diffraction; the illuminated field is untouched",
    ),
    "bias_dropped": Mutation(
        _plant_dropped_bias,
        "phase.decoder.block1.conv0",
        "the encoder, the whole amplitude branch and phase.decoder.block0 come first and use other weights",
    ),
    "kernel_axes_swapped": Mutation(
        _plant_swapped_kernel,
        "encoder.block1.conv1",
        "encoder.block1.conv0 and everything before it use other weights",
    ),
    # Subtle: effects near float32 noise, from the tolerance issue; their margins are in docs/mutations.md.
    "merge_epsilon_1e-4": Mutation(
        _plant_merge_epsilon,
        "object.canvas",
        "the epsilon only enters the merge's denominator; with probe_big=false the ring is empty, so only "
        "the central windows (count >= 1) change, by about 1e-3 relative",
        config=ModelConfig(probe_big=False),
        subtle=True,
    ),
    "offsets_rounded_to_eighth_pixel": Mutation(
        _plant_rounded_offsets,
        "object.canvas",
        "the merge is the first step that uses the offsets",
        subtle=True,
    ),
    "one_bias_scaled_1.001": Mutation(
        _plant_scaled_bias,
        "amp.decoder.block1.conv1",
        "that conv's output is the first value the bias enters",
        subtle=True,
    ),
    "disk_mask_half_pixel_off": Mutation(
        _plant_shifted_disk,
        "physics.illuminated",
        "with probe_mask the disk multiplies the illuminated field; the harness normalises the probe itself",
        config=ModelConfig(probe_mask=True),
        subtle=True,
    ),
    "canvas_centre_off_0.2%": Mutation(
        _plant_centre_brightened,
        "object.canvas",
        "confined to the central windows, whose values are ~1000x below the ring's with pad_object=false: "
        "the tolerance must follow the local magnitude to see it at the merge (a change of ~2e-3 where a "
        "tolerance set by the ring was 0.8)",
        config=ModelConfig(pad_object=False),
        subtle=True,
    ),
}


# --- checks ---------------------------------------------------------------------------------------------


def _run(plant: Callable[[pytest.MonkeyPatch], None] | None = None, config: ModelConfig = CONFIG) -> ParityResult:
    """One harness run with a torch instance built (and run) while ``plant`` is in force, then undone."""
    with pytest.MonkeyPatch.context() as mp:
        if plant is not None:
            plant(mp)
        spec = _spec(config)
        return run(spec, backend_overrides={"torch": _torch_backend(spec)})


@pytest.fixture(scope="module")
def mutated_run() -> Callable[[str], ParityResult]:
    """The run of each planted bug, made once per module (two tests read the border bug's run)."""
    cache: dict[str, ParityResult] = {}

    def get(bug: str) -> ParityResult:
        if bug not in cache:
            cache[bug] = _run(MUTATIONS[bug].plant, MUTATIONS[bug].config)
        return cache[bug]

    return get


def _comparison(result: ParityResult, tap: str, kind: str, a: str) -> ComparisonResult:
    (found,) = [c for t in result.taps if t.name == tap for c in t.comparisons if c.kind == kind and c.a == a]
    return found


@pytest.mark.parametrize("bug", list(MUTATIONS))
def test_planted_bug_is_caught_at_its_first_tap_and_blamed_on_torch(
    bug: str, mutated_run: Callable[[str], ParityResult], tmp_path: Path
) -> None:
    mutation = MUTATIONS[bug]
    result = mutated_run(bug)

    assert result.verdict == "fail" and not result.passed, result.describe_failure()
    assert not result.config_diff  # the bug is in the values, not in the reported config
    fd = result.first_divergence
    assert fd is not None
    assert fd["tap"] == mutation.first_tap, f"{mutation.why}\n{result.describe_failure()}"
    assert fd["blamed"] == ["torch"], result.describe_failure()
    # The report shows which side is wrong: TensorFlow still matches the float64 reference there ...
    tf_vs_ref = _comparison(result, mutation.first_tap, "vs_reference", "tensorflow")
    assert tf_vs_ref.passed, tf_vs_ref.summary()
    # ... and torch does not.
    torch_vs_ref = _comparison(result, mutation.first_tap, "vs_reference", "torch")
    assert not torch_vs_ref.passed

    paths = write_reports(result, tmp_path, html=False)
    report = json.loads(paths["json"].read_text(encoding="utf-8"))
    assert report["passed"] is False
    assert report["first_divergence"] == fd


def margin_table(results: Mapping[str, ParityResult]) -> list[dict[str, object]]:
    """One row per planted bug: where it must show, where it showed, who was blamed, by what margin."""
    rows = []
    for bug, result in results.items():
        m = MUTATIONS[bug]
        fd = result.first_divergence or {}
        margins = fd.get("margins", {})
        rows.append(
            {
                "bug": bug,
                "config": m.config.short_id(),
                "expected tap": m.first_tap,
                "reported tap": fd.get("tap"),
                "blamed": ",".join(fd.get("blamed", [])) or "-",
                "margin": margins.get("torch"),
                "other backend's margin": margins.get("tensorflow"),
                "subtle": m.subtle,
            }
        )
    return rows


def test_subtle_bugs_stand_clear_of_float32_noise(mutated_run: Callable[[str], ParityResult]) -> None:
    """The subtle bugs are caught with room to spare, and the clean backend stays well inside."""
    rows = margin_table({b: mutated_run(b) for b, m in MUTATIONS.items() if m.subtle})
    for row in rows:
        assert row["margin"] is not None and row["margin"] > 2.0, row
        assert row["other backend's margin"] is not None and row["other backend's margin"] < 0.5, row


def test_missing_border_branch_is_reported_as_missing_taps_not_as_values(
    mutated_run: Callable[[str], ParityResult],
) -> None:
    """The border bug is named by its absence: every amp/phase border tap is missing from torch only."""
    result = mutated_run("border_branch_missing")

    border = [t for t in result.taps if ".head.border." in t.name or t.name.endswith(".head.sum")]
    assert len(border) == 12
    for t in border:
        assert t.shapes["torch"] is None and t.shapes["tensorflow"] is not None, t.name
        torch_vs_ref = _comparison(result, t.name, "vs_reference", "torch")
        assert torch_vs_ref.reason == "tap missing from torch", t.name
        assert _comparison(result, t.name, "vs_reference", "tensorflow").passed, t.name


@pytest.mark.parametrize(
    "config", sorted({m.config for m in MUTATIONS.values()}, key=ModelConfig.short_id), ids=ModelConfig.short_id
)
def test_unmutated_torch_backend_passes(config: ModelConfig) -> None:
    """Same config, fixture, groups and injection path, no bug: nothing diverges (no false alarms)."""
    result = _run(config=config)

    assert result.passed, result.describe_failure()
    assert result.first_divergence is None
    assert result.groups == MAX_GROUPS
    names = [t.name for t in result.taps]
    assert {m.first_tap for m in MUTATIONS.values() if m.config == config} <= set(names)
    for t in result.taps:
        assert {c.a for c in t.comparisons if c.kind == "vs_reference"} == {"torch", "tensorflow"}, t.name


def test_default_that_differs_stops_the_run_with_the_differing_key(tmp_path: Path) -> None:
    """A port whose default for object_big differs: reported as a config difference, before any forward."""
    spec = _spec()
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
    assert report["config_diff"]["object_big"]["torch"] is False
    assert "| `object_big` |" in paths["markdown"].read_text(encoding="utf-8")

"""The shipped adapters of the ORIGINAL PtychoPINN (adapters/ptychopinn), against a checkout of it.

Run with ``pytest tests/adapters --ptychopinn=/path/to/PtychoPINN`` (hoidn/PtychoPINN, written for
712c23f3); without the option every test here is deselected. They need the distribution
``ptycho-parity-ptychopinn`` installed (``pip install -e adapters/ptychopinn``) and what the original
imports (its ``[original]`` extra).

What they show, each through ``parity.session`` as ``ptycho-parity run`` does, on one batch of two
groups of the bundled fixtures (small on purpose: the original TensorFlow model compiles its
translation on the first pass):

- both originals take the 22 canonical convolutions one to one (2,340,208 weights at the default
  config) and give them back bit for bit;
- the TensorFlow original passes every tap it exposes against the project's tensorflow backend and
  the float64 reference, at the default config and four others; the losses show as not exposed;
- neither original can run a stage alone, so the reference runs each stage on its own inputs to it:
  the TensorFlow original passes stage by stage too, and the PyTorch original's stages after the merge
  compute like the reference from what they are given;
- the PyTorch original, with the canvas difference its adapter declares, passes through the heads
  and is named at the merge (``object.canvas``), where it co-masks the numerator; without the
  declaration the run stops at the precheck naming ``canvas_size``; a canvas it can match makes the
  declaration stale, which fails the run; at gridsize 1 without the border branch, where it computes
  the canonical model, it passes every tap it exposes (its normalised sampling grid rounds even a
  zero shift);
- an original that cannot be imported is reported as unavailable, with the reason.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from typing import Any

import pytest

from parity.config import ModelConfig
from parity.errors import BackendUnavailableError, ParityInputError
from parity.registry import load_backend, registered_names
from parity.runner import ParityResult
from parity.session import RunSpec, run
from parity.taps import tap_names
from parity.weights import count_conv_parameters, generate_weights

pytestmark = pytest.mark.ptychopinn

TF, TORCH = "ptychopinn-tf", "ptychopinn-torch"
DEFAULT_CONVS = 22
DEFAULT_WEIGHTS = 2_340_208
# One batch of two groups (B·C = 8 < 64, where the original TensorFlow merges groups; see its adapter).
SMALL = {"batch_size": 2, "max_groups": 2}


@pytest.fixture(scope="module", autouse=True)
def _adapters_installed() -> None:
    """The user asked for these tests (--ptychopinn): a missing adapter package is a failure, not a skip."""
    missing = [n for n in (TF, TORCH) if n not in registered_names()]
    if missing:
        pytest.fail(
            f"backends {missing} are not registered: pip install --no-deps -e adapters/ptychopinn", pytrace=False
        )
    if not os.environ.get("PTYCHOPINN_PATH"):
        pytest.fail("PTYCHOPINN_PATH is not set (pass --ptychopinn=PATH)", pytrace=False)


def _run(config: ModelConfig, backends: tuple[str, ...], **options: Any) -> ParityResult:
    spec = RunSpec(config=config, backends=backends, require=True, **SMALL, **options)
    return run(spec)


def _status(result: ParityResult) -> dict[str, str]:
    return {t.name: t.status for t in result.taps}


def _head(name: str) -> bool:
    return name.startswith(("amp.", "phase.", "encoder.", "input."))


# --- weights ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", [TF, TORCH])
def test_the_canonical_convolutions_load_one_to_one_and_export_bit_exact(backend: str) -> None:
    config = ModelConfig()
    weights = generate_weights(config, seed=7)
    be: Any = load_backend(backend)(config, weights, "cpu")
    assert len(be._convs) == DEFAULT_CONVS
    assert be.count_conv_params() == count_conv_parameters(config) == DEFAULT_WEIGHTS
    exported = be.export_weights()
    assert list(exported) == list(weights)  # same names, same order: a mismatch shows as a missing name
    for name, value in weights.items():
        got = exported[name]
        assert (got.dtype, got.shape) == (value.dtype, value.shape), name
        assert got.tobytes() == value.tobytes(), name


# --- the TensorFlow original: every exposed tap passes ----------------------------------------------


@pytest.mark.parametrize(
    "changes",
    [{}, {"gridsize": 1}, {"probe_big": False}, {"pad_object": False}, {"amp_activation": "swish", "probe_mask": True}],
    ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default",
)
def test_the_tensorflow_original_passes_every_tap_it_exposes(changes: dict[str, Any]) -> None:
    config = ModelConfig(**changes)
    result = _run(config, ("reference", "tensorflow", TF))
    assert result.passed, result.describe_failure()
    assert result.backends[TF].effective_config == result.backends["tensorflow"].effective_config
    status = _status(result)
    exposed = [n for n in tap_names(config) if not n.startswith("loss.")]
    assert all(status[n] == "pass" for n in exposed), {n: status[n] for n in exposed if status[n] != "pass"}
    losses = {t.name: t for t in result.taps if t.name.startswith("loss.")}
    assert set(losses) == {"loss.poisson_nll", "loss.mae"}
    assert all(t.not_exposed == [TF] and t.status == "pass" for t in losses.values())  # tensorflow vs reference
    # The wrapped original cannot run a stage alone: the reference runs each stage on its inputs to it
    # instead, and it passes there too, as the project's own backend does fed the reference's inputs.
    assert result.local_recomputed == [TF] and result.local_unsupported == [] and result.first_local_divergence is None
    assert "reference running each stage on the backend's own inputs (it cannot run stages alone): " + TF in (
        result.describe_divergence()
    )
    staged = [t for t in result.taps if t.stage is not None]
    assert all(
        {c.a for c in t.local} == ({"tensorflow"} if TF in t.not_exposed else {"tensorflow", TF}) for t in staged
    )


# --- the PyTorch original: the heads pass, the merge diverges ----------------------------------------


@pytest.mark.parametrize(
    ("changes", "canvas", "canonical"), [({}, 68, 78), ({"gridsize": 1}, 64, 74)], ids=["default", "gridsize=1"]
)
def test_the_torch_original_passes_the_heads_and_is_named_at_the_merge(
    changes: dict[str, Any], canvas: int, canonical: int
) -> None:
    config = ModelConfig(**changes)
    result = _run(config, ("reference", TF, TORCH))  # the shipped deviation file is applied by default
    assert result.verdict == "fail"
    # The canvas difference is declared (shipped with the adapter) and reproduced.
    assert result.declared_config_diff["canvas_size"] == {"reference": canonical, TF: canonical, TORCH: canvas}
    declared = [d for d in result.deviations if d["config_key"] == "canvas_size"]
    assert [d["status"] for d in declared] == ["reproduced"] and declared[0]["backend"] == TORCH
    # Everything up to the object patches passes on every side.
    status = _status(result)
    before_merge = [n for n in tap_names(config) if _head(n) or n == "object.patches"]
    assert all(status[n] == "pass" for n in before_merge), {n: status[n] for n in before_merge if status[n] != "pass"}
    # The first undeclared divergence is the merge, and the torch original is the one off the reference.
    fd = result.first_divergence
    assert fd is not None and fd["tap"] == "object.canvas", result.describe_failure()
    assert fd["blamed"] == [TORCH], result.describe_failure()
    merge = next(t for t in result.taps if t.name == "object.canvas")
    assert merge.window == [canvas, canvas]  # compared on the centred window both canvases hold
    # The TensorFlow original still agrees with the reference there, and the torch port's missing taps are
    # shown as not exposed rather than failed.
    assert all(c.passed for c in merge.comparisons if c.a == TF and c.b == "reference")
    for name in ("object.trimmed", "output.intensity"):
        tap = next(t for t in result.taps if t.name == name)
        assert tap.not_exposed == [TORCH] and all(TORCH not in (c.a, c.b) for c in tap.comparisons)
    # Stage by stage (the reference run on its own inputs), every stage after the merge computes like the
    # reference: the divergence is the merge's alone. The merge itself is not recomputed, its canvas being
    # of another size, nor is the re-extraction that reads that canvas.
    assert result.local_recomputed == [TF, TORCH] and result.first_local_divergence is None
    local = {t.name: [c for c in t.local if c.a == TORCH] for t in result.taps}
    assert local["object.canvas"] == [] and local["object.reextracted"] == []
    for name in ("physics.illuminated", "physics.diffraction", "output.amplitude"):
        assert [c.passed for c in local[name]] == [True], name


def test_the_torch_original_passes_every_tap_it_exposes_at_gridsize_1_without_the_border() -> None:
    """Without probe_big the port's co-masked numerator is the canonical one, and at gridsize 1 every
    shift is zero, so the port computes the canonical model. Its normalised grid (affine_grid and
    grid_sample) rounds even a zero shift: tolerances that took whole shifts as exact failed it at
    the canvas by 1e24 times its tolerance, and the one-cell bound that missed the mask's corners at
    the re-extraction by 1e21 (2026-12-05, docs/tolerances.md, "One cell, not three")."""
    config = ModelConfig(gridsize=1, probe_big=False)
    result = _run(config, ("reference", TF, TORCH))
    assert result.passed, result.describe_failure()
    status = _status(result)
    after_merge = ("object.canvas", "object.reextracted", "physics.illuminated", "physics.diffraction")
    assert all(status[n] == "pass" for n in after_merge), {n: status[n] for n in after_merge}
    merge = next(t for t in result.taps if t.name == "object.reextracted")
    assert {c.a for c in merge.comparisons if c.b == "reference"} >= {TF, TORCH}


def test_without_the_declaration_the_run_stops_at_the_precheck_naming_the_canvas() -> None:
    result = _run(ModelConfig(), ("reference", TORCH), shipped_deviations=False)
    assert result.verdict == "config_mismatch"
    assert result.config_diff == {"canvas_size": {"reference": 78, TORCH: 68}}
    assert result.taps == []  # nothing was run


@pytest.mark.parametrize(
    ("changes", "key", "built"),
    [({"amp_activation": "softplus"}, "amp_activation", "swish"), ({"pad_object": False}, "pad_object", True)],
    ids=["amp_activation=softplus", "pad_object=False"],
)
def test_a_key_the_port_cannot_represent_is_reported_as_built_and_named_by_the_precheck(
    changes: dict[str, Any], key: str, built: Any
) -> None:
    """The port applies SiLU for every activation name but sigmoid, and always pads its heads: the adapter
    builds what the port can and reports it, so the precheck names the key instead of the taps hiding it."""
    result = _run(ModelConfig(**changes), ("reference", TORCH))
    assert result.verdict == "config_mismatch"
    assert result.config_diff == {key: {"reference": changes[key], TORCH: built}}
    assert set(result.declared_config_diff) == {"canvas_size"}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"N": 128}, "'N' = 128 and 'probe_big' = true"),
        ({"object_big": False}, "'object_big' = false and 'gridsize' = 2"),
    ],
    ids=["N=128", "object_big=False"],
)
def test_a_config_the_port_cannot_be_built_for_is_bad_input_naming_the_keys(
    changes: dict[str, Any], message: str
) -> None:
    with pytest.raises(ParityInputError, match=message):
        _run(ModelConfig(**changes), ("reference", TORCH))


def test_a_canvas_the_port_can_match_makes_the_declaration_stale() -> None:
    """canvas_size = 68 is one the port can build (neighbour distance 4): the canvases agree, so the
    shipped declaration does not reproduce, and a stale declaration fails the run like a strict xfail."""
    config = ModelConfig(canvas_size=68)
    result = _run(config, ("reference", TORCH), taps=["input.*", "object.patches", "object.canvas"])
    assert result.backends[TORCH].effective_config["canvas_size"] == 68
    assert result.declared_config_diff == {} and result.config_diff == {}
    stale = result.stale_deviations()
    assert [(d["config_key"], d["backend"]) for d in stale] == [("canvas_size", TORCH)]
    assert result.verdict == "fail"
    assert "declared deviation not reproduced" in result.describe_failure()
    merge = next(t for t in result.taps if t.name == "object.canvas")
    assert merge.window is None and not merge.passed  # same size now; the co-masked numerator still differs


# --- an original that cannot be imported ----------------------------------------------------------


@pytest.fixture
def empty_checkout(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("PTYCHOPINN_PATH", str(tmp_path))
    yield str(tmp_path)


CLASSES = {
    TF: ("ptycho_parity_ptychopinn.tf_backend", "PtychoPINNTFBackend", "ptycho"),
    TORCH: ("ptycho_parity_ptychopinn.torch_backend", "PtychoPINNTorchBackend", "ptycho_torch"),
}


@pytest.mark.parametrize("backend", [TF, TORCH])
def test_an_original_that_cannot_be_imported_is_unavailable_with_the_reason(backend: str, empty_checkout: str) -> None:
    module, attr, package = CLASSES[backend]
    cls: Any = getattr(importlib.import_module(module), attr)  # the class imports without the original
    reason = cls.availability_problem()  # cheap: nothing of the original or its framework is imported
    assert reason is not None and f"PTYCHOPINN_PATH={empty_checkout} has no package {package!r}" in reason
    with pytest.raises(BackendUnavailableError, match="has no package") as raised:
        cls(ModelConfig(), generate_weights(ModelConfig()), "cpu")
    assert raised.value.name == backend and "PTYCHOPINN_PATH" in raised.value.reason
    # Through the session, as `ptycho-parity run` sees it: unavailable with the reason (not crashed), and
    # the reference is still run.
    result = run(RunSpec(backends=("reference", backend), **SMALL))
    record = result.backends[backend]
    assert not record.available and record.crashed is None
    assert record.reason is not None and f"PTYCHOPINN_PATH={empty_checkout} has no package {package!r}" in record.reason
    assert result.backends["reference"].available


def test_the_environment_records_the_checkout_and_its_commit() -> None:
    config = ModelConfig(gridsize=1)
    be: Any = load_backend(TORCH)(config, generate_weights(config), "cpu")
    original = be.environment()["original"]
    assert original["path"] == os.environ["PTYCHOPINN_PATH"]
    assert original["found_through"] == "PTYCHOPINN_PATH"
    assert original["commit"] is None or len(original["commit"]) == 40
    settings = be.environment()["settings"]
    assert "ModelConfig.cbam_encoder" in settings and "DataConfig.probe_scale" in settings


def test_the_command_line_names_the_merge_and_the_torch_original(tmp_path: Any, capsys: Any) -> None:
    """`ptycho-parity run --backends reference,ptychopinn-tf,ptychopinn-torch`, as docs/ptychopinn.md shows."""
    import json

    from parity.cli import main

    report = tmp_path / "report"
    argv = ["run", "--backends", f"reference,{TF},{TORCH}", "--batch-size", "2", "--max-groups", "2"]
    assert main([*argv, "--report", str(report), "--no-html"]) == 1
    out = capsys.readouterr().out
    assert "verdict: fail" in out
    assert "first diverging tap: object.canvas" in out and f"off the reference: {TORCH}" in out
    data = json.loads((report / "report.json").read_text())
    assert data["declared_config_diff"]["canvas_size"][TORCH] == 68
    assert [d["status"] for d in data["deviations"]] == ["reproduced"]
    markdown = (report / "report.md").read_text()
    assert "Declared deviations" in markdown and "not exposed by ptychopinn-torch" in markdown

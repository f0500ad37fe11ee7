"""The custom-backends example (examples/custom_backends) and its guide (docs/custom-backends.md).

A user wraps their own PyTorch and Keras models as backends, registers them from their own package
through the ``ptycho_parity.backends`` entry-point group, and runs ``run_parity`` with their own
batches, tap list and tolerance file. These tests do exactly that with the example package, with the
registration exercised through importlib.metadata for real (a dist-info folder like the one
``pip install -e`` leaves, written from the example's pyproject.toml), and they check that the code
the guide shows is the code that runs.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import tomllib
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from parity import registry
from parity.report import write_reports
from parity.runner import ParityResult, run_parity
from parity.tolerances import load_tolerances
from parity.weights import weights_sha256

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "custom_backends"
GUIDE = ROOT / "docs" / "custom-backends.md"
GROUP = "ptycho_parity.backends"
NAMES = ("toy-reference", "toy-torch", "toy-tensorflow")
MARKER = re.compile(r"<!-- (quote: (?P<path>\S+)|run|sketch|output) -->")


def install_example(site: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Make the example package installed, as far as importlib.metadata and imports can tell.

    ``pip install -e examples/custom_backends`` leaves a ``toy_parity-0.0.0.dist-info`` folder whose
    entry_points.txt lists the entry points of the pyproject, and puts the package on the path. This
    writes that folder from the example's own pyproject.toml (so a wrong registration there fails
    here) and prepends both folders to sys.path, which monkeypatch undoes after the test.
    """
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    entry_points: dict[str, str] = project["entry-points"][GROUP]
    dist = site / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n", encoding="utf-8"
    )
    lines = [f"[{GROUP}]"] + [f"{name} = {target}" for name, target in entry_points.items()]
    (dist / "entry_points.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.syspath_prepend(str(EXAMPLE))
    return entry_points


class Toy:
    """The registered example: backend classes from the registry, a config, weights, tolerances."""

    def __init__(self) -> None:
        import toy_parity

        self.tp = toy_parity
        self.classes = {name: registry.load_backend(name) for name in NAMES}
        # Not the defaults: every size differs, so a transposition that happens to fit shows.
        self.config = toy_parity.ToyConfig(in_channels=2, size=6, filters=5, classes=4)
        self.weights = toy_parity.generate_weights(self.config, seed=3)
        self.tolerances = load_tolerances(toy_parity.tolerance_file(), known_taps=toy_parity.tap_names(self.config))

    def build(self, **replacements: Any) -> dict[str, Any]:
        """Every backend built from the one config and weights; a class per name may be swapped in."""
        classes = {**self.classes, **replacements}
        return {name: cls(self.config, self.weights, "cpu") for name, cls in classes.items()}

    def run(self, backends: dict[str, Any], batches: int = 3, batch_size: int = 2, **kw: Any) -> ParityResult:
        config = self.config
        return run_parity(
            backends,
            self.tp.make_batches(config, batches, batch_size, seed=7),
            self.tolerances,
            config=config,
            expected=kw.pop("expected", lambda b: self.tp.tap_specs(config, b)),
            reference="toy-reference",
            weights_sha256=weights_sha256(self.weights),
            **kw,
        )


@pytest.fixture
def toy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Toy:
    install_example(tmp_path / "site", monkeypatch)
    return Toy()


def test_entry_points_register_the_example_backends(tmp_path, monkeypatch):
    declared = install_example(tmp_path / "site", monkeypatch)
    assert set(declared) == set(NAMES)
    # Registered by the dist-info written above (it comes first on the path, even if the example
    # is also pip-installed), not by anything else.
    ours = {ep.name: ep for ep in entry_points(group=GROUP) if ep.name in NAMES}
    assert set(ours) == set(NAMES)
    assert {Path(str(ep.dist.locate_file(""))) for ep in ours.values()} == {tmp_path / "site"}

    found = registry.discover()
    assert {"reference", "torch", "tensorflow"} <= set(found)  # the project's own are still there
    for name in NAMES:
        info = found[name]
        assert info.available, info.error
        assert info.target == declared[name]
        assert info.backend is registry.load_backend(name)
        assert info.backend.name == name  # the class's own name is the registry key
        module, _, cls = declared[name].partition(":")
        assert (info.backend.__module__, info.backend.__qualname__) == (module, cls)
    precisions = {name: registry.load_backend(name).precision for name in NAMES}
    assert precisions == {"toy-reference": "float64", "toy-torch": "float32", "toy-tensorflow": "float32"}


def test_backends_load_exactly_and_report_what_they_built(toy):
    for name, backend in toy.build().items():
        exported = backend.export_weights()
        assert list(exported) == list(toy.tp.parameter_shapes(toy.config)), name
        for key, value in toy.weights.items():
            assert exported[key].dtype == value.dtype and np.array_equal(exported[key], value), (name, key)
        assert backend.effective_config() == toy.config.to_dict(), name
        env = backend.environment()
        assert env["framework_version"] and env["device"], name
    envs = {name: b.environment() for name, b in toy.build().items()}
    assert envs["toy-torch"]["deterministic_algorithms"] is True
    assert envs["toy-torch"]["cudnn_allow_tf32"] is False and envs["toy-torch"]["cuda_matmul_allow_tf32"] is False
    assert envs["toy-tensorflow"]["tf32_enabled"] is False and envs["toy-tensorflow"]["op_determinism"] is True


def test_toy_backends_agree_within_the_measured_tolerances(toy):
    result = toy.run(toy.build())
    assert result.passed, result.describe_failure()
    assert (result.batches, result.groups) == (3, 6)
    names = toy.tp.tap_names(toy.config)
    assert [t.name for t in result.taps] == names
    sides = {("vs_reference", "toy-torch", "toy-reference"), ("vs_reference", "toy-tensorflow", "toy-reference")}
    sides.add(("backend_vs_backend", "toy-tensorflow", "toy-torch"))
    for tap, spec in zip(result.taps, toy.tp.tap_specs(toy.config, 6), strict=True):
        assert {(c.kind, c.a, c.b) for c in tap.comparisons} == sides, tap.name
        assert all(c.numel == math.prod(spec.shape) for c in tap.comparisons), tap.name  # every batch compared
    dense = next(t for t in result.taps if t.name == "dense")
    assert all(c.max_abs > 0 for c in dense.comparisons if c.kind == "vs_reference")  # float32 vs float64: not vacuous
    assert set(result.statistics) == set(NAMES)
    assert set(result.statistics["toy-tensorflow"]) == set(names)


def _dense_without_bias(cls: type) -> type:
    class DenseWithoutBias(cls):
        def __init__(self, config: Any, weights: Any, device: str = "cpu") -> None:
            super().__init__(config, weights, device)
            self.model.dense.register_parameter("bias", None)

    return DenseWithoutBias


def _dense_rows_not_reordered(cls: type) -> type:
    class DenseRowsNotReordered(cls):
        """Loads the canonical (channel, row, column) dense rows into Keras's (row, column, channel) input."""

        def __init__(self, config: Any, weights: Any, device: str = "cpu") -> None:
            super().__init__(config, weights, device)
            self.model.get_layer("dense").set_weights([weights["dense.kernel"], weights["dense.bias"]])

    return DenseRowsNotReordered


@pytest.mark.parametrize(
    ("culprit", "bug", "every_element_off"),
    [("toy-torch", _dense_without_bias, True), ("toy-tensorflow", _dense_rows_not_reordered, False)],
)
def test_divergence_is_named_at_its_first_tap_and_blamed(toy, tmp_path, culprit, bug, every_element_off):
    result = toy.run(toy.build(**{culprit: bug(toy.classes[culprit])}))

    assert result.verdict == "fail"
    fd = result.first_divergence
    assert fd is not None and fd["tap"] == "dense"
    assert fd["blamed"] == [culprit]
    assert set(fd["backends"]) == set(NAMES)
    assert result.describe_failure().splitlines()[0] == (
        f"first diverging tap: dense (backends: {', '.join(fd['backends'])}; off the reference: {culprit})"
    )
    passed = {t.name: t.passed for t in result.taps}
    assert passed == {"input.x": True, "conv": True, "relu": True, "dense": False, "softmax": False}

    paths = write_reports(result, tmp_path / "report")
    data = json.loads(paths["json"].read_text(encoding="utf-8"))
    assert (data["verdict"], data["passed"], data["reference"]) == ("fail", False, "toy-reference")
    assert data["first_divergence"]["tap"] == "dense" and data["first_divergence"]["blamed"] == [culprit]
    assert data["config"] == toy.config.to_dict() and data["config_diff"] == {}
    assert data["weights_sha256"] == weights_sha256(toy.weights)
    assert data["tolerances"]["source"] == str(toy.tp.tolerance_file())
    assert [t["name"] for t in data["taps"]] == toy.tp.tap_names(toy.config)
    assert data["taps"][3]["shape"] == [2, toy.config.classes, 1, 1]  # per batch
    for name in NAMES:
        record = data["backends"][name]
        assert record["available"] and record["effective_config"] == toy.config.to_dict()
    assert data["backends"][culprit]["environment"]["framework"] == culprit.removeprefix("toy-")
    assert data["backends"]["toy-reference"]["precision"] == "float64"
    off = next(c for c in data["taps"][3]["comparisons"] if c["a"] == culprit and c["kind"] == "vs_reference")
    assert off["b"] == "toy-reference" and not off["passed"] and off["max_abs"] > 1e-3
    if every_element_off:  # each logit lost its bias, and no bias is near zero
        assert off["mismatch_fraction"] == 1.0 and off["max_abs"] >= 0.1
    fine = next(c for c in data["taps"][3]["comparisons"] if c["a"] != culprit and c["kind"] == "vs_reference")
    assert fine["passed"]
    markdown = paths["markdown"].read_text(encoding="utf-8")
    assert "**First diverging tap:** `dense`" in markdown and f"**{culprit}**" in markdown
    with np.load(paths["statistics"]) as stats:
        assert f"{culprit}|dense|mean" in stats.files and "toy-reference|conv|var_zero_mean" in stats.files
    assert "dense" in paths["html"].read_text(encoding="utf-8")


def test_config_mismatch_is_reported_before_any_forward_pass(toy):
    other = toy.tp.ToyConfig(in_channels=2, size=6, filters=5, classes=3)
    torch_cls = toy.classes["toy-torch"]
    backends = {
        "toy-reference": toy.classes["toy-reference"](toy.config, toy.weights),
        "toy-torch": torch_cls(other, toy.tp.generate_weights(other), "cpu"),
    }
    result = toy.run(backends)
    assert result.verdict == "config_mismatch"
    assert result.config_diff == {"classes": {"toy-reference": 4, "toy-torch": 3}}
    assert result.batches == 0 and not result.taps


def test_a_tap_missing_from_one_side_is_named_where_it_goes_missing(toy):
    from toy_parity.only_taps import OnlyTaps

    backends = toy.build()
    all_taps = toy.tp.tap_names(toy.config)
    without_relu = [n for n in all_taps if n != "relu"]
    backends["toy-tensorflow"] = OnlyTaps(backends["toy-tensorflow"], without_relu)
    result = toy.run(backends)
    assert result.first_divergence is not None
    assert (result.first_divergence["tap"], result.first_divergence["blamed"]) == ("relu", ["toy-tensorflow"])
    relu = next(t for t in result.taps if t.name == "relu")
    assert any(c.kind == "structure" and c.reason == "tap missing from toy-tensorflow" for c in relu.comparisons)
    assert [t.name for t in result.taps if not t.passed] == ["relu"]

    # Comparing on the shared taps: every side wrapped, the same subset expected.
    shared = ["input.x", "dense", "softmax"]
    subset = {name: OnlyTaps(b, shared) for name, b in toy.build().items()}
    result = toy.run(subset, expected=lambda b: [s for s in toy.tp.tap_specs(toy.config, b) if s.name in shared])
    assert result.passed, result.describe_failure()
    assert [t.name for t in result.taps] == shared
    assert result.backends["toy-reference"].precision == "float64"


def _guide_blocks() -> list[tuple[str, str | None, str, int]]:
    """(kind, quoted path, code, line) for every fenced block of the guide, each one marked."""
    lines = GUIDE.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].startswith("```"):
            marker = MARKER.fullmatch(lines[i - 1].strip()) if i else None
            assert marker, f"{GUIDE.name}:{i + 1}: code block without a <!-- quote/run/sketch/output --> marker"
            end = lines.index("```", i + 1)
            kind = marker.group(1).split(":")[0]
            blocks.append((kind, marker.group("path"), "\n".join(lines[i + 1 : end]) + "\n", i + 1))
            i = end
        i += 1
    return blocks


def test_guide_quotes_are_the_example_code():
    blocks = _guide_blocks()
    quoted = [(path, code, line) for kind, path, code, line in blocks if kind == "quote"]
    assert len(quoted) >= 8
    for path, code, line in quoted:
        assert path is not None
        source = (ROOT / path).read_text(encoding="utf-8")
        assert code in source, f"{GUIDE.name}:{line}: this block is no longer in {path} word for word"
    for kind, _, code, line in blocks:
        if kind == "sketch":
            compile(code, f"{GUIDE.name}:{line}", "exec")
    text = GUIDE.read_text(encoding="utf-8")
    for path in set(re.findall(r"`((?:examples|tests|docs|parity)/[\w./-]+)`", text)):
        assert (ROOT / path).exists(), f"{GUIDE.name} names {path}, which does not exist"


def test_guide_program_runs_as_shown(tmp_path, monkeypatch):
    install_example(tmp_path / "site", monkeypatch)
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {"__name__": "guide"}
    printed = io.StringIO()
    runs = outputs = 0
    for kind, _, code, line in _guide_blocks():
        if kind == "run":
            with contextlib.redirect_stdout(printed):
                exec(compile(code, f"{GUIDE.name}:{line}", "exec"), namespace)
            runs += 1
        elif kind == "output":
            assert printed.getvalue() == code, f"{GUIDE.name}:{line}: the blocks above print something else"
            printed = io.StringIO()
            outputs += 1
    assert (runs, outputs) == (2, 2)
    assert namespace["result"].passed
    assert namespace["broken"].first_divergence["blamed"] == ["toy-torch"]
    report = json.loads((tmp_path / "parity-report" / "toy" / "report.json").read_text(encoding="utf-8"))
    assert report["verdict"] == "pass" and set(report["backends"]) == set(NAMES)
    broken = json.loads((tmp_path / "parity-report" / "toy-broken" / "report.json").read_text(encoding="utf-8"))
    assert broken["first_divergence"]["tap"] == "dense"

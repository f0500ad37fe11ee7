"""The ``ptycho-parity`` command, called in-process: exit codes 0 / 1 / 2, its files and its messages."""

import contextlib
import hashlib
import io
import json
import re
import shutil

import numpy as np
import pytest

from parity.cli import main
from parity.config import ModelConfig
from parity.fixture import bundled_fixture, bundled_fixtures_dir, file_sha256
from parity.simulate import SimulationParams, simulate
from parity.tolerances import default_tolerance_file
from parity.weights import DEFAULT_SEED, generate_weights, load_weights, weights_sha256

SMALL = ["--set", "gridsize=1", "--set", "probe_big=false", "--batch-size", "1", "--max-groups", "1"]
BACKENDS = ("reference", "torch", "tensorflow")
REPORT_FILES = {"report.json", "report.md", "report.html", "statistics.npz"}


@pytest.fixture(scope="module")
def good_report(tmp_path_factory):
    """One passing run of the three backends: (exit code, stdout, report folder)."""
    folder = tmp_path_factory.mktemp("good") / "report"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["run", *SMALL, "--backends", ",".join(BACKENDS), "--report", str(folder)])
    return code, out.getvalue(), folder


def _contents(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_run_passes_exits_0_and_writes_every_report(good_report):
    code, out, folder = good_report
    assert code == 0, out
    assert "verdict: pass" in out
    assert f"report: {folder / 'report.json'}" in out
    assert {p.name for p in folder.iterdir()} == REPORT_FILES
    data = json.loads((folder / "report.json").read_text())
    assert data["verdict"] == "pass" and data["passed"] is True and data["first_divergence"] is None
    assert {n: b["available"] for n, b in data["backends"].items()} == dict.fromkeys(BACKENDS, True)
    assert data["config"] == ModelConfig(gridsize=1, probe_big=False).to_dict()
    assert data["fixture"]["sha256"] == file_sha256(bundled_fixture("n64_g1_grf"))
    assert data["groups"] == 1
    assert "**PASS**" in (folder / "report.md").read_text()
    assert (folder / "report.html").read_text().lstrip().lower().startswith("<!doctype html")
    # Layer-local parity is on by default: both float32 backends ran every stage on its own.
    scaled = next(t for t in data["taps"] if t["name"] == "input.scaled")
    assert {c["a"] for c in scaled["local"]} == {"torch", "tensorflow"} and data["local_unsupported"] == []


def test_no_local_runs_end_to_end_only(tmp_path, capsys):
    report = tmp_path / "report"
    code = main(["run", *SMALL, "--backends", "reference,torch", "--no-local", "--report", str(report), "--no-html"])
    assert code == 0, capsys.readouterr().out
    data = json.loads((report / "report.json").read_text())
    assert all(t["local"] == [] for t in data["taps"]) and data["first_local_divergence"] is None


def test_diverging_run_exits_1_and_names_the_first_diverging_tap(tmp_path, capsys):
    # A factor far below float32 noise for the encoder: the float32 backends cannot meet it.
    strict = '[[family]]\npattern = "encoder.*"\nfactor = 1e-3\n'
    text = default_tolerance_file().read_text()
    tolerances = tmp_path / "strict.toml"
    text, replaced = re.subn(r'\[\[family\]\]\npattern = "encoder\.\*"\n(?:\w+ = [^\n]+\n)+', strict, text)
    assert replaced == 1
    tolerances.write_text(text)
    report = tmp_path / "report"
    code = main(["run", *SMALL, "--tolerances", str(tolerances), "--report", str(report), "--no-html"])
    out = capsys.readouterr().out
    assert code == 1
    assert "verdict: fail" in out
    assert "first diverging tap: encoder.block0.conv0 (backends: " in out
    data = json.loads((report / "report.json").read_text())
    assert data["verdict"] == "fail"
    assert data["tolerances"]["source"] == str(tolerances)
    assert data["first_divergence"]["tap"] == "encoder.block0.conv0"
    assert sorted(data["first_divergence"]["blamed"]) == ["tensorflow", "torch"]
    taps = {t["name"]: t for t in data["taps"]}
    assert taps["input.scaled"]["passed"] is True  # taps before it still pass at the bundled tolerances


def test_bad_input_leaves_an_existing_report_alone(good_report, tmp_path, capsys):
    """The bad-input suite (tests/test_bad_input.py) covers every kind of input; here, a report of an
    earlier run in the folder survives a run refused for bad input, byte for byte."""
    report = tmp_path / "report"
    shutil.copytree(good_report[2], report)
    before = _contents(report)
    code = main(["run", *SMALL, "--set", "gridsize=3", "--report", str(report)])
    err = capsys.readouterr().err
    assert code == 2 and "config (--set): key 'gridsize' has value 3; allowed" in err
    assert _contents(report) == before


def test_run_honours_the_require_backends_variable_and_leaves_no_folder_on_bad_input(tmp_path, capsys, monkeypatch):
    """CI sets PTYCHO_PARITY_REQUIRE_BACKENDS=1; the command ignored it and passed with a framework
    missing (until 2026-12-05). Bad input found once the backends are built (here, an unavailable
    one; below, a float32 arbiter) leaves no report folder behind."""
    import parity.session
    from parity.errors import BackendUnavailableError
    from parity.registry import load_backend
    from parity.session import REQUIRE_ENV

    def without_tensorflow(name):
        if name == "tensorflow":
            raise BackendUnavailableError(name, "ImportError: simulated")
        return load_backend(name)

    monkeypatch.setattr(parity.session, "load_backend", without_tensorflow)
    report = tmp_path / "new" / "report"
    argv = ["run", *SMALL, "--no-html", "--report", str(report)]
    monkeypatch.setenv(REQUIRE_ENV, "1")
    assert main(argv) == 2
    assert "backend 'tensorflow' is unavailable: ImportError: simulated" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    monkeypatch.delenv(REQUIRE_ENV)
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "backend tensorflow unavailable: ImportError: simulated" in captured.err and "verdict: pass" in captured.out
    assert main([*argv, "--backends", "reference,tensorflow"]) == 1  # one backend ran: nothing compared
    assert "nothing was compared: reference ran, tensorflow unavailable" in capsys.readouterr().out
    assert "**Nothing was compared:** reference ran, tensorflow unavailable" in (report / "report.md").read_text()
    elsewhere = tmp_path / "other"
    assert (
        main(["run", *SMALL, "--backends", "reference,torch", "--reference", "torch", "--report", str(elsewhere)]) == 2
    )
    assert "reference backend 'torch' computes in float32" in capsys.readouterr().err
    assert not elsewhere.exists()


def test_weights_and_seed_together_are_refused(tmp_path, capsys):
    argv = ["run", *SMALL, "--weights", str(tmp_path / "w.h5"), "--seed", "5", "--report", str(tmp_path / "r")]
    assert main(argv) == 2
    assert "options --weights and --seed: give one" in capsys.readouterr().err


def test_unwritable_report_folder_is_bad_input_before_any_work(tmp_path, capsys):
    path = tmp_path / "report.json"
    path.write_text("{}")
    code = main(["run", *SMALL, "--backends", "reference", "--report", str(path)])
    assert code == 2
    assert f"option --report: report folder {path} exists and is not a folder" in capsys.readouterr().err
    assert path.read_text() == "{}"

    folder = tmp_path / "report"
    (folder / "report.json").mkdir(parents=True)  # where the JSON report must go
    code = main(["run", *SMALL, "--backends", "reference", "--report", str(folder)])
    out = capsys.readouterr()
    assert code == 2
    assert f"option --report: report folder {folder}: report.json is a folder; the report cannot be written" in out.err
    assert "Traceback" not in out.err and "verdict" not in out.out  # refused before the run
    assert sorted(p.name for p in folder.iterdir()) == ["report.json"]


def test_run_with_exclusions_and_a_stale_declaration_exits_1_naming_it(tmp_path, capsys):
    declared = tmp_path / "deviations.toml"
    text = (
        'schema_version = 1\n[[deviation]]\ntap = "physics.diffraction"\nbackend = "torch"\n'
        'reason = "thought to differ"\nreference = "a hunch"\n'
    )
    declared.write_text(text)
    report = tmp_path / "report"
    argv = ["run", *SMALL, "--taps", "!loss.*,!output.*", "--deviations", str(declared), "--report", str(report)]
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "verdict: fail" in out and "declared deviation not reproduced" in out and "'physics.diffraction'" in out
    data = json.loads((report / "report.json").read_text())
    assert not [t for t in data["taps"] if t["name"].startswith(("loss.", "output."))]
    assert data["deviations"][0]["status"] == "not_reproduced" and data["first_divergence"] is None
    assert "❌ not reproduced" in (report / "report.md").read_text()
    assert declared.read_text() == text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
        (["run", "--batch-size", "two"], "argument --batch-size: invalid int value: 'two'"),
        ([], "the following arguments are required: command"),
        (["check-device", "gpu"], "invalid choice: 'gpu'"),
    ],
)
def test_usage_errors_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_backends_lists_the_three_available(capsys):
    assert main(["backends"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert set(lines) >= set(BACKENDS)
    for name, target in [
        ("reference", "backends.reference:ReferenceBackend"),
        ("torch", "backends.torch:TorchBackend"),
        ("tensorflow", "backends.tensorflow:TensorFlowBackend"),
    ]:
        assert lines[name].split()[1:] == [target, "available"]


def test_make_weights_writes_a_file_that_loads_and_runs(tmp_path, capsys):
    config = ModelConfig(gridsize=1, probe_big=False)
    expected = generate_weights(config, DEFAULT_SEED)
    out = tmp_path / "w.h5"
    assert main(["make-weights", "--set", "gridsize=1", "--set", "probe_big=false", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"{out} sha256(content)={weights_sha256(expected)}"
    loaded = load_weights(out, config)
    assert loaded.keys() == expected.keys()
    for name, arr in expected.items():
        np.testing.assert_array_equal(loaded[name], arr, err_msg=name)

    seeded = tmp_path / "w7.h5"
    assert main(["make-weights", "--set", "gridsize=1", "--set", "probe_big=false", "--seed", "7", str(seeded)]) == 0
    assert capsys.readouterr().out.strip().endswith(f"={weights_sha256(generate_weights(config, 7))}")

    report = tmp_path / "report"
    code = main(
        ["run", *SMALL, "--backends", "reference,torch", "--weights", str(out), "--report", str(report), "--no-html"]
    )
    assert code == 0, capsys.readouterr()
    assert json.loads((report / "report.json").read_text())["weights_sha256"] == weights_sha256(expected)


def test_force_replaces_an_old_file_of_the_same_kind(tmp_path, capsys):
    """--force replaces the weights or fixture the user made before (the refusal to replace a file
    of another kind is in tests/test_bad_input.py)."""
    config = ModelConfig(gridsize=1, probe_big=False)
    out = tmp_path / "w.h5"
    small = ["--set", "gridsize=1", "--set", "probe_big=false"]
    assert main(["make-weights", *small, str(out)]) == 0
    assert main(["make-weights", *small, "--seed", "7", "--force", str(out)]) == 0
    assert weights_sha256(load_weights(out, config)) == weights_sha256(generate_weights(config, 7))
    fixture = tmp_path / "f.h5"
    assert main(["make-fixture", "--scan", "2x2", str(fixture)]) == 0
    first = fixture.read_bytes()
    assert main(["make-fixture", "--scan", "3x3", "--force", str(fixture)]) == 0
    assert fixture.read_bytes() != first
    capsys.readouterr()


def test_check_device_cpu_passes_and_cuda_without_gpu_exits_2(monkeypatch, capsys):
    import tensorflow as tf
    import torch

    assert main(["check-device", "cpu"]) == 0
    have_gpu = torch.cuda.is_available() and bool(tf.config.list_physical_devices("GPU"))
    code = main(["check-device", "cuda"])
    captured = capsys.readouterr()
    if have_gpu:
        assert code == 0 and "device 'cuda' is usable" in captured.out
    else:
        assert code == 2 and captured.err.startswith("ptycho-parity: error: device 'cuda' is not usable: ")
    # Neither framework sees a GPU, as on a CPU machine: exit 2 naming both, never a silent pass.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [])
    assert main(["check-device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "torch backend: device 'cuda' was requested but torch.cuda.is_available() is False" in err
    assert "tensorflow backend: device 'cuda' was requested but TensorFlow sees no GPU" in err


def test_check_device_imports_no_framework_itself():
    """parity.cli asks each backend (Backend.device_problem); it imports no framework of its own."""
    import ast
    import inspect

    import parity.cli

    tree = ast.parse(inspect.getsource(parity.cli))
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not imported & {"torch", "tensorflow", "keras", "backends"}


def test_make_fixtures_check_reproduces_the_bundled_fixtures_untouched(capsys):
    def digests():
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(bundled_fixtures_dir().iterdir())}

    before = digests()
    assert main(["make-fixtures", "--check"]) == 0
    assert "fixtures reproduce bit for bit" in capsys.readouterr().out
    assert digests() == before


def test_import_npz_gives_a_fixture_that_run_accepts(tmp_path, capsys):
    sim = simulate(SimulationParams(kind="grf", N=64, gridsize=1, seed=77, scan_shape=(2, 3), nphotons=1e6))
    npz = tmp_path / "ptychopinn.npz"
    np.savez(
        npz,
        diff3d=sim.diffraction.astype(np.float64),
        xcoords=sim.xcoords,
        ycoords=sim.ycoords,
        probeGuess=sim.probe.astype(np.complex128),
        objectGuess=sim.object,
    )
    out = tmp_path / "imported.h5"
    assert main(["import-npz", str(npz), str(out), "--gridsize", "1"]) == 0
    assert capsys.readouterr().out.strip() == str(out)

    config = tmp_path / "config.toml"
    config.write_text("[model]\ngridsize = 1\n")
    report = tmp_path / "report"
    args = ["--config", str(config), "--fixture", str(out), "--max-groups", "1", "--batch-size", "1"]
    code = main(["run", *args, "--report", str(report), "--no-html"])
    assert code == 0, capsys.readouterr()
    data = json.loads((report / "report.json").read_text())
    assert data["fixture"] == {"path": str(out), "sha256": file_sha256(out)}
    assert data["config"] == ModelConfig(gridsize=1).to_dict()
    assert data["groups"] == 1 and data["verdict"] == "pass"


def test_import_npz_of_a_bad_file_exits_2_naming_it(tmp_path, capsys):
    npz = tmp_path / "broken.npz"
    np.savez(npz, xcoords=np.zeros(3), ycoords=np.zeros(3))
    assert main(["import-npz", str(npz), str(tmp_path / "out.h5"), "--gridsize", "1"]) == 2
    assert f"{npz}: key 'diff3d' (or 'diffraction') is missing" in capsys.readouterr().err
    assert not (tmp_path / "out.h5").exists()


INNER_SUITE = """
import pytest
from parity.config import ModelConfig


@pytest.mark.parity
def test_small(parity_run, parity_baseline):
    result = parity_run(ModelConfig(gridsize=1, probe_big=False), batch_size=1, max_groups=1)
    parity_baseline.check(result)
"""


def test_regen_baselines_rewrites_then_verifies(tmp_path, monkeypatch, capfd):
    (tmp_path / "test_inner.py").write_text(INNER_SUITE)
    monkeypatch.chdir(tmp_path)
    # reference and torch only: four child pytest sessions, each importing TensorFlow too, would be slow.
    inner = ["--", "test_inner.py", "-p", "no:cacheprovider", "--parity-backends", "reference,torch"]
    inner += ["--parity-report-dir", str(tmp_path / "rep")]
    assert main(["regen-baselines", *inner]) == 0  # created by the first pass, verified by the second
    baselines = tmp_path / "test_inner"
    npz = baselines / "test_small-torch.npz"
    assert npz.is_file() and (baselines / "test_small-torch.meta.json").is_file()

    # A test renamed: its baselines stay behind (one that records its test, and an older one by
    # name); the verifying run names them and leaves them be.
    meta = json.loads((baselines / "test_small-torch.meta.json").read_text())
    gone = baselines / "test_renamed-torch.npz"
    gone.write_bytes(npz.read_bytes())
    (baselines / "test_renamed-torch.meta.json").write_text(json.dumps({**meta, "test": "test_renamed"}))
    legacy = baselines / "test_older-reference.npz"
    legacy.write_bytes(npz.read_bytes())
    (baselines / "test_older-reference.meta.json").write_text(json.dumps({**meta, "test": None}))
    capfd.readouterr()

    # Change a stored statistic: the suite now fails; regen-baselines rewrites it and verifies.
    with np.load(npz) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["output.amplitude"] = arrays["output.amplitude"] * 1.5
    np.savez_compressed(npz, **arrays)
    assert main(["regen-baselines", *inner]) == 0
    with np.load(npz) as data:
        assert not np.array_equal(data["output.amplitude"], arrays["output.amplitude"])
    out = capfd.readouterr().out
    summary = out[out.rindex("ptycho-parity: orphaned baselines") :]  # the verifying run's
    assert "2 baseline(s) that no collected test writes" in summary
    assert "test_inner/test_older-reference.npz" in summary and "test_inner/test_renamed-torch.npz" in summary
    assert "test_small" not in summary
    assert gone.is_file() and legacy.is_file()


def test_measure_from_json_rewrites_only_the_families_asked_for(tmp_path, capsys):
    """Raw measurements from two machines merged: each gradient family gets 2.5 x the larger need,
    every other family and its record stay as they were, and the header says what was re-measured."""
    from parity.tolerances import load_tolerances

    a = {"needed": {"grad.*.kernel": 40.0, "grad.*.bias": 3.0}, "where": {"grad.*.kernel": "native m"}, "runs": 2}
    b = {"needed": {"grad.*.kernel": 77.0}, "where": {"grad.*.kernel": "threads=1 c"}, "runs": 3}
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    out = tmp_path / "t.toml"
    argv = ["measure-tolerances", "--from-json", str(tmp_path / "a.json"), str(tmp_path / "b.json")]
    assert main([*argv, "--families", "grad", "--out", str(out)]) == 0
    before, after = load_tolerances(default_tolerance_file()), load_tolerances(out)
    assert after.factor("grad.mae.encoder.block0.conv0.kernel") == 200.0  # 2.5 x 77 = 192.5, rounded up
    assert after.factor("grad.poisson_nll.encoder.block0.conv0.bias") == 7.5
    for fam in before.families:
        if not fam.pattern.startswith("grad."):
            mine = next(f for f in after.families if f.pattern == fam.pattern)
            assert (mine.factor, mine.measured) == (fam.factor, fam.measured), fam.pattern
    text = out.read_text()
    assert "re-measured" in text and "5 runs" in text and "native, threads=1" in text
    # the cuda profile's normwise floor is not measured here: kept as the template has it
    floors = load_tolerances(default_tolerance_file(), profile="cuda").normwise_floors
    assert floors and load_tolerances(out, profile="cuda").normwise_floors == floors


def test_measure_keep_records_raises_what_another_machine_needs_and_lowers_nothing(tmp_path):
    """A measurement on a second CPU merged into the bundled file: a family that needed more there
    gets 2.5 x the new need; one that needed less keeps its factor and record (without the option it
    would drop to 2.5 x the quieter machine's need, and the first machine would fail again)."""
    from parity.measure import round_up
    from parity.tolerances import load_tolerances

    before = load_tolerances(default_tolerance_file())
    kernel = next(f for f in before.families if f.pattern == "grad.*.kernel")
    bias = next(f for f in before.families if f.pattern == "grad.*.bias")
    assert kernel.measured is not None and bias.measured is not None
    needs = {"grad.*.kernel": 1.5 * kernel.measured, "grad.*.bias": 0.5 * bias.measured}
    where = {k: "native case 3" for k in needs}
    measured = {"needed": needs, "where": where, "runs": 7, "machines": ["native"], "cpus": ["Other CPU 9000"]}
    (tmp_path / "m.json").write_text(json.dumps(measured))
    argv = ["measure-tolerances", "--from-json", str(tmp_path / "m.json"), "--out"]

    assert main([*argv, str(tmp_path / "kept.toml"), "--keep-records"]) == 0
    kept = {f.pattern: f for f in load_tolerances(tmp_path / "kept.toml").families}
    assert kept["grad.*.kernel"].factor == round_up(2.5 * 1.5 * kernel.measured) > kernel.factor
    assert (kept["grad.*.bias"].factor, kept["grad.*.bias"].measured) == (bias.factor, bias.measured)
    for fam in before.families:
        if fam.pattern not in needs:
            assert (kept[fam.pattern].factor, kept[fam.pattern].measured) == (fam.factor, fam.measured)
    text = (tmp_path / "kept.toml").read_text()
    assert text.startswith(default_tolerance_file().read_text().split("# Edit by re-measuring")[0])
    assert "Every family re-measured and merged with the records above" in text
    assert "(Other CPU 9000), 7 runs, emulated machines: native." in text

    # Without --keep-records the quieter machine's need replaces the record.
    assert main([*argv, str(tmp_path / "replaced.toml")]) == 0
    replaced = {f.pattern: f for f in load_tolerances(tmp_path / "replaced.toml").families}
    assert replaced["grad.*.bias"].factor == round_up(2.5 * 0.5 * bias.measured) < bias.factor


def test_measure_from_json_header_names_every_machine_measured_not_only_the_worst_cases(tmp_path):
    """A machine whose runs set no maximum was still measured over: the merged header must say so
    (it once listed only the machines of the worst cases, so four emulated machines read as one)."""
    a = {"needed": {"grad.*.kernel": 40.0}, "where": {"grad.*.kernel": "native m"}, "runs": 24, "machines": ["native"]}
    b = {
        "needed": {"grad.*.kernel": 10.0},
        "where": {"grad.*.kernel": "threads=1 c"},
        "runs": 16,
        "machines": ["aten=default", "native", "tf-onednn=off", "threads=1"],
    }
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    out = tmp_path / "t.toml"
    argv = ["measure-tolerances", "--from-json", str(tmp_path / "a.json"), str(tmp_path / "b.json")]
    assert main([*argv, "--families", "grad", "--out", str(out)]) == 0
    assert "40 runs, emulated machines: aten=default, native, tf-onednn=off, threads=1." in out.read_text()


def test_measure_on_a_gpu_sets_the_cuda_device_factor_and_nothing_else(tmp_path, capsys):
    """A GPU measurement whose worst family needs twice its CPU factor asks for a device factor of
    2.5 x 2 = 5 (the CPU's safety margin kept on the GPU); every family keeps the CPU's factor and
    record, and the header names the GPU. A GPU that rounds no worse than the CPU gets 1, never less."""
    from parity.measure import round_up
    from parity.tolerances import load_tolerances

    before = load_tolerances(default_tolerance_file())
    kernel = next(f for f in before.families if f.pattern == "grad.*.kernel")
    canvas = next(f for f in before.families if f.pattern == "object.canvas")
    gpu = {
        "needed": {"grad.*.kernel": 2.0 * kernel.factor, "object.canvas": 0.5 * canvas.factor},
        "where": {"grad.*.kernel": "native case 4", "object.canvas": "native matrix default"},
        "runs": 9,
        "machines": ["native"],
        "devices": ["cuda (Some GPU 100)"],
    }
    (tmp_path / "gpu.json").write_text(json.dumps(gpu))
    out = tmp_path / "t.toml"
    assert main(["measure-tolerances", "--from-json", str(tmp_path / "gpu.json"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "device_factor needed 5 on cuda (Some GPU 100)   grad.*.kernel (native case 4)" in printed
    assert "(     2 x its CPU factor)" in printed and "(   0.5 x its CPU factor)" in printed
    after_cpu, after_cuda = load_tolerances(out), load_tolerances(out, profile="cuda")
    assert after_cuda.device_factor == 5.0 == round_up(2.5 * 2.0) and after_cpu.device_factor == 1.0
    for fam, mine in zip(before.families, after_cpu.families, strict=True):
        assert (mine.pattern, mine.factor, mine.measured) == (fam.pattern, fam.factor, fam.measured)
    text = out.read_text()
    assert text.startswith(default_tolerance_file().read_text().split("# Edit by re-measuring")[0])
    assert "9 runs, emulated machines: native. Devices: cuda (Some GPU 100)." in text
    assert load_tolerances(out, profile="cuda").normwise_floors == load_tolerances(None, "cuda").normwise_floors

    quiet = dict(gpu, needed={"grad.*.kernel": 0.1 * kernel.factor})
    (tmp_path / "quiet.json").write_text(json.dumps(quiet))
    argv = ["measure-tolerances", "--from-json", str(tmp_path / "quiet.json"), "--out", str(out)]
    assert main(argv) == 0
    assert load_tolerances(out, profile="cuda").device_factor == 1.0
    # --keep-records: one GPU's quiet measurement adds to the evidence and lowers nothing.
    assert main([*argv, "--template", str(default_tolerance_file()), "--keep-records"]) == 0
    assert load_tolerances(out, profile="cuda").device_factor == load_tolerances(None, "cuda").device_factor
    assert "or the record above if larger, by:" in out.read_text()


def test_measure_refuses_to_mix_gpu_and_cpu_measurements_or_reshape_families_from_a_gpu(tmp_path, capsys):
    """A GPU's needs merged into the CPU's would raise the families every CPU run is held to, and a
    CPU's into the GPU's would hide what the GPU needs: both are refused, naming both devices."""
    cpu = {"needed": {"grad.*.kernel": 40.0}, "where": {"grad.*.kernel": "native m"}, "runs": 2}  # before "devices"
    gpu = dict(cpu, devices=["cuda (Some GPU 100)"])
    (tmp_path / "cpu.json").write_text(json.dumps(cpu))
    (tmp_path / "gpu.json").write_text(json.dumps(gpu))
    argv = ["measure-tolerances", "--from-json", str(tmp_path / "cpu.json"), str(tmp_path / "gpu.json")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "cannot merge a measurement on cuda (Some GPU 100) into one on cpu" in err
    argv = ["measure-tolerances", "--from-json", str(tmp_path / "gpu.json"), str(tmp_path / "cpu.json")]
    assert main(argv) == 2  # the other order too, naming the file that clashed
    err = capsys.readouterr().err
    assert f"option --from-json: {tmp_path / 'cpu.json'}: measure-tolerances: cannot merge a measurement on cpu" in err
    # --device must agree with the files' device
    argv = ["measure-tolerances", "--from-json", str(tmp_path / "gpu.json"), "--device", "cpu"]
    assert main([*argv, "--out", str(tmp_path / "t.toml")]) == 2
    assert "option --device cpu: the measurements of --from-json ran on cuda (Some GPU 100)" in capsys.readouterr().err
    # emulated machines are CPU settings
    assert main(["measure-tolerances", "--device", "cuda", "--emulate", "threads=1"]) == 2
    assert "option --emulate: the emulated machines are CPU settings" in capsys.readouterr().err
    argv = ["measure-tolerances", "--from-json", str(tmp_path / "gpu.json"), "--families", "grad"]
    assert main([*argv, "--out", str(tmp_path / "t.toml")]) == 2
    assert "option --families applies to a CPU measurement" in capsys.readouterr().err
    assert not (tmp_path / "t.toml").exists()
    # and on a GPU run, before anything is run
    assert main(["measure-tolerances", "--device", "cuda", "--gradients", "--families", "grad", "--cases", "1"]) == 2
    assert "option --families applies to a CPU measurement" in capsys.readouterr().err


def test_gpu_records_replace_each_other_and_survive_a_cpu_remeasurement(tmp_path):
    """A second GPU measurement replaces the first's header record (the factor it described is gone)
    unless --keep-records keeps both; a CPU re-measurement of every family keeps the GPU's record,
    since it keeps the device factor that record set."""
    gpu = {"needed": {"object.canvas": 1.0}, "where": {"object.canvas": "native m"}, "runs": 3}
    for name, label in (("a", "GPU A"), ("b", "GPU B")):
        (tmp_path / f"{name}.json").write_text(json.dumps(dict(gpu, devices=[f"cuda ({label})"])))
    first, second, kept = tmp_path / "1.toml", tmp_path / "2.toml", tmp_path / "k.toml"
    assert main(["measure-tolerances", "--from-json", str(tmp_path / "a.json"), "--out", str(first)]) == 0
    argv = ["measure-tolerances", "--from-json", str(tmp_path / "b.json"), "--template", str(first), "--out"]
    assert main([*argv, str(second)]) == 0
    text = second.read_text()
    assert "Devices: cuda (GPU B)." in text and "GPU A" not in text
    assert text.count("# [profiles.cuda] device_factor =") == 1
    assert main([*argv, str(kept), "--keep-records"]) == 0
    assert "Devices: cuda (GPU A)." in kept.read_text() and "Devices: cuda (GPU B)." in kept.read_text()

    cpu = {"needed": {"object.canvas": 1.0}, "where": {"object.canvas": "native m"}, "runs": 2}
    (tmp_path / "cpu.json").write_text(json.dumps(cpu))
    redone = tmp_path / "cpu.toml"
    argv = ["measure-tolerances", "--from-json", str(tmp_path / "cpu.json"), "--template", str(second)]
    assert main([*argv, "--out", str(redone)]) == 0
    assert "Devices: cuda (GPU B)." in redone.read_text() and "Every family" not in redone.read_text()


def test_measure_writes_nothing_from_zero_runs(tmp_path, capsys):
    """`--cases 0` without the matrix measures nothing: writing a file from it would replace every
    record with an empty one."""
    out = tmp_path / "t.toml"
    assert main(["measure-tolerances", "--cases", "0", "--out", str(out)]) == 2
    assert "option --cases 0 without --matrix or --from-json: nothing to measure" in capsys.readouterr().err
    empty = tmp_path / "m.json"
    empty.write_text(json.dumps({"needed": {}, "where": {}, "runs": 0}))
    assert main(["measure-tolerances", "--from-json", str(empty), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"option --out {out}: nothing was measured (0 runs); the file was not written" in err
    assert not out.exists()


def test_measure_on_cuda_without_a_gpu_exits_2_before_running_anything(monkeypatch, capsys):
    """`measure-tolerances --device cuda` on a machine whose torch sees no GPU: a usage error naming
    the backend and the device, not a CPU measurement passed off as a GPU's."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = ["measure-tolerances", "--device", "cuda", "--backends", "reference,torch", "--cases", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "device 'cuda' is not usable: torch backend: device 'cuda' was requested" in err


def test_a_gpu_measurement_runs_with_the_cuda_profile(monkeypatch):
    """Its comparisons use the cuda profile's normwise floors, as a GPU parity run does, but not its
    device factor: the needs are what that factor is made of (``device_factor_needed``), and one
    divided by it would ask for a device factor 4 times too small. A CPU measurement runs with the
    CPU's tolerances."""
    import torch

    from parity import measure

    used = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(measure, "measure_cases", lambda tol, *a: used.append(tol) or measure.Measurement())
    for device in ("cuda", "cpu"):
        argv = ["measure-tolerances", "--device", device, "--backends", "reference,torch", "--cases", "1"]
        assert main(argv) == 0
    assert [t.profile for t in used] == ["cuda", "cpu"]
    assert used[0].normwise_floors and used[0].device_factor == 1.0 and not used[1].normwise_floors


def test_measurement_records_the_device_the_float32_backends_ran_on():
    """The device comes from the backends' own environments (the float64 reference is always on the
    CPU and says nothing about it)."""
    from types import SimpleNamespace

    from parity.measure import Measurement, measured_factors
    from parity.tolerances import load_tolerances

    def record(precision, **env):
        return SimpleNamespace(precision=precision, environment=env)

    tol = load_tolerances(default_tolerance_file())
    backends = {
        "reference": record("float64", device="cpu"),
        "torch": record("float32", device="cuda:0", device_name="NVIDIA H200"),
    }
    m = measured_factors([SimpleNamespace(taps=[], backends=backends)], tol, "native case 0")
    assert m.devices == {"cuda (NVIDIA H200)"} and m.device == "cuda"
    assert Measurement.from_dict(json.loads(json.dumps(m.to_dict()))).devices == {"cuda (NVIDIA H200)"}
    on_cpu = {"reference": record("float64", device="cpu"), "torch": record("float32", device="cpu")}
    assert measured_factors([SimpleNamespace(taps=[], backends=on_cpu)], tol).device == "cpu"


def test_measurement_json_records_the_machine_of_every_run():
    """What --json writes names the machine of each run, so a later --from-json can list them all."""
    from types import SimpleNamespace

    from parity.emulation import cpu_model
    from parity.measure import Measurement, measured_factors
    from parity.tolerances import load_tolerances

    m = measured_factors([SimpleNamespace(taps=[])], load_tolerances(default_tolerance_file()), "threads=1 case 0")
    assert m.machines == {"threads=1"} and m.cpus == {cpu_model()}
    other = Measurement.from_dict(json.loads(json.dumps(m.to_dict())))
    assert other.machines == {"threads=1"} and other.runs == 1 and other.cpus == {cpu_model()}
    # a file from before the field existed falls back to the machines its worst cases name
    old = Measurement.from_dict({"needed": {"f": 1.0}, "where": {"f": "tf-onednn=off case 2"}, "runs": 1})
    assert old.machines == {"tf-onednn=off"} and old.cpus == set()  # and no CPU it cannot know


@pytest.mark.parametrize(
    ("option", "value"),
    [(o, v) for o in ("--minimum", "--safety") for v in ("nan", "inf")]
    + [("--minimum", "0"), ("--minimum", "-1"), ("--safety", "0.5")],
)
def test_measure_refuses_a_bad_safety_or_minimum_before_touching_the_out_file(tmp_path, capsys, option, value):
    """`--out` is often the bundled tolerance file itself (docs/tolerances.md): a factor of 0 or inf
    written there would leave a file that does not load, and every later run would stop on it."""
    out = tmp_path / "tolerances.toml"
    out.write_bytes(default_tolerance_file().read_bytes())
    (tmp_path / "m.json").write_text(json.dumps({"needed": {"grad.*.kernel": 40.0}, "where": {}, "runs": 2}))
    argv = ["measure-tolerances", "--from-json", str(tmp_path / "m.json"), option, value, "--out", str(out)]
    assert main(argv) == 2
    assert f"option {option} must be a finite number" in capsys.readouterr().err
    assert out.read_bytes() == default_tolerance_file().read_bytes()


def test_measure_checks_the_file_it_would_write_before_replacing_the_out_file(tmp_path, capsys, monkeypatch):
    """A rendered file that would not load (here: a factor of 0 from a renderer gone wrong) is
    refused, and the file on disk stays as it was."""
    from parity import measure

    rendered = measure.render
    monkeypatch.setattr(
        measure, "render", lambda *a, **k: rendered(*a, **k).replace("\nfactor = ", "\nfactor = 0.0 # ", 1)
    )
    out = tmp_path / "tolerances.toml"
    out.write_bytes(default_tolerance_file().read_bytes())
    (tmp_path / "m.json").write_text(json.dumps({"needed": {"grad.*.kernel": 40.0}, "where": {}, "runs": 2}))
    argv = ["measure-tolerances", "--from-json", str(tmp_path / "m.json"), "--families", "grad", "--out", str(out)]
    assert main(argv) == 2
    assert f"option --out {out} (the file it would write; nothing was written)" in capsys.readouterr().err
    assert out.read_bytes() == default_tolerance_file().read_bytes()


def test_run_writes_into_a_report_folder_that_holds_the_plugins_per_test_reports(tmp_path, capsys):
    """`parity-report` is the default of both the command and the pytest plugin, which keeps a folder
    per test there: folders inside never stop a run; a file a report does not write does (bad input)."""
    folder = tmp_path / "parity-report"
    (folder / "tests_test_parity_matrix.py_test_forward_parity_gridsize_1").mkdir(parents=True)
    argv = ["run", *SMALL, "--backends", "reference,torch", "--no-html", "--report", str(folder)]
    assert main(argv) == 0, capsys.readouterr().err
    assert (folder / "report.json").is_file()
    (folder / "notes.txt").write_text("mine")
    assert main(argv) == 2
    assert (
        f"option --report: folder {folder} holds files a report does not write (notes.txt)" in capsys.readouterr().err
    )
    assert (folder / "notes.txt").read_text() == "mine"

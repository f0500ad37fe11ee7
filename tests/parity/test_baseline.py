"""Baselines through the pytest plugin, in inner pytest sessions, as a user of ``pytest -m parity`` meets them.

The inner sessions run in-process (``pytester.runpytest``): importing TensorFlow and PyTorch again in a
subprocess per session would cost seconds each. pytester drops every module an inner session imports,
and TensorFlow cannot be imported twice in one process, so :func:`warm` runs the same small config once
in this process first.
"""

import io
import json
import os
import time
import zipfile
from types import SimpleNamespace

import numpy as np
import pytest

from parity.baseline import (
    STAT_NAMES_KEY,
    baseline_arrays,
    compare_to_baseline,
    meta_path,
    read_arrays,
    read_metadata,
    stale_reasons,
    write_arrays,
)
from parity.config import ModelConfig
from parity.errors import BaselineError
from parity.fixture import bundled_fixture, file_sha256
from parity.report import write_reports
from parity.session import RunSpec, run
from parity.weights import generate_weights, weights_sha256

pytest_plugins = ["pytester"]

CONFIG = ModelConfig(gridsize=1, probe_big=False)
BACKENDS = ("reference", "torch", "tensorflow")
INNER_TEST = """
import pytest

from parity.config import ModelConfig


@pytest.mark.parity
def test_small(parity_run, parity_baseline):
    result = parity_run(ModelConfig(gridsize=1, probe_big=False), batch_size=1, max_groups=1)
    parity_baseline.check(result)
"""


@pytest.fixture(scope="module")
def warm(tmp_path_factory, numba_compiler):
    """Import every framework and lazily loaded module before pytester takes its snapshot of sys.modules."""
    result = run(RunSpec(config=CONFIG, batch_size=1, max_groups=1))
    write_reports(result, tmp_path_factory.mktemp("warm"))
    assert result.passed, result.describe_failure()


@pytest.fixture
def inner(warm, pytester):
    pytester.makepyfile(test_baselines=INNER_TEST)
    return pytester


def _run(pytester, *args):
    return pytester.runpytest("-p", "no:cacheprovider", "--parity-report-dir", "rep", *args)


def _npz(pytester, backend):
    return pytester.path / "test_baselines" / f"test_small-{backend}.npz"


def _files(pytester):
    return sorted(p.name for p in (pytester.path / "test_baselines").iterdir())


def _stamp(path):
    """Changes whenever the file is rewritten (atomic writes give it a new inode), even with equal bytes."""
    st = path.stat()
    return st.st_ino, st.st_mtime_ns, path.read_bytes()


def _stamps(pytester):
    paths = [p for b in BACKENDS for p in (_npz(pytester, b), meta_path(_npz(pytester, b)))]
    return {p.name: _stamp(p) for p in paths}


def _report(pytester):
    (path,) = (pytester.path / "rep").glob("*/report.json")
    return json.loads(path.read_text())


def _load(path):
    with np.load(path) as npz:
        return {k: npz[k] for k in npz.files}


def _rows(arrays, tap):
    """{statistic: values} of one tap of a baseline file."""
    arr = arrays[tap]
    return dict(zip(arrays[f"{STAT_NAMES_KEY}{arr.shape[0]}"].tolist(), arr, strict=True))


def _set_row(arrays, tap, statistic, values):
    arr = arrays[tap].copy()
    names = arrays[f"{STAT_NAMES_KEY}{arr.shape[0]}"].tolist()
    arr[names.index(statistic)] = values
    arrays[tap] = arr


def _statistic_bounds(backend, tap, statistic):
    """The per-patch tolerance the harness gives one statistic of the inner test's run."""
    result = run(RunSpec(config=CONFIG, batch_size=1, max_groups=1))
    return result.statistic_tolerances[backend][tap][statistic]


def test_baseline_lifecycle_create_compare_change_regenerate(inner, monkeypatch):
    # Zip members carry the time they were written; frozen, rewriting unchanged statistics gives the
    # same bytes (as it does for anyone who regenerates within the same two seconds).
    monkeypatch.setattr(zipfile, "time", SimpleNamespace(time=lambda: 1.7e9, localtime=time.localtime))
    weights = generate_weights(CONFIG)

    # First run: every backend's baseline is created, and the test fails saying so.
    res = _run(inner)
    res.assert_outcomes(failed=1)
    out = res.stdout.str()
    for b in BACKENDS:
        assert f"test_small-{b}: no baseline yet; created {_npz(inner, b)}" in out
        meta = read_metadata(meta_path(_npz(inner, b)))
        assert meta["backend"] == b and meta["test"] == "test_small"
        assert meta["fixture_sha256"] == file_sha256(bundled_fixture("n64_g1_grf"))
        assert meta["fixture_name"] == "n64_g1_grf.h5"
        assert meta["weights_sha256"] == weights_sha256(weights)
        assert meta["config"] == CONFIG.to_dict()
        assert meta["groups"] == 1
        assert meta["environment"]["device"] == "cpu"
    assert _files(inner) == sorted(f"test_small-{b}{ext}" for b in BACKENDS for ext in (".meta.json", ".npz"))
    original = {b: _load(_npz(inner, b)) for b in BACKENDS}
    # The baseline holds the statistics of the run, float32 for float32 backends.
    with np.load(next((inner.path / "rep").glob("*/statistics.npz"))) as stats:
        for b in BACKENDS:
            for stat, values in _rows(original[b], "physics.diffraction").items():
                np.testing.assert_allclose(values, stats[f"{b}|physics.diffraction|{stat}"], rtol=1e-6)
    # Stored in float32, the reference's too (docs/decisions.md).
    assert original["reference"]["physics.diffraction"].dtype == np.float32
    assert original["torch"]["physics.diffraction"].dtype == np.float32

    # Second run: compared and passing; nothing is rewritten.
    before = _stamps(inner)
    _run(inner).assert_outcomes(passed=1)
    assert _stamps(inner) == before
    report = _report(inner)
    assert report["verdict"] == "pass" and report["baseline_notes"] == []
    compared = {(c["a"], c["tap"]) for t in report["taps"] for c in t["baseline"]}
    assert {a for a, _ in compared} == set(BACKENDS)
    assert ("torch", "object.canvas") in compared

    # Stored statistics changed: torch at two taps (the first in order of computation must be named,
    # not the first in alphabetical order); tensorflow by three times one statistic's tolerance at one
    # patch.
    torch_arrays = dict(original["torch"])
    for tap in ("loss.mae", "output.amplitude"):
        torch_arrays[tap] = torch_arrays[tap] * np.float32(1.5) + np.float32(1)
    np.savez_compressed(_npz(inner, "torch"), **torch_arrays)
    tf_tap, tf_stat = "physics.diffraction", "l2"
    tf_bound = _statistic_bounds("tensorflow", tf_tap, tf_stat)
    tf_arrays = dict(original["tensorflow"])
    tf_values = _rows(tf_arrays, tf_tap)[tf_stat].astype(np.float64)
    tf_values[0] += 3 * tf_bound[0]
    _set_row(tf_arrays, tf_tap, tf_stat, tf_values.astype(np.float32))
    np.savez_compressed(_npz(inner, "tensorflow"), **tf_arrays)
    before = _stamps(inner)
    res = _run(inner)
    res.assert_outcomes(failed=1)
    out = res.stdout.str()
    assert "test_small-torch: statistics changed beyond their tolerance:" in out
    assert "test_small-tensorflow: statistics changed beyond their tolerance:" in out
    assert "test_small-reference" not in out
    # tensorflow: the one statistic of one patch that moved, named with its margin
    assert "physics.diffraction / l2 [vs_baseline: tensorflow vs baseline]: MISMATCH 1 / 1 elements" in out
    # The obtained statistics are written beside the report, in the baseline's own layout.
    obtained = next((inner.path / "rep").glob("*/obtained/test_small-tensorflow.npz"))
    assert _load(obtained).keys() == original["tensorflow"].keys()
    assert _stamps(inner) == before  # a failing comparison rewrites nothing
    report = _report(inner)
    assert report["verdict"] == "fail" and report["passed"] is False
    assert report["baseline_notes"] == [
        "torch: first tap changed since its baseline: output.amplitude (mean)",
        f"tensorflow: first tap changed since its baseline: {tf_tap} ({tf_stat})",
    ]
    failed = {(c["a"], c["tap"]) for t in report["taps"] for c in t["baseline"] if not c["passed"]}
    assert failed == {("torch", "output.amplitude"), ("torch", "loss.mae"), ("tensorflow", tf_tap)}
    taps = {t["name"]: t for t in report["taps"]}
    assert taps["output.amplitude"]["passed"] is False
    assert taps["output.intensity"]["passed"] is True
    bad = [c for c in taps["output.amplitude"]["baseline"] if c["a"] == "torch" and not c["passed"]]
    assert bad and all(c["kind"] == "vs_baseline" and c["mismatched"] > 0 for c in bad)

    # --force-regen rewrites the two changed baselines (and fails, as pytest-regressions does), the
    # unchanged one stays; the next run passes.
    res = _run(inner, "--force-regen")
    res.assert_outcomes(failed=1)
    out = res.stdout.str()
    assert f"regenerated by --force-regen: {_npz(inner, 'torch')}" in out
    assert f"regenerated by --force-regen: {_npz(inner, 'tensorflow')}" in out
    after = _stamps(inner)
    assert after["test_small-reference.npz"] == before["test_small-reference.npz"]
    assert after["test_small-torch.npz"] != before["test_small-torch.npz"]
    assert after["test_small-tensorflow.npz"] != before["test_small-tensorflow.npz"]
    for b in BACKENDS:
        regenerated = _load(_npz(inner, b))
        assert regenerated.keys() == original[b].keys()
        for k, v in original[b].items():
            np.testing.assert_array_equal(regenerated[k], v, err_msg=f"{b} {k}")
    _run(inner).assert_outcomes(passed=1)
    # The obtained statistics of the failing runs are gone with their report: beside this passing
    # one they would read as its own.
    assert list((inner.path / "rep").glob("*/obtained/*")) == []

    # A change within a statistic's tolerance passes and rewrites nothing: the tolerance is the
    # model's, not zero.
    bound = _statistic_bounds("torch", "object.canvas", "amplitude.mean")
    within = dict(original["torch"])
    _set_row(
        within, "object.canvas", "amplitude.mean", (_rows(within, "object.canvas")["amplitude.mean"] + 0.5 * bound)
    )
    assert not np.array_equal(
        _rows(within, "object.canvas")["amplitude.mean"], _rows(original["torch"], "object.canvas")["amplitude.mean"]
    )
    np.savez_compressed(_npz(inner, "torch"), **within)
    before = _stamps(inner)
    _run(inner).assert_outcomes(passed=1)
    assert _stamps(inner) == before

    # --regen-all rewrites every baseline and its metadata, without comparing (so a stale one too),
    # and passes. With the zip timestamps frozen the unchanged statistics give the same bytes: the
    # metadata must be rewritten all the same.
    meta = read_metadata(meta_path(_npz(inner, "torch")))
    meta["weights_sha256"] = "0" * 64
    meta_path(_npz(inner, "torch")).write_text(json.dumps(meta))
    before = _stamps(inner)
    _run(inner, "--regen-all").assert_outcomes(passed=1)
    after = _stamps(inner)
    for name, stamp in before.items():
        assert after[name][:2] != stamp[:2], f"{name} was not rewritten by --regen-all"
        if name.endswith(".npz") and "torch" not in name:
            assert after[name][2] == stamp[2]
    # torch's baseline held a change within tolerance; --regen-all wrote the run's own values.
    for k, v in original["torch"].items():
        np.testing.assert_array_equal(_load(_npz(inner, "torch"))[k], v, err_msg=k)
    assert read_metadata(meta_path(_npz(inner, "torch")))["weights_sha256"] == weights_sha256(weights)
    assert _files(inner) == sorted(before)


def test_stale_and_corrupt_baselines_are_reported_not_compared(inner):
    _run(inner).assert_outcomes(failed=1)  # creates the baselines
    original = {b: _load(_npz(inner, b)) for b in BACKENDS}

    # torch: made from another fixture, and its values changed too (they must not be compared).
    meta = read_metadata(meta_path(_npz(inner, "torch")))
    meta["fixture_sha256"] = "0" * 64
    meta_path(_npz(inner, "torch")).write_text(json.dumps(meta))
    doubled = {k: v * 2 if v.dtype.kind == "f" else v for k, v in original["torch"].items()}
    np.savez_compressed(_npz(inner, "torch"), **doubled)
    # tensorflow: metadata is garbage. reference: the baseline file is garbage.
    meta_path(_npz(inner, "tensorflow")).write_bytes(b"\x00\xffnot json")
    _npz(inner, "reference").write_bytes(b"PK\x03\x04garbage" * 10)
    before = _stamps(inner)
    res = _run(inner)
    res.assert_outcomes(failed=1)
    out = res.stdout.str()
    assert f"{_npz(inner, 'torch')}: baseline made from other inputs or unreadable, not compared" in out
    assert "fixture differs (baseline: '" + "0" * 64 + "'" in out
    assert "regenerate with --force-regen" in out
    assert f"{meta_path(_npz(inner, 'tensorflow'))}: baseline metadata is not valid JSON" in out
    assert f"{_npz(inner, 'reference')}: baseline file is corrupt" in out
    assert _stamps(inner) == before  # nothing is rewritten without --force-regen
    report = _report(inner)
    assert report["verdict"] == "fail"
    assert [c for t in report["taps"] for c in t["baseline"]] == []  # none of the three was compared
    sep = ": baseline made from other inputs or unreadable, not compared: "
    notes = [n.partition(sep) for n in report["baseline_problems"]]
    assert [(n[0], n[1]) for n in notes] == [(str(_npz(inner, b)), sep) for b in BACKENDS]

    # --force-regen rewrites all three (and fails, saying so); the next run passes.
    res = _run(inner, "--force-regen")
    res.assert_outcomes(failed=1)
    # Count in the failure section only: with CI set, pytest repeats messages untruncated in its summary.
    regenerated_lines = [
        line for line in res.stdout.lines if line.startswith("E ") and "(regenerated by --force-regen: " in line
    ]
    assert len(regenerated_lines) == 3
    for b in BACKENDS:
        assert read_metadata(meta_path(_npz(inner, b)))["fixture_sha256"] == file_sha256(bundled_fixture("n64_g1_grf"))
        regenerated = _load(_npz(inner, b))
        for k, v in original[b].items():
            np.testing.assert_array_equal(regenerated[k], v, err_msg=f"{b} {k}")
    _assert_passing_with_the_baselines_alone(inner)


def _assert_passing_with_the_baselines_alone(inner):
    """The next run passes; the obtained statistics of the failing runs are gone with their report
    (beside a passing one they would read as its own), and the folder holds the baselines alone."""
    _run(inner).assert_outcomes(passed=1)
    assert list((inner.path / "rep").glob("*/obtained/*")) == []
    assert _files(inner) == sorted(f"test_small-{b}{ext}" for b in BACKENDS for ext in (".meta.json", ".npz"))


def test_stale_reasons_name_each_input_that_differs():
    meta = {"fixture_sha256": "a", "weights_sha256": "b", "config": {"N": 64}, "groups": 1, "backend": "torch"}
    assert stale_reasons(meta, dict(meta)) == []
    reasons = stale_reasons(meta, {**meta, "weights_sha256": "c", "groups": 2})
    assert reasons == [
        "weights differs (baseline: 'b', now: 'c')",
        "number of groups differs (baseline: 1, now: 2)",
    ]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "baseline metadata is missing"),
        (b"{not json", "baseline metadata is not valid JSON"),
        (b"\xff\xfe\x00", "baseline metadata is not valid JSON"),
        (b'{"schema_version": 99}', "key 'schema_version' is 99; expected 1"),
        (b"[1, 2]", "key 'schema_version' is None; expected 1"),
    ],
)
def test_unusable_metadata_is_an_error_naming_the_file(tmp_path, content, message):
    path = tmp_path / "x.meta.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(BaselineError) as info:
        read_metadata(path)
    assert str(info.value).startswith(f"{path}: {message}")


def _npy_bytes():
    buf = io.BytesIO()
    np.save(buf, np.arange(3.0))
    return buf.getvalue()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "baseline file does not exist"),
        (b"garbage bytes, not a zip archive", "baseline file is corrupt"),
        (b"", "baseline file is corrupt"),
        (_npy_bytes(), "baseline file is corrupt (ValueError: a single .npy array, not an .npz archive)"),
    ],
)
def test_unusable_baseline_file_is_an_error_naming_the_file(tmp_path, content, message):
    path = tmp_path / "x.npz"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(BaselineError) as info:
        read_arrays(path)
    assert str(info.value).startswith(f"{path}: {message}")
    assert str(info.value).endswith("regenerate with --force-regen") or content is None


def test_any_damaged_byte_is_reported_as_corrupt_or_harmless(tmp_path):
    """Flip each byte of a small baseline in turn: reading either raises BaselineError naming the file
    (zip, zlib, CRC or .npy header damage alike) or gives the same values (a zip timestamp, say)."""
    path = tmp_path / "x.npz"
    arrays = {"tap": np.linspace(0, 1, 40).reshape(4, 10), f"{STAT_NAMES_KEY}4": np.array(["a", "b", "c", "d"])}
    write_arrays(path, arrays)
    good = path.read_bytes()
    outcomes = set()
    for i in range(len(good)):
        path.write_bytes(good[:i] + bytes([good[i] ^ 0xFF]) + good[i + 1 :])
        try:
            got = read_arrays(path)
        except BaselineError as exc:
            assert str(exc).startswith(f"{path}: baseline file is corrupt ("), i
            outcomes.add("corrupt")
        else:
            # A damaged member name only renames a key, which the comparison reports by name.
            for key in got.keys() & arrays.keys():
                np.testing.assert_array_equal(got[key], arrays[key], err_msg=f"byte {i}")
            outcomes.add("harmless")
    assert outcomes == {"corrupt", "harmless"}


@pytest.mark.parametrize("interruption", [OSError("No space left on device"), KeyboardInterrupt()])
@pytest.mark.parametrize("existing", [True, False])
def test_interrupted_write_leaves_no_torn_baseline(tmp_path, monkeypatch, interruption, existing):
    path = tmp_path / "test_x-torch.npz"
    if existing:
        write_arrays(path, {"tap": np.arange(6.0).reshape(2, 3)})
        old = path.read_bytes()
    real = np.savez_compressed

    def torn(file, *args, **kwds):
        real(file, *args, **kwds)  # the whole archive, then truncated: an interrupted write
        file.truncate(file.tell() // 2)
        raise interruption

    monkeypatch.setattr(np, "savez_compressed", torn)
    with pytest.raises(type(interruption)):
        write_arrays(path, {"tap": np.ones((2, 3)), "other": np.zeros(5)})
    assert sorted(os.listdir(tmp_path)) == ([path.name] if existing else [])
    if existing:
        assert path.read_bytes() == old
        np.testing.assert_array_equal(read_arrays(path)["tap"], np.arange(6.0).reshape(2, 3))
    monkeypatch.setattr(np, "savez_compressed", real)
    write_arrays(path, {"tap": np.ones((2, 3))})
    np.testing.assert_array_equal(read_arrays(path)["tap"], np.ones((2, 3)))
    assert os.listdir(tmp_path) == [path.name]


# Damaged baselines are reported, never raised, and --force-regen replaces them; a baseline's two
# files are written as one. On the toy backends of test_runner: no framework, no inner session.


@pytest.fixture
def toy_result(tmp_path):
    from parity.runner import run_parity
    from parity.tolerances import load_tolerances

    from .test_runner import TAPS, TOL_TEXT, Toy, Toy32, W, _batches, _expected

    path = tmp_path / "t.toml"
    path.write_text(TOL_TEXT)
    tol = load_tolerances(path, known_taps=TAPS)

    def make():
        backends = {"reference": Toy(None, W), "torch": Toy32(None, W)}
        return run_parity(backends, _batches(), tol, expected=_expected, reference="reference")

    return make


def _check(make, folder, **options):
    from parity.baseline import check_baselines

    return check_baselines(make(), folder, "test_x", **options)


def _pair(folder, backend="torch"):
    npz = folder / f"test_x-{backend}.npz"
    return npz, meta_path(npz)


def _pair_bytes(folder, backend="torch"):
    return tuple(p.read_bytes() for p in _pair(folder, backend))


def _tamper_tap(npz, value):
    arrays = _load(npz)
    tap = next(k for k in arrays if not k.startswith(STAT_NAMES_KEY))
    arrays[tap] = value(arrays[tap])
    np.savez_compressed(npz, **arrays)
    return tap


DAMAGE = {
    "0-d tap": lambda folder: _tamper_tap(_pair(folder)[0], lambda a: np.float32(1.0)),
    "string tap": lambda folder: _tamper_tap(_pair(folder)[0], lambda a: np.full(a.shape, "x")),
    "metadata is a folder": lambda folder: (_pair(folder)[1].unlink(), _pair(folder)[1].mkdir()),
}
MESSAGES = {
    "0-d tap": "baseline file is corrupt (ValueError: member 'toy.in' is a 0-d array of float32, not a tap's",
    "string tap": "baseline file is corrupt (ValueError: member 'toy.in' is a 2-d array of <U1, shape (",
    "metadata is a folder": "baseline metadata cannot be read (Is a directory)",
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_baseline_is_reported_by_file_and_force_regen_replaces_it(toy_result, tmp_path, damage):
    folder = tmp_path / "test_x"
    assert len(_check(toy_result, folder)) == 2  # both created
    good = _pair_bytes(folder)
    DAMAGE[damage](folder)
    (problem,) = _check(toy_result, folder)
    npz, meta = _pair(folder)
    damaged = meta if "metadata" in damage else npz
    assert problem.startswith(f"{npz}: baseline made from other inputs or unreadable, not compared: ")
    assert f"{damaged}: {MESSAGES[damage]}" in problem
    assert problem.endswith("; regenerate with --force-regen")
    (problem,) = _check(toy_result, folder, force_regen=True)
    assert problem.endswith(f" (regenerated by --force-regen: {npz})")
    assert _check(toy_result, folder) == []
    assert _pair_bytes(folder)[1] == good[1]
    assert sorted(os.listdir(folder)) == sorted(p.name for b in ("reference", "torch") for p in _pair(folder, b))


@pytest.mark.parametrize("failing", [".npz", ".meta.json"])
def test_a_baseline_pair_that_cannot_be_written_whole_is_left_as_it_was(toy_result, tmp_path, monkeypatch, failing):
    """--force-regen over a stale baseline whose .npz or .meta.json cannot be replaced (made immutable,
    say): reported by file, and neither of the pair is replaced, so they still belong together."""
    folder = tmp_path / "test_x"
    _check(toy_result, folder)
    npz, meta = _pair(folder)
    stored = read_metadata(meta)
    meta.write_text(json.dumps({**stored, "weights_sha256": "0" * 64}))  # stale: regenerated by --force-regen
    before = _pair_bytes(folder)
    real = os.replace

    def replace(src, dst):
        if str(dst).endswith(failing) and "torch" in str(dst):
            raise PermissionError(1, "Operation not permitted", str(dst))
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    (problem,) = _check(toy_result, folder, force_regen=True)
    assert problem.endswith(
        f" (not regenerated: {npz} and {meta} cannot be written (Operation not permitted); both are as they were)"
    )
    assert _pair_bytes(folder) == before
    assert sorted(os.listdir(folder)) == sorted(p.name for b in ("reference", "torch") for p in _pair(folder, b))


def test_an_interrupted_baseline_write_leaves_the_old_pair_or_the_whole_new_one(toy_result, tmp_path, monkeypatch):
    import signal

    import parity.baseline

    folder = tmp_path / "test_x"
    _check(toy_result, folder)
    npz, meta = _pair(folder)
    meta.write_text(json.dumps({**read_metadata(meta), "weights_sha256": "0" * 64}))
    before = _pair_bytes(folder)

    # A Ctrl-C while the metadata is written, after the arrays: neither file is replaced.
    def interrupted(meta_now):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(parity.baseline, "_metadata_text", interrupted)
        with pytest.raises(KeyboardInterrupt):
            _check(toy_result, folder, force_regen=True)
    assert _pair_bytes(folder) == before

    # A Ctrl-C between the two renames is held until both are done: the whole new pair.
    real = os.replace

    def replace(src, dst):
        real(src, dst)
        if str(dst) == str(npz):
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        _check(toy_result, folder, force_regen=True)
    monkeypatch.setattr(os, "replace", real)
    assert _check(toy_result, folder) == []
    assert sorted(os.listdir(folder)) == sorted(p.name for b in ("reference", "torch") for p in _pair(folder, b))


def test_damaged_baselines_fail_the_test_by_file_and_force_regen_replaces_them(inner):
    """Through the plugin: a 0-d tap, a tap of strings and a .meta.json that is a folder each fail the
    test with a message naming the file (not an error of the test's own), and --force-regen replaces them."""
    _run(inner).assert_outcomes(failed=1)  # creates the baselines
    original = {b: _load(_npz(inner, b)) for b in BACKENDS}
    for backend, damage in (("reference", lambda a: np.float32(1.0)), ("torch", lambda a: np.full(a.shape, "x"))):
        arrays = dict(original[backend])
        arrays["input.x"] = damage(arrays["input.x"])
        np.savez_compressed(_npz(inner, backend), **arrays)
    meta_path(_npz(inner, "tensorflow")).unlink()
    meta_path(_npz(inner, "tensorflow")).mkdir()
    res = _run(inner)
    res.assert_outcomes(failed=1)
    out = res.stdout.str()
    assert "Traceback" not in out and "IndexError" not in out and "IsADirectoryError" not in out
    assert f"{_npz(inner, 'reference')}: baseline file is corrupt (ValueError: member 'input.x' is a 0-d array" in out
    strings = "baseline file is corrupt (ValueError: member 'input.x' is a 2-d array of <U1"
    assert f"{_npz(inner, 'torch')}: {strings}" in out
    assert f"{meta_path(_npz(inner, 'tensorflow'))}: baseline metadata cannot be read (Is a directory)" in out
    _run(inner, "--force-regen").assert_outcomes(failed=1)
    for b in BACKENDS:
        regenerated = _load(_npz(inner, b))
        for k, v in original[b].items():
            np.testing.assert_array_equal(regenerated[k], v, err_msg=f"{b} {k}")
    _assert_passing_with_the_baselines_alone(inner)


def test_a_baseline_another_test_wrote_is_reported_and_never_compared_or_rewritten(toy_result, tmp_path):
    """Baselines record the test they belong to: a test whose name maps to the same file (a name
    that only differs where file names cannot) finds them and says so, under every option, without
    touching them; the owner still passes."""
    folder = tmp_path / "test_x"
    assert len(_check(toy_result, folder, test="test_x[a=1]")) == 2  # created for their owner
    assert read_metadata(_pair(folder)[1])["test"] == "test_x[a=1]"
    written = _pair_bytes(folder)
    for options in ({}, {"force_regen": True}, {"regen_all": True}):
        problems = _check(toy_result, folder, test="test_x[a_1]", **options)
        assert len(problems) == 2, options
        npz = _pair(folder)[0]
        assert f"{npz}: the baseline of test 'test_x[a=1]', not of 'test_x[a_1]': the two tests share" in problems[1]
        assert _pair_bytes(folder) == written
    assert _check(toy_result, folder, test="test_x[a=1]") == []


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("tests/t.py::TestA::test_x", "tests/t.py::TestB::test_x"),
        ("tests/t.py::test_x[0.5]", "tests/t.py::test_x[-0.5]"),
        ("tests/t.py::test_x[1]", "tests/t.py::test_x[-1]"),
        ("tests/t.py::test_x[probe mask]", "tests/t.py::test_x[probe_mask]"),
        ("tests/t.py::test_x[" + "a" * 300 + "]", "tests/t.py::test_x[" + "a" * 299 + "b]"),
    ],
)
def test_tests_that_differ_get_baselines_and_report_folders_of_their_own(first, second, tmp_path):
    """The class is part of a baseline's name, and an id holding what a file name cannot (".", a
    space) or too long for one gets a hash of itself: two tests never meet in one file or folder."""
    from types import SimpleNamespace

    from parity.plugin import ParityOptions, _report_folder, baseline_basename

    options = ParityOptions(("reference",), "cpu", tmp_path, None, False, False)
    nodes = [SimpleNamespace(nodeid=n, name=n.rsplit("::", 1)[1]) for n in (first, second)]
    names = [baseline_basename(n) for n in nodes]
    folders = [_report_folder(options, n.nodeid) for n in nodes]
    assert names[0] != names[1] and folders[0] != folders[1]
    assert all(len(name) <= 120 and len(folder.name) <= 120 for name, folder in zip(names, folders, strict=True))


def test_usual_test_ids_keep_the_baseline_names_they_always_had():
    from types import SimpleNamespace

    from parity.plugin import baseline_basename

    for nodeid, name in [
        ("tests/test_parity_matrix.py::test_forward_parity[gridsize=1]", "test_forward_parity_gridsize_1"),
        (
            "tests/test_parity_matrix.py::test_forward_parity[other_options-N=128-gridsize=1]",
            "test_forward_parity_other_options_N_128_gridsize_1",
        ),
        ("tests/t.py::TestA::test_x[a=1,b=2]", "TestA_test_x_a_1_b_2"),
    ]:
        assert baseline_basename(SimpleNamespace(nodeid=nodeid, name=nodeid.rsplit("::", 1)[1])) == name


def test_two_collected_tests_sharing_a_baseline_name_are_a_usage_error(pytester):
    """Two selected tests mapping to one baseline name stop the session before anything runs; tests
    not selected (-k) do not stop a session that would not run them."""
    pytester.makepyfile(
        test_clash="""
        import pytest

        @pytest.mark.parametrize("v", ["a=1", "a_1"], ids=str)
        def test_x(parity_baseline, v):
            pass

        def test_other():
            pass
        """
    )
    res = pytester.runpytest("-p", "no:cacheprovider", "-n", "0")
    assert res.ret == pytest.ExitCode.USAGE_ERROR
    res.stderr.fnmatch_lines(
        ["*tests test_clash.py::test_x[[]a=1] and test_clash.py::test_x[[]a_1] would share the baselines*"]
    )
    pytester.runpytest("-p", "no:cacheprovider", "-n", "0", "-k", "test_other").assert_outcomes(passed=1)
    # Under pytest-xdist a usage error in a worker ended it unexplained (an INTERNALERROR); there both
    # tests fail at setup with the reason instead.
    xdist = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2")
    xdist.assert_outcomes(passed=1, errors=2)
    xdist.stdout.fnmatch_lines(["*would share the baselines*"])


AFTER_THE_MERGE = {
    "object.canvas": "amplitude.mean",
    "object.reextracted": "amplitude.l2",
    "physics.illuminated": "amplitude.mean",
    "physics.diffraction": "l2",
    "output.amplitude": "mean",
    "output.intensity": "mean",
}


def test_a_one_percent_change_after_the_merge_fails_a_float32_backends_baseline():
    """A float32 backend's baseline of the taps from the merge on once allowed the mean of its
    predicted amplitude to move by 8 % to 66 % per patch: the merge's coordinate term had put the
    steepest cell around every pixel beside the mask's edge over the denominator's 0.001. Each of
    these statistics moved by 1 % now fails, on both frameworks, and the unmoved ones pass."""
    result = run(RunSpec(config=ModelConfig(), batch_size=2, max_groups=2))
    assert result.passed, result.describe_failure()
    for backend in ("torch", "tensorflow"):
        stats, bounds = result.statistics[backend], result.statistic_tolerances[backend]
        stored = baseline_arrays(stats)
        assert all(c.passed for c in compare_to_baseline(stats, stored, bounds, backend))
        for tap, statistic in AFTER_THE_MERGE.items():
            moved = dict(stored)
            _set_row(moved, tap, statistic, _rows(stored, tap)[statistic] * np.float32(1.01))
            failed = [(c.tap, c.statistic) for c in compare_to_baseline(stats, moved, bounds, backend) if not c.passed]
            assert failed == [(tap, statistic)], (backend, tap, statistic, failed)


def test_a_statistic_on_one_side_only_is_named_with_its_statistic():
    """A tap missing from the stored baseline printed "not in the stored baseline" once per statistic,
    each line the same and none naming its statistic (until 2026-12-05)."""
    values = np.arange(6.0).reshape(2, 3)
    current = {"t": {"mean": values.mean(1), "max": values.max(1)}, "u": {"mean": values.mean(1)}}
    bounds = {t: {s: np.full(2, 1e-3) for s in per} for t, per in current.items()}
    stored = baseline_arrays({"t": {"mean": values.mean(1)}})
    failed = [c.summary() for c in compare_to_baseline(current, stored, bounds, "b") if not c.passed]
    assert failed == [
        "t / max [vs_baseline: b vs baseline]: not in the stored baseline (new tap or statistic); regenerate with "
        "--force-regen",
        "u / mean [vs_baseline: b vs baseline]: not in the stored baseline (new tap or statistic); regenerate with "
        "--force-regen",
    ]


def test_a_float64_statistic_either_side_of_a_float32_rounding_boundary_passes():
    """Both sides are rounded to float32 before they are compared, so two machines' float64 values a
    few ulps apart land a whole float32 step apart when a rounding boundary falls between them. One
    u of the value allowed only half a step: the reference's tolerance is its float64 error alone, and
    its statistics failed by the step (until 2026-12-05)."""
    from parity.tolerances import load_tolerances

    tol = load_tolerances()
    low = np.float32(1.5)
    boundary = (np.float64(low) + np.float64(np.nextafter(low, np.float32(2)))) / 2
    here, there = (np.full((1, 1, 4, 4), boundary * (1 + d)) for d in (-4e-16, 4e-16))
    stats_here, _ = tol.statistics_with_tolerances("encoder.block0.conv0", here, np.abs(here), "float64")
    stats_there, bounds = tol.statistics_with_tolerances("encoder.block0.conv0", there, np.abs(here), "float64")
    stored = baseline_arrays({"encoder.block0.conv0": stats_here})
    assert np.float32(stats_here["max"][0]) != np.float32(stats_there["max"][0])  # a step apart
    compared = compare_to_baseline({"encoder.block0.conv0": stats_there}, stored, {"encoder.block0.conv0": bounds}, "r")
    assert [c.summary() for c in compared if not c.passed] == []

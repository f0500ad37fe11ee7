"""The pytest plugin in inner pytest sessions: marker, options, backend availability, reports.

Inner sessions run in-process (``pytester.runpytest``) on the reference backend alone, so no framework
is imported; :func:`warm` first imports what a run imports lazily, because pytester drops every module
an inner session imported.
"""

import json
import os
import shutil

import pytest

from parity.config import ModelConfig
from parity.report import write_reports
from parity.session import REQUIRE_ENV, RunSpec, run
from parity.tolerances import default_tolerance_file

pytest_plugins = ["pytester"]

SMALL = "ModelConfig(gridsize=1, probe_big=False)"
REPORT_FILES = {"report.json", "report.md", "report.html", "statistics.npz"}


@pytest.fixture(scope="module")
def warm(tmp_path_factory, numba_compiler):
    """One run first, in this process: its compilations are cached, and torch is imported here, not
    inside an in-process inner session, whose end takes its modules out of sys.modules again (a second
    import of torch in one process crashed a worker in the garbage collector)."""
    config = ModelConfig(gridsize=1, probe_big=False)
    result = run(RunSpec(config=config, backends=["reference", "torch"], batch_size=1, max_groups=1))
    write_reports(result, tmp_path_factory.mktemp("warm"))


@pytest.fixture
def inner(warm, pytester, monkeypatch):
    monkeypatch.delenv(REQUIRE_ENV, raising=False)  # CI sets it for the outer run
    return pytester


def _run(pytester, *args):
    return pytester.runpytest("-p", "no:cacheprovider", *args)


def test_marker_selects_parity_tests_and_each_writes_its_report(inner):
    inner.makepyfile(
        test_sel="""
        import pytest

        from parity.config import ModelConfig


        @pytest.mark.parity
        @pytest.mark.parametrize("probe_big", [True, False])
        def test_forward(parity_run, parity_options, probe_big):
            assert parity_options.backends == ("reference", "torch")
            result = parity_run(ModelConfig(gridsize=1, probe_big=probe_big), batch_size=1, max_groups=1)
            assert result.passed


        def test_not_parity():
            raise AssertionError("must be deselected by -m parity")
        """
    )
    tolerances = shutil.copy(default_tolerance_file(), inner.path / "my-tolerances.toml")
    res = _run(
        inner,
        "-m",
        "parity",
        "--strict-markers",
        "--parity-backends",
        "reference,torch",
        "--parity-report-dir",
        "out/reports",
        "--parity-tolerances",
        str(tolerances),
    )
    res.assert_outcomes(passed=2, deselected=1)
    folders = {p.name: p for p in (inner.path / "out" / "reports").iterdir()}
    assert set(folders) == {"test_sel.py_test_forward_True", "test_sel.py_test_forward_False"}
    for name, folder in folders.items():
        assert {p.name for p in folder.iterdir()} == REPORT_FILES
        data = json.loads((folder / "report.json").read_text())
        assert data["verdict"] == "pass"
        assert data["config"] == ModelConfig(gridsize=1, probe_big=name.endswith("True")).to_dict()
        assert list(data["backends"]) == ["reference", "torch"]
        assert data["tolerances"] == {"source": str(tolerances), "profile": "cpu", "blame_ratio": 2.0}
        assert data["groups"] == 1
        assert "# ptycho-parity report: **PASS**" in (folder / "report.md").read_text()


def test_strict_markers_know_parity_only_through_the_plugin(inner):
    inner.makepyfile(
        """
        import pytest


        @pytest.mark.parity
        def test_marked():
            pass
        """
    )
    # In subprocesses: pytest caches known marker names process-wide, so in-process the outer session's
    # registration would leak into an inner session without the plugin.
    inner.runpytest_subprocess("--strict-markers", "-m", "parity").assert_outcomes(passed=1)
    res = inner.runpytest_subprocess("--strict-markers", "-p", "no:parity")
    assert res.ret == pytest.ExitCode.INTERRUPTED
    res.stdout.fnmatch_lines(["*'parity' not found in `markers` configuration option*"])


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("reference,nope", "--parity-backends: 'nope' is not a registered backend; registered: *reference*"),
        (" , ", "--parity-backends: no backend named"),
    ],
    ids=["unknown", "empty"],
)
def test_unknown_backend_is_a_usage_error_naming_it(inner, value, message):
    inner.makepyfile("def test_nothing():\n    pass\n")
    res = _run(inner, "--parity-backends", value)
    assert res.ret == pytest.ExitCode.USAGE_ERROR
    res.stderr.fnmatch_lines([f"ERROR: {message}"])
    res.stdout.no_fnmatch_line("*passed*")


BASE_TOLERANCES = """schema_version = 2
[model]
floor = 4.0
pair_factor = 2.0
baseline_factor = 2.0
blame_ratio = 2.0
"""


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            BASE_TOLERANCES + '[[family]]\npattern = "amp.decodr.*"\nfactor = 2.0\n',
            "*family*#1: pattern 'amp.decodr.*' matches no tap; a typo here would silently disable*",
        ),
        (
            BASE_TOLERANCES + '[[family]]\npattern = "encoder.*"\nfactr = 0\nfactor = 2.0\n',
            "*family*#1: unknown key 'factr'*",
        ),
        (BASE_TOLERANCES + '[[family]]\npattern = "*"\nfactor = -1\n', "*key 'factor' must be*"),
        ("schema_version = 2\n[model\n", "not valid TOML*"),
        (None, "tolerance file does not exist"),
    ],
    ids=["pattern-typo", "unknown-key", "negative-factor", "not-toml", "missing"],
)
def test_bad_tolerance_file_is_a_usage_error_naming_file_and_key(inner, text, message):
    inner.makepyfile(
        """
        import pytest


        @pytest.mark.parity
        def test_one(parity_tolerances):
            pass


        @pytest.mark.parity
        def test_two(parity_tolerances):
            pass
        """
    )
    path = inner.path / "tol.toml"
    if text is not None:
        path.write_text(text)
    res = _run(inner, "--parity-tolerances", str(path))
    assert res.ret == pytest.ExitCode.USAGE_ERROR
    res.stderr.fnmatch_lines([f"ERROR: --parity-tolerances: {path}*{message}"])
    res.stdout.no_fnmatch_line("*ERROR at setup*")  # reported once for the session, not per test
    res.stdout.no_fnmatch_line("*passed*")


@pytest.fixture
def broken_backend(inner, monkeypatch):
    """A third-party backend registered through the entry point group whose import fails."""
    site = inner.mkdir("site")
    (site / "broken_backend.py").write_text('raise ImportError("libbroken.so.1: cannot open shared object file")\n')
    info = site / "broken_backend-0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-backend\nVersion: 0.0\n")
    (info / "entry_points.txt").write_text("[ptycho_parity.backends]\nbroken = broken_backend:BrokenBackend\n")
    monkeypatch.syspath_prepend(site)
    inner.makepyfile(
        test_broken=f"""
        import pytest

        from parity.config import ModelConfig


        @pytest.mark.parity
        def test_with_broken(parity_run):
            parity_run({SMALL}, batch_size=1, max_groups=1)
        """
    )
    return inner


REASON = "ImportError: libbroken.so.1: cannot open shared object file"


def test_unloadable_backend_skips_the_test_with_the_import_error(broken_backend):
    res = _run(broken_backend, "-rs", "--parity-backends", "reference,broken", "--parity-report-dir", "rep")
    res.assert_outcomes(skipped=1)
    res.stdout.fnmatch_lines([f"SKIPPED *backend unavailable: broken: {REASON}"])


@pytest.mark.parametrize("how", ["option", "environment"])
def test_unloadable_backend_fails_the_test_when_backends_are_required(broken_backend, monkeypatch, how):
    args = ["--parity-backends", "reference,broken", "--parity-report-dir", "rep"]
    if how == "option":
        args.append("--parity-require-backends")
    else:
        monkeypatch.setenv(REQUIRE_ENV, "1")
    res = _run(broken_backend, *args)
    res.assert_outcomes(failed=1)
    res.stdout.fnmatch_lines([f"*required backend unavailable: backend 'broken' is unavailable: {REASON}*"])


def test_import_framework_skips_unless_backends_are_required(monkeypatch):
    from parity import plugin

    monkeypatch.setattr(plugin, "_REQUIRE", [])
    monkeypatch.delenv("PTYCHO_PARITY_REQUIRE_BACKENDS", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no_such_framework_xyz cannot be imported"):
        plugin.import_framework("no_such_framework_xyz")
    monkeypatch.setenv("PTYCHO_PARITY_REQUIRE_BACKENDS", "1")
    with pytest.raises(ModuleNotFoundError, match="no_such_framework_xyz"):
        plugin.import_framework("no_such_framework_xyz")
    monkeypatch.delenv("PTYCHO_PARITY_REQUIRE_BACKENDS")
    monkeypatch.setattr(plugin, "_REQUIRE", [False, True])
    with pytest.raises(ModuleNotFoundError):
        plugin.import_framework("no_such_framework_xyz")
    assert plugin.import_framework("json").__name__ == "json"


def test_a_framework_that_is_installed_but_broken_is_skipped_too_unless_required(monkeypatch, tmp_path):
    """A framework whose import fails inside (a missing shared library raises a plain ImportError, not
    ModuleNotFoundError, which is all pytest 9's importorskip skips) skips its tests like a missing one,
    instead of an error at collection that stops the whole session; required, it fails."""
    from parity import plugin

    (tmp_path / "broken_framework_xyz.py").write_text(
        "raise ImportError('libbroken.so: cannot open shared object file')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(plugin, "_REQUIRE", [])
    monkeypatch.delenv("PTYCHO_PARITY_REQUIRE_BACKENDS", raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"broken_framework_xyz cannot be imported .*libbroken\.so"):
        plugin.import_framework("broken_framework_xyz")
    monkeypatch.setenv("PTYCHO_PARITY_REQUIRE_BACKENDS", "1")
    with pytest.raises(ImportError, match=r"libbroken\.so"):
        plugin.import_framework("broken_framework_xyz")


XDIST_TESTS = """
import os

import pytest

from parity.config import ModelConfig


@pytest.mark.parity
def test_threads_are_this_process_share():
    # What each library really runs, not what the environment asks for: BLAS reads its variable
    # when NumPy is loaded, before any plugin hook of the worker.
    import threadpoolctl
    import torch

    from parity.emulation import thread_count

    share = max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    blas = {lib["num_threads"] for lib in threadpoolctl.threadpool_info() if lib["user_api"] == "blas"}
    assert blas == {share}
    assert torch.get_num_threads() == share
    assert thread_count() == share  # parity.kernels' pool


@pytest.mark.parity
@pytest.mark.parametrize("changes", [{}, {"probe_big": False}, {"amp_activation": "relu"}, {"object_big": False}])
def test_small(parity_run, parity_baseline, changes):
    result = parity_run(ModelConfig(gridsize=1, **changes), batch_size=2, max_groups=2)
    parity_baseline.check(result)
"""


def _reports(folder):
    """{test folder: (report without what differs between sessions, statistics arrays)}."""
    import numpy as np

    out = {}
    for path in sorted(folder.glob("*/report.json")):
        data = json.loads(path.read_text())
        for backend in data["backends"].values():
            backend["environment"] = None  # thread counts and the like differ between workers
        # The serial run wrote the baselines (--regen-all) that the parallel one is compared against.
        data["baseline_notes"] = data["baseline_problems"] = None
        for tap in data["taps"]:
            tap["baseline"] = None
        with np.load(path.parent / "statistics.npz") as stats:
            arrays = {k: stats[k] for k in stats.files}
        out[path.parent.name] = (data, arrays)
    return out


def test_two_workers_give_the_same_reports_and_baselines_as_one(pytester, monkeypatch):
    """`pytest -n 2 -m parity` (pytest-xdist) is the same run as a serial one: same verdicts, same
    comparisons, bitwise the same statistics, and the serial run's baselines pass; each worker runs
    on its share of the cores (BLAS's threads too, which a worker cannot set for itself). (TensorFlow
    is left out only to keep three child sessions quick; it runs in the workers like any backend.)"""
    import numpy as np

    from parity.emulation import SETTINGS

    monkeypatch.delenv(REQUIRE_ENV, raising=False)
    # This session may itself be a pytest-xdist worker, whose share and identity the children inherit.
    for key in (*SETTINGS["threads=1"], "PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT"):
        monkeypatch.delenv(key, raising=False)
    pytester.makepyfile(test_xdist=XDIST_TESTS)
    common = ["-p", "no:cacheprovider", "-m", "parity", "--parity-backends", "reference,torch"]
    serial = pytester.runpytest_subprocess(*common, "--regen-all", "--parity-report-dir", "serial")
    serial.assert_outcomes(passed=5)  # creates the baselines the parallel run is checked against
    parallel = pytester.runpytest_subprocess(*common, "-n", "2", "--parity-report-dir", "parallel")
    parallel.assert_outcomes(passed=5)
    parallel.stdout.fnmatch_lines(["*2 workers*"])
    # Each worker had its share of the cores, not all of them (parity.emulation.share_cores).
    cores = len(os.sched_getaffinity(0))
    for path in (pytester.path / "parallel").glob("*/report.json"):
        assert json.loads(path.read_text())["backends"]["torch"]["environment"]["threads"] == max(1, cores // 2)
    one, two = _reports(pytester.path / "serial"), _reports(pytester.path / "parallel")
    assert len(one) == 4 and one.keys() == two.keys()
    for name in one:
        assert one[name][0] == two[name][0], name
        assert one[name][1].keys() == two[name][1].keys()
        for key, values in one[name][1].items():
            np.testing.assert_array_equal(values, two[name][1][key], err_msg=f"{name} {key}")


def test_parity_run_fails_the_test_on_a_divergence_unless_told_not_to(inner):
    inner.makepyfile(
        test_fail=f"""
        import pytest

        from backends.reference import ReferenceBackend
        from parity.config import ModelConfig
        from parity.weights import generate_weights


        class Off(ReferenceBackend):
            name = "off"
            precision = "float32"

            def forward(self, batch):
                taps = super().forward(batch)
                taps["output.amplitude"] = taps["output.amplitude"] * 1.01
                return taps


        @pytest.mark.parity
        @pytest.mark.parametrize("check", [True, False])
        def test_diverging(parity_run, check):
            config = {SMALL}
            off = Off(config, generate_weights(config))
            result = parity_run(
                config, batch_size=1, max_groups=1, check=check, backends=("reference", "off"),
                backend_overrides={{"off": off}},
            )
            assert not check and result.verdict == "fail"
        """
    )
    res = _run(inner, "--parity-backends", "reference", "--parity-report-dir", "rep")
    res.assert_outcomes(passed=1, failed=1)
    res.stdout.fnmatch_lines(["*parity fail*", "*first diverging tap: output.amplitude (backends: off, reference*"])


@pytest.fixture(scope="module")
def torch_module():
    """torch, imported before pytester's snapshot of the loaded modules: imported inside a test, it
    would be dropped at the test's end, and importing it again fails (torch cannot be re-imported in
    one process; a later test's ``import torch`` raised SystemError)."""
    from parity.plugin import import_framework

    return import_framework("torch")


def test_report_folder_as_a_file_and_a_missing_gpu_are_usage_errors_before_any_test(torch_module, inner, tmp_path):
    inner.makepyfile("import pytest\n\n@pytest.mark.parity\ndef test_x():\n    raise AssertionError('ran')\n")
    (inner.path / "afile").write_text("x")
    res = _run(inner, "--parity-report-dir", "afile")
    assert res.ret == pytest.ExitCode.USAGE_ERROR
    res.stderr.fnmatch_lines(["ERROR: --parity-report-dir: afile exists and is not a folder"])
    res.stdout.no_fnmatch_line("*ran*")
    if not torch_module.cuda.is_available():
        res = _run(inner, "--parity-backends", "reference,torch", "--parity-device", "cuda")
        assert res.ret == pytest.ExitCode.USAGE_ERROR
        res.stderr.fnmatch_lines(["ERROR: --parity-device: device 'cuda' is not usable: torch backend: *"])
        res.stdout.no_fnmatch_line("*ran*")


def test_report_is_written_once_per_test_and_folder_is_locked_while_it_runs(inner, monkeypatch):
    """Two runs into one report folder never silently replace each other's report: the folder is
    claimed for the test's whole duration, and the report is written once, at teardown."""
    import parity.report

    writes = []
    real = parity.report.write_reports
    monkeypatch.setattr(parity.report, "write_reports", lambda *a, **k: writes.append(a[1]) or real(*a, **k))
    inner.makepyfile(
        test_once=f"""
        import pytest

        from parity.config import ModelConfig
        from parity.report import LOCK_NAME

        @pytest.mark.parity
        def test_twice(parity_run, request):
            parity_run({SMALL}, batch_size=1, max_groups=1)
            folder = request.config.getoption("parity_report_dir")
            locks = list(__import__("pathlib").Path(folder).glob("*/" + LOCK_NAME))
            assert len(locks) == 1  # claimed while the test runs
            parity_run({SMALL}, batch_size=1, max_groups=1)
        """
    )
    _run(inner, "--parity-backends", "reference,torch", "--parity-report-dir", "rep").assert_outcomes(passed=1)
    assert len(writes) == 1
    assert not list((inner.path / "rep").glob("*/.ptycho-parity.lock"))  # released at teardown


def test_one_backend_passes_on_its_baselines_and_fails_having_compared_nothing(inner):
    """One backend compares nothing with another side: with its baselines checked, the statistics are
    the check; without, the run compared nothing, which is no pass."""
    inner.makepyfile(
        test_one=f"""
        import pytest

        from parity.config import ModelConfig
        from parity.registry import load_backend
        from parity.weights import generate_weights


        @pytest.mark.parity
        def test_checked(parity_run, parity_baseline):
            parity_baseline.check(parity_run({SMALL}, batch_size=1, max_groups=1))


        @pytest.mark.parity
        def test_unchecked(parity_run):
            parity_run({SMALL}, batch_size=1, max_groups=1)


        @pytest.mark.parity
        def test_forgot_the_check(parity_run, parity_baseline):
            parity_run({SMALL}, batch_size=1, max_groups=1)


        class Crashing(load_backend("reference")):
            def forward(self, batch):
                raise RuntimeError("planted crash")


        @pytest.mark.parity
        def test_broken_crash(parity_run, parity_baseline):
            crashing = Crashing({SMALL}, generate_weights({SMALL}), "cpu")
            result = parity_run({SMALL}, batch_size=1, max_groups=1, backend_overrides={{"reference": crashing}})
            parity_baseline.check(result)


        @pytest.mark.parity
        def test_broken_deviation(parity_run, parity_baseline):
            result = parity_run({SMALL}, batch_size=1, max_groups=1, deviations=("dev.toml",))
            parity_baseline.check(result)
        """
    )
    (inner.path / "dev.toml").write_text(
        'schema_version = 1\n[[deviation]]\ntap = "object.canvas"\nbackend = "reference"\n'
        'reason = "none"\nreference = "none"\n'
    )
    _run(inner, "-m", "parity", "--parity-backends", "reference", "--force-regen")  # writes the baseline
    res = _run(inner, "-m", "parity", "--parity-backends", "reference", "-rA", "-k", "not broken")
    res.assert_outcomes(passed=2, failed=1, errors=1)  # test_forgot_the_check: its call passes, its teardown errs
    res.stdout.fnmatch_lines(["*test_unchecked*", "*nothing was compared: reference ran*"])
    res.stdout.fnmatch_lines(["*ERROR at teardown of test_forgot_the_check*", "*check() was never called*"])
    # A crash of the one backend, or a declaration that did not reproduce, fails at once: waiting for
    # the baselines is only for a run whose one shortcoming is that it compared nothing.
    broken = _run(inner, "-m", "parity", "--parity-backends", "reference", "-k", "broken")
    broken.assert_outcomes(failed=2)
    broken.stdout.fnmatch_lines(["*backend reference crashed: RuntimeError: planted crash*"])
    broken.stdout.fnmatch_lines(["*declared deviation not reproduced*tap 'object.canvas' of reference*"])


def test_deviation_options_apply_to_every_run_and_are_held_strictly(inner, tmp_path):
    inner.makepyfile(
        test_dev=f"""
        import pytest

        from parity.config import ModelConfig


        @pytest.mark.parity
        def test_small(parity_run):
            parity_run({SMALL}, batch_size=1, max_groups=1)
        """
    )
    clean = _run(inner, "-m", "parity", "--parity-backends", "reference,torch")
    clean.assert_outcomes(passed=1)
    # Nothing differs, so the one-off declaration does not reproduce: the test fails and says why.
    stale = _run(inner, "-m", "parity", "--parity-backends", "reference,torch", "--parity-allow-config-diff", "N")
    stale.assert_outcomes(failed=1)
    stale.stdout.fnmatch_lines(["*declared deviation not reproduced*config key 'N'*"])
    bad = _run(inner, "-m", "parity", "--parity-backends", "reference", "--parity-deviations", str(tmp_path / "no"))
    assert bad.ret == pytest.ExitCode.USAGE_ERROR  # once, before any test: not a failure per test
    bad.stderr.fnmatch_lines(["ERROR: --parity-deviations: deviation file*no: no such file*"])
    typo = _run(inner, "-m", "parity", "--parity-backends", "reference,torch", "--parity-allow-config-diff", "NN")
    assert typo.ret == pytest.ExitCode.USAGE_ERROR
    typo.stderr.fnmatch_lines(["ERROR: --parity-allow-config-diff: *'NN' is not a config key*"])


ORPHAN_SUITE = """
import pytest


def test_kept():
    pass


@pytest.mark.parametrize("n", [1, 2])
def test_param(n):
    pass
"""


def _plant(folder, stem, test):
    """A parity baseline's two files (the arrays are never read: only names and metadata are judged)."""
    folder.mkdir(exist_ok=True)
    (folder / f"{stem}-torch.npz").write_bytes(b"")
    (folder / f"{stem}-torch.meta.json").write_text(json.dumps({"backend": "torch", "test": test}))


def test_a_run_of_whole_modules_names_the_baselines_no_collected_test_writes(pytester, monkeypatch):
    """A renamed test, a dropped parametrization or a removed module leaves baselines behind that no
    run would otherwise mention: the summary names them (once, under pytest-xdist too), leaves them
    be, and says nothing when only part of a module was collected."""
    monkeypatch.delenv(REQUIRE_ENV, raising=False)
    for key in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT"):
        monkeypatch.delenv(key, raising=False)
    pytester.makepyfile(test_mod=ORPHAN_SUITE)
    folder = pytester.path / "test_mod"
    _plant(folder, "test_kept", "test_kept")
    _plant(folder, "test_param_1", "test_param[1]")
    _plant(folder, "test_param_3", "test_param[3]")  # a parametrization dropped
    _plant(folder, "test_renamed", "test_renamed")
    _plant(folder, "test_param_2", None)  # written before baselines named their test: judged by name
    _plant(folder, "test_older", None)
    (folder / "test_kept.npz").write_bytes(b"")  # pytest-regressions' own file: no metadata, not judged
    _plant(pytester.path / "test_removed", "test_x", "test_x")  # its module is gone
    _plant(pytester.path / "test_other", "test_y", "test_y")  # its module is there, not collected
    (pytester.path / "test_other.py").write_text("def test_y():\n    pass\n")
    orphans = ["test_mod/test_older-torch.npz", "test_mod/test_param_3-torch.npz"]
    orphans += ["test_mod/test_renamed-torch.npz", "test_removed/test_x-torch.npz"]
    lines = ["*= ptycho-parity: orphaned baselines =*", "4 baseline(s) that no collected test writes*"]
    lines += [f"  {path}" for path in orphans]

    for args in ([], ["-k", "kept"], ["-m", "parity"]):  # -k and -m leave tests out after collecting them
        result = pytester.runpytest("-p", "no:cacheprovider", "test_mod.py", *args)
        result.stdout.fnmatch_lines(lines, consecutive=True)
        assert "test_kept-torch" not in result.stdout.str() and "test_y" not in result.stdout.str()
    parallel = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2", "test_mod.py")
    parallel.assert_outcomes(passed=3)
    parallel.stdout.fnmatch_lines(lines, consecutive=True)
    assert parallel.stdout.str().count("orphaned baselines") == 1
    for path in orphans:
        assert (pytester.path / path).is_file()

    partial = pytester.runpytest("-p", "no:cacheprovider", "test_mod.py::test_kept")
    partial.assert_outcomes(passed=1)
    assert "orphaned baselines" not in partial.stdout.str()
    last_failed = pytester.runpytest("--lf", "test_mod.py")  # --lf may collect part of a module
    last_failed.assert_outcomes(passed=3)
    assert "orphaned baselines" not in last_failed.stdout.str()
    other = pytester.runpytest("-p", "no:cacheprovider", "test_other.py")  # a removed module's, still
    other.stdout.fnmatch_lines(["1 baseline(s) that no collected test writes*", "  test_removed/test_x-torch.npz"])
    shutil.rmtree(pytester.path / "test_removed")
    clean = pytester.runpytest("-p", "no:cacheprovider", "test_other.py")
    assert "orphaned baselines" not in clean.stdout.str()

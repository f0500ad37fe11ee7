"""pytest plugin (entry point ``pytest11``): the ``parity`` marker, options and fixtures.

Any project that installs ptycho-parity gets these, in the manner of pytest-regressions:

- ``parity_run(config=None, *, check=True, **options)`` runs the harness, fails the test unless the
  verdict is pass, and writes the test's report once, at teardown;
- ``parity_baseline.check(result)`` compares statistics with the stored baselines (``--force-regen``,
  ``--regen-all``, the options of pytest-regressions) and records the outcome in the report;
- ``parity_options`` and ``parity_tolerances`` expose what the command line selected.

A run that collected whole modules ends by naming the baselines none of their tests writes any more
(a test renamed or removed), in a section of the terminal summary.

A requested backend that cannot be loaded skips the test with the import error as the reason, unless
``--parity-require-backends`` (or PTYCHO_PARITY_REQUIRE_BACKENDS=1, which CI sets) makes it a failure.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from parity.config import ModelConfig
from parity.errors import BackendUnavailableError, ParityInputError
from parity.runner import ParityResult
from parity.session import DEFAULT_BACKENDS, RunSpec, require_from_env
from parity.tolerances import Tolerances, load_tolerances
from parity.verdict import PASS, decide


@dataclass(frozen=True)
class ParityOptions:
    backends: tuple[str, ...]
    device: str
    report_dir: Path
    tolerances: Path | None
    require: bool
    all_taps: bool
    deviations: tuple[str, ...] = ()
    allow_config_diff: tuple[str, ...] = ()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("parity", "ptycho-parity forward-parity harness")
    group.addoption(
        "--parity-backends",
        default=",".join(DEFAULT_BACKENDS),
        help="comma-separated backends to compare, registered names (default: %(default)s)",
    )
    group.addoption(
        "--parity-device",
        default="cpu",
        choices=("cpu", "cuda"),
        help="device the framework backends run on; also selects the tolerance profile (default: cpu)",
    )
    group.addoption(
        "--parity-report-dir",
        default="parity-report",
        help="folder for the JSON/Markdown/HTML reports, one sub-folder per test (default: %(default)s)",
    )
    group.addoption("--parity-tolerances", default=None, help="tolerance TOML file (default: the bundled one)")
    group.addoption(
        "--parity-require-backends",
        action="store_true",
        default=False,
        help="fail, instead of skipping, when a requested backend cannot be loaded "
        "(also set by PTYCHO_PARITY_REQUIRE_BACKENDS=1)",
    )
    group.addoption(
        "--parity-all-taps", action="store_true", default=False, help="pictures for every tap in the HTML report"
    )
    group.addoption(
        "--parity-deviations",
        action="append",
        default=[],
        metavar="FILE",
        help="declared-deviation file applied to every parity run (repeatable; see docs/deviations.md)",
    )
    group.addoption(
        "--parity-allow-config-diff",
        action="append",
        default=[],
        metavar="KEY",
        help="go on past a difference of this effective-config key in every parity run (repeatable)",
    )


def _options(config: pytest.Config) -> ParityOptions:
    from parity.registry import registered_names

    names = tuple(n.strip() for n in str(config.getoption("parity_backends")).split(",") if n.strip())
    known = registered_names()
    for n in names:
        if n not in known:
            raise pytest.UsageError(
                f"--parity-backends: {n!r} is not a registered backend; registered: {', '.join(known) or 'none'}"
            )
    if not names:
        raise pytest.UsageError("--parity-backends: no backend named")
    report_dir = Path(str(config.getoption("parity_report_dir")))
    if report_dir.exists() and not report_dir.is_dir():
        raise pytest.UsageError(f"--parity-report-dir: {report_dir} exists and is not a folder")
    device = str(config.getoption("parity_device"))
    if device != "cpu":
        from parity.session import check_devices

        try:
            check_devices(names, device)  # before any test: a missing GPU is one usage error, not N failures
        except ParityInputError as exc:
            raise pytest.UsageError(f"--parity-device: {exc}") from None
    tol = config.getoption("parity_tolerances")
    deviations = tuple(str(p) for p in config.getoption("parity_deviations") or ())
    allowed = tuple(str(k) for k in config.getoption("parity_allow_config_diff") or ())
    _check_deviations(deviations, allowed, (*known, *names))
    return ParityOptions(
        backends=names,
        device=device,
        report_dir=report_dir,
        tolerances=Path(tol) if tol else None,
        require=bool(config.getoption("parity_require_backends")) or require_from_env(),
        all_taps=bool(config.getoption("parity_all_taps")),
        deviations=deviations,
        allow_config_diff=allowed,
    )


def _check_deviations(paths: Sequence[str], allowed: Sequence[str], backends: Sequence[str]) -> None:
    """Read every declared-deviation file once, before any test, as the tolerance file is: a bad one
    is one usage error, not the same failure in every parity test."""
    from parity.session import user_deviations

    for option, (files, keys) in (("--parity-deviations", (paths, ())), ("--parity-allow-config-diff", ((), allowed))):
        try:
            user_deviations(files, keys, backends)
        except ParityInputError as exc:
            raise pytest.UsageError(f"{option}: {exc}") from None


def _load_tolerances(options: ParityOptions) -> Tolerances:
    try:
        return load_tolerances(options.tolerances, profile=options.device)
    except ParityInputError as exc:
        raise pytest.UsageError(f"--parity-tolerances: {exc}") from exc


# Whether backends are required, per pytest session (a stack: pytester runs sessions inside sessions);
# pushed at configure, popped at unconfigure, read when test modules are imported.
_REQUIRE: list[bool] = []


def import_framework(module: str) -> Any:
    """Import a framework for a test module: skip the module with the import error as the reason,
    unless backends are required (--parity-require-backends, PTYCHO_PARITY_REQUIRE_BACKENDS=1), in
    which case the ImportError propagates and the run fails. Use instead of pytest.importorskip."""
    import importlib

    if (_REQUIRE and _REQUIRE[-1]) or require_from_env():
        return importlib.import_module(module)
    try:
        return importlib.import_module(module)
    except ImportError as exc:  # any ImportError: importorskip skips only ModuleNotFoundError since pytest 9
        pytest.skip(f"{module} cannot be imported (backend unavailable): {exc}", allow_module_level=True)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "parity: forward-parity tests comparing backends (select with -m parity)")
    _share_cores_with_workers(config)
    options = _options(config)
    config.stash[_OPTIONS] = options
    _REQUIRE.append(options.require)
    if options.tolerances is not None:
        # Read now, not when the first test asks for it: a bad file is a usage error of the session
        # (exit code 4, one message) rather than a setup error repeated for every parity test.
        config.stash[_TOLERANCES] = _load_tolerances(options)


def _share_cores_with_workers(config: pytest.Config) -> None:
    """In a pytest-xdist controller, give each worker its share of the cores (unless the user chose).

    Set here, in the controller's environment, which the workers inherit when they start: a worker's
    own configure hook comes too late for BLAS, which reads its thread count when NumPy is loaded,
    before any plugin runs. Two workers that each start a thread per core fight over them; on two
    cores the parity suite took 89 s with two threads a worker and 56 s with one.
    """
    if hasattr(config, "workerinput") or config.getoption("dist", "no") == "no":  # a worker, or no xdist
        return
    workers = len(config.getoption("tx", None) or [])
    if workers > 1:
        from parity.emulation import share_cores

        for key, value in share_cores(workers).items():
            os.environ.setdefault(key, value)


def pytest_unconfigure(config: pytest.Config) -> None:
    if _OPTIONS in config.stash and _REQUIRE:
        _REQUIRE.pop()


_OPTIONS = pytest.StashKey[ParityOptions]()
_TOLERANCES = pytest.StashKey[Tolerances]()


@pytest.fixture(scope="session")
def parity_options(pytestconfig: pytest.Config) -> ParityOptions:
    return pytestconfig.stash[_OPTIONS]


@pytest.fixture(scope="session")
def parity_tolerances(pytestconfig: pytest.Config, parity_options: ParityOptions) -> Tolerances:
    if _TOLERANCES in pytestconfig.stash:
        return pytestconfig.stash[_TOLERANCES]
    return _load_tolerances(parity_options)


_MAX_NAME = 100  # characters of a name before it is cut and hashed (file names stop at 255 bytes)


def _plain_id(text: str) -> bool:
    """Whether a baseline name made of ``text`` by turning non-word runs into "_" keeps pytest's
    usual ids apart: "=", "," and "[]" only, and "-" only between two word characters
    (``[gridsize=1,object_big=0]``, ``[N=128-gridsize=1]``). A sign (``[1]`` and ``[-1]``), a "."
    (``[0.5]``), a space or anything else would make two ids one name."""
    return re.fullmatch(r"[\w=,\-\[\]]*", text) is not None and re.search(r"(?<!\w)-|-(?!\w)", text) is None


def _file_name(text: str, plain: Callable[[str], bool], sanitise: str) -> str:
    """A file name for ``text``: its characters matching ``sanitise`` made "_", plus a short hash of
    ``text`` wherever that could make two texts one name (``plain`` false, or a name cut to length).
    Names of usual ids stay as they always were, so stored baselines keep theirs."""
    name = re.sub(sanitise, "_", text).strip("_")
    if plain(text) and len(name) <= _MAX_NAME:
        return name
    return f"{name[:_MAX_NAME]}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def qualified_test_name(node: pytest.Item) -> str:
    """The test's name within its module (``Class::test[id]``): what a baseline records as its owner."""
    return "::".join(node.nodeid.split("::")[1:]) or node.name


def baseline_basename(node: pytest.Item) -> str:
    """The baselines' file name stem of a test: its class (if any) and name, one per test in its module."""
    return baseline_name_of(qualified_test_name(node))


def baseline_name_of(qualified: str) -> str:
    """``baseline_basename`` of the test named ``Class::test[id]`` within its module."""
    return _file_name("_".join(qualified.split("::")), _plain_id, r"\W+")


def _report_folder(options: ParityOptions, nodeid: str) -> Path:
    # "-", "." and "=" stay as they are here; "," "/" ":" "[]" become "_", which runs of them never
    # make ambiguous in pytest's node ids; anything else (a space) gets the hash.
    plain = re.compile(r"[\w.=,\-\[\]/:]*").fullmatch
    return options.report_dir / _file_name(nodeid, lambda text: plain(text) is not None, r"[^\w.=-]+")


@pytest.hookimpl(trylast=True)  # after -k and -m have deselected: only the tests that will run
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """Two selected tests whose baselines would share a file are a usage error, before anything runs:
    one would overwrite the other's baselines, and neither would ever pass. (A test not selected that
    shares the name is caught by the baseline's recorded owner when one of them writes it.)"""
    from parity.baseline import baseline_folder

    seen: dict[tuple[Path, str], pytest.Item] = {}
    for item in items:
        if "parity_baseline" not in getattr(item, "fixturenames", ()):
            continue
        key = (baseline_folder(item.path), baseline_basename(item))
        other = seen.setdefault(key, item)
        if other is not item:
            message = (
                f"tests {other.nodeid} and {item.nodeid} would share the baselines {key[0] / key[1]}-*.npz: "
                "give one of them another name or id"
            )
            if not hasattr(config, "workerinput"):
                raise pytest.UsageError(message)
            # A pytest-xdist worker: a usage error there ends it, and the controller reports only an
            # internal error without the reason. Both tests fail at setup with it instead.
            other.stash[_SHARED_BASELINES] = item.stash[_SHARED_BASELINES] = message


_SHARED_BASELINES = pytest.StashKey[str]()


def pytest_runtest_setup(item: pytest.Item) -> None:
    message = item.stash.get(_SHARED_BASELINES, None)
    if message is not None:
        pytest.fail(message, pytrace=False)


_COLLECTED = pytest.StashKey[dict[Path, set[str]]]()  # test module -> its collected tests' names
_ORPHANS = pytest.StashKey[set[str]]()
_ORPHANS_KEY = "ptycho_parity_orphaned_baselines"  # in a pytest-xdist worker's output to its controller


def pytest_itemcollected(item: pytest.Item) -> None:
    # Every collected test, before -k, -m or --deselect leave some out: a baseline's test is only
    # "gone" if it is not even collected.
    item.config.stash.setdefault(_COLLECTED, {}).setdefault(item.path, set()).add(qualified_test_name(item))


def pytest_collection_finish(session: pytest.Session) -> None:
    config = session.config
    # Node ids or --lf collect only part of a module; its other tests' baselines are not orphans.
    if any("::" in str(arg) for arg in config.args) or config.getoption("lf", False):
        return
    collected = config.stash[_COLLECTED] if _COLLECTED in config.stash else {}
    orphans = {str(path) for path in orphaned_baselines(collected)}
    if hasattr(config, "workeroutput"):  # a pytest-xdist worker: its controller prints the summary
        config.workeroutput[_ORPHANS_KEY] = sorted(orphans)
    else:
        config.stash[_ORPHANS] = orphans


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook, in its controller
def pytest_testnodedown(node: Any, error: object) -> None:
    found = getattr(node, "workeroutput", {}).get(_ORPHANS_KEY)
    if found is not None:
        node.config.stash.setdefault(_ORPHANS, set()).update(found)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    orphans = config.stash.get(_ORPHANS, set())
    if orphans:
        terminalreporter.write_sep("=", "ptycho-parity: orphaned baselines", yellow=True)
        terminalreporter.write_line(
            f"{len(orphans)} baseline(s) that no collected test writes (a test renamed or removed?): "
            "delete them, or rename them with their test"
        )
        here = config.invocation_params.dir
        for path in sorted(orphans):
            shown = Path(path).relative_to(here) if Path(path).is_relative_to(here) else path
            terminalreporter.write_line(f"  {shown}")


def orphaned_baselines(tests: Mapping[Path, Collection[str]]) -> list[Path]:
    """The parity baselines that none of the collected tests writes, given each collected test module
    and its tests' qualified names: in the modules' baseline folders, and in the folders of modules
    that are gone (a folder beside the collected modules, named like a module that is not there).

    A baseline that records its test is an orphan when that test is not collected; one that does not
    (written before baselines named their test) when no collected test has its name. Only parity
    baselines are judged (an ``.npz`` beside a ``.meta.json`` naming its backend): pytest-regressions
    keeps its own ``.npz`` files in the same folders.
    """
    import json

    from parity.baseline import baseline_folder, meta_path

    folders: dict[Path, set[str]] = {}
    for module, names in tests.items():
        folders.setdefault(baseline_folder(module), set()).update(names)
    for parent in sorted({module.parent for module in tests}):
        with contextlib.suppress(OSError):
            for sub in parent.iterdir():
                if sub.is_dir() and sub not in folders and not sub.with_name(sub.name + ".py").exists():
                    folders[sub] = set()
    orphans = []
    for folder, names in sorted(folders.items()):
        stems = {baseline_name_of(name) for name in names}
        for npz in sorted(folder.glob("*.npz")):
            try:  # any schema version: an orphan of an older one is still an orphan
                meta = json.loads(meta_path(npz).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue  # not a parity baseline, or a broken one, which its test reports
            if not isinstance(meta, dict) or "backend" not in meta:
                continue
            owner = meta.get("test")
            if (owner not in names) if isinstance(owner, str) else npz.stem.rsplit("-", 1)[0] not in stems:
                orphans.append(npz)
    return orphans


def assert_parity(result: ParityResult) -> None:
    """Fail with a torch.testing.assert_close-style message naming the first diverging tap."""
    __tracebackhide__ = True
    if not result.passed:
        raise AssertionError(f"parity {result.verdict}\n" + result.describe_failure())


class _TestRun:
    """One test's runs: its claimed report folder, and the report written once, at teardown."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.claimed = contextlib.ExitStack()
        self.started = False
        self.results: list[ParityResult] = []
        self.obtained: set[str] = set()  # files of obtained/ this test's baseline checks wrote
        self.awaiting_baselines = False  # a run that compared nothing, until its baselines are checked

    def start(self) -> None:
        from parity.report import claim_folder

        if not self.started:  # the first run of the test claims the folder until teardown
            self.claimed.enter_context(claim_folder(self.folder))
            self.started = True

    def finish(self, all_taps: bool) -> None:
        from parity.report import write_reports

        with self.claimed:
            if self.results:
                write_reports(self.results[-1], self.folder, all_taps=all_taps)
                self._drop_earlier_obtained()

    def _drop_earlier_obtained(self) -> None:
        """Obtained statistics an earlier run of the test left (its baselines changed then, not now):
        beside this run's report they would read as this run's."""
        obtained = self.folder / "obtained"
        if obtained.is_dir():
            for path in obtained.iterdir():
                if path.is_file() and path.name not in self.obtained:
                    path.unlink(missing_ok=True)

    def files_written(self, before: dict[str, tuple[int, int]]) -> None:
        """Record the files of obtained/ that are new or replaced since ``before`` (``_identities``):
        a replaced file is a new inode (every write is a rename), whatever the file system's clock."""
        self.obtained.update(n for n, ident in _identities(self.folder / "obtained").items() if before.get(n) != ident)


def _identities(folder: Path) -> dict[str, tuple[int, int]]:
    """Name -> (inode, mtime) of the files in ``folder`` (empty when it does not exist)."""
    if not folder.is_dir():
        return {}
    stats = {p.name: p.stat() for p in folder.iterdir() if p.is_file()}
    return {name: (st.st_ino, st.st_mtime_ns) for name, st in stats.items()}


@pytest.fixture
def parity_run(
    request: pytest.FixtureRequest, parity_options: ParityOptions, parity_tolerances: Tolerances
) -> Iterator[Callable[..., ParityResult]]:
    """Run the harness; fail the test unless the verdict is pass (``check=False`` to look at a failing
    result yourself). The test's report is written once, at teardown, after any baseline check."""
    from parity import session

    state = _TestRun(_report_folder(parity_options, request.node.nodeid))
    request.node.stash[_STATE] = state

    def _run(config: ModelConfig | None = None, *, check: bool = True, **options: Any) -> ParityResult:
        __tracebackhide__ = True
        spec = RunSpec(
            config=config or ModelConfig(),
            backends=parity_options.backends,
            device=parity_options.device,
            require=parity_options.require,
            deviations=parity_options.deviations,
            allow_config_diff=parity_options.allow_config_diff,
        )
        overrides = options.pop("backend_overrides", None)
        spec = replace(spec, **options)
        try:
            if "parity_baseline" in request.fixturenames:
                from parity.baseline import baseline_folder, check_folder

                check_folder(baseline_folder(request.path))  # where the check will write, before any work
            prepared = session.prepare(spec, tolerances=parity_tolerances, backend_overrides=tuple(overrides or ()))
            state.start()  # before any backend is built: a folder another run is writing is an error now
            result = prepared.run(backend_overrides=overrides)
        except BackendUnavailableError as exc:
            pytest.fail(f"required backend unavailable: {exc}", pytrace=False)
        except ParityInputError as exc:
            pytest.fail(f"bad input: {exc}", pytrace=False)
        unavailable = {n: r.reason for n, r in result.backends.items() if not r.available}
        if unavailable:
            why = "; ".join(f"{n}: {r}" for n, r in unavailable.items())
            if spec.require:
                pytest.fail(f"required backend unavailable: {why}", pytrace=False)
            pytest.skip(f"backend unavailable: {why}")
        state.results.append(result)
        if (
            check
            and result.compared_nothing
            and "parity_baseline" in request.fixturenames
            and decide(result, comparing_nothing_fails=False) == PASS
        ):
            # One backend, nothing else wrong: its statistics against the baselines are the whole
            # check, and the baseline check decides the verdict again; a test that never makes it
            # fails at teardown. A crash or an unreproduced deviation fails here, as always.
            state.awaiting_baselines = True
        elif check:
            assert_parity(result)
        return result

    yield _run
    state.finish(parity_options.all_taps)
    if state.awaiting_baselines:
        pytest.fail(
            "parity fail: nothing was compared (one backend ran) and parity_baseline.check() was never "
            "called on the result, so no statistic was checked either",
            pytrace=False,
        )


_STATE = pytest.StashKey[_TestRun]()


class BaselineChecker:
    """Compares a run's statistics with the stored baselines, one file per test, backend and config."""

    def __init__(self, request: pytest.FixtureRequest) -> None:
        self.request = request

    def check(self, result: ParityResult, basename: str | None = None) -> None:
        """Check (and, with --force-regen or --regen-all, rewrite) the baselines of every backend.

        Fails the test when a baseline is missing, stale, unreadable or changed beyond its tolerance;
        the report written at teardown shows every comparison.
        """
        from parity.baseline import baseline_folder, check_baselines

        __tracebackhide__ = True
        config = self.request.config
        node = self.request.node
        base = basename or baseline_basename(node)
        state = self.request.node.stash.get(_STATE, None)
        obtained = state.folder / "obtained" if state is not None else None
        before = _identities(obtained) if obtained is not None else {}
        try:
            problems = check_baselines(
                result,
                baseline_folder(self.request.path),
                base,
                # pytest-regressions' options; absent when that plugin is off (-p no:regressions)
                force_regen=bool(config.getoption("force_regen", False)),
                regen_all=bool(config.getoption("regen_all", False)),
                obtained=obtained,
                test=qualified_test_name(node),
            )
        except ParityInputError as exc:  # a baseline problem the check could not report as one
            pytest.fail(f"bad input: {exc}", pytrace=False)
        finally:
            if state is not None:
                state.files_written(before)
        awaiting = state is not None and state.awaiting_baselines
        if state is not None:
            state.awaiting_baselines = False
        if problems:
            raise AssertionError("baseline check failed\n" + "\n".join(problems))
        if awaiting:
            assert_parity(result)


@pytest.fixture
def parity_baseline(request: pytest.FixtureRequest) -> BaselineChecker:
    return BaselineChecker(request)

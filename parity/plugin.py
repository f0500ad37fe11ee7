"""pytest plugin (entry point ``pytest11``): the ``parity`` marker, options and fixtures.

Any project that installs ptycho-parity gets these, in the manner of pytest-regressions:

- ``parity_run(config=None, **options)`` runs the harness and writes the report for the test;
- ``parity_baseline.check(result)`` compares statistics with the stored baselines (``--force-regen``,
  ``--regen-all``) and records the outcome in the report;
- ``parity_options`` and ``parity_tolerances`` expose what the command line selected.

A requested backend that cannot be loaded skips the test with the import error as the reason, unless
``--parity-require-backends`` (or PTYCHO_PARITY_REQUIRE_BACKENDS=1, which CI sets) makes it a failure.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from parity.config import ModelConfig
from parity.errors import BackendUnavailableError, ParityInputError
from parity.runner import ParityResult
from parity.session import DEFAULT_BACKENDS, RunSpec, require_from_env
from parity.tolerances import Tolerances, load_tolerances


@dataclass(frozen=True)
class ParityOptions:
    backends: tuple[str, ...]
    device: str
    report_dir: Path
    tolerances: Path | None
    require: bool
    all_taps: bool


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
    tol = config.getoption("parity_tolerances")
    return ParityOptions(
        backends=names,
        device=str(config.getoption("parity_device")),
        report_dir=Path(str(config.getoption("parity_report_dir"))),
        tolerances=Path(tol) if tol else None,
        require=bool(config.getoption("parity_require_backends")) or require_from_env(),
        all_taps=bool(config.getoption("parity_all_taps")),
    )


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
    return pytest.importorskip(module, reason=f"{module} cannot be imported (backend unavailable)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "parity: forward-parity tests comparing backends (select with -m parity)")
    options = _options(config)
    config.stash[_OPTIONS] = options
    _REQUIRE.append(options.require)
    if options.tolerances is not None:
        # Read now, not when the first test asks for it: a bad file is a usage error of the session
        # (exit code 4, one message) rather than a setup error repeated for every parity test.
        config.stash[_TOLERANCES] = _load_tolerances(options)


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


def _report_folder(options: ParityOptions, nodeid: str) -> Path:
    return options.report_dir / re.sub(r"[^\w.=-]+", "_", nodeid).strip("_")


def assert_parity(result: ParityResult) -> None:
    """Fail with a torch.testing.assert_close-style message naming the first diverging tap."""
    __tracebackhide__ = True
    if not result.passed:
        raise AssertionError("parity failed\n" + result.describe_failure())


@pytest.fixture
def parity_run(
    request: pytest.FixtureRequest, parity_options: ParityOptions, parity_tolerances: Tolerances
) -> Iterator[Callable[..., ParityResult]]:
    """Run the harness; the report of the last run is (re)written at teardown, after baseline checks."""
    from parity import session
    from parity.report import write_reports

    results: list[ParityResult] = []

    def _run(config: ModelConfig | None = None, **options: Any) -> ParityResult:
        spec = RunSpec(
            config=config or ModelConfig(),
            backends=parity_options.backends,
            device=parity_options.device,
            require=parity_options.require,
        )
        overrides = options.pop("backend_overrides", None)
        spec = replace(spec, **options)
        try:
            result = session.run(spec, tolerances=parity_tolerances, backend_overrides=overrides)
        except BackendUnavailableError as exc:
            pytest.fail(f"required backend unavailable: {exc}")
        unavailable = {n: r.reason for n, r in result.backends.items() if not r.available}
        if unavailable:
            why = "; ".join(f"{n}: {r}" for n, r in unavailable.items())
            if spec.require:
                pytest.fail(f"required backend unavailable: {why}")
            pytest.skip(f"backend unavailable: {why}")
        results.append(result)
        write_reports(result, _report_folder(parity_options, request.node.nodeid), all_taps=parity_options.all_taps)
        return result

    yield _run
    if results:
        write_reports(
            results[-1], _report_folder(parity_options, request.node.nodeid), all_taps=parity_options.all_taps
        )


class BaselineChecker:
    """Compares a run's statistics with the stored baselines, one file per test, backend and config."""

    def __init__(self, request: pytest.FixtureRequest, tolerances: Tolerances) -> None:
        self.request = request
        self.tolerances = tolerances

    def check(self, result: ParityResult, basename: str | None = None, assert_parity: bool = True) -> None:
        """Check baselines of every backend in ``result``; then, by default, the parity verdict itself.

        Both outcomes go into one failure message, so a run that diverges AND changed its statistics
        says both; baselines are (re)generated under --force-regen/--regen-all either way.
        """
        from parity.baseline import check_with_regressions

        __tracebackhide__ = True
        fixture = self.request.getfixturevalue("ndarrays_regression")
        base = basename or re.sub(r"\W+", "_", self.request.node.name).strip("_")
        problems = []
        try:
            check_with_regressions(fixture, self.request.config, result, base)
        except AssertionError as exc:
            problems.append(str(exc))
        if assert_parity and (result.first_divergence is not None or result.verdict == "config_mismatch"):
            problems.insert(0, "parity failed\n" + result.describe_failure())
        if problems:
            raise AssertionError("\n".join(problems))


@pytest.fixture
def parity_baseline(request: pytest.FixtureRequest, parity_tolerances: Tolerances) -> BaselineChecker:
    return BaselineChecker(request, parity_tolerances)

"""Wiring for one parity run: fixture → canonical batches, weights, backends → :func:`run_parity`.

The pytest plugin and the CLI both go through :func:`run`, so a run outside pytest is the same run.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from parity.backend import Backend
from parity.config import ModelConfig
from parity.deviations import Deviation, allow_config_diff, load_deviations
from parity.errors import BackendUnavailableError, ParityInputError
from parity.interrupt import check as check_interrupt
from parity.interrupt import watching
from parity.registry import load_backend, registered_names
from parity.runner import ArbiterOutOfRangeError, ParityResult, run_parity
from parity.stages import stages
from parity.taps import TapSelection, TapSpec, all_tap_names, gradient_tap_specs, tap_specs
from parity.tolerances import Tolerances, load_tolerances
from parity.weights import DEFAULT_SEED, generate_weights, load_weights, validate_weights, weights_sha256

if TYPE_CHECKING:
    from parity.fixture import FixtureData

DEFAULT_BACKENDS = ("reference", "torch", "tensorflow")
REQUIRE_ENV = "PTYCHO_PARITY_REQUIRE_BACKENDS"


def require_from_env() -> bool:
    """CI sets PTYCHO_PARITY_REQUIRE_BACKENDS=1 so a missing framework fails instead of skipping."""
    return os.environ.get(REQUIRE_ENV, "").strip().lower() in ("1", "true", "yes", "all")


def default_fixture_name(config: ModelConfig) -> str:
    """The first bundled fixture whose N and gridsize match ``config``."""
    from parity.simulate import BUNDLED_FIXTURES

    for name, params in BUNDLED_FIXTURES.items():
        if (params.N, params.gridsize) == (config.N, config.gridsize):
            return name
    bundled = ", ".join(f"{n} (N={p.N}, gridsize={p.gridsize})" for n, p in BUNDLED_FIXTURES.items())
    raise ParityInputError(
        f"no bundled fixture for N={config.N}, gridsize={config.gridsize}; bundled: {bundled}; pass --fixture"
    )


def resolve_fixture(fixture: str | os.PathLike[str] | None, config: ModelConfig) -> Path:
    from parity.fixture import bundled_fixture

    if fixture is None:
        return bundled_fixture(default_fixture_name(config))
    p = Path(fixture)
    if p.suffix == "" and not p.exists():
        return bundled_fixture(str(fixture))  # a bundled fixture's name
    return p


@dataclass
class RunSpec:
    """What to run; every field has the default a user of the bundled fixtures expects."""

    config: ModelConfig = field(default_factory=ModelConfig)
    fixture: str | os.PathLike[str] | FixtureData | None = None  # a file, a bundled name, or data in memory
    backends: Sequence[str] = DEFAULT_BACKENDS
    reference: str | None = "reference"
    device: str = "cpu"
    batch_size: int = 4
    max_groups: int | None = 8
    weights: str | os.PathLike[str] | Mapping[str, np.ndarray] | None = None  # a file, or canonical arrays
    weights_seed: int = DEFAULT_SEED
    tolerances: str | os.PathLike[str] | None = None
    require: bool = False
    taps: Sequence[str] | None = None  # shell-style patterns (``!pattern`` excludes): compare only matching taps
    deviations: Sequence[str | os.PathLike[str]] = ()  # declared-deviation files (parity.deviations)
    allow_config_diff: Sequence[str] = ()  # one-off declared config differences, any backend
    shipped_deviations: bool = True  # apply the deviation files the backends ship
    local: bool = True  # layer-local parity: each stage also fed the reference's inputs to it
    gradients: bool = False  # gradient parity: both losses' gradients w.r.t. every parameter and x

    def expected(self, batch_size: int) -> list[TapSpec]:
        """Every tap this run compares, forward taps first, then gradients in backward order."""
        specs = tap_specs(self.config, batch_size)
        return specs + gradient_tap_specs(self.config, batch_size) if self.gradients else specs


def resolve_weights(spec: RunSpec) -> dict[str, np.ndarray]:
    if isinstance(spec.weights, Mapping):
        validate_weights(spec.weights, spec.config)
        return dict(spec.weights)
    if spec.weights is not None:
        return load_weights(spec.weights, spec.config)
    return generate_weights(spec.config, spec.weights_seed)


def backend_device(cls: type[Backend], device: str) -> str:
    """The float64 reference is the CPU arbiter, whatever device the framework backends use."""
    return "cpu" if cls.precision == "float64" else device


def check_devices(names: Iterable[str], device: str) -> None:
    """Ask every loadable backend whether it can use ``device``, before anything is built or run."""
    problems = []
    for name in names:
        try:
            cls = load_backend(name)
        except BackendUnavailableError:
            continue  # reported (or refused, when required) when the backends are built
        problem = cls.device_problem(backend_device(cls, device))
        if problem:
            problems.append(problem)
    if problems:
        raise ParityInputError(f"device {device!r} is not usable: " + "; ".join(problems))


def instantiate(
    names: Iterable[str],
    config: Any,
    weights: Mapping[str, np.ndarray],
    device: str,
    require: bool,
) -> tuple[dict[str, Backend], dict[str, str], dict[str, str]]:
    """Build each named backend: (built, unavailable {name: reason}, crashed {name: traceback}).

    An unavailable backend raises instead when backends are required; bad input to a backend (its
    config, weights or device) raises ParityInputError; any other exception is a crash of that
    backend, reported as such while the others are still compared.
    """
    built: dict[str, Backend] = {}
    missing: dict[str, str] = {}
    crashed: dict[str, str] = {}
    for name in names:
        try:
            cls = load_backend(name)
        except BackendUnavailableError as exc:
            if require:
                raise
            missing[name] = exc.reason
            continue
        try:
            built[name] = cls(config, weights, backend_device(cls, device))
        except BackendUnavailableError as exc:
            # What a wrapped original needs is found when it is built (its import, its checkout).
            if require:
                raise
            missing[name] = exc.reason
        except ParityInputError:
            raise
        except Exception:
            check_interrupt()
            crashed[name] = f"while building:\n{traceback.format_exc()}"
    return built, missing, crashed


def _scale_source(backends: Mapping[str, Backend], spec: RunSpec, weights: Mapping[str, np.ndarray]) -> Backend | None:
    """The backend whose error scales set the tolerances: the reference when it runs; otherwise the
    PtychoPINN float64 reference is built for its scales alone (the tolerance factors are measured
    against those scales, not against the magnitudes the harness would fall back to)."""
    if spec.reference in backends:
        return None
    try:
        cls = load_backend(DEFAULT_BACKENDS[0])
    except BackendUnavailableError:
        return None
    return cls(spec.config, weights, "cpu")


@dataclass
class PreparedRun:
    """A run whose every input was read and checked (config, tolerances, fixture, weights, devices):
    what can fail on bad input has failed before anything is built, run or written."""

    spec: RunSpec
    tolerances: Tolerances
    fixture: Any  # parity.fixture.FixtureData
    fixture_record: dict[str, str]
    weights: dict[str, np.ndarray]
    deviations: list[Deviation] = field(default_factory=list)

    def run(
        self,
        *,
        progress: Callable[[Iterable[Any]], Iterable[Any]] | None = None,
        backend_overrides: Mapping[str, Backend] | None = None,
    ) -> ParityResult:
        overrides = dict(backend_overrides or {})
        names = [n for n in self.spec.backends if n not in overrides]
        # A Ctrl-C must end the run, even where a framework turns it into another exception.
        with watching():
            return self._run(names, overrides, progress)

    def _run(self, names: list[str], overrides: Mapping[str, Backend], progress: Any) -> ParityResult:
        from parity.fixture import iter_batches

        spec, weights = self.spec, self.weights
        built, missing, crashed = instantiate(names, spec.config, weights, spec.device, spec.require)
        backends = {
            n: overrides[n] if n in overrides else built[n] for n in spec.backends if n in overrides or n in built
        }
        try:
            return run_parity(
                backends,
                iter_batches(self.fixture, spec.config, spec.batch_size, spec.max_groups),
                self.tolerances,
                config=spec.config,
                expected=spec.expected,
                reference=spec.reference,
                scale_source=_scale_source(backends, spec, weights),
                unavailable=missing,
                crashed=crashed,
                fixture=self.fixture_record,
                weights_sha256=weights_sha256(weights),
                progress=progress,
                taps=spec.taps,
                stages=stages(spec.config) if spec.local else (),
                deviations=self.deviations,
                gradients=spec.gradients,
            )
        except ArbiterOutOfRangeError as exc:
            raise ParityInputError(f"{exc}; {_magnitude_hint(exc.tap, spec.config)}") from None


def prepare(
    spec: RunSpec, *, tolerances: Tolerances | None = None, backend_overrides: Collection[str] = ()
) -> PreparedRun:
    """Read and check every input of ``spec``; raises ParityInputError naming what is wrong."""
    from parity.fixture import FixtureData, check_range, fixture_data_sha256, load_fixture

    for key in ("batch_size", "max_groups"):
        value = getattr(spec, key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ParityInputError(f"option {key} must be an integer >= 1, got {value!r}")
    if spec.reference is not None and spec.reference not in spec.backends:
        raise ParityInputError(
            f"reference backend {spec.reference!r} is not among the backends ({', '.join(spec.backends) or 'none'})"
        )
    tol = tolerances or load_tolerances(spec.tolerances, profile=spec.device)
    names = [s.name for s in spec.expected(1)]
    for name in names:
        tol.family(name)  # every tap of this config has a tolerance family
    selection = TapSelection.parse(spec.taps)
    if selection is not None:
        selection.check(names, f"config {spec.config.short_id()}")
    fixture: FixtureData
    if isinstance(spec.fixture, FixtureData):
        fixture = spec.fixture
        record = {"path": f"<in memory: {fixture.source}>", "sha256": fixture_data_sha256(fixture)}
    else:
        fixture_path = resolve_fixture(spec.fixture, spec.config)
        fixture = load_fixture(fixture_path, spec.config)
        record = {"path": str(fixture_path), "sha256": fixture.sha256}
    check_range(fixture, spec.config, spec.max_groups)
    weights = resolve_weights(spec)
    check_devices([n for n in spec.backends if n not in backend_overrides], spec.device)
    return PreparedRun(spec, tol, fixture, record, weights, gather_deviations(spec))


def gather_deviations(spec: RunSpec) -> list[Deviation]:
    """The declarations of a run: those the backends ship (unless turned off), the user's files and
    the one-off --allow-config-diff keys, all read and checked before any work."""
    out: list[Deviation] = []
    if spec.shipped_deviations:
        for name in spec.backends:
            try:
                shipped = load_backend(name).shipped_deviations()
            except BackendUnavailableError:
                continue
            if shipped is not None:
                out += load_deviations(shipped, *_known_names(spec.backends))
    return out + user_deviations(spec.deviations, spec.allow_config_diff, spec.backends)


def user_deviations(
    paths: Sequence[str | os.PathLike[str]], allowed: Sequence[str], backends: Sequence[str]
) -> list[Deviation]:
    """The user's declarations (deviation files, --allow-config-diff keys), read and checked without
    importing a framework: the pytest plugin reads them once before any test, runs read them again."""
    known = _known_names(backends)
    out: list[Deviation] = []
    for path in paths:
        out += load_deviations(path, *known)
    return out + allow_config_diff(allowed, known[0])


def _known_names(backends: Sequence[str]) -> tuple[list[str], frozenset[str], set[str]]:
    """What a declaration may name: config keys, taps, and registered or requested backends."""
    return list(ModelConfig().to_dict()), all_tap_names(), {*registered_names(), *backends}


def run(
    spec: RunSpec,
    *,
    tolerances: Tolerances | None = None,
    progress: Callable[[Iterable[Any]], Iterable[Any]] | None = None,
    backend_overrides: Mapping[str, Backend] | None = None,
) -> ParityResult:
    """Run one fixture and config through the named backends.

    ``backend_overrides`` replaces named backends with ready instances (tests use it to inject bugs).
    """
    prepared = prepare(spec, tolerances=tolerances, backend_overrides=tuple(backend_overrides or ()))
    return prepared.run(progress=progress, backend_overrides=backend_overrides)


# What sets the magnitude of each group of taps, for the message of an out-of-range run.
_MAGNITUDE_KEYS = (
    ("input.x", ("nphotons",)),
    ("input.scaled", ("nphotons",)),
    ("input.probe", ("probe_scale",)),
    ("physics.", ("probe_scale",)),
    ("output.", ("nphotons", "probe_scale")),
    ("loss.", ("nphotons", "probe_scale")),
)


def _magnitude_hint(tap: str, config: ModelConfig) -> str:
    keys = next((keys for prefix, keys in _MAGNITUDE_KEYS if tap.startswith(prefix)), ())
    values = config.to_dict()
    named = [f"config key {k!r} = {values[k]:g}" for k in keys]
    if not tap.startswith("input."):
        named.append("the weights (their scale, or a file made for other data)")
    return "what sets its magnitude: " + ", ".join(named)

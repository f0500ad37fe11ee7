"""Wiring for one parity run: fixture → canonical batches, weights, backends → :func:`run_parity`.

The pytest plugin and the CLI both go through :func:`run`, so a run outside pytest is the same run.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from parity.backend import Backend
from parity.config import ModelConfig
from parity.errors import BackendUnavailableError, ParityInputError
from parity.registry import load_backend
from parity.runner import ParityResult, run_parity
from parity.taps import tap_specs
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
    taps: Sequence[str] | None = None  # shell-style patterns: compare only matching taps


def resolve_weights(spec: RunSpec) -> dict[str, np.ndarray]:
    if isinstance(spec.weights, Mapping):
        validate_weights(spec.weights, spec.config)
        return dict(spec.weights)
    if spec.weights is not None:
        return load_weights(spec.weights, spec.config)
    return generate_weights(spec.config, spec.weights_seed)


def instantiate(
    names: Iterable[str],
    config: Any,
    weights: Mapping[str, np.ndarray],
    device: str,
    require: bool,
) -> tuple[dict[str, Backend], dict[str, str]]:
    """Build each named backend; an unavailable one is returned with its reason, or raises if required."""
    built: dict[str, Backend] = {}
    missing: dict[str, str] = {}
    for name in names:
        try:
            cls = load_backend(name)
        except BackendUnavailableError as exc:
            if require:
                raise
            missing[name] = exc.reason
            continue
        reference_device = "cpu" if cls.precision == "float64" else device
        built[name] = cls(config, weights, reference_device)
    return built, missing


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
    from parity.fixture import FixtureData, fixture_data_sha256, iter_batches, load_fixture

    if spec.batch_size < 1:
        raise ParityInputError(f"option batch_size must be >= 1, got {spec.batch_size}")
    if spec.max_groups is not None and spec.max_groups < 1:
        raise ParityInputError(f"option max_groups must be >= 1, got {spec.max_groups}")
    tol = tolerances or load_tolerances(spec.tolerances, profile=spec.device)
    fixture: FixtureData
    if isinstance(spec.fixture, FixtureData):
        fixture = spec.fixture
        record = {"path": f"<in memory: {fixture.source}>", "sha256": fixture_data_sha256(fixture)}
    else:
        fixture_path = resolve_fixture(spec.fixture, spec.config)
        fixture = load_fixture(fixture_path, spec.config)
        record = {"path": str(fixture_path), "sha256": fixture.sha256}
    weights = resolve_weights(spec)
    overrides = dict(backend_overrides or {})
    names = [n for n in spec.backends if n not in overrides]
    built, missing = instantiate(names, spec.config, weights, spec.device, spec.require)
    backends = {n: overrides[n] if n in overrides else built[n] for n in spec.backends if n in overrides or n in built}
    batches = iter_batches(fixture, spec.config, spec.batch_size, spec.max_groups)
    return run_parity(
        backends,
        batches,
        tol,
        config=spec.config,
        expected=lambda b: tap_specs(spec.config, b),
        reference=spec.reference,
        scale_source=_scale_source(backends, spec, weights),
        unavailable=missing,
        fixture=record,
        weights_sha256=weights_sha256(weights),
        progress=progress,
        taps=spec.taps,
    )

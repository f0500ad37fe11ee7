"""Where a baseline is written: statistics vs the stored regression baseline of the same backend.

Baselines are pytest-regressions ``ndarrays_regression`` files (``.npz``: one array per tap and
statistic) plus a ``.meta.json`` beside each, recording the SHA-256 of the fixture and weights they were
made from and the environment they were made in. A baseline made from other inputs is stale: it is
reported as such and never compared, since a comparison against it would measure the change of inputs,
not of code. ``--force-regen`` / ``--regen-all`` keep pytest-regressions' meaning. Every write is atomic.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from parity.atomic import atomic_path, write_text
from parity.compare import ComparisonResult, ElementwiseComparison
from parity.config import ModelConfig
from parity.errors import BaselineError
from parity.tolerances import Tolerances

SCHEMA_VERSION = 1
_SEP = "|"


def baseline_key(tap: str, statistic: str) -> str:
    return f"{tap}{_SEP}{statistic}"


def baseline_arrays(stats: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Flatten {tap: {statistic: values}} into the npz's {"tap|statistic": values}."""
    return {baseline_key(tap, s): np.asarray(v, dtype=np.float64) for tap, per in stats.items() for s, v in per.items()}


def baseline_tolerances(
    keys: list[str], tolerances: Tolerances, backend: str, config: ModelConfig | None
) -> dict[str, dict[str, float]]:
    out = {}
    for key in keys:
        tap, stat = key.split(_SEP, 1)
        atol, rtol = tolerances.statistic(tap, stat, backend, config)
        out[key] = {"atol": atol, "rtol": rtol}
    return out


def metadata(
    backend: str,
    config: Mapping[str, Any] | None,
    fixture: Mapping[str, Any] | None,
    weights_sha256: str | None,
    environment: Mapping[str, Any],
    groups: int,
) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "backend": backend,
        "config": dict(config) if config else None,
        "fixture_sha256": (fixture or {}).get("sha256"),
        "fixture_name": Path(str((fixture or {}).get("path", ""))).name or None,
        "weights_sha256": weights_sha256,
        "groups": groups,
        "environment": dict(environment),
    }


def stale_reasons(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Why a stored baseline was made from other inputs than the current run (empty: not stale)."""
    reasons = []
    for key, what in (
        ("fixture_sha256", "fixture"),
        ("weights_sha256", "weights"),
        ("config", "config"),
        ("groups", "number of groups"),
        ("backend", "backend"),
    ):
        if stored.get(key) != current.get(key):
            reasons.append(f"{what} differs (baseline: {stored.get(key)!r}, now: {current.get(key)!r})")
    return reasons


def meta_path(npz: Path) -> Path:
    return npz.with_name(npz.stem + ".meta.json")


def read_metadata(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BaselineError(
            f"{path}: baseline metadata is missing, so the baseline's inputs are unknown; regenerate with --force-regen"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BaselineError(
            f"{path}: baseline metadata is not valid JSON ({exc}); regenerate with --force-regen"
        ) from exc
    version = data.get("schema_version") if isinstance(data, dict) else None
    if version != SCHEMA_VERSION:
        raise BaselineError(f"{path}: key 'schema_version' is {version!r}; expected {SCHEMA_VERSION}")
    return data


def write_metadata(path: Path, meta: Mapping[str, Any]) -> None:
    write_text(path, json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")


def read_arrays(path: Path) -> dict[str, np.ndarray]:
    try:
        with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as npz:
            return {k: np.asarray(npz[k]) for k in npz.files}
    except FileNotFoundError:
        raise BaselineError(f"{path}: baseline file does not exist") from None
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise BaselineError(f"{path}: baseline file is corrupt ({exc}); regenerate with --force-regen") from exc


def write_arrays(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """The one writer of baseline arrays (also used by the pytest-regressions fixture, patched in)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **{k: np.asarray(v) for k, v in arrays.items()})


def file_digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def compare_to_baseline(
    current: Mapping[str, np.ndarray],
    stored: Mapping[str, np.ndarray],
    tolerances: Mapping[str, Mapping[str, float]],
    backend: str,
) -> list[ComparisonResult]:
    """One vs_baseline comparison per (tap, statistic); missing or extra keys fail by name."""
    out = []
    for key in list(current) + [k for k in stored if k not in current]:
        tap, stat = key.split(_SEP, 1) if _SEP in key else (key, "")
        tol = tolerances.get(key, {"atol": 0.0, "rtol": 0.0})
        acc = ElementwiseComparison("vs_baseline", tap, backend, "baseline", tol["atol"], tol["rtol"])
        if key not in stored:
            acc.fail("not in the stored baseline (new tap or statistic); regenerate with --force-regen")
        elif key not in current:
            acc.fail("in the stored baseline but not produced now")
        else:
            acc.add(np.asarray(current[key]), np.asarray(stored[key]))
        res = acc.finish()
        res.statistic = stat
        out.append(res)
    return out


def check_with_regressions(
    fixture: Any,
    pytest_config: Any,
    result: Any,
    basename: str,
    tolerances: Tolerances,
) -> None:
    """Check every backend's statistics in ``result`` against its baseline through pytest-regressions.

    Stale or unreadable baselines are reported (and regenerated under --force-regen), never compared.
    Comparison results and notes are added to ``result`` so the report shows them; any failure raises
    one AssertionError listing every backend, after all of them were checked (and, when asked,
    regenerated).
    """
    import pytest

    __tracebackhide__ = True
    force = bool(pytest_config.getoption("force_regen"))
    regen_all = bool(pytest_config.getoption("regen_all"))
    # pytest-regressions writes with np.savez_compressed straight onto the target; route it through the
    # one atomic writer so an interrupted --force-regen never leaves a torn baseline.
    fixture._dump_fn = lambda data, filename: write_arrays(Path(filename), data)
    config = ModelConfig.from_mapping(result.config) if result.config else None
    errors: list[str] = []
    for backend, stats in result.statistics.items():
        name = f"{basename}-{backend}"
        npz = Path(fixture.original_datadir) / f"{name}.npz"
        meta_now = metadata(
            backend,
            result.config,
            result.fixture,
            result.weights_sha256,
            result.backends[backend].environment,
            result.groups,
        )
        arrays = baseline_arrays(stats)
        tols = baseline_tolerances(list(arrays), tolerances, backend, config)
        if npz.exists() and not regen_all:
            problems: list[str] = []
            stored: dict[str, np.ndarray] = {}
            try:
                problems = stale_reasons(read_metadata(meta_path(npz)), meta_now)
                if not problems:
                    stored = read_arrays(npz)
            except BaselineError as exc:
                problems = [str(exc)]
            if problems:
                what = f"{npz}: baseline made from other inputs or unreadable, not compared: " + "; ".join(problems)
                if force:
                    write_arrays(npz, arrays)
                    write_metadata(meta_path(npz), meta_now)
                    what += " (regenerated by --force-regen)"
                else:
                    what += "; regenerate with --force-regen"
                result.baseline_notes.append(what)
                errors.append(what)
                continue
            comps = compare_to_baseline(arrays, stored, tols, backend)
            result.baseline.extend(comps)
            changed = next((c for c in comps if not c.passed), None)
            if changed is not None:
                result.baseline_notes.append(
                    f"{backend}: first tap changed since its baseline: {changed.tap} ({changed.statistic})"
                )
        before = file_digest(npz)
        try:
            fixture.check(dict(arrays), basename=name, tolerances=tols)
        except (AssertionError, pytest.fail.Exception) as exc:  # pytest.fail raises a BaseException
            errors.append(f"{name}: {exc}")
        if file_digest(npz) != before or not meta_path(npz).exists():
            write_metadata(meta_path(npz), meta_now)
    if errors:
        if result.verdict == "pass":
            result.verdict = "fail"
        raise AssertionError("baseline check failed\n" + "\n".join(errors))

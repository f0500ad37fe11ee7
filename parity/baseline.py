"""Where a baseline is written: statistics vs the stored regression baseline of the same backend.

Baselines are ``.npz`` files in the layout of pytest-regressions' ``ndarrays_regression`` (one array
per tap: statistics x patches) plus a ``.meta.json`` beside each, recording the SHA-256 of the fixture
and weights they were made from and the environment they were made in. A baseline made from other
inputs is stale: it is reported as such and never compared, since a comparison against it would
measure the change of inputs, not of code. The harness owns these files (pytest-regressions writes in
place, and an interrupted write would tear a baseline): this module is their only writer, every write
is atomic, and ``--force-regen`` / ``--regen-all`` keep pytest-regressions' meaning.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from parity.atomic import atomic_path, staged, write_text
from parity.compare import ComparisonResult, ElementwiseComparison
from parity.errors import BaselineError
from parity.verdict import decide

SCHEMA_VERSION = 1
STAT_NAMES_KEY = "_statistic_names"


STORED_DTYPE = np.float32


def baseline_arrays(stats: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """One array per tap, (statistics, patches), plus the statistic names of real and complex taps.

    One key per tap rather than per statistic: an npz member costs ~200 bytes of zip headers, which
    for 18 statistics x 60 taps would outweigh the data. Every backend's statistics are stored as
    float32, the reference's too: that rounding (a float32 step, up to 2u = 1.2e-7 of each statistic) is part of every
    statistic's tolerance (``Tolerances.statistics_with_tolerances``), far below what any float32 backend is
    allowed, and it keeps the suite's committed baselines under 10 MB.
    """
    out: dict[str, np.ndarray] = {}
    names: dict[int, list[str]] = {}
    for tap, per in stats.items():
        out[tap] = np.stack([np.asarray(v, dtype=STORED_DTYPE) for v in per.values()])
        names[len(per)] = list(per)
    for rows, labels in sorted(names.items()):
        out[f"{STAT_NAMES_KEY}{rows}"] = np.array(labels)
    return out


def _rows(arrays: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """Invert :func:`baseline_arrays`: {tap: {statistic: values}}."""
    labels = {
        int(k[len(STAT_NAMES_KEY) :]): [str(x) for x in v] for k, v in arrays.items() if k.startswith(STAT_NAMES_KEY)
    }
    out = {}
    for tap, arr in arrays.items():
        if tap.startswith(STAT_NAMES_KEY):
            continue
        names = labels.get(arr.shape[0], [f"row{i}" for i in range(arr.shape[0])])
        out[tap] = {n: arr[i] for i, n in enumerate(names)}
    return out


def metadata(
    backend: str,
    config: Mapping[str, Any] | None,
    fixture: Mapping[str, Any] | None,
    weights_sha256: str | None,
    environment: Mapping[str, Any],
    groups: int,
    test: str | None = None,
) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "test": test,
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
        same = (
            _same_config(stored.get(key), current.get(key)) if key == "config" else stored.get(key) == current.get(key)
        )
        if not same:
            reasons.append(f"{what} differs (baseline: {stored.get(key)!r}, now: {current.get(key)!r})")
    return reasons


def _same_config(stored: Any, current: Any) -> bool:
    """Configs equal key by key, a key missing on one side counting as null: a key added to the
    schema with a null default (derived, as canvas_size) leaves older baselines valid."""
    if not (isinstance(stored, Mapping) and isinstance(current, Mapping)):
        return bool(stored == current)
    return all(stored.get(k) == current.get(k) for k in set(stored) | set(current))


def _stored_metadata(npz: Path) -> dict[str, Any] | BaselineError | None:
    """A stored baseline's metadata, read once for both its owner and its inputs: None when there is
    no baseline, the error when the metadata cannot be read (the baseline is then reported)."""
    if not npz.exists():
        return None
    try:
        return read_metadata(meta_path(npz))
    except BaselineError as exc:
        return exc


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
    except OSError as exc:  # a folder in its place, a loop of links, ...
        raise BaselineError(
            f"{path}: baseline metadata cannot be read ({exc.strerror or exc}); regenerate with --force-regen"
        ) from None
    version = data.get("schema_version") if isinstance(data, dict) else None
    if version != SCHEMA_VERSION:
        raise BaselineError(f"{path}: key 'schema_version' is {version!r}; expected {SCHEMA_VERSION}")
    assert isinstance(data, dict)
    return data


def _metadata_text(meta: Mapping[str, Any]) -> str:
    return json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n"


def write_metadata(path: Path, meta: Mapping[str, Any]) -> None:
    write_text(path, _metadata_text(meta))


def read_arrays(path: Path) -> dict[str, np.ndarray]:
    try:
        with open(path, "rb") as fh:
            loaded = np.load(fh, allow_pickle=False)
            if not isinstance(loaded, np.lib.npyio.NpzFile):
                raise ValueError("a single .npy array, not an .npz archive")
            with loaded as npz:
                arrays = {k: np.asarray(npz[k]) for k in npz.files}
        _check_layout(arrays)
        return arrays
    except FileNotFoundError:
        raise BaselineError(f"{path}: baseline file does not exist") from None
    except Exception as exc:  # zipfile, zlib, .npy header parsing, ...: whatever the damage, it is corrupt
        why = f"{type(exc).__name__}: {exc}"
        raise BaselineError(f"{path}: baseline file is corrupt ({why}); regenerate with --force-regen") from exc


def _check_layout(arrays: Mapping[str, np.ndarray]) -> None:
    """Raise ValueError unless ``arrays`` are in :func:`baseline_arrays`' layout: each tap's a 2-D
    array of real numbers (statistics x patches), each name list 1-D text as long as its key says.

    A well-formed archive can still hold anything (a 0-d array, strings where numbers belong), and
    the comparison would then fail with an IndexError or a ValueError of its own, far from the file;
    checked here, it is reported as the corrupt baseline it is, and --force-regen replaces it."""
    for key, arr in arrays.items():
        if key.startswith(STAT_NAMES_KEY):
            rows = key[len(STAT_NAMES_KEY) :]
            if not rows.isdigit() or arr.ndim != 1 or arr.dtype.kind not in "US" or arr.shape[0] != int(rows):
                raise ValueError(f"member {key!r} is {_describe(arr)}, not the names of {rows} statistics")
        elif arr.ndim != 2 or arr.dtype.kind not in "fiu":
            raise ValueError(f"member {key!r} is {_describe(arr)}, not a tap's statistics x patches of numbers")


def _describe(arr: np.ndarray) -> str:
    return f"a {arr.ndim}-d array of {arr.dtype}" + (f", shape {arr.shape}" if arr.ndim else "")


def _save_arrays(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    with open(path, "wb") as fh:
        members: dict[str, Any] = {k: np.asarray(v) for k, v in arrays.items()}
        np.savez_compressed(fh, **members)


def write_arrays(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """The writer of baseline arrays on their own: the obtained statistics beside a failing check."""
    with atomic_path(path) as tmp:
        _save_arrays(tmp, arrays)


def file_digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def compare_to_baseline(
    current: Mapping[str, Mapping[str, np.ndarray]],
    stored_arrays: Mapping[str, np.ndarray],
    bounds: Mapping[str, Mapping[str, np.ndarray]],
    backend: str,
) -> list[ComparisonResult]:
    """One vs_baseline comparison per (tap, statistic); missing or extra ones fail by name.

    ``bounds`` ({tap: {statistic: per-patch tolerance}}) come from the tolerance model
    (``Tolerances.statistics_with_tolerances``). The current values are rounded to the stored dtype first,
    as they would be stored."""
    stored = _rows(stored_arrays)
    out = []
    keys = [(t, s) for t, per in current.items() for s in per]
    keys += [(t, s) for t, per in stored.items() for s in per if s not in current.get(t, {})]
    for tap, stat in keys:
        atol = bounds.get(tap, {}).get(stat)
        acc = ElementwiseComparison("vs_baseline", tap, backend, "baseline", 0.0, 0.0)
        if stat not in stored.get(tap, {}):
            acc.fail("not in the stored baseline (new tap or statistic); regenerate with --force-regen")
        elif stat not in current.get(tap, {}):
            acc.fail("in the stored baseline but not produced now")
        elif np.shape(stored[tap][stat]) != np.shape(current[tap][stat]):
            acc.fail(f"the baseline has {np.size(stored[tap][stat])} patches, the run {np.size(current[tap][stat])}")
        else:
            acc.add(np.asarray(current[tap][stat], dtype=STORED_DTYPE), np.asarray(stored[tap][stat]), atol)
        res = acc.finish()
        res.statistic = stat
        out.append(res)
    return out


def _write_baseline(npz: Path, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> str | None:
    """Write a baseline's ``.npz`` and ``.meta.json`` as one (:func:`parity.atomic.staged`); returns
    None, or why they could not be written, both files then being as they were.

    The metadata vouches for the arrays: a new ``.npz`` beside the old ``.meta.json`` (a failing or
    interrupted second write) would be compared as if made from the old inputs, or the reverse. So
    both go to temporaries first, and the two renames happen together or not at all. A failure is
    reported as the baseline's problem, naming the files, rather than raised after the whole run.
    """
    meta_file = meta_path(npz)
    try:
        for path in (npz, meta_file):
            _clear_empty_folder(path)
        with staged() as stage:
            _save_arrays(stage(npz), arrays)
            stage(meta_file).write_text(_metadata_text(meta), encoding="utf-8")
    except BaselineError as exc:
        return str(exc)
    except OSError as exc:
        return f"{npz} and {meta_file} cannot be written ({exc.strerror or exc}); both are as they were"
    return None


def _clear_empty_folder(path: Path) -> None:
    """An empty folder where a baseline file belongs is removed, so that --force-regen replaces the
    damaged baseline; a folder holding files is the user's, named in the error."""
    if path.is_dir() and not path.is_symlink():
        try:
            path.rmdir()
        except OSError:
            raise BaselineError(
                f"{path} is a folder holding files, where a baseline file belongs; remove it, then regenerate"
            ) from None


def baseline_folder(test_file: str | Path) -> Path:
    """Where a test module's baselines live: the folder named after the module, beside it (the same
    place pytest-regressions keeps its files, so its users find them where they expect)."""
    path = Path(test_file)
    return path.parent / path.stem


def check_folder(folder: Path) -> None:
    """Refuse, before any work, a baseline folder that cannot take the baselines a check may write."""
    import os

    if folder.exists():
        if not folder.is_dir():
            raise BaselineError(f"baseline folder {folder} exists and is not a folder")
        if not os.access(folder, os.W_OK):
            raise BaselineError(f"baseline folder {folder} is not writable")
        return
    parent = next((p for p in folder.parents if p.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK):
        raise BaselineError(f"baseline folder {folder} cannot be created (under {parent})")


def check_baselines(
    result: Any,
    folder: Path,
    basename: str,
    *,
    force_regen: bool = False,
    regen_all: bool = False,
    obtained: Path | None = None,
    test: str | None = None,
) -> list[str]:
    """Check every backend's statistics in ``result`` against its baseline in ``folder``.

    The baseline of backend B is ``folder/<basename>-<B>.npz`` (the layout of pytest-regressions'
    ``ndarrays_regression``: one array per tap, statistics x patches) plus ``.meta.json``. Options keep
    pytest-regressions' meaning: a missing baseline is created and fails; ``force_regen`` rewrites the
    baselines that differ or are stale and fails; ``regen_all`` rewrites every baseline and passes. A
    stale or unreadable baseline is reported, never compared. When statistics changed, the obtained
    values are written to ``obtained`` in the baseline's own layout, for inspection or to copy over.
    ``test`` names the test the baselines belong to (recorded in their metadata): a baseline another
    test wrote is reported and never compared or rewritten, since two tests then share one name.

    Comparisons and problems are added to ``result`` (its verdict is then decided again); returns the
    problems, one line each, empty when every baseline matched.
    """
    problems: list[str] = []
    for backend, stats in result.statistics.items():
        name = f"{basename}-{backend}"
        npz = folder / f"{name}.npz"
        meta_now = metadata(
            backend,
            result.config,
            result.fixture,
            result.weights_sha256,
            result.backends[backend].environment,
            result.groups,
            test,
        )
        arrays = baseline_arrays(stats)
        stored_meta = _stored_metadata(npz)
        # A baseline that records no test (written before baselines named theirs) belongs to any.
        owner = stored_meta.get("test") if isinstance(stored_meta, dict) else None
        if test is not None and isinstance(owner, str) and owner != test:
            problems.append(
                f"{npz}: the baseline of test {owner!r}, not of {test!r}: the two tests share its name "
                f"({basename!r}); give one another name or id (not compared, not rewritten)"
            )
            continue
        if regen_all:
            failure = _write_baseline(npz, arrays, meta_now)
            if failure:
                problems.append(f"{name}: not regenerated by --regen-all: {failure}")
            else:
                result.baseline_notes.append(f"{name}: regenerated by --regen-all: {npz}")
            continue
        if not npz.exists():
            failure = _write_baseline(npz, arrays, meta_now)
            created = f"not created: {failure}" if failure else f"created {npz} (check it in, and run again)"
            problems.append(f"{name}: no baseline yet; {created}")
            continue
        try:
            if isinstance(stored_meta, BaselineError):
                raise stored_meta
            assert stored_meta is not None  # the baseline exists
            stale = stale_reasons(stored_meta, meta_now)
            stored = read_arrays(npz) if not stale else {}
        except BaselineError as exc:
            stale, stored = [str(exc)], {}
        if stale:
            stale = [reason.replace("; regenerate with --force-regen", "") for reason in stale]
            what = f"{npz}: baseline made from other inputs or unreadable, not compared: " + "; ".join(stale)
            if force_regen:
                failure = _write_baseline(npz, arrays, meta_now)
                what += f" (not regenerated: {failure})" if failure else f" (regenerated by --force-regen: {npz})"
            else:
                what += "; regenerate with --force-regen"
            problems.append(what)
            continue
        comps = compare_to_baseline(stats, stored, result.statistic_tolerances.get(backend, {}), backend)
        result.baseline.extend(comps)
        failed = [c for c in comps if not c.passed]
        if not failed:
            continue
        result.baseline_notes.append(
            f"{backend}: first tap changed since its baseline: {failed[0].tap} ({failed[0].statistic})"
        )
        how = "changed beyond their tolerance"
        if any(c.reason for c in failed):  # a tap or statistic on one side only
            how = "missing on one side" if all(c.reason for c in failed) else f"{how}, or missing on one side"
        what = f"{name}: statistics {how}:\n  " + "\n  ".join(c.summary() for c in failed[:5])
        if len(failed) > 5:
            what += f"\n  ... and {len(failed) - 5} more"
        if obtained is not None:
            try:
                write_arrays(obtained / f"{name}.npz", arrays)
                what += f"\n  obtained statistics: {obtained / f'{name}.npz'}"
            except OSError as exc:
                what += f"\n  obtained statistics not written to {obtained / f'{name}.npz'} ({exc.strerror or exc})"
        if force_regen:
            failure = _write_baseline(npz, arrays, meta_now)
            what += f"\n  not regenerated: {failure}" if failure else f"\n  regenerated by --force-regen: {npz}"
        else:
            what += "\n  regenerate with --force-regen if the change is intended"
        problems.append(what)
    result.baseline_problems.extend(problems)
    result.verdict = decide(result)
    return problems

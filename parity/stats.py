"""Per-patch statistics of taps, in float64, streamed over batches, and how far each can move.

A patch is one (H, W) slice of a tap: one (sample, channel) pair. These are the numbers the
PtychoPINN team used to dump by hand and compare by eye; here they are computed the same way for every
backend and stored as regression baselines. Complex taps are described by their amplitude and phase.

The phase of an exact zero is meaningless (and ``np.angle`` turns the sign of a zero into ±π), and
the phase of a near-zero is float32 noise: phase statistics run over the pixels whose amplitude is
above ``PHASE_FLOOR`` times the largest of their patch, after signed zeros are made positive.
:func:`patch_statistics_and_bounds` says how much each statistic can change when every element
moves by at most its tolerance: that is what a statistic baseline is allowed to drift between
machines, derived from the same elementwise model as every other comparison.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

STATISTICS = ("mean", "std", "var_zero_mean", "min", "max", "mean_abs", "l2", "nan_count", "inf_count")
COUNTS = ("nan_count", "inf_count")
# Bound of a count: counts are whole numbers and must match exactly.
COUNT_TOLERANCE = 0.5
_TINY32 = float(np.finfo(np.float32).tiny)
# A pixel joins its patch's phase statistics above this fraction of the patch's largest amplitude.
# Not "above zero": a pixel the reference computes as an exact zero (a canvas outside every patch)
# carries a tolerance of 1e-36 or so, and a value that small elsewhere would bring in a phase of any
# size, so every phase statistic of such a patch could move by 2π and was checked against nothing.
# Above the floor, a pixel's inclusion is in doubt only where its amplitude is within its
# tolerance of the floor (2026-12-05).
PHASE_FLOOR = 2.0**-20


def _flat(tap: np.ndarray) -> np.ndarray:
    """(patches, H·W) view or copy of a (B, C, H, W) tap (any leading dims; 0/1-d taps are one patch)."""
    arr = np.asarray(tap)
    if arr.ndim < 2:
        arr = arr.reshape(1, -1)
    return arr.reshape(-1, arr.shape[-2] * arr.shape[-1])


def _rows(arr: np.ndarray) -> np.ndarray:
    """(patches, H·W) rows of a real tap as the compiled loops read them: contiguous float32/64."""
    rows = _flat(arr)
    if rows.dtype not in (np.float32, np.float64):
        rows = rows.astype(np.float64)
    return np.ascontiguousarray(rows)


def _row_columns(
    flat: np.ndarray, scale: np.ndarray | None = None, scale_coeff: float = 0.0, value_coeff: float = 0.0
) -> np.ndarray:
    """(P, 13) ``parity.kernels.row_statistics`` of (P, K) real rows, a block of rows per core: the
    statistics, computed in float64, and (with ``scale``) the moments of t = scale_coeff·scale +
    value_coeff·|rows| their bounds are made of, from one read of the rows."""
    from parity.kernels import by_row_blocks, row_statistics

    def block(rows: slice) -> np.ndarray:
        return np.asarray(row_statistics(flat[rows], None if scale is None else scale[rows], scale_coeff, value_coeff))

    return by_row_blocks(block, *flat.shape)


def _real_patch_stats(columns: np.ndarray) -> dict[str, np.ndarray]:
    # var_zero_mean: the PtychoPINN team's "zero-mean variance", the mean squared deviation from the
    # patch mean. Numerically the population variance; kept under its own name because that is what
    # they read.
    return {name: np.ascontiguousarray(columns[:, i]) for i, name in enumerate(STATISTICS)}


def phase(z: np.ndarray) -> np.ndarray:
    """np.angle with signed zeros made positive (−0.0 + 0.0 is +0.0), so 0·e^{iφ} never reads ±π."""
    return np.angle(np.asarray(z, dtype=np.complex128) + 0.0)


def _masked_patch_stats(flat: np.ndarray, include: np.ndarray) -> dict[str, np.ndarray]:
    """Statistics over the included elements of each row; a row with none gives zeros."""
    n = include.sum(axis=1)
    safe_n = np.maximum(n, 1)
    vals = np.where(include, flat, 0.0)
    mean = vals.sum(axis=1) / safe_n
    dev = np.where(include, flat - mean[:, None], 0.0)
    var = np.einsum("ij,ij->i", dev, dev) / safe_n
    has = n > 0
    return {
        "mean": mean,
        "std": np.sqrt(var),
        "var_zero_mean": var,
        "min": np.where(has, np.where(include, flat, np.inf).min(axis=1), 0.0),
        "max": np.where(has, np.where(include, flat, -np.inf).max(axis=1), 0.0),
        "mean_abs": np.abs(vals).sum(axis=1) / safe_n,
        "l2": np.sqrt(np.einsum("ij,ij->i", vals, vals)),
        "nan_count": np.count_nonzero(include & np.isnan(flat), axis=1).astype(np.float64),
        "inf_count": np.count_nonzero(include & np.isinf(flat), axis=1).astype(np.float64),
    }


def stat_names(is_complex: bool) -> list[str]:
    if not is_complex:
        return list(STATISTICS)
    return [f"{part}.{s}" for part in ("amplitude", "phase") for s in STATISTICS]


def patch_statistics(tap: np.ndarray) -> dict[str, np.ndarray]:
    """{statistic: (patches,) float64} for one tap of shape (B, C, H, W) (any leading dims)."""
    arr = np.asarray(tap)
    if not np.iscomplexobj(arr):
        return _real_patch_stats(_row_columns(_rows(arr)))
    patches = _complex_rows(arr)
    amplitude = np.abs(patches)
    return _complex_patch_stats(phase(patches), amplitude, _row_columns(amplitude))


def _complex_rows(arr: np.ndarray) -> np.ndarray:
    # One C-ordered complex128 copy; the reshape is then free even for transposed taps.
    return _flat(np.asarray(arr, dtype=np.complex128, order="C"))


def _largest_finite(rows: np.ndarray) -> np.ndarray:
    return np.asarray(np.where(np.isfinite(rows), rows, 0.0).max(axis=1, initial=0.0))


def _phase_pixels(amplitude: np.ndarray) -> np.ndarray:
    """The pixels of each row the phase statistics run over: amplitude above PHASE_FLOOR times the
    row's largest finite amplitude, and every NaN or infinite one (counted, as elsewhere)."""
    floor = PHASE_FLOOR * _largest_finite(amplitude)
    return np.asarray((amplitude > floor[:, None]) | ~np.isfinite(amplitude))


def _complex_patch_stats(phases: np.ndarray, amplitude: np.ndarray, columns: np.ndarray) -> dict[str, np.ndarray]:
    """Amplitude statistics from the amplitude's ``_row_columns``, phase statistics over
    ``_phase_pixels``."""
    out = {f"amplitude.{k}": v for k, v in _real_patch_stats(columns).items()}
    stats = _masked_patch_stats(phases, _phase_pixels(amplitude))
    out.update({f"phase.{k}": v for k, v in stats.items()})
    return out


def _real_bounds(moments: np.ndarray) -> dict[str, np.ndarray]:
    """How far each statistic of a row moves when every element moves by at most t, from t's
    per-row (mean, rms, max, 2-norm) (``parity.kernels.row_statistics``' last four columns)."""
    mean, rms, top, l2 = (np.ascontiguousarray(moments[:, i]) for i in range(4))
    return {
        "mean": mean,
        "std": rms,  # |σ(a) − σ(b)| ≤ σ(a − b) ≤ rms(a − b)
        "var_zero_mean": rms * rms,  # plus 2·σ·rms, added by the caller, which knows σ
        "min": top,
        "max": top,
        "mean_abs": mean,
        "l2": l2,
    }


def _phase_bounds(amplitude: np.ndarray, phases: np.ndarray, t: np.ndarray) -> dict[str, np.ndarray]:
    """Bounds of the phase statistics of z = amplitude·e^{i·phases}: each phase moves by asin(t/|z|),
    by 2π where the modulus tolerance reaches the value or the move can cross the ±π cut. The floor
    of ``_phase_pixels`` moves by at most PHASE_FLOOR times the largest t: an included pixel that
    may fall below it counts as moving by 2π, and one left out that may rise above it may join with
    any phase. Takes the amplitude and phase the statistics were computed from: each is a pass of
    a transcendental function over the tap, not to be made twice."""
    include = _phase_pixels(amplitude)
    floor = (PHASE_FLOOR * _largest_finite(amplitude))[:, None]
    slack = (PHASE_FLOOR * _largest_finite(t))[:, None]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        ratio = np.where(include, t / np.where(include, amplitude, 1.0), np.inf)
        leaves = amplitude - t <= floor + slack
    dphi = np.where((ratio >= 1.0) | leaves, 2 * math.pi, np.arcsin(np.minimum(ratio, 1.0)))
    dphi = np.where(np.abs(phases) + dphi > math.pi, 2 * math.pi, dphi)
    dphi = np.where(include, dphi, 0.0)
    with np.errstate(invalid="ignore", over="ignore"):
        joins = amplitude + t > floor - slack
    unsure = (~include & (t > _TINY32) & joins).sum(axis=1)
    included = include.sum(axis=1)
    n = np.maximum(included, 1)
    joined = 2 * math.pi * unsure
    sq = np.einsum("ij,ij->i", dphi, dphi) + joined * 2 * math.pi
    rms = np.sqrt(sq / n)
    moved = (dphi.sum(axis=1) + joined) / n  # the mean's and the mean magnitude's bound, before their caps
    top = np.where(unsure > 0, 2 * math.pi, dphi.max(axis=1, initial=0.0))
    return {
        "mean": np.minimum(moved, 2 * math.pi),
        "mean_abs": np.minimum(moved, math.pi),
        "min": np.minimum(top, 2 * math.pi),
        "max": np.minimum(top, 2 * math.pi),
        "std": np.minimum(rms, math.pi),
        "var_zero_mean": rms * rms,
        # No phase statistic can move by more than its range.
        "l2": np.minimum(np.sqrt(sq), math.pi * np.sqrt(included + unsure)),
    }


def _finite_or_zero(x: np.ndarray) -> np.ndarray:
    # np.nan_to_num(x, nan=0, posinf=0, neginf=0) at a tenth of its call overhead (17 calls a tap).
    return np.where(np.isfinite(x), x, 0.0)


def patch_statistics_and_bounds(
    tap: np.ndarray,
    tol: np.ndarray,
    rounding: float = 0.0,
    *,
    times: float = 1.0,
    proportional: float = 0.0,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``patch_statistics(tap)``, and {statistic: (patches,)}: how much each can change when every
    element changes by at most ``times·tol`` (``tol`` broadcastable to the tap) plus ``proportional``
    times its own modulus, plus ``rounding`` times the statistic (the rounding of storing it). Counts
    must match exactly (COUNT_TOLERANCE). Both from one read of the tap: the runner needs both for
    every tap of every backend, and reading the tap twice was a third of the statistics' cost."""
    arr = np.asarray(tap)
    t = _rows(np.broadcast_to(np.asarray(tol, dtype=np.float64), arr.shape))
    if np.iscomplexobj(arr):
        patches = _complex_rows(arr)
        amplitude = np.abs(patches)
        phases = phase(patches)
        columns = _row_columns(amplitude, t, times, proportional)
        stats = _complex_patch_stats(phases, amplitude, columns)
        t = times * t
        if proportional != 0.0:
            t += proportional * amplitude
        parts = {"amplitude": _real_bounds(columns[:, 9:]), "phase": _phase_bounds(amplitude, phases, t)}
    else:
        columns = _row_columns(_rows(arr), t, times, proportional)
        stats = _real_patch_stats(columns)
        parts = {"": _real_bounds(columns[:, 9:])}
    out: dict[str, np.ndarray] = {}
    for prefix, bounds in parts.items():
        names = {s: f"{prefix}.{s}" if prefix else s for s in STATISTICS}
        std = _finite_or_zero(stats[names["std"]])
        with np.errstate(invalid="ignore"):  # 0·inf where a row holds an inf: NaN, made 0 below as before
            bounds["var_zero_mean"] = bounds["var_zero_mean"] + 2.0 * std * np.sqrt(bounds["var_zero_mean"])
        if prefix == "phase":
            bounds["var_zero_mean"] = np.minimum(bounds["var_zero_mean"], math.pi**2)
        for s, name in names.items():
            if s in COUNTS:
                out[name] = np.full(t.shape[0], COUNT_TOLERANCE)
                continue
            b = bounds[s] + rounding * np.abs(_finite_or_zero(stats[name]))
            out[name] = np.where(np.isnan(b), 0.0, b)  # b >= 0: only a NaN needs a value
    return stats, {k: out[k] for k in stats}


class StatsAccumulator:
    """Collects per-patch statistics (and their bounds) batch by batch; never the tensors."""

    def __init__(self) -> None:
        self._parts: dict[str, dict[str, list[np.ndarray]]] = {}
        self._bounds: dict[str, dict[str, list[np.ndarray]]] = {}

    def add(
        self,
        taps: Mapping[str, np.ndarray],
        bounds: Mapping[str, Mapping[str, np.ndarray]] | None = None,
        statistics: Mapping[str, Mapping[str, np.ndarray]] | None = None,
    ) -> None:
        """``statistics``: {tap: patch_statistics(tensor)} for taps whose statistics are known already."""
        for name, tensor in taps.items():
            per_stat = self._parts.setdefault(name, {})
            known = statistics.get(name) if statistics is not None else None
            for stat, values in (patch_statistics(tensor) if known is None else known).items():
                per_stat.setdefault(stat, []).append(values)
            if bounds is not None and name in bounds:
                per_bound = self._bounds.setdefault(name, {})
                for stat, values in bounds[name].items():
                    per_bound.setdefault(stat, []).append(values)

    def result(self) -> dict[str, dict[str, np.ndarray]]:
        """{tap: {statistic: (total patches,) float64}} in the order taps were first seen."""
        return _concatenate(self._parts)

    def bounds(self) -> dict[str, dict[str, np.ndarray]]:
        """{tap: {statistic: (total patches,)}}: the tolerance of each statistic against a baseline."""
        return _concatenate(self._bounds)


def _concatenate(parts: Mapping[str, Mapping[str, list[np.ndarray]]]) -> dict[str, dict[str, np.ndarray]]:
    return {tap: {stat: np.concatenate(chunks) for stat, chunks in per.items()} for tap, per in parts.items()}


def summarise(values: np.ndarray) -> dict[str, float]:
    """Aggregate one statistic over patches for reports (the full arrays go to the .npz)."""
    v = np.asarray(values, dtype=np.float64)
    finite = v[np.isfinite(v)]
    if finite.size == 0:
        return {"mean": float("nan"), "min": float("nan"), "max": float("nan")}
    return {"mean": float(finite.mean()), "min": float(finite.min()), "max": float(finite.max())}

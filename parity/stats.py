"""Per-patch statistics of taps, in float64, streamed over batches.

A patch is one (H, W) slice of a tap: one (sample, channel) pair. These are the numbers the
PtychoPINN team used to dump by hand and compare by eye; here they are computed the same way for every
backend and stored as regression baselines. Complex taps are described by their amplitude and phase.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

STATISTICS = ("mean", "std", "var_zero_mean", "min", "max", "mean_abs", "l2", "nan_count", "inf_count")


def _real_patch_stats(flat: np.ndarray) -> dict[str, np.ndarray]:
    """Statistics of (P, K) real float64 data, one row per patch (einsum: no squared temporaries)."""
    n = flat.shape[1]
    mean = flat.mean(axis=1)
    dev = flat - mean[:, None]
    var = np.einsum("ij,ij->i", dev, dev) / n
    del dev
    finite = bool(np.isfinite(flat).all())
    zeros = np.zeros(flat.shape[0])
    return {
        "mean": mean,
        "std": np.sqrt(var),
        # The PtychoPINN team's "zero-mean variance": the mean squared deviation from the patch mean.
        # Numerically the population variance; kept under its own name because that is what they read.
        "var_zero_mean": var,
        "min": flat.min(axis=1),
        "max": flat.max(axis=1),
        "mean_abs": np.abs(flat).mean(axis=1),
        "l2": np.sqrt(np.einsum("ij,ij->i", flat, flat)),
        "nan_count": zeros if finite else np.count_nonzero(np.isnan(flat), axis=1).astype(np.float64),
        "inf_count": zeros.copy() if finite else np.count_nonzero(np.isinf(flat), axis=1).astype(np.float64),
    }


def stat_names(is_complex: bool) -> list[str]:
    if not is_complex:
        return list(STATISTICS)
    return [f"{part}.{s}" for part in ("amplitude", "phase") for s in STATISTICS]


def patch_statistics(tap: np.ndarray) -> dict[str, np.ndarray]:
    """{statistic: (patches,) float64} for one tap of shape (B, C, H, W) (any leading dims)."""
    arr = np.asarray(tap)
    if arr.ndim < 2:
        arr = arr.reshape(1, -1)
    # One C-ordered float64 (complex128) copy; the reshape is then free even for transposed taps.
    wide = np.complex128 if np.iscomplexobj(arr) else np.float64
    patches = np.asarray(arr, dtype=wide, order="C").reshape(-1, arr.shape[-2] * arr.shape[-1])
    if np.iscomplexobj(patches):
        z = patches
        out = {f"amplitude.{k}": v for k, v in _real_patch_stats(np.abs(z)).items()}
        out.update({f"phase.{k}": v for k, v in _real_patch_stats(np.angle(z)).items()})
        return out
    return _real_patch_stats(patches)


class StatsAccumulator:
    """Collects per-patch statistics batch by batch; only the statistics are kept, never the tensors."""

    def __init__(self) -> None:
        self._parts: dict[str, dict[str, list[np.ndarray]]] = {}

    def add(self, taps: Mapping[str, np.ndarray]) -> None:
        for name, tensor in taps.items():
            per_stat = self._parts.setdefault(name, {})
            for stat, values in patch_statistics(tensor).items():
                per_stat.setdefault(stat, []).append(values)

    def result(self) -> dict[str, dict[str, np.ndarray]]:
        """{tap: {statistic: (total patches,) float64}} in the order taps were first seen."""
        return {
            tap: {stat: np.concatenate(chunks) for stat, chunks in per_stat.items()}
            for tap, per_stat in self._parts.items()
        }


def summarise(values: np.ndarray) -> dict[str, float]:
    """Aggregate one statistic over patches for reports (the full arrays go to the .npz)."""
    v = np.asarray(values, dtype=np.float64)
    finite = v[np.isfinite(v)]
    if finite.size == 0:
        return {"mean": float("nan"), "min": float("nan"), "max": float("nan")}
    return {"mean": float(finite.mean()), "min": float(finite.min()), "max": float(finite.max())}

"""Elementwise comparison of two tensors under the one tolerance rule, streamed over batches.

The rule, everywhere: an element passes when |a - b| <= atol_i + rtol * |b_i|, b being the reference
side; atol may differ element by element (the tolerance model gives each element its own, see
``parity.tolerances``). |a - b| is the complex modulus for complex taps. NaN and Inf must sit at the
same positions on both sides (same sign for Inf); a non-finite value on one side only fails and is
never zeroed away. The numbers kept are the ones ``torch.testing.assert_close`` users look for:
mismatch count and share, the greatest absolute and relative difference and where it is, plus the
margin (the worst element's |a - b| over its tolerance: 1 is on the edge), the smallest uniform atol
and the smallest model factor that would have passed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

RULE = "|a - b| <= atol_i + rtol * |b_i|  (b: reference side; complex: modulus of the difference)"

# Error histogram for reports: bin k counts |a - b| in [2**(k - 1 + HIST_MIN_EXP), 2**(k + HIST_MIN_EXP)),
# read straight from the float exponent (np.frexp), far cheaper than a search over bin edges. The
# first and last bins also hold everything below and above; exact zeros are not counted.
HIST_MIN_EXP, HIST_MAX_EXP = -54, 28
HIST_EDGES = 2.0 ** np.arange(HIST_MIN_EXP, HIST_MAX_EXP + 1, dtype=np.float64)

# Elements per work block: the dozen elementwise steps of a comparison then run on data that stays in
# the CPU cache, instead of each step streaming the whole tap through memory (benchmarks/README.md).
BLOCK = 1 << 15


@dataclass
class ComparisonResult:
    """One comparison of one tap between two sides; JSON-ready through :meth:`to_dict`."""

    kind: str  # "vs_reference" | "backend_vs_backend" | "vs_baseline" | "structure"
    tap: str
    a: str
    b: str
    atol: float  # at the element with the largest margin (atol may vary element by element)
    rtol: float
    passed: bool
    margin: float = 0.0  # max over elements of |a - b| / (atol_i + rtol·|b_i|): 1 is on the edge
    margin_index: list[int] | None = None
    factor: float | None = None  # the tolerance model's factor for this tap, when it has one
    min_factor_to_pass: float | None = None  # the smallest factor that would have passed (model only)
    max_abs: float = 0.0
    mean_abs: float = 0.0
    max_rel: float = 0.0
    worst_index: list[int] | None = None
    worst_a: Any = None
    worst_b: Any = None
    mismatched: int = 0
    numel: int = 0
    mismatch_fraction: float = 0.0
    min_atol_to_pass: float = 0.0
    nonfinite_mismatch: int = 0
    reason: str | None = None  # set when the tap could not be compared element by element
    histogram: list[int] = field(default_factory=list)
    statistic: str | None = None  # for vs_baseline comparisons
    known: str | None = None  # a failure a declared deviation accepts (parity.deviations): not counted

    def to_dict(self) -> dict[str, Any]:
        d = {k: _jsonable(v) for k, v in self.__dict__.items() if k != "histogram"}
        return d

    def summary(self) -> str:
        """One line in the manner of torch.testing.assert_close."""
        side = f"{self.a} vs {self.b}"
        if self.reason:
            return f"{self.tap} [{self.kind}: {side}]: {self.reason}"
        what = f"{self.tap}" + (f" / {self.statistic}" if self.statistic else "")
        factor = f", factor {self.factor:g}" if self.factor is not None else ""
        return (
            f"{what} [{self.kind}: {side}]: {'ok' if self.passed else 'MISMATCH'} "
            f"{self.mismatched} / {self.numel} elements ({100 * self.mismatch_fraction:.3g}%) out of "
            f"tolerance; margin {self.margin:.3g} at index {tuple(self.margin_index or ())} "
            f"(atol={self.atol:.3g} there, rtol={self.rtol:.3g}{factor}); greatest abs difference "
            f"{self.max_abs:.3g} at index {tuple(self.worst_index or ())} "
            f"({self.a}={_fmt(self.worst_a)}, {self.b}={_fmt(self.worst_b)}); greatest rel difference "
            f"{self.max_rel:.3g}; smallest passing atol {self.min_atol_to_pass:.3g}"
            + (f"; {self.nonfinite_mismatch} NaN/Inf position mismatches" if self.nonfinite_mismatch else "")
        )


def _fmt(v: Any) -> str:
    if v is None:
        return "?"
    if isinstance(v, complex):
        return f"{v.real:.6g}{v.imag:+.6g}j"
    return f"{v:.6g}"


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/Inf; keep them readable rather than invalid
    if isinstance(v, complex):
        return {"real": _jsonable(v.real), "imag": _jsonable(v.imag)}
    if isinstance(v, np.generic):
        return _jsonable(v.item())
    return v


class ElementwiseComparison:
    """Accumulates one (tap, a, b) comparison over batches; batches are stacked along axis 0."""

    def __init__(
        self, kind: str, tap: str, a: str, b: str, atol: float, rtol: float, factor: float | None = None
    ) -> None:
        """``atol`` is the default for :meth:`add`; a model tolerance passes its own per batch."""
        self.result = ComparisonResult(kind, tap, a, b, atol, rtol, passed=True, factor=factor)
        self._atol = atol
        self._sum_abs = 0.0
        self._finite_numel = 0
        self._rows = 0
        self._hist = np.zeros(len(HIST_EDGES), dtype=np.int64)

    def fail(self, reason: str) -> None:
        """Mark the comparison as impossible (missing tap, shape mismatch); it then stays failed."""
        r = self.result
        r.passed = False
        if r.reason is None:
            r.reason = reason

    def add(self, a: np.ndarray, b: np.ndarray, atol: np.ndarray | float | None = None) -> None:
        """Compare one batch; ``atol`` (broadcastable to the batch) is the elementwise atol."""
        r = self.result
        if r.reason is not None:
            return
        if a.shape != b.shape:
            self.fail(f"shape mismatch: {r.a} has {a.shape}, {r.b} has {b.shape}")
            return
        atol_field = np.asarray(self._atol if atol is None else atol, dtype=np.float64)
        a_flat, b_flat = np.ravel(a), np.ravel(b)  # views of contiguous taps
        atol_flat = None if atol_field.size == 1 else np.ravel(np.broadcast_to(atol_field, a.shape))
        atol_scalar = float(atol_field.reshape(-1)[0]) if atol_flat is None else 0.0
        wide = np.complex128 if np.iscomplexobj(a) or np.iscomplexobj(b) else np.float64
        for start in range(0, a_flat.size, BLOCK):
            stop = min(start + BLOCK, a_flat.size)
            block_atol = atol_scalar if atol_flat is None else atol_flat[start:stop]
            self._add_block(a, b, a_flat[start:stop], b_flat[start:stop], block_atol, start, wide)
        self._rows += a.shape[0] if a.ndim else 1

    def _add_block(
        self,
        a: np.ndarray,
        b: np.ndarray,
        a_blk: np.ndarray,
        b_blk: np.ndarray,
        atol: np.ndarray | float,
        offset: int,
        wide: type,
    ) -> None:
        """One block of a batch (flat elements ``offset`` on), small enough to stay in cache."""
        r = self.result
        with np.errstate(invalid="ignore", over="ignore"):
            diff = np.subtract(a_blk, b_blk, dtype=wide)
            err = np.abs(diff, out=diff) if wide is np.float64 else np.abs(diff)
            mag_b = np.abs(b_blk, dtype=np.float64) if wide is np.float64 else np.abs(np.asarray(b_blk, wide))
            total = float(err.sum())
        bad: np.ndarray | None = None  # non-finite on one side only, or different non-finite values
        finite = math.isfinite(total)
        if not finite:
            a64: np.ndarray = np.asarray(a_blk, dtype=wide)
            b64: np.ndarray = np.asarray(b_blk, dtype=wide)
            fin_a, fin_b = np.isfinite(a64), np.isfinite(b64)
            both = fin_a & fin_b
            # Non-finite values agree only when both sides hold the same NaN/Inf at the same place.
            same = (~fin_a & ~fin_b) & ((np.isnan(a64) & np.isnan(b64)) | (a64 == b64))
            bad = ~both & ~same
            err[~both] = 0.0
            mag_b[~both] = 0.0
            total = float(err.sum())
            self._finite_numel += int(np.count_nonzero(both))
            n_bad = int(np.count_nonzero(bad))
            r.nonfinite_mismatch += n_bad
            if not n_bad:
                bad = None
        else:
            self._finite_numel += err.size
        r.numel += err.size
        self._sum_abs += total

        def where(flat: int) -> list[int]:
            idx = list(np.unravel_index(offset + flat, a.shape))
            if idx:  # a 0-d tap (a scalar such as log_scale's gradient) has the empty index
                idx[0] += self._rows
            return [int(i) for i in idx]

        flat_worst = int(np.argmax(err)) if bad is None else int(np.argmax(bad))
        worst = float(err[flat_worst]) if bad is None else float("inf")
        if r.worst_index is None or worst > r.max_abs:
            r.worst_index = where(flat_worst)
            r.worst_a = a.flat[offset + flat_worst].item()
            r.worst_b = b.flat[offset + flat_worst].item()
            r.max_abs = worst
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.divide(err, mag_b, out=np.zeros_like(err), where=mag_b > 0)
            r.max_rel = max(r.max_rel, float(rel.max()))
            tol = np.multiply(mag_b, r.rtol, out=mag_b)  # rtol·|b|, then the whole tolerance
            excess = np.subtract(err, tol, out=rel)  # what atol alone would have to cover
            max_excess = float(excess.max())
            tol += atol
            out = err > tol
            if bad is not None:
                out |= bad
            r.mismatched += int(np.count_nonzero(out))
            r.min_atol_to_pass = max(r.min_atol_to_pass, max_excess, 0.0)
            # margin = err / (atol + rtol·|b|); 0/0 (an exact zero under a zero tolerance) is 0.
            ratio = np.divide(err, tol, out=np.where(err > 0, np.inf, 0.0), where=tol > 0)
            if bad is not None:
                ratio[bad] = np.inf
            flat_m = int(np.argmax(ratio))
            m = float(ratio[flat_m])
            if r.margin_index is None or m > r.margin:
                r.margin_index = where(flat_m)
                r.margin = m
                r.atol = float(atol if np.ndim(atol) == 0 else np.asarray(atol)[flat_m])
            if r.factor:
                # atol_i / factor is u·S_i: the excess over it is the factor this batch needed.
                if np.ndim(atol) == 0:
                    unit = float(atol) / r.factor
                    need = max_excess / unit if unit > 0 else (np.inf if max_excess > 0 else 0.0)
                else:
                    units = np.asarray(atol) / r.factor
                    scaled = np.divide(excess, units, out=np.where(excess > 0, np.inf, 0.0), where=units > 0)
                    need = float(scaled.max())
                if bad is not None:
                    need = np.inf
                r.min_factor_to_pass = max(r.min_factor_to_pass or 0.0, float(need), 0.0)
        if bad is not None:
            r.min_atol_to_pass = float("inf")
        # Histogram bins straight from the float64 exponent field: frexp's exponent is field - 1022.
        # Exact zeros (field 0) fall in bin 0 and are taken out again; subnormals belong there anyway.
        exponent = (err.view(np.int64) >> 52) - (1022 + HIST_MIN_EXP)
        bins = np.clip(exponent, 0, self._hist.size - 1)
        self._hist += np.bincount(bins, minlength=self._hist.size)
        self._hist[0] -= err.size - int(np.count_nonzero(err))

    def finish(self) -> ComparisonResult:
        r = self.result
        if r.reason is None:
            r.mean_abs = self._sum_abs / self._finite_numel if self._finite_numel else 0.0
            r.mismatch_fraction = r.mismatched / r.numel if r.numel else 0.0
            r.passed = r.mismatched == 0
        r.histogram = [int(v) for v in self._hist]
        return r


def compare_arrays(
    a: np.ndarray,
    b: np.ndarray,
    atol: np.ndarray | float,
    rtol: float,
    *,
    tap: str = "",
    kind: str = "",
    names: tuple[str, str] = ("a", "b"),
) -> ComparisonResult:
    """Compare two whole arrays at once (b is the reference side)."""
    acc = ElementwiseComparison(kind, tap, names[0], names[1], 0.0, rtol)
    acc.add(np.asarray(a), np.asarray(b), atol)
    return acc.finish()

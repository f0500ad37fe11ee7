"""Elementwise comparison of two tensors under the one tolerance rule, streamed over batches.

The rule, everywhere: an element passes when |a - b| <= atol_i + rtol * |b_i|, b being the reference
side; atol may differ element by element (the tolerance model gives each element its own, see
``parity.tolerances``). |a - b| is the complex modulus for complex taps. NaN and Inf must sit at the
same positions on both sides (same sign for Inf; for complex values, in the same part, the other
part equal); a non-finite value on one side only fails and is never zeroed away. The numbers kept
are the ones ``torch.testing.assert_close`` users look for: mismatch count and share, the greatest
absolute and relative difference and where it is, plus the margin (the worst element's |a - b| over
its tolerance: 1 is on the edge), the smallest uniform atol and the smallest model factor that
would have passed.
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

_KERNEL_DTYPES = frozenset(np.dtype(t) for t in (np.float32, np.float64, np.complex64, np.complex128))


def _flat(x: np.ndarray) -> np.ndarray:
    """``x`` as the compiled loop reads it: flat, contiguous, a native float or complex type."""
    flat = np.ravel(x)  # a view of a contiguous tap
    if flat.dtype in _KERNEL_DTYPES:
        return flat
    return flat.astype(np.complex128 if np.iscomplexobj(flat) else np.float64)


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
    # The batch (from 0) each of those elements is in. For a tap with a batch axis the index already
    # counts the rows of earlier batches; one without (a weight's gradient, the probe) is indexed
    # within its own batch's tensor.
    worst_batch: int | None = None
    margin_batch: int | None = None
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
        what = f"{self.tap}" + (f" / {self.statistic}" if self.statistic else "")
        if self.reason:
            return f"{what} [{self.kind}: {side}]: {self.reason}"
        factor = f", factor {self.factor:g}" if self.factor is not None else ""
        return (
            f"{what} [{self.kind}: {side}]: {'ok' if self.passed else 'MISMATCH'} "
            f"{self.mismatched} / {self.numel} elements ({100 * self.mismatch_fraction:.3g}%) out of "
            f"tolerance; margin {self.margin:.3g} at index {tuple(self.margin_index or ())}{_of(self.margin_batch)} "
            f"(atol={self.atol:.3g} there, rtol={self.rtol:.3g}{factor}); greatest abs difference "
            f"{self.max_abs:.3g} at index {tuple(self.worst_index or ())}{_of(self.worst_batch)} "
            f"({self.a}={_fmt(self.worst_a)}, {self.b}={_fmt(self.worst_b)}); greatest rel difference "
            f"{self.max_rel:.3g}; smallest passing atol {self.min_atol_to_pass:.3g}"
            + (f"; {self.nonfinite_mismatch} NaN/Inf position mismatches" if self.nonfinite_mismatch else "")
        )


def _of(batch: int | None) -> str:
    return f" of batch {batch}" if batch else ""


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
        self._batches = 0
        self._hist = np.zeros(len(HIST_EDGES), dtype=np.int64)

    def fail(self, reason: str) -> None:
        """Mark the comparison as impossible (missing tap, shape mismatch); it then stays failed."""
        r = self.result
        r.passed = False
        if r.reason is None:
            r.reason = reason

    def add(
        self,
        a: np.ndarray,
        b: np.ndarray,
        atol: np.ndarray | float | None = None,
        *,
        times: float = 1.0,
        batched: bool = True,
    ) -> None:
        """Compare one batch under the elementwise atol ``times·atol`` (``atol`` broadcastable to
        the batch). The runner passes the error scale S as ``atol`` and factor·u as ``times``: the
        product is formed element by element inside the loop, never as an array the size of the tap.
        ``batched``: axis 0 is the batch's, so indices count the rows of earlier batches on it."""
        from parity import kernels

        r = self.result
        if r.reason is not None:
            return
        if a.shape != b.shape:
            self.fail(f"shape mismatch: {r.a} has {a.shape}, {r.b} has {b.shape}")
            return
        atol_field = np.asarray(self._atol if atol is None else atol, dtype=np.float64)
        a_flat, b_flat = _flat(a), _flat(b)
        if atol_field.size == 1:
            atol_flat = atol_field.reshape(1)
        else:
            atol_flat = np.ravel(np.broadcast_to(atol_field, a.shape))
        step = kernels.CHUNK
        chunks = [(s, min(s + step, a_flat.size)) for s in range(0, a_flat.size, step)]
        factor = float(r.factor or 0.0)

        def one(chunk: tuple[int, int]) -> tuple[tuple[Any, ...], np.ndarray]:
            start, stop = chunk
            hist = np.zeros(len(HIST_EDGES), dtype=np.int64)
            part = atol_flat if atol_flat.size == 1 else atol_flat[start:stop]
            out = kernels.scan(a_flat[start:stop], b_flat[start:stop], part, times, r.rtol, factor, hist)
            return out, hist

        # Merged in order: the result is the same for any number of threads.
        outs = kernels.on_cores(one, chunks)
        for (start, stop), (out, hist) in zip(chunks, outs, strict=True):
            self._merge(a, b, atol_flat, times, start, stop - start, out, batched)
            self._hist += hist
        self._rows += a.shape[0] if a.ndim else 1
        self._batches += 1

    def _merge(
        self,
        a: np.ndarray,
        b: np.ndarray,
        atol: np.ndarray,
        times: float,
        offset: int,
        size: int,
        out: tuple[Any, ...],
        batched: bool = True,
    ) -> None:
        """Fold one chunk's numbers (flat elements ``offset`` on) into the result; an earlier
        element keeps its place on a tie, as ``np.argmax`` would."""
        r = self.result
        (sum_abs, n_finite, n_bad, first_bad, worst_i, worst, max_rel, mismatched) = out[:8]
        max_excess, margin_i, margin, need = out[8:]
        r.numel += size
        self._sum_abs += sum_abs
        self._finite_numel += n_finite
        r.nonfinite_mismatch += n_bad
        r.mismatched += mismatched
        r.max_rel = max(r.max_rel, max_rel)

        def where(flat: int) -> list[int]:
            idx = list(np.unravel_index(offset + flat, a.shape))
            if idx and batched:  # a 0-d tap (a scalar such as log_scale's gradient) has the empty index
                idx[0] += self._rows
            return [int(i) for i in idx]

        if n_bad:
            worst_i, worst = first_bad, math.inf
        if r.worst_index is None or worst > r.max_abs:
            r.worst_index = where(worst_i)
            r.worst_batch = self._batches
            r.worst_a = a.flat[offset + worst_i].item()
            r.worst_b = b.flat[offset + worst_i].item()
            r.max_abs = worst
        if r.margin_index is None or margin > r.margin:
            r.margin_index = where(margin_i)
            r.margin_batch = self._batches
            r.margin = margin
            r.atol = float(atol[0] if atol.size == 1 else atol[offset + margin_i]) * times
        r.min_atol_to_pass = math.inf if n_bad else max(r.min_atol_to_pass, max_excess, 0.0)
        if r.factor:
            if atol.size == 1:
                # atol / factor is u·S: the excess over it is the factor needed
                unit = float(atol[0]) * times / r.factor
                need = max_excess / unit if unit > 0 else (math.inf if max_excess > 0 else 0.0)
            if n_bad:
                need = math.inf
            r.min_factor_to_pass = max(r.min_factor_to_pass or 0.0, float(need), 0.0)

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

"""The harness's inner loops, compiled (numba): each reads a tap once and keeps every number it needs.

``scan`` is the elementwise comparison's. ``parity.compare`` keeps a dozen numbers per comparison
(mismatch count, greatest difference and where, margin and where, the smallest passing atol and
factor, an error histogram...). In NumPy each is a pass over the tap, some two or three: about thirty
passes a comparison, most of the harness's time. Here one loop reads each element once and keeps them
all; the first index of each maximum wins, as ``np.argmax`` would pick it, so results do not depend on
how a tap is split. ``row_statistics`` is ``parity.stats``'s, for real taps (and complex taps'
amplitudes): the patch statistics and, in the same read of each element, what their bounds are made
of, without a temporary the size of the tap.

Imported on first use only: numba's import and the compilation (cached on disk after the first run)
are not paid by ``import parity`` or by a command that compares nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
from numba import njit

from parity.compare import HIST_MIN_EXP

# Exponent field of a float64 |a - b| -> histogram bin: frexp's exponent is the field - 1022.
_BIN_OFFSET = 1022 + HIST_MIN_EXP
# Elements per unit of work: a tap larger than this is split, and the parts run a core each.
CHUNK = 1 << 17
# Elements ``scan`` screens at once (see ``_quiet``): small enough to stay in L1 beside its inputs.
_BLOCK = 256
_POOL: ThreadPoolExecutor | None = None
_In = TypeVar("_In")
_Out = TypeVar("_Out")


def on_cores(work: Callable[[_In], _Out], parts: Sequence[_In]) -> list[_Out]:
    """``work`` on every part, on the cores at once (the compiled loops release the GIL), the results
    in the order of ``parts``: callers split a tap into independent parts and merge them in order, so
    no result depends on the number of threads."""
    global _POOL
    if len(parts) < 2:
        return [work(p) for p in parts]
    if _POOL is None:
        from parity.emulation import thread_count

        _POOL = ThreadPoolExecutor(max_workers=thread_count(), thread_name_prefix="parity-kernels")
    return list(_POOL.map(work, parts))


def row_blocks(rows: int, row_length: int) -> list[slice]:
    """Consecutive blocks of whole rows, about CHUNK elements each (at least one row)."""
    per = max(1, CHUNK // max(row_length, 1))
    return [slice(start, min(start + per, rows)) for start in range(0, rows, per)]


def by_row_blocks(work: Callable[[slice], np.ndarray], rows: int, row_length: int) -> np.ndarray:
    """``work`` on each block of rows (``row_blocks``), on the cores at once, the results stacked in
    row order: a row's result depends on that row alone, so it is the result of the whole."""
    parts = on_cores(work, row_blocks(rows, row_length))
    return np.concatenate(parts) if len(parts) != 1 else parts[0]


@njit(cache=True, inline="always")
def _modulus(d: Any) -> Any:
    """|d|, for real and complex d alike; the complex modulus without a libm call where it is safe."""
    re = abs(d.real)
    im = abs(d.imag)
    if im == 0.0:
        return re
    if re == 0.0:
        return im
    s = re * re + im * im
    if s == math.inf or s < 1e-290:  # overflow or underflow of the squares: the careful way
        return math.hypot(re, im)
    return math.sqrt(s)


@njit(cache=True, inline="always")
def _same_part(p: float, q: float) -> bool:
    """One real part of two non-finite values agrees: both NaN, or equal (the same infinity, or the
    same finite number beside a non-finite other part)."""
    return (math.isnan(p) and math.isnan(q)) or p == q


@njit(cache=True, inline="always")
def _count(err: float, box: Any, bits: Any, hist: Any) -> None:
    """Add a nonzero |a - b| to its histogram bin, read straight from the exponent field (inf lands
    last)."""
    if err > 0.0:
        box[0] = err
        last = hist.size - 1
        hist[min(max((bits[0] >> 52) - _BIN_OFFSET, 0), last)] += 1


@njit(cache=True, inline="always")
def _quiet(
    a: Any,
    b: Any,
    t: Any,
    one_atol: bool,
    times: float,
    rtol: float,
    worst: float,
    margin: float,
    max_rel: float,
    max_excess: float,
    need: float,
    inv_factor: float,
    errs: Any,
) -> bool:
    """Whether no element of the block ``a``, ``b`` (``t``: its atol, or ``one_atol``: one value)
    would change anything in ``scan`` but the sum of |a - b|, the finite count and the histogram:
    every element finite, within tolerance, and past no maximum kept so far (the first block never
    is: ``worst`` starts below any |a - b|). ``errs`` gets each |a - b|. The tests are ``scan``'s own
    conditions with the same operations, so a quiet block's result is ``scan``'s bit for bit, and
    almost every block of a passing comparison is quiet. Written without branches so that the
    compiler runs it on vector registers, which ``scan``'s loop, keeping each maximum's index as it
    goes, cannot be (docs/decisions.md, "Speed")."""
    big = 1.7976931348623157e308
    hot = 0
    if one_atol:
        tol0 = t[0] * times
        for j in range(a.size):
            x = a[j] + 0.0
            y = b[j] + 0.0
            err = _modulus(x - y)
            mag = _modulus(y)
            tol = mag * rtol
            excess = err - tol
            tol += tol0
            errs[j] = err
            hot += (
                (not (err <= big))  # also where b alone is not finite: then neither is a - b
                | (err > worst)
                | (err > tol)
                | (err > margin * tol)
                | ((err > max_rel * mag) & (mag > 0.0))
                | (excess > max_excess)
            )
    else:
        for j in range(a.size):
            x = a[j] + 0.0
            y = b[j] + 0.0
            tj = t[j] * times
            err = _modulus(x - y)
            mag = _modulus(y)
            tol = mag * rtol
            excess = err - tol
            tol += tj
            errs[j] = err
            hot += (
                (not (err <= big))
                | (err > worst)
                | (err > tol)
                | (err > margin * tol)
                | ((err > max_rel * mag) & (mag > 0.0))
                | (excess > max_excess)
                | ((inv_factor > 0.0) & (excess > need * (tj * inv_factor)))
            )
    return hot == 0


@njit(cache=True, nogil=True)
def scan(a: Any, b: Any, atol: Any, times: float, rtol: float, factor: float, hist: Any) -> tuple[Any, ...]:
    """One pass over flat ``a``, ``b`` (b: the reference side) under the elementwise atol
    ``times·atol`` (``atol`` of length 1: one value for all; ``times`` lets the caller pass the error
    scale itself, with no atol array the size of the tap). Adds each nonzero |a - b| to ``hist``;
    returns, in order: the sum of |a - b| over the elements finite on both sides, their count, the
    count of non-finite values on one side only (or different ones), the first such index (-1:
    none), the index and value of the greatest |a - b|, the greatest relative difference, the
    mismatch count, the greatest |a - b| - rtol·|b|, the index and value of the greatest margin, and
    the greatest factor an elementwise atol needed (0 when ``factor`` is 0 or atol is one value)."""
    n = a.size
    one_atol = atol.size == 1
    inv_factor = 1.0 / factor if factor > 0.0 else 0.0
    box = np.empty(1, np.float64)
    bits = box.view(np.int64)
    sum_abs = 0.0
    n_finite = 0
    n_bad = 0
    first_bad = -1
    worst_i = -1
    worst = -1.0
    max_rel = 0.0
    mismatched = 0
    max_excess = -math.inf
    margin_i = -1
    margin = -1.0
    need = 0.0
    errs = np.empty(_BLOCK, np.float64)
    exponents = errs.view(np.int64)
    slots = np.empty(_BLOCK, np.int64)
    last = hist.size - 1
    width = hist.size + 1  # a slot past the last bin takes the zeros
    counts = np.zeros(4 * width, np.int64)
    for lo in range(0, n, _BLOCK):
        hi = min(lo + _BLOCK, n)
        quiet = _quiet(
            a[lo:hi],
            b[lo:hi],
            atol[:1] if one_atol else atol[lo:hi],
            one_atol,
            times,
            rtol,
            worst,
            margin,
            max_rel,
            max_excess,
            need,
            inv_factor,
            errs,
        )
        if quiet:
            for j in range(hi - lo):
                sum_abs += errs[j]  # in order: the sum element by element gives, bit for bit
            # The histogram through four interleaved copies, bins found first: errors of one size fill
            # one bin, and increments of one counter in a row wait for each other.
            for j in range(hi - lo):
                slot = min(max((exponents[j] >> 52) - _BIN_OFFSET, 0), last) if errs[j] > 0.0 else last + 1
                slots[j] = (j & 3) * width + slot
            for j in range(hi - lo):
                counts[slots[j]] += 1
            n_finite += hi - lo
            continue
        for i in range(lo, hi):
            # float64 (complex128) arithmetic whatever the sides' precision. Widened by adding 0, not by
            # multiplying by 1: times 1 a complex value's parts mix (nan+0j became nan+nanj, inf+2j
            # inf+nanj), and non-finite values are judged part by part below.
            x = a[i] + 0.0
            y = b[i] + 0.0
            t = (atol[0] if one_atol else atol[i]) * times
            bad = False
            if np.isfinite(x) and np.isfinite(y):
                err = _modulus(x - y)
                mag = _modulus(y)
                n_finite += 1
                sum_abs += err
            else:
                # Non-finite values agree only when both sides hold the same NaN/Inf at the same place,
                # part by part for complex values (nan+1j is not 5+nanj); such an element then counts as
                # no difference at all.
                err = 0.0
                mag = 0.0
                same = (
                    not np.isfinite(x)
                    and not np.isfinite(y)
                    and _same_part(x.real, y.real)
                    and _same_part(x.imag, y.imag)
                )
                if not same:
                    bad = True
                    n_bad += 1
                    if first_bad < 0:
                        first_bad = i
            if err > worst:
                worst = err
                worst_i = i
            if mag > 0.0 and err > max_rel * mag:  # divisions only where the maximum may change
                max_rel = err / mag
            tol = mag * rtol
            excess = err - tol  # what atol alone would have to cover
            max_excess = max(max_excess, excess)
            tol += t
            if err > tol or bad:
                mismatched += 1
            if bad or margin < 0.0 or err > margin * tol:
                if bad:
                    ratio = math.inf
                elif tol > 0.0:
                    ratio = err / tol
                else:
                    ratio = math.inf if err > 0.0 else 0.0  # 0/0: an exact zero under a zero tolerance
                if ratio > margin:
                    margin = ratio
                    margin_i = i
            if inv_factor > 0.0 and not one_atol:
                unit = t * inv_factor  # atol_i / factor is u·S_i: excess / unit is the factor needed
                if excess > need * unit:
                    if unit > 0.0:
                        s = excess / unit
                    else:
                        s = math.inf if excess > 0.0 else 0.0
                    need = max(need, s)
            _count(err, box, bits, hist)
    for q in range(4):
        for k in range(hist.size):
            hist[k] += counts[q * width + k]
    return (
        sum_abs,
        n_finite,
        n_bad,
        first_bad,
        worst_i,
        worst,
        max_rel,
        mismatched,
        max_excess,
        margin_i,
        margin,
        need,
    )


@njit(cache=True, inline="always")
def _tolerance(scale: float, magnitude: float, scale_coeff: float, value_coeff: float) -> float:
    """One element's t = scale_coeff·scale + value_coeff·|x|, rounded as the bounds have always been."""
    t = scale_coeff * scale
    if value_coeff != 0.0:
        t += value_coeff * magnitude
    return t


@njit(cache=True, nogil=True)
def row_statistics(rows: Any, scale: Any, scale_coeff: float, value_coeff: float) -> Any:
    """(P, 13) float64: per row of real ``rows``, in ``parity.stats.STATISTICS`` order, mean, std,
    var_zero_mean, min, max, mean_abs, l2, nan_count, inf_count; then the mean, root mean square,
    maximum and 2-norm of the elementwise tolerance t = scale_coeff·scale + value_coeff·|rows|
    (``scale`` of the same shape, or None: those four are then zero), which every bound of a real
    statistic is made of. One read of each element serves both, and t is never an array. The
    variance takes a second pass over the row's deviations from its mean (no cancellation of
    squares); a NaN anywhere in a row makes its min and max NaN, as ``np.min`` would.

    Every sum runs as four interleaved partial sums (element j into sum j mod 4, the four added
    pairwise at the end, the row's last k mod 4 elements after them): one running sum is a chain
    of dependent additions, each waiting for the last, and with five of them the loop ran at the
    adder's latency (docs/decisions.md, "Speed"). The order is fixed by the row alone, so no result
    depends on how a tap is split or on the number of threads. NaN and infinity are counted in a
    second look at the rows whose sums are not finite, which is rare: the first pass only keeps
    what a finite row needs."""
    p, k = rows.shape
    out = np.zeros((p, 13), np.float64)
    body = k - k % 4
    scaled = scale is not None
    for r in range(p):
        x0, x1, x2, x3 = 0.0, 0.0, 0.0, 0.0  # sums of x
        m0, m1, m2, m3 = 0.0, 0.0, 0.0, 0.0  # of |x|
        q0, q1, q2, q3 = 0.0, 0.0, 0.0, 0.0  # of x²
        t0, t1, t2, t3 = 0.0, 0.0, 0.0, 0.0  # of t
        s0, s1, s2, s3 = 0.0, 0.0, 0.0, 0.0  # of t²
        lo0, lo1, lo2, lo3 = math.inf, math.inf, math.inf, math.inf
        hi0, hi1, hi2, hi3 = -math.inf, -math.inf, -math.inf, -math.inf
        h0, h1, h2, h3 = 0.0, 0.0, 0.0, 0.0  # greatest t
        for j in range(0, body, 4):
            a, b, c, d = rows[r, j] * 1.0, rows[r, j + 1] * 1.0, rows[r, j + 2] * 1.0, rows[r, j + 3] * 1.0
            x0, x1, x2, x3 = x0 + a, x1 + b, x2 + c, x3 + d
            m0, m1, m2, m3 = m0 + abs(a), m1 + abs(b), m2 + abs(c), m3 + abs(d)
            q0, q1, q2, q3 = q0 + a * a, q1 + b * b, q2 + c * c, q3 + d * d
            lo0, lo1, lo2, lo3 = min(lo0, a), min(lo1, b), min(lo2, c), min(lo3, d)
            hi0, hi1, hi2, hi3 = max(hi0, a), max(hi1, b), max(hi2, c), max(hi3, d)
            if scaled:
                ta = _tolerance(scale[r, j], abs(a), scale_coeff, value_coeff)
                tb = _tolerance(scale[r, j + 1], abs(b), scale_coeff, value_coeff)
                tc = _tolerance(scale[r, j + 2], abs(c), scale_coeff, value_coeff)
                td = _tolerance(scale[r, j + 3], abs(d), scale_coeff, value_coeff)
                t0, t1, t2, t3 = t0 + ta, t1 + tb, t2 + tc, t3 + td
                s0, s1, s2, s3 = s0 + ta * ta, s1 + tb * tb, s2 + tc * tc, s3 + td * td
                h0, h1, h2, h3 = max(h0, ta), max(h1, tb), max(h2, tc), max(h3, td)
        total, total_abs, squares = (x0 + x1) + (x2 + x3), (m0 + m1) + (m2 + m3), (q0 + q1) + (q2 + q3)
        t_total, t_squares = (t0 + t1) + (t2 + t3), (s0 + s1) + (s2 + s3)
        lo, hi, t_hi = (
            min(lo0, lo1, lo2, lo3),
            max(hi0, hi1, hi2, hi3),
            max(h0, h1, h2, h3),
        )
        for j in range(body, k):
            a = rows[r, j] * 1.0
            total += a
            total_abs += abs(a)
            squares += a * a
            lo, hi = min(lo, a), max(hi, a)
            if scaled:
                t = _tolerance(scale[r, j], abs(a), scale_coeff, value_coeff)
                t_total += t
                t_squares += t * t
                t_hi = max(t_hi, t)
        nans = 0
        infs = 0
        if not (abs(squares) < math.inf and abs(total_abs) < math.inf and abs(t_squares) < math.inf):
            t_hi = 0.0  # a NaN t (a NaN or infinite scale) is the greatest, as the first NaN met
            for j in range(k):
                a = rows[r, j] * 1.0
                if math.isnan(a):
                    nans += 1
                elif math.isinf(a):
                    infs += 1
                if scaled:
                    t = _tolerance(scale[r, j], abs(a), scale_coeff, value_coeff)
                    if t > t_hi or math.isnan(t):
                        t_hi = t
        mean = total / k
        d0, d1, d2, d3 = 0.0, 0.0, 0.0, 0.0
        for j in range(0, body, 4):
            a, b = rows[r, j] * 1.0 - mean, rows[r, j + 1] * 1.0 - mean
            c, d = rows[r, j + 2] * 1.0 - mean, rows[r, j + 3] * 1.0 - mean
            d0, d1, d2, d3 = d0 + a * a, d1 + b * b, d2 + c * c, d3 + d * d
        deviations = (d0 + d1) + (d2 + d3)
        for j in range(body, k):
            a = rows[r, j] * 1.0 - mean
            deviations += a * a
        var = deviations / k
        if nans:
            lo = math.nan
            hi = math.nan
        out[r, 0] = mean
        out[r, 1] = math.sqrt(var)
        out[r, 2] = var
        out[r, 3] = lo
        out[r, 4] = hi
        out[r, 5] = total_abs / k
        out[r, 6] = math.sqrt(squares)
        out[r, 7] = nans
        out[r, 8] = infs
        if scaled:
            out[r, 9] = t_total / k
            out[r, 10] = math.sqrt(t_squares / k)
            out[r, 11] = t_hi
            out[r, 12] = math.sqrt(t_squares)
    return out

import numpy as np
import pytest

from parity.compare import ElementwiseComparison, compare_arrays


def test_identical_arrays_pass_with_zero_error():
    a = np.arange(12.0).reshape(1, 3, 2, 2)
    r = compare_arrays(a, a.copy(), 0.0, 0.0)
    assert r.passed and r.max_abs == 0 and r.mismatched == 0 and r.min_atol_to_pass == 0


def test_rule_is_atol_plus_rtol_times_reference():
    b = np.array([[10.0, 0.0]])
    # |a-b| = 0.2 at b=10 passes with rtol 0.02 (limit 0.2 + atol 0); at b=0 only atol counts.
    assert compare_arrays(np.array([[10.2, 0.0]]), b, 0.0, 0.0201).passed
    assert not compare_arrays(np.array([[10.0, 1e-6]]), b, 0.0, 0.5).passed
    assert compare_arrays(np.array([[10.0, 1e-6]]), b, 1e-6, 0.0).passed


def test_reports_worst_element_and_min_atol():
    b = np.zeros((2, 1, 3, 3))
    a = b.copy()
    a[1, 0, 2, 1] = 0.5
    a[0, 0, 0, 0] = 0.1
    r = compare_arrays(a, b, 0.01, 0.0, tap="t", names=("torch", "reference"))
    assert not r.passed
    assert r.worst_index == [1, 0, 2, 1]
    assert r.max_abs == pytest.approx(0.5)
    assert r.mismatched == 2 and r.mismatch_fraction == pytest.approx(2 / 18)
    assert r.min_atol_to_pass == pytest.approx(0.5)
    assert compare_arrays(a, b, r.min_atol_to_pass, 0.0).passed
    assert "2 / 18 elements" in r.summary() and "index (1, 0, 2, 1)" in r.summary()


def test_min_atol_accounts_for_rtol():
    b = np.array([[100.0, 1.0]])
    a = np.array([[101.0, 1.5]])
    r = compare_arrays(a, b, 0.0, 0.01)
    # element 0 needs 1 - 0.01*100 = 0; element 1 needs 0.5 - 0.01 = 0.49
    assert r.min_atol_to_pass == pytest.approx(0.49)
    assert compare_arrays(a, b, 0.49 + 1e-12, 0.01).passed


def test_complex_difference_is_modulus():
    a = np.array([[3 + 4j]], dtype=np.complex64)
    b = np.array([[0 + 0j]], dtype=np.complex128)
    r = compare_arrays(a, b, 4.99, 0.0)
    assert r.max_abs == pytest.approx(5.0) and not r.passed
    assert compare_arrays(a, b, 5.01, 0.0).passed


def test_nan_on_one_side_fails_even_with_huge_tolerance():
    a = np.array([[1.0, np.nan]])
    b = np.array([[1.0, 2.0]])
    r = compare_arrays(a, b, 1e30, 1e30)
    assert not r.passed and r.nonfinite_mismatch == 1 and r.worst_index == [0, 1]
    assert r.min_atol_to_pass == float("inf")
    assert not compare_arrays(b, a, 1e30, 1e30).passed


def test_matching_nan_and_inf_positions_pass():
    a = np.array([[np.nan, np.inf, -np.inf, 1.0]])
    assert compare_arrays(a, a.copy(), 0.0, 0.0).passed
    b = np.array([[np.nan, -np.inf, -np.inf, 1.0]])
    assert not compare_arrays(a, b, 1.0, 1.0).passed  # opposite infinities differ


def test_streaming_equals_one_shot_and_indexes_across_batches():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 2, 4, 4))
    b = a + rng.normal(scale=1e-3, size=a.shape)
    whole = compare_arrays(a, b, 1e-3, 1e-3)
    acc = ElementwiseComparison("k", "t", "a", "b", 1e-3, 1e-3)
    for i in range(0, 6, 2):
        acc.add(a[i : i + 2], b[i : i + 2])
    part = acc.finish()
    for key in ("max_abs", "max_rel", "mismatched", "min_atol_to_pass", "worst_index"):
        assert getattr(part, key) == getattr(whole, key), key
    assert part.mean_abs == pytest.approx(whole.mean_abs)


def test_shape_mismatch_fails_with_reason():
    r = compare_arrays(np.zeros((1, 2, 3, 3)), np.zeros((1, 2, 3, 4)), 1.0, 1.0, names=("tf", "torch"))
    assert not r.passed and "shape mismatch: tf has (1, 2, 3, 3), torch has (1, 2, 3, 4)" in r.reason


def test_elementwise_atol_and_margin():
    b = np.array([[1.0, 100.0, 0.0]])
    a = b + np.array([[0.5, 0.5, 0.0]])
    atol = np.array([[1.0, 0.25, 0.0]])  # element 1 is out by 2x, element 2 is exact with atol 0
    r = compare_arrays(a, b, atol, 0.0)
    assert not r.passed and r.mismatched == 1
    assert r.margin == pytest.approx(2.0) and r.margin_index == [0, 1] and r.atol == 0.25
    ok = compare_arrays(a, b, atol * 2, 0.0)
    assert ok.passed and ok.margin == pytest.approx(1.0)
    assert "margin 2 at index (0, 1)" in r.summary()


def test_min_factor_to_pass_is_margin_times_factor_without_rtol():
    b = np.ones((1, 1, 2, 2))
    a = b + 3e-6
    acc = ElementwiseComparison("vs_reference", "t", "a", "b", 0.0, 0.0, factor=10.0)
    acc.add(a, b, np.full(b.shape, 1e-6))  # atol = 10 · (1e-7 unit)
    r = acc.finish()
    assert r.margin == pytest.approx(3.0) and r.min_factor_to_pass == pytest.approx(30.0)
    assert not r.passed


def test_margin_across_batches_keeps_the_worst_and_its_index():
    acc = ElementwiseComparison("k", "t", "a", "b", 0.0, 0.0)
    acc.add(np.array([[0.1, 0.0]]), np.zeros((1, 2)), np.array([[1.0, 1.0]]))
    acc.add(np.array([[0.0, 0.9]]), np.zeros((1, 2)), np.array([[1.0, 1.0]]))
    r = acc.finish()
    assert r.passed and r.margin == pytest.approx(0.9) and r.margin_index == [1, 1]


@pytest.mark.parametrize(
    ("a", "b", "agree"),
    [
        (complex(np.nan, 0.0), complex(np.nan, 0.0), True),
        (complex(np.nan, 1.0), complex(np.nan, 1.0), True),
        (complex(np.nan, np.nan), complex(np.nan, np.nan), True),
        (complex(np.inf, 2.0), complex(np.inf, 2.0), True),
        (complex(np.nan, 0.0), complex(5.0, np.nan), False),  # NaN in the other part
        (complex(np.nan, 0.0), complex(np.nan, 1e6), False),  # the finite parts differ
        (complex(np.nan, 0.0), complex(np.nan, np.nan), False),
        (complex(np.inf, 0.0), complex(-np.inf, 0.0), False),
        (complex(np.inf, 2.0), complex(np.inf, 3.0), False),  # widened times 1, both were inf+nanj
        (complex(np.inf, 0.0), complex(np.nan, 0.0), False),
    ],
)
def test_complex_non_finite_values_agree_only_part_by_part(a, b, agree):
    """NaN and Inf must sit at the same places on both sides: for complex values, in the same part.
    Until 2026-12-05 a NaN in any part made two complex values "the same NaN" (nan+1j against
    12345+nanj passed), and the loop's widening (times 1) turned inf+2j and inf+3j both into
    inf+nanj; each pair sits among finite neighbours, under a huge tolerance."""
    xa = np.array([[1.0, a, 2.0]], np.complex64)
    xb = np.array([[1.0, b, 2.0]], np.complex128)
    r = compare_arrays(xa, xb, 1e30, 0.0)
    assert r.passed is agree
    assert r.nonfinite_mismatch == (0 if agree else 1)
    if not agree:
        assert r.margin == np.inf and r.margin_index == [0, 1]


def test_nan_mismatch_has_infinite_margin():
    r = compare_arrays(np.array([[np.nan]]), np.array([[1.0]]), 1.0, 0.0)
    assert r.margin == float("inf") and not r.passed


@pytest.mark.parametrize("atol_shape", [(), (1, 3, 1, 1), (2, 3, 4, 5)])
def test_chunks_give_the_whole_array_result(monkeypatch, atol_shape):
    """Large taps run in chunks, a core each; where a chunk ends must not change any number kept, even
    with a NaN mismatch, an exact zero and matching infinities in different chunks."""
    from parity import compare, kernels

    rng = np.random.default_rng(1)
    b = rng.normal(size=(2, 3, 4, 5))
    a = (b + rng.normal(scale=1e-3, size=b.shape)).astype(np.float32)
    a.flat[3], b.flat[3] = np.inf, np.inf
    b.flat[40] = a.flat[40]
    a.flat[77] = np.nan
    atol = np.abs(rng.normal(scale=1e-3, size=atol_shape)) if atol_shape else 1e-3

    def run(block: int) -> compare.ComparisonResult:
        monkeypatch.setattr(kernels, "CHUNK", block)
        acc = ElementwiseComparison("k", "t", "a", "b", 0.0, 1e-4, factor=2.0)
        acc.add(a, b, atol)
        acc.add(a[:1], b[:1], atol if not atol_shape else np.broadcast_to(atol, b.shape)[:1])
        return acc.finish()

    whole, blocked = run(1 << 20), run(7)
    for key, value in whole.to_dict().items():
        if isinstance(value, float):
            assert blocked.to_dict()[key] == pytest.approx(value, rel=1e-12), key
        else:
            assert blocked.to_dict()[key] == value, key
    assert blocked.histogram == whole.histogram and sum(whole.histogram) == (120 - 3) + (60 - 2)
    assert whole.nonfinite_mismatch == 1 and whole.worst_index == [1, 0, 3, 2]  # the NaN, flat 77


def test_a_scalar_compares_like_any_tap():
    """0-d values (log_scale's gradient) compare with the empty index, batch after batch."""
    acc = ElementwiseComparison("k", "t", "a", "b", 1e-3, 0.0)
    acc.add(np.asarray(1.0), np.asarray(1.0005))
    acc.add(np.asarray(2.0), np.asarray(2.01))
    r = acc.finish()
    assert not r.passed and r.mismatched == 1 and r.numel == 2
    assert r.worst_index == [] and r.max_abs == pytest.approx(0.01)


def _rule_in_numpy(a, b, atol, rtol, factor):
    """The rule and its numbers written out directly in NumPy (whole arrays, no special cases beyond
    the documented ones): what the compiled loop must reproduce."""
    wide = np.complex128 if np.iscomplexobj(a) or np.iscomplexobj(b) else np.float64
    a64, b64 = np.asarray(a, wide), np.asarray(b, wide)
    atol = np.broadcast_to(np.asarray(atol, np.float64), a.shape)
    both = np.isfinite(a64) & np.isfinite(b64)

    def same_part(p, q):
        return (np.isnan(p) & np.isnan(q)) | (p == q)

    same = ~np.isfinite(a64) & ~np.isfinite(b64) & same_part(a64.real, b64.real) & same_part(a64.imag, b64.imag)
    bad = ~both & ~same
    with np.errstate(invalid="ignore", over="ignore"):
        err = np.where(both, np.abs(a64 - b64), 0.0)
        mag = np.where(both, np.abs(b64), 0.0)
    tol = atol + rtol * mag
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(tol > 0, err / tol, np.where(err > 0, np.inf, 0.0))
        need = np.where(atol > 0, (err - rtol * mag) / (atol / factor), np.where(err > rtol * mag, np.inf, 0.0))
        rel = np.where(mag > 0, err / mag, 0.0)
    ratio[bad] = np.inf
    worst = np.argmax(bad) if bad.any() else np.argmax(err)
    nonzero = err[err > 0]
    bins = np.clip(np.frexp(nonzero)[1] + 54, 0, 82)
    return {
        "mismatched": int(np.count_nonzero((err > tol) | bad)),
        "worst_index": [int(i) for i in np.unravel_index(worst, a.shape)],
        "max_abs": np.inf if bad.any() else float(err.max()),
        "margin_index": [int(i) for i in np.unravel_index(np.argmax(ratio), a.shape)],
        "margin": float(ratio.max()),
        "max_rel": float(rel.max()),
        "min_atol_to_pass": np.inf if bad.any() else max(float((err - rtol * mag).max()), 0.0),
        "min_factor_to_pass": np.inf if bad.any() else max(float(need.max()), 0.0),
        "mean_abs": float(err[both].mean()),
        "histogram": np.bincount(bins, minlength=83).tolist(),
    }


@pytest.mark.parametrize(
    ("dtype_a", "dtype_b"),
    [
        (np.float32, np.float64),
        (np.float32, np.float32),
        (np.float64, np.float64),
        (np.complex64, np.complex128),
        (np.complex64, np.complex64),
        (np.int16, np.float64),  # anything else is compared in float64
    ],
)
@pytest.mark.parametrize("atol_kind", ["one", "per_element", "with_zeros"])
def test_compiled_loop_equals_the_rule_written_in_numpy(dtype_a, dtype_b, atol_kind):
    rng = np.random.default_rng(7)
    shape = (3, 4, 16, 16)
    b = rng.normal(size=shape) * 10.0 ** rng.integers(-8, 4, size=shape)
    if np.issubdtype(dtype_b, np.complexfloating):
        b = b + 1j * rng.normal(size=shape)
    a = b * (1 + rng.normal(scale=3e-6, size=shape)) + rng.normal(scale=1e-7, size=shape)
    a.flat[::97] = b.flat[::97]  # exact zeros
    a.flat[50], b.flat[50] = np.nan, np.nan  # the same NaN: no difference
    if np.issubdtype(dtype_a, np.integer):
        base = np.round(np.nan_to_num(b) * 1e3).clip(-1000, 1000)
        a, b = base, base + rng.integers(-1, 2, size=shape)
    a, b = a.astype(dtype_a), b.astype(dtype_b)
    atol = {"one": 2e-7, "per_element": np.abs(rng.normal(scale=2e-7, size=shape))}.get(
        atol_kind, np.where(rng.random(shape) < 0.1, 0.0, 2e-7)
    )
    got = compare_arrays(a, b, atol, 1e-6)
    got_factored = ElementwiseComparison("k", "t", "a", "b", 0.0, 1e-6, factor=4.0)
    got_factored.add(a, b, atol)
    # The runner hands the error scale and factor·u separately (``times``): the same comparison.
    got_times = ElementwiseComparison("k", "t", "a", "b", 0.0, 1e-6, factor=4.0)
    got_times.add(a, b, np.asarray(atol) * 2.0**20, times=2.0**-20)
    want = _rule_in_numpy(a, b, atol, 1e-6, 4.0)
    assert got_times.finish().to_dict() == got_factored.finish().to_dict()
    assert want["mismatched"] > 0 and want["histogram"] != [0] * 83  # the case exercises the numbers
    for key, value in want.items():
        if key == "min_factor_to_pass":
            assert got_factored.finish().min_factor_to_pass == pytest.approx(value, rel=1e-12), key
        elif isinstance(value, float):
            assert getattr(got, key) == pytest.approx(value, rel=1e-12), key
        else:
            assert getattr(got, key) == value, key


@pytest.mark.parametrize(("dtype_a", "dtype_b"), [(np.float32, np.float64), (np.complex64, np.complex128)])
@pytest.mark.parametrize("atol_kind", ["one", "per_element"])
@pytest.mark.parametrize("late", [256 * 8, 256 * 10 + 100, 256 * 12 - 1])
def test_a_passing_comparison_finds_each_maximum_wherever_it_lies(dtype_a, dtype_b, atol_kind, late):
    """The loop screens blocks of 256 elements on vector registers and walks element by element
    only through a block that could change a maximum, a count or an index (parity.kernels._quiet).
    In a passing comparison of ReLU-like data, after two elements that set every maximum, each new
    maximum is met alone, at a block's first, middle or last element, and is the new maximum of
    one number only: the margin, the difference, the relative difference, the excess over
    rtol·|b| (one atol), the factor (atol per element); then an agreeing NaN. The numbers are the
    rule's in NumPy."""
    rng = np.random.default_rng(late)
    n = 256 * 20 + 37
    b = np.maximum(rng.normal(size=n), 0.0)  # about half exact zeros, scattered
    if np.issubdtype(dtype_b, np.complexfloating):
        b = b + 1j * np.maximum(rng.normal(size=n), 0.0)
    a = b * (1 + rng.normal(scale=1e-8, size=n))
    atol = np.full(n, 1e-5) if atol_kind == "one" else 1e-5 * (1 + rng.random(n))
    planted = [
        (late - 1800, 1e-3, 1e-3 + 5e-6),  # margin 0.5, relative 5e-3, excess 5e-6, factor 2 at most
        (late - 1500, 1e4, 1e4 + 5e-3),  # margin 0.5, difference 5e-3
        (late - 1200, 1e3, 1e3 + 0.951e-3),  # margin about 0.93 (rtol·|b| is 1e-3)
        (late - 600, 1e5, 1e5 + 3 * 2.0**-7),  # difference 0.0234 (three float32 steps), margin 0.23
        (late, 1e-8, 1e-8 * (1 + 1e-2)),  # relative 1e-2
        (late + 600, 0.0, 8e-6),  # excess 8e-6, margin 0.8 at most
        (late + 1200, 0.0, 0.85e-7),  # factor 3.4 under the atol of 1e-7 below, margin 0.85
        (late + 1800, np.nan, np.nan),
    ]
    for i, bi, ai in planted:
        b[i], a[i] = bi, ai
    if atol_kind != "one":
        atol[late + 1200] = 1e-7
    a, b = a.astype(dtype_a), b.astype(dtype_b)
    got = ElementwiseComparison("k", "t", "a", "b", 0.0, 1e-6, factor=4.0)
    got.add(a.reshape(1, n), b.reshape(1, n), atol.reshape(1, n) if atol_kind != "one" else 1e-5)
    r = got.finish()
    want = _rule_in_numpy(a.reshape(1, n), b.reshape(1, n), atol.reshape(1, n), 1e-6, 4.0)
    assert want["mismatched"] == 0 and want["worst_index"] == [0, late - 600]
    assert want["margin_index"] == [0, late - 1200] and want["max_rel"] == pytest.approx(1e-2, rel=1e-3)
    assert want["min_atol_to_pass"] == pytest.approx(8e-6, rel=1e-3)
    if atol_kind == "one":
        del want["min_factor_to_pass"]  # one atol for all: the factor comes from the excess over it
    else:
        assert want["min_factor_to_pass"] == pytest.approx(3.4, rel=1e-3)
    for key, value in want.items():
        if isinstance(value, float):
            assert getattr(r, key) == pytest.approx(value, rel=1e-12), key
        else:
            assert getattr(r, key) == value, key

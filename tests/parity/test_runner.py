"""The run loop on small NumPy backends: no framework needed to show each check catching a divergence."""

import re

import numpy as np
import pytest

from parity.backend import Backend
from parity.runner import run_parity
from parity.stages import Stage
from parity.taps import TapSpec
from parity.tolerances import load_tolerances

from .test_tolerances import BASE

TAPS = ["toy.in", "toy.hidden", "toy.out"]
FACTOR = 64.0
TOL_TEXT = (
    BASE
    + f"""
[[family]]
pattern = "toy.*"
factor = {FACTOR}
"""
)
U = 2.0**-24


class Toy(Backend):
    """out = tanh(relu(x·w)·2); float64 when precision says so."""

    name = "toy"
    precision = "float64"
    scale = 2.0

    def __init__(self, config, weights, device="cpu"):
        super().__init__(config, weights, device)
        self.w = np.asarray(weights["w"], dtype=self.precision)

    def forward(self, batch):
        x = np.asarray(batch, dtype=self.precision)
        h = np.maximum(np.einsum("bchw,cd->bdhw", x, self.w), 0)
        return {"toy.in": x, "toy.hidden": h, "toy.out": np.tanh(h * self.scale)}

    def effective_config(self):
        return {"scale": self.scale}

    def environment(self):
        return {"framework": "numpy", "device": self.device}

    def export_weights(self):
        return {"w": self.w.astype(np.float32)}


class Toy32(Toy):
    precision = "float32"


class WrongScale(Toy32):
    def forward(self, batch):
        taps = super().forward(batch)
        taps["toy.out"] = np.tanh(taps["toy.hidden"] * 2.01)
        return taps


class MissingHidden(Toy32):
    def forward(self, batch):
        taps = super().forward(batch)
        del taps["toy.hidden"]
        return taps


class ConfigDrift(Toy32):
    scale = 3.0


@pytest.fixture
def tol(tmp_path):
    p = tmp_path / "t.toml"
    p.write_text(TOL_TEXT)
    return load_tolerances(p, known_taps=TAPS)


def _batches(n=3, b=2):
    rng = np.random.default_rng(0)
    return [rng.normal(size=(b, 3, 4, 4)).astype(np.float32) for _ in range(n)]


def _expected(b):
    return [TapSpec("toy.in", (b, 3, 4, 4)), TapSpec("toy.hidden", (b, 5, 4, 4)), TapSpec("toy.out", (b, 5, 4, 4))]


W = {"w": np.random.default_rng(1).normal(size=(3, 5)).astype(np.float32)}


def _run(tol, **others):
    backends = {"reference": Toy(None, W)}
    backends.update({n: cls(None, W) for n, cls in others.items()})
    return run_parity(backends, _batches(), tol, expected=_expected, reference="reference")


def test_clean_run_passes_with_all_comparisons(tol):
    res = _run(tol, a=Toy32, b=Toy32)
    assert res.passed and res.first_divergence is None
    assert res.batches == 3 and res.groups == 6
    kinds = {(c.kind, c.a, c.b) for t in res.taps for c in t.comparisons}
    assert kinds == {
        ("vs_reference", "a", "reference"),
        ("vs_reference", "b", "reference"),
        ("backend_vs_backend", "b", "a"),
    }
    assert [t.name for t in res.taps] == TAPS
    assert res.statistics["a"]["toy.out"]["mean"].shape == (6 * 5,)


def test_divergence_is_localised_and_blamed(tol):
    res = _run(tol, good=Toy32, bad=WrongScale)
    assert not res.passed
    fd = res.first_divergence
    assert fd["tap"] == "toy.out" and fd["blamed"] == ["bad"]
    assert set(fd["backends"]) == {"bad", "reference", "good"}
    bad = next(c for c in res.taps[2].comparisons if c.a == "bad" and c.kind == "vs_reference")
    assert not bad.passed and bad.mismatch_fraction > 0 and bad.worst_index is not None
    assert "first diverging tap: toy.out" in res.describe_failure()


def test_missing_tap_reported_where_it_goes_missing(tol):
    res = _run(tol, good=Toy32, bad=MissingHidden)
    assert res.first_divergence["tap"] == "toy.hidden"
    assert res.first_divergence["blamed"] == ["bad"]
    reasons = [c.reason for c in res.taps[1].comparisons if not c.passed]
    assert "tap missing from bad" in reasons


def test_wrong_shape_against_expected_list(tol):
    class Flat(Toy32):
        def forward(self, batch):
            taps = super().forward(batch)
            taps["toy.hidden"] = taps["toy.hidden"].reshape(taps["toy.hidden"].shape[0], -1)
            return taps

    res = _run(tol, flat=Flat)
    assert res.first_divergence["tap"] == "toy.hidden"
    assert any("expected shape (2, 5, 4, 4)" in (c.reason or "") for c in res.taps[1].comparisons)


def test_a_tap_the_expected_list_lacks_is_blamed_on_the_backend_that_gives_it(tol):
    """Only the producer is wrong: the reference and the other backend were blamed too, for not
    giving it (until 2026-12-05). Without a tap list nobody can tell which side is right."""

    class Extra(Toy32):
        def forward(self, batch):
            taps = super().forward(batch)
            return {**taps, "toy.extra": taps["toy.out"]}

    res = _run(tol, good=Toy32, extra=Extra)
    fd = res.first_divergence
    assert fd["tap"] == "toy.extra" and fd["blamed"] == ["extra"], fd
    extra = next(t for t in res.taps if t.name == "toy.extra")
    assert [(c.kind, c.a) for c in extra.comparisons] == [("structure", "extra")]
    unlisted = run_parity({"a": Toy32(None, W), "extra": Extra(None, W)}, _batches(), tol)
    assert unlisted.first_divergence["tap"] == "toy.extra" and unlisted.first_divergence["blamed"] == ["a"]


def test_nan_in_one_backend_fails_even_when_stats_would_hide_it(tol):
    class OneNan(Toy32):
        def forward(self, batch):
            taps = super().forward(batch)
            taps["toy.out"] = taps["toy.out"].copy()
            taps["toy.out"][0, 0, 0, 0] = np.nan
            return taps

    res = _run(tol, n=OneNan)
    assert res.first_divergence["tap"] == "toy.out"
    c = next(c for c in res.taps[2].comparisons if c.a == "n")
    assert c.nonfinite_mismatch == 3  # one per batch


def test_config_mismatch_stops_before_any_forward(tol):
    calls = []

    class Spy(ConfigDrift):
        def forward(self, batch):
            calls.append(1)
            return super().forward(batch)

    res = _run(tol, drift=Spy)
    assert res.verdict == "config_mismatch" and not calls and not res.taps
    assert res.config_diff == {"scale": {"reference": 2.0, "drift": 3.0}}
    assert "scale: reference=2.0, drift=3.0" in res.describe_failure()


def test_without_reference_pairs_still_compare(tol):
    res = run_parity({"a": Toy32(None, W), "b": WrongScale(None, W)}, _batches(), tol, reference=None)
    assert res.first_divergence["tap"] == "toy.out" and res.first_divergence["blamed"] == []


def test_samples_kept_only_from_first_batch(tol):
    res = _run(tol, a=Toy32)
    assert res.samples["a"]["toy.out"].shape[0] == 2
    np.testing.assert_array_equal(res.samples["reference"]["toy.in"], _batches()[0][:2])


def test_tap_selection_compares_only_matching_taps(tol):
    backends = {"reference": Toy(None, W), "bad": WrongScale(None, W)}
    res = run_parity(backends, _batches(), tol, expected=_expected, reference="reference", taps=["toy.in", "toy.h*"])
    assert [t.name for t in res.taps] == ["toy.in", "toy.hidden"] and res.passed
    full = run_parity(backends, _batches(), tol, expected=_expected, reference="reference")
    assert full.first_divergence["tap"] == "toy.out"


def test_tap_pattern_matching_nothing_is_an_error(tol):
    from parity.errors import ParityInputError

    with pytest.raises(ParityInputError, match=r"option taps: pattern 'toy\.outt' matches no tap"):
        run_parity({"reference": Toy(None, W)}, _batches(), tol, reference="reference", taps=["toy.outt"])


def test_named_reference_must_exist(tol):
    from parity.errors import ParityInputError

    with pytest.raises(ParityInputError, match="reference backend 'ref64' is not among the backends"):
        run_parity({"a": Toy32(None, W)}, _batches(), tol, reference="ref64")


class Noisy(Toy32):
    """Toy32 whose toy.out is off the exact value by ``level`` times the tolerance unit (u·S)."""

    level = 0.0

    def forward(self, batch):
        taps = super().forward(batch)
        exact = Toy(None, W).forward(batch)["toy.out"]
        unit = U * np.abs(exact).max(axis=(-2, -1), keepdims=True)  # u·S, S the patch magnitude
        sign = np.where(np.arange(exact.size).reshape(exact.shape) % 2, 1.0, -1.0)
        taps["toy.out"] = (exact + self.level * FACTOR * unit * sign).astype(np.float32)
        return taps


def _noisy(level):
    return type(f"Noisy{level}", (Noisy,), {"level": level})


def test_every_comparison_carries_its_margin(tol):
    res = _run(tol, a=_noisy(0.5))
    c = next(c for c in res.taps[2].comparisons if c.a == "a" and c.kind == "vs_reference")
    assert c.passed and 0.3 < c.margin < 0.6 and c.factor == FACTOR
    assert c.min_factor_to_pass == pytest.approx(c.margin * FACTOR, rel=0.05)
    assert c.margin_index is not None


def test_blame_needs_a_clear_margin_over_the_other_backend(tol):
    """A backend just over its tolerance while the other scatters alike is not blamed."""
    alike = _run(tol, a=_noisy(1.3), b=_noisy(0.9))
    fd = alike.first_divergence
    assert not alike.passed and fd["tap"] == "toy.out"
    assert fd["blamed"] == [] and fd["indistinguishable"] == ["a"]
    assert "scatters alike" in fd["notes"][0]
    assert "off the reference: none singled out" in alike.describe_failure()
    clear = _run(tol, a=_noisy(1.3), b=_noisy(0.1))
    assert clear.first_divergence["blamed"] == ["a"] and clear.first_divergence["indistinguishable"] == []
    assert clear.first_divergence["margins"]["a"] > 2 * clear.first_divergence["margins"]["b"]


def test_all_backends_off_a_reference_they_agree_on_is_flagged(tol):
    class BothWrong(Toy32):
        def forward(self, batch):
            taps = super().forward(batch)
            taps["toy.out"] = np.tanh(taps["toy.hidden"] * 2.01).astype(np.float32)
            return taps

    res = _run(tol, a=BothWrong, b=BothWrong)
    assert sorted(res.first_divergence["blamed"]) == ["a", "b"]
    assert any("suspect the reference" in n for n in res.first_divergence["notes"])


class ScaledToy(Toy):
    """A reference that offers error scales: 1e6 times its values at toy.out, nothing elsewhere."""

    def error_scales(self, batch, taps):
        return {"toy.out": 1e6 * np.abs(taps["toy.out"]) + 1e-30}


def test_tolerances_follow_the_arbiters_error_scales(tol):
    backends = {"reference": ScaledToy(None, W), "bad": WrongScale(None, W)}
    res = run_parity(backends, _batches(), tol, expected=_expected, reference="reference")
    assert res.passed, res.describe_failure()  # 1e6·u·|v| covers the wrong scale at toy.out
    assert [t.scale for t in res.taps] == ["magnitude", "magnitude", "model"]
    strict = run_parity(
        {"reference": Toy(None, W), "bad": WrongScale(None, W)},
        _batches(),
        tol,
        expected=_expected,
        reference="reference",
    )
    assert not strict.passed


@pytest.mark.parametrize("special", [np.nan, np.inf])
def test_a_non_finite_value_both_sides_agree_on_leaves_its_samples_tolerance_finite(tol, special):
    """Without an arbiter's scales each element's scale is its sample's largest |value|: a NaN or an
    infinity both sides share must not make that largest value NaN or infinite, which let a 2x error
    across the rest of the sample pass (until 2026-12-05)."""

    class Special(Toy32):
        def forward(self, batch):
            taps = super().forward(batch)
            taps["toy.out"] = taps["toy.out"].copy()
            taps["toy.out"][0, 0, 0, 0] = special
            return taps

    class SpecialDoubled(Special):
        def forward(self, batch):
            taps = super().forward(batch)
            taps["toy.out"][0, :, 1:] *= 2.0  # sample 0 only, the special value left as it is
            return taps

    res = run_parity({"a": Special(None, W), "b": SpecialDoubled(None, W)}, _batches(), tol, reference=None)
    assert res.first_divergence is not None and res.first_divergence["tap"] == "toy.out"
    out = next(t for t in res.taps if t.name == "toy.out").comparisons[0]
    assert out.nonfinite_mismatch == 0 and out.mismatched > 0 and np.isfinite(out.atol)
    same = run_parity({"a": Special(None, W), "b": Special(None, W)}, _batches(), tol, reference=None)
    assert same.passed, same.describe_failure()


@pytest.mark.parametrize(
    ("bad", "counts"),
    [
        (np.nan, "1 NaN, 0 infinite and 0 negative"),
        (np.inf, "0 NaN, 1 infinite and 0 negative"),
        (-1.0, "0 NaN, 0 infinite and 1 negative"),
    ],
)
def test_an_arbiters_error_scale_that_is_not_finite_and_non_negative_is_refused(tol, bad, counts):
    """No element fails under a NaN or infinite tolerance: an arbiter whose error_scales hold one
    would pass any difference there (a 1e6 error did, until 2026-12-05). The run is refused as bad
    input, naming the backend, the tap and the first element; a negative scale too."""
    from parity.runner import InvalidErrorScaleError

    class BadScale(Toy):
        def error_scales(self, batch, taps):
            s = np.abs(taps["toy.out"]) + 1.0
            s[1, 2, 3, 0] = bad
            return {"toy.out": s}

    class Far(Toy32):
        def forward(self, batch):
            taps = super().forward(batch)
            taps["toy.out"] = taps["toy.out"].copy()
            taps["toy.out"][1, 2, 3, 0] += 1e6
            return taps

    message = (
        rf"backend 'reference' gave an error scale for tap 'toy.out' with {counts} of its 160 elements "
        r"\(the first at toy.out\[1, 2, 3, 0\]\)"
    )
    with pytest.raises(InvalidErrorScaleError, match=message):
        run_parity({"reference": BadScale(None, W), "a": Far(None, W)}, _batches(), tol, reference="reference")


def test_the_batch_size_does_not_come_from_a_tap_without_a_batch_axis(tol):
    """The tap list expected of a batch is built for its number of groups. That number was read from
    the first tap of the first backend, so a backend that gave a weight (or the probe) first made
    every batched tap of every backend a shape failure (until 2026-12-05)."""
    from parity.batch import random_batch
    from parity.config import ModelConfig
    from parity.runner import _batch_size

    class WeightFirst(Toy):
        def forward(self, batch):
            return {"toy.w": self.w.copy(), **super().forward(batch)}

    class WeightFirst32(WeightFirst, Toy32):
        pass

    def expected(b):
        return [TapSpec("toy.w", (3, 5)), *_expected(b)]

    backends = {"a": WeightFirst32(None, W), "reference": WeightFirst(None, W)}
    res = run_parity(backends, _batches(b=2), tol, expected=expected, reference="reference")
    assert res.passed, res.describe_failure()
    assert res.groups == 6
    batch = random_batch(ModelConfig(), 3, seed=0)
    assert _batch_size(batch, {"t": {"input.probe": batch.probe, "input.x": batch.x}}) == 3


@pytest.mark.parametrize("listed", [[], ["input.x"]])
def test_a_backend_that_exposes_no_computed_tap_fails_instead_of_passing_unchecked(tmp_path, listed):
    """Taps a backend declares it does not expose are left out, not failed; a tap list that came out
    empty, or holds the copied-through inputs alone, compared nothing the backend computes and passed
    (until 2026-12-05). It fails at the first computed tap, blamed on that backend."""
    path = tmp_path / "t.toml"
    path.write_text(TOL_TEXT + '[[family]]\npattern = "input.*"\nfactor = 1.0\n')
    tol = load_tolerances(path, known_taps=["input.x", *TAPS])

    class WithInput(Toy):
        def forward(self, batch):
            taps = super().forward(batch)
            return {"input.x": taps.pop("toy.in"), **taps}

    class WithInput32(WithInput, Toy32):
        pass

    class Hides(WithInput32):
        def exposed_taps(self):
            return listed

        def forward(self, batch):
            return {t: v for t, v in super().forward(batch).items() if t in listed}

    def expected(b):
        return [TapSpec("input.x", (b, 3, 4, 4)), *_expected(b)[1:]]

    def run(taps=None, **backends):
        return run_parity(backends, _batches(), tol, expected=expected, reference="reference", taps=taps)

    res = run(reference=WithInput(None, W), a=WithInput32(None, W), hollow=Hides(None, W))
    fd = res.first_divergence
    assert not res.passed and fd["tap"] == "toy.hidden" and fd["blamed"] == ["hollow"]
    assert "hollow gave no computed tap at all (its exposed_taps() lists none of them" in res.describe_failure()
    assert run(reference=WithInput(None, W), a=WithInput32(None, W)).passed
    alone = run_parity({"hollow": Hides(None, W)}, _batches(), tol, expected=expected)
    assert not alone.passed and alone.first_divergence["blamed"] == ["hollow"]
    inputs = run(["input.*"], reference=WithInput(None, W), hollow=Hides(None, W))  # asks for nothing computed
    assert inputs.passed == (listed == ["input.x"]), inputs.describe_failure()
    assert inputs.compared_nothing == (listed == [])  # then a failure too: nothing at all was compared


def test_an_element_of_a_tap_without_a_batch_axis_is_indexed_within_its_batch(tol):
    """Indices count the rows of earlier batches on axis 0; for a weight's gradient or the probe that
    axis is no batch's, and an element of batch 1 was reported at [3, 0] of a (3, 5) tap (until
    2026-12-05). It is indexed within its own batch's tensor, and the report says which batch."""

    class Weighted(Toy):
        def forward(self, batch):
            return {**super().forward(batch), "toy.w": self.w * float(batch.sum() != 0)}

    class Weighted32(Weighted, Toy32):
        calls = 0

        def forward(self, batch):
            taps = super().forward(batch)
            self.calls += 1
            if self.calls == 2:  # batch 1 only
                taps["toy.w"] = taps["toy.w"].copy()
                taps["toy.w"][2, 4] += 1.0
                taps["toy.out"] = taps["toy.out"].copy()
                taps["toy.out"][1, 0, 0, 0] += 1.0
            return taps

    def expected(b):
        return [*_expected(b), TapSpec("toy.w", (3, 5))]

    res = run_parity(
        {"reference": Weighted(None, W), "a": Weighted32(None, W)},
        _batches(b=2),
        tol,
        expected=expected,
        reference="reference",
    )
    w = next(c for t in res.taps if t.name == "toy.w" for c in t.comparisons)
    assert (w.worst_index, w.worst_batch, w.margin_index, w.margin_batch) == ([2, 4], 1, [2, 4], 1)
    assert "greatest abs difference 1 at index (2, 4) of batch 1" in w.summary()
    out = next(c for t in res.taps if t.name == "toy.out" for c in t.comparisons)
    assert (out.worst_index, out.worst_batch) == ([3, 0, 0, 0], 1)  # rows of batch 0 counted first


def test_a_run_that_compares_nothing_fails_saying_so(tol):
    """One backend and no baseline: every tap "agreed" with nothing, and the run passed."""
    res = run_parity({"reference": Toy(None, W)}, _batches(), tol, expected=_expected, reference="reference")
    assert res.compared_nothing and res.verdict == "fail"
    assert res.describe_failure().startswith("nothing was compared: reference ran; compare two backends")
    gone = run_parity(
        {"reference": Toy(None, W)}, _batches(), tol, reference="reference", unavailable={"torch": "ImportError: x"}
    )
    assert "nothing was compared: reference ran, torch unavailable (ImportError: x)" in gone.describe_failure()
    assert _run(tol, a=Toy32).passed
    empty = run_parity({"reference": Toy(None, W), "a": Toy32(None, W)}, [], tol, expected=_expected)
    assert empty.batches == 0 and empty.compared_nothing and empty.verdict == "fail"


def test_a_float32_arbiter_is_refused(tol):
    """The arbiter's tolerances are float64's: a float32 backend named reference failed everything
    with atol of 1e-14 (until 2026-12-05)."""
    from parity.errors import ParityInputError

    with pytest.raises(ParityInputError, match=r"reference backend 'a' computes in float32; the arbiter must be"):
        run_parity({"a": Toy32(None, W), "b": Toy32(None, W)}, _batches(), tol, reference="a")


def test_a_missing_tap_in_one_backend_does_not_drop_others_rows(tol):
    """Every batch compares every element, whichever backend ran last (the loop must not rebind the
    tap selection to the last backend's taps)."""
    res = run_parity(
        {"reference": Toy(None, W), "good": Toy32(None, W), "bad": MissingHidden(None, W)},
        _batches(n=3, b=2),
        tol,
        expected=_expected,
        reference="reference",
        taps=["toy.*"],
    )
    good = next(c for c in res.taps[1].comparisons if c.a == "good" and c.kind == "vs_reference")
    assert good.numel == 3 * 2 * 5 * 4 * 4
    assert res.statistics["good"]["toy.hidden"]["mean"].shape == (3 * 2 * 5,)


def test_statistic_tolerances_are_recorded_per_backend(tol):
    res = _run(tol, a=Toy32)
    bounds = res.statistic_tolerances["a"]["toy.out"]
    assert set(bounds) == set(res.statistics["a"]["toy.out"])
    assert np.all(bounds["mean"] > 0) and np.all(bounds["nan_count"] == 0.5)
    # The float64 reference's own bounds use float64's unit roundoff, plus one float32 step of the
    # stored statistic: far tighter than a float32 backend's.
    assert np.all(res.statistic_tolerances["reference"]["toy.out"]["mean"] < 0.1 * bounds["mean"])


class Crashes(Toy32):
    """A backend whose forward raises on the second batch (a bug in it, not bad input)."""

    def __init__(self, config, weights, device="cpu"):
        super().__init__(config, weights, device)
        self.calls = 0

    def forward(self, batch):
        self.calls += 1
        if self.calls == 2:
            raise ZeroDivisionError("the backend's own bug")
        return super().forward(batch)


def test_a_crashing_backend_is_reported_with_its_traceback_and_the_others_still_compared(tol):
    res = _run(tol, good=Toy32, other=Toy32, bad=Crashes)
    assert res.verdict == "error" and not res.passed
    crash = res.backends["bad"].crashed
    assert crash is not None and "in batch 1" in crash and "ZeroDivisionError: the backend's own bug" in crash
    assert "Traceback" in crash
    kinds = {(c.kind, c.a, c.b) for t in res.taps for c in t.comparisons}
    assert ("vs_reference", "good", "reference") in kinds and ("backend_vs_backend", "other", "good") in kinds
    assert not any("bad" in (c.a, c.b) for t in res.taps for c in t.comparisons)
    assert res.first_divergence is None  # the survivors agree
    good = next(c for c in res.taps[2].comparisons if c.a == "good" and c.kind == "vs_reference")
    assert good.numel == 3 * 2 * 5 * 4 * 4  # every batch of the survivors was compared
    assert "backend bad crashed: ZeroDivisionError: the backend's own bug" in res.describe_failure()


class TensorLike:
    """What a framework's tensor is to the harness: has a shape, is not a NumPy array."""

    __module__ = "torch"
    shape = (2, 5, 4, 4)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (TensorLike(), r"gave tap 'toy.out' as a torch.TensorLike, not a NumPy array \(convert on the way out"),
        ([[1.0, 2.0]], r"gave tap 'toy.out' as a builtins.list, not a NumPy array"),
        (np.array([[1.0, None]], dtype=object), r"gave tap 'toy.out' of dtype object; a tap holds numbers"),
    ],
)
def test_a_tap_that_is_not_a_numpy_array_of_numbers_is_that_backends_crash_named(tol, value, message):
    """A tensor, a list or an object array reached the comparison and raised an AttributeError there,
    out of the run, naming neither backend nor tap (until 2026-12-05)."""

    class Returns(Toy32):
        def forward(self, batch):
            return {**super().forward(batch), "toy.out": value}

    res = _run(tol, good=Toy32, odd=Returns)
    assert res.verdict == "error" and res.backends["good"].crashed is None
    assert re.search(r"TypeError: backend 'odd': forward\(\) " + message, res.backends["odd"].crashed)
    scalar = type("Scalar", (Toy32,), {"forward": lambda self, b: {**Toy32.forward(self, b), "toy.s": np.float32(2)}})
    assert _run(tol, a=scalar).backends["a"].crashed is None  # a NumPy scalar is a 0-d array


@pytest.mark.parametrize("shape", [(2, 5, 0, 0), (0,)])
def test_an_empty_tap_fails_its_structure_and_the_run_goes_on(tol, shape):
    """The statistics of an empty tap raised out of the run (until 2026-12-05): now it is a shape
    failure at that tap, with or without a tap list to check it against."""

    class Empty(Toy32):
        def forward(self, batch):
            return {**super().forward(batch), "toy.out": np.zeros(shape, np.float32)}

    for expected in (_expected, None):
        res = run_parity(
            {"reference": Toy(None, W), "e": Empty(None, W)}, _batches(), tol, expected=expected, reference="reference"
        )
        assert not res.passed and res.first_divergence["tap"] == "toy.out", res.describe_failure()
        assert res.first_divergence["blamed"] == ["e"]
        assert f"e gives an empty tap, shape {shape}: nothing to compare" in res.describe_failure()
        assert "toy.out" not in res.statistics["e"] and "toy.hidden" in res.statistics["e"]


def test_bad_input_raised_by_a_backend_is_not_a_crash(tol):
    from parity.errors import ParityInputError

    class Refuses(Toy32):
        def forward(self, batch):
            raise ParityInputError("batch 'x' has the wrong dtype")

    with pytest.raises(ParityInputError, match="wrong dtype"):
        _run(tol, r=Refuses)


class Overflows(Toy):
    """A reference whose toy.out goes non-finite, or beyond float32's range, from finite inputs."""

    value = np.inf

    def forward(self, batch):
        taps = super().forward(batch)
        taps["toy.out"] = taps["toy.out"].copy()
        taps["toy.out"][0, 1, 2, 3] = self.value
        return taps


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (np.nan, r"the float64 reference produced NaN or Inf at toy.out\[0, 1, 2, 3\] .* from finite inputs"),
        (np.inf, r"the float64 reference produced NaN or Inf at toy.out"),
        (1e39, r"the float64 reference reaches 1e\+39 at toy.out, beyond float32's range .*: a cannot represent it"),
    ],
)
def test_a_reference_out_of_range_is_bad_input_not_a_pass(tol, value, message):
    """NaN at the same place on both sides is agreement in a comparison; a run whose reference itself
    went non-finite (or beyond what float32 can hold) must still never pass."""
    from parity.runner import ArbiterOutOfRangeError

    class Both(Toy32):
        def forward(self, batch):
            taps = super().forward(batch)
            taps["toy.out"] = taps["toy.out"].copy()
            taps["toy.out"][0, 1, 2, 3] = np.inf if abs(value) > 3.4e38 else np.nan  # what float32 makes of it
            return taps

    ref = type("Ref", (Overflows,), {"value": value})
    with pytest.raises(ArbiterOutOfRangeError, match=message) as info:
        run_parity({"reference": ref(None, W), "a": Both(None, W)}, _batches(), tol, reference="reference")
    assert info.value.tap == "toy.out"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (complex(1.0, np.nan), r"produced NaN or Inf at field\[1, 2\]"),
        (complex(-np.inf, 0.0), r"produced NaN or Inf at field\[1, 2\]"),
        (complex(0.0, -1e39), r"reaches 1e\+39 at field"),
        (-1e39, r"reaches 1e\+39 at field"),
    ],
)
def test_the_arbiter_check_reads_complex_taps_by_modulus_and_negative_values_by_size(value, message):
    """A non-finite part of a complex value, or a value far below -FLOAT32_MAX, is caught as well."""
    from parity.runner import ArbiterOutOfRangeError, check_arbiter

    field = np.ones((3, 4), dtype=complex if isinstance(value, complex) else float)
    field[1, 2] = value
    with pytest.raises(ArbiterOutOfRangeError, match=message):
        check_arbiter({"fine": np.zeros(3), "field": field}, float32_sides=["torch"])
    if np.isfinite(value):
        check_arbiter({"field": field})  # beyond float32 matters only when a float32 side compares


def test_non_finite_inputs_are_named_as_inputs(tol):
    """Taps named input.* are what the backend received (the guide's convention): NaN there is the
    batch's, and the message says so instead of blaming the model."""
    from parity.runner import ArbiterOutOfRangeError

    class WithInput(Toy):
        def forward(self, batch):
            return {"input.x": np.asarray(batch, dtype=np.float64), **super().forward(batch)}

    batches = _batches()
    batches[0] = batches[0].copy()
    batches[0][1, 0, 0, 0] = np.inf
    with pytest.raises(ArbiterOutOfRangeError, match=r"the batch holds NaN or Inf at input.x\[1, 0, 0, 0\]"):
        run_parity({"reference": WithInput(None, W), "a": Toy32(None, W)}, batches, tol, reference="reference")


# --- layer-local parity ----------------------------------------------------------------------------

STAGES = [
    Stage("hidden", "toy", ("toy.in",), ("toy.hidden",)),
    Stage("out", "toy", ("toy.hidden",), ("toy.out",)),
]


class Staged(Toy):
    """Toy that can run each stage alone; ``gain`` perturbs the hidden layer, ``out_scale`` the output."""

    runs_stages = True
    gain = 1.0
    out_scale = 2.0

    def _hidden(self, x):
        return np.maximum(np.einsum("bchw,cd->bdhw", x, self.w), 0) * self.precision_type(self.gain)

    def _out(self, h):
        return np.tanh(h * self.precision_type(self.out_scale))

    @property
    def precision_type(self):
        return np.dtype(self.precision).type

    def forward(self, batch):
        x = np.asarray(batch, dtype=self.precision)
        h = self._hidden(x)
        return {"toy.in": x, "toy.hidden": h, "toy.out": self._out(h)}

    def run_stage(self, stage, inputs):
        (value,) = (np.asarray(inputs[n]) for n in stage.inputs)
        return {"toy.hidden": self._hidden(value)} if stage.name == "hidden" else {"toy.out": self._out(value)}


class Staged32(Staged):
    precision = "float32"


def _local_run(tol, **others):
    backends = {"reference": Staged(None, W), **{n: cls(None, W) for n, cls in others.items()}}
    return run_parity(backends, _batches(), tol, expected=_expected, reference="reference", stages=STAGES)


def _local(res, tap, backend):
    (found,) = [c for t in res.taps if t.name == tap for c in t.local if c.a == backend]
    return found


def test_clean_stages_pass_locally_with_their_own_column(tol):
    res = _local_run(tol, a=Staged32)
    assert res.passed and res.first_local_divergence is None and res.local_unsupported == []
    assert [t.stage for t in res.taps] == [None, "hidden", "out"]
    for tap in ("toy.hidden", "toy.out"):
        c = _local(res, tap, "a")
        assert c.kind == "local_vs_reference" and c.b == "reference" and c.passed and c.numel == 6 * 5 * 16


def test_upstream_error_is_told_apart_from_a_downstream_bug(tol):
    """The hidden layer is off (carried into everything after it) and the output layer has a bug of
    its own: end to end only the first is named; locally both are, and nothing between them."""
    both = type("Both", (Staged32,), {"gain": 1.001, "out_scale": 2.01})
    res = _local_run(tol, bad=both)
    assert res.verdict == "fail"
    assert res.first_divergence["tap"] == "toy.hidden" and res.first_divergence["blamed"] == ["bad"]
    assert res.first_local_divergence["stage"] == "hidden"
    assert not _local(res, "toy.hidden", "bad").passed
    assert not _local(res, "toy.out", "bad").passed  # its own bug, seen on the reference's input
    assert "first stage that computes differently (fed the reference's inputs): hidden" in res.describe_failure()


def test_error_carried_in_from_upstream_passes_locally_downstream(tol):
    upstream = type("Upstream", (Staged32,), {"gain": 1.001})
    res = _local_run(tol, bad=upstream)
    e2e = next(c for c in res.taps[2].comparisons if c.a == "bad" and c.kind == "vs_reference")
    assert not e2e.passed  # the output is off end to end ...
    assert _local(res, "toy.out", "bad").passed  # ... but computes right from the reference's input
    assert res.first_local_divergence["tap"] == "toy.hidden"


def test_a_bug_only_visible_locally_fails_the_run(tol):
    """A stage that run alone differs fails the verdict even when end to end hides it: here the
    backend's forward is right but its stage entry point is not."""

    class StageBug(Staged32):
        def run_stage(self, stage, inputs):
            out = super().run_stage(stage, inputs)
            return {k: v * np.float32(1.01) for k, v in out.items()} if stage.name == "out" else out

    res = _local_run(tol, bad=StageBug)
    assert res.first_divergence is None and res.verdict == "fail" and not res.passed
    assert res.first_local_divergence["tap"] == "toy.out" and res.first_local_divergence["backends"] == ["bad"]
    assert [c.tap for c in res.failures()] == ["toy.out"]


def test_a_backend_that_cannot_run_stages_is_checked_by_the_reference_running_its_stages(tol):
    """A wrapped original cannot run a stage alone; the reference runs each stage on that backend's
    own inputs to it instead, and the backend's outputs are compared with that, in the same local
    column: clean, it passes there too, and the report says how its stages were checked."""
    from parity.report import to_json_dict

    res = _local_run(tol, plain=Toy32, staged=Staged32)
    assert res.passed and res.local_unsupported == [] and res.local_recomputed == ["plain"]
    for tap in ("toy.hidden", "toy.out"):
        assert _local(res, tap, "plain").passed and _local(res, tap, "plain").numel == 6 * 5 * 16
    assert "reference running each stage on the backend's own inputs" in res.describe_divergence()
    assert to_json_dict(res)["local_recomputed"] == ["plain"]


def test_a_stage_bug_of_a_backend_that_cannot_run_stages_is_named_at_its_stage(tol):
    """Both bugs of the staged test above, in a backend that cannot run stages: end to end only the
    upstream one is named; stage by stage, recomputed on its own inputs, both are, and an error
    only carried in from upstream passes where it arrives."""

    class Both(Toy32):
        def forward(self, batch):
            taps = super().forward(batch)
            h = taps["toy.hidden"] * np.float32(1.001)
            return {**taps, "toy.hidden": h, "toy.out": np.tanh(h * np.float32(2.01))}

    class Upstream(Toy32):
        def forward(self, batch):
            taps = super().forward(batch)
            h = taps["toy.hidden"] * np.float32(1.001)
            return {**taps, "toy.hidden": h, "toy.out": np.tanh(h * np.float32(2.0))}

    res = _local_run(tol, bad=Both)
    assert res.first_divergence["tap"] == "toy.hidden" and res.first_local_divergence["stage"] == "hidden"
    assert not _local(res, "toy.hidden", "bad").passed and not _local(res, "toy.out", "bad").passed
    assert "first stage that computes differently (the reference run on that backend's inputs to it): hidden" in (
        res.describe_failure()
    )
    res = _local_run(tol, bad=Upstream)
    assert not _local(res, "toy.hidden", "bad").passed and _local(res, "toy.out", "bad").passed


def test_a_stage_the_reference_cannot_recompute_fails_that_backend_there_with_the_reason(tol):
    """Values the reference cannot run a stage on (here it refuses float32 inputs outright) fail that
    stage's taps for that backend, with the reason, and the run goes on to a verdict."""

    class Picky(Staged):
        def run_stage(self, stage, inputs):
            if stage.name == "out":
                raise ValueError("not on these values")
            return super().run_stage(stage, inputs)

    backends = {"reference": Picky(None, W), "plain": Toy32(None, W)}
    res = run_parity(backends, _batches(), tol, expected=_expected, reference="reference", stages=STAGES)
    assert res.verdict == "fail" and res.local_recomputed == ["plain"]
    assert _local(res, "toy.hidden", "plain").passed
    out = _local(res, "toy.out", "plain")
    assert not out.passed
    assert out.reason == "the reference could not run stage out on plain's own values (ValueError: not on these values)"


def test_a_stage_whose_inputs_a_backend_does_not_give_is_not_recomputed(tol):
    """Without toy.hidden neither stage can be checked (the output stage has no input to run on, the
    hidden stage no output to compare): end-to-end parity only, as with a reference that cannot run
    stages either, and the report says so."""
    res = _local_run(tol, partial=MissingHidden)
    assert res.local_unsupported == ["partial"] and res.local_recomputed == []
    assert [c.tap for t in res.taps for c in t.local] == []
    backends = {"reference": Toy(None, W), "plain": Toy32(None, W)}
    res = run_parity(backends, _batches(), tol, expected=_expected, reference="reference", stages=STAGES)
    assert res.passed and res.local_unsupported == ["plain"] and res.local_recomputed == []
    assert all(not t.local for t in res.taps)
    assert "end-to-end parity only (cannot run stages alone): plain" in res.describe_divergence()


def test_a_stage_that_raises_fails_its_taps_locally_with_the_reason(tol):
    class Raises(Staged32):
        def run_stage(self, stage, inputs):
            raise RuntimeError("no such layer")

    res = _local_run(tol, bad=Raises)
    c = _local(res, "toy.hidden", "bad")
    assert not c.passed and c.reason == "stage hidden of bad raised RuntimeError: no such layer"
    assert res.verdict == "fail"


# --- gradient parity: a backend that computes none still gets its forward compared ---------------------


class ToyGrad(Toy):
    """Toy plus the gradient of sum(relu(x·w)) with respect to w, as a gradient tap."""

    computes_gradients = True
    gain = 1.0

    def gradients(self, batch):
        x = np.asarray(batch, dtype=self.precision)
        active = (np.einsum("bchw,cd->bdhw", x, self.w) > 0).astype(self.precision)
        return {"grad.toy.w": np.einsum("bchw,bdhw->cd", x, active) * np.dtype(self.precision).type(self.gain)}


class ToyGrad32(ToyGrad):
    precision = "float32"


def _gradient_run(tmp_path, **others):
    p = tmp_path / "g.toml"
    p.write_text(TOL_TEXT + '\n[[family]]\npattern = "grad.*"\nfactor = 64.0\n')
    tol = load_tolerances(p, known_taps=[*TAPS, "grad.toy.w"])
    backends = {"reference": ToyGrad(None, W), **{n: cls(None, W) for n, cls in others.items()}}
    return run_parity(
        backends,
        _batches(),
        tol,
        expected=lambda b: [*_expected(b), TapSpec("grad.toy.w", (3, 5))],
        reference="reference",
        gradients=True,
    )


def test_a_backend_without_gradients_keeps_forward_parity_and_says_so(tmp_path):
    from parity.report import to_json_dict, to_markdown

    res = _gradient_run(tmp_path, grads=ToyGrad32, plain=Toy32)
    assert res.passed and res.gradients and res.gradients_unsupported == ["plain"]
    (grad,) = [t for t in res.taps if t.name == "grad.toy.w"]
    assert {(c.a, c.b) for c in grad.comparisons} == {("grads", "reference")}
    assert all({c.a for c in t.comparisons} == {"grads", "plain"} for t in res.taps if t.name.startswith("toy."))
    assert "Forward parity only for `plain`" in to_markdown(res)
    assert to_json_dict(res)["gradients"] == {"enabled": True, "unsupported": ["plain"]}


def test_a_wrong_gradient_fails_at_its_tap_while_the_forward_passes(tmp_path):
    wrong = type("WrongGrad", (ToyGrad32,), {"gain": 1.01})
    res = _gradient_run(tmp_path, grads=wrong, plain=Toy32)
    assert not res.passed and [c.tap for c in res.failures()] == ["grad.toy.w"]
    assert res.first_divergence["tap"] == "grad.toy.w" and res.first_divergence["blamed"] == ["grads"]


def test_a_backend_whose_gradients_crash_is_reported_and_the_others_go_on(tmp_path):
    class GradientsCrash(ToyGrad32):
        def gradients(self, batch):
            raise RuntimeError("no backward for this op")

    res = _gradient_run(tmp_path, grads=ToyGrad32, broken=GradientsCrash)
    assert not res.passed and "no backward for this op" in res.backends["broken"].crashed
    assert all(c.a == "grads" for t in res.taps for c in t.comparisons if c.kind == "vs_reference")


# --- a profile's normwise floor: what the run compares against --------------------------------------


class ToyGradScaled(ToyGrad):
    """ToyGrad whose error scale of the gradient is its own magnitude (elementwise: tiny where it is)."""

    def error_scales(self, batch, taps):
        return {"grad.toy.w": np.abs(np.asarray(taps["grad.toy.w"], np.float64)) + 1e-300}


class SpreadGrad32(ToyGrad32):
    """A gradient off by 4 u of its largest element everywhere, as a transform-based algorithm
    spreads its rounding (cuDNN's weight gradients on a GPU)."""

    def gradients(self, batch):
        g = super().gradients(batch)["grad.toy.w"]
        return {"grad.toy.w": g + np.float32(4 * U) * np.abs(g).max()}


def test_the_run_compares_against_the_profile_s_floored_scales(tmp_path):
    """With the floor, the spread error passes and a wrong gradient still fails; without it the
    spread error fails at the elements whose own scale is tiny."""
    weights = {"w": np.where(np.arange(5) % 2, 1.0, -1.0)[None, :] * np.ones((3, 1))}  # even columns dead for x > 0
    results = {}
    for floor in ("", '\n[profiles.cuda]\nnormwise_floor = { "grad.*" = 0.1 }\n'):
        p = tmp_path / "g.toml"
        p.write_text(TOL_TEXT + '\n[[family]]\npattern = "grad.*"\nfactor = 64.0\n' + floor)
        tol = load_tolerances(p, profile="cuda", known_taps=[*TAPS, "grad.toy.w"])
        for name, cls in (("spread", SpreadGrad32), ("wrong", type("WrongGrad", (ToyGrad32,), {"gain": 1.01}))):
            backends = {"reference": ToyGradScaled(None, weights), name: cls(None, weights)}
            results[bool(floor), name] = run_parity(
                backends,
                [np.abs(b) for b in _batches()],
                tol,
                expected=lambda b: [*_expected(b), TapSpec("grad.toy.w", (3, 5))],
                reference="reference",
                gradients=True,
            )
    assert [c.tap for c in results[False, "spread"].failures()] == ["grad.toy.w"]
    assert results[True, "spread"].passed
    assert not results[True, "wrong"].passed and [c.tap for c in results[True, "wrong"].failures()] == ["grad.toy.w"]

import numpy as np
import pytest

from parity.stats import STATISTICS, StatsAccumulator, patch_statistics, stat_names


def test_statistics_per_patch_match_numpy():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 3, 5, 4)).astype(np.float32)
    s = patch_statistics(x)
    assert list(s) == list(STATISTICS)
    flat = x.astype(np.float64).reshape(6, 20)
    np.testing.assert_allclose(s["mean"], flat.mean(1))
    np.testing.assert_allclose(s["std"], flat.std(1))
    np.testing.assert_allclose(s["var_zero_mean"], ((flat - flat.mean(1, keepdims=True)) ** 2).mean(1))
    np.testing.assert_allclose(s["min"], flat.min(1))
    np.testing.assert_allclose(s["max"], flat.max(1))
    np.testing.assert_allclose(s["mean_abs"], np.abs(flat).mean(1))
    np.testing.assert_allclose(s["l2"], np.linalg.norm(flat, axis=1))
    assert all(v.dtype == np.float64 and v.shape == (6,) for v in s.values())


def test_collapsed_patch_shows_zero_variance():
    x = np.ones((1, 2, 4, 4))
    x[0, 1] = np.arange(16).reshape(4, 4)
    s = patch_statistics(x)
    assert s["var_zero_mean"][0] == 0 and s["var_zero_mean"][1] > 0


def test_complex_tap_gives_amplitude_and_phase():
    z = np.exp(1j * np.linspace(-1, 1, 16)).reshape(1, 1, 4, 4) * 2
    s = patch_statistics(z.astype(np.complex64))
    assert list(s) == stat_names(True)
    assert s["amplitude.mean"][0] == pytest.approx(2.0, rel=1e-6)
    assert s["phase.min"][0] == pytest.approx(-1.0, rel=1e-6)
    assert s["phase.max"][0] == pytest.approx(1.0, rel=1e-6)


def test_nan_and_inf_are_counted_not_hidden():
    x = np.zeros((1, 1, 2, 2))
    x[0, 0, 0, 0] = np.nan
    x[0, 0, 1, 1] = np.inf
    s = patch_statistics(x)
    assert s["nan_count"][0] == 1 and s["inf_count"][0] == 1 and np.isnan(s["mean"][0])


def test_accumulator_streams_batches_in_order():
    rng = np.random.default_rng(2)
    full = rng.normal(size=(6, 2, 3, 3))
    acc = StatsAccumulator()
    for i in range(3):
        acc.add({"t": full[2 * i : 2 * i + 2]})
    streamed = acc.result()["t"]
    whole = patch_statistics(full)
    for k in whole:
        np.testing.assert_array_equal(streamed[k], whole[k])

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
    assert np.isnan(s["min"][0]) and np.isnan(s["max"][0])  # as np.min and np.max give them
    x[0, 0, 0, 0] = -1.0
    s = patch_statistics(x)
    assert s["min"][0] == -1.0 and s["max"][0] == np.inf and s["nan_count"][0] == 0


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


def test_phase_statistics_skip_zero_amplitude_and_signed_zeros():
    """np.angle(-1 - 0j) is -π and np.angle(-0.0 + 0j) is π: a zero must not move phase statistics."""
    z = np.full((1, 1, 2, 2), 0.5j, dtype=np.complex128)
    z[0, 0, 0, 0] = complex(-0.0, -0.0)
    z[0, 0, 0, 1] = complex(-0.0, 0.0)
    s = patch_statistics(z)
    assert s["phase.mean"][0] == pytest.approx(np.pi / 2)
    assert s["phase.min"][0] == pytest.approx(np.pi / 2) and s["phase.std"][0] == 0
    assert s["amplitude.min"][0] == 0  # amplitude statistics still see every pixel
    zero = patch_statistics(np.zeros((1, 1, 2, 2), dtype=np.complex64))
    assert all(zero[f"phase.{k}"][0] == 0 for k in STATISTICS)


def _bounds(tap, tol, rounding=0.0, **coefficients):
    from parity.stats import patch_statistics_and_bounds

    return patch_statistics_and_bounds(tap, tol, rounding, **coefficients)[1]


def _perturbed_stat_changes(values, tol, rng, trials=20):
    """Largest change of every statistic over random perturbations within the tolerance."""
    base = patch_statistics(values)
    worst = {k: np.zeros_like(v) for k, v in base.items()}
    for _ in range(trials):
        mag = tol * rng.uniform(0.0, 1.0, size=values.shape) ** 0.25
        if np.iscomplexobj(values):
            d = mag * np.exp(1j * rng.uniform(-np.pi, np.pi, size=values.shape))
        else:
            d = mag * rng.choice([-1.0, 1.0], size=values.shape)
        moved = patch_statistics(values + d)
        for k in base:
            worst[k] = np.maximum(worst[k], np.abs(moved[k] - base[k]))
    return worst


@pytest.mark.parametrize("proportional", [0.0, 3e-3])
@pytest.mark.parametrize("is_complex", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_perturbation_bounds_hold_for_perturbations_within_tolerance(is_complex, seed, proportional):
    """Also with the tolerance given as a part plus a multiple of each element's modulus (how the
    baselines' tolerances are given: atol_i + rtol·|v_i|, never made into an array)."""

    rng = np.random.default_rng(seed)
    shape = (2, 3, 5, 5)
    values = rng.normal(size=shape) * rng.uniform(0.01, 10.0)
    if is_complex:
        values = values * np.exp(1j * rng.uniform(-np.pi, np.pi, size=shape))
        values[0, 0, :2] = 0  # zero amplitude: excluded from phase statistics
    tol = np.abs(values) * 10 ** rng.uniform(-4, -1) + 1e-3 * rng.uniform(size=shape)
    bounds = _bounds(values, tol, proportional=proportional)
    worst = _perturbed_stat_changes(values, tol + proportional * np.abs(values), rng)
    for k, b in bounds.items():
        assert np.all(worst[k] <= b * (1 + 1e-9) + 1e-12), (k, worst[k], b)
    if is_complex:
        assert np.all(bounds["phase.mean"] <= 2 * np.pi) and np.all(bounds["phase.std"] <= np.pi)


def test_phase_bounds_are_tight_where_the_amplitude_is_large():

    z = 3.0 * np.exp(1j * np.linspace(-1, 1, 16)).reshape(1, 1, 4, 4)
    b = _bounds(z, np.full(z.shape, 3e-6))
    assert b["phase.mean"][0] < 2e-6 and b["phase.max"][0] < 2e-6  # asin(1e-6) per pixel, not π


def test_a_zero_with_a_tiny_tolerance_leaves_the_phase_statistics_checked():
    """A canvas outside every patch is an exact zero with a tolerance of 1e-36 or so. While any
    nonzero amplitude joined the phase statistics, such a zero might join them elsewhere with any
    phase, so every phase bound of the patch was up to 2π and a 2 rad phase error passed a baseline
    (until 2026-12-05). Pixels under PHASE_FLOOR of the patch's largest amplitude stay out."""
    from parity.stats import PHASE_FLOOR

    rng = np.random.default_rng(3)
    z = np.exp(1j * rng.uniform(-1.0, 1.0, size=(1, 2, 8, 8)))
    z[:, :, :, :3] = 0.0  # the padding
    z[0, 1, 0, 3] = 0.5 * PHASE_FLOOR  # below the floor: out, whatever its phase
    tol = np.where(np.abs(z) < 1e-3, 1e-36, 1e-6)
    b = _bounds(z, tol)
    assert np.all(b["phase.mean"] < 1e-5) and np.all(b["phase.max"] < 1e-5)
    shifted = patch_statistics(z * np.exp(0.5j))["phase.mean"] - patch_statistics(z)["phase.mean"]
    assert np.all(np.abs(shifted) > 0.4)  # a global phase error is far outside those bounds
    assert patch_statistics(z)["phase.max"][1] == patch_statistics(np.where(z == z[0, 1, 0, 3], 0, z))["phase.max"][1]


@pytest.mark.parametrize("seed", range(4))
def test_phase_bounds_hold_for_pixels_that_cross_the_floor(seed):
    """A pixel within its tolerance of PHASE_FLOOR may join or leave the phase statistics elsewhere,
    and the largest amplitude that sets the floor moves too: perturbed within tolerance, no phase
    statistic moves further than its bound."""
    from parity.stats import PHASE_FLOOR

    rng = np.random.default_rng(seed)
    z = rng.uniform(0.5, 1.0, size=(2, 2, 6, 6)) * np.exp(1j * rng.uniform(-2.0, 2.0, size=(2, 2, 6, 6)))
    near = rng.random(z.shape) < 0.2
    z = np.where(near, PHASE_FLOOR * rng.uniform(0.5, 1.5, size=z.shape) * np.exp(1j * rng.uniform(-3, 3, z.shape)), z)
    tol = np.where(near, PHASE_FLOOR, 1e-3)
    bounds = _bounds(z, tol)
    worst = _perturbed_stat_changes(z, tol, rng, trials=40)
    for k, b in bounds.items():
        assert np.all(worst[k] <= b * (1 + 1e-9) + 1e-12), (k, worst[k], b)


def test_statistics_read_with_their_bounds_are_those_read_alone():
    """The runner takes a tap's statistics and their bounds from one read of it: the statistics are
    those ``patch_statistics`` gives bit for bit, NaN and inf rows included, and the bounds follow
    ``times·tol + proportional·|v|`` as if that tolerance had been made into an array."""
    from parity.stats import patch_statistics, patch_statistics_and_bounds

    rng = np.random.default_rng(7)
    real = rng.normal(size=(2, 3, 4, 4)).astype(np.float32)
    real[0, 1, 2, 3] = np.nan
    real[1, 2, 0, 0] = np.inf
    cplx = rng.normal(size=(2, 1, 4, 4)) * np.exp(1j * rng.normal(size=(2, 1, 4, 4)))
    cplx[0, 0, 0] = 0
    for tap in (real, cplx):
        scale = np.abs(rng.normal(size=tap.shape)) + 0.1
        stats, bounds = patch_statistics_and_bounds(tap, scale, 1e-7, times=2.0**-20, proportional=3e-6)
        alone = patch_statistics(tap)
        assert list(stats) == list(alone) == list(bounds)
        for name, values in alone.items():
            np.testing.assert_array_equal(stats[name], values, err_msg=name)
        as_array = _bounds(tap, scale * 2.0**-20 + 3e-6 * np.abs(tap.astype(np.complex128)), 1e-7)
        for name, values in as_array.items():
            np.testing.assert_allclose(bounds[name], values, rtol=1e-12, atol=0, err_msg=name)
    # a bound that reads the tolerance: doubling it doubles the bound of the mean
    doubled = patch_statistics_and_bounds(real, 2 * scale[..., :1].real, times=1.0)[1]["mean"]
    single = patch_statistics_and_bounds(real, scale[..., :1].real, times=1.0)[1]["mean"]
    finite = np.isfinite(patch_statistics(real)["mean"])
    np.testing.assert_allclose(doubled[finite], 2 * single[finite], rtol=1e-12)


@pytest.mark.parametrize("is_complex", [False, True])
def test_large_taps_split_into_row_blocks_give_the_whole_tap_result(monkeypatch, is_complex):
    """Statistics and bounds of a large tap run a block of rows per core: where a block ends, and a
    tolerance given as a scale times a coefficient (how the runner gives it), change no number."""
    from parity import kernels
    from parity.stats import patch_statistics, patch_statistics_and_bounds

    rng = np.random.default_rng(11)
    values = rng.normal(size=(3, 5, 6, 7))
    if is_complex:
        values = values * np.exp(1j * rng.uniform(-np.pi, np.pi, size=values.shape))
    values[1, 2, 3, 4] = np.nan
    scale = np.abs(rng.normal(size=values.shape))

    def run(chunk: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        monkeypatch.setattr(kernels, "CHUNK", chunk)
        stats = patch_statistics(values)
        with_bounds = patch_statistics_and_bounds(values, scale, 1e-7, times=2.0**-20, proportional=3e-6)
        for name, want in stats.items():
            np.testing.assert_array_equal(with_bounds[0][name], want, err_msg=name)
        return stats, with_bounds[1]

    (whole_stats, whole_bounds), (blocked_stats, blocked_bounds) = run(1 << 20), run(100)
    assert len(kernels.row_blocks(15, 42)) == 8  # 100 elements: two rows a block
    product = _bounds(values, scale * 2.0**-20, 1e-7, proportional=3e-6)
    for name, want in whole_stats.items():
        np.testing.assert_array_equal(blocked_stats[name], want, err_msg=name)
        np.testing.assert_array_equal(blocked_bounds[name], whole_bounds[name], err_msg=name)
        np.testing.assert_array_equal(product[name], whole_bounds[name], err_msg=name)


@pytest.mark.parametrize("length", [1, 3, 4, 5, 7, 8, 11])
def test_every_element_counts_whichever_partial_sum_reads_it(length):
    """The compiled statistics sum a row as four interleaved partial sums plus a tail: an element in
    any lane or in the tail, a NaN or infinity there, or a NaN or infinite tolerance there, gives what
    NumPy gives for the whole row."""
    from parity.kernels import row_statistics

    rng = np.random.default_rng(length)
    for j in range(length):
        for special in (None, np.nan, np.inf, -np.inf, 1e30):
            rows = rng.normal(size=(3, length)) * 10.0 ** rng.integers(-3, 4)
            scale = np.abs(rng.normal(size=(3, length)))
            if special is not None:
                rows[1, j] = special
                scale[2, j] = abs(special)
            got = row_statistics(rows, scale, 0.5, 0.25)
            t = 0.5 * scale + 0.25 * np.abs(rows)
            with np.errstate(invalid="ignore", over="ignore"):
                want = np.stack(
                    [
                        rows.mean(1),
                        rows.std(1),
                        rows.var(1),
                        rows.min(1),
                        rows.max(1),
                        np.abs(rows).mean(1),
                        np.sqrt((rows * rows).sum(1)),
                        np.isnan(rows).sum(1),
                        np.isinf(rows).sum(1),
                        t.mean(1),
                        np.sqrt((t * t).mean(1)),
                        t.max(1),
                        np.sqrt((t * t).sum(1)),
                    ],
                    axis=1,
                )
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=0, err_msg=f"element {j} = {special}")

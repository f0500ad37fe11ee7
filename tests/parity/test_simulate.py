import dataclasses

import numpy as np
import pytest

from parity.batch import disk_mask
from parity.errors import ParityInputError
from parity.simulate import (
    BUNDLED_FIXTURES,
    MAX_OBJECT_SIDE,
    SimulationParams,
    expected_intensity,
    extract_patches,
    make_object,
    make_probe,
    nearest_neighbour_groups,
    simulate,
)

SMALL = SimulationParams(kind="lines", N=64, gridsize=2, seed=7, scan_shape=(4, 5), nphotons=1e6)


def _arrays(data):
    return data.arrays()


@pytest.mark.parametrize("kind", ["lines", "grf"])
def test_same_seed_gives_identical_arrays(kind):
    params = dataclasses.replace(SMALL, kind=kind)
    a, b = simulate(params), simulate(params)
    assert a.params == b.params
    for name, arr in _arrays(a).items():
        other = _arrays(b)[name]
        assert arr.dtype == other.dtype and arr.tobytes() == other.tobytes(), name


@pytest.mark.parametrize("kind", ["lines", "grf"])
def test_different_seed_gives_different_arrays(kind):
    a = simulate(dataclasses.replace(SMALL, kind=kind))
    b = simulate(dataclasses.replace(SMALL, kind=kind, seed=SMALL.seed + 1))
    for name in ("diffraction", "object", "xcoords", "ycoords"):
        assert not np.array_equal(getattr(a, name), getattr(b, name)), name
    # The probe is deterministic by design (no randomness): the same for every seed.
    assert np.array_equal(a.probe, b.probe)


def test_outputs_have_the_schema_dtypes_and_shapes():
    d = simulate(SMALL)
    n, N = 20, 64
    assert d.diffraction.shape == (n, N, N) and d.diffraction.dtype == np.float32
    assert d.xcoords.shape == d.ycoords.shape == (n,) and d.xcoords.dtype == np.float64
    assert d.probe.shape == (N, N) and d.probe.dtype == np.complex64
    assert d.groups.shape == (n, 4) and d.groups.dtype == np.int64
    assert d.object is not None and d.object.shape == SMALL.object_shape and d.object.dtype == np.complex64
    assert d.params["generator_version"] >= 1 and d.params["seed"] == SMALL.seed


@pytest.mark.parametrize("name", sorted(BUNDLED_FIXTURES))
def test_amplitudes_are_nonnegative_and_mean_counts_match_nphotons(name):
    params = dataclasses.replace(BUNDLED_FIXTURES[name], beamstop=0)  # a beamstop's shadow is tested below
    d = simulate(params)
    assert np.all(np.isfinite(d.diffraction)) and d.diffraction.min() >= 0
    counts = d.diffraction.astype(np.float64) ** 2
    # Amplitudes are square roots of integers (to float32 precision).
    assert np.allclose(counts, np.round(counts), rtol=1e-6, atol=1e-3)
    mean_total = counts.sum(axis=(1, 2)).mean()
    # Poisson noise on the grand total is ~1/sqrt(n · nphotons): far below 1e-3.
    assert mean_total == pytest.approx(params.nphotons, rel=1e-3)


def test_diffraction_is_centred_like_the_model_output():
    d = simulate(SMALL)
    mean = d.diffraction.astype(np.float64).mean(axis=0)
    peak = np.unravel_index(np.argmax(mean), mean.shape)
    # fftshift puts zero frequency at (N/2, N/2).
    assert peak == (32, 32)


def test_expected_intensity_conserves_energy():
    rng = np.random.default_rng(0)
    probe = make_probe(64)
    patches = rng.normal(size=(3, 64, 64)) + 1j * rng.normal(size=(3, 64, 64))
    intensity = expected_intensity(probe, patches)
    # Parseval with the 1/N² of the model: Σ|fft2(ψ)|²/N² = Σ|ψ|².
    direct = np.sum(np.abs(probe.astype(np.complex128) * patches) ** 2, axis=(1, 2))
    np.testing.assert_allclose(intensity.sum(axis=(1, 2)), direct, rtol=1e-12)


def test_scan_positions_and_group_offsets_have_subpixel_parts():
    d = simulate(SMALL)
    frac = np.concatenate([d.xcoords % 1, d.ycoords % 1])
    assert np.mean(np.abs(frac - np.round(frac)) > 0.02) > 0.8
    pos = np.stack([d.xcoords, d.ycoords], axis=-1)[d.groups]
    offsets = -(pos - pos.mean(axis=1, keepdims=True))
    off_frac = np.abs(offsets - np.round(offsets))
    assert np.mean(off_frac > 0.02) > 0.8
    # Neighbours are one scan step apart, so group offsets are of the order of the step.
    assert 0.5 < np.abs(offsets).max() < 2 * SMALL.step


def test_object_and_probe_ranges():
    obj = make_object(SMALL, np.random.default_rng(0))
    amp, phase = np.abs(obj), np.angle(obj)
    assert amp.min() >= 0.5 - 1e-6 and amp.max() <= 1 + 1e-6 and amp.std() > 0.05
    assert phase.min() >= -1 - 1e-6 and phase.max() <= 1 + 1e-6 and phase.std() > 0.05
    probe = make_probe(64).astype(np.complex128)
    inside = np.sum(np.abs(disk_mask(64) * probe) ** 2) / np.sum(np.abs(probe) ** 2)
    assert inside > 0.9  # the probe lives in the disk the harness normalises over
    assert np.ptp(np.angle(probe[disk_mask(64) > 0])) > 0.2  # truly complex (quadratic phase)


def test_extract_patches_is_exact_at_integer_positions_and_bilinear_between():
    rng = np.random.default_rng(3)
    obj = rng.normal(size=(20, 24)) + 1j * rng.normal(size=(20, 24))
    N = 8
    p = extract_patches(obj, np.array([10.0, 10.5]), np.array([9.0, 9.0]), N)
    np.testing.assert_array_equal(p[0], obj[5:13, 6:14])
    np.testing.assert_allclose(p[1], 0.5 * (obj[5:13, 6:14] + obj[5:13, 7:15]))
    with pytest.raises(ParityInputError, match="outside"):
        extract_patches(obj, np.array([3.0]), np.array([9.0]), N)


def _brute_force_groups(x, y, C):
    n = len(x)
    d2 = (x[None, :] - x[:, None]) ** 2 + (y[None, :] - y[:, None]) ** 2
    d2[np.arange(n), np.arange(n)] = -1.0
    idx = np.broadcast_to(np.arange(n), (n, n))
    return np.lexsort((idx, d2), axis=1)[:, :C]


def test_groups_are_self_then_nearest_with_ties_to_the_lower_index():
    # An exact grid without jitter: every interior point has four neighbours at the same distance.
    gy, gx = np.meshgrid(np.arange(5) * 4.0, np.arange(5) * 4.0, indexing="ij")
    x, y = gx.ravel(), gy.ravel()
    g = nearest_neighbour_groups(x, y, 4)
    np.testing.assert_array_equal(g, _brute_force_groups(x, y, 4))
    np.testing.assert_array_equal(g[:, 0], np.arange(25))
    assert g[12].tolist() == [12, 7, 11, 13]  # centre: up, left, right (down, index 17, loses the tie)


def test_groups_with_duplicate_positions_and_chunking_match_brute_force():
    rng = np.random.default_rng(5)
    x = np.round(rng.uniform(0, 40, 2100))  # integer coordinates: many exact ties and duplicates
    y = np.round(rng.uniform(0, 40, 2100))
    g = nearest_neighbour_groups(x, y, 4)  # n > 2000 rows: more than one chunk
    np.testing.assert_array_equal(g, _brute_force_groups(x, y, 4))
    np.testing.assert_array_equal(g[:, 0], np.arange(2100))
    assert nearest_neighbour_groups(x[:5], y[:5], 1).tolist() == [[0], [1], [2], [3], [4]]
    with pytest.raises(ParityInputError, match="groups of 4"):
        nearest_neighbour_groups(x[:3], y[:3], 4)


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"kind": "spiral"}, "kind"),
        ({"N": 63}, "N"),
        ({"jitter": 1.5}, "jitter"),
        ({"nphotons": 0.0}, "nphotons"),
        ({"scan_shape": (1, 2)}, "scan_shape"),
        ({"seed": True}, "seed"),
        ({"beamstop": 3}, "beamstop"),
        ({"beamstop": 66}, "beamstop"),
        ({"beamstop": 64}, "beamstop"),  # every pixel in its shadow: nothing to normalise
        # Sizes beyond the caps, refused before anything is allocated (a MemoryError or an
        # OverflowError before the caps; 100000x100000 grew until the OOM killer ended it).
        ({"step": 1e6}, "step"),
        ({"step": 1e300}, "step"),
        ({"step": 1.7e308}, "step"),
        ({"scan_shape": (100000, 100000)}, "scan_shape"),
        ({"scan_shape": (1, 300)}, "scan_shape"),
        ({"margin": 10**400}, "margin"),
        ({"N": 2048}, "scan_shape"),
    ],
)
def test_invalid_parameters_are_rejected_by_name(changes, key):
    with pytest.raises(ParityInputError, match=repr(key)):
        dataclasses.replace(SMALL, **changes)


def test_size_caps_name_the_make_fixture_option_and_hold_exactly_at_the_cap():
    with pytest.raises(
        ParityInputError, match=r"'step' \(1e\+06\) ask for an object 4e\+06 pixels wide.*option --step"
    ):
        dataclasses.replace(SMALL, step=1e6)
    with pytest.raises(
        ParityInputError, match=r"100000x100000 = 10000000000 scan positions; at most 2048 .*option --scan"
    ):
        dataclasses.replace(SMALL, scan_shape=(100000, 100000))
    assert dataclasses.replace(SMALL, scan_shape=(32, 64), step=0.1).scan_shape == (32, 64)  # 2048 positions
    with pytest.raises(ParityInputError, match="2049 scan positions"):
        dataclasses.replace(SMALL, scan_shape=(2049, 1), step=0.1)
    # The largest step whose object is exactly MAX_OBJECT_SIDE wide is accepted, a hair more is not.
    extent = MAX_OBJECT_SIDE - SMALL.N - 1 - 2 * (SMALL.margin + SMALL.jitter)
    widest = dataclasses.replace(SMALL, step=extent / (max(SMALL.scan_shape) - 1))
    assert max(widest.object_shape) == MAX_OBJECT_SIDE
    with pytest.raises(ParityInputError, match=f"1025 pixels wide.*at most {MAX_OBJECT_SIDE}"):
        dataclasses.replace(SMALL, step=(extent + 0.01) / (max(SMALL.scan_shape) - 1))


def test_line_density_is_capped_before_anything_is_allocated():
    """The lines object's samples grow as density x side³: a density of 1 at the largest object
    would ask for tens of gigabytes. At the cap it is accepted; above it, refused by name."""
    from parity.simulate import MAX_LINE_DENSITY

    assert dataclasses.replace(SMALL, line_density=MAX_LINE_DENSITY).line_density == MAX_LINE_DENSITY
    with pytest.raises(ParityInputError, match=r"'line_density' is 1\.0; expected a number of lines per object pixel"):
        dataclasses.replace(SMALL, line_density=1.0)


def test_beamstop_zeroes_a_centred_square_of_whole_pool_windows_and_changes_nothing_else():
    """The shadow is what makes max-pool ties real (docs/mutations.md): a flat square, aligned to the
    2x2 windows, centred on the zero frequency; every other count is the unshadowed draw's."""
    shadowed = simulate(dataclasses.replace(SMALL, beamstop=16))
    open_beam = simulate(SMALL)
    inside = np.zeros((64, 64), dtype=bool)
    inside[24:40, 24:40] = True
    assert np.all(shadowed.diffraction[:, inside] == 0) and np.mean(open_beam.diffraction[:, inside] > 0) > 0.9
    assert np.array_equal(shadowed.diffraction[:, ~inside], open_beam.diffraction[:, ~inside])
    assert shadowed.params["beamstop"] == 16 and "beamstop" not in open_beam.params

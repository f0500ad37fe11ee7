import io
import zipfile

import numpy as np
import pytest

from parity.config import ModelConfig
from parity.errors import FixtureError
from parity.fixture import file_sha256, iter_batches, load_fixture
from parity.npz_import import import_npz
from parity.simulate import SimulationParams, nearest_neighbour_groups, simulate


@pytest.fixture(scope="module")
def sim():
    params = SimulationParams(kind="lines", N=64, gridsize=2, seed=21, scan_shape=(3, 3), nphotons=1e6)
    return simulate(params)


def _layout(sim, diffraction_key="diff3d", with_object=True):
    """The original PtychoPINN NPZ layout, in the dtypes its files usually have."""
    arrays = {
        diffraction_key: sim.diffraction.astype(np.float64),
        "xcoords": sim.xcoords,
        "ycoords": sim.ycoords,
        "probeGuess": sim.probe.astype(np.complex128),
        "scan_index": np.zeros(sim.n_positions, np.int64),  # PtychoPINN extras are ignored
    }
    if with_object:
        arrays["objectGuess"] = sim.object.astype(np.complex128)
    return arrays


def _write(tmp_path, arrays, name="data.npz"):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(("key", "with_object"), [("diff3d", True), ("diffraction", False)])
def test_round_trip_through_a_fixture(tmp_path, sim, key, with_object):
    npz = _write(tmp_path, _layout(sim, key, with_object))
    out = import_npz(npz, tmp_path / "imported.h5", gridsize=2)
    fx = load_fixture(out, ModelConfig(N=64, gridsize=2))
    np.testing.assert_array_equal(fx.diffraction, sim.diffraction)
    np.testing.assert_array_equal(fx.xcoords, sim.xcoords)
    np.testing.assert_array_equal(fx.ycoords, sim.ycoords)
    np.testing.assert_array_equal(fx.probe, sim.probe)
    np.testing.assert_array_equal(fx.groups, nearest_neighbour_groups(sim.xcoords, sim.ycoords, 4))
    np.testing.assert_array_equal(fx.groups, sim.groups)  # the simulator groups the same way
    if with_object:
        np.testing.assert_array_equal(fx.object, sim.object)
    else:
        assert fx.object is None
    assert (fx.kind, fx.seed, fx.params["diffraction_key"]) == ("npz", -1, key)
    assert fx.source == f"npz:data.npz sha256:{file_sha256(npz)}"
    assert sum(b.size for b in iter_batches(fx, ModelConfig(N=64, gridsize=2), 4)) == 9
    # Importing again gives the same bytes.
    again = import_npz(npz, tmp_path / "again.h5", gridsize=2)
    assert again.read_bytes() == out.read_bytes()


def test_gridsize_one_and_both_diffraction_keys_when_equal(tmp_path, sim):
    arrays = _layout(sim)
    arrays["diffraction"] = arrays["diff3d"]
    out = import_npz(_write(tmp_path, arrays), tmp_path / "g1.h5", gridsize=1)
    fx = load_fixture(out, ModelConfig(N=64, gridsize=1))
    assert fx.groups.tolist() == [[i] for i in range(9)]


def _without(arrays, key):
    return {k: v for k, v in arrays.items() if k != key}


def _with(arrays, key, value):
    return {**arrays, key: value}


def _nan_at(arr, index):
    arr = arr.copy()
    arr[index] = np.nan
    return arr


CASES = {
    "missing_diffraction": (lambda a: _without(a, "diff3d"), r"key 'diff3d' \(or 'diffraction'\) is missing"),
    "missing_xcoords": (lambda a: _without(a, "xcoords"), r"key 'xcoords' is missing"),
    "missing_ycoords": (lambda a: _without(a, "ycoords"), r"key 'ycoords' is missing"),
    "missing_probe": (lambda a: _without(a, "probeGuess"), r"key 'probeGuess' is missing"),
    "diffraction_2d": (
        lambda a: _with(a, "diff3d", a["diff3d"][0]),
        r"key 'diff3d' has shape \(64, 64\); expected \(n, N, N\)",
    ),
    "diffraction_not_square": (
        lambda a: _with(a, "diff3d", a["diff3d"][:, :, :32]),
        r"key 'diff3d' has shape \(9, 64, 32\)",
    ),
    "diffraction_trailing_channel": (
        lambda a: _with(a, "diff3d", a["diff3d"][..., None]),
        r"key 'diff3d' has shape \(9, 64, 64, 1\)",
    ),
    "diffraction_complex": (
        lambda a: _with(a, "diff3d", a["diff3d"].astype(np.complex64)),
        r"key 'diff3d' has dtype complex64; expected real numbers",
    ),
    "diffraction_nan": (
        lambda a: _with(a, "diff3d", _nan_at(a["diff3d"], (2, 3, 4))),
        r"key 'diff3d' contains 1 non-finite values .* at index \(2, 3, 4\)",
    ),
    "diffraction_negative": (
        lambda a: _with(a, "diff3d", -a["diff3d"] - 1),
        r"key 'diff3d' has 36864 negative values",
    ),
    "diffraction_overflows_float32": (
        lambda a: _with(a, "diff3d", np.full((9, 64, 64), 1e300)),
        r"key 'diff3d' has 36864 values beyond float32's range",
    ),
    "n_no_config_runs": (
        lambda a: {**a, "diff3d": np.ones((9, 32, 32), np.float32), "probeGuess": np.ones((32, 32), np.complex64)},
        r"key 'diff3d' has shape \(9, 32, 32\): patterns of N=32, and the model runs N = 64 or 128 only",
    ),
    "keys_disagree": (
        lambda a: _with(a, "diffraction", a["diff3d"] + 1),
        r"keys 'diff3d' and 'diffraction' are both present and differ",
    ),
    "xcoords_length": (
        lambda a: _with(a, "xcoords", a["xcoords"][:-1]),
        r"key 'xcoords' has shape \(8,\); expected \(9,\)",
    ),
    "ycoords_2d": (
        lambda a: _with(a, "ycoords", a["ycoords"][:, None]),
        r"key 'ycoords' has shape \(9, 1\); expected \(9,\)",
    ),
    "ycoords_nan": (lambda a: _with(a, "ycoords", _nan_at(a["ycoords"], 4)), r"key 'ycoords' contains 1"),
    "probe_shape": (
        lambda a: _with(a, "probeGuess", a["probeGuess"][:32, :32]),
        r"key 'probeGuess' has shape \(32, 32\); expected \(64, 64\)",
    ),
    "probe_nan": (
        lambda a: _with(a, "probeGuess", _nan_at(a["probeGuess"], (5, 5))),
        r"key 'probeGuess' contains 1 non-finite",
    ),
    "probe_zero": (
        lambda a: _with(a, "probeGuess", np.zeros((64, 64), np.complex64)),
        r"key 'probeGuess' is zero inside the disk mask",
    ),
    "object_1d": (
        lambda a: _with(a, "objectGuess", a["objectGuess"].ravel()),
        r"key 'objectGuess' has shape \(\d+,\); expected \(H, W\)",
    ),
    "object_inf": (
        lambda a: _with(a, "objectGuess", a["objectGuess"] * np.inf),
        r"key 'objectGuess' contains \d+ non-finite",
    ),
    "object_strings": (
        lambda a: _with(a, "objectGuess", np.array(["a", "b"])),
        r"key 'objectGuess' has dtype <U1; expected real or complex",
    ),
    "too_few_patterns": (
        lambda a: {
            **a,
            "diff3d": a["diff3d"][:3],
            "xcoords": a["xcoords"][:3],
            "ycoords": a["ycoords"][:3],
        },
        r"key 'diff3d' has 3 patterns; groups of gridsize² = 4 need at least 4",
    ),
}


def _grouped(arrays, layout="ptychopinn"):
    """PtychoPINN's grouped keys: groups ``nn_indices`` (not the nearest-neighbour ones) and their
    ``coords_relative`` = −(position − the group's first position), not centred, in PtychoPINN's
    (g, 1, 2, C) layout or the fixture's (g, C, 2)."""
    n = len(arrays["xcoords"])
    nn = np.stack([(np.arange(n) + k) % n for k in (0, 3, 1, 4)], axis=1)[::-1]  # (n, 4), unlike the fixture's
    coords_nn = np.transpose(np.array([arrays["xcoords"][nn], arrays["ycoords"][nn]]), (1, 0, 2))[:, None]
    rel = -(coords_nn - coords_nn[..., :1])  # local_offset_sign = −1
    if layout != "ptychopinn":
        rel = np.transpose(rel[:, 0], (0, 2, 1))
    return {**arrays, "nn_indices": nn, "coords_relative": rel}


@pytest.mark.parametrize("layout", ["ptychopinn", "fixture"])
def test_grouped_npz_keeps_its_groups_and_uncentred_offsets(tmp_path, sim, layout):
    arrays = _grouped(_layout(sim), layout)
    npz = _write(tmp_path, arrays)
    out = import_npz(npz, tmp_path / "grouped.h5", gridsize=2)
    cfg = ModelConfig(N=64, gridsize=2, max_position_jitter=30)  # a canvas wide enough for these groups
    fx = load_fixture(out, cfg)
    np.testing.assert_array_equal(fx.groups, arrays["nn_indices"])
    pos = np.stack([sim.xcoords, sim.ycoords], axis=-1)[arrays["nn_indices"]]
    expected = -(pos - pos[:, :1])
    assert fx.offsets.dtype == np.float64 and fx.offsets.tobytes() == expected.tobytes()
    assert np.all(np.linalg.norm(fx.offsets.sum(axis=1), axis=1) > 1)  # not centred
    assert fx.params["grouping"] == "nn_indices"
    assert fx.params["keys_used"][-2:] == ["nn_indices", "coords_relative"]
    batches = list(iter_batches(fx, cfg, 3))
    assert np.concatenate([b.offsets for b in batches]).tobytes() == expected.astype(np.float32).tobytes()
    # Deterministic: importing again gives the same bytes.
    assert import_npz(npz, tmp_path / "again.h5", gridsize=2).read_bytes() == out.read_bytes()


def test_grouped_npz_offsets_too_large_for_the_canvas_fail_at_load_with_that_config(tmp_path, sim):
    out = import_npz(_write(tmp_path, _grouped(_layout(sim))), tmp_path / "grouped.h5", gridsize=2)
    with pytest.raises(FixtureError, match=r"grouped\.h5: dataset 'offsets' holds .* beyond the canvas margin"):
        load_fixture(out, ModelConfig(N=64, gridsize=2))


def test_nn_indices_alone_are_ignored_as_before(tmp_path, sim):
    arrays = _grouped(_layout(sim))
    del arrays["coords_relative"]
    fx = load_fixture(import_npz(_write(tmp_path, arrays), tmp_path / "out.h5", gridsize=2))
    np.testing.assert_array_equal(fx.groups, sim.groups)
    assert fx.offsets is None and fx.params["grouping"] == "nearest_neighbours"


def _grouped_with(key, value):
    return lambda a: {**_grouped(a), key: value}


GROUPED_CASES = {
    "relative_without_indices": (
        lambda a: _without(_grouped(a), "nn_indices"),
        r"key 'coords_relative' needs key 'nn_indices', the groups its offsets belong to",
    ),
    "relative_wrong_shape": (
        _grouped_with("coords_relative", np.zeros((9, 2, 4))),
        r"key 'coords_relative' has shape \(9, 2, 4\); expected \(9, 1, 2, 4\) \(PtychoPINN's layout\) or "
        r"\(9, 4, 2\)",
    ),
    "relative_other_group_count": (
        _grouped_with("coords_relative", np.zeros((8, 1, 2, 4))),
        r"key 'coords_relative' has shape \(8, 1, 2, 4\); expected \(9, 1, 2, 4\)",
    ),
    "relative_nan": (
        lambda a: {**_grouped(a), "coords_relative": _nan_at(_grouped(a)["coords_relative"], (1, 0, 1, 2))},
        r"key 'coords_relative' contains 1 non-finite values .* at index \(1, 0, 1, 2\)",
    ),
    "relative_complex": (
        _grouped_with("coords_relative", np.zeros((9, 4, 2), np.complex64)),
        r"key 'coords_relative' has dtype complex64; expected real numbers",
    ),
    "indices_float": (
        _grouped_with("nn_indices", np.zeros((9, 4))),
        r"key 'nn_indices' has dtype float64; expected integers",
    ),
    "indices_wrong_group_size": (
        _grouped_with("nn_indices", np.zeros((9, 3), np.int64)),
        r"key 'nn_indices' has shape \(9, 3\); expected \(n_groups, 4\)",
    ),
    "indices_out_of_range": (
        _grouped_with("nn_indices", np.full((9, 4), 9, np.int64)),
        r"key 'nn_indices' holds position index 9 at \(0, 0\), outside \[0, 9\)",
    ),
}
CASES.update(GROUPED_CASES)


@pytest.mark.parametrize("case", sorted(CASES))
def test_invalid_npz_is_rejected_naming_file_and_key(tmp_path, sim, case):
    make, pattern = CASES[case]
    npz = _write(tmp_path, make(_layout(sim)))
    out = tmp_path / "out.h5"
    with pytest.raises(FixtureError, match=pattern) as info:
        import_npz(npz, out, gridsize=2)
    assert str(info.value).startswith(f"{npz}: ")
    assert not out.exists()


def test_object_arrays_missing_files_and_non_npz_input(tmp_path, sim):
    arrays = _with(_layout(sim), "xcoords", np.array([object()] * 9, dtype=object))
    path = tmp_path / "pickled.npz"
    np.savez(path, **arrays)
    with pytest.raises(FixtureError, match=r"key 'xcoords' cannot be read without pickle"):
        import_npz(path, tmp_path / "out.h5", gridsize=2)
    with pytest.raises(FixtureError, match=r"nope\.npz: NPZ file does not exist"):
        import_npz(tmp_path / "nope.npz", tmp_path / "out.h5", gridsize=2)
    single = tmp_path / "single.npy"
    np.save(single, sim.diffraction)
    with pytest.raises(FixtureError, match="single array, not an NPZ archive"):
        import_npz(single, tmp_path / "out.h5", gridsize=2)
    text = tmp_path / "text.npz"
    text.write_text("not a zip")
    with pytest.raises(FixtureError, match="not a readable NPZ archive"):
        import_npz(text, tmp_path / "out.h5", gridsize=2)
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(_write(tmp_path, _layout(sim), "ok.npz").read_bytes()[:5000])
    with pytest.raises(FixtureError, match=r"truncated\.npz: "):
        import_npz(truncated, tmp_path / "out.h5", gridsize=2)
    with pytest.raises(FixtureError, match="gridsize 0"):
        import_npz(tmp_path / "ok.npz", tmp_path / "out.h5", gridsize=0)
    assert not (tmp_path / "out.h5").exists()


def _patch_members(raw, edit):
    """``raw`` NPZ bytes with ``edit(data, header_offset, info)`` applied to each member's local header."""
    data = bytearray(raw)
    with zipfile.ZipFile(io.BytesIO(raw)) as zf:
        for info in zf.infolist():
            edit(data, info.header_offset, info)
    return bytes(data)


def _method_99(data, offset, info):
    """Compression method 99 (AES in WinZip's scheme), in the local header and the central directory."""
    data[offset + 8 : offset + 10] = (99).to_bytes(2, "little")
    name = info.filename.encode()
    central = data.find(b"PK\x01\x02")
    while central >= 0:
        if data[central + 46 : central + 46 + len(name)] == name:
            data[central + 10 : central + 12] = (99).to_bytes(2, "little")
        central = data.find(b"PK\x01\x02", central + 4)


def _garbled_deflate(data, offset, info):
    """The first byte of the member's deflate stream made 0xFF: a block of the reserved type 3."""
    name_len = int.from_bytes(data[offset + 26 : offset + 28], "little")
    extra_len = int.from_bytes(data[offset + 28 : offset + 30], "little")
    data[offset + 30 + name_len + extra_len] = 0xFF


@pytest.mark.parametrize(
    ("compressed", "edit", "pattern"),
    [
        (
            False,
            _method_99,
            r"key 'diff3d' cannot be read: zip member 'diff3d.npy' uses a compression method or encryption that "
            r"Python's zipfile does not support",
        ),
        (True, _garbled_deflate, r"key 'diff3d' cannot be read \(corrupt\? Error -3"),
    ],
)
def test_unreadable_zip_members_are_bad_input_naming_file_key_and_member(tmp_path, sim, compressed, edit, pattern):
    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, **_layout(sim))
    npz = tmp_path / "odd.npz"
    npz.write_bytes(_patch_members(buffer.getvalue(), edit))
    out = tmp_path / "out.h5"
    with pytest.raises(FixtureError, match=pattern) as info:
        import_npz(npz, out, gridsize=2)
    assert str(info.value).startswith(f"{npz}: ")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["odd.npz"]

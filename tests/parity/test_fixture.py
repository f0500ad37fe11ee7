import dataclasses
import importlib.util
import json
import shutil
import sys

import h5py
import numpy as np
import pytest

from parity.batch import normalise_probe
from parity.config import ModelConfig
from parity.errors import FixtureError, ParityInputError
from parity.fixture import (
    FixtureData,
    available_fixtures,
    bundled_fixture,
    bundled_fixtures_dir,
    dataset_sha256,
    file_sha256,
    fixture_data_sha256,
    iter_batches,
    load_fixture,
    read_sha256sums,
    write_fixture,
)
from parity.simulate import (
    BUNDLED_FIXTURES,
    SimulationParams,
    compare_bundled,
    first_member_offsets,
    simulate,
    write_bundled_fixtures,
)

CONFIGS = {
    "n64_g2_lines": ModelConfig(N=64, gridsize=2),
    "n64_g1_grf": ModelConfig(N=64, gridsize=1),
    "n128_g2_lines": ModelConfig(N=128, gridsize=2),
    "n128_g1_grf": ModelConfig(N=128, gridsize=1),
}


@pytest.fixture(scope="module")
def small():
    return simulate(SimulationParams(kind="grf", N=64, gridsize=2, seed=11, scan_shape=(3, 4), nphotons=1e6))


@pytest.fixture
def copy(tmp_path):
    """A private copy of the small bundled fixture, safe to damage."""
    dst = tmp_path / "fixture.h5"
    shutil.copyfile(bundled_fixture("n64_g2_lines"), dst)
    return dst


# --- bundled fixtures -------------------------------------------------------------------------------


def test_bundled_fixtures_exist_and_match_sha256sums():
    d = bundled_fixtures_dir()
    sums = read_sha256sums(d / "SHA256SUMS")
    assert set(sums) == {f"{name}.h5" for name in BUNDLED_FIXTURES}
    assert set(sums) >= {"n64_g2_lines.h5", "n64_g1_grf.h5", "n128_g2_lines.h5", "n128_g1_grf.h5"}
    total = 0
    for fname, digest in sums.items():
        assert file_sha256(d / fname) == digest, fname
        total += (d / fname).stat().st_size
    assert total < 9e6  # one per (N, gridsize) plus a small off-centre one: small enough for the wheel


def test_regenerating_reproduces_the_committed_fixtures_bit_for_bit(tmp_path):
    hashes = write_bundled_fixtures(tmp_path)
    committed = bundled_fixtures_dir()
    assert compare_bundled(committed, tmp_path) == []
    assert hashes == read_sha256sums(committed / "SHA256SUMS")
    assert (tmp_path / "SHA256SUMS").read_bytes() == (committed / "SHA256SUMS").read_bytes()
    for fname in hashes:
        assert load_fixture(tmp_path / fname).dataset_sha256 == load_fixture(committed / fname).dataset_sha256


def test_compare_bundled_names_the_changed_dataset(tmp_path):
    write_bundled_fixtures(tmp_path)
    with h5py.File(tmp_path / "n64_g1_grf.h5", "r+") as fh:
        fh["xcoords"][0] += 0.25
        hashes = json.loads(fh.attrs["sha256"])
        hashes["xcoords"] = dataset_sha256("xcoords", fh["xcoords"][()])
        fh.attrs["sha256"] = json.dumps(hashes, sort_keys=True)
    problems = compare_bundled(bundled_fixtures_dir(), tmp_path)
    assert any("n64_g1_grf.h5" in p and "'xcoords'" in p for p in problems)
    assert any("SHA256SUMS" in p for p in problems)


def test_bundled_fixtures_dir_prefers_the_wheel_location(tmp_path, monkeypatch):
    import parity.fixture as fixture_module

    (tmp_path / "_bundled_fixtures").mkdir()
    monkeypatch.setattr(fixture_module.importlib.resources, "files", lambda package: tmp_path)
    assert bundled_fixtures_dir() == tmp_path / "_bundled_fixtures"
    (tmp_path / "_bundled_fixtures").rmdir()
    assert bundled_fixtures_dir() == fixture_module._repo_fixtures_dir()
    # A foreign top-level ``fixtures`` folder (no make_fixtures.py) is not taken for ours.
    monkeypatch.setattr(fixture_module, "_repo_fixtures_dir", lambda: tmp_path)
    with pytest.raises(FixtureError, match="no bundled fixtures found"):
        bundled_fixtures_dir()


def test_make_fixtures_script_checks_and_fails_on_a_difference(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # no __pycache__ inside fixtures/
    path = bundled_fixtures_dir() / "make_fixtures.py"
    spec = importlib.util.spec_from_file_location("make_fixtures", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--check"]) == 0
    assert script.main(["--out", str(tmp_path)]) == 0
    assert script.main(["--check", "--out", str(tmp_path)]) == 0
    sums = (tmp_path / "SHA256SUMS").read_text()
    (tmp_path / "SHA256SUMS").write_text(sums.replace(sums[:8], "00000000", 1))
    assert script.main(["--check", "--out", str(tmp_path)]) == 1
    assert "MISMATCH" in capsys.readouterr().err


def test_bundled_fixture_lookup_and_unknown_name():
    assert bundled_fixture("n64_g1_grf") == bundled_fixture("n64_g1_grf.h5")
    with pytest.raises(
        FixtureError,
        match="available: n128_g1_grf, n128_g2_lines, n64_g1_grf, n64_g2_beamstop, n64_g2_lines, n64_g2_offcentre",
    ):
        bundled_fixture("n32_g2_lines")


def test_a_name_meant_as_a_path_is_reported_as_a_missing_file(tmp_path):
    """Not as an unknown bundled fixture: a folder part, a foreign suffix or a dangling link says "file"."""
    cases = {
        str(tmp_path / "sub" / "myfixture"): f"{tmp_path / 'sub' / 'myfixture'}: fixture file does not exist; "
        f"folder {tmp_path / 'sub'} does not exist",
        str(tmp_path / "myfixture"): f"{tmp_path / 'myfixture'}: fixture file does not exist",
        "myfixture.hdf5": "myfixture.hdf5: fixture file does not exist",
    }
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "gone.h5")
    cases[str(link)] = (
        f"{link}: fixture file does not exist (a symbolic link to '{tmp_path / 'gone.h5'}', which does not)"
    )
    for name, message in cases.items():
        with pytest.raises(FixtureError) as info:
            bundled_fixture(name)
        assert str(info.value) == message
        assert "bundled" not in str(info.value)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_bundled_fixture_loads_with_metadata(name):
    fx = load_fixture(bundled_fixture(name), CONFIGS[name])
    params = BUNDLED_FIXTURES[name]
    assert (fx.N, fx.gridsize, fx.kind, fx.seed) == (params.N, params.gridsize, params.kind, params.seed)
    assert fx.params == json.loads(json.dumps(params.to_dict()))
    assert fx.sha256 == file_sha256(fx.path)
    assert fx.object is not None and not fx.diffraction.flags.writeable
    assert fx.n_groups == fx.n_positions == params.scan_shape[0] * params.scan_shape[1]


# --- writer -----------------------------------------------------------------------------------------


def test_writer_is_byte_deterministic_and_round_trips(tmp_path, small):
    a = write_fixture(tmp_path / "a.h5", small)
    b = write_fixture(tmp_path / "b.h5", small)
    assert a.read_bytes() == b.read_bytes()
    fx = load_fixture(a)
    for name, arr in small.arrays().items():
        assert getattr(fx, name).tobytes() == arr.tobytes(), name
        assert fx.dataset_sha256[name] == dataset_sha256(name, arr)
    without_object = write_fixture(tmp_path / "c.h5", dataclasses.replace(small, object=None))
    assert load_fixture(without_object).object is None


def test_writer_refuses_invalid_data_and_leaves_nothing_behind(tmp_path, small):
    bad = small.diffraction.copy()
    bad[1, 2, 3] = np.nan
    target = tmp_path / "bad.h5"
    with pytest.raises(FixtureError, match=r"bad\.h5: dataset 'diffraction' contains 1 non-finite"):
        write_fixture(target, dataclasses.replace(small, diffraction=bad))
    with pytest.raises(FixtureError, match="dataset 'diffraction' has dtype float64"):
        write_fixture(target, dataclasses.replace(small, diffraction=small.diffraction.astype(np.float64)))
    assert list(tmp_path.iterdir()) == []


# --- loader: every violation is a FixtureError naming file and dataset, and the file is untouched ----


def _set_dataset(path, name, value, rehash=False):
    with h5py.File(path, "r+") as fh:
        attrs = dict(fh[name].attrs)
        del fh[name]
        ds = fh.create_dataset(name, data=value, track_times=False)
        ds.attrs.update(attrs)  # a replaced dataset keeps its schema attributes
        if rehash:
            hashes = json.loads(fh.attrs["sha256"])
            hashes[name] = dataset_sha256(name, value)
            fh.attrs["sha256"] = json.dumps(hashes)


def _edit(path, fn):
    with h5py.File(path, "r+") as fh:
        fn(fh)


def _poke(name, index, value):
    def fn(fh):
        arr = fh[name][()]
        arr[index] = value
        fh[name][...] = arr

    return fn


def _set_attr(key, value):
    def fn(fh):
        fh.attrs[key] = value

    return fn


def _del(name, attr=False):
    def fn(fh):
        if attr:
            del fh.attrs[name]
        else:
            del fh[name]

    return fn


def _declare_huge(name, shape, dtype):
    """Replace dataset ``name`` by a chunked one of ``shape`` whose storage is never allocated: a small
    file that declares more data than any machine holds."""

    def fn(fh):
        attrs = dict(fh[name].attrs)
        del fh[name]
        ds = fh.create_dataset(name, shape=shape, dtype=dtype, chunks=(1, *shape[1:]), track_times=False)
        ds.attrs.update(attrs)

    return fn


VIOLATIONS = {
    "schema_version": (_set_attr("schema_version", np.int64(4)), r"attribute 'schema_version' is 4"),
    "no_schema_version": (_del("schema_version", attr=True), r"attribute 'schema_version' is missing"),
    "missing_attribute": (_del("source", attr=True), r"attribute 'source' is missing"),
    "unknown_attribute": (_set_attr("comment", "hi"), r"attribute 'comment' is not part of"),
    "unknown_dataset_attribute": (
        lambda fh: fh["diffraction"].attrs.__setitem__("order", "row-major"),
        r"dataset 'diffraction' has attribute 'order', which is not part of fixture schema version 2",
    ),
    "positions_in_metres": (
        lambda fh: fh["xcoords"].attrs.__setitem__("units", "m"),
        r"dataset 'xcoords' has units='m'; this schema reads only 'pixel'",
    ),
    "positions_axes_swapped": (
        lambda fh: fh["ycoords"].attrs.__setitem__("axis", "x (column)"),
        r"dataset 'ycoords' has axis='x \(column\)'; this schema reads only 'y \(row\)'",
    ),
    "attribute_is_an_array": (
        lambda fh: fh["xcoords"].attrs.__setitem__("units", np.array([b"pixel", b"pixel"])),
        r"dataset 'xcoords' has attribute 'units' = \[b'pixel', b'pixel'\] \(ndarray\); expected the string 'pixel'",
    ),
    "attribute_is_a_number": (
        lambda fh: fh["ycoords"].attrs.__setitem__("axis", 1),
        r"dataset 'ycoords' has attribute 'axis' = 1 \(int64\); expected the string 'y \(row\)'",
    ),
    "huge_declared_dataset": (
        _declare_huge("diffraction", (10**9, 64, 64), "<f4"),
        r"dataset 'diffraction' declares shape \(1000000000, 64, 64\) of float32, 15258.8 GiB, more than the "
        r"whole file \(1.4 MiB\)",
    ),
    "positions_without_units": (
        lambda fh: fh["xcoords"].attrs.__delitem__("units"),
        r"dataset 'xcoords' lacks attribute 'units' \(expected 'pixel'\)",
    ),
    "bad_params_json": (_set_attr("params", "{not json"), r"attribute 'params' is not valid JSON"),
    "float_N": (_set_attr("N", 64.0), r"attribute 'N' is 64.0 .*expected an integer"),
    "unknown_kind": (
        _set_attr("kind", "spiral"),
        r"attribute 'kind' is 'spiral'; expected one of lines, grf, npz, custom",
    ),
    "missing_dataset": (_del("probe"), r"dataset 'probe' is missing"),
    "unknown_dataset": (
        lambda fh: fh.create_dataset("extra", data=np.zeros(3)),
        r"dataset 'extra' is not part of",
    ),
    "group_not_dataset": (lambda fh: fh.create_group("object2"), r"'object2' is a Group, not a dataset"),
    "soft_link": (lambda fh: fh.__setitem__("alias", h5py.SoftLink("/probe")), r"'alias' is a SoftLink"),
    "external_link": (
        lambda fh: fh.__setitem__("alias", h5py.ExternalLink("other.h5", "/object")),
        r"'alias' is a ExternalLink",
    ),
    "nan": (_poke("diffraction", (3, 10, 20), np.nan), r"dataset 'diffraction' contains 1 non-finite .*NaN"),
    "inf_probe": (_poke("probe", (1, 1), np.inf), r"dataset 'probe' contains 1 non-finite"),
    "negative": (_poke("diffraction", (0, 0, 1), -2.0), r"dataset 'diffraction' has 1 negative amplitudes"),
    "group_index": (_poke("groups", (5, 2), 81), r"dataset 'groups' holds position index 81 at \(5, 2\)"),
    "negative_group_index": (_poke("groups", (0, 0), -1), r"dataset 'groups' holds position index -1"),
    "hash_mismatch": (
        _poke("diffraction", (2, 32, 32), 1.0),
        r"dataset 'diffraction' does not match its SHA-256 recorded",
    ),
    "hash_mismatch_coords": (_poke("ycoords", 4, 40.0), r"dataset 'ycoords' does not match its SHA-256"),
    "hash_missing": (
        _set_attr("sha256", json.dumps({"diffraction": "0" * 64})),
        r"attribute 'sha256' records no hash for dataset",
    ),
    "hash_not_hex": (_set_attr("sha256", json.dumps({"probe": "xyz"})), r"attribute 'sha256' records 'xyz'"),
}


def _reshape_violation(name, value, rehash=True):
    return lambda path: _set_dataset(path, name, value, rehash=rehash)


SHAPE_AND_DTYPE = {
    "all_zero_diffraction": (  # a beamstop as wide as the pattern; make-fixture wrote one until 2026-12-05
        _reshape_violation("diffraction", np.zeros((81, 64, 64), np.float32)),
        r"dataset 'diffraction' is all zero; it cannot be normalised",
    ),
    "wrong_shape_coords": (
        _reshape_violation("xcoords", np.zeros(80)),
        r"dataset 'xcoords' has shape \(80,\); expected \(81,\)",
    ),
    "wrong_shape_diffraction": (
        _reshape_violation("diffraction", np.zeros((81, 64, 32), np.float32)),
        r"dataset 'diffraction' has shape \(81, 64, 32\); expected \(n, 64, 64\)",
    ),
    "wrong_shape_probe": (
        _reshape_violation("probe", np.ones((32, 32), np.complex64)),
        r"dataset 'probe' has shape \(32, 32\); expected \(64, 64\)",
    ),
    "wrong_shape_groups": (
        _reshape_violation("groups", np.zeros((81, 3), np.int64)),
        r"dataset 'groups' has shape \(81, 3\); expected \(n_groups, 4\)",
    ),
    "wrong_dtype_diffraction": (
        _reshape_violation("diffraction", np.ones((81, 64, 64), np.float64)),
        r"dataset 'diffraction' has dtype float64; expected float32",
    ),
    "wrong_dtype_probe": (
        _reshape_violation("probe", np.ones((64, 64), np.complex128)),
        r"dataset 'probe' has dtype complex128; expected complex64",
    ),
    "wrong_dtype_groups": (
        _reshape_violation("groups", np.zeros((81, 4), np.int32)),
        r"dataset 'groups' has dtype int32; expected int64",
    ),
}


@pytest.mark.parametrize("case", sorted(VIOLATIONS))
def test_loader_rejects_violation_naming_file_and_item_without_touching_it(copy, case):
    edit, pattern = VIOLATIONS[case]
    _edit(copy, edit)
    before = file_sha256(copy)
    with pytest.raises(FixtureError, match=pattern) as info:
        load_fixture(copy)
    assert str(info.value).startswith(f"{copy}: ")
    assert file_sha256(copy) == before


@pytest.mark.parametrize("case", sorted(SHAPE_AND_DTYPE))
def test_loader_rejects_wrong_shape_and_dtype(copy, case):
    edit, pattern = SHAPE_AND_DTYPE[case]
    edit(copy)
    before = file_sha256(copy)
    with pytest.raises(FixtureError, match=pattern) as info:
        load_fixture(copy)
    assert str(info.value).startswith(f"{copy}: ")
    assert file_sha256(copy) == before


@pytest.mark.parametrize(
    ("name", "config", "pattern"),
    [
        ("n128_g2_lines", ModelConfig(N=64), r"attribute 'N' is 128 but the config has N=64"),
        ("n64_g2_lines", ModelConfig(gridsize=1), r"attribute 'gridsize' is 2 but the config has gridsize=1"),
        ("n64_g1_grf", ModelConfig(N=128, gridsize=1), r"attribute 'N' is 64 but the config has N=128"),
    ],
)
def test_loader_rejects_config_mismatch(name, config, pattern):
    path = bundled_fixture(name)
    before = file_sha256(path)
    with pytest.raises(FixtureError, match=pattern) as info:
        load_fixture(path, config)
    assert str(info.value).startswith(f"{path}: ")
    assert file_sha256(path) == before


def test_loader_rejects_truncated_corrupt_missing_and_foreign_files(tmp_path, copy):
    raw = copy.read_bytes()
    cases = {
        "truncated.h5": raw[: len(raw) // 2],
        "empty.h5": b"",
        "header.h5": b"\x00" * 64 + raw[64:],
        "text.h5": b"diffraction, xcoords, ycoords\n",
    }
    for fname, content in cases.items():
        p = tmp_path / fname
        p.write_bytes(content)
        with pytest.raises(FixtureError, match="not a readable HDF5 file") as info:
            load_fixture(p)
        assert str(info.value).startswith(f"{p}: ")
        assert p.read_bytes() == content
    with pytest.raises(FixtureError, match=r"missing\.h5: fixture file does not exist"):
        load_fixture(tmp_path / "missing.h5")
    with pytest.raises(FixtureError, match="not a regular file"):
        load_fixture(tmp_path)
    # Damage inside the data: the bytes still parse as HDF5, the recorded hash catches it.
    pos = raw.rfind(np.ascontiguousarray(load_fixture(copy).xcoords).tobytes()[:16])
    assert pos > 0
    flipped = bytearray(raw)
    flipped[pos + 3] ^= 0x01
    p = tmp_path / "bitflip.h5"
    p.write_bytes(bytes(flipped))
    with pytest.raises(FixtureError, match=r"dataset 'xcoords' does not match its SHA-256"):
        load_fixture(p)


def test_loader_accepts_a_file_whose_hashes_were_rewritten_consistently(copy):
    """The hash check is about accidental change; a deliberate, re-hashed edit is a new fixture."""
    _set_dataset(copy, "xcoords", load_fixture(copy).xcoords + 0.5, rehash=True)
    assert load_fixture(copy).xcoords[0] == load_fixture(bundled_fixture("n64_g2_lines")).xcoords[0] + 0.5


# --- canonical batches ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_batches_follow_forward_model_section_2(name):
    cfg = CONFIGS[name]
    fx = load_fixture(bundled_fixture(name), cfg)
    batches = list(iter_batches(fx, cfg, batch_size=8))
    sizes = [b.size for b in batches]
    assert sum(sizes) == fx.n_groups and all(s == 8 for s in sizes[:-1]) and 1 <= sizes[-1] <= 8
    N, C = cfg.N, cfg.C
    s = cfg.input_scale
    # The normalisation factor, from its definition over the whole data set.
    diff = fx.diffraction.astype(np.float64)
    norm = (N / 2) / np.sqrt(np.mean(np.sum(diff**2, axis=(1, 2))))
    assert np.mean(np.sum((diff * norm) ** 2, axis=(1, 2))) == pytest.approx((N / 2) ** 2, rel=1e-12)
    probe = normalise_probe(fx.probe, cfg.probe_scale)
    start = 0
    for b in batches:
        b.validate(cfg)
        B = b.size
        assert b.x.shape == (B, C, N, N) and b.x.dtype == np.float32
        assert b.offsets.shape == (B, C, 2) and b.offsets.dtype == np.float32
        assert b.probe.dtype == np.complex64 and b.probe.tobytes() == probe.tobytes()
        np.testing.assert_array_equal(b.groups, np.arange(start, start + B))
        members = fx.groups[b.groups]
        # Patches in the group's order, scaled by norm · s.
        np.testing.assert_allclose(b.x, (diff[members] * norm * s).astype(np.float32), rtol=1e-6)
        # Offsets: −(position − group mean), [dx, dy] = [x, y].
        pos = np.stack([fx.xcoords, fx.ycoords], axis=-1)[members]
        np.testing.assert_allclose(b.offsets, -(pos - pos.mean(axis=1, keepdims=True)), atol=1e-5)
        np.testing.assert_allclose(b.offsets.astype(np.float64).sum(axis=1), 0.0, atol=1e-5)
        start += B
    if cfg.gridsize == 1:
        # Every position appears once: the data-set mean of Σ X² over the batches is (N/2)².
        X = np.concatenate([b.x[:, 0] for b in batches]).astype(np.float64) / s
        assert np.mean(np.sum(X**2, axis=(1, 2))) == pytest.approx((N / 2) ** 2, rel=1e-5)
        assert np.all(np.concatenate([b.offsets for b in batches]) == 0)
    else:
        assert np.abs(np.concatenate([b.offsets for b in batches])).max() > 0.5


def test_batches_are_identical_on_repeated_calls_and_max_groups_takes_a_prefix():
    cfg = CONFIGS["n64_g2_lines"]
    fx = load_fixture(bundled_fixture("n64_g2_lines"), cfg)
    first = list(iter_batches(fx, cfg, 5, max_groups=12))
    second = list(iter_batches(load_fixture(bundled_fixture("n64_g2_lines")), cfg, 5, max_groups=12))
    assert [b.size for b in first] == [5, 5, 2]
    for a, b in zip(first, second, strict=True):
        for key in ("x", "offsets", "probe", "groups"):
            assert getattr(a, key).tobytes() == getattr(b, key).tobytes(), key
    full = list(iter_batches(fx, cfg, 12))
    # The normalisation uses the whole data set, so a prefix run sees the same numbers.
    assert np.concatenate([b.x for b in first]).tobytes() == full[0].x.tobytes()
    assert sum(b.size for b in iter_batches(fx, cfg, 50, max_groups=10_000)) == fx.n_groups


def test_batches_reject_bad_arguments_and_mismatched_config(small):
    cfg = ModelConfig(N=64, gridsize=2)
    with pytest.raises(ParityInputError, match="batch_size"):
        next(iter_batches(small, cfg, 0))
    with pytest.raises(ParityInputError, match="max_groups"):
        next(iter_batches(small, cfg, 2, max_groups=0))
    with pytest.raises(FixtureError, match="attribute 'gridsize' is 2 but the config has gridsize=1"):
        next(iter_batches(small, ModelConfig(gridsize=1), 2))
    zero = dataclasses.replace(small, diffraction=np.zeros_like(small.diffraction))
    with pytest.raises(FixtureError, match="all zero"):
        next(iter_batches(zero, cfg, 2))


def test_fixture_data_works_without_a_file(small):
    """Simulated data can be batched directly, the same way as a loaded fixture."""
    cfg = ModelConfig()
    assert isinstance(small, FixtureData)
    batches = list(iter_batches(small, cfg, 4))
    assert sum(b.size for b in batches) == small.n_groups == 12


def test_version_1_fixtures_are_still_read(copy):
    """Version 1 had no dataset attributes (pixels and x = column by definition); it still loads, and
    an attribute on its datasets is still refused."""

    def to_version_1(fh):
        fh.attrs["schema_version"] = np.int64(1)
        for name in ("xcoords", "ycoords"):
            for key in list(fh[name].attrs):
                del fh[name].attrs[key]

    _edit(copy, to_version_1)
    assert load_fixture(copy).n_positions == 81
    _edit(copy, lambda fh: fh["xcoords"].attrs.__setitem__("units", "pixel"))
    with pytest.raises(
        FixtureError, match=r"dataset 'xcoords' has attribute 'units', which is not part of fixture schema version 1"
    ):
        load_fixture(copy)


# --- stored, non-centred offsets (schema 3) ---------------------------------------------------------

OFFCENTRE = "n64_g2_offcentre"


@pytest.fixture
def offcentre_copy(tmp_path):
    """A private copy of the bundled fixture with stored offsets, safe to damage."""
    dst = tmp_path / "offcentre.h5"
    shutil.copyfile(bundled_fixture(OFFCENTRE), dst)
    return dst


def _with_offsets(data, offsets):
    return dataclasses.replace(data, offsets=np.asarray(offsets, dtype=np.float64))


def test_offcentre_fixture_is_bundled_and_stores_offsets_from_each_groups_first_member():
    cfg = ModelConfig()
    fx = load_fixture(bundled_fixture(OFFCENTRE), cfg)
    params = BUNDLED_FIXTURES[OFFCENTRE]
    assert OFFCENTRE in available_fixtures() and list(BUNDLED_FIXTURES)[-1] == OFFCENTRE
    assert (fx.N, fx.gridsize, fx.n_positions, fx.n_groups) == (64, 2, 16, 16)
    assert fx.params == json.loads(json.dumps(params.to_dict())) and fx.params["offsets_origin"] == "first_member"
    assert bundled_fixture(OFFCENTRE).stat().st_size < 1e6
    with h5py.File(bundled_fixture(OFFCENTRE), "r") as fh:
        assert int(fh.attrs["schema_version"]) == 3
        assert dict(fh["offsets"].attrs) == {"units": "pixel", "components": "[dx, dy] = [x (column), y (row)]"}
    assert fx.offsets is not None and fx.offsets.shape == (16, 4, 2) and fx.offsets.dtype == np.float64
    assert not fx.offsets.flags.writeable
    assert fx.dataset_sha256["offsets"] == dataset_sha256("offsets", fx.offsets)
    # −(position − position of the group's first member), [dx, dy] = [x, y]: the first member sits at 0.
    pos = np.stack([fx.xcoords, fx.ycoords], axis=-1)[fx.groups]
    np.testing.assert_array_equal(fx.offsets, -(pos - pos[:, :1]))
    np.testing.assert_array_equal(fx.offsets, first_member_offsets(fx.xcoords, fx.ycoords, fx.groups))
    assert np.all(fx.offsets[:, 0] == 0) and not np.signbit(fx.offsets[:, 0]).any()
    # Not centred: every group's offsets sum to a clearly nonzero vector, different between groups.
    sums = fx.offsets.sum(axis=1)
    assert np.linalg.norm(sums, axis=1).min() > 1.0
    assert len(np.unique(np.round(sums, 6), axis=0)) == fx.n_groups
    # The older fixtures keep schema version 2 and have no offsets.
    for name in CONFIGS:
        with h5py.File(bundled_fixture(name), "r") as fh:
            assert int(fh.attrs["schema_version"]) == 2 and "offsets" not in fh
        assert load_fixture(bundled_fixture(name)).offsets is None


@pytest.mark.parametrize("batch_size", [1, 2, 3, 16])
def test_batches_carry_exactly_the_stored_offsets(batch_size):
    cfg = ModelConfig()
    fx = load_fixture(bundled_fixture(OFFCENTRE), cfg)
    batches = list(iter_batches(fx, cfg, batch_size))
    assert sum(b.size for b in batches) == fx.n_groups
    for b in batches:
        b.validate(cfg)
        assert b.offsets.dtype == np.float32
        assert b.offsets.tobytes() == fx.offsets[b.groups].astype(np.float32).tobytes()
        group_sums = b.offsets.astype(np.float64).sum(axis=1)
        assert np.all(np.linalg.norm(group_sums, axis=1) > 1.0)  # not centred per group
        if b.size >= 2:
            d_bar = b.offsets.astype(np.float64).reshape(-1, 2).mean(axis=0)
            assert np.linalg.norm(d_bar) > 0.05, d_bar  # a nonzero batch mean d̄ over the B·C offsets
    if batch_size == 2:
        d_bar = batches[0].offsets.astype(np.float64).reshape(-1, 2).mean(axis=0)
        assert np.all(np.abs(d_bar) > 0.5)
    # Everything else is built as without stored offsets.
    centred = list(iter_batches(dataclasses.replace(fx, offsets=None), cfg, batch_size))
    for a, b in zip(batches, centred, strict=True):
        for key in ("x", "probe", "groups"):
            assert getattr(a, key).tobytes() == getattr(b, key).tobytes(), key
        assert not np.array_equal(a.offsets, b.offsets)


def test_without_stored_offsets_batches_are_centred_per_group(small):
    cfg = ModelConfig()
    assert small.offsets is None
    pos = np.stack([small.xcoords, small.ycoords], axis=-1)
    for b in iter_batches(small, cfg, 5):
        p = pos[small.groups[b.groups]]
        assert b.offsets.tobytes() == (-(p - p.mean(axis=1, keepdims=True))).astype(np.float32).tobytes()
        np.testing.assert_allclose(b.offsets.astype(np.float64).sum(axis=1), 0.0, atol=1e-5)


def test_positions_whose_derived_offsets_leave_the_canvas_entirely_are_refused(tmp_path, small):
    """One member 1e7 pixels from its group, hashes consistent: every derived offset of the group moved
    its patch off the canvas, all outputs were zero and the comparison passed on nothing."""
    cfg = ModelConfig()  # M = 78, N = 64: a derived offset must stay below (M + N)/2 = 71 pixels
    far = small.xcoords.copy()
    far[small.groups[0, 0]] += 1e7
    data = dataclasses.replace(small, xcoords=far)
    path = write_fixture(tmp_path / "far.h5", data)  # without a config: nothing to check against
    before = file_sha256(path)
    pattern = (
        r"dataset 'xcoords' puts member 0 of group 0 \(position 0\) 7.5e\+06 pixels from its group's mean "
        r"position .*dx = -7.5e\+06, moves the patch entirely off the canvas \(\|dx\| must be below \(M \+ N\)/2 = "
        r"71 pixels; M = 78, N = 64\)"
    )
    for attempt in (lambda: load_fixture(path, cfg), lambda: next(iter_batches(load_fixture(path), cfg, 1))):
        with pytest.raises(FixtureError, match=pattern) as info:
            attempt()
        assert str(info.value).startswith(f"{path}: ")
    assert file_sha256(path) == before
    target = tmp_path / "refused.h5"
    with pytest.raises(FixtureError, match=pattern):
        write_fixture(target, data, cfg)
    assert not target.exists()
    # Offsets that cut a patch but keep part of it on the canvas are run, as before: the sweep's
    # canvases without margin, and a member 80 pixels away (derived offsets up to about 61).
    no_margin = ModelConfig(offset=0, max_position_jitter=0)
    assert sum(b.size for b in iter_batches(small, no_margin, 4)) == small.n_groups
    ys = small.ycoords.copy()
    ys[small.groups[0, 0]] += 80.0
    batches = list(iter_batches(dataclasses.replace(small, ycoords=ys), cfg, 4))
    largest = max(float(np.abs(b.offsets).max()) for b in batches)
    assert sum(b.size for b in batches) == small.n_groups and 7 < largest < 71


def test_offsets_round_trip_bit_exact_and_deterministic(tmp_path, small):
    rng = np.random.default_rng(5)
    offsets = rng.uniform(-6.5, 6.5, size=(small.n_groups, 4, 2))
    offsets[0, 0] = [-0.0, 1e-300]  # signed zero and a subnormal survive too
    data = _with_offsets(small, offsets)
    a = write_fixture(tmp_path / "a.h5", data, ModelConfig())
    b = write_fixture(tmp_path / "b.h5", data)
    assert a.read_bytes() == b.read_bytes()
    fx = load_fixture(a, ModelConfig())
    assert fx.offsets.tobytes() == offsets.tobytes()
    for name, arr in data.arrays().items():
        assert getattr(fx, name).tobytes() == arr.tobytes(), name
    assert set(fx.dataset_sha256) == set(data.arrays()) and "offsets" in fx.dataset_sha256
    with h5py.File(a, "r") as fh:
        assert int(fh.attrs["schema_version"]) == 3
        assert json.loads(fh.attrs["sha256"])["offsets"] == dataset_sha256("offsets", offsets)
    # The in-memory hash covers the offsets; without them the file is the same version 2 file as before.
    assert fixture_data_sha256(data) != fixture_data_sha256(small)
    assert fixture_data_sha256(data) != fixture_data_sha256(_with_offsets(small, offsets + 0.25))
    plain = write_fixture(tmp_path / "plain.h5", small)
    with h5py.File(plain, "r") as fh:
        assert int(fh.attrs["schema_version"]) == 2 and "offsets" not in fh
    # Overwriting with offsets is atomic and gives the same bytes as a fresh write.
    write_fixture(plain, data)
    assert plain.read_bytes() == a.read_bytes()


BAD_OFFSETS = {
    "wrong_shape": (
        lambda o: o[:, :3],
        r"dataset 'offsets' has shape \(12, 3, 2\); expected \(12, 4, 2\), one \[dx, dy\] per member",
    ),
    "wrong_components": (lambda o: o[..., :1], r"dataset 'offsets' has shape \(12, 4, 1\); expected \(12, 4, 2\)"),
    "nan": (lambda o: np.where(np.arange(o.size).reshape(o.shape) == 9, np.nan, o), r"dataset 'offsets' contains 1"),
    "inf": (lambda o: np.full_like(o, np.inf), r"dataset 'offsets' contains 96 non-finite"),
}


@pytest.mark.parametrize("case", sorted(BAD_OFFSETS))
def test_writer_refuses_bad_offsets_and_leaves_everything_as_it_was(tmp_path, small, case):
    make, pattern = BAD_OFFSETS[case]
    offsets = make(np.zeros((small.n_groups, 4, 2)))
    target = tmp_path / "bad.h5"
    with pytest.raises(FixtureError, match=pattern) as info:
        write_fixture(target, _with_offsets(small, offsets))
    assert str(info.value).startswith(f"{target}: ")
    assert list(tmp_path.iterdir()) == []
    existing = write_fixture(tmp_path / "existing.h5", small)
    before = existing.read_bytes()
    with pytest.raises(FixtureError, match=pattern):
        write_fixture(existing, _with_offsets(small, offsets))
    assert existing.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["existing.h5"]


def test_offsets_too_large_for_the_canvas_are_refused_naming_file_and_offsets(tmp_path, small):
    cfg = ModelConfig()  # M = 78, N = 64: a patch may move 7 pixels per axis
    assert (cfg.M - cfg.N) / 2 == 7
    offsets = np.zeros((small.n_groups, 4, 2))
    offsets[3, 2, 1] = 7.0  # exactly on the margin: allowed
    ok = write_fixture(tmp_path / "ok.h5", _with_offsets(small, offsets), cfg)
    assert load_fixture(ok, cfg).offsets[3, 2, 1] == 7.0
    offsets[5, 1, 0] = -7.25
    target = tmp_path / "big.h5"
    pattern = r"dataset 'offsets' holds dx = -7.25 for group 5, member 1 .*canvas margin \(M − N\)/2 = 7 pixels"
    with pytest.raises(FixtureError, match=pattern) as info:
        write_fixture(target, _with_offsets(small, offsets), cfg)
    assert str(info.value).startswith(f"{target}: ") and "'max_position_jitter'" in str(info.value)
    assert not target.exists()
    # Without a config the file can be written and loaded; with one it is refused, file untouched.
    write_fixture(target, _with_offsets(small, offsets))
    before = file_sha256(target)
    assert load_fixture(target).offsets[5, 1, 0] == -7.25
    with pytest.raises(FixtureError, match=pattern) as info:
        load_fixture(target, cfg)
    assert str(info.value).startswith(f"{target}: ")
    with pytest.raises(FixtureError, match=pattern) as info:
        next(iter_batches(load_fixture(target), cfg, 2))
    assert str(info.value).startswith(f"{target}: ")
    assert file_sha256(target) == before
    # A larger canvas holds them.
    big = ModelConfig(max_position_jitter=12)
    assert sum(b.size for b in iter_batches(load_fixture(target, big), big, 4)) == small.n_groups


def test_merge_shift_beyond_the_canvas_is_refused_before_any_batch(tmp_path, small):
    """The merge moves a patch by −(d − d̄), d̄ the batch mean: each |d| <= 7 is not enough when the
    batch's other offsets pull d̄ away."""
    cfg = ModelConfig()
    offsets = np.zeros((small.n_groups, 4, 2))
    offsets[0, :, 0] = 7.0
    offsets[1:3, :, 0] = -7.0
    path = write_fixture(tmp_path / "shift.h5", _with_offsets(small, offsets), cfg)
    fx = load_fixture(path, cfg)
    assert sum(b.size for b in iter_batches(fx, cfg, 1)) == small.n_groups  # d̄ per single group: fine
    assert sum(b.size for b in iter_batches(fx, cfg, 2)) == small.n_groups  # d̄ = 0, shifts of 7: fine
    with pytest.raises(
        FixtureError,
        match=r"dataset 'offsets' of group 0, member 0, dx = 7 is 9.33333 from the mean d̄ = -2.33333 of its batch "
        r"\(groups 0 to 2, batch_size 3\).*canvas margin \(M − N\)/2 = 7",
    ) as info:
        next(iter_batches(fx, cfg, 3))
    assert str(info.value).startswith(f"{path}: ")
    # The same batch, cut short by max_groups, is fine again.
    assert sum(b.size for b in iter_batches(fx, cfg, 3, max_groups=2)) == 2


def _offsets_violation(edit):
    def fn(path):
        with h5py.File(path, "r+") as fh:
            edit(fh)

    return fn


def _replace_offsets(value, rehash=True):
    return lambda path: _set_dataset(path, "offsets", value, rehash=rehash)


OFFSETS_VIOLATIONS = {
    "wrong_shape": (
        _replace_offsets(np.zeros((16, 4, 3))),
        r"dataset 'offsets' has shape \(16, 4, 3\); expected \(16, 4, 2\)",
    ),
    "too_few_groups": (
        _replace_offsets(np.zeros((15, 4, 2))),
        r"dataset 'offsets' has shape \(15, 4, 2\); expected \(16, 4, 2\)",
    ),
    "wrong_dtype": (
        _replace_offsets(np.zeros((16, 4, 2), np.float32)),
        r"dataset 'offsets' has dtype float32; expected float64",
    ),
    "nan": (_offsets_violation(_poke("offsets", (2, 1, 0), np.nan)), r"dataset 'offsets' contains 1 non-finite"),
    "hash_mismatch": (
        _offsets_violation(_poke("offsets", (2, 1, 0), 0.5)),
        r"dataset 'offsets' does not match its SHA-256 recorded",
    ),
    "no_hash": (
        _offsets_violation(
            lambda fh: fh.attrs.__setitem__(
                "sha256", json.dumps({k: v for k, v in json.loads(fh.attrs["sha256"]).items() if k != "offsets"})
            )
        ),
        r"attribute 'sha256' records no hash for dataset 'offsets'",
    ),
    "no_units": (
        _offsets_violation(lambda fh: fh["offsets"].attrs.__delitem__("units")),
        r"dataset 'offsets' lacks attribute 'units' \(expected 'pixel'\)",
    ),
    "swapped_components": (
        _offsets_violation(lambda fh: fh["offsets"].attrs.__setitem__("components", "[dy, dx]")),
        r"dataset 'offsets' has components='\[dy, dx\]'; this schema reads only '\[dx, dy\] = \[x \(column\)",
    ),
    "in_a_version_2_file": (
        _offsets_violation(_set_attr("schema_version", np.int64(2))),
        r"dataset 'offsets' is not part of fixture schema version 2 \(the file's 'schema_version'\); "
        r"it was added in version 3",
    ),
}


@pytest.mark.parametrize("case", sorted(OFFSETS_VIOLATIONS))
def test_loader_rejects_bad_offsets_naming_file_and_dataset_without_touching_it(offcentre_copy, case):
    edit, pattern = OFFSETS_VIOLATIONS[case]
    edit(offcentre_copy)
    before = file_sha256(offcentre_copy)
    with pytest.raises(FixtureError, match=pattern) as info:
        load_fixture(offcentre_copy)
    assert str(info.value).startswith(f"{offcentre_copy}: ")
    assert file_sha256(offcentre_copy) == before


def test_version_2_files_still_load_and_version_3_needs_no_offsets(copy):
    assert load_fixture(copy).offsets is None
    _edit(copy, _set_attr("schema_version", np.int64(3)))
    assert load_fixture(copy).offsets is None
    _edit(copy, lambda fh: fh.create_dataset("extra", data=np.zeros(3)))
    with pytest.raises(
        FixtureError, match=r"dataset 'extra' is not part of fixture schema version 3 \(known: .*offsets"
    ):
        load_fixture(copy)

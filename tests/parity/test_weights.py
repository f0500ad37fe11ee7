import h5py
import numpy as np
import pytest

from parity.config import ModelConfig
from parity.errors import WeightsError
from parity.weights import (
    count_conv_parameters,
    generate_weights,
    load_weights,
    parameter_shapes,
    save_weights,
    weights_sha256,
)


def test_parameter_counts_match_the_spec_table(spec_parameter_count):
    changes, count = spec_parameter_count
    assert count_conv_parameters(ModelConfig(**changes)) == count


def test_generated_weights_are_seeded_glorot_with_nonzero_biases():
    cfg = ModelConfig()
    w = generate_weights(cfg, seed=1)
    assert weights_sha256(w) == weights_sha256(generate_weights(cfg, seed=1))
    assert weights_sha256(w) != weights_sha256(generate_weights(cfg, seed=2))
    k = w["encoder.block1.conv0.kernel"]
    limit = np.sqrt(6 / (9 * 64 + 9 * 128))
    assert k.shape == (3, 3, 64, 128) and np.abs(k).max() <= limit and np.abs(k).max() > 0.9 * limit
    for name, arr in w.items():
        assert arr.dtype == np.float32
        if name.endswith(".bias"):
            assert np.all(np.abs(arr) >= 0.005) and np.all(np.abs(arr) < 0.05)
    assert float(w["log_scale"]) == pytest.approx(np.log(np.sqrt(1e9) / 32), rel=1e-6)


def test_save_load_round_trip_is_bit_exact(tmp_path):
    cfg = ModelConfig(gridsize=1, probe_big=False)
    w = generate_weights(cfg)
    path = tmp_path / "w.h5"
    digest = save_weights(path, w, cfg)
    back = load_weights(path, cfg)
    assert digest == weights_sha256(back)
    assert list(back) == list(parameter_shapes(cfg))
    for k in w:
        assert back[k].dtype == w[k].dtype and np.array_equal(back[k], w[k])


def _tamper(path, fn):
    with h5py.File(path, "a") as fh:
        fn(fh)


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (lambda fh: fh.__delitem__("phase.head.centre.bias"), r"missing parameter 'phase.head.centre.bias'"),
        (
            lambda fh: fh.create_dataset("amp.head.extra.bias", data=np.zeros(3, np.float32)),
            r"unexpected parameter 'amp.head.extra.bias'",
        ),
        (
            lambda fh: (
                fh.__delitem__("encoder.block0.conv0.kernel"),
                fh.create_dataset("encoder.block0.conv0.kernel", data=np.zeros((3, 3, 1, 64), np.float32)),
            ),
            r"parameter 'encoder.block0.conv0.kernel' has shape \(3, 3, 1, 64\); expected \(3, 3, 4, 64\)",
        ),
        # A weights file records what it is: its config and hash are required, its schema a number.
        (lambda fh: fh.attrs.__delitem__("config"), "attribute 'config' is missing"),
        (lambda fh: fh.attrs.__delitem__("sha256"), "attribute 'sha256' is missing"),
        (lambda fh: fh.attrs.__setitem__("config", "{not json"), "attribute 'config' is not valid JSON"),
        (lambda fh: fh.attrs.__setitem__("schema_version", np.array([1, 2])), "attribute 'schema_version' is"),
        (lambda fh: fh.create_group("encoder.extra"), "'encoder.extra' is a Group, not a dataset"),
        # Links are refused by name, as in fixtures; a dangling one is not followed.
        (
            lambda fh: fh.__setitem__("extra", h5py.SoftLink("/nowhere")),
            "'extra' is a SoftLink; a weights file holds no",
        ),
        (
            lambda fh: fh.__setitem__("extra", h5py.ExternalLink("/nonexistent.h5", "/x")),
            "'extra' is a ExternalLink; a weights file holds no links",
        ),
        (
            lambda fh: fh.__setitem__("log_scale.alias", h5py.SoftLink("/log_scale")),
            "'log_scale.alias' is a SoftLink",
        ),
        # A shape larger than the file is refused before it is allocated.
        (
            lambda fh: (
                fh.__delitem__("log_scale"),
                fh.create_dataset("log_scale", shape=(10**12,), dtype="<f4", chunks=(1024,)),
            ),
            r"dataset 'log_scale' declares shape \(1000000000000,\) of float32, 3725.3 GiB, more than the whole file",
        ),
    ],
)
def test_bad_weights_files_name_the_parameter(tmp_path, tamper, message):
    cfg = ModelConfig()
    path = tmp_path / "w.h5"
    save_weights(path, generate_weights(cfg), cfg)
    _tamper(path, tamper)
    before = path.read_bytes()
    with pytest.raises(WeightsError, match=message) as info:
        load_weights(path, cfg)
    assert str(info.value).startswith(f"{path}: ")
    assert path.read_bytes() == before


def test_weights_for_another_config_rejected(tmp_path):
    path = tmp_path / "w.h5"
    save_weights(path, generate_weights(ModelConfig(probe_big=False)), ModelConfig(probe_big=False))
    with pytest.raises(
        WeightsError, match=r"made for another config than the run's \(probe_big: file False, run True\)"
    ):
        load_weights(path, ModelConfig())


def test_weights_whose_shapes_fit_another_config_are_still_rejected(tmp_path):
    """An activation leaves no trace in the shapes: only the recorded config can tell."""
    made, run = ModelConfig(amp_activation="relu"), ModelConfig()
    path = tmp_path / "w.h5"
    save_weights(path, generate_weights(made), made)
    with pytest.raises(WeightsError, match=r"amp_activation: file 'relu', run 'sigmoid'"):
        load_weights(path, run)


def test_corrupt_and_missing_files(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        load_weights(tmp_path / "none.h5", ModelConfig())
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5")
    with pytest.raises(WeightsError, match="not a readable HDF5 weights file"):
        load_weights(bad, ModelConfig())


def test_modified_values_detected_by_hash(tmp_path):
    cfg = ModelConfig()
    path = tmp_path / "w.h5"
    save_weights(path, generate_weights(cfg), cfg)
    _tamper(path, lambda fh: fh["log_scale"].write_direct(np.asarray(1.0, np.float32)))
    with pytest.raises(WeightsError, match="do not match the SHA-256"):
        load_weights(path, cfg)


def test_failed_save_leaves_existing_file_intact(tmp_path):
    cfg = ModelConfig()
    path = tmp_path / "w.h5"
    save_weights(path, generate_weights(cfg), cfg)
    before = path.read_bytes()
    broken = generate_weights(cfg)
    broken["log_scale"] = np.asarray(np.nan, np.float32)
    with pytest.raises(WeightsError, match="'log_scale' contains NaN"):
        save_weights(path, broken, cfg)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["w.h5"]

import pytest

from parity.config import ModelConfig, config_diff
from parity.errors import ConfigError


def test_defaults_and_derived_sizes():
    c = ModelConfig()
    assert (c.N, c.gridsize, c.C, c.M, c.out_ch, c.F) == (64, 2, 4, 78, 4, 64)
    assert c.encoder_filters == (64, 128, 256)
    assert ModelConfig(N=128).encoder_filters == (32, 64, 128, 256)
    assert ModelConfig(object_big=False).out_ch == 1


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"unknown key 'gridsise' \(value 2\); allowed keys: N, gridsize"):
        ModelConfig.from_mapping({"gridsise": 2})


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("N", "64", r"key 'N' has value '64' of type str; expected one of 64, 128"),
        ("object_big", 1, r"key 'object_big' has value 1 of type int; expected a bool"),
        ("gridsize", True, r"key 'gridsize' has value True of type bool; expected one of 1, 2"),
        ("nphotons", "1e9", r"key 'nphotons' has value '1e9' of type str; expected a finite float > 0"),
        ("amp_activation", 3, r"key 'amp_activation' has value 3 of type int"),
    ],
)
def test_wrong_type_is_named(key, value, fragment):
    with pytest.raises(ConfigError, match=fragment):
        ModelConfig.from_mapping({key: value})


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("N", 96, r"key 'N' has value 96; allowed: one of 64, 128"),
        ("gridsize", 3, r"key 'gridsize' has value 3; allowed: one of 1, 2"),
        ("n_filters_scale", 3, r"allowed: one of 1, 2, 4"),
        ("amp_activation", "tanh", r"key 'amp_activation' has value 'tanh'; allowed: one of 'sigmoid', 'swish'"),
        ("probe_scale", 0, r"key 'probe_scale' has value 0.0; allowed: a finite float > 0"),
        ("nphotons", float("inf"), r"key 'nphotons' has value inf"),
        ("offset", -1, r"key 'offset' has value -1; allowed: an int >= 0"),
    ],
)
def test_out_of_range_is_named(key, value, fragment):
    with pytest.raises(ConfigError, match=fragment):
        ModelConfig.from_mapping({key: value})


def test_odd_canvas_margin_rejected():
    with pytest.raises(ConfigError, match="M - N odd"):
        ModelConfig(max_position_jitter=9)


def test_source_is_named_in_errors():
    with pytest.raises(ConfigError, match=r"^my.toml: key 'N'"):
        ModelConfig.from_mapping({"N": 7}, source="my.toml")


def test_int_accepted_for_float_field_and_replace():
    c = ModelConfig.from_mapping({"probe_scale": 10})
    assert c.probe_scale == 10.0 and isinstance(c.probe_scale, float)
    assert c.replace(N=128).N == 128
    with pytest.raises(ConfigError):
        c.replace(N=5)


def test_short_id_lists_only_changes():
    assert ModelConfig().short_id() == "default"
    assert ModelConfig(gridsize=1, probe_big=False).short_id() == "gridsize=1-probe_big=0"


def test_config_diff_names_differing_keys():
    a = ModelConfig().to_dict()
    b = {**a, "object_big": False}
    assert config_diff({"tf": a, "torch": b}) == {"object_big": {"tf": True, "torch": False}}
    assert config_diff({"tf": a, "torch": dict(a)}) == {}
    missing = dict(a)
    del missing["offset"]
    assert config_diff({"tf": a, "torch": missing}) == {"offset": {"tf": 4, "torch": "<missing>"}}


def test_canvas_size_overrides_the_derived_canvas_and_is_checked():
    assert ModelConfig().M == 78 and ModelConfig().canvas_size is None
    own = ModelConfig(canvas_size=68)
    assert own.M == 68 and own.short_id() == "canvas_size=68"
    assert own.resolved_dict()["canvas_size"] == 68 and ModelConfig().resolved_dict()["canvas_size"] == 78
    assert ModelConfig.from_mapping({"canvas_size": None}) == ModelConfig()
    for bad in (62, 69):
        with pytest.raises(ConfigError, match="'canvas_size' has value"):
            ModelConfig(canvas_size=bad)
    with pytest.raises(ConfigError, match=r"'canvas_size'.*expected an int >= 1 or null"):
        ModelConfig.from_mapping({"canvas_size": "68"})

import pytest

from parity.config import ModelConfig
from parity.errors import ToleranceError
from parity.tolerances import default_tolerance_file, load_tolerances

BASE = """
schema_version = 1
[elementwise]
atol = 1e-6
rtol = 1e-5
pair_factor = 2.0
[statistics]
atol = 1e-7
rtol = 1e-7
"""


def _write(tmp_path, text):
    p = tmp_path / "tol.toml"
    p.write_text(text)
    return p


def test_bundled_file_is_valid_for_both_profiles():
    for profile in ("cpu", "cuda"):
        tol = load_tolerances(default_tolerance_file(), profile=profile)
        assert tol.profile == profile


def test_patterns_later_entries_win_and_when_filters(tmp_path):
    p = _write(
        tmp_path,
        BASE
        + """
[[elementwise.tap]]
pattern = "encoder.*"
atol = 1e-4
rtol = 0.0
[[elementwise.tap]]
pattern = "encoder.block0.*"
atol = 2e-4
rtol = 0.0
[[elementwise.tap]]
pattern = "object.*"
atol = 0.5
rtol = 0.0
when = { probe_big = true, N = 128 }
""",
    )
    tol = load_tolerances(p)
    cfg = ModelConfig()
    assert tol.elementwise("encoder.block1.conv0", cfg) == (1e-4, 0.0)
    assert tol.elementwise("encoder.block0.conv0", cfg) == (2e-4, 0.0)
    assert tol.elementwise("encoder.block0.conv0", cfg, pair=True) == (4e-4, 0.0)
    assert tol.elementwise("object.canvas", cfg) == (1e-6, 1e-5)
    assert tol.elementwise("object.canvas", ModelConfig(N=128)) == (0.5, 0.0)
    assert tol.statistic("output.amplitude", "mean", "torch", cfg) == (1e-7, 1e-7)


def test_profile_overrides_base(tmp_path):
    p = _write(
        tmp_path,
        BASE
        + """
[profiles.cuda.elementwise]
atol = 1e-3
[[profiles.cuda.elementwise.tap]]
pattern = "physics.*"
atol = 1.0
rtol = 0.0
""",
    )
    cpu, cuda = load_tolerances(p, "cpu"), load_tolerances(p, "cuda")
    assert cpu.elementwise("input.scaled", None) == (1e-6, 1e-5)
    assert cuda.elementwise("input.scaled", None) == (1e-3, 1e-5)
    assert cuda.elementwise("physics.diffraction", None) == (1.0, 0.0)


def test_statistics_entries_filter_by_statistic_and_backend(tmp_path):
    p = _write(
        tmp_path,
        BASE
        + """
[[statistics.tap]]
pattern = "*"
statistic = "phase.*"
backend = "torch"
atol = 0.1
rtol = 0.0
""",
    )
    tol = load_tolerances(p)
    assert tol.statistic("object.canvas", "phase.mean", "torch", None) == (0.1, 0.0)
    assert tol.statistic("object.canvas", "phase.mean", "tensorflow", None) == (1e-7, 1e-7)
    assert tol.statistic("object.canvas", "amplitude.mean", "torch", None) == (1e-7, 1e-7)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('[[elementwise.tap]]\npattern = "encodr.*"\natol = 1\nrtol = 1\n', r"pattern 'encodr\.\*' matches no tap"),
        (
            '[[elementwise.tap]]\npattern = "encoder.*"\natol = -1\nrtol = 1\n',
            r"key 'atol' must be a finite number >= 0",
        ),
        ('[[elementwise.tap]]\npattern = "encoder.*"\natol = "x"\nrtol = 1\n', r"key 'atol' must be a number"),
        ('[[elementwise.tap]]\npattern = "encoder.*"\nrtol = 1\n', r"missing required key 'atol'"),
        ('[[elementwise.tap]]\npattern = "encoder.*"\natol = 1\nrtol = 1\nrtoll = 2\n', r"unknown key 'rtoll'"),
        ('[[statistics.tap]]\npattern = "*"\nstatistic = "meen"\natol = 1\nrtol = 1\n', r"statistic 'meen' matches no"),
        (
            '[[elementwise.tap]]\npattern = "*"\natol = 1\nrtol = 1\nwhen = { gridsze = 1 }\n',
            r"'when' names unknown config key 'gridsze'",
        ),
        ("[profiles.tpu.elementwise]\natol = 1\n", r"unknown profile 'tpu'"),
        (
            '[profiles.cuda.elementwise]\n[[profiles.cuda.elementwise.tap]]\npattern = "nope"\natol = 1\nrtol = 1\n',
            "matches no tap",
        ),
    ],
)
def test_bad_files_rejected_with_location(tmp_path, extra, message):
    p = _write(tmp_path, BASE + extra)
    with pytest.raises(ToleranceError, match=message) as info:
        load_tolerances(p)
    assert str(p) in str(info.value)


def test_missing_invalid_and_wrong_version(tmp_path):
    with pytest.raises(ToleranceError, match="does not exist"):
        load_tolerances(tmp_path / "nope.toml")
    with pytest.raises(ToleranceError, match="not valid TOML"):
        load_tolerances(_write(tmp_path, "schema_version = = 1"))
    with pytest.raises(ToleranceError, match="'schema_version' is 2; expected 1"):
        load_tolerances(_write(tmp_path, BASE.replace("schema_version = 1", "schema_version = 2")))
    with pytest.raises(ToleranceError, match=r"missing required table \[statistics\]"):
        load_tolerances(_write(tmp_path, BASE.split("[statistics]")[0]))
    with pytest.raises(ToleranceError, match="profile 'gpu' is unknown"):
        load_tolerances(_write(tmp_path, BASE), profile="gpu")


def test_custom_tap_universe_for_third_party_backends(tmp_path):
    p = _write(tmp_path, BASE + '[[elementwise.tap]]\npattern = "dense.*"\natol = 1\nrtol = 1\n')
    with pytest.raises(ToleranceError):
        load_tolerances(p)
    assert load_tolerances(p, known_taps=["dense.out"]).elementwise("dense.out", None) == (1.0, 1.0)

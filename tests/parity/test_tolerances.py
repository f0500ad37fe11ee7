"""The tolerance model: the file's few factors, how they become elementwise tolerances, and the
checks that keep a typo from silently disabling a comparison."""

import math
import re
import tomllib

import numpy as np
import pytest

from parity.errors import ToleranceError
from parity.stats import stat_names
from parity.taps import all_tap_names
from parity.tolerances import UNIT_ROUNDOFF, default_tolerance_file, load_tolerances, magnitude_scale

U = UNIT_ROUNDOFF["float32"]
BASE = """
schema_version = 2
[model]
floor = 4.0
pair_factor = 2.0
baseline_factor = 2.0
blame_ratio = 2.0
"""
FAMILIES = """
[[family]]
pattern = "encoder.block0.*"
factor = 10.0
[[family]]
pattern = "encoder.*"
factor = 20.0
[[family]]
pattern = "*"
factor = 30.0
"""
CUDA = "[profiles.cuda]\n"


def _write(tmp_path, text):
    p = tmp_path / "tol.toml"
    p.write_text(text)
    return p


def test_bundled_file_is_short_has_no_zero_and_covers_every_tap():
    path = default_tolerance_file()
    text = path.read_text()
    assert len(text.splitlines()) < 200
    data = tomllib.loads(text)
    numbers = [v for fam in data["family"] for k, v in fam.items() if k in ("factor", "measured")]
    numbers += list(data["model"].values()) + [p["device_factor"] for p in data["profiles"].values()]
    assert numbers and all(isinstance(v, float) and v > 0 for v in numbers)
    for profile in ("cpu", "cuda"):
        tol = load_tolerances(path, profile=profile)
        assert tol.profile == profile
        for tap in all_tap_names():
            assert tol.factor(tap) > 0
    assert load_tolerances(path, "cuda").factor("object.canvas") > load_tolerances(path, "cpu").factor("object.canvas")


def test_first_matching_family_wins_and_sets_an_elementwise_atol(tmp_path):
    tol = load_tolerances(_write(tmp_path, BASE + FAMILIES))
    assert tol.factor("encoder.block0.conv0") == 10.0
    assert tol.factor("encoder.block1.conv0") == 20.0
    assert tol.factor("object.canvas") == 30.0
    scale = np.array([[0.5, 2.0], [0.0, 1e6]])
    np.testing.assert_array_equal(tol.atol("encoder.block1.conv0", scale), 20.0 * U * scale)
    np.testing.assert_array_equal(tol.atol("encoder.block1.conv0", scale, pair=True), 40.0 * U * scale)
    # float64 values (a reference's own baseline) get float64's unit roundoff.
    np.testing.assert_array_equal(tol.atol("object.canvas", scale, precision="float64"), 30.0 * 2.0**-53 * scale)
    assert tol.rtol() == 4.0 * U and tol.rtol("float64") == 4.0 * 2.0**-53


def test_a_tolerance_scales_with_what_it_compares(tmp_path):
    """Scaling a tap's values (more photons, larger weights) scales its tolerance the same way."""
    tol = load_tolerances(_write(tmp_path, BASE + FAMILIES))
    values = np.random.default_rng(0).normal(size=(2, 3, 8, 8))
    for k in (1e-3, 1.0, 7.0, 1e6):
        np.testing.assert_allclose(
            tol.atol("object.canvas", magnitude_scale(k * values)),
            k * tol.atol("object.canvas", magnitude_scale(values)),
        )


def test_magnitude_scale_is_the_sample_maximum():
    x = np.zeros((2, 2, 3, 3))
    x[0, 0, 1, 1] = -5.0
    x[0, 1, 0, 0] = 0.25
    x[1, 1, 2, 2] = 0.5
    s = magnitude_scale(x)
    assert s.shape == x.shape
    assert np.all(s[0] == 5.0) and np.all(s[1] == 0.5)


def test_magnitude_scale_leaves_nan_and_infinity_out_of_the_maximum():
    x = np.zeros((3, 2, 2))
    x[0] = [[1.0, np.nan], [-3.0, 0.5]]
    x[1] = [[np.inf, 2.0], [-np.inf, 0.0]]
    x[2, 0, 0] = np.nan  # nothing finite but zeros: a zero scale, not NaN
    s = magnitude_scale(x)
    assert np.all(s[0] == 3.0) and np.all(s[1] == 2.0) and np.all(s[2] == 0.0)
    assert magnitude_scale(np.array([np.nan, 4.0, -np.inf])).tolist() == [4.0, 4.0, 4.0]
    assert magnitude_scale(np.zeros((2, 0, 3))).shape == (2, 0, 3)


def test_statistic_tolerances_follow_the_elementwise_model(tmp_path):
    tol = load_tolerances(_write(tmp_path, BASE + FAMILIES))
    rng = np.random.default_rng(3)
    values = rng.normal(size=(2, 2, 4, 4))
    scale = np.abs(values) + 1.0
    stats, bounds = tol.statistics_with_tolerances("object.canvas", values, scale, "float32")
    assert set(bounds) == set(stat_names(False)) == set(stats)
    np.testing.assert_allclose(stats["mean"], values.reshape(4, 16).mean(axis=1), rtol=1e-12)
    t = 2.0 * (30.0 * U * scale + 4.0 * U * np.abs(values))  # baseline_factor x (atol + rtol|v|)
    flat = values.reshape(4, 16)
    # Each bound is the statistic's response to t, plus one float32 step (2u) of the stored statistic.
    step = 2.0 * U
    np.testing.assert_allclose(bounds["max"], t.reshape(4, 16).max(axis=1) + step * np.abs(flat.max(1)), rtol=1e-6)
    np.testing.assert_allclose(bounds["mean"], t.reshape(4, 16).mean(axis=1) + step * np.abs(flat.mean(1)), rtol=1e-6)
    assert np.all(bounds["nan_count"] == 0.5)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[family]]\npattern = "encodr.*"\nfactor = 1.0\n', r"pattern 'encodr\.\*' matches no tap"),
        (  # first match wins: a family below a catch-all is read by nobody (until 2026-12-05, silently)
            '[[family]]\npattern = "*"\nfactor = 9.0\n[[family]]\npattern = "encoder.*"\nfactor = 2.0\n',
            r"\[\[family\]\] #2: pattern 'encoder\.\*' never applies: every tap it matches is matched first by "
            r"family #1 \('\*'\); families are tried in order",
        ),
        ('[[family]]\npattern = "encoder.*"\nfactor = 0.0\n', r"key 'factor' must be a finite number > 0"),
        ('[[family]]\npattern = "encoder.*"\nfactor = -3\n', r"key 'factor' must be a finite number > 0"),
        ('[[family]]\npattern = "encoder.*"\nfactor = "x"\n', r"key 'factor' must be a number"),
        ('[[family]]\npattern = "encoder.*"\n', r"missing required key 'factor'"),
        ('[[family]]\npattern = "encoder.*"\nfactor = 2.0\nfactr = 2\n', r"unknown key 'factr'"),
        (
            '[[family]]\npattern = "encoder.*"\nfactor = 2.0\nmeasured = 3.0\n',
            r"factor 2 is below its own measurement 3",
        ),
        ("", r"needs at least one \[\[family\]\]"),
        (FAMILIES + "[profiles.tpu]\ndevice_factor = 2.0\n", r"unknown profile 'tpu'"),
        (FAMILIES + "[profiles.cuda]\ndevice_factor = 0.5\n", r"key 'device_factor' must be a finite number >= 1"),
        (FAMILIES + "[profiles.cuda]\ndevice_factr = 2.0\n", r"unknown key 'device_factr'"),
        (FAMILIES + "[model2]\nx = 1\n", r"unknown key 'model2'"),
        (FAMILIES + CUDA + "normwise_floor = 0.1\n", r"key 'normwise_floor' must be a table"),
        (FAMILIES + CUDA + 'normwise_floor = { "grad.*.kernel" = 2.0 }\n', r"key 'grad\.\*\.kernel' must be at most 1"),
        (FAMILIES + CUDA + 'normwise_floor = { "grad.*.kernel" = -1e-3 }\n', r"'grad\.\*\.kernel' must be a finite"),
        (FAMILIES + CUDA + 'normwise_floor = { "grad.*.kernl" = 1e-3 }\n', r"pattern 'grad\.\*\.kernl' matches no tap"),
        (FAMILIES + '[profiles.cpu]\nnormwise_floor = { "grad.*.kernel" = 1e-3 }\n', r"unknown key 'normwise_floor'"),
    ],
)
def test_bad_files_rejected_with_location(tmp_path, text, message):
    p = _write(tmp_path, BASE + text)
    with pytest.raises(ToleranceError, match=message) as info:
        load_tolerances(p)
    assert str(p) in str(info.value)


@pytest.mark.parametrize("key", ["floor", "pair_factor", "baseline_factor", "blame_ratio"])
def test_model_keys_are_required_and_never_zero(tmp_path, key):
    missing = re.sub(rf"^{key} = .*$", "", BASE, flags=re.M)
    with pytest.raises(ToleranceError, match=f"missing required key '{key}'"):
        load_tolerances(_write(tmp_path, missing + FAMILIES))
    zero = re.sub(rf"^{key} = .*$", f"{key} = 0.0", BASE, flags=re.M)
    with pytest.raises(ToleranceError, match=f"key '{key}' must be a finite number"):
        load_tolerances(_write(tmp_path, zero + FAMILIES))


def test_a_tap_no_family_covers_is_an_error_naming_it(tmp_path):
    tol = load_tolerances(_write(tmp_path, BASE + '[[family]]\npattern = "encoder.*"\nfactor = 2.0\n'))
    with pytest.raises(ToleranceError, match=r"no \[\[family\]\] pattern matches tap 'object.canvas'"):
        tol.factor("object.canvas")


def test_missing_invalid_and_wrong_version(tmp_path):
    with pytest.raises(ToleranceError, match="does not exist"):
        load_tolerances(tmp_path / "nope.toml")
    with pytest.raises(ToleranceError, match="is a folder"):
        load_tolerances(tmp_path)
    (tmp_path / "file").write_text("")
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    for unreadable in (tmp_path / "file" / "t.toml", tmp_path / "loop1"):  # through a file; a symlink loop
        with pytest.raises(ToleranceError, match=f"{re.escape(str(unreadable))}: tolerance file cannot be read"):
            load_tolerances(unreadable)
    with pytest.raises(ToleranceError, match="not valid TOML"):
        load_tolerances(_write(tmp_path, "schema_version = = 1"))
    with pytest.raises(ToleranceError, match=r"'schema_version' is 1; expected 2 .*fitted atol tables"):
        load_tolerances(_write(tmp_path, BASE.replace("schema_version = 2", "schema_version = 1") + FAMILIES))
    with pytest.raises(ToleranceError, match="profile 'gpu' is unknown"):
        load_tolerances(_write(tmp_path, BASE + FAMILIES), profile="gpu")


def test_custom_tap_universe_for_third_party_backends(tmp_path):
    p = _write(tmp_path, BASE + '[[family]]\npattern = "dense.*"\nfactor = 3.0\n')
    with pytest.raises(ToleranceError):
        load_tolerances(p)
    assert load_tolerances(p, known_taps=["dense.out"]).factor("dense.out") == 3.0


def test_unit_roundoffs():
    assert UNIT_ROUNDOFF["float32"] == math.ldexp(1.0, -24)
    assert UNIT_ROUNDOFF["float64"] == math.ldexp(1.0, -53)


def test_a_normwise_floor_holds_a_tap_s_scales_at_a_fraction_of_their_largest_on_its_profile_only(tmp_path):
    """cuDNN's weight gradients spread rounding over a whole kernel (docs/tolerances.md, "GPUs"): on
    the cuda profile a kernel gradient element with a tiny scale is held at η of the tap's largest,
    so an error of 0.01 u times the largest scale, spread over every element, passes there (its
    factor 30 allows 0.03) and still
    fails on the CPU; an error of 1 % of the largest element fails on both."""
    p = _write(tmp_path, BASE + FAMILIES + CUDA + 'device_factor = 1.0\nnormwise_floor = { "grad.*.kernel" = 1e-3 }\n')
    cpu, cuda = load_tolerances(p), load_tolerances(p, profile="cuda")
    assert cpu.normwise_floors == () and cuda.normwise_floors == (("grad.*.kernel", 1e-3),)
    # a report states the rule it was judged by, floor included
    assert "S_i >= 0.001 max S for grad.*.kernel" in cuda.rule() and "max S" not in cpu.rule()
    name = "grad.poisson_nll.encoder.block0.conv0.kernel"
    assert cuda.normwise_floor(name) == 1e-3
    assert cuda.normwise_floor("grad.poisson_nll.encoder.block0.conv0.bias") == 0.0
    rng = np.random.default_rng(0)
    want = rng.normal(size=(3, 3, 4, 8)) * np.logspace(-12, 0, 8)  # output channels from tiny to large
    S = np.abs(want) * 20 + 1e-30
    scales = {name: S, "encoder.block0.conv0": S}
    floored = cuda.floored_scales(scales)
    assert np.array_equal(floored["encoder.block0.conv0"], S)  # not a kernel gradient: as it was
    above = S >= 1e-3 * S.max()
    assert np.all(floored[name] >= 1e-3 * S.max()) and np.array_equal(floored[name][above], S[above])
    assert cpu.floored_scales(scales)[name] is S
    # one non-finite element does not carry the whole tap with it
    broken = S.copy()
    broken.flat[0] = np.inf
    assert np.isinf(cuda.floored_scales({name: broken})[name]).sum() == 1

    def passes(tol, got, s):
        return bool(np.all(np.abs(got - want) <= tol.atol(name, s) + tol.rtol() * np.abs(want)))

    spread = want + 0.01 * U * S.max() * rng.choice([-1.0, 1.0], size=want.shape)
    assert passes(cuda, spread, floored[name]) and not passes(cpu, spread, S)
    wrong = want.copy()
    wrong.flat[np.argmax(np.abs(want))] *= 1.01
    assert not passes(cuda, wrong, floored[name]) and not passes(cpu, wrong, S)

"""Declared deviations, partial tap sets and tap exclusions, on the toy backends of test_runner.

Each feature is shown letting through exactly what is declared and still catching what is not.
"""

import numpy as np
import pytest

from parity.deviations import Deviation, allow_config_diff, load_deviations
from parity.errors import ParityInputError
from parity.runner import run_parity
from parity.taps import TapSelection, TapSpec
from parity.tolerances import load_tolerances

from .test_runner import TAPS, TOL_TEXT, ConfigDrift, Toy, Toy32, W, WrongScale, _batches, _expected


@pytest.fixture
def tol(tmp_path):
    p = tmp_path / "t.toml"
    p.write_text(TOL_TEXT)
    return load_tolerances(p, known_taps=TAPS)


KEYS = ("scale", "size")


def _dev(**kw):
    base = {"reason": "known", "reference": "issue 1", "source": "test"}
    return Deviation(**{**base, **kw})


def _run(tol, backends, **kw):
    built = {"reference": Toy(None, W)} | {n: cls(None, W) for n, cls in backends.items()}
    return run_parity(built, _batches(), tol, expected=kw.pop("expected", _expected), reference="reference", **kw)


class Partial(Toy32):
    """An original that computes toy.hidden inside a fused op no hook can see."""

    def exposed_taps(self):
        return ["toy.in", "toy.out"]

    def forward(self, batch):
        taps = super().forward(batch)
        del taps["toy.hidden"]
        return taps


class PartialWrong(Partial, WrongScale):
    pass


class LiesAboutExposing(Toy32):
    """Declares toy.hidden but does not return it: still a structure failure."""

    def exposed_taps(self):
        return ["toy.in", "toy.hidden", "toy.out"]

    def forward(self, batch):
        taps = super().forward(batch)
        del taps["toy.hidden"]
        return taps


# --- partial tap sets --------------------------------------------------------------------------


def test_a_tap_a_backend_does_not_expose_is_neither_failed_nor_passed(tol):
    res = _run(tol, {"orig": Partial, "port": Toy32})
    assert res.passed
    hidden = next(t for t in res.taps if t.name == "toy.hidden")
    assert hidden.not_exposed == ["orig"] and hidden.status == "pass"  # port vs reference still compared
    assert {(c.a, c.b) for c in hidden.comparisons} == {("port", "reference")}
    only = _run(tol, {"orig": Partial})
    assert next(t for t in only.taps if t.name == "toy.hidden").status == "not exposed"


def test_partial_tap_sets_still_catch_a_divergence_in_what_is_exposed(tol):
    res = _run(tol, {"orig": PartialWrong, "port": Toy32})
    assert res.verdict == "fail" and res.first_divergence["tap"] == "toy.out"
    assert res.first_divergence["blamed"] == ["orig"]


def test_a_declared_tap_that_is_not_returned_is_a_structure_failure(tol):
    res = _run(tol, {"orig": LiesAboutExposing})
    assert res.verdict == "fail" and res.first_divergence["tap"] == "toy.hidden"
    assert res.first_divergence["blamed"] == ["orig"]


# --- --taps exclusions ---------------------------------------------------------------------------


def test_exclusion_patterns_leave_taps_out_and_keep_the_rest():
    sel = TapSelection.parse(["!toy.hidden"])
    assert [t for t in ("toy.in", "toy.hidden", "toy.out") if sel(t)] == ["toy.in", "toy.out"]
    both = TapSelection.parse(["toy.*", "!*.out"])
    assert [t for t in ("toy.in", "toy.hidden", "toy.out", "x.in") if both(t)] == ["toy.in", "toy.hidden"]


@pytest.mark.parametrize(
    ("patterns", "message"),
    [
        (["!toy.hiden"], "exclusion '!toy.hiden'"),
        (["toy.*", "!toy.*"], "leave no tap"),
        (["nothing.*"], "pattern 'nothing.*'"),
    ],
)
def test_a_selection_that_matches_nothing_or_leaves_nothing_is_an_error(patterns, message):
    with pytest.raises(ParityInputError, match=message):
        TapSelection.parse(patterns).check(["toy.in", "toy.hidden", "toy.out"], "the toy")


def test_excluding_the_diverging_tap_and_nothing_else_hides_only_that_tap(tol):
    res = _run(tol, {"bad": WrongScale}, taps=["!toy.out"])
    assert res.passed and [t.name for t in res.taps] == ["toy.in", "toy.hidden"]
    res = _run(tol, {"bad": WrongScale}, taps=["!toy.hidden"])
    assert res.verdict == "fail" and res.first_divergence["tap"] == "toy.out"


# --- declared tap deviations ---------------------------------------------------------------------


def test_a_declared_tap_deviation_is_known_not_failed(tol):
    res = _run(tol, {"bad": WrongScale, "good": Toy32}, deviations=[_dev(tap="toy.out", backend="bad")])
    assert res.passed, res.describe_failure()
    out = next(t for t in res.taps if t.name == "toy.out")
    assert out.status == "known"
    assert all(c.known for c in out.comparisons if not c.passed)
    assert res.deviations[0]["status"] == "reproduced" and "toy.out" in res.deviations[0]["seen"][0]


def test_a_deviation_declared_on_the_wrong_backend_excuses_nothing(tol):
    res = _run(tol, {"bad": WrongScale, "good": Toy32}, deviations=[_dev(tap="toy.out", backend="good")])
    assert res.verdict == "fail" and res.first_divergence["blamed"] == ["bad"]


def test_a_declaration_that_no_longer_reproduces_fails_like_a_strict_xfail(tol):
    res = _run(tol, {"fixed": Toy32}, deviations=[_dev(tap="toy.out", backend="fixed")])
    assert res.verdict == "fail" and res.first_divergence is None
    assert res.deviations[0]["status"] == "not_reproduced"
    assert "not reproduced" in res.describe_failure()


def test_a_declaration_for_a_backend_that_did_not_run_does_not_apply(tol):
    res = _run(tol, {"a": Toy32}, deviations=[_dev(tap="toy.out", backend="elsewhere")])
    assert res.passed and res.deviations[0]["status"] == "not_applicable"


# --- declared config deviations ------------------------------------------------------------------


def test_an_undeclared_config_difference_stops_the_run(tol):
    res = _run(tol, {"drift": ConfigDrift})
    assert res.verdict == "config_mismatch" and "scale" in res.config_diff and res.batches == 0


def test_a_declared_config_difference_lets_the_run_go_on_and_compare(tol):
    res = _run(tol, {"drift": ConfigDrift}, deviations=[_dev(config_key="scale", backend="drift")])
    assert res.config_diff == {} and res.declared_config_diff == {"scale": {"reference": 2.0, "drift": 3.0}}
    assert res.batches == 3 and res.deviations[0]["status"] == "reproduced"
    # The run went on, and shows what the other scale does: the first tap it changes, blamed.
    assert res.verdict == "fail" and res.first_divergence["tap"] == "toy.out"
    assert res.first_divergence["blamed"] == ["drift"]


def test_a_config_declaration_names_its_side(tol):
    res = _run(tol, {"drift": ConfigDrift}, deviations=[_dev(config_key="scale", backend="reference")])
    assert res.verdict == "config_mismatch"  # the reference is canonical: the port still differs
    stale = _run(tol, {"a": Toy32}, deviations=allow_config_diff(["scale"]))
    assert stale.verdict == "fail" and stale.deviations[0]["status"] == "not_reproduced"


class SmallCanvas(Toy32):
    """A port whose canvas (toy.hidden) is 2 pixels smaller on each side, centred, and declares it."""

    def effective_config(self):
        return {"scale": self.scale, "size": 2}

    def forward(self, batch):
        taps = super().forward(batch)
        taps["toy.hidden"] = np.ascontiguousarray(taps["toy.hidden"][..., 1:3, 1:3])
        return taps


class SmallCanvasWrong(SmallCanvas):
    def forward(self, batch):
        taps = super().forward(batch)
        taps["toy.hidden"] = taps["toy.hidden"] * np.float32(1.01)
        return taps


class SizedToy(Toy):
    def effective_config(self):
        return {"scale": self.scale, "size": 4}


def _sized(b):
    return [TapSpec("toy.in", (b, 3, 4, 4)), TapSpec("toy.hidden", (b, 5, 4, 4), follows="size"), *_expected(b)[2:]]


def _sized_run(tol, cls, deviations):
    built = {"reference": SizedToy(None, W), "port": cls(None, W)}
    return run_parity(built, _batches(), tol, expected=_sized, reference="reference", deviations=deviations)


def test_sides_of_a_declared_size_difference_are_compared_on_the_common_window(tol):
    declared = [_dev(config_key="size", backend="port")]
    res = _sized_run(tol, SmallCanvas, declared)
    assert res.passed, res.describe_failure()
    hidden = next(t for t in res.taps if t.name == "toy.hidden")
    assert hidden.window == [2, 2] and hidden.comparisons[0].numel == 6 * 5 * 2 * 2
    wrong = _sized_run(tol, SmallCanvasWrong, declared)
    assert wrong.first_divergence["tap"] == "toy.hidden" and wrong.first_divergence["blamed"] == ["port"]
    undeclared = _sized_run(tol, SmallCanvas, [])
    assert undeclared.verdict == "config_mismatch" and list(undeclared.config_diff) == ["size"]


# --- the file --------------------------------------------------------------------------------------


GOOD = """schema_version = 1
[[deviation]]
config_key = "scale"
backend = "drift"
reason = "the port derives it from another setting"
reference = "port/helper.py"

[[deviation]]
tap = "toy.*"
backend = "bad"
reason = "co-masked numerator"
reference = "issue 9"
"""


def test_a_deviation_file_is_read_with_its_sources(tmp_path):
    p = tmp_path / "dev.toml"
    p.write_text(GOOD)
    devs = load_deviations(p, KEYS)
    assert [d.config_key for d in devs] == ["scale", None] and devs[1].covers_tap("toy.out", "bad")
    assert devs[0].source == "dev.toml, deviation 1" and not devs[1].covers_tap("toy.out", "good")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("schema_version = 2\n", "'schema_version' is 2"),
        ("[[deviation]]\ntap = 'toy.out'\n", "key 'schema_version' is missing; add schema_version = 1"),
        ("schema_version = 1\n[[deviation]]\nconfig_key = 'scael'\nreason = 'r'\nreference = 'x'\n", "'scael'"),
        ("schema_version = 1\n[[deviation]]\ntap = 'toy.out'\nreason = 'r'\nreference = 'x'\n", "needs key 'backend'"),
        ("schema_version = 1\n[[deviation]]\ntap = 'a'\nbackend = 'b'\nreference = 'x'\n", "'reason' is required"),
        (
            "schema_version = 1\n[[deviation]]\ntap = 'a'\nconfig_key = 'scale'\nbackend = 'b'\nreason = 'r'\n"
            "reference = 'x'\n",
            "exactly one of",
        ),
        ("schema_version = 1\n[[deviation]]\ntap = 'a'\nbackend = 'b'\nreason = ''\nreference = 'x'\n", "non-empty"),
        ("schema_version = 1\n[[deviation]]\ntap = 'a'\nbakend = 'b'\nreason = 'r'\nreference = 'x'\n", "'bakend'"),
        ("schema_version = 1\ndeviations = []\n", "unknown top-level key 'deviations'"),
        ("schema_version = 1\n[deviation]\n", "array of tables"),
        ("schema_version = [1\n", "not valid TOML"),
    ],
)
def test_a_bad_deviation_file_is_an_error_naming_the_file_entry_and_key(tmp_path, text, message):
    p = tmp_path / "dev.toml"
    p.write_text(text)
    with pytest.raises(ParityInputError, match=r"dev\.toml") as err:
        load_deviations(p, KEYS)
    assert message in str(err.value)
    assert p.read_text() == text  # a file that is read is never touched


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("tap = 'toy.ot*'\nbackend = 'bad'", "key 'tap' is 'toy.ot*', which matches no tap of the model"),
        ("tap = 'toy.*'\nbackend = 'baad'", "key 'backend' is 'baad', not a registered backend; registered: bad, good"),
        ("config_key = 'scale'\nbackend = 'goood'", "key 'backend' is 'goood', not a registered backend"),
    ],
)
def test_a_deviation_naming_no_tap_or_no_backend_is_an_error(tmp_path, entry, message):
    """A typo in a tap pattern or a backend name would excuse nothing and read as "declared" (its
    status only "not applicable"), like a typo in a config key."""
    p = tmp_path / "dev.toml"
    p.write_text(f"schema_version = 1\n[[deviation]]\n{entry}\nreason = 'r'\nreference = 'x'\n")
    with pytest.raises(ParityInputError, match=r"dev\.toml, deviation 1") as err:
        load_deviations(p, KEYS, known_taps=["toy.in", "toy.out"], known_backends=["good", "bad"])
    assert message in str(err.value)
    p.write_text(GOOD)
    assert len(load_deviations(p, KEYS, known_taps=["toy.out"], known_backends=["drift", "bad"])) == 2


def test_allow_config_diff_rejects_a_key_that_is_not_a_config_key():
    with pytest.raises(ParityInputError, match="--allow-config-diff: 'scael'"):
        allow_config_diff(["scael"], KEYS)

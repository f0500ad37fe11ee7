import json

import numpy as np
import pytest

from parity.report import SCHEMA_VERSION, to_markdown, write_reports
from parity.runner import run_parity

from .test_runner import TAPS, TOL_TEXT, Toy, Toy32, W, WrongScale, _batches, _expected


@pytest.fixture
def tol(tmp_path):
    from parity.tolerances import load_tolerances

    p = tmp_path / "t.toml"
    p.write_text(TOL_TEXT)
    return load_tolerances(p, known_taps=TAPS)


def _result(tol, bad=True):
    backends = {"reference": Toy(None, W), "torch": (WrongScale if bad else Toy32)(None, W), "tf": Toy32(None, W)}
    return run_parity(
        backends,
        _batches(),
        tol,
        expected=_expected,
        reference="reference",
        fixture={"path": "fixtures/x.h5", "sha256": "ab" * 32},
        weights_sha256="cd" * 32,
    )


def test_json_report_has_the_documented_fields(tol, tmp_path):
    paths = write_reports(_result(tol), tmp_path / "rep")
    data = json.loads(paths["json"].read_text())
    assert data["schema_version"] == SCHEMA_VERSION
    assert data["verdict"] == "fail" and data["passed"] is False
    assert data["first_divergence"]["tap"] == "toy.out"
    assert data["first_divergence"]["blamed"] == ["torch"]
    assert set(data["first_divergence"]["backends"]) == {"torch", "reference", "tf"}
    assert data["fixture"] == {"path": "fixtures/x.h5", "sha256": "ab" * 32}
    assert data["weights_sha256"] == "cd" * 32
    assert data["backends"]["torch"]["available"] is True
    assert data["backends"]["torch"]["environment"] == {"framework": "numpy", "device": "cpu"}
    assert data["backends"]["torch"]["effective_config"] == {"scale": 2.0}
    tap = data["taps"][2]
    assert tap["name"] == "toy.out" and tap["shape"] == [2, 5, 4, 4]
    for c in tap["comparisons"]:
        for key in ("max_abs", "mean_abs", "max_rel", "mismatch_fraction", "min_atol_to_pass", "passed", "worst_index"):
            assert key in c
    assert set(tap["statistics"]) == {"reference", "torch", "tf"}
    assert set(tap["statistics"]["torch"]["var_zero_mean"]) == {"mean", "min", "max"}


def test_json_report_has_a_line_per_tap_and_is_the_report_dictionary(tol, tmp_path):
    """A tap is found on its own line (grep, a diff, an editor), and the text is exactly the JSON of
    ``to_json_dict``: nothing is lost or changed by writing it a line per tap."""
    from parity.report import to_json_dict

    result = _result(tol)
    paths = write_reports(result, tmp_path / "rep")
    text = paths["json"].read_text()
    assert json.loads(text) == json.loads(json.dumps(to_json_dict(result)))
    lines = text.splitlines()
    assert lines[0] == "{" and lines[-1] == "}"
    for tap in result.taps:
        (line,) = [ln for ln in lines if f'"name": "{tap.name}"' in ln]  # one line holds the whole tap
        assert json.loads(line.strip().rstrip(","))["name"] == tap.name


def test_statistics_npz_holds_every_patch(tol, tmp_path):
    res = _result(tol)
    paths = write_reports(res, tmp_path)
    with np.load(paths["statistics"]) as npz:
        np.testing.assert_array_equal(npz["torch|toy.out|mean"], res.statistics["torch"]["toy.out"]["mean"])


def test_markdown_names_first_divergence_and_shows_stats_side_by_side(tol):
    md = to_markdown(_result(tol))
    assert "**FAIL**" in md
    assert "**First diverging tap:** `toy.out`" in md and "**torch**" in md
    assert "| statistic | reference | torch | tf |" in md
    assert "❌" in md and "✅" in md


def test_html_has_pictures_for_failing_taps_only_unless_asked(tol, tmp_path):
    res = _result(tol)
    html = write_reports(res, tmp_path / "a")["html"].read_text()
    assert html.count("<h3>") == 1 and "<h3><code>toy.out</code></h3>" in html
    assert html.count("data:image/png;base64,") == 2  # patch grid + histogram
    html_all = write_reports(res, tmp_path / "b", all_taps=True)["html"].read_text()
    assert html_all.count("<h3>") == 3


def test_passing_run_report(tol, tmp_path):
    data = json.loads(write_reports(_result(tol, bad=False), tmp_path)["json"].read_text())
    assert data["verdict"] == "pass" and data["first_divergence"] is None


def test_html_report_touches_no_global_matplotlib_state(tol, tmp_path):
    """The report renders on its own Figure canvas: pyplot's backend, figures and rcParams of the
    user's session are left alone (the plugin runs inside every pytest session of an environment)."""
    import sys

    import matplotlib

    had_pyplot = "matplotlib.pyplot" in sys.modules
    # Read and written with dict's own methods: rcParams["backend"] would import pyplot to resolve it.
    backend = dict.__getitem__(matplotlib.rcParams, "backend")
    dict.__setitem__(matplotlib.rcParams, "backend", "svg")
    try:
        write_reports(_result(tol), tmp_path / "rep", all_taps=True)
        assert dict.__getitem__(matplotlib.rcParams, "backend") == "svg"
        assert ("matplotlib.pyplot" in sys.modules) == had_pyplot
    finally:
        dict.__setitem__(matplotlib.rcParams, "backend", backend)
    assert "data:image/png;base64," in (tmp_path / "rep" / "report.html").read_text()


def test_the_shipped_schema_rejects_a_report_that_breaks_it(tol, tmp_path):
    import jsonschema_rs as jsonschema

    from parity.report import schema_file

    validator = jsonschema.validator_for(json.loads(schema_file().read_text()))
    data = json.loads(write_reports(_result(tol), tmp_path / "rep")["json"].read_text())
    validator.validate(data)
    for broken in ({**data, "verdict": "maybe"}, {**data, "taps": [{**data["taps"][0], "scale": 3}]}):
        with pytest.raises(jsonschema.ValidationError):
            validator.validate(broken)
    missing = dict(data)
    del missing["first_divergence"]
    with pytest.raises(jsonschema.ValidationError, match='"first_divergence" is a required property'):
        validator.validate(missing)


def test_layer_local_results_are_in_every_report_and_the_json_validates(tol, tmp_path):
    """Both columns per tap, the first stage that differs, and the backends without stages."""
    import jsonschema_rs as jsonschema

    from parity.report import schema_file

    from .test_runner import STAGES, Staged, Staged32

    wrong_out = type("WrongOut", (Staged32,), {"out_scale": 2.01})
    backends = {"reference": Staged(None, W), "torch": wrong_out(None, W), "plain": Toy32(None, W)}
    result = run_parity(backends, _batches(), tol, expected=_expected, reference="reference", stages=STAGES)
    paths = write_reports(result, tmp_path / "rep")
    data = json.loads(paths["json"].read_text())
    jsonschema.validator_for(json.loads(schema_file().read_text())).validate(data)
    assert data["first_local_divergence"]["stage"] == "out" and data["first_local_divergence"]["backends"] == ["torch"]
    assert data["local_unsupported"] == [] and data["local_recomputed"] == ["plain"]
    out = next(t for t in data["taps"] if t["name"] == "toy.out")
    assert out["stage"] == "out" and [(c["kind"], c["a"]) for c in out["local"]] == [
        ("local_vs_reference", "torch"),
        ("local_vs_reference", "plain"),
    ]
    assert out["local"][0]["passed"] is False and out["local"][1]["passed"] is True
    markdown = paths["markdown"].read_text()
    assert "**First stage that computes differently** (fed the reference's own inputs): `out`" in markdown
    assert "| torch local |" in markdown and "| plain local |" in markdown
    assert "Layer-local parity only for `plain`" not in markdown and "Layer-local parity for `plain`" in markdown
    html_text = (tmp_path / "rep" / "report.html").read_text()
    assert "First stage that computes differently" in html_text and "torch locally" in html_text
    assert "Layer-local parity of plain (they cannot run a stage alone)" in html_text


# A report folder holds one run's report: the whole earlier one or the whole new one, never a mix.


def _contents(folder):
    """{name: bytes} of every file in a report folder, hidden ones (temporaries, backups) included."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture
def two_reports(tol, tmp_path):
    """A failing and a passing run, and each one's complete report as written into an empty folder."""
    first, second = _result(tol), _result(tol, bad=False)
    write_reports(first, tmp_path / "first")
    write_reports(second, tmp_path / "second")
    return first, second, _contents(tmp_path / "first"), _contents(tmp_path / "second")


def test_a_report_interrupted_while_it_is_written_leaves_the_earlier_one_whole(two_reports, tmp_path, monkeypatch):
    """A Ctrl-C while the HTML renders (the slow part) leaves every file of the earlier report as it was."""
    import parity.report_html

    first, second, old, _ = two_reports
    folder = tmp_path / "rep"
    write_reports(first, folder)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(parity.report_html, "to_html", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_reports(second, folder)
    assert _contents(folder) == old


def test_a_ctrl_c_among_the_renames_ends_the_write_with_the_whole_new_report(two_reports, tmp_path, monkeypatch):
    """A SIGINT that lands between two files' renames is held until every file is in place: the
    interrupt still ends the write, and the folder holds the new report alone."""
    import os
    import signal

    first, second, _, new = two_reports
    folder = tmp_path / "rep"
    write_reports(first, folder)
    real, calls = os.replace, []

    def replace(src, dst):
        real(src, dst)
        calls.append(dst)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # delivered at Python's next check, right after this rename

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        write_reports(second, folder)
    assert len(calls) == 4
    assert _contents(folder) == new


@pytest.mark.parametrize("failing", ["statistics.npz", "report.md", "report.html", "report.json"])
def test_a_rename_that_fails_leaves_the_whole_earlier_report(two_reports, tmp_path, monkeypatch, failing):
    """A file that cannot be replaced (made immutable, say) undoes the files already replaced."""
    import os

    first, second, old, _ = two_reports
    folder = tmp_path / "rep"
    write_reports(first, folder)
    real = os.replace

    def replace(src, dst):
        if os.path.basename(dst) == failing:
            raise PermissionError(1, "Operation not permitted", str(dst))
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(PermissionError):
        write_reports(second, folder)
    assert _contents(folder) == old


def test_a_report_without_html_removes_the_earlier_reports_html(two_reports, tmp_path):
    first, second, _, new = two_reports
    folder = tmp_path / "rep"
    write_reports(first, folder)
    paths = write_reports(second, folder, html=False)
    assert "html" not in paths
    assert _contents(folder) == {k: v for k, v in new.items() if k != "report.html"}


@pytest.mark.parametrize("content", ["[1, 2]", '"a string"', "42", "null", "{not json", ""])
def test_a_lock_that_names_no_run_is_an_error_naming_the_lock_file(tmp_path, content):
    from parity.errors import ParityInputError
    from parity.report import LOCK_NAME, claim_folder

    lock = tmp_path / LOCK_NAME
    lock.write_text(content)
    with pytest.raises(ParityInputError) as info:
        with claim_folder(tmp_path):
            pass
    assert str(info.value) == (
        f"report folder {tmp_path}: its lock file {lock} does not say which run holds it (it is not a JSON "
        f"object naming a pid and host); if no run is writing there, delete {lock}"
    )
    assert lock.read_text() == content


def test_a_claim_that_ends_without_a_report_removes_the_folders_it_made_and_only_those(tmp_path):
    """Bad input found once the backends are built (an unavailable one, a float32 arbiter) left an
    empty report folder behind, where the README promises nothing on disk is touched."""
    from parity.report import claim_folder

    nested = tmp_path / "a" / "b" / "report"
    with pytest.raises(RuntimeError), claim_folder(nested):
        raise RuntimeError("bad input found late")
    assert list(tmp_path.iterdir()) == []
    kept = tmp_path / "existing"
    kept.mkdir()
    with pytest.raises(RuntimeError), claim_folder(kept / "new"):
        raise RuntimeError("late")
    assert kept.is_dir() and list(kept.iterdir()) == []  # there before the claim: kept
    with claim_folder(nested) as folder:
        (folder / "report.json").write_text("{}")
    assert (nested / "report.json").is_file()  # a report written: nothing removed

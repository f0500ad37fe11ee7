"""The bad-input suite: every way a user can hand the harness something wrong.

Each case runs the command as a user would (``ptycho-parity ...``, in-process) and asserts what a user
relies on: the documented exit code, a message that names the file, key or option and what is wrong,
no traceback, and no file on disk changed (the SHA-256 of every file under the case's folder, the
bundled fixtures and the tolerance file, before and after).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest

from parity.cli import main
from parity.config import ModelConfig
from parity.fixture import bundled_fixture, bundled_fixtures_dir
from parity.report import LOCK_NAME
from parity.tolerances import default_tolerance_file
from parity.weights import generate_weights, save_weights

SMALL = ["--set", "gridsize=1", "--set", "probe_big=false", "--batch-size", "1", "--max-groups", "1"]
FAMILY = '[[family]]\npattern = "*"\nfactor = 100.0\n'
MODEL = "schema_version = 2\n[model]\nfloor = 4.0\npair_factor = 2.0\nbaseline_factor = 2.0\nblame_ratio = 2.0\n"


@dataclass(frozen=True)
class Case:
    make: Callable[[Path], list[str]]  # builds the bad input under the folder; returns the argv
    message: str  # must appear in stderr; {t} is the case's folder
    code: int = 2


def _write(path: Path, data: bytes | str) -> Path:
    if isinstance(data, str):
        data = data.encode()
    path.write_bytes(data)
    return path


def _weights_file(t: Path) -> Path:
    from parity.config import ModelConfig
    from parity.weights import generate_weights, save_weights

    path = t / "weights.h5"
    save_weights(path, generate_weights(ModelConfig(), 0), ModelConfig())
    return path


def _fixture_copy(t: Path, edit: Callable[[h5py.File], None] | None = None, name: str = "n64_g1_grf") -> Path:
    path = t / "fixture.h5"
    shutil.copyfile(bundled_fixture(name), path)
    if edit is not None:
        with h5py.File(path, "r+") as fh:
            edit(fh)
    return path


def _weights(t: Path, config: ModelConfig, edit: Callable[[h5py.File], None] | None = None) -> Path:
    path = t / "weights.h5"
    save_weights(path, generate_weights(config), config)
    if edit is not None:
        with h5py.File(path, "r+") as fh:
            edit(fh)
    return path


def _npz(t: Path, **arrays: np.ndarray) -> Path:
    path = t / "data.npz"
    np.savez(path, **arrays)
    return path


def _good_npz(t: Path, drop: str | None = None) -> Path:
    rng = np.random.default_rng(0)
    arrays = {
        "diffraction": rng.random((9, 64, 64)).astype(np.float32),
        "xcoords": rng.random(9) * 10,
        "ycoords": rng.random(9) * 10,
        "probeGuess": np.ones((64, 64), np.complex64),
    }
    if drop:
        arrays.pop(drop)
    return _npz(t, **arrays)


def _locked_report(t: Path, lock: str | None = None) -> Path:
    folder = t / "report"
    folder.mkdir()
    # By default held by a live process on this host (this one): another run is writing there.
    owner = {"pid": os.getpid(), "host": os.uname().nodename, "started": "now"}
    _write(folder / LOCK_NAME, json.dumps(owner) if lock is None else lock)
    return folder


def _symlink(path: Path, target: Path) -> Path:
    path.symlink_to(target)
    return path


def _huge_diffraction(fh: h5py.File) -> None:
    """A diffraction declared (10⁷, 64, 64), 153 GiB, its storage never allocated: the file stays small."""
    del fh["diffraction"]
    fh.create_dataset("diffraction", shape=(10**7, 64, 64), dtype="<f4", chunks=(1, 64, 64))


def run(*args: str) -> Callable[[Path], list[str]]:
    return lambda t: ["run", *SMALL, "--backends", "reference", "--report", str(t / "report"), *args]


CASES: dict[str, Case] = {
    # --- configs ---------------------------------------------------------------------------------
    "config-unknown-key": Case(run("--set", "nosuchkey=1"), "config (--set): unknown key 'nosuchkey'"),
    "config-out-of-range": Case(run("--set", "N=96"), "key 'N' has value 96; allowed: one of 64, 128"),
    "config-wrong-type": Case(run("--set", "probe_big=maybe"), "key 'probe_big' has value 'maybe' of type str"),
    "config-set-without-value": Case(run("--set", "gridsize"), "option --set: expected KEY=VALUE, got 'gridsize'"),
    "config-negative-photons": Case(run("--set", "nphotons=-1"), "key 'nphotons' has value -1.0; allowed: a finite"),
    "config-odd-canvas": Case(
        lambda t: ["run", "--set", "offset=3", "--set", "max_position_jitter=10", "--report", str(t / "r")],
        "keys 'offset' (3) and 'max_position_jitter' (10) give a canvas M=77 with M - N odd",
    ),
    "config-file-missing": Case(
        lambda t: [*run()(t), "--config", str(t / "nope.toml")], "{t}/nope.toml: cannot read config file"
    ),
    "config-file-not-toml": Case(
        lambda t: [*run()(t), "--config", str(_write(t / "c.toml", "N = = 64"))], "{t}/c.toml: not valid TOML"
    ),
    "config-file-unknown-key": Case(
        lambda t: [*run()(t), "--config", str(_write(t / "c.json", '{"gridsize": 1, "probe_bigg": false}'))],
        "{t}/c.json with --set: unknown key 'probe_bigg'",
    ),
    "input-overflows-float32": Case(
        run("--set", "nphotons=1e300"), "config key 'nphotons' (1e+300): the model input x = X·sqrt(nphotons)/(N/2)"
    ),
    "probe-overflows": Case(run("--set", "probe_scale=1e-300"), "config key 'probe_scale' (1e-300): the normalised"),
    "probe-underflows": Case(run("--set", "probe_scale=1e300"), "probe / (probe_scale · mean|disk · probe|), under"),
    "config-file-not-utf8": Case(
        lambda t: [*run()(t), "--config", str(_write(t / "c.toml", b"N = 64\n\xff\xfe\n"))],
        "{t}/c.toml: not valid TOML (not UTF-8 text",
    ),
    "config-file-a-list": Case(
        lambda t: [*run("--set", "gridsize=1")(t), "--config", str(_write(t / "c.json", "[1, 2]"))],
        "{t}/c.json: a config file holds a table of keys, not a list",
    ),
    "config-file-keys-beside-model": Case(
        lambda t: [*run()(t), "--config", str(_write(t / "c.toml", "nphotons = 1e5\n[model]\ngridsize = 1\n"))],
        "{t}/c.toml: key 'nphotons' is outside the [model] table",
    ),
    "config-canvas-too-large": Case(
        run("--set", "max_position_jitter=10000000"),
        "keys 'offset' (4) and 'max_position_jitter' (10000000) give a canvas M=10000064; it must be at most 8 x N",
    ),
    "config-seed-negative": Case(run("--seed", "-1"), "option --seed must be an integer >= 0, got -1"),
    # --- fixtures --------------------------------------------------------------------------------
    "fixture-missing": Case(run("--fixture", "/nonexistent/fixture.h5"), "/nonexistent/fixture.h5: fixture file"),
    "fixture-unknown-bundled": Case(run("--fixture", "n64_g9"), "bundled fixture 'n64_g9' does not exist"),
    "fixture-corrupt": Case(
        lambda t: run("--fixture", str(_write(t / "bad.h5", b"\x89HDF\r\n\x1a\n" + b"x" * 200)))(t),
        "{t}/bad.h5: not a readable HDF5 file",
    ),
    "fixture-of-other-config": Case(
        run("--fixture", "n64_g2_lines"), "n64_g2_lines.h5: attribute 'gridsize' is 2 but the config has gridsize=1"
    ),
    "fixture-is-a-folder": Case(lambda t: run("--fixture", str(t))(t), "{t}: fixture path is not a regular file"),
    "fixture-nan": Case(
        lambda t: run("--fixture", str(_fixture_copy(t, lambda fh: fh["diffraction"].__setitem__((0, 0, 0), np.nan))))(
            t
        ),
        "{t}/fixture.h5: dataset 'diffraction' contains 1 non-finite values",
    ),
    "fixture-unknown-dataset-attribute": Case(
        lambda t: run("--fixture", str(_fixture_copy(t, lambda fh: fh["probe"].attrs.__setitem__("order", "C"))))(t),
        "{t}/fixture.h5: dataset 'probe' has attribute 'order', which is not part of fixture schema version 2",
    ),
    "fixture-positions-in-metres": Case(
        lambda t: run("--fixture", str(_fixture_copy(t, lambda fh: fh["xcoords"].attrs.__setitem__("units", "m"))))(t),
        "{t}/fixture.h5: dataset 'xcoords' has units='m'; this schema reads only 'pixel'",
    ),
    "fixture-modified": Case(
        lambda t: run("--fixture", str(_fixture_copy(t, lambda fh: fh["xcoords"].__setitem__(0, 1.5))))(t),
        "{t}/fixture.h5: dataset 'xcoords' does not match its SHA-256",
    ),
    "fixture-path-in-missing-folder": Case(
        lambda t: run("--fixture", str(t / "no" / "myfixture"))(t),
        "{t}/no/myfixture: fixture file does not exist; folder {t}/no does not exist",
    ),
    "fixture-dangling-symlink": Case(
        lambda t: run("--fixture", str(_symlink(t / "myfixture", t / "gone.h5")))(t),
        "{t}/myfixture: fixture file does not exist (a symbolic link to '{t}/gone.h5', which does not)",
    ),
    "fixture-attribute-is-an-array": Case(
        lambda t: run(
            "--fixture",
            str(_fixture_copy(t, lambda fh: fh["xcoords"].attrs.__setitem__("units", np.array([b"pixel", b"pixel"])))),
        )(t),
        "{t}/fixture.h5: dataset 'xcoords' has attribute 'units' = [b'pixel', b'pixel'] (ndarray); expected the string",
    ),
    "fixture-declares-a-huge-dataset": Case(
        lambda t: run("--fixture", str(_fixture_copy(t, _huge_diffraction)))(t),
        "{t}/fixture.h5: dataset 'diffraction' declares shape (10000000, 64, 64) of float32, 152.6 GiB, more than",
    ),
    # --- weights ---------------------------------------------------------------------------------
    "weights-dangling-link": Case(
        lambda t: run(
            "--weights",
            str(
                _weights(
                    t,
                    ModelConfig(gridsize=1, probe_big=False),
                    lambda fh: fh.__setitem__("extra", h5py.SoftLink("/nowhere")),
                )
            ),
        )(t),
        "{t}/weights.h5: 'extra' is a SoftLink; a weights file holds no links",
    ),
    "weights-missing": Case(run("--weights", "/nonexistent/w.h5"), "/nonexistent/w.h5: weights file does not exist"),
    "weights-is-a-fixture": Case(
        lambda t: run("--weights", str(_fixture_copy(t)))(t),
        "{t}/fixture.h5: is a fixture (it holds 'diffraction'), not a weights file",
    ),
    "fixture-is-an-npz": Case(
        lambda t: run("--fixture", str(_good_npz(t)))(t),
        "{t}/data.npz: is a NumPy .npz archive, not an HDF5 fixture; convert it with `ptycho-parity import-npz`",
    ),
    "weights-corrupt": Case(
        lambda t: run("--weights", str(_write(t / "w.h5", b"not hdf5 at all")))(t), "{t}/w.h5: not a readable HDF5"
    ),
    "weights-of-other-config": Case(
        lambda t: run("--weights", str(_weights(t, ModelConfig(gridsize=1, probe_big=False, amp_activation="relu"))))(
            t
        ),
        "{t}/weights.h5: made for another config than the run's (amp_activation: file 'relu', run 'sigmoid')",
    ),
    "weights-holding-a-group": Case(
        lambda t: run(
            "--weights",
            str(_weights(t, ModelConfig(gridsize=1, probe_big=False), lambda fh: fh.create_group("extra"))),
        )(t),
        "{t}/weights.h5: 'extra' is a Group, not a dataset of parameters",
    ),
    "weights-version-as-array": Case(
        lambda t: run(
            "--weights",
            str(
                _weights(
                    t,
                    ModelConfig(gridsize=1, probe_big=False),
                    lambda fh: fh.attrs.__setitem__("schema_version", np.array([1, 1])),
                )
            ),
        )(t),
        "{t}/weights.h5: attribute 'schema_version' is array([1, 1])",
    ),
    "weights-without-hash": Case(
        lambda t: run(
            "--weights",
            str(_weights(t, ModelConfig(gridsize=1, probe_big=False), lambda fh: fh.attrs.__delitem__("sha256"))),
        )(t),
        "{t}/weights.h5: attribute 'sha256' is missing",
    ),
    "weights-modified": Case(
        lambda t: run(
            "--weights",
            str(
                _weights(
                    t,
                    ModelConfig(gridsize=1, probe_big=False),
                    lambda fh: fh["log_scale"].write_direct(np.asarray(1.0, np.float32)),
                )
            ),
        )(t),
        "{t}/weights.h5: contents do not match the SHA-256 recorded in attribute 'sha256'",
    ),
    # --- tolerances ------------------------------------------------------------------------------
    "tolerances-missing": Case(run("--tolerances", "/nonexistent/t.toml"), "/nonexistent/t.toml: tolerance file"),
    "tolerances-typo-pattern": Case(
        lambda t: run("--tolerances", str(_write(t / "t.toml", MODEL + FAMILY.replace('"*"', '"encodr.*"'))))(t),
        "{t}/t.toml: [[family]] #1: pattern 'encodr.*' matches no tap",
    ),
    "tolerances-old-schema": Case(
        lambda t: run("--tolerances", str(_write(t / "t.toml", "schema_version = 1\n")))(t),
        "{t}/t.toml: key 'schema_version' is 1; expected 2",
    ),
    "tolerances-zero-factor": Case(
        lambda t: run("--tolerances", str(_write(t / "t.toml", MODEL + FAMILY.replace("100.0", "0.0"))))(t),
        "{t}/t.toml: [[family]] #1: key 'factor' must be a finite number > 0",
    ),
    "tolerances-tap-without-family": Case(
        lambda t: run("--tolerances", str(_write(t / "t.toml", MODEL + FAMILY.replace('"*"', '"encoder.*"'))))(t),
        "no [[family]] pattern matches tap 'input.x'",
    ),
    # Rules that could never apply (a config value that cannot match, a misspelt backend) cannot be
    # written at all: a family has a pattern and a factor, nothing conditional.
    "tolerances-conditional-rule": Case(
        lambda t: run("--tolerances", str(_write(t / "t.toml", MODEL + FAMILY + 'when = { N = "64" }\n')))(t),
        "{t}/t.toml: [[family]] #1: unknown key 'when'; allowed keys: factor, measured, note, pattern",
    ),
    "tolerances-backend-rule": Case(
        lambda t: run("--tolerances", str(_write(t / "t.toml", MODEL + FAMILY + 'backend = "torhc"\n')))(t),
        "{t}/t.toml: [[family]] #1: unknown key 'backend'",
    ),
    "tolerances-through-a-file": Case(
        lambda t: run("--tolerances", str(_write(t / "f", "x") / "t.toml"))(t),
        "{t}/f/t.toml: tolerance file cannot be read",
    ),
    "tolerances-is-a-folder": Case(lambda t: run("--tolerances", str(t))(t), "{t}: is a folder"),
    # --- options ---------------------------------------------------------------------------------
    "backend-unknown": Case(
        lambda t: ["run", *SMALL, "--backends", "reference,tensorflw"],
        "option --backends: 'tensorflw' is not a registered backend; registered: reference, tensorflow, torch",
    ),
    "backends-twice": Case(
        lambda t: ["run", *SMALL, "--backends", "reference,torch,reference"],
        "option --backends: 'reference' is named twice",
    ),
    "report-empty": Case(lambda t: ["run", *SMALL, "--report", ""], "option --report: empty; give the report folder"),
    "measure-unknown-backend": Case(
        lambda t: ["measure-tolerances", "--backends", "reference,nope"],
        "option --backends: 'nope' is not a registered",
    ),
    "backends-empty": Case(lambda t: ["run", *SMALL, "--backends", " , "], "option --backends: no backend named"),
    "reference-not-among-backends": Case(run("--reference", "ref64"), "reference backend 'ref64' is not among"),
    "batch-size-zero": Case(run("--batch-size", "0"), "option batch_size must be an integer >= 1, got 0"),
    "max-groups-negative": Case(run("--max-groups", "-3"), "option max_groups must be an integer >= 1, got -3"),
    "taps-matching-nothing": Case(run("--taps", "encodr.*"), "option taps: pattern 'encodr.*' matches no tap"),
    "device-without-gpu": Case(
        lambda t: ["run", *SMALL, "--backends", "reference,torch", "--device", "cuda", "--report", str(t / "r")],
        "device 'cuda' is not usable: torch backend",
    ),
    "report-is-a-file": Case(
        lambda t: ["run", *SMALL, "--backends", "reference", "--report", str(_write(t / "report.json", "{}"))],
        "option --report: report folder {t}/report.json exists and is not a folder",
    ),
    "report-under-a-file": Case(
        lambda t: ["run", *SMALL, "--backends", "reference", "--report", str(_write(t / "afile", "x") / "report")],
        "option --report: report folder {t}/afile/report cannot be created",
    ),
    "report-folder-of-other-files": Case(
        lambda t: ["run", *SMALL, "--backends", "reference", "--report", str(_write(t / "README.md", "mine").parent)],
        "option --report: folder {t} holds files a report does not write (README.md)",
    ),
    "report-in-use": Case(
        lambda t: ["run", *SMALL, "--backends", "reference", "--report", str(_locked_report(t))],
        "option --report: report folder {t}/report is being written by another run (pid",
    ),
    "report-lock-not-an-object": Case(
        lambda t: ["run", *SMALL, "--backends", "reference", "--report", str(_locked_report(t, "[1, 2]"))],
        "option --report: report folder {t}/report: its lock file {t}/report/.ptycho-parity.lock does not say",
    ),
    # --- NPZ import ------------------------------------------------------------------------------
    "npz-missing": Case(lambda t: ["import-npz", str(t / "no.npz"), str(t / "o.h5")], "{t}/no.npz: NPZ file does not"),
    "npz-into-existing-folder": Case(
        lambda t: ["import-npz", str(_good_npz(t)), str(t)], "import-npz: {t} is a folder; give the file to write"
    ),
    "npz-corrupt": Case(
        lambda t: ["import-npz", str(_write(t / "d.npz", b"PK\x03\x04 broken")), str(t / "o.h5")],
        "{t}/d.npz: not a readable NPZ archive",
    ),
    "npz-without-positions": Case(
        lambda t: ["import-npz", str(_good_npz(t, drop="xcoords")), str(t / "o.h5")],
        "{t}/data.npz: key 'xcoords' is missing",
    ),
    "npz-output-folder-missing": Case(
        lambda t: ["import-npz", str(_good_npz(t)), str(t / "nope" / "o.h5")],
        "import-npz: folder {t}/nope does not exist",
    ),
    # --- making fixtures and weights -------------------------------------------------------------
    "make-fixture-over-existing": Case(
        lambda t: ["make-fixture", str(_write(t / "f.h5", "keep me"))], "make-fixture: {t}/f.h5 exists; pass --force"
    ),
    "make-fixture-onto-a-folder": Case(
        lambda t: ["make-fixture", "--force", str(t)], "make-fixture: {t} is a folder; give the file to write"
    ),
    "make-weights-over-existing": Case(
        lambda t: ["make-weights", str(_fixture_copy(t))], "make-weights: {t}/fixture.h5 exists; pass --force"
    ),
    "make-weights-onto-a-folder": Case(lambda t: ["make-weights", str(t)], "make-weights: {t} is a folder"),
    # --force replaces an old file of the same kind only: a fixture at a weights path is kept.
    "make-weights-force-over-a-fixture": Case(
        lambda t: ["make-weights", "--force", str(_fixture_copy(t))],
        "make-weights: {t}/fixture.h5 is a fixture, not a weights file; --force replaces only a weights file",
    ),
    "make-fixture-force-over-weights": Case(
        lambda t: ["make-fixture", "--force", str(_weights_file(t))],
        "make-fixture: {t}/weights.h5 is a weights file, not a fixture; --force replaces only a fixture",
    ),
    "make-fixture-force-over-another-file": Case(
        lambda t: ["make-fixture", "--force", str(_write(t / "notes.txt", "keep me"))],
        "make-fixture: {t}/notes.txt is a file that is not HDF5, not a fixture",
    ),
    "npz-force-over-the-npz": Case(
        lambda t: ["import-npz", "--force", str(_good_npz(t)), str(t / "data.npz")],
        "import-npz: {t}/data.npz is a NumPy .npz archive, not a fixture",
    ),
    "make-weights-folder-missing": Case(
        lambda t: ["make-weights", str(t / "new" / "w.h5")], "make-weights: folder {t}/new does not exist"
    ),
    "make-weights-seed-negative": Case(
        lambda t: ["make-weights", "--seed", "-1", str(t / "w.h5")], "option --seed must be an integer >= 0"
    ),
    "npz-over-existing": Case(
        lambda t: ["import-npz", str(_good_npz(t)), str(_fixture_copy(t))],
        "import-npz: {t}/fixture.h5 exists; pass --force",
    ),
    "make-fixture-bad-scan": Case(
        lambda t: ["make-fixture", str(t / "f.h5"), "--scan", "9"], "option --scan: expected ROWSxCOLS"
    ),
    "make-fixture-jitter-too-large": Case(
        lambda t: ["make-fixture", str(t / "f.h5"), "--jitter", "2"], "simulation parameter 'jitter' is 2.0"
    ),
    # Sizes no machine holds: refused by the option before anything is allocated.
    "make-fixture-huge-step": Case(
        lambda t: ["make-fixture", str(t / "f.h5"), "--step", "1e6"], "at most 1024 are simulated"
    ),
    "make-fixture-overflowing-step": Case(
        lambda t: ["make-fixture", str(t / "f.h5"), "--step", "1e300"], "use a smaller make-fixture option --step"
    ),
    "make-fixture-huge-scan": Case(
        lambda t: ["make-fixture", str(t / "f.h5"), "--scan", "100000x100000"],
        "'scan_shape' is 100000x100000 = 10000000000 scan positions; at most 2048",
    ),
    "make-weights-bad-config": Case(
        lambda t: ["make-weights", "--set", "gridsize=5", str(t / "w.h5")], "key 'gridsize' has value 5"
    ),
    # --- declared deviations and tap selection ---------------------------------------------------
    "deviations-file-missing": Case(
        lambda t: run("--deviations", str(t / "nope.toml"))(t), "deviation file {t}/nope.toml: no such file"
    ),
    "deviations-unknown-config-key": Case(
        lambda t: run(
            "--deviations",
            str(
                _write(
                    t / "d.toml",
                    'schema_version = 1\n[[deviation]]\nconfig_key = "canvas"\nreason = "r"\nreference = "x"\n',
                )
            ),
        )(t),
        "deviation file {t}/d.toml, deviation 1: key 'config_key' is 'canvas', not a config key",
    ),
    "deviations-tap-matching-nothing": Case(
        lambda t: run(
            "--deviations",
            str(
                _write(
                    t / "d.toml",
                    'schema_version = 1\n[[deviation]]\ntap = "encodr.*"\nbackend = "reference"\n'
                    'reason = "r"\nreference = "x"\n',
                )
            ),
        )(t),
        "deviation file {t}/d.toml, deviation 1: key 'tap' is 'encodr.*', which matches no tap of the model",
    ),
    "deviations-unregistered-backend": Case(
        lambda t: run(
            "--deviations",
            str(
                _write(
                    t / "d.toml",
                    'schema_version = 1\n[[deviation]]\ntap = "encoder.*"\nbackend = "troch"\n'
                    'reason = "r"\nreference = "x"\n',
                )
            ),
        )(t),
        "deviation file {t}/d.toml, deviation 1: key 'backend' is 'troch', not a registered backend",
    ),
    "deviations-allow-unknown-key": Case(
        run("--allow-config-diff", "canvas"), "option --allow-config-diff: 'canvas' is not a config key"
    ),
    "config-canvas-too-small": Case(run("--set", "canvas_size=60"), "key 'canvas_size' has value 60; it must be >= N"),
    "taps-exclusion-matches-nothing": Case(
        run("--taps", "!loss.poisson"), "option taps: exclusion '!loss.poisson' matches no tap"
    ),
    "taps-nothing-left": Case(run("--taps", "!*"), "option taps: the patterns leave no tap"),
    # --- measuring and emulating -----------------------------------------------------------------
    "measure-safety-below-one": Case(lambda t: ["measure-tolerances", "--safety", "0.5"], "option --safety must be"),
    "measure-minimum-zero-over-a-tolerance-file": Case(
        lambda t: [
            "measure-tolerances",
            "--from-json",
            str(_write(t / "m.json", '{"needed": {"grad.*.kernel": 40.0}, "where": {}, "runs": 1}')),
            "--minimum",
            "0",
            "--out",
            str(_write(t / "t.toml", default_tolerance_file().read_bytes())),
        ],
        "option --minimum must be a finite number > 0, got 0.0",
    ),
    "measure-unknown-emulation": Case(
        lambda t: ["measure-tolerances", "--emulate", "threads=7"], "option --emulate: unknown setting 'threads=7'"
    ),
    "measure-unknown-family": Case(
        lambda t: ["measure-tolerances", "--families", "grad.nope", "--gradients"], "'grad.nope' is not a family of"
    ),
    "measure-gradient-family-without-gradients": Case(
        lambda t: ["measure-tolerances", "--families", "grad"], "add --gradients to measure them"
    ),
    "measure-from-json-missing": Case(
        lambda t: ["measure-tolerances", "--from-json", str(t / "m.json"), "--out", str(t / "t.toml")],
        "option --from-json: {t}/m.json: cannot read it",
    ),
    "measure-from-json-not-a-measurement": Case(
        lambda t: [
            "measure-tolerances",
            "--from-json",
            str(_write(t / "m.json", '{"needed": {"grad.*.kernel": "big"}, "where": {}, "runs": 1}')),
            "--out",
            str(t / "t.toml"),
        ],
        "option --from-json: {t}/m.json: family 'grad.*.kernel' needed 'big', not a number >= 0",
    ),
    "measure-out-is-a-folder": Case(
        lambda t: ["measure-tolerances", "--cases", "1", "--out", str(t)], "option --out: {t} is a folder"
    ),
    "measure-json-in-a-missing-folder": Case(
        lambda t: ["measure-tolerances", "--cases", "1", "--json", str(t / "no" / "m.json")],
        "option --json: folder {t}/no does not exist",
    ),
    "measure-negative-cases": Case(
        lambda t: ["measure-tolerances", "--cases", "-1"], "option --cases must be an integer >= 0, got -1"
    ),
    "measure-nothing": Case(
        lambda t: ["measure-tolerances", "--cases", "0"], "option --cases 0 without --matrix or --from-json"
    ),
    "emulate-without-command": Case(lambda t: ["emulate"], "emulate: give the command to run after --"),
    "emulate-command-not-found": Case(
        lambda t: ["emulate", "--settings", "threads=1", "--", "no-such-command-here"],
        "emulate: command not found: no-such-command-here",
    ),
    "emulate-unknown-setting": Case(
        lambda t: ["emulate", "--settings", "nosuch", "--", "true"], "option --settings: unknown setting 'nosuch'"
    ),
    "env-unknown-backend": Case(lambda t: ["env", "--backends", "nope"], "option --backends: 'nope' is not"),
    "check-device-without-gpu": Case(
        lambda t: ["check-device", "cuda", "--backends", "torch"], "device 'cuda' is not usable: torch backend"
    ),
}


def _hashes(*roots: Path) -> dict[str, str]:
    out = {}
    for root in roots:
        paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for p in paths:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def test_the_suite_is_broad():
    assert len(CASES) >= 40
    assert {name.split("-")[0] for name in CASES} >= {
        "config",
        "fixture",
        "weights",
        "tolerances",
        "report",
        "npz",
        "device",
        "backend",
        "make",
        "measure",
    }


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_refused_clearly_and_damages_nothing(name, tmp_path, capsys):
    import torch

    case = CASES[name]
    if "cuda" in name or "gpu" in name:
        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU: a missing one cannot be shown here")
    argv = case.make(tmp_path)
    watched = (tmp_path, bundled_fixtures_dir(), default_tolerance_file())
    before = _hashes(*watched)
    created_before = sorted(p.name for p in tmp_path.iterdir())
    code = main(argv)
    captured = capsys.readouterr()
    assert code == case.code, captured.err
    assert captured.err.startswith("ptycho-parity: error: "), captured.err
    assert case.message.format(t=tmp_path) in captured.err, captured.err
    assert "Traceback" not in captured.err + captured.out
    assert "verdict" not in captured.out
    assert _hashes(*watched) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == created_before  # nothing written either


def test_regen_baselines_where_there_are_no_tests_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = main(["regen-baselines"])
    assert code == 2
    err = capsys.readouterr().err
    assert "regen-baselines: pytest found no parity tests here" in err and "Traceback" not in err


def test_a_crashing_backend_exits_3_with_its_traceback_in_the_report(tmp_path, monkeypatch, capsys):
    """A backend that raises (its bug, not bad input) is a crash: exit 3, the traceback in the report,
    the other backends still compared."""
    site = tmp_path / "site"
    (site / "crashy_backend.py").parent.mkdir()
    (site / "crashy_backend.py").write_text(
        "from backends.reference import ReferenceBackend\n\n"
        "class Crashy(ReferenceBackend):\n"
        "    name = 'crashy'\n"
        "    precision = 'float32'\n\n"
        "    def forward(self, batch):\n"
        "        raise ZeroDivisionError('a bug in the backend')\n"
    )
    info = site / "crashy_backend-0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: crashy-backend\nVersion: 0.0\n")
    (info / "entry_points.txt").write_text("[ptycho_parity.backends]\ncrashy = crashy_backend:Crashy\n")
    monkeypatch.syspath_prepend(str(site))
    report = tmp_path / "report"
    code = main(["run", *SMALL, "--backends", "reference,crashy,torch", "--report", str(report), "--no-html"])
    out = capsys.readouterr()
    assert code == 3
    assert "verdict: error" in out.out and "backend crashy crashed: ZeroDivisionError: a bug in the backend" in out.out
    data = json.loads((report / "report.json").read_text())
    assert data["verdict"] == "error"
    assert "ZeroDivisionError: a bug in the backend" in data["backends"]["crashy"]["crashed"]
    assert any(c["a"] == "torch" and c["kind"] == "vs_reference" for t in data["taps"] for c in t["comparisons"])
    assert zipfile.is_zipfile(report / "statistics.npz")

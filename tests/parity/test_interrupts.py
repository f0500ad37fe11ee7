"""One Ctrl-C stops a command with exit code 130, and leaves every file as it was or complete.

The commands run in child processes of their own session, and the interrupt is sent to that whole
process group, as a terminal's Ctrl-C is: ``regen-baselines`` runs pytest in a grandchild, which gets
it too. The moments are read off the command's own progress output, so each falls in its phase
(starting up, the regeneration pass once a baseline is written, the verification pass) on any
machine, and none is skipped for coming too late. What pytest prints when it is interrupted (where
it was, in some phases a traceback of its own) is pytest's; the exit code, the files and this tool's
last line are what these tests hold.
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

INNER = """
import pytest

from parity.config import ModelConfig


@pytest.mark.parity
@pytest.mark.parametrize("changes", [{}, {"probe_big": False}, {"object_big": False}])
def test_small(parity_run, parity_baseline, changes):
    result = parity_run(ModelConfig(gridsize=1, **changes), batch_size=2, max_groups=2)
    parity_baseline.check(result)
"""
ARGS = ["--", "--parity-backends", "reference", "--parity-report-dir", "rep"]


def _start(project: Path, *argv: str) -> subprocess.Popen[bytes]:
    # Unbuffered, so pytest's progress reaches the pipe as it happens (the moments are read off it).
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
    env.pop("PTYCHO_PARITY_REQUIRE_BACKENDS", None)
    # A runner started in the background (`nohup cmd &`) hands down SIGINT ignored, and a command
    # started so would install no Ctrl-C handler. A handler of ours is reset to the default by exec,
    # so while one is installed the command starts as it would from a terminal.
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "parity.cli", *argv],
            cwd=project,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the interrupt reaches it and its children only
        )
    finally:
        signal.signal(signal.SIGINT, before)


def _baselines(project: Path) -> dict[str, dict[str, np.ndarray]]:
    out = {}
    for path in sorted((project / "test_inner").glob("*.npz")):
        with np.load(path) as npz:
            out[path.name] = {k: npz[k] for k in npz.files}
    return out


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("interrupts")
    (root / "test_inner.py").write_text(INNER)
    proc = _start(root, "regen-baselines", "--all", *ARGS)
    out = proc.communicate(timeout=600)[0].decode()
    assert proc.returncode == 0, out
    return root


# A progress line of pytest -q starts with the first finished test's dot; a summary line ends a pass.
PROGRESS = re.compile(rb"^\.", re.MULTILINE)
SUMMARY = re.compile(rb"\d+ (passed|failed|errors?)\b[^\n]* in [0-9.]+s")


def _verifying(out: bytes) -> bool:
    first = SUMMARY.search(out)
    return first is not None and PROGRESS.search(out, first.end()) is not None


# When to interrupt, read off what the command has printed so far (pytest's progress dots, flushed
# as each test ends), so each moment falls in its phase however fast or slow the machine is.
MOMENTS: dict[str, Callable[[bytes], bool]] = {
    "starting up": lambda out: True,
    "regeneration pass, after the first baseline": lambda out: PROGRESS.search(out) is not None,
    "verification pass": _verifying,
}


def _wait_for(proc: subprocess.Popen[bytes], moment: str, timeout: float = 300) -> bytearray:
    """Read the command's output until ``moment`` is reached; the bytes read so far are returned."""
    assert proc.stdout is not None
    out = bytearray()
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    while not MOMENTS[moment](bytes(out)):
        if select.select([fd], [], [], 0.05)[0]:
            chunk = os.read(fd, 4096)
            if not chunk:
                proc.wait(timeout=60)
                pytest.fail(f"the command ended (exit {proc.returncode}) before {moment!r}:\n{out.decode()}")
            out += chunk
        elif time.monotonic() > deadline:
            pytest.fail(f"{moment!r} did not come within {timeout} s:\n{out.decode()}")
    return out


@pytest.mark.parametrize("moment", list(MOMENTS))
def test_one_ctrl_c_ends_regen_baselines_with_130_and_no_torn_baseline(project, moment):
    root = project
    before = _baselines(root)
    assert len(before) == 3
    proc = _start(root, "regen-baselines", "--all", *ARGS)
    if moment == "starting up":
        time.sleep(1.0)  # Python's own handler is installed: a Ctrl-C before that is the shell's business
    head = _wait_for(proc, moment)
    os.killpg(proc.pid, signal.SIGINT)  # one Ctrl-C, to the whole process group
    out = (head + proc.communicate(timeout=120)[0]).decode()
    assert proc.returncode == 130, out
    assert out.rstrip().endswith("ptycho-parity: interrupted; every file is as it was or completely written")
    # Every baseline is the old one or a complete new one (here with the same statistics), never torn,
    # and no temporary file is left beside them.
    after = _baselines(root)
    assert after.keys() == before.keys()
    for name, arrays in before.items():
        assert after[name].keys() == arrays.keys()
        for key, values in arrays.items():
            np.testing.assert_array_equal(after[name][key], values, err_msg=f"{name} {key}")
    assert not [p for p in (root / "test_inner").iterdir() if p.name.startswith(".")]


def test_one_ctrl_c_ends_a_run_with_130_and_releases_the_report_folder(tmp_path):
    proc = _start(tmp_path, "run", "--report", "rep", "--max-groups", "4", "--batch-size", "1")
    # Interrupt once the run holds its report folder (it claims it after checking every input, before
    # any backend is built), however slow the machine is to import the frameworks.
    lock = tmp_path / "rep" / ".ptycho-parity.lock"
    deadline = time.monotonic() + 300
    while not lock.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)
    if proc.poll() is not None:
        pytest.skip("the run finished before the interrupt")
    os.killpg(proc.pid, signal.SIGINT)
    out = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 130, out
    assert "interrupted" in out and "Traceback" not in out
    assert not (tmp_path / "rep").exists()  # the folder the run made, lock and all, is gone again


# In process: a Ctrl-C that an extension rethrows as another exception (parity.interrupt).


class _Interrupted:
    """What TensorFlow's pybind11 did with a Ctrl-C that landed while its C++ ran Python code (one
    CI run: "backend tensorflow crashed", exit 3): the KeyboardInterrupt comes back as a RuntimeError."""

    def forward(self, batch):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # Python runs the handler at its next check, well before this ends
        except KeyboardInterrupt:
            raise RuntimeError(
                "pybind11::error_already_set: MISMATCH of original and normalized active exception types: "
                "ORIGINAL InvalidArgumentError REPLACED BY KeyboardInterrupt"
            ) from None
        raise AssertionError("no SIGINT arrived")


class _Swallowed:
    """What llvmlite's ctypes callback did with a Ctrl-C that landed while numba wrote its cache (a
    clean clone's CI run ended "verdict: pass", exit 0): the KeyboardInterrupt is printed and dropped."""

    def forward(self, batch):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        except KeyboardInterrupt:
            return super().forward(batch)  # type: ignore[misc]
        raise AssertionError("no SIGINT arrived")


def test_a_ctrl_c_an_extension_swallows_still_ends_the_run(tmp_path):
    import threading

    from parity.interrupt import watching
    from parity.runner import run_parity
    from parity.tolerances import load_tolerances

    from .test_runner import TAPS, TOL_TEXT, Toy, Toy32, W, _batches, _expected

    class Swallows(_Swallowed, Toy32):
        pass

    assert threading.current_thread() is threading.main_thread(), "a signal reaches the main thread only"
    path = tmp_path / "t.toml"
    path.write_text(TOL_TEXT)
    tol = load_tolerances(path, known_taps=TAPS)
    calls = []

    class Counted(Toy32):
        def forward(self, batch):
            calls.append(batch)
            return super().forward(batch)

    backends = {"reference": Toy(None, W), "x": Swallows(None, W), "y": Counted(None, W)}
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt), watching():
            run_parity(backends, _batches(), tol, expected=_expected, reference="reference")
        assert calls == []  # ended right after the backend that swallowed it, not at the end of the run
        with pytest.raises(KeyboardInterrupt), watching():  # swallowed outside any runner: on leaving
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)
            except KeyboardInterrupt:
                pass
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, outer)


def test_a_ctrl_c_an_extension_rethrows_as_another_exception_ends_the_run(tmp_path):
    import threading

    from parity.interrupt import watching
    from parity.runner import run_parity
    from parity.tolerances import load_tolerances

    from .test_runner import TAPS, TOL_TEXT, Toy, Toy32, W, _batches, _expected

    class Interrupted(Toy32):
        forward = _Interrupted.forward

    class Crashes(Toy32):
        def forward(self, batch):
            raise RuntimeError("a crash of its own")

    assert threading.current_thread() is threading.main_thread(), "a signal reaches the main thread only"
    path = tmp_path / "t.toml"
    path.write_text(TOL_TEXT)
    tol = load_tolerances(path, known_taps=TAPS)

    def run(other):
        backends = {"reference": Toy(None, W), "x": other(None, W)}
        return run_parity(backends, _batches(), tol, expected=_expected, reference="reference")

    # Python's own handler, as a command has it (a pytest-xdist worker may have another).
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt), watching():
            run(Interrupted)
        # Without the watch the same thing is recorded as the backend's crash: what the watch is for.
        assert "REPLACED BY KeyboardInterrupt" in (run(Interrupted).backends["x"].crashed or "")
        # Under a watch, a backend that raises with no interrupt is still a crash, and the run goes on.
        with watching():
            result = run(Crashes)
        assert "a crash of its own" in (result.backends["x"].crashed or "")
        assert result.backends["reference"].crashed is None
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back after each watch
    finally:
        signal.signal(signal.SIGINT, outer)

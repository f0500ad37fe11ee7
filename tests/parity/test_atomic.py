"""Files written as one set (parity.atomic.staged): the whole old set or the whole new one."""

import os
import signal

import pytest

from parity.atomic import staged


def _set(folder, tag, names=("a", "b", "c")):
    for name in names:
        (folder / name).write_text(f"{tag} {name}")


def _contents(folder):
    return {p.name: p.read_text() for p in sorted(folder.iterdir())}


def _stage_new(folder, remove=(), interrupt_after=None):
    with staged(remove=[folder / n for n in remove]) as stage:
        for name in ("a", "b"):
            stage(folder / name).write_text(f"new {name}")
            if name == interrupt_after:
                raise KeyboardInterrupt


def test_a_set_replaces_every_file_and_removes_the_old_sets_others(tmp_path):
    _set(tmp_path, "old")
    _stage_new(tmp_path, remove=["c"])
    assert _contents(tmp_path) == {"a": "new a", "b": "new b"}


def test_an_interrupt_while_the_temporaries_are_written_changes_nothing(tmp_path):
    _set(tmp_path, "old")
    with pytest.raises(KeyboardInterrupt):
        _stage_new(tmp_path, remove=["c"], interrupt_after="b")
    assert _contents(tmp_path) == {"a": "old a", "b": "old b", "c": "old c"}


@pytest.mark.parametrize(
    ("handler", "raises"),
    [(signal.default_int_handler, KeyboardInterrupt), (signal.SIG_IGN, None), ("callable", RuntimeError)],
)
def test_a_sigint_among_the_renames_goes_to_the_handler_in_place_once_they_are_done(
    tmp_path, monkeypatch, handler, raises
):
    """Held, then handled as it would have been: raised, ignored, or passed to the program's handler."""
    if handler == "callable":

        def handler(signum, frame):
            raise RuntimeError(f"handled {signum}")

    _set(tmp_path, "old")
    real = os.replace

    def replace(src, dst):
        real(src, dst)
        os.kill(os.getpid(), signal.SIGINT)

    before = signal.signal(signal.SIGINT, handler)
    try:
        monkeypatch.setattr(os, "replace", replace)
        if raises is None:
            _stage_new(tmp_path, remove=["c"])
        else:
            with pytest.raises(raises):
                _stage_new(tmp_path, remove=["c"])
        assert signal.getsignal(signal.SIGINT) is handler
    finally:
        signal.signal(signal.SIGINT, before)
    assert _contents(tmp_path) == {"a": "new a", "b": "new b"}

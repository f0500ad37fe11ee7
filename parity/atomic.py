"""Atomic file writes: a reader sees the old file or the complete new one, never a torn one.

An interrupted run (Ctrl-C, a killed CI job, two runs at once) must not leave a half-written baseline,
report or fixture behind, so everything the harness writes goes through here. Files that only make
sense together (a report's four files, a baseline's ``.npz`` and its ``.meta.json``) are written as
one set by :func:`staged`: all of the old set or all of the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from types import FrameType


def _temporary(target: Path) -> Path:
    """An empty temporary file beside ``target`` (same folder: the rename onto it is atomic)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    # mkstemp makes the file 0600; give it the permissions a plain open() would have.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return Path(tmp)


def _fsync(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` in one rename."""
    target = Path(path)
    tmp_path = _temporary(target)
    try:
        yield tmp_path
        _fsync(tmp_path)
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


@contextlib.contextmanager
def staged(remove: Iterable[str | os.PathLike[str]] = ()) -> Iterator[Callable[[str | os.PathLike[str]], Path]]:
    """Write several files as one set: ``stage(target)`` gives a temporary beside ``target`` to write.

    When the block ends without an exception, the temporaries replace their targets in the order they
    were staged and the files in ``remove`` (an earlier set's files this one does not have) are deleted
    first, all or nothing (:func:`replace_together`). The slow part, writing the temporaries, can be
    interrupted or fail: the targets are then untouched and the temporaries deleted. Stage last the
    file readers look at first, so that once it is new, so is everything it refers to.
    """
    pairs: list[tuple[Path, Path]] = []

    def stage(target: str | os.PathLike[str]) -> Path:
        tmp = _temporary(Path(target))
        pairs.append((tmp, Path(target)))
        return tmp

    try:
        yield stage
        for tmp, _ in pairs:
            _fsync(tmp)
        replace_together(pairs, remove=[Path(p) for p in remove])
    finally:
        for tmp, _ in pairs:
            tmp.unlink(missing_ok=True)


def replace_together(pairs: Sequence[tuple[Path, Path]], remove: Sequence[Path] = ()) -> None:
    """Delete ``remove``, then move each ``(temporary, target)`` onto its target: all of it or none.

    Each rename is atomic, a sequence of them is not. Two things could stop one halfway and leave a
    set whose files come from two writes: a Ctrl-C, which is held until the renames are done (they take
    microseconds; the run then ends as interrupted, its new set complete), and a rename that fails (a
    file made immutable, a full inode table), after which every change already made is undone from
    hard links to the old files taken before the first one. A hard link keeps the old file where
    readers look until the moment it is replaced, which moving it aside would not.
    """
    with _sigint_held():
        backups: dict[Path, Path] = {}
        changed: list[Path] = []
        try:
            for target in [*remove, *(t for _, t in pairs)]:
                if target not in backups and (target.is_file() or target.is_symlink()):
                    backups[target] = _backup(target)
            for target in remove:
                if target in backups:
                    target.unlink()
                    changed.append(target)
            for tmp, target in pairs:
                os.replace(tmp, target)
                changed.append(target)
        except BaseException:
            for target in reversed(changed):
                try:
                    if target in backups:
                        os.replace(backups[target], target)
                    else:
                        target.unlink(missing_ok=True)
                except OSError:
                    backups.pop(target, None)  # an old file that cannot be put back is kept, not deleted
            raise
        finally:
            for backup in backups.values():
                backup.unlink(missing_ok=True)


def _backup(target: Path) -> Path:
    """A second name for ``target``'s current file (a hard link; a copy where links are unsupported)."""
    backup = target.with_name(f".{target.name}.{secrets.token_hex(6)}.old")
    try:
        os.link(target, backup, follow_symlinks=False)
    except OSError:
        shutil.copy2(target, backup, follow_symlinks=False)
    return backup


@contextlib.contextmanager
def _sigint_held() -> Iterator[None]:
    """Hold a SIGINT that arrives inside the block, then act on it as the handler in place would.

    Only the main thread receives signals; elsewhere, and where the handler in place was installed
    from C (it could not be put back), nothing is held.
    """
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous is None:
        yield
        return
    held: list[FrameType | None] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        held.append(frame)

    signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if held and previous is not signal.SIG_IGN:
            if callable(previous):
                previous(signal.SIGINT, held[0])
            else:  # SIG_DFL: end as Python's default handler would
                raise KeyboardInterrupt

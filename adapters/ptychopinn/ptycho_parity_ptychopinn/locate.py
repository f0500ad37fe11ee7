"""Find and import the user's PtychoPINN: a checkout named by PTYCHOPINN_PATH, else the installed one.

The original is GPL-3 code we never copy, so it has to be found on the user's machine. Two places
are accepted, in this order:

1. ``PTYCHOPINN_PATH``: the root of a checkout of hoidn/PtychoPINN (the folder holding ``ptycho/``
   and ``ptycho_torch/``). It is put first on ``sys.path``. When it is set, the package MUST come
   from there: a silently imported other copy would make the report lie about what was tested.
2. The installed packages ``ptycho`` / ``ptycho_torch``.

Failing to import is not a crash: the caller turns :class:`OriginalUnavailableError` into
``parity.errors.BackendUnavailableError``, which the harness reports as "unavailable: <reason>".
Where the code came from (folder, git commit, whether it was modified) goes into the backend's
``environment()`` so a report says exactly which original was compared.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import os
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

ENV_VAR = "PTYCHOPINN_PATH"
# hoidn/PtychoPINN: the commit these adapters were written and checked against.
TESTED_COMMIT = "712c23f3bb6581ee4300c5572e3817a3d931165e"
HINT = (
    f"set {ENV_VAR} to a checkout of hoidn/PtychoPINN (the folder holding ptycho/ and ptycho_torch/) "
    "or install PtychoPINN, with what the original needs beside this project's pins: "
    "pip install -c constraints/cpu.txt 'ptycho-parity-ptychopinn[original]' and "
    "pip install --no-deps tf-keras==<your TensorFlow version> (see docs/ptychopinn.md)"
)


class OriginalUnavailableError(ImportError):
    """The original package cannot be imported; the message is the reason, hint included."""


@dataclass(frozen=True)
class Original:
    """One imported original package and where it came from."""

    package: str  # "ptycho" or "ptycho_torch"
    module: ModuleType
    root: Path  # the folder on sys.path that holds the package
    from_env: bool  # True when found through PTYCHOPINN_PATH
    commit: str | None  # `git rev-parse HEAD` of the checkout, None when not a git checkout
    modified: bool | None  # the package's files differ from that commit (None: unknown)

    def record(self) -> dict[str, object]:
        """What ``environment()`` reports about the original."""
        return {
            "package": self.package,
            "path": str(self.root),
            "found_through": ENV_VAR if self.from_env else "installed package",
            "commit": self.commit,
            "modified_since_commit": self.modified,
            "tested_commit": TESTED_COMMIT,
        }


def _git(root: Path, *args: str) -> subprocess.CompletedProcess[str] | None:
    try:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return None


def checkout_commit(root: Path, package: str) -> tuple[str | None, bool | None]:
    """(commit, modified) of the git checkout holding ``root/package``; (None, None) if there is none.

    ``modified`` compares the package's working files with that commit (``git diff --quiet HEAD``),
    so an edited original is visible in the report, not only its commit.
    """
    head = _git(root, "rev-parse", "HEAD")
    if head is None or head.returncode != 0:
        return None, None
    commit = head.stdout.strip() or None
    diff = _git(root, "diff", "--quiet", "HEAD", "--", package)
    modified = None if diff is None or diff.returncode not in (0, 1) else diff.returncode == 1
    return commit, modified


def _package_dir(module: ModuleType) -> Path | None:
    file = getattr(module, "__file__", None)
    if file:
        return Path(file).resolve().parent
    paths = list(getattr(module, "__path__", []))  # a namespace package has no __file__
    return Path(paths[0]).resolve() if paths else None


def _import_quietly(name: str) -> ModuleType:
    """Import ``name``; the original prints on import (e.g. 'No GPU found'), which is not ours to show."""
    with contextlib.redirect_stdout(io.StringIO()):
        return importlib.import_module(name)


def _reason(exc: BaseException) -> str:
    return traceback.format_exception_only(type(exc), exc)[-1].strip()


def availability_problem(package: str, frameworks: tuple[str, ...] = ()) -> str | None:
    """Why ``package`` cannot be imported, found cheaply (nothing is imported), or None if it may be.

    Checks what can be checked without importing TensorFlow or PyTorch: that PTYCHOPINN_PATH holds the
    package when set, that the package is installed otherwise, and that the frameworks are installed.
    A None here does not promise the import will work (a missing dependency of the original shows only
    on import); constructing the backend imports it and says why if it fails.
    """
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        root = Path(env).expanduser().resolve()
        if not (root / package / "__init__.py").is_file():
            return f"{ENV_VAR}={env} has no package {package!r} (no {package}/__init__.py there); {HINT}"
    elif package not in sys.modules and importlib.util.find_spec(package) is None:
        return f"{package!r} is not installed and {ENV_VAR} is not set; {HINT}"
    for framework in frameworks:
        if framework not in sys.modules and importlib.util.find_spec(framework) is None:
            return f"the original {package!r} needs {framework!r}, which is not installed; {HINT}"
    return None


def import_original(package: str, *submodules: str) -> Original:
    """Import ``package`` (and ``package.<sub>`` for each submodule) from where the user keeps it.

    Raises :class:`OriginalUnavailableError` with the reason and :data:`HINT` when it cannot be imported,
    when ``PTYCHOPINN_PATH`` names a folder without it, or when this process already imported the
    package from somewhere else (re-importing a package with module-level state is not safe).
    """
    env = os.environ.get(ENV_VAR, "").strip()
    root: Path | None = None
    if env:
        root = Path(env).expanduser().resolve()
        if not (root / package / "__init__.py").is_file():
            raise OriginalUnavailableError(
                f"{ENV_VAR}={env} has no package {package!r} (no {package}/__init__.py there); {HINT}"
            )
        loaded = sys.modules.get(package)
        if loaded is not None:
            where = _package_dir(loaded)
            if where is None or where != (root / package).resolve():
                raise OriginalUnavailableError(
                    f"{package!r} was already imported in this process from {where}, not from {ENV_VAR}={env}; "
                    "run with one PtychoPINN per process"
                )
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))
    try:
        module = _import_quietly(package)
        for sub in submodules:
            _import_quietly(f"{package}.{sub}")
    except Exception as exc:  # ImportError mostly; the original raises RuntimeError when torch is missing
        source = f"from {ENV_VAR}={env}" if env else "(installed package)"
        raise OriginalUnavailableError(f"cannot import {package!r} {source}: {_reason(exc)}; {HINT}") from exc
    pkg_dir = _package_dir(module)
    if pkg_dir is None:
        raise OriginalUnavailableError(f"{package!r} imported, but it has no location on disk; {HINT}")
    if root is not None and pkg_dir != (root / package).resolve():
        raise OriginalUnavailableError(f"{package!r} was imported from {pkg_dir}, not from {ENV_VAR}={env}; {HINT}")
    commit, modified = checkout_commit(pkg_dir.parent, package)
    return Original(package, module, pkg_dir.parent, bool(env), commit, modified)

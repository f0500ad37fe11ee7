"""Backend discovery through the ``ptycho_parity.backends`` entry-point group.

Third-party packages register their own backends the same way this project registers its three,
so a user's TF/PyTorch pair needs no change here. Loading a backend imports its framework; when that
fails the backend is reported as unavailable with the import error instead of crashing the run.
"""

from __future__ import annotations

import functools
import sys
import traceback
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points

from parity.backend import Backend
from parity.errors import BackendUnavailableError

GROUP = "ptycho_parity.backends"


@dataclass(frozen=True)
class BackendInfo:
    name: str
    target: str  # "module:Class" as registered
    backend: type[Backend] | None
    error: str | None  # why it is unavailable, None when available

    @property
    def available(self) -> bool:
        return self.backend is not None


def _entry_points() -> list[EntryPoint]:
    return list(_entry_points_on(tuple(sys.path)))


@functools.lru_cache(maxsize=8)
def _entry_points_on(path: tuple[str, ...]) -> tuple[EntryPoint, ...]:
    """The group's entry points for one ``sys.path``: reading every installed distribution's metadata
    takes milliseconds, and one parity run asks for a backend about ten times. A path entry added
    later (a plugin put on the path at run time) makes a new key, so it is seen."""
    return tuple(sorted(entry_points(group=GROUP), key=lambda ep: ep.name))


def _load(ep: EntryPoint) -> BackendInfo:
    try:
        obj = ep.load()
    except Exception as exc:  # an ImportError usually, but a broken plugin may raise anything
        last = traceback.format_exception_only(type(exc), exc)[-1].strip()
        return BackendInfo(ep.name, ep.value, None, last)
    if not (isinstance(obj, type) and issubclass(obj, Backend)):
        return BackendInfo(ep.name, ep.value, None, f"{ep.value} is not a parity.Backend subclass")
    try:
        problem = obj.availability_problem()
    except Exception as exc:
        problem = (
            f"{ep.value}.availability_problem() raised: {traceback.format_exception_only(type(exc), exc)[-1].strip()}"
        )
    if problem:
        return BackendInfo(ep.name, ep.value, None, problem)
    return BackendInfo(ep.name, ep.value, obj, None)


def discover() -> dict[str, BackendInfo]:
    """Every registered backend, loaded, with the reason for each one that cannot be used."""
    return {ep.name: _load(ep) for ep in _entry_points()}


def registered_names() -> list[str]:
    """Registered backend names, without importing any framework."""
    return [ep.name for ep in _entry_points()]


def load_backend(name: str) -> type[Backend]:
    """The backend class registered as ``name``; raises :class:`BackendUnavailableError` with the reason."""
    for ep in _entry_points():
        if ep.name == name:
            info = _load(ep)
            if info.backend is None:
                raise BackendUnavailableError(name, info.error or "unknown error")
            return info.backend
    known = ", ".join(registered_names()) or "none"
    raise BackendUnavailableError(name, f"no backend of that name is registered (registered: {known})")

"""Exceptions the harness raises.

Every error a user can trigger with bad input derives from :class:`ParityInputError`, so the CLI can
map all of them to exit code 2 and the pytest plugin can show them without a traceback.
"""

from __future__ import annotations


class ParityInputError(ValueError):
    """Bad input: a config, fixture, weights file, tolerance file, baseline or option."""


class ConfigError(ParityInputError):
    """A model configuration key is unknown, of the wrong type or out of range."""


class ConfigMismatchError(ParityInputError):
    """Backends report different effective configurations, so comparing them would be meaningless."""


class WeightsError(ParityInputError):
    """A weights file is missing a parameter, has an extra one, or one of the wrong shape."""


class FixtureError(ParityInputError):
    """A fixture file fails validation."""


class ToleranceError(ParityInputError):
    """A tolerance file is malformed or names a tap that does not exist."""


class BaselineError(ParityInputError):
    """A stored baseline cannot be used (corrupt, or made from other inputs)."""


class BackendUnavailableError(RuntimeError):
    """A backend is registered but cannot be loaded; ``reason`` says why (usually the import error)."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"backend {name!r} is unavailable: {reason}")
        self.name = name
        self.reason = reason

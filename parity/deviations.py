"""Declared deviations: differences between implementations that a team knows and accepts, for now.

A deviation is either a config key on which a backend's effective config may differ (the run then
goes on past the precheck), or a tap at which a backend may diverge (its failures there are shown as
known, not as failures). Each carries a reason and a reference, so a reader of the report knows why.

Like pytest's strict xfail, a declaration must keep earning its place: a deviation whose backend ran
but whose difference did not show is reported as not reproduced, and that fails the run. A file of
excuses therefore cannot outlive the bugs it excuses.

File format (TOML)::

    schema_version = 1
    [[deviation]]
    config_key = "canvas_size"          # either this ...
    backend = "ptychopinn-torch"        # optional for a config key (default: any backend)
    reason = "why it differs, with numbers"
    reference = "where it comes from: a file, an issue, a commit"

    [[deviation]]
    tap = "object.canvas"               # ... or a tap name or shell-style pattern, with a backend
    backend = "ptychopinn-torch"
    reason = "..."
    reference = "..."
"""

from __future__ import annotations

import fnmatch
import os
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from parity.errors import ParityInputError

SCHEMA_VERSION = 1
ANY = "*"
_KEYS = {"config_key", "tap", "backend", "reason", "reference"}

# Status of one declaration after a run.
REPRODUCED, NOT_REPRODUCED, NOT_APPLICABLE = "reproduced", "not_reproduced", "not_applicable"


@dataclass(frozen=True)
class Deviation:
    reason: str
    reference: str
    source: str  # "file.toml, deviation 2" or "option --allow-config-diff"
    backend: str = ANY
    config_key: str | None = None
    tap: str | None = None  # a name or shell-style pattern

    def covers_tap(self, tap: str, backend: str) -> bool:
        return self.tap is not None and self.backend in (ANY, backend) and fnmatch.fnmatchcase(tap, self.tap)

    def describe(self) -> str:
        what = f"config key {self.config_key!r}" if self.config_key is not None else f"tap {self.tap!r}"
        who = "any backend" if self.backend == ANY else self.backend
        return f"{what} of {who} ({self.source}): {self.reason}"


def load_deviations(
    path: str | os.PathLike[str],
    known_keys: Iterable[str] = (),
    known_taps: Iterable[str] = (),
    known_backends: Iterable[str] = (),
) -> list[Deviation]:
    """Read a deviation file; every problem raises ParityInputError naming the file, entry and key.

    ``known_keys``, ``known_taps`` and ``known_backends``, when given, are the config keys a
    declaration may name, the taps its pattern must match one of, and the backends it may name (a
    typo must never silently excuse nothing: it would read as "declared" in the file and do nothing
    in the run).
    """
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ParityInputError(f"deviation file {p}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ParityInputError(f"deviation file {p}: cannot be read ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ParityInputError(f"deviation file {p}: not valid TOML ({exc})") from None
    if "schema_version" not in data:
        raise ParityInputError(
            f"deviation file {p}: key 'schema_version' is missing; add schema_version = {SCHEMA_VERSION}"
        )
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ParityInputError(f"deviation file {p}: key 'schema_version' is {version!r}; expected {SCHEMA_VERSION}")
    unknown = sorted(set(data) - {"schema_version", "deviation"})
    if unknown:
        raise ParityInputError(f"deviation file {p}: unknown top-level key {unknown[0]!r}; allowed: deviation")
    entries = data.get("deviation", [])
    if not isinstance(entries, list):
        raise ParityInputError(f"deviation file {p}: 'deviation' must be an array of tables ([[deviation]])")
    known = (set(known_keys), sorted(known_taps), set(known_backends))
    return [_entry(p, i, e, *known) for i, e in enumerate(entries, start=1)]


def _entry(
    path: Path, index: int, entry: Any, known_keys: set[str], known_taps: list[str], known_backends: set[str]
) -> Deviation:
    where = f"deviation file {path}, deviation {index}"
    if not isinstance(entry, dict):
        raise ParityInputError(f"{where}: expected a table, got {type(entry).__name__}")
    unknown = sorted(set(entry) - _KEYS)
    if unknown:
        raise ParityInputError(f"{where}: unknown key {unknown[0]!r}; allowed: {', '.join(sorted(_KEYS))}")
    for key in _KEYS:
        if key in entry and not (isinstance(entry[key], str) and entry[key].strip()):
            raise ParityInputError(f"{where}: key {key!r} must be a non-empty string, got {entry[key]!r}")
    for key in ("reason", "reference"):
        if key not in entry:
            raise ParityInputError(f"{where}: key {key!r} is required (say why, and where it comes from)")
    config_key, tap = entry.get("config_key"), entry.get("tap")
    if (config_key is None) == (tap is None):
        raise ParityInputError(f"{where}: give exactly one of 'config_key' and 'tap'")
    if config_key is not None and known_keys and config_key not in known_keys:
        raise ParityInputError(
            f"{where}: key 'config_key' is {config_key!r}, not a config key; allowed: {', '.join(sorted(known_keys))}"
        )
    if tap is not None and "backend" not in entry:
        raise ParityInputError(f"{where}: a tap deviation needs key 'backend' (the side known to differ)")
    if tap is not None and known_taps and not any(fnmatch.fnmatchcase(t, tap) for t in known_taps):
        raise ParityInputError(f"{where}: key 'tap' is {tap!r}, which matches no tap of the model")
    backend = entry.get("backend")
    if backend is not None and known_backends and backend not in known_backends:
        raise ParityInputError(
            f"{where}: key 'backend' is {backend!r}, not a registered backend; "
            f"registered: {', '.join(sorted(known_backends))}"
        )
    return Deviation(
        reason=entry["reason"],
        reference=entry["reference"],
        source=f"{path.name}, deviation {index}",
        backend=entry.get("backend", ANY),
        config_key=config_key,
        tap=tap,
    )


def allow_config_diff(keys: Sequence[str], known_keys: Iterable[str] = ()) -> list[Deviation]:
    """The one-off ``--allow-config-diff KEY``: a config deviation of any backend, held as strictly."""
    known = set(known_keys)
    out = []
    for key in keys:
        if known and key not in known:
            raise ParityInputError(
                f"option --allow-config-diff: {key!r} is not a config key; allowed: {', '.join(sorted(known))}"
            )
        out.append(Deviation("allowed for this run", "command line", "option --allow-config-diff", config_key=key))
    return out


@dataclass
class DeviationLedger:
    """What happened to each declaration in one run: who it applied to and whether it reproduced."""

    deviations: Sequence[Deviation]
    backends: Sequence[str]  # the backends that ran
    seen: dict[int, list[str]] = field(default_factory=dict)  # deviation index -> what reproduced it

    def split_config_diff(
        self, diff: Mapping[str, Mapping[str, Any]], reference: str | None = None
    ) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
        """(undeclared, declared) parts of a config diff.

        A differing key is declared when every backend whose value differs from the reference's is
        declared for it (without a reference: when the backends no declaration names still agree).
        The reference's value is the canonical one, so declaring the reference excuses nothing.
        """
        undeclared: dict[str, dict[str, Any]] = {}
        declared: dict[str, dict[str, Any]] = {}
        for key, values in diff.items():
            decls = [(i, d) for i, d in enumerate(self.deviations) if d.config_key == key]
            names = {d.backend for _, d in decls}
            if reference is not None and reference in values:
                canonical = repr(values[reference])
                off = {b for b, v in values.items() if repr(v) != canonical}
                covered = bool(decls) and (ANY in names or off <= names)
            else:
                rest = {repr(v) for b, v in values.items() if ANY not in names and b not in names}
                covered = bool(decls) and len(rest) <= 1
            if covered:
                declared[key] = dict(values)
                for i, d in decls:
                    if d.backend == ANY:
                        self.seen.setdefault(i, []).append(f"{key} differs")
                    elif d.backend in values:
                        others = {repr(v) for b, v in values.items() if b != d.backend}
                        if repr(values[d.backend]) not in others:
                            self.seen.setdefault(i, []).append(f"{key}={values[d.backend]!r}")
            else:
                undeclared[key] = dict(values)
        return undeclared, declared

    def declared_tap(self, tap: str, backend: str) -> Deviation | None:
        return next((d for d in self.deviations if d.covers_tap(tap, backend)), None)

    def mark_tap(self, deviation: Deviation, what: str) -> None:
        i = self.deviations.index(deviation)
        self.seen.setdefault(i, []).append(what)

    def report(self, taps_run: Iterable[str]) -> list[dict[str, Any]]:
        """One entry per declaration: its fields, status and what reproduced it."""
        taps = list(taps_run)
        out = []
        for i, d in enumerate(self.deviations):
            applies = d.backend == ANY or d.backend in self.backends
            if d.tap is not None:
                applies = applies and any(fnmatch.fnmatchcase(t, d.tap) for t in taps)
            status = REPRODUCED if i in self.seen else (NOT_REPRODUCED if applies else NOT_APPLICABLE)
            out.append(
                {
                    "config_key": d.config_key,
                    "tap": d.tap,
                    "backend": d.backend,
                    "reason": d.reason,
                    "reference": d.reference,
                    "source": d.source,
                    "status": status,
                    "seen": list(self.seen.get(i, [])),
                }
            )
        return out

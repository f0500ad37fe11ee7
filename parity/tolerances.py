"""Where a tolerance is decided: the checked-in TOML file, its validation and its lookup.

One rule everywhere (see :data:`parity.compare.RULE`); only atol and rtol vary, per tap and per
statistic, chosen by shell-style patterns. Later entries win over earlier ones, and a device profile's
entries come after the base entries. Every pattern must match at least one tap that exists: a typo in
this file must never silently disable a check.

File layout (``schema_version = 1``)::

    [elementwise]                 # backend vs float64 reference, per tap
    atol = 1e-6
    rtol = 1e-5
    pair_factor = 2.0             # backend vs backend: both sides float32, so their gap may add up
    [[elementwise.tap]]
    pattern = "encoder.*"
    atol = 1e-5
    rtol = 1e-5
    when = { N = 128 }            # optional: only for configs with these values
    measured = 1.2e-6             # optional: the measurement the value was set from

    [statistics]                  # statistics vs the stored baseline of the same backend
    atol = 1e-6
    rtol = 1e-6
    [[statistics.tap]]
    pattern = "*"
    statistic = "phase.*"         # optional, default "*"
    backend = "torch"             # optional
    atol = 1e-4
    rtol = 1e-4

    [profiles.cuda.elementwise]   # same shape as above; cpu and cuda are the profiles
"""

from __future__ import annotations

import fnmatch
import math
import os
import tomllib
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from parity.config import ModelConfig
from parity.errors import ToleranceError
from parity.stats import stat_names
from parity.taps import all_tap_names

SCHEMA_VERSION = 1
PROFILES = ("cpu", "cuda")
_ALL_STATS = frozenset(stat_names(False) + stat_names(True))
_CONFIG_KEYS = frozenset(ModelConfig().to_dict())
# A ModelConfig, a third-party backend pair's own config object with to_dict(), or a plain mapping.
ConfigLike = Any


def config_values(config: ConfigLike) -> Mapping[str, Any]:
    if config is None:
        return {}
    if isinstance(config, Mapping):
        return config
    return dict(config.to_dict())


def default_tolerance_file() -> Path:
    return Path(str(resources.files("parity") / "tolerances.toml"))


@dataclass(frozen=True)
class Rule:
    pattern: str
    atol: float
    rtol: float
    statistic: str = "*"
    backend: str | None = None
    when: Mapping[str, Any] = field(default_factory=dict)

    def applies(self, tap: str, config: ConfigLike, statistic: str = "*", backend: str | None = None) -> bool:
        if not fnmatch.fnmatchcase(tap, self.pattern):
            return False
        if self.statistic != "*" and not fnmatch.fnmatchcase(statistic, self.statistic):
            return False
        if self.backend is not None and backend != self.backend:
            return False
        if self.when:
            if config is None:
                return False
            values = config_values(config)
            return all(values.get(k) == v for k, v in self.when.items())
        return True


@dataclass(frozen=True)
class Section:
    atol: float
    rtol: float
    rules: tuple[Rule, ...] = ()
    pair_factor: float = 1.0

    def lookup(
        self, tap: str, config: ConfigLike, statistic: str = "*", backend: str | None = None
    ) -> tuple[float, float]:
        atol, rtol = self.atol, self.rtol
        for rule in self.rules:
            if rule.applies(tap, config, statistic, backend):
                atol, rtol = rule.atol, rule.rtol
        return atol, rtol


@dataclass(frozen=True)
class Tolerances:
    """Resolved tolerances for one device profile."""

    elementwise_section: Section
    statistics_section: Section
    source: str
    profile: str

    def elementwise(self, tap: str, config: ConfigLike, pair: bool = False) -> tuple[float, float]:
        """(atol, rtol) for comparing a tap; ``pair`` for backend vs backend instead of vs reference."""
        atol, rtol = self.elementwise_section.lookup(tap, config)
        if pair:
            f = self.elementwise_section.pair_factor
            return atol * f, rtol * f
        return atol, rtol

    def statistic(self, tap: str, statistic: str, backend: str, config: ConfigLike) -> tuple[float, float]:
        return self.statistics_section.lookup(tap, config, statistic, backend)


def _number(value: Any, where: str, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ToleranceError(f"{where}: key {key!r} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or v < 0:
        raise ToleranceError(f"{where}: key {key!r} must be a finite number >= 0, got {value!r}")
    return v


def _check_keys(table: Mapping[str, Any], allowed: Collection[str], where: str) -> None:
    for key in table:
        if key not in allowed:
            raise ToleranceError(f"{where}: unknown key {key!r}; allowed keys: {', '.join(sorted(allowed))}")


def _parse_section(
    table: Any,
    where: str,
    known_taps: Collection[str],
    is_stats: bool,
    base: Section | None,
    config_keys: Collection[str] = _CONFIG_KEYS,
) -> Section:
    if not isinstance(table, Mapping):
        raise ToleranceError(f"{where}: must be a table")
    top = {"atol", "rtol", "tap"} | ({"pair_factor"} if not is_stats else set())
    _check_keys(table, top, where)
    if base is None and ("atol" not in table or "rtol" not in table):
        raise ToleranceError(f"{where}: needs default 'atol' and 'rtol'")
    atol = _number(table["atol"], where, "atol") if "atol" in table else base.atol  # type: ignore[union-attr]
    rtol = _number(table["rtol"], where, "rtol") if "rtol" in table else base.rtol  # type: ignore[union-attr]
    pair = base.pair_factor if base is not None else 1.0
    if "pair_factor" in table:
        pair = _number(table["pair_factor"], where, "pair_factor")
    entries = table.get("tap", [])
    if not isinstance(entries, list):
        raise ToleranceError(f"{where}.tap: must be an array of tables ([[...tap]])")
    rules = list(base.rules) if base is not None else []
    allowed = {"pattern", "atol", "rtol", "when", "measured", "note"}
    if is_stats:
        allowed |= {"statistic", "backend"}
    for i, entry in enumerate(entries):
        w = f"{where}.tap[{i}]"
        if not isinstance(entry, Mapping):
            raise ToleranceError(f"{w}: must be a table")
        _check_keys(entry, allowed, w)
        for key in ("pattern", "atol", "rtol"):
            if key not in entry:
                raise ToleranceError(f"{w}: missing required key {key!r}")
        pattern = entry["pattern"]
        if not isinstance(pattern, str) or not any(fnmatch.fnmatchcase(t, pattern) for t in known_taps):
            raise ToleranceError(f"{w}: pattern {pattern!r} matches no tap; a typo here would silently disable a check")
        statistic = entry.get("statistic", "*")
        if not isinstance(statistic, str) or not any(fnmatch.fnmatchcase(s, statistic) for s in _ALL_STATS):
            raise ToleranceError(
                f"{w}: statistic {statistic!r} matches no statistic; known: {', '.join(sorted(_ALL_STATS))}"
            )
        backend = entry.get("backend")
        if backend is not None and not isinstance(backend, str):
            raise ToleranceError(f"{w}: key 'backend' must be a string, got {backend!r}")
        when = entry.get("when", {})
        if not isinstance(when, Mapping):
            raise ToleranceError(f"{w}: key 'when' must be a table of config keys")
        for k in when:
            if k not in config_keys:
                raise ToleranceError(
                    f"{w}: 'when' names unknown config key {k!r}; allowed: {', '.join(sorted(config_keys))}"
                )
        if "measured" in entry:
            _number(entry["measured"], w, "measured")
        rules.append(
            Rule(
                pattern=pattern,
                atol=_number(entry["atol"], w, "atol"),
                rtol=_number(entry["rtol"], w, "rtol"),
                statistic=statistic,
                backend=backend,
                when=dict(when),
            )
        )
    return Section(atol, rtol, tuple(rules), pair)


def load_tolerances(
    path: str | os.PathLike[str] | None = None,
    profile: str = "cpu",
    known_taps: Collection[str] | None = None,
    config_keys: Collection[str] | None = None,
) -> Tolerances:
    """Parse and validate a tolerance file.

    ``known_taps`` (patterns must match one) and ``config_keys`` (allowed in ``when``) default to the
    PtychoPINN model's; a third-party backend pair passes its own.
    """
    keys = frozenset(config_keys) if config_keys is not None else _CONFIG_KEYS
    p = Path(path) if path is not None else default_tolerance_file()
    if profile not in PROFILES:
        raise ToleranceError(f"tolerance profile {profile!r} is unknown; allowed: {', '.join(PROFILES)}")
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ToleranceError(f"{p}: tolerance file does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ToleranceError(f"{p}: not valid TOML ({exc})") from exc
    taps = frozenset(known_taps) if known_taps is not None else all_tap_names()
    where = str(p)
    _check_keys(data, {"schema_version", "elementwise", "statistics", "profiles"}, where)
    if data.get("schema_version") != SCHEMA_VERSION:
        raise ToleranceError(
            f"{where}: key 'schema_version' is {data.get('schema_version')!r}; expected {SCHEMA_VERSION}"
        )
    for key in ("elementwise", "statistics"):
        if key not in data:
            raise ToleranceError(f"{where}: missing required table [{key}]")
    elem = _parse_section(data["elementwise"], f"{where}: [elementwise]", taps, False, None, keys)
    stats = _parse_section(data["statistics"], f"{where}: [statistics]", taps, True, None, keys)
    profiles = data.get("profiles", {})
    if not isinstance(profiles, Mapping):
        raise ToleranceError(f"{where}: [profiles] must be a table")
    base_elem, base_stats = elem, stats
    for name, prof in profiles.items():
        w = f"{where}: [profiles.{name}]"
        if name not in PROFILES:
            raise ToleranceError(f"{w}: unknown profile {name!r}; allowed: {', '.join(PROFILES)}")
        if not isinstance(prof, Mapping):
            raise ToleranceError(f"{w}: must be a table")
        _check_keys(prof, {"elementwise", "statistics"}, w)
        # Parse every profile, not just the selected one, so a broken cuda section fails on CPU too.
        p_elem = _parse_section(prof.get("elementwise", {}), f"{w}.elementwise", taps, False, base_elem, keys)
        p_stats = _parse_section(prof.get("statistics", {}), f"{w}.statistics", taps, True, base_stats, keys)
        if name == profile:
            elem, stats = p_elem, p_stats
    return Tolerances(elem, stats, where, profile)

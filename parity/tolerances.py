"""Where a tolerance is decided: the tolerance model, its checked-in factors, and nothing else.

One rule everywhere (:data:`parity.compare.RULE`): an element passes when
``|a − b| ≤ atol_i + rtol·|b_i|``, b the reference side, with

    atol_i = factor · u · S_i        rtol = floor · u

- u is the unit roundoff of the precision that made the compared values (float32: 2⁻²⁴);
- S_i is the *error scale* of element i: how large a faithful float32 computation's rounding error
  is expected to be there, in units of u. The float64 arbiter computes it from its own values on the
  same batch (``Backend.error_scales``; for PtychoPINN, ``backends/reference/error_model.py``), so
  a tolerance follows the magnitude of what is compared, element by element: more photons, larger
  weights, the 1000× canvas ring, all scale their tolerance with no re-measurement. Where the
  arbiter gives none, S_i is the largest |b| of the element's sample (:func:`magnitude_scale`);
- factor is dimensionless, one per family of taps, read from the TOML file below. It absorbs what
  the error model cannot know (how a framework orders its sums, which conv algorithm it picks) and
  is measured across seeds, data, configs and emulated CPUs (``ptycho-parity measure-tolerances``);
- floor is a few roundings of the value itself, so no tolerance is ever zero.

Backend vs backend allows ``pair_factor`` times the atol (both sides carry float32 error).
Statistics vs a baseline allow ``baseline_factor`` times the elementwise tolerance of the backend's
own values (the baseline and the run may come from two machines, each within its tolerance), carried
through each statistic by :func:`parity.stats.patch_statistics_and_bounds`. The ``cuda`` profile multiplies
every factor by ``device_factor``, and may hold the scales of some taps at least η times their
largest (``normwise_floor``, pattern = η): cuDNN's weight-gradient algorithms spread rounding over a
whole kernel, so an element whose own products are tiny still carries a share of its largest ones'
(docs/tolerances.md, "GPUs").

File layout (``schema_version = 2``; families are tried in order, the first match wins, and every
tap must belong to one)::

    schema_version = 2
    [model]
    floor = 4.0
    pair_factor = 2.0
    baseline_factor = 2.0
    blame_ratio = 2.0             # see parity.runner: when a failure is blamed on one backend
    [[family]]
    pattern = "encoder.*"
    factor = 200.0
    measured = 84.2               # optional: the largest error / (u·S) seen when measuring
    [profiles.cuda]
    device_factor = 4.0
    normwise_floor = { "grad.*.kernel" = 1e-3 }   # optional: S_i >= η · max S over the tap
"""

from __future__ import annotations

import fnmatch
import math
import os
import tomllib
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from parity.errors import ToleranceError
from parity.stats import patch_statistics_and_bounds
from parity.taps import all_tap_names

SCHEMA_VERSION = 2
PROFILES = ("cpu", "cuda")
UNIT_ROUNDOFF = {"float32": 2.0**-24, "float64": 2.0**-53}
_MODEL_KEYS = {"floor": 1e-300, "pair_factor": 1.0, "baseline_factor": 1.0, "blame_ratio": 1.0}
# Config keys of a third-party backend pair: accepted where a ModelConfig is (a mapping or to_dict()).
ConfigLike = Any


def config_values(config: ConfigLike) -> Mapping[str, Any]:
    if config is None:
        return {}
    if isinstance(config, Mapping):
        return config
    return dict(config.to_dict())


def default_tolerance_file() -> Path:
    return Path(str(resources.files("parity") / "tolerances.toml"))


def unit_roundoff(precision: str | None) -> float:
    """u of the precision a backend computes in (float32 unless it says float64)."""
    return UNIT_ROUNDOFF["float64" if precision == "float64" else "float32"]


def magnitude_scale(values: np.ndarray) -> np.ndarray:
    """The fallback error scale: each element gets the largest |value| of its sample (all channels).

    Not the element's own |value|: a sum that cancels to near zero still carries the rounding error of
    its terms, and those are as large as the sample's values, not as the small result. NaN and
    infinity are left out of the maximum: a NaN both sides agree on would make every tolerance of its
    sample NaN, and an infinity every one infinite, and either passes any difference there.
    """
    mag = np.abs(np.asarray(values))
    if mag.size == 0:
        return np.zeros(mag.shape)
    if not np.isfinite(mag.max()):  # one pass; the copy only where NaN or Inf is
        mag = np.where(np.isfinite(mag), mag, 0.0)
    if mag.ndim < 2:
        return np.asarray(mag.max(initial=0.0) + np.zeros_like(mag, dtype=np.float64))
    axes = tuple(range(1, mag.ndim))
    return np.asarray(np.broadcast_to(mag.max(axis=axes, keepdims=True), mag.shape), dtype=np.float64)


@dataclass(frozen=True)
class Family:
    """Taps whose errors the same dimensionless factor covers."""

    pattern: str
    factor: float
    measured: float | None = None


@dataclass(frozen=True)
class Tolerances:
    """The tolerance model for one device profile."""

    families: tuple[Family, ...]
    floor: float
    pair_factor: float
    baseline_factor: float
    blame_ratio: float
    device_factor: float
    source: str
    profile: str
    # (pattern, η) of the profile's normwise floor: a matching tap's S_i is at least η·max S
    normwise_floors: tuple[tuple[str, float], ...] = ()

    def family(self, tap: str) -> Family:
        for fam in self.families:
            if fnmatch.fnmatchcase(tap, fam.pattern):
                return fam
        raise ToleranceError(f'{self.source}: no [[family]] pattern matches tap {tap!r}; add one (or a catch-all "*")')

    def factor(self, tap: str) -> float:
        return self.family(tap).factor * self.device_factor

    def normwise_floor(self, tap: str) -> float:
        """η of ``tap`` on this profile (0: none), the first matching pattern's."""
        for pattern, eta in self.normwise_floors:
            if fnmatch.fnmatchcase(tap, pattern):
                return eta
        return 0.0

    def floored_scales(self, scales: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The error scales the comparisons use: each tap's S_i held at least η times its largest
        over the batch where the profile names a normwise floor for it, the others as they are."""
        out = dict(scales)
        if not self.normwise_floors:  # the CPU's case: no pass over any tap
            return out
        for tap, s in scales.items():
            eta = self.normwise_floor(tap)
            if eta <= 0.0:
                continue
            arr = np.asarray(s, dtype=np.float64)
            finite = arr[np.isfinite(arr)]
            if finite.size:  # one inf must not lift every element to inf
                out[tap] = np.maximum(arr, eta * float(np.max(finite)))
        return out

    def rtol(self, precision: str | None = "float32") -> float:
        return self.floor * unit_roundoff(precision)

    def atol_per_scale(self, tap: str, *, pair: bool = False, precision: str | None = "float32") -> float:
        """factor·u (times ``pair_factor`` for two backends): the elementwise atol is this times S_i.
        The comparison takes the two apart, so no atol array the size of the tap is ever made."""
        return self.factor(tap) * (self.pair_factor if pair else 1.0) * unit_roundoff(precision)

    def atol(self, tap: str, scale: np.ndarray, *, pair: bool = False, precision: str | None = "float32") -> np.ndarray:
        """Elementwise atol for comparing ``tap`` (``scale``: the error scale S, broadcastable)."""
        return np.asarray(scale, dtype=np.float64) * self.atol_per_scale(tap, pair=pair, precision=precision)

    def statistics_with_tolerances(
        self, tap: str, values: np.ndarray, scale: np.ndarray, precision: str | None
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """The patch statistics of ``values``, and the per-patch tolerance of each against a
        baseline of the same backend (one read of the tap for both).

        The baseline and this run may come from two machines, each within the elementwise tolerance
        of the exact values, hence ``baseline_factor``. Baselines are stored in float32, and the run's
        statistic is rounded the same way before the two are compared: two values either side of a
        rounding boundary land one float32 step apart, up to 2u of the value, however close they
        were (one u allowed a clean float64 reference to fail by a step on another CPU, until
        2026-12-05).
        """
        return patch_statistics_and_bounds(
            values,
            scale,
            times=self.baseline_factor * self.atol_per_scale(tap, precision=precision),
            rounding=2.0 * UNIT_ROUNDOFF["float32"],
            proportional=self.baseline_factor * self.rtol(precision),
        )

    def rule(self) -> str:
        floors = "".join(f"; S_i >= {eta:g} max S for {pattern}" for pattern, eta in self.normwise_floors)
        return (
            "|a - b| <= atol_i + rtol * |b_i|;  atol_i = factor * u * S_i,  rtol = floor * u  "
            f"(floor {self.floor:g}, pair x{self.pair_factor:g}, device x{self.device_factor:g}{floors}; "
            "S: the arbiter's error scale, or the sample's largest |b|)"
        )


def _number(value: Any, where: str, key: str, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ToleranceError(f"{where}: key {key!r} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or v < minimum:
        bound = "> 0" if minimum and minimum < 1 else f">= {minimum:g}"
        raise ToleranceError(f"{where}: key {key!r} must be a finite number {bound}, got {value!r}")
    return v


def _check_keys(table: Mapping[str, Any], allowed: Collection[str], where: str) -> None:
    for key in table:
        if key not in allowed:
            raise ToleranceError(f"{where}: unknown key {key!r}; allowed keys: {', '.join(sorted(allowed))}")


def _table(data: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, Mapping):
        raise ToleranceError(f"{where}: [{key}] must be a table")
    return value


def _families(entries: Any, where: str, known_taps: Collection[str]) -> tuple[Family, ...]:
    if not isinstance(entries, list) or not entries:
        raise ToleranceError(f"{where}: needs at least one [[family]] table (pattern, factor)")
    out: list[Family] = []
    for i, entry in enumerate(entries):
        w = f"{where}: [[family]] #{i + 1}"
        if not isinstance(entry, Mapping):
            raise ToleranceError(f"{w}: must be a table")
        _check_keys(entry, {"pattern", "factor", "measured", "note"}, w)
        for key in ("pattern", "factor"):
            if key not in entry:
                raise ToleranceError(f"{w}: missing required key {key!r}")
        pattern = entry["pattern"]
        if not isinstance(pattern, str) or not any(fnmatch.fnmatchcase(t, pattern) for t in known_taps):
            raise ToleranceError(f"{w}: pattern {pattern!r} matches no tap; a typo here would silently disable a check")
        # The first match wins, so a family whose every tap an earlier one takes never applies (a
        # catch-all "*" above it): its factor would be read by nobody, as with a typo.
        owners = [
            next((j for j, f in enumerate(out) if fnmatch.fnmatchcase(t, f.pattern)), None)
            for t in known_taps
            if fnmatch.fnmatchcase(t, pattern)
        ]
        if None not in owners:
            j = min(o for o in owners if o is not None)
            raise ToleranceError(
                f"{w}: pattern {pattern!r} never applies: every tap it matches is matched first by family "
                f"#{j + 1} ({out[j].pattern!r}); families are tried in order, so move it above that one"
            )
        factor = _number(entry["factor"], w, "factor", minimum=1e-300)
        measured = None
        if "measured" in entry:
            measured = _number(entry["measured"], w, "measured")
            if measured > factor:
                raise ToleranceError(
                    f"{w}: factor {factor:g} is below its own measurement {measured:g}: it would fail on the "
                    "runs it was measured on"
                )
        out.append(Family(pattern, factor, measured))
    return tuple(out)


def _normwise_floors(table: Any, where: str, known_taps: Collection[str]) -> tuple[tuple[str, float], ...]:
    """A profile's ``normwise_floor``: tap pattern = η, 0 <= η <= 1, each pattern matching some tap."""
    if not isinstance(table, Mapping):
        example = '{ "grad.*.kernel" = 1e-3 }'
        raise ToleranceError(f"{where}: key 'normwise_floor' must be a table of tap pattern = eta, e.g. {example}")
    floors = []
    for pattern, eta in table.items():
        w = f"{where}: normwise_floor"
        value = _number(eta, w, pattern)
        if value > 1.0:
            raise ToleranceError(
                f"{w}: key {pattern!r} must be at most 1 (a fraction of the tap's largest scale), got {eta!r}"
            )
        if not any(fnmatch.fnmatchcase(t, pattern) for t in known_taps):
            raise ToleranceError(f"{w}: pattern {pattern!r} matches no tap")
        floors.append((pattern, value))
    return tuple(floors)


def load_tolerances(
    path: str | os.PathLike[str] | None = None,
    profile: str = "cpu",
    known_taps: Collection[str] | None = None,
) -> Tolerances:
    """Parse and validate a tolerance file.

    ``known_taps`` (every pattern must match one) defaults to every tap a PtychoPINN config can
    produce; a third-party backend pair passes its own.
    """
    p = Path(path) if path is not None else default_tolerance_file()
    if profile not in PROFILES:
        raise ToleranceError(f"tolerance profile {profile!r} is unknown; allowed: {', '.join(PROFILES)}")
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ToleranceError(f"{p}: tolerance file does not exist") from None
    except IsADirectoryError:
        raise ToleranceError(f"{p}: is a folder, not a tolerance file") from None
    except UnicodeDecodeError as exc:
        raise ToleranceError(f"{p}: not valid TOML ({exc})") from exc
    except OSError as exc:  # a path through a file, a symlink loop, a name too long...
        raise ToleranceError(f"{p}: tolerance file cannot be read ({exc.strerror or exc})") from None
    return parse_tolerances(text, str(p), profile, known_taps)


def parse_tolerances(
    text: str, where: str, profile: str = "cpu", known_taps: Collection[str] | None = None
) -> Tolerances:
    """``load_tolerances`` of a file's text, ``where`` naming it in messages: lets a command check
    a tolerance file it is about to write before it replaces the one on disk."""
    if profile not in PROFILES:
        raise ToleranceError(f"tolerance profile {profile!r} is unknown; allowed: {', '.join(PROFILES)}")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ToleranceError(f"{where}: not valid TOML ({exc})") from exc
    _check_keys(data, {"schema_version", "model", "family", "profiles"}, where)
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        hint = " (schema 1 held fitted atol tables; docs/tolerances.md describes the model that replaced them)"
        raise ToleranceError(
            f"{where}: key 'schema_version' is {version!r}; expected {SCHEMA_VERSION}" + (hint if version == 1 else "")
        )
    model = _table(data, "model", where)
    _check_keys(model, set(_MODEL_KEYS), f"{where}: [model]")
    missing = [k for k in _MODEL_KEYS if k not in model]
    if missing:
        raise ToleranceError(f"{where}: [model] is missing required key {missing[0]!r}")
    values = {k: _number(model[k], f"{where}: [model]", k, minimum=m) for k, m in _MODEL_KEYS.items()}
    taps = frozenset(known_taps) if known_taps is not None else all_tap_names()
    families = _families(data.get("family"), where, taps)
    profiles = _table(data, "profiles", where)
    device_factor = 1.0
    normwise_floors: tuple[tuple[str, float], ...] = ()
    for name, prof in profiles.items():
        w = f"{where}: [profiles.{name}]"
        if name not in PROFILES:
            raise ToleranceError(f"{w}: unknown profile {name!r}; allowed: {', '.join(PROFILES)}")
        if not isinstance(prof, Mapping):
            raise ToleranceError(f"{w}: must be a table")
        # the floor is a GPU's (cuDNN's spread rounding); a CPU rewrite would not keep it under cpu
        allowed = {"device_factor", "note"} | ({"normwise_floor"} if name == "cuda" else set())
        _check_keys(prof, allowed, w)
        # Every profile is parsed, not just the selected one, so a broken cuda section fails on CPU too.
        factor = _number(prof.get("device_factor", 1.0), w, "device_factor", minimum=1.0)
        floors = _normwise_floors(prof.get("normwise_floor", {}), w, taps)
        if name == profile:
            device_factor, normwise_floors = factor, floors
    return Tolerances(
        families=families,
        floor=values["floor"],
        pair_factor=values["pair_factor"],
        baseline_factor=values["baseline_factor"],
        blame_ratio=values["blame_ratio"],
        device_factor=device_factor,
        source=where,
        profile=profile,
        normwise_floors=normwise_floors,
    )

"""The one configuration schema every backend is built from (forward-model.md, section 1).

Validation is strict because silently ignored or coerced keys are exactly how the two original
implementations drifted apart: an unknown key, a wrong type or an out-of-range value is an error that
names the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from parity.errors import ConfigError

AMP_ACTIVATIONS = ("sigmoid", "swish", "softplus", "relu")
# The largest merge canvas side, in patch sides: every backend holds (batch, gridsize², M, M) complex
# arrays of it, so an offset or jitter of millions of pixels would be an allocation failure reported
# as a backend crash instead of the config key it comes from.
MAX_CANVAS_PER_N = 8


@dataclass(frozen=True)
class _Field:
    kind: type
    allowed: tuple[Any, ...] | None = None  # explicit choices
    minimum: float | None = None  # inclusive lower bound
    strictly_positive: bool = False
    optional: bool = False  # None allowed: the value is derived from other keys

    def describe(self) -> str:
        if self.optional:
            return dataclasses.replace(self, optional=False).describe() + " or null (derived)"
        if self.allowed is not None:
            return "one of " + ", ".join(repr(a) for a in self.allowed)
        if self.strictly_positive:
            return f"a finite {self.kind.__name__} > 0"
        if self.minimum is not None:
            return f"an {self.kind.__name__} >= {self.minimum:g}"
        return f"a {self.kind.__name__}"


# The patch sides the canonical model is defined for (its U-Net depth depends on N).
SUPPORTED_N = (64, 128)

_SCHEMA: dict[str, _Field] = {
    "N": _Field(int, allowed=SUPPORTED_N),
    "gridsize": _Field(int, allowed=(1, 2)),
    "n_filters_scale": _Field(int, allowed=(1, 2, 4)),
    "amp_activation": _Field(str, allowed=AMP_ACTIVATIONS),
    "object_big": _Field(bool),
    "probe_big": _Field(bool),
    "probe_mask": _Field(bool),
    "pad_object": _Field(bool),
    "probe_scale": _Field(float, strictly_positive=True),
    "nphotons": _Field(float, strictly_positive=True),
    "offset": _Field(int, minimum=0),
    "max_position_jitter": _Field(int, minimum=0),
    "canvas_size": _Field(int, minimum=1, optional=True),
}


def _check_value(key: str, value: Any, spec: _Field, source: str) -> Any:
    where = f"{source}: key {key!r}"
    if value is None and spec.optional:
        return None
    # bool is a subclass of int in Python; a bool where a number is expected is a mistake, not a 1.
    if spec.kind is bool:
        ok = isinstance(value, bool)
    elif spec.kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif spec.kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, spec.kind)
    if not ok:
        raise ConfigError(f"{where} has value {value!r} of type {type(value).__name__}; expected {spec.describe()}")
    if spec.kind is float:
        value = float(value)
        if not math.isfinite(value) or (spec.strictly_positive and value <= 0):
            raise ConfigError(f"{where} has value {value!r}; allowed: {spec.describe()}")
    if spec.allowed is not None and value not in spec.allowed:
        raise ConfigError(f"{where} has value {value!r}; allowed: {spec.describe()}")
    if spec.minimum is not None and value < spec.minimum:
        raise ConfigError(f"{where} has value {value!r}; allowed: {spec.describe()}")
    return value


@dataclass(frozen=True)
class ModelConfig:
    """Canonical PtychoPINN forward-model configuration; defaults are the spec's defaults."""

    N: int = 64
    gridsize: int = 2
    n_filters_scale: int = 2
    amp_activation: str = "sigmoid"
    object_big: bool = True
    probe_big: bool = True
    probe_mask: bool = False
    pad_object: bool = True
    probe_scale: float = 4.0
    nphotons: float = 1e9
    offset: int = 4
    max_position_jitter: int = 10
    # The merge canvas side M. None: N + (gridsize - 1)·offset + max_position_jitter, as the
    # canonical model and the original TensorFlow derive it; set it where an implementation derives
    # its canvas otherwise (the original PyTorch port: from its neighbour distance, without a jitter
    # margin), so that the difference is a named config key rather than a mystery in the taps.
    canvas_size: int | None = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = _check_value(f.name, getattr(self, f.name), _SCHEMA[f.name], "config")
            object.__setattr__(self, f.name, value)
        if self.canvas_size is not None:
            if self.canvas_size < self.N or (self.canvas_size - self.N) % 2:
                raise ConfigError(
                    f"config: key 'canvas_size' has value {self.canvas_size}; it must be >= N ({self.N}) "
                    "with canvas_size - N even (the patches sit centred on the canvas)"
                )
        elif (self.M - self.N) % 2:
            raise ConfigError(
                f"config: keys 'offset' ({self.offset}) and 'max_position_jitter' "
                f"({self.max_position_jitter}) give a canvas M={self.M} with M - N odd; "
                "M - N = (gridsize - 1) * offset + max_position_jitter must be even"
            )
        if self.M > MAX_CANVAS_PER_N * self.N:
            keys = (
                f"key 'canvas_size' has value {self.canvas_size}"
                if self.canvas_size is not None
                else f"keys 'offset' ({self.offset}) and 'max_position_jitter' ({self.max_position_jitter}) "
                f"give a canvas M={self.M}"
            )
            raise ConfigError(
                f"config: {keys}; it must be at most {MAX_CANVAS_PER_N} x N = {MAX_CANVAS_PER_N * self.N} "
                "(a group's canvas holds its patches a few pixels apart; larger ones only exhaust memory)"
            )

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any], source: str = "config") -> ModelConfig:
        """Build from a plain mapping (TOML, JSON, CLI), rejecting unknown keys by name."""
        if not isinstance(mapping, Mapping):
            raise ConfigError(f"{source}: expected a table of config keys, got {type(mapping).__name__}")
        unknown = sorted(set(mapping) - set(_SCHEMA))
        if unknown:
            raise ConfigError(
                f"{source}: unknown key {unknown[0]!r} (value {mapping[unknown[0]]!r}); "
                f"allowed keys: {', '.join(_SCHEMA)}"
            )
        values = {k: _check_value(k, v, _SCHEMA[k], source) for k, v in mapping.items()}
        return cls(**values)

    def replace(self, **changes: Any) -> ModelConfig:
        return self.from_mapping({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def resolved_dict(self) -> dict[str, Any]:
        """What a faithful implementation reports as its effective config: every key, with the
        derived ``canvas_size`` resolved to the canvas it builds, so two sides that derive their
        canvas differently differ at that key in the precheck."""
        return {**self.to_dict(), "canvas_size": self.M}

    # Derived sizes, named as in forward-model.md.
    @property
    def C(self) -> int:
        """Patches per group."""
        return self.gridsize * self.gridsize

    @property
    def M(self) -> int:
        """Canvas size: ``canvas_size`` when set, else derived from the scan step and jitter margin."""
        if self.canvas_size is not None:
            return self.canvas_size
        return self.N + (self.gridsize - 1) * self.offset + self.max_position_jitter

    @property
    def out_ch(self) -> int:
        """Channels predicted by each head."""
        return self.C if self.object_big else 1

    @property
    def F(self) -> int:
        """Feature channels at the decoder output."""
        return 32 * self.n_filters_scale

    @property
    def encoder_filters(self) -> tuple[int, ...]:
        base = (32, 64, 128) if self.N == 64 else (16, 32, 64, 128)
        return tuple(f * self.n_filters_scale for f in base)

    @property
    def decoder_filters(self) -> tuple[int, ...]:
        base = (64, 32) if self.N == 64 else (128, 64, 32)
        return tuple(f * self.n_filters_scale for f in base)

    @property
    def head_up_filters(self) -> int:
        """Filters of the up block in the border branch and the pad_object=false head."""
        return self.n_filters_scale * 2048 // self.N

    @property
    def has_border(self) -> bool:
        return self.pad_object and self.probe_big

    @property
    def input_scale(self) -> float:
        """s = sqrt(nphotons) / (N/2): the scale of the model input and the initial exp(log_scale)."""
        return math.sqrt(self.nphotons) / (self.N / 2)

    def short_id(self) -> str:
        """A stable, filesystem-safe id listing only keys that differ from the defaults."""
        default = ModelConfig()
        parts = [f"{k}={_fmt(v)}" for k, v in self.to_dict().items() if getattr(default, k) != v]
        return "-".join(parts) if parts else "default"


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def config_diff(configs: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Keys whose values differ between backends: {key: {backend: value}}; empty when all agree."""
    keys: list[str] = []
    for cfg in configs.values():
        keys.extend(k for k in cfg if k not in keys)
    missing = object()
    diff: dict[str, dict[str, Any]] = {}
    for key in keys:
        values = {name: cfg.get(key, missing) for name, cfg in configs.items()}
        distinct = {repr(v) for v in values.values()}
        if len(distinct) > 1:
            diff[key] = {n: ("<missing>" if v is missing else v) for n, v in values.items()}
    return diff

"""The one definition every toy backend implements: config, taps, canonical weights, input batches.

Nothing here imports a framework. The model is

    x (B, C, S, S) → conv 3×3 'same' (F filters, bias) → ReLU → flatten → dense (K, bias) → softmax

and the canonical layout of everything the harness sees is (B, channels, H, W); a vector of K
values per sample is a (B, K, 1, 1) tap.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from parity import TapSpec
from parity.errors import ConfigError, ParityInputError, WeightsError

# Layer names, identical in every framework; each layer's output is the tap of the same name.
LAYERS = ("conv", "relu", "dense", "softmax")


@dataclass(frozen=True)
class ToyConfig:
    """The config object both sides are built from. ``to_dict`` is all the harness reads."""

    in_channels: int = 3
    size: int = 8  # input height = width
    filters: int = 8
    classes: int = 10

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"toy config: key {f.name!r} has value {value!r}; expected an int >= 1")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def flat_features(self) -> int:
        """Inputs of the dense layer: the (F, S, S) activation flattened."""
        return self.filters * self.size * self.size


def tap_specs(config: ToyConfig, batch_size: int) -> list[TapSpec]:
    """Every tap of one forward pass, in order of computation, with its canonical shape."""
    B, C, S, F, K = batch_size, config.in_channels, config.size, config.filters, config.classes
    return [
        TapSpec("input.x", (B, C, S, S)),
        TapSpec("conv", (B, F, S, S)),
        TapSpec("relu", (B, F, S, S)),
        TapSpec("dense", (B, K, 1, 1)),
        TapSpec("softmax", (B, K, 1, 1)),
    ]


def tap_names(config: ToyConfig) -> list[str]:
    return [s.name for s in tap_specs(config, 1)]


def parameter_shapes(config: ToyConfig) -> dict[str, tuple[int, ...]]:
    """Canonical parameter names and shapes.

    Kernels are (kh, kw, in, out) for the conv and (in, out) for the dense layer. The dense kernel's
    rows are in (channel, row, column) order, i.e. the order of flattening a (B, C, H, W) tensor;
    each framework converts to its own layout on load and back on export.
    """
    C, F, K = config.in_channels, config.filters, config.classes
    return {
        "conv.kernel": (3, 3, C, F),
        "conv.bias": (F,),
        "dense.kernel": (config.flat_features, K),
        "dense.bias": (K,),
    }


def generate_weights(config: ToyConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded Glorot-uniform kernels and biases that are never near zero (so a lost bias shows)."""
    rng = np.random.default_rng(seed)
    weights: dict[str, np.ndarray] = {}
    for name, shape in parameter_shapes(config).items():
        if name.endswith(".kernel"):
            receptive = math.prod(shape[:-2])
            limit = math.sqrt(6.0 / (receptive * (shape[-2] + shape[-1])))
            weights[name] = rng.uniform(-limit, limit, size=shape).astype(np.float32)
        else:
            sign = np.where(rng.random(shape) < 0.5, -1.0, 1.0)
            weights[name] = (sign * rng.uniform(0.1, 0.5, size=shape)).astype(np.float32)
    return weights


def validate_weights(weights: Mapping[str, np.ndarray], config: ToyConfig) -> None:
    """Strict: a missing, extra, mis-shaped or non-float32 parameter is an error naming it."""
    expected = parameter_shapes(config)
    for name in weights:
        if name not in expected:
            raise WeightsError(f"toy weights: unexpected parameter {name!r}; expected {sorted(expected)}")
    for name, shape in expected.items():
        if name not in weights:
            raise WeightsError(f"toy weights: missing parameter {name!r} (shape {shape})")
        arr = np.asarray(weights[name])
        if arr.shape != shape or arr.dtype != np.float32:
            raise WeightsError(f"toy weights: parameter {name!r} is {arr.dtype} {arr.shape}; expected float32 {shape}")


def validate_batch(batch: Any, config: ToyConfig) -> np.ndarray:
    """A batch is a float32 array (B, C, S, S); anything else is bad input, not a divergence."""
    arr = np.asarray(batch)
    C, S = config.in_channels, config.size
    want = (C, S, S)
    if arr.ndim != 4 or arr.shape[1:] != want or arr.dtype != np.float32:
        raise ParityInputError(f"toy batch: got {arr.dtype} {arr.shape}; expected float32 (B, {C}, {S}, {S})")
    return arr


def make_batches(config: ToyConfig, count: int, batch_size: int, seed: int = 0) -> list[np.ndarray]:
    """``count`` identical-for-everyone random batches (standard normal, float32)."""
    rng = np.random.default_rng(seed)
    shape = (batch_size, config.in_channels, config.size, config.size)
    return [rng.standard_normal(shape).astype(np.float32) for _ in range(count)]

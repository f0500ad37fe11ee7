"""The space of runs a tolerance must hold on: configs, data, weights and batch shapes.

A :class:`Case` is one parity run with everything that sets the magnitudes of the taps chosen: any
valid config (photon count, probe scale, canvas geometry, filter width, activation...), a simulated
data set of any geometry, weights from any seed scaled by a factor, and a batch shape. The tolerance
measurement (``ptycho-parity measure-tolerances``) draws cases from here with a seeded generator; the
hypothesis strategies in :mod:`parity.strategies` draw them for the false-alarm sweep. Both therefore
cover the same space, and a user's own tests can draw from it too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from itertools import product
from typing import Any

import numpy as np

from parity.config import AMP_ACTIVATIONS, ModelConfig
from parity.simulate import OBJECT_KINDS, SimulationParams

# The parity suite's configs (tests/test_parity_matrix.py): the gridsize x object_big x probe_big x
# probe_mask matrix at N=64, N=128, then options outside the matrix, each at the defaults otherwise.
MATRIX = [
    ModelConfig(gridsize=g, object_big=ob, probe_big=pb, probe_mask=pm)
    for g, ob, pb, pm in product((1, 2), (True, False), (True, False), (False, True))
] + [ModelConfig(N=128)]
OTHER_OPTIONS: list[dict[str, Any]] = [{"amp_activation": a} for a in ("swish", "softplus", "relu")] + [
    {"pad_object": False},
    {"n_filters_scale": 1},
    {"N": 128, "pad_object": False},
    {"N": 128, "gridsize": 1},
]
PARITY_MATRIX = MATRIX + [ModelConfig(**c) for c in OTHER_OPTIONS]

# Bounds of the space (the config schema allows more: these are the values a tolerance is held to).
NPHOTONS = (1e4, 1e12)
PROBE_SCALE = (0.5, 20.0)
WEIGHT_SCALE = (0.3, 3.0)
DATA_PHOTONS = (1e3, 1e12)
STEP = (1.0, 8.0)


@dataclass(frozen=True)
class Case:
    """One run: a config, the data it sees, its weights and its batch shape."""

    config: ModelConfig
    data: SimulationParams
    weights_seed: int
    weight_scale: float = 1.0
    batch_size: int = 2
    groups: int = 2

    def weights(self) -> dict[str, np.ndarray]:
        """Seeded canonical weights with every kernel scaled by ``weight_scale`` (biases kept)."""
        from parity.weights import generate_weights

        w = generate_weights(self.config, self.weights_seed)
        f = np.float32(self.weight_scale)
        return {k: (v * f).astype(np.float32) if k.endswith(".kernel") else v for k, v in w.items()}

    def describe(self) -> str:
        d = self.data
        return (
            f"config[{self.config.short_id()}] data[{d.kind} seed={d.seed} step={d.step:g} jitter={d.jitter:g} "
            f"photons={d.nphotons:.3g} probe_phase={d.probe_phase:g}] weights[seed={self.weights_seed} "
            f"x{self.weight_scale:.3g}] batch {self.batch_size}, groups {self.groups}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "data": self.data.to_dict(),
            "weights_seed": self.weights_seed,
            "weight_scale": self.weight_scale,
            "batch_size": self.batch_size,
            "groups": self.groups,
        }


def scan_shape(gridsize: int, groups: int) -> tuple[int, int]:
    """The smallest square scan that has enough positions for ``groups`` groups of gridsize²."""
    side = max(2, math.ceil(math.sqrt(groups * gridsize * gridsize)))
    return (side, side)


def data_for(config: ModelConfig, seed: int, groups: int, **changes: Any) -> SimulationParams:
    """Simulation parameters matching ``config``'s N and gridsize, with a scan just large enough."""
    params = SimulationParams(
        kind=changes.pop("kind", "lines"),
        N=config.N,
        gridsize=config.gridsize,
        seed=seed,
        scan_shape=scan_shape(config.gridsize, groups),
    )
    return replace(params, **changes)


def valid_geometry(N: int, gridsize: int, offset: int, jitter: int) -> tuple[int, int]:
    """(offset, max_position_jitter) adjusted so that M − N is even, as the schema requires."""
    if ((gridsize - 1) * offset + jitter) % 2:
        jitter += 1
    return offset, jitter


def config_from(values: Mapping[str, Any]) -> ModelConfig:
    """A ModelConfig from drawn values, with the canvas geometry made valid."""
    v = dict(values)
    v["offset"], v["max_position_jitter"] = valid_geometry(
        v.get("N", 64), v.get("gridsize", 2), v.get("offset", 4), v.get("max_position_jitter", 10)
    )
    return ModelConfig(**v)


def _log_uniform(rng: np.random.Generator, lo_hi: tuple[float, float]) -> float:
    lo, hi = lo_hi
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def random_case(rng: np.random.Generator, configs: Sequence[ModelConfig] | None = None) -> Case:
    """A case drawn from the whole space (from ``configs`` only, when given)."""
    if configs:
        config = configs[int(rng.integers(len(configs)))]
    else:
        N = int(rng.choice([64, 64, 128]))
        config = config_from(
            {
                "N": N,
                "gridsize": int(rng.choice([1, 2])),
                "n_filters_scale": int(rng.choice([1, 2] if N == 128 else [1, 2, 4])),
                "amp_activation": str(rng.choice(AMP_ACTIVATIONS)),
                "object_big": bool(rng.integers(2)),
                "probe_big": bool(rng.integers(2)),
                "probe_mask": bool(rng.integers(2)),
                "pad_object": bool(rng.integers(4) > 0),
                "probe_scale": _log_uniform(rng, PROBE_SCALE),
                "nphotons": _log_uniform(rng, NPHOTONS),
                "offset": int(rng.integers(0, 9)),
                "max_position_jitter": int(rng.integers(0, 21)),
            }
        )
    groups = int(rng.integers(1, 4))
    data = data_for(
        config,
        seed=int(rng.integers(1 << 30)),
        groups=groups,
        kind=str(rng.choice(OBJECT_KINDS)),
        step=float(rng.uniform(*STEP)),
        jitter=float(rng.uniform(0.0, 0.99)),
        nphotons=_log_uniform(rng, DATA_PHOTONS),
        probe_phase=float(rng.uniform(-2.0, 2.0)),
    )
    return Case(
        config=config,
        data=data,
        weights_seed=int(rng.integers(1 << 30)),
        weight_scale=_log_uniform(rng, WEIGHT_SCALE),
        batch_size=int(rng.integers(1, 4)),
        groups=groups,
    )


def run_case(case: Case, backends: Sequence[str] | None = None, tolerances: Any = None, **spec: Any) -> Any:
    """Run one case through the harness (``parity.session.run``); returns the ParityResult.

    ``spec`` overrides fields of the RunSpec (``device``, ``require``, ``taps``...).
    """
    from parity.session import DEFAULT_BACKENDS, RunSpec, run
    from parity.simulate import simulate

    run_spec = RunSpec(
        config=case.config,
        fixture=simulate(case.data),
        backends=tuple(backends or DEFAULT_BACKENDS),
        batch_size=case.batch_size,
        max_groups=case.groups,
        weights=case.weights(),
        require=True,
    )
    return run(replace(run_spec, **spec), tolerances=tolerances)

"""Hypothesis strategies over the space of :mod:`parity.sweep`, for property tests of parity.

The property ptycho-parity's own suite checks with them is "the unmodified backends never fail
parity", over every key of the config schema, weight seeds and scales, batch shapes and simulated
data of other geometry. A user's own test can do the same for their backends::

    from hypothesis import given
    from parity.strategies import cases
    from parity.sweep import run_case

    @given(cases())
    def test_no_false_alarm(case):
        result = run_case(case, backends=("reference", "torch", "mine"))
        assert result.passed, result.describe_failure()

Importing this module imports hypothesis (a dependency of ptycho-parity); ``import parity`` does not.
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from parity.config import AMP_ACTIVATIONS, ModelConfig
from parity.simulate import OBJECT_KINDS, SimulationParams
from parity.sweep import DATA_PHOTONS, NPHOTONS, PROBE_SCALE, STEP, WEIGHT_SCALE, Case, config_from, data_for


def _log_floats(lo_hi: tuple[float, float]) -> st.SearchStrategy[float]:
    lo, hi = lo_hi
    return st.floats(min_value=lo, max_value=hi, allow_nan=False, allow_infinity=False)


@st.composite
def configs(draw: Any, N: int | None = None) -> ModelConfig:
    """Any valid config: every key of the schema, the canvas geometry made valid (M − N even)."""
    n = draw(st.sampled_from([64, 128])) if N is None else N
    return config_from(
        {
            "N": n,
            "gridsize": draw(st.sampled_from([1, 2])),
            # N=128 with n_filters_scale=4 is a 19-million-parameter model: a minute per example here.
            "n_filters_scale": draw(st.sampled_from([1, 2] if n == 128 else [1, 2, 4])),
            "amp_activation": draw(st.sampled_from(AMP_ACTIVATIONS)),
            "object_big": draw(st.booleans()),
            "probe_big": draw(st.booleans()),
            "probe_mask": draw(st.booleans()),
            "pad_object": draw(st.booleans()),
            "probe_scale": draw(_log_floats(PROBE_SCALE)),
            "nphotons": draw(_log_floats(NPHOTONS)),
            "offset": draw(st.integers(0, 8)),
            "max_position_jitter": draw(st.integers(0, 20)),
        }
    )


@st.composite
def data(draw: Any, config: ModelConfig, groups: int) -> SimulationParams:
    """Simulated data matching the config's N and gridsize, of any object kind and scan geometry."""
    return data_for(
        config,
        seed=draw(st.integers(0, 2**30)),
        groups=groups,
        kind=draw(st.sampled_from(OBJECT_KINDS)),
        step=draw(st.floats(*STEP)),
        jitter=draw(st.floats(0.0, 0.99)),
        nphotons=draw(_log_floats(DATA_PHOTONS)),
        probe_phase=draw(st.floats(-2.0, 2.0)),
    )


@st.composite
def cases(draw: Any, config: st.SearchStrategy[ModelConfig] | None = None, max_groups: int = 3) -> Case:
    """A whole run: config, data, weights (seed and a kernel scale in [0.3, 3]) and batch shape."""
    cfg = draw(config if config is not None else configs())
    groups = draw(st.integers(1, max_groups))
    return Case(
        config=cfg,
        data=draw(data(cfg, groups)),
        weights_seed=draw(st.integers(0, 2**30)),
        weight_scale=draw(_log_floats(WEIGHT_SCALE)),
        batch_size=draw(st.integers(1, max_groups)),
        groups=groups,
    )

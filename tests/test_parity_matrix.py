"""The parity suite: the config matrix on the bundled fixtures, every backend vs the float64 reference
and vs each other, and every backend's statistics vs its committed baseline.

Run with ``pytest -m parity``; regenerate baselines after an intended change with ``--force-regen``.
"""

from itertools import product

import pytest

from parity.config import ModelConfig

GROUPS = 1  # groups of each fixture per config: every tap covered; keeps baselines under 10 MB

MATRIX = [
    ModelConfig(gridsize=g, object_big=ob, probe_big=pb, probe_mask=pm)
    for g, ob, pb, pm in product((1, 2), (True, False), (True, False), (False, True))
] + [ModelConfig(N=128)]

# Options outside the matrix: each one at the defaults otherwise.
OTHER_OPTIONS = [{"amp_activation": a} for a in ("swish", "softplus", "relu")] + [
    {"pad_object": False},
    {"n_filters_scale": 1},
    {"N": 128, "pad_object": False},
]


@pytest.mark.parity
@pytest.mark.parametrize("config", MATRIX, ids=lambda c: c.short_id())
def test_forward_parity(config, parity_run, parity_baseline):
    result = parity_run(config, batch_size=GROUPS, max_groups=GROUPS)
    parity_baseline.check(result)


@pytest.mark.parity
@pytest.mark.parametrize("changes", OTHER_OPTIONS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_forward_parity_other_options(changes, parity_run, parity_baseline):
    """Options outside the matrix: each one at the defaults otherwise, all taps against the reference."""
    result = parity_run(ModelConfig(**changes), batch_size=GROUPS, max_groups=GROUPS)
    parity_baseline.check(result)

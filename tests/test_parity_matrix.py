"""The parity suite: the config matrix on the bundled fixtures, every backend vs the float64 reference
and vs each other, and every backend's statistics vs its committed baseline.

Run with ``pytest -m parity``; regenerate baselines after an intended change with ``--force-regen``.
"""

import pytest

from parity.config import ModelConfig
from parity.sweep import MATRIX, OTHER_OPTIONS

# Two groups in one batch: every tap covered, and the batch axis exercised (a shift over every axis,
# groups merged into one canvas or a per-batch mean offset show). Forward baselines stay under 10 MB;
# the gradient ones add about 2 MB.
BATCH = 2


# Gradient parity, first: its tests take the longest, and under pytest-xdist (`-n 2`) a long test
# started last leaves the other worker idle. The default and three configs that between them take
# every adjoint of the model (merge and re-extraction, zero padding, the disk mask, N=128's FFT, the
# full head, softplus).
GRADIENT_CONFIGS = [
    ModelConfig(),
    ModelConfig(gridsize=1, object_big=False, probe_mask=True),
    ModelConfig(N=128),
    ModelConfig(pad_object=False, amp_activation="softplus"),
]


@pytest.mark.parity
@pytest.mark.parametrize("config", GRADIENT_CONFIGS, ids=lambda c: c.short_id())
def test_gradient_parity(config, parity_run, parity_baseline):
    """Both losses' gradients with respect to every parameter and to x, after the forward taps."""
    result = parity_run(config, batch_size=BATCH, max_groups=BATCH, gradients=True)
    assert result.gradients and not result.gradients_unsupported
    parity_baseline.check(result)


# The matrix's configs that gradient parity does not already check. A gradient run compares and
# baselines every forward tap, local stages included, on the same batch; the forward run alone
# would repeat that (its baseline held the same statistics) at about 5 s a config.
FORWARD_CONFIGS = [c for c in MATRIX if c not in GRADIENT_CONFIGS]


@pytest.mark.parity
@pytest.mark.parametrize("config", FORWARD_CONFIGS, ids=lambda c: c.short_id())
def test_forward_parity(config, parity_run, parity_baseline):
    result = parity_run(config, batch_size=BATCH, max_groups=BATCH)
    parity_baseline.check(result)


@pytest.mark.parity
@pytest.mark.parametrize("changes", OTHER_OPTIONS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_forward_parity_other_options(changes, parity_run, parity_baseline):
    """Options outside the matrix: each one at the defaults otherwise, all taps against the reference."""
    result = parity_run(ModelConfig(**changes), batch_size=BATCH, max_groups=BATCH)
    parity_baseline.check(result)


@pytest.mark.parity
def test_forward_parity_offsets_not_centred(parity_run, parity_baseline):
    """Offsets relative to each group's first member, as imported data may hold them: the batch's mean
    offset d̄ is not 0, so the merge's subtraction of it is exercised (the original accepts such data)."""
    result = parity_run(ModelConfig(), fixture="n64_g2_offcentre", batch_size=BATCH, max_groups=BATCH)
    parity_baseline.check(result)

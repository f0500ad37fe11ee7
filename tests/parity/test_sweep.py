"""No false alarms: the unmodified backends pass parity over the whole space of configs, data,
weights and batch shapes (parity.strategies), not only on the bundled fixtures.

The CI profile runs 25 fixed examples; the long profile (docs/tolerances.md has its latest result)::

    pytest tests/parity/test_sweep.py --hypothesis-profile=long -p no:cacheprovider
"""

from hypothesis import example, given, note

from parity.config import ModelConfig
from parity.plugin import import_framework
from parity.strategies import cases
from parity.sweep import Case, data_for, run_case

import_framework("torch")
import_framework("tensorflow")


# Found by the long profile: a faint field whose spectrum squared underflows float32, so both float32
# backends give a diffraction of exactly 0 where the reference has 4e-35 (the error model now carries
# values lost to underflow).
_FAINT = ModelConfig(
    object_big=False,
    probe_big=False,
    probe_mask=True,
    pad_object=False,
    probe_scale=14.9725,
    nphotons=1e4,
    offset=0,
    max_position_jitter=0,
)


@given(cases())
@example(
    Case(
        config=_FAINT,
        data=data_for(_FAINT, seed=87, groups=1, kind="lines", step=1.0, jitter=0.0, nphotons=1e3, probe_phase=0.0),
        weights_seed=1004,
        weight_scale=2.43,
        batch_size=1,
        groups=1,
    )
)
def test_unmodified_backends_never_fail_parity(case):
    note(case.describe())
    result = run_case(case)
    assert result.passed, f"{case.describe()}\n{result.describe_failure()}"
    # The margins say how close a pass was: every comparison is within its tolerance.
    assert all(c.margin <= 1.0 for t in result.taps for c in t.comparisons if c.reason is None)

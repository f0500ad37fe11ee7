"""The verdict of a run: decided here, and only here, from everything the run and its baseline
check found. The runner, the baseline check, the reports, the pytest plugin and the CLI all read it.

- ``error``: a backend crashed (raised while building or running); the others were still compared.
- ``config_mismatch``: the backends' effective configs differ; nothing was run.
- ``fail``: nothing at all was compared (one backend ran, no baseline was checked), or some
  comparison failed (backend vs reference, backend vs backend, structure, a stage
  fed the reference's inputs against the reference, or a statistic vs its baseline) and no
  declared deviation accepts it, a baseline could not be compared (missing, stale, unreadable), or
  a declared deviation did not reproduce (strict, like xfail).
- ``pass``: none of the above.

Bad input never gets a verdict: it is a :class:`parity.errors.ParityInputError` before or during the
run (exit code 2).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from parity.runner import ParityResult

PASS, FAIL, CONFIG_MISMATCH, ERROR = "pass", "fail", "config_mismatch", "error"
# What the CLI exits with for each verdict; 2 is bad input or usage, 130 an interrupt.
EXIT_CODES = {PASS: 0, FAIL: 1, CONFIG_MISMATCH: 1, ERROR: 3}
EXIT_INPUT, EXIT_INTERRUPTED = 2, 130


def decide(result: ParityResult, *, comparing_nothing_fails: bool = True) -> str:
    """``comparing_nothing_fails=False``: the verdict the run would have once something is compared
    (the pytest plugin asks it of a one-backend run whose baselines are still to be checked)."""
    if any(r.crashed for r in result.backends.values()):
        return ERROR
    if result.config_diff:
        return CONFIG_MISMATCH
    if result.first_divergence is not None or result.first_local_divergence is not None:
        return FAIL
    if any(not c.passed for c in result.baseline):
        return FAIL
    if result.baseline_problems or result.stale_deviations():
        return FAIL
    if comparing_nothing_fails and result.compared_nothing:
        return FAIL
    return PASS

"""OpenBLAS's idle threads go to sleep within milliseconds: set before anything loads NumPy.

After each threaded call OpenBLAS's worker threads busy-wait for 2**28 cycles (about 0.1 s) before
they sleep; it reads that length once, when NumPy loads it (``OPENBLAS_THREAD_TIMEOUT=n``: 2**n
cycles, n from 4 to 30). A parity run calls the float64 reference, whose convolutions are BLAS
products, and then another framework, whose threads want the cores the spinning workers hold. On
2 cores torch's forward at batch 4 took more than twice as long right after the reference's, and
TensorFlow's half as long again. 2**24 cycles (a few ms) keeps the workers awake across the gaps
between one forward's products and lets them sleep before the next backend starts: the
measurements and the trade-off (the reference alone a few per cent slower than with the long wait)
are in docs/decisions.md, "Speed". ``parity`` imports this module first, so the setting holds
whenever ``import parity`` comes before NumPy's (the command line, the pytest plugin, the
benchmarks); a value the user set is kept.
"""

from __future__ import annotations

import os

IDLE_WAIT_VARIABLE = "OPENBLAS_THREAD_TIMEOUT"
IDLE_WAIT = "24"

os.environ.setdefault(IDLE_WAIT_VARIABLE, IDLE_WAIT)

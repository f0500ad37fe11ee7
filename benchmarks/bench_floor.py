"""How far the harness could fall at best: what the parts it cannot skip cost, next to the bare forwards.

    python benchmarks/bench_floor.py [--batches 4] [--batch 4] [--repeats 5]

For the default config, on the same batches as `bench_harness.py` and `run.py`'s harness rows:

- each backend's forward passes, wall time and this process's CPU time, and the cores they keep
  busy on average (CPU / wall): a core the bare forwards leave idle is one the harness could overlap
  its work with;
- the reference's error scales (the tolerances of every comparison), as a fraction of the bare
  forwards;
- the floor of an elementwise comparison: a compiled loop that reads both sides and the error
  scale of every real tap once and keeps one maximum, for the three pairs a run compares. Any
  comparison that looks at every element costs at least this.

Timings vary with the machine and its load; they are recorded in benchmarks/README.md, never
asserted by the test suite.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def clocked(fn: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """(wall, CPU) seconds of the run with the median wall time, after one warm-up run."""
    fn()
    runs = []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        runs.append((time.perf_counter() - t0, time.process_time() - c0))
    middle = statistics.median_low([w for w, _ in runs])
    return next(r for r in runs if r[0] == middle)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    import numpy as np
    from numba import njit, prange

    from parity.batch import random_batch
    from parity.config import ModelConfig
    from parity.emulation import cpu_model
    from parity.registry import load_backend
    from parity.weights import generate_weights

    @njit(parallel=True, nogil=True, cache=True)
    def largest_ratio(a: Any, b: Any, s: Any) -> float:
        worst = 0.0
        for i in prange(a.size):
            worst = max(worst, abs(a[i] - b[i]) / s[i])
        return worst

    config = ModelConfig()
    weights = generate_weights(config)
    backends = {n: load_backend(n)(config, weights, "cpu") for n in ("reference", "torch", "tensorflow")}
    batches = [random_batch(config, args.batch, seed=i) for i in range(args.batches)]
    print(f"{cpu_model()}, {os.cpu_count()} CPUs; default config, {args.batches} batches of {args.batch}\n")
    print("| measure | value |\n|---|---|")
    wall = cpu = 0.0
    for name, be in backends.items():
        w, c = clocked(lambda be=be: [be.forward(b) for b in batches], args.repeats)
        wall, cpu = wall + w, cpu + c
        print(f"| forward, {name}: wall / CPU time, cores busy | {w:.3f} s / {c:.3f} s, {c / w:.2f} |")
    print(f"| bare forwards, all three: wall / CPU time, cores busy | {wall:.3f} s / {cpu:.3f} s, {cpu / wall:.2f} |")

    reference = backends["reference"]
    ref_taps = [reference.forward(b) for b in batches]
    w, _ = clocked(lambda: [reference.error_scales(b, t) for b, t in zip(batches, ref_taps, strict=True)], args.repeats)
    print(f"| error scales / bare forwards | {w:.3f} s, {w / wall:.2f} |")

    torch_taps = [backends["torch"].forward(b) for b in batches]
    scales = [reference.error_scales(b, t) for b, t in zip(batches, ref_taps, strict=True)]
    sides = [
        (np.ravel(mine[tap]), np.ravel(ref), np.ravel(scale[tap]))
        for ref_out, mine, scale in zip(ref_taps, torch_taps, scales, strict=True)
        for tap, ref in ref_out.items()
        if tap in mine and tap in scale and ref.dtype.kind == "f" and ref.size > 1000
    ]

    def one_pair() -> None:
        for a, b, s in sides:
            largest_ratio(a, b, s)

    w, _ = clocked(one_pair, args.repeats)
    print(f"| read-only floor of the comparisons, three pairs / bare forwards | {3 * w:.3f} s, {3 * w / wall:.2f} |")


if __name__ == "__main__":
    main()

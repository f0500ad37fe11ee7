"""Forward time of each backend at batch 16 for the default config (not a test: timings vary).

    python benchmarks/bench_forward.py [--batch 16] [--repeats 7] [--backends reference,torch,tensorflow]
                                       [--after reference]

Prints one line per backend: median and best wall time of `forward` over the repeats, after one
warm-up call (which includes TensorFlow's tracing), on a random canonical batch. ``--after NAME``
runs NAME's forward (untimed) right before each timed one, as a parity run alternates backends: it
shows what one backend's idle threads cost the next (``OPENBLAS_THREAD_TIMEOUT=28`` in the
environment brings back OpenBLAS's own idle wait, which ``import parity`` shortens).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from parity._blas_threads import IDLE_WAIT_VARIABLE
from parity.batch import random_batch
from parity.config import ModelConfig
from parity.registry import load_backend
from parity.weights import generate_weights


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--backends", default="reference,torch,tensorflow")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--after", default=None, metavar="NAME", help="run this backend's forward before each timed one")
    args = ap.parse_args()
    from parity.cli import load_config

    config = load_config(None, args.set) if args.set else ModelConfig()
    weights = generate_weights(config)
    batch = random_batch(config, args.batch, seed=1)
    blas_wait = f"{IDLE_WAIT_VARIABLE}={os.environ.get(IDLE_WAIT_VARIABLE)}"
    print(f"config {config.short_id()}, batch {args.batch}, {os.cpu_count()} CPUs, {blas_wait}")
    before = load_backend(args.after)(config, weights, "cpu") if args.after else None
    if before is not None:
        before.forward(batch)
        print(f"each timed forward runs right after a forward of {args.after}")
    for name in args.backends.split(","):
        t0 = time.perf_counter()
        be = load_backend(name)(config, weights, "cpu")
        build = time.perf_counter() - t0
        t0 = time.perf_counter()
        be.forward(batch)
        warm = time.perf_counter() - t0
        times = []
        for _ in range(args.repeats):
            if before is not None:
                before.forward(batch)
            t0 = time.perf_counter()
            be.forward(batch)
            times.append(time.perf_counter() - t0)
        print(
            f"{name:12s} build {build:6.2f} s  first {warm:6.2f} s  "
            f"median {statistics.median(times):6.3f} s  best {min(times):6.3f} s"
        )


if __name__ == "__main__":
    main()

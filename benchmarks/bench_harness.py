"""Harness overhead over the bare forward passes, and memory against the number of batches.

    python benchmarks/bench_harness.py [--batches 2,4,8] [--batch 4] [--repeats 3]

For each batch count it times (a) the bare forward passes of every backend on the same canonical
batches and (b) the full harness run (forward passes + comparisons + statistics), and reports the
overhead (b - a) / a. Memory: the peak of Python-level allocations (tracemalloc) during the harness
run, which must stay flat as batches grow (only statistics are kept, never tensors).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import tracemalloc

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from parity.batch import random_batch
from parity.config import ModelConfig
from parity.registry import load_backend
from parity.runner import run_parity
from parity.taps import tap_specs
from parity.tolerances import load_tolerances
from parity.weights import generate_weights


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="2,4,8")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backends", default="reference,torch,tensorflow")
    args = ap.parse_args()
    config = ModelConfig()
    weights = generate_weights(config)
    backends = {n: load_backend(n)(config, weights, "cpu") for n in args.backends.split(",")}
    tol = load_tolerances()
    for be in backends.values():  # warm-up (TF tracing)
        be.forward(random_batch(config, args.batch, seed=0))
    print(f"config {config.short_id()}, batch {args.batch}, backends {', '.join(backends)}")
    for n in (int(x) for x in args.batches.split(",")):
        batches = [random_batch(config, args.batch, seed=i) for i in range(n)]
        bare, full = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            for b in batches:
                for be in backends.values():
                    be.forward(b)
            bare.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            run_parity(
                backends, batches, tol, config=config, expected=lambda k: tap_specs(config, k), reference="reference"
            )
            full.append(time.perf_counter() - t0)
        tracemalloc.start()
        run_parity(
            backends, iter(batches), tol, config=config, expected=lambda k: tap_specs(config, k), reference="reference"
        )
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        a, b = statistics.median(bare), statistics.median(full)
        print(
            f"{n:3d} batches: bare forwards {a:6.2f} s, harness {b:6.2f} s, overhead {100 * (b - a) / a:5.1f} %, "
            f"peak Python allocations during the run {peak / 2**20:7.1f} MiB"
        )


if __name__ == "__main__":
    main()

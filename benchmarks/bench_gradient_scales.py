"""What the gradient error model costs: the reference's error scales of every gradient tap of a batch.

    python benchmarks/bench_gradient_scales.py [--batch 4] [--repeats 4] [--configs default N=128 n_filters_scale=4]

The gradient error scales (``backends/reference/gradient_error_model.py``) are most of a gradient
run's harness time. For each config, seeded weights and a seeded random batch, this prints the
fastest of ``--repeats`` calls of ``ReferenceBackend.error_scales`` given the batch's forward and
gradient taps (the fastest, because a shared machine only ever adds time). Timings vary with the
machine and its load; they are recorded where a change is decided on, never asserted by the tests.
"""

from __future__ import annotations

import argparse
import time
from typing import Any


def config_from(text: str) -> Any:
    """``default`` or ``key=value`` pairs joined by commas, e.g. ``N=128,gridsize=1``."""
    from parity.config import ModelConfig

    if text == "default":
        return ModelConfig()
    values: dict[str, Any] = {}
    for pair in text.split(","):
        key, _, value = pair.partition("=")
        values[key] = int(value) if value.isdigit() else value
    return ModelConfig(**values)


def main(argv: list[str] | None = None) -> None:
    from backends.reference import ReferenceBackend
    from parity.batch import random_batch
    from parity.weights import generate_weights

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--configs", nargs="+", default=["default", "N=128", "n_filters_scale=4"])
    args = ap.parse_args(argv)
    print(f"| config | gradient error scales, batch {args.batch} (fastest of {args.repeats}) |")
    print("|---|---|")
    for text in args.configs:
        config = config_from(text)
        reference = ReferenceBackend(config, generate_weights(config, 0))
        batch = random_batch(config, args.batch, 0)
        taps = {**reference.forward(batch), **reference.gradients(batch)}
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            reference.error_scales(batch, taps)
            times.append(time.perf_counter() - t0)
        print(f"| {text} | {min(times):.2f} s |", flush=True)


if __name__ == "__main__":
    main()

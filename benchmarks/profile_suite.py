"""Where the parity suite's time goes, from a py-spy profile of it in one process.

    py-spy record -o suite.txt --format raw -r 40 -- python -m pytest -n 0 -q -p no:cacheprovider -m parity
    python benchmarks/profile_suite.py suite.txt [--rate 40]

Each sample is put in the first part of the table whose frames its stack holds (tracing before
running, the gradient error model before the reference's other work), so the rows add up to the
profiled time. Samples of an idle worker thread (a thread pool waiting for work, which py-spy still
samples) are counted apart: they are not time the suite spent. One process, not the README's
``-n auto``: under pytest-xdist each worker's profile would hold only its share of the tests.
"""

from __future__ import annotations

import argparse
from collections import Counter

# (row, frames that put a sample in it), in order of precedence.
PARTS = [
    ("TensorFlow: tracing the forward and gradient graphs", ("TensorFlowBackend._traced", "get_concrete_function")),
    ("TensorFlow: stages, run eagerly (layer-local parity)", ("TensorFlowBackend.run_stage",)),
    ("TensorFlow: forward and gradient runs", ("TensorFlowBackend.forward", "TensorFlowBackend.gradients")),
    ("torch: stages (layer-local parity)", ("TorchBackend.run_stage",)),
    ("torch: forward and gradients", ("TorchBackend.forward", "TorchBackend.gradients")),
    ("reference: gradient error scales", ("gradient_error_scales ",)),
    ("reference: forward and local error scales", ("ReferenceBackend.error_scales", "ReferenceBackend.local_error")),
    ("reference: forward, gradients, stages", ("ReferenceBackend.",)),
    ("baselines: read and compared", ("check_baselines",)),
    ("reports: JSON, HTML, Markdown, statistics", ("write_reports",)),
    ("elementwise comparisons", ("ElementwiseComparison", "compare.py")),
    ("statistics and their tolerances", ("stats.py", "statistics_with_tolerances")),
    ("building the backends", ("instantiate ",)),
    ("importing the frameworks", ("import_framework",)),
    ("the rest of the parity runs", ("run_parity ",)),
]
IDLE = "idle worker threads (not counted)"
REST = "the rest: pytest, collection, imports"


def tally(lines: list[str]) -> Counter[str]:
    """Samples per row of a py-spy ``--format raw`` profile (one ``stack count`` per line)."""
    out: Counter[str] = Counter()
    for line in lines:
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack:
            continue
        frames = stack.split(";")
        if frames[-1].startswith("_worker ") and "Thread._bootstrap" in stack:
            out[IDLE] += int(count)
            continue
        row = next((name for name, keys in PARTS if any(k in stack for k in keys)), REST)
        out[row] += int(count)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("profile", help="py-spy record --format raw output")
    ap.add_argument("--rate", type=float, default=40.0, help="the -r py-spy sampled at (samples per second)")
    args = ap.parse_args(argv)
    with open(args.profile, encoding="utf-8") as fh:
        counts = tally(fh.readlines())
    idle = counts.pop(IDLE, 0)
    total = sum(counts.values())
    print("| part of `pytest -n 0 -m parity` | seconds | share |\n|---|---|---|")
    for name, n in counts.most_common():
        print(f"| {name} | {n / args.rate:.1f} | {100 * n / total:.0f} % |")
    print(f"| total (without {idle / args.rate:.1f} s of idle worker threads) | {total / args.rate:.1f} | 100 % |")


if __name__ == "__main__":
    main()

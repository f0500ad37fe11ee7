"""The whole benchmark table in one command: what the parity harness costs, side by side.

    python benchmarks/run.py [--batch 16] [--repeats 5] [--no-suite] [--suite-runs 1] [--device cpu]
                             [--backends reference,torch,tensorflow]

Rows (all measured in this one run, on this machine):

- forward time of each backend at batch ``--batch``, default config (median after one warm-up);
- reference / TensorFlow forward time (reference / torch when TensorFlow is not among ``--backends``:
  a GPU machine without TensorFlow still gets a table): the ratio of the two medians above, and
  timed back to back, each repeat (at least nine) a TensorFlow forward then a reference forward,
  the median of those ratios with the lowest and the highest (a parity run alternates backends so;
  the two rows differ on a machine whose speed moves within a minute, so the table shows both);
- each backend's gradients of both losses (``Backend.gradients``) at the same batch, and their cost
  in forward passes;
- harness / bare forwards: a full end-to-end parity run (comparisons, statistics, error scales) of the
  same backends on the same batches over their bare forward passes timed just before it, the median
  of these ratios over the repeats (and the parts of it spent in the reference's error scales, which
  are the tolerances: a pass of the error model through the network, in the elementwise comparisons
  and in the statistics with their tolerances, each timed inside those runs), and the same with layer-local
  parity on (each stage run again on the reference's inputs), and the end-to-end run with gradient
  parity on (``--gradients``) over the one without;
- peak RSS of a fresh process running the harness on 10x the batches over 1x (each in its own
  subprocess, so nothing from the other run is counted);
- wall time of ``pytest -m parity`` as the README runs it (pyproject's ``-n auto``: pytest-xdist
  workers, each on its share of the cores) and in one process (``-n 0``) (unless ``--no-suite``);
  ``--suite-runs N`` runs the configured suite N times and gives the fastest, the median and the
  slowest, since the 60 s target is judged against a spread of a few seconds, not one run.

Timings vary with the machine and its load; they are recorded here and in benchmarks/README.md,
never asserted by the test suite.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ("reference", "torch", "tensorflow")

# Run in a child process: the harness on ``n`` batches, then this process's peak RSS.
_RSS_CHILD = """
import json, resource, sys
from parity.batch import random_batch
from parity.config import ModelConfig
from parity.registry import load_backend
from parity.runner import run_parity
from parity.stages import stages
from parity.taps import tap_specs
from parity.tolerances import load_tolerances
from parity.weights import generate_weights
n, size, device = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
BACKENDS = sys.argv[4].split(",")
config = ModelConfig()
weights = generate_weights(config)
backends = {b: load_backend(b)(config, weights, device if b != "reference" else "cpu") for b in BACKENDS}
batches = (random_batch(config, size, seed=i) for i in range(n))
run_parity(backends, batches, load_tolerances(profile=device), config=config,
           expected=lambda k: tap_specs(config, k), reference="reference", stages=stages(config))
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
"""


class _Rows:
    def append(self, row: tuple[str, str]) -> None:
        print(f"| {row[0]} | {row[1]} |", flush=True)


class Stopwatch:
    """Seconds spent in one method of ``owner`` (an object or a class) during each run, the method
    wrapped in place until ``stop``: the part of a parity run it takes, measured inside that run."""

    def __init__(self, owner: Any, name: str) -> None:
        self.owner, self.name, self.per_run = owner, name, [0.0]
        self.saved = vars(owner).get(name)  # a class's own function; None: an instance's method
        method = getattr(owner, name) if self.saved is None else self.saved
        per_run = self.per_run

        def timed(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return method(*a, **k)
            finally:
                per_run[-1] += time.perf_counter() - t0

        setattr(owner, name, timed)

    def start_run(self) -> None:
        self.per_run.append(0.0)

    def stop(self) -> list[float]:
        """Unwrap; the seconds of each run started (the first entry: before any)."""
        if self.saved is None:
            delattr(self.owner, self.name)
        else:
            setattr(self.owner, self.name, self.saved)
        return self.per_run[1:]


def timed(fn: Any, repeats: int) -> float:
    fn()  # warm-up: tracing, caches
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_rss_mib(n: int, size: int, device: str, names: tuple[str, ...]) -> float:
    out = subprocess.run(
        [sys.executable, "-c", _RSS_CHILD, str(n), str(size), device, ",".join(names)],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
    ).stdout
    return float(json.loads(out.strip().splitlines()[-1])) / 1024.0  # ru_maxrss is in KiB on Linux


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16, help="groups per batch for the forward times")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--harness-batches", type=int, default=4, help="batches of 4 groups for the overhead rows")
    ap.add_argument("--device", default="cpu", help="device of the float32 backends (the reference is CPU only)")
    ap.add_argument(
        "--backends",
        default=",".join(BACKENDS),
        help="comma-separated backends, the reference among them (default: %(default)s)",
    )
    ap.add_argument(
        "--no-suite", action="store_true", help="skip timing pytest -m parity (as configured, and with -n 0)"
    )
    ap.add_argument(
        "--suite-runs", type=int, default=1, help="how many times to run pytest -m parity as configured (default 1)"
    )
    args = ap.parse_args()
    if args.suite_runs < 1:
        ap.error(f"--suite-runs must be at least 1, got {args.suite_runs}")
    names = tuple(b.strip() for b in args.backends.split(",") if b.strip())
    if "reference" not in names or len(set(names)) < 2 or len(set(names)) != len(names):
        ap.error(f"--backends must name the reference and at least one other backend, each once, got {args.backends!r}")

    import numba
    import numpy

    from parity._blas_threads import IDLE_WAIT_VARIABLE
    from parity.batch import random_batch
    from parity.compare import ElementwiseComparison
    from parity.config import ModelConfig
    from parity.emulation import cpu_model
    from parity.registry import load_backend
    from parity.runner import run_parity
    from parity.stages import stages
    from parity.taps import gradient_tap_specs, tap_specs
    from parity.tolerances import Tolerances, load_tolerances
    from parity.weights import generate_weights

    config = ModelConfig()
    weights = generate_weights(config)
    backends = {b: load_backend(b)(config, weights, args.device if b != "reference" else "cpu") for b in names}

    envs = {name: be.environment() for name, be in backends.items() if name != "reference"}
    versions = [f"numpy {numpy.__version__}", f"numba {numba.__version__}"]
    versions += [f"{name} {env.get('framework_version', '?')}" for name, env in envs.items()]
    gpu = {str(env.get("device_name")) for env in envs.values()} - {"cpu", "None"}
    device = args.device + (f" ({', '.join(sorted(gpu))})" if gpu else "")
    print(
        f"{datetime.date.today().isoformat()}, {cpu_model()}, {os.cpu_count()} CPUs, device {device}; "
        f"{', '.join(versions)}; {IDLE_WAIT_VARIABLE}={os.environ.get(IDLE_WAIT_VARIABLE)}\n",
        flush=True,
    )
    print("| measure | value |\n|---|---|", flush=True)
    # Each row is printed as soon as it is measured: a run cut short (a time limit on a lent
    # machine) still leaves every row it finished.
    rows = _Rows()

    def paired(
        first: Any, second: Any, first_times: list[float] | None = None, repeats: int | None = None
    ) -> list[float]:
        """second's time over first's, timed back to back, one ratio a repeat: on a shared machine
        the speed drifts by more than the harness costs between two separate medians."""
        first()
        second()  # warm-up: tracing, caches
        ratios = []
        for _ in range(args.repeats if repeats is None else repeats):
            t0 = time.perf_counter()
            first()
            t1 = time.perf_counter()
            second()
            ratios.append((time.perf_counter() - t1) / (t1 - t0))
            if first_times is not None:
                first_times.append(t1 - t0)
        return ratios

    batch = random_batch(config, args.batch, seed=1)
    forward = {b: timed(lambda be=be: be.forward(batch), args.repeats) for b, be in backends.items()}
    for b, t in forward.items():
        rows.append((f"forward, {b}, batch {args.batch}", f"{t:.3f} s"))
    against = "tensorflow" if "tensorflow" in forward else next(b for b in forward if b != "reference")
    of_medians = forward["reference"] / forward[against]
    rows.append((f"reference / {against} forward, from the medians above", f"{of_medians:.2f}"))
    # Back to back, as the target asks ("side by side"): the two medians above may fall in different
    # minutes of a machine whose float64 speed moves by half from one minute to the next; at least
    # nine pairs, and their range, since one pair's ratio may move by a third here.
    side_by_side = paired(
        lambda: backends[against].forward(batch),
        lambda: backends["reference"].forward(batch),
        repeats=max(args.repeats, 9),
    )
    rows.append(
        (
            f"reference / {against} forward, back to back: median (lowest to highest) of {len(side_by_side)}",
            f"{statistics.median(side_by_side):.2f} ({min(side_by_side):.2f} to {max(side_by_side):.2f})",
        )
    )
    for b, be in backends.items():
        t = timed(lambda be=be: be.gradients(batch), args.repeats)
        rows.append((f"gradients (both losses), {b}, batch {args.batch}", f"{t:.3f} s = {t / forward[b]:.1f}x forward"))

    batches = [random_batch(config, 4, seed=i) for i in range(args.harness_batches)]
    tol = load_tolerances(profile=args.device)

    def bare() -> None:
        for b in batches:
            for be in backends.values():
                be.forward(b)

    def harness(local: bool, gradients: bool = False) -> None:
        run_parity(
            backends,
            batches,
            tol,
            config=config,
            expected=lambda k: tap_specs(config, k) + (gradient_tap_specs(config, k) if gradients else []),
            reference="reference",
            stages=stages(config) if local else (),
            gradients=gradients,
        )

    # The reference's error scales are the tolerances themselves (a float32 pass of the error model
    # through the network): timed apart, so the rest of the harness's cost is visible on its own; and
    # so are its two other parts that read every element, the comparisons and the statistics.
    parts = {
        "the error scales (the tolerances)": Stopwatch(backends["reference"], "error_scales"),
        "the elementwise comparisons": Stopwatch(ElementwiseComparison, "add"),
        "the statistics and their tolerances": Stopwatch(Tolerances, "statistics_with_tolerances"),
    }

    def harness_e2e() -> None:
        for watch in parts.values():
            watch.start_run()
        harness(False)

    bare_times: list[float] = []  # every bare run of over_bare, for the row of their own

    def over_bare(fn: Any) -> list[float]:
        return paired(bare, fn, bare_times)

    e2e = over_bare(harness_e2e)
    shares = {}
    for what, watch in parts.items():  # the owners' own methods again for the later rows
        runs = watch.stop()[1:]  # the first run: over_bare's warm-up
        shares[what] = [t / b for t, b in zip(runs, bare_times, strict=True)]
    scales = shares["the error scales (the tolerances)"]
    local = over_bare(lambda: harness(True))
    t_bare = statistics.median(bare_times)
    shape = f"{args.harness_batches} batches of 4"
    median = statistics.median
    rows.append((f"bare forwards, {', '.join(names)}, {shape}", f"{t_bare:.2f} s"))
    rows.append(("harness / bare forwards, end to end", f"{median(e2e):.2f}"))
    for what, share in shares.items():
        rows.append((f"of which {what} / bare forwards", f"{median(share):.2f}"))
    left_out = [r - s for r, s in zip(e2e, scales, strict=True)]
    rows.append(("harness / bare forwards, end to end, error scales left out", f"{median(left_out):.2f}"))
    rows.append(("harness / bare forwards, with layer-local parity", f"{median(local):.2f}"))
    with_gradients = paired(lambda: harness(False), lambda: harness(False, gradients=True))
    rows.append(("harness with gradients / harness, end to end", f"{median(with_gradients):.2f}"))

    one, ten = peak_rss_mib(1, 4, args.device, names), peak_rss_mib(10, 4, args.device, names)
    rows.append(("peak RSS, 1 batch of 4 / 10 batches of 4", f"{one:.0f} MiB / {ten:.0f} MiB"))
    rows.append(("peak RSS ratio, 10x / 1x batches", f"{ten / one:.3f}"))

    if not args.no_suite:
        suite = [
            sys.executable,
            "-m",
            "pytest",
            "-m",
            "parity",
            "-q",
            "-p",
            "no:cacheprovider",
            f"--parity-device={args.device}",
            f"--parity-backends={','.join(names)}",
        ]
        runs = (
            ([], "pytest -m parity (pyproject's -n auto: pytest-xdist workers)", args.suite_runs),
            (["-n", "0"], "pytest -n 0 -m parity (one process)", 1),
        )
        for extra, what, count in runs:
            walls, codes = [], set()
            for _ in range(count):
                t0 = time.perf_counter()
                codes.add(subprocess.call([*suite, *extra], cwd=ROOT, stdout=subprocess.DEVNULL))
                walls.append(time.perf_counter() - t0)
            exits = ", ".join(str(c) for c in sorted(codes))
            if count == 1:
                rows.append((f"{what} (exit {exits})", f"{walls[0]:.1f} s"))
            else:
                # tenths: the target is 60 s, and a whole second cannot say which side of it a run fell
                spread = f"{min(walls):.1f} / {median(walls):.1f} / {max(walls):.1f} s"
                rows.append((f"{what}, fastest / median / slowest of {count} runs (exit {exits})", spread))

    return 0


if __name__ == "__main__":
    sys.exit(main())

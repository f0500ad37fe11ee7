"""Measure float32-vs-float64 gaps per tap over the config matrix, to set parity/tolerances.toml.

For every config of the parity suite it runs the bundled fixture through every backend with a
tolerance so loose that everything passes, and records, per tap and comparison, the smallest atol
that passes at the chosen rtol. The JSON it writes is the measurement docs/tolerances.md cites.

    python scripts/measure_tolerances.py --groups 8 --out docs/tolerance-measurements.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from parity.compare import compare_arrays
from parity.config import ModelConfig
from parity.session import RunSpec, run
from parity.tolerances import Section, Tolerances

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_parity_matrix import MATRIX, OTHER_OPTIONS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--rtol", type=float, default=1e-5)
    ap.add_argument("--out", default="docs/tolerance-measurements.json")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = ap.parse_args()
    loose = Tolerances(Section(1e30, args.rtol, (), 1.0), Section(1e30, 0.0), "measurement (atol=1e30)", args.device)
    configs = list(MATRIX) + [ModelConfig(**c) for c in OTHER_OPTIONS]
    out: dict[str, dict[str, dict[str, float]]] = {}
    stats_out: dict[str, dict[str, dict[str, float]]] = {}
    for cfg in configs:
        t = time.perf_counter()
        res = run(RunSpec(config=cfg, batch_size=4, max_groups=args.groups, device=args.device), tolerances=loose)
        out[cfg.short_id()] = {
            t.name: {f"{c.kind}:{c.a}:{c.b}": c.min_atol_to_pass for c in t.comparisons} for t in res.taps
        }
        # Float32 noise on statistics, for the baseline tolerances: torch vs tensorflow per statistic.
        a, b = res.statistics["torch"], res.statistics["tensorflow"]
        stats_out[cfg.short_id()] = {
            tap: {s: compare_arrays(a[tap][s], b[tap][s], 0.0, args.rtol).min_atol_to_pass for s in a[tap]} for tap in a
        }
        print(f"{cfg.short_id()}: {time.perf_counter() - t:.1f} s", file=sys.stderr)
    meta = {
        "rtol": args.rtol,
        "groups": args.groups,
        "device": args.device,
        "configs": {c.short_id(): c.to_dict() for c in configs},
    }
    Path(args.out).write_text(
        json.dumps({"meta": meta, "min_atol_to_pass": out, "statistics_torch_vs_tensorflow": stats_out}, indent=1)
        + "\n"
    )


if __name__ == "__main__":
    main()

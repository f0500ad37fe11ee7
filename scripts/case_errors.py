"""Where one measured case's float32 errors are: torch on a device, on it with cuDNN off, and on the CPU.

    python scripts/case_errors.py --seed 1026 --device cuda --out case1026.npz
    python scripts/case_errors.py --seed 1026 --taps 'grad.*.phase.decoder.*.kernel'

``--seed S`` is the case `ptycho-parity measure-tolerances --cases 1 --seed S` ran (the first draw of
``parity.sweep.random_case`` from that seed). Per batch and tap, it prints each variant's largest
error in units of u·S_i (what the tolerances compare: S_i the reference's error scale of the
element) and in units of u·max S (the tap's largest scale): an error that is large in the first
unit and ordinary in the second is normwise, spread over the tap by the algorithm (a transform-based
convolution), not a divergence of the implementation. ``--out`` keeps the selected taps' values
(reference, scales, every variant) for a closer look. Written for the GPU tail of `grad.*.kernel`
(docs/tolerances.md, "GPUs"); it runs on any machine, with the variants that machine has.
"""

from __future__ import annotations

import argparse
import fnmatch
import io
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent
U = 2.0**-24


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, required=True, help="the seed measure-tolerances ran the case with")
    ap.add_argument("--device", default="cpu", help="device of the torch variants besides the CPU (default: cpu)")
    ap.add_argument("--taps", default="grad.*.kernel", help="fnmatch pattern of the taps to print and keep")
    ap.add_argument("--out", help="write the selected taps' values here (.npz)")
    args = ap.parse_args(argv)

    import numpy as np

    from parity.atomic import write_bytes
    from parity.fixture import iter_batches
    from parity.registry import load_backend
    from parity.simulate import simulate
    from parity.sweep import random_case

    case = random_case(np.random.default_rng(args.seed))
    print(case.describe(), flush=True)
    weights = case.weights()
    reference = load_backend("reference")(case.config, weights, "cpu")
    torch_cls = load_backend("torch")
    problem = torch_cls.device_problem(args.device)
    if problem is not None:
        ap.error(f"--device: {problem}")
    variants: dict[str, Any] = {"cpu": torch_cls(case.config, weights, "cpu")}
    if args.device != "cpu":
        variants[args.device] = torch_cls(case.config, weights, args.device)
    kept: dict[str, np.ndarray] = {}
    batches = iter_batches(simulate(case.data), case.config, case.batch_size, case.groups)
    for b, batch in enumerate(batches):
        taps = {**reference.forward(batch), **reference.gradients(batch)}
        scales = reference.error_scales(batch, taps)
        results = {name: {**be.forward(batch), **be.gradients(batch)} for name, be in variants.items()}
        if args.device.startswith("cuda"):
            import torch

            torch.backends.cudnn.enabled = False
            try:
                be = variants[args.device]
                results[f"{args.device} without cuDNN"] = {**be.forward(batch), **be.gradients(batch)}
            finally:
                torch.backends.cudnn.enabled = True
        for tap in sorted(t for t in taps if fnmatch.fnmatchcase(t, args.taps)):
            ref, s = np.asarray(taps[tap], np.float64), np.asarray(scales[tap], np.float64)
            cells = []
            for name, out in results.items():
                err = np.abs(np.asarray(out[tap], np.float64) - ref)
                # an element the model gives no error (S = 0) counts only if it is off (then inf)
                per = np.divide(err, U * s, out=np.where(err > 0, np.inf, 0.0), where=s > 0)
                whole = np.max(err) / (U * np.max(s)) if np.max(s) > 0 else float(np.max(err) > 0) * np.inf
                cells.append(f"{name}: {np.max(per):.3g} u·S, {whole:.3g} u·max S")
                kept[f"{b}|{name}|{tap}"] = np.asarray(out[tap])
            kept[f"{b}|reference|{tap}"], kept[f"{b}|scale|{tap}"] = ref, s
            print(f"batch {b} {tap}: " + "; ".join(cells), flush=True)
    if args.out:
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **kept)
        write_bytes(args.out, buffer.getvalue())
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())

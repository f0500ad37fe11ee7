"""Measuring the tolerance model's factors: how far real float32 implementations stray from it.

For every run, every comparison records the smallest factor that would have passed it
(``ComparisonResult.min_factor_to_pass``: its largest error over u·S, S the arbiter's error scale).
The measured value of a family is the largest of those over all its taps and runs; the factor
written is that times a safety margin, rounded up. The runs should span what users run: seeds, data,
configs, and other machines (``parity.emulation``); ``ptycho-parity measure-tolerances`` does that for
PtychoPINN backends, and :func:`measured_factors` works on any results, a third-party pair's too.

A measurement is refused when a family needs more than ``SANITY_LIMIT`` times the factor it is
measured with: that is a divergence, not rounding, and writing it down would hide it for good.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from parity.errors import ParityInputError
from parity.tolerances import Tolerances

SANITY_LIMIT = 20.0
DEFAULT_SAFETY = 2.5


@dataclass
class Measurement:
    """The largest factor each family needed, and where."""

    needed: dict[str, float] = field(default_factory=dict)
    where: dict[str, str] = field(default_factory=dict)
    runs: int = 0

    def add(self, family: str, value: float, where: str) -> None:
        if value > self.needed.get(family, -1.0):
            self.needed[family] = value
            self.where[family] = where

    def merge(self, other: Measurement) -> None:
        for fam, value in other.needed.items():
            self.add(fam, value, other.where.get(fam, ""))
        self.runs += other.runs

    def to_dict(self) -> dict[str, Any]:
        return {"needed": self.needed, "where": self.where, "runs": self.runs}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Measurement:
        return cls(dict(data["needed"]), dict(data["where"]), int(data["runs"]))


def measured_factors(results: Iterable[Any], tolerances: Tolerances, label: str = "") -> Measurement:
    """The factor each family of ``tolerances`` needed over ``results`` (ParityResults)."""
    m = Measurement()
    for result in results:
        m.runs += 1
        for tap in result.taps:
            family = tolerances.family(tap.name).pattern
            m.needed.setdefault(family, 0.0)
            for c in tap.comparisons:
                if c.kind not in ("vs_reference", "backend_vs_backend") or c.min_factor_to_pass is None:
                    continue
                # min_factor_to_pass is in units of the comparison's own u·S (pair included); the
                # device factor multiplies every family's factor, so it is divided out.
                m.add(family, c.min_factor_to_pass / tolerances.device_factor, f"{label} {tap.name} {c.a} vs {c.b}")
    return m


def check_sane(measurement: Measurement, tolerances: Tolerances) -> None:
    """Refuse a measurement in which some family needs far more than its current factor."""
    for fam in tolerances.families:
        need = measurement.needed.get(fam.pattern, 0.0)
        if need > SANITY_LIMIT * fam.factor:
            raise ParityInputError(
                f"measure-tolerances: family {fam.pattern!r} needed a factor of {need:.3g} "
                f"({need / fam.factor:.3g} times its current {fam.factor:g}) at {measurement.where[fam.pattern]}: "
                "that is a divergence between the backends, not float32 rounding; find it with `ptycho-parity run` "
                "before measuring"
            )


def round_up(x: float) -> float:
    """Up to two significant digits (so the safety margin is never eroded by rounding)."""
    if x <= 0:
        return 0.0
    e = math.floor(math.log10(x)) - 1
    return float(math.ceil(x / 10**e - 1e-9) * 10**e)


def render(
    template: Tolerances,
    measurement: Measurement,
    safety: float,
    minimum: float,
    header: Sequence[str],
    cuda_factor: float = 1.0,
) -> str:
    """The tolerance file: the template's model, families (each with its measured factor) and the
    cuda profile's device factor."""
    lines = [f"# {h}" if h else "#" for h in header]
    lines += ["schema_version = 2", "", "[model]"]
    lines += [
        f"floor = {_num(template.floor)}",
        f"pair_factor = {_num(template.pair_factor)}",
        f"baseline_factor = {_num(template.baseline_factor)}",
        f"blame_ratio = {_num(template.blame_ratio)}",
    ]
    for fam in template.families:
        need = measurement.needed.get(fam.pattern)
        factor = max(round_up(safety * need), minimum) if need is not None else fam.factor
        lines += ["", "[[family]]", f'pattern = "{fam.pattern}"', f"factor = {_num(factor)}"]
        if need:  # a family that needed nothing (identical bytes) records no measurement, not a zero
            lines.append(f"measured = {_num(round_up(need))}")
    lines += ["", "[profiles.cuda]", f"device_factor = {_num(cuda_factor)}"]
    return "\n".join(lines) + "\n"


def _num(x: float) -> str:
    text = f"{x:.6g}"
    return text if any(c in text for c in ".e") else text + ".0"


def header_lines(command: str, measurement: Measurement, safety: float, settings: Sequence[str]) -> list[str]:
    today = datetime.date.today().isoformat()
    return [
        "Tolerances of ptycho-parity: the model of parity/tolerances.py, explained in docs/tolerances.md.",
        "  |a - b| <= atol_i + rtol*|b_i|,  atol_i = factor * u * S_i,  rtol = floor * u",
        "u: unit roundoff (float32 2^-24); S_i: the float64 reference's error scale of element i",
        "(backends/reference/error_model.py). A family's factor covers how far real float32",
        "implementations stray from the error model; `measured` is the largest factor any comparison",
        f"needed, `factor` is {safety:g} x that, rounded up. Written by:",
        f"  {command}",
        f"on {today}, {platform.machine()} {platform.processor() or ''}".rstrip()
        + f", {measurement.runs} runs, emulated machines: {', '.join(settings) or 'native only'}.",
        "Edit by re-measuring, not by hand.",
    ]


def measure_cases(
    template: Tolerances, cases: int, seed: int, matrix: bool, backends: Sequence[str] | None, label: str
) -> Measurement:
    """Run the parity matrix (bundled fixtures) and ``cases`` random cases; measure every comparison."""
    import numpy as np

    from parity.session import RunSpec, run
    from parity.sweep import PARITY_MATRIX, random_case, run_case

    m = Measurement()
    if matrix:
        for config in PARITY_MATRIX:
            spec = RunSpec(config=config, batch_size=2, max_groups=2, require=True)
            if backends:
                spec = RunSpec(config=config, backends=tuple(backends), batch_size=2, max_groups=2, require=True)
            m.merge(measured_factors([run(spec, tolerances=template)], template, f"{label} matrix {config.short_id()}"))
            print(f"measured matrix {config.short_id()}", file=sys.stderr, flush=True)
    rng = np.random.default_rng(seed)
    for i in range(cases):
        case = random_case(rng)
        result = run_case(case, backends, tolerances=template)
        m.merge(measured_factors([result], template, f"{label} case {i} ({case.describe()})"))
        print(f"measured case {i + 1}/{cases}", file=sys.stderr, flush=True)
    return m


def measure_emulated(
    settings: Sequence[str], argv: Sequence[str], workdir: str | os.PathLike[str] | None = None
) -> Measurement:
    """Run ``measure-tolerances`` with ``argv`` in a child process per emulation setting; merge."""
    from parity.emulation import environment, runnable

    total = Measurement()
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for name in runnable(settings):
            out = Path(tmp) / f"{name.replace('=', '-')}.json"
            cmd = [sys.executable, "-m", "parity.cli", "measure-tolerances", *argv, "--json", str(out), "--label", name]
            print(f"== measuring under {name}", file=sys.stderr, flush=True)
            code = subprocess.call(cmd, env=environment(name))
            if code != 0:
                raise ParityInputError(f"measure-tolerances under emulation {name!r} failed (exit {code})")
            total.merge(Measurement.from_dict(json.loads(out.read_text(encoding="utf-8"))))
    return total

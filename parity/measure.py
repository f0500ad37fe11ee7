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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from parity.errors import ParityInputError
from parity.tolerances import Tolerances

SANITY_LIMIT = 20.0
DEFAULT_SAFETY = 2.5
_EDIT = "Edit by re-measuring, not by hand."  # a tolerance file's header ends with it


@dataclass
class Measurement:
    """The largest factor each family needed, and where."""

    needed: dict[str, float] = field(default_factory=dict)
    where: dict[str, str] = field(default_factory=dict)
    runs: int = 0
    # Every machine (emulation label) a run was measured under, not only those of the worst cases:
    # a merged file's header must say what the factors were measured over.
    machines: set[str] = field(default_factory=set)
    # The CPUs the runs ran on (parity.emulation.cpu_model: model name and vector instruction set):
    # emulated settings approximate other machines on one CPU, and a file merged from several CPUs
    # should say which they were.
    cpus: set[str] = field(default_factory=set)
    # What the float32 backends ran on: "cpu", or "cuda (<GPU name>)". A GPU's measurement sets the
    # cuda profile's device factor and nothing else (device_factor_needed), so one measurement must
    # not mix devices: merge refuses it.
    devices: set[str] = field(default_factory=set)

    @property
    def device(self) -> str:
        """'cuda' when the runs were on a GPU, else 'cpu'."""
        return "cuda" if any(d.startswith("cuda") for d in self.devices) else "cpu"

    def add(self, family: str, value: float, where: str) -> None:
        if value > self.needed.get(family, -1.0):
            self.needed[family] = value
            self.where[family] = where

    def merge(self, other: Measurement) -> None:
        if self.runs and other.runs and self.device != other.device:
            raise ParityInputError(
                f"measure-tolerances: cannot merge a measurement on {', '.join(sorted(other.devices))} into one on "
                f"{', '.join(sorted(self.devices))}: a CPU measurement sets the families' factors, a GPU one only "
                "the cuda profile's device_factor; measure them separately"
            )
        for fam, value in other.needed.items():
            self.add(fam, value, other.where.get(fam, ""))
        self.runs += other.runs
        self.machines |= other.machines
        self.cpus |= other.cpus
        if other.runs:  # an empty measurement ran on nothing
            self.devices |= other.devices

    def to_dict(self) -> dict[str, Any]:
        return {
            "needed": self.needed,
            "where": self.where,
            "runs": self.runs,
            "machines": sorted(self.machines),
            "cpus": sorted(self.cpus),
            "devices": sorted(self.devices),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Measurement:
        # Files written before "machines" was recorded name only the machines of their worst cases.
        machines = data.get("machines") or [w.split(" ", 1)[0] for w in data["where"].values() if w]
        # Files written before "cpus" was recorded do not say which CPU they ran on: none is listed.
        cpus = {str(c) for c in data.get("cpus") or []}
        # Files written before "devices" was recorded were all measured on the CPU (no --device then).
        devices = {str(d) for d in (data["devices"] if "devices" in data else ["cpu"])}
        machines_set = {str(m) for m in machines}
        return cls(dict(data["needed"]), dict(data["where"]), int(data["runs"]), machines_set, cpus, devices)


def measured_factors(
    results: Iterable[Any],
    tolerances: Tolerances,
    label: str = "",
    families: Sequence[str] | None = None,
    device: str = "cpu",
) -> Measurement:
    """The factor each family of ``tolerances`` needed over ``results`` (ParityResults); with
    ``families``, only the families of those patterns are measured. ``device``: what the runs asked
    the float32 backends to run on, for a backend whose environment does not say."""
    from parity.emulation import cpu_model

    m = Measurement()
    for result in results:
        m.runs += 1
        m.cpus.add(cpu_model())
        if label:
            m.machines.add(label.split(" ", 1)[0])
        m.devices |= _devices(result, device)
        for tap in result.taps:
            family = tolerances.family(tap.name).pattern
            if families is not None and family not in families:
                continue
            m.needed.setdefault(family, 0.0)
            for c in tap.comparisons:
                if c.kind not in ("vs_reference", "backend_vs_backend") or c.min_factor_to_pass is None:
                    continue
                # min_factor_to_pass is in units of the comparison's own u·S (pair included); the
                # device factor multiplies every family's factor, so it is divided out.
                m.add(family, c.min_factor_to_pass / tolerances.device_factor, f"{label} {tap.name} {c.a} vs {c.b}")
    return m


def _devices(result: Any, device: str) -> set[str]:
    """What the float32 backends of a result ran on, from their recorded environments; ``device``
    (what the run asked for) where a backend records none."""
    out = set()
    for record in getattr(result, "backends", {}).values():
        env = record.environment or {}
        if record.precision == "float64":
            continue
        ran_on = str(env.get("device", device))
        out.add(f"cuda ({env['device_name']})" if ran_on.startswith("cuda") and env.get("device_name") else ran_on)
    return out or {device}


def device_factor_needed(tolerances: Tolerances, measurement: Measurement, safety: float) -> tuple[float, str]:
    """The cuda profile's device factor a GPU measurement asks for, and the family and run that set it.

    The families' factors stay what the CPU measured (safety x the CPU's need); on the GPU every
    family's factor is multiplied by one device factor, so that factor must give each family the same
    margin over what it needed there: the largest of safety x need / factor over the families, rounded
    up, and never below 1 (a GPU that rounds no worse than the CPU gets no discount either).
    """
    worst, where = 1.0, "no family needed more than its CPU factor"
    for fam in tolerances.families:
        need = measurement.needed.get(fam.pattern)
        if need is None or fam.factor <= 0:
            continue
        ratio = safety * need / fam.factor
        if ratio > worst:
            worst, where = ratio, f"{fam.pattern} ({measurement.where.get(fam.pattern, '')})"
    return max(1.0, round_up(worst)), where


def load_measurement(path: str | os.PathLike[str]) -> Measurement:
    """A raw measurement written by ``measure-tolerances --json``; a bad file is an error naming it."""
    where = f"option --from-json: {path}"
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ParityInputError(f"{where}: cannot read it ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ParityInputError(f"{where}: not JSON ({exc})") from None
    try:
        m = Measurement.from_dict(data)
        bad = [k for k, v in m.needed.items() if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0]
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ParityInputError(
            f"{where}: not a measurement written by --json (it needs keys 'needed', 'where', 'runs'; {exc!r})"
        ) from None
    if bad:
        raise ParityInputError(f"{where}: family {bad[0]!r} needed {m.needed[bad[0]]!r}, not a number >= 0")
    return m


def gradient_families(tolerances: Tolerances) -> list[str]:
    """The patterns of the families that hold gradient taps (``grad.…``)."""
    return [fam.pattern for fam in tolerances.families if fam.pattern.startswith("grad.")]


def check_families(tolerances: Tolerances, families: Sequence[str]) -> None:
    known = {fam.pattern for fam in tolerances.families}
    unknown = [f for f in families if f not in known]
    if unknown:
        raise ParityInputError(
            f"measure-tolerances: {unknown[0]!r} is not a family of {tolerances.source}; "
            f"families: {', '.join(sorted(known))}"
        )


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
    keep_records: bool = False,
    cuda_floors: Sequence[tuple[str, float]] = (),
) -> str:
    """The tolerance file: the template's model, families (each with its measured factor) and the
    cuda profile's device factor and normwise floors (``cuda_floors``, kept as the template has them).
    ``keep_records``: only a family that needed more than its record is
    rewritten, so a measurement on another machine adds to the evidence the file was written from
    instead of replacing it (a quieter machine would otherwise lower a factor a noisier one needs)."""
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
        if keep_records and need is not None and fam.measured is not None and need <= fam.measured:
            need = None  # its record covers this measurement: the family stays as it is
        factor = max(round_up(safety * need), minimum) if need is not None else fam.factor
        lines += ["", "[[family]]", f'pattern = "{fam.pattern}"', f"factor = {_num(factor)}"]
        if need:  # a family that needed nothing (identical bytes) records no measurement, not a zero
            lines.append(f"measured = {_num(round_up(need))}")
        elif need is None and fam.measured is not None:  # not measured this time: keep its record
            lines.append(f"measured = {_num(fam.measured)}")
    lines += ["", "[profiles.cuda]", f"device_factor = {_num(cuda_factor)}"]
    if cuda_floors:
        pairs = ", ".join(f'"{pattern}" = {_num(eta)}' for pattern, eta in cuda_floors)
        lines.append(f"normwise_floor = {{ {pairs} }}")
    return "\n".join(lines) + "\n"


def _num(x: float) -> str:
    text = f"{x:.6g}"
    return text if any(c in text for c in ".e") else text + ".0"


def _template_header(template_text: str) -> list[str]:
    """A tolerance file's header comment, without its closing line (a new record goes before it)."""
    kept = []
    for line in template_text.splitlines():
        if not line.startswith("#"):
            break
        text = line[1:].strip() if line.strip() == "#" else line[2:] if line.startswith("# ") else line[1:]
        if text != _EDIT:
            kept.append(text)
    return kept


_CUDA_RECORD = "[profiles.cuda] device_factor"


def _split_cuda_records(lines: list[str]) -> tuple[list[str], list[str]]:
    """A header's lines apart from the records of GPU measurements (``device_factor_header``), and
    those records: each runs from its ``[profiles.cuda]`` line to the line naming the devices."""
    kept: list[str] = []
    records: list[str] = []
    inside = False
    for line in lines:
        inside = inside or line.startswith(_CUDA_RECORD)
        (records if inside else kept).append(line)
        if inside and "Devices: " in line:
            inside = False
    return kept, records


def remeasured_header(
    template_text: str,
    command: str,
    measurement: Measurement,
    safety: float,
    settings: Sequence[str],
    families: Sequence[str] | None,
    keep_records: bool = False,
) -> list[str]:
    """The template's header, kept, with a record of which families were re-measured and how (a
    measurement of some families leaves the others, and the record of their measurement, alone).
    ``families`` None: every family was measured; ``keep_records``: each was merged with its record
    (``render``), so the header says so."""
    kept = _template_header(template_text)
    which = f"Families {', '.join(families)}" if families is not None else "Every family"
    how = (
        f"re-measured and merged with the records above (measured = the larger; factor = {safety:g} x measured)"
        if keep_records
        else f"re-measured (factor = {safety:g} x measured)"
    )
    return [*kept, f"{which} {how} by:", f"  {command}", _measured_on(measurement, settings), _EDIT]


def device_factor_header(
    template_text: str,
    command: str,
    measurement: Measurement,
    safety: float,
    settings: Sequence[str],
    keep_records: bool = False,
) -> list[str]:
    """The template's header, kept, with a record of the GPU measurement that set the device factor."""
    rule = f"{safety:g} x the largest need on the GPU / the family's factor"
    rule += ", or the record above if larger" if keep_records else ""
    kept, records = _split_cuda_records(_template_header(template_text))
    return [
        *(kept + records if keep_records else kept),  # a replaced factor's record goes with it
        f"{_CUDA_RECORD} = {rule}, by:",
        f"  {command}",
        f"{_measured_on(measurement, settings)} Devices: {', '.join(sorted(measurement.devices))}.",
        _EDIT,
    ]


def _measured_on(measurement: Measurement, settings: Sequence[str]) -> str:
    cpus = f" ({'; '.join(sorted(measurement.cpus))})" if measurement.cpus else ""
    return (
        f"on {datetime.date.today().isoformat()}, {platform.machine()}{cpus}, {measurement.runs} runs, "
        f"emulated machines: {', '.join(settings) or 'native only'}."
    )


def header_lines(
    command: str, measurement: Measurement, safety: float, settings: Sequence[str], template_text: str = ""
) -> list[str]:
    """A new header for a CPU measurement of every family; the template's records of GPU
    measurements stay, since the device factor they set stays too."""
    gpu = _split_cuda_records(_template_header(template_text))[1]
    return [
        "Tolerances of ptycho-parity: the model of parity/tolerances.py, explained in docs/tolerances.md.",
        "  |a - b| <= atol_i + rtol*|b_i|,  atol_i = factor * u * S_i,  rtol = floor * u",
        "u: unit roundoff (float32 2^-24); S_i: the float64 reference's error scale of element i",
        "(backends/reference/error_model.py). A family's factor covers how far real float32",
        "implementations stray from the error model; `measured` is the largest factor any comparison",
        f"needed, `factor` is {safety:g} x that, rounded up. Written by:",
        f"  {command}",
        _measured_on(measurement, settings),
        *gpu,
        _EDIT,
    ]


def measure_cases(
    template: Tolerances,
    cases: int,
    seed: int,
    matrix: bool,
    backends: Sequence[str] | None,
    label: str,
    gradients: bool = False,
    families: Sequence[str] | None = None,
    device: str = "cpu",
) -> Measurement:
    """Run the parity matrix (bundled fixtures) and ``cases`` random cases; measure every comparison.

    ``gradients``: the runs also compare both losses' gradients (``RunSpec.gradients``), so the
    gradient families are measured too. ``families``: only these families are measured; when none
    of them is a forward family, the runs skip layer-local parity, which measures nothing here.
    """
    import numpy as np

    from parity.session import RunSpec, run
    from parity.sweep import PARITY_MATRIX, random_case, run_case

    local = families is None or any(not f.startswith("grad.") for f in families)
    m = Measurement()
    if matrix:
        for config in PARITY_MATRIX:
            spec = RunSpec(
                config=config, batch_size=2, max_groups=2, require=True, gradients=gradients, local=local, device=device
            )
            if backends:
                spec = replace(spec, backends=tuple(backends))
            where = f"{label} matrix {config.short_id()}"
            m.merge(measured_factors([run(spec, tolerances=template)], template, where, families, device))
            print(f"measured matrix {config.short_id()}", file=sys.stderr, flush=True)
    rng = np.random.default_rng(seed)
    for i in range(cases):
        case = random_case(rng)
        result = run_case(case, backends, tolerances=template, gradients=gradients, local=local, device=device)
        where = f"{label} case {i} of seed {seed} ({case.describe()})"
        m.merge(measured_factors([result], template, where, families, device))
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

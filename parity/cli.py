"""The ``ptycho-parity`` command: runs outside pytest, baselines, fixtures, weights, environment.

Exit codes, one meaning each: 0 everything compared passes; 1 parity failed (including backends whose
effective configs differ); 2 bad input or usage (a bad option, file, key or value, a device that is not
there, a required backend missing, a run whose float64 reference goes out of range); 3 a backend
crashed (its traceback is in the report; the others were still compared); 130 interrupted (every file
is then as it was, or completely written).

This module imports no framework: backends are loaded through the registry when a command needs them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import tomllib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # parity.measure and parity.tolerances are imported where a command needs them
    from parity.measure import Measurement
    from parity.tolerances import Tolerances

from parity.config import ModelConfig
from parity.errors import BackendUnavailableError, ConfigError, ParityInputError

EXIT_PASS, EXIT_FAIL, EXIT_INPUT, EXIT_CRASH, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def _literal(text: str) -> Any:
    """Parse a --set value as a TOML literal, falling back to a bare string (``sigmoid``)."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def load_config(path: str | None, overrides: Sequence[str]) -> ModelConfig:
    values: dict[str, Any] = {}
    source = "config"
    if path:
        p = Path(path)
        source = str(p)
        kind = "JSON" if p.suffix == ".json" else "TOML"
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{p}: cannot read config file ({exc.strerror})") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{p}: not valid {kind} (not UTF-8 text: {exc})") from exc
        try:
            values = json.loads(text) if p.suffix == ".json" else tomllib.loads(text)
        except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{p}: not valid {kind} ({exc})") from exc
        if not isinstance(values, dict):
            raise ConfigError(f"{p}: a config file holds a table of keys, not a {type(values).__name__}")
        if isinstance(values.get("model"), dict):
            beside = sorted(k for k in values if k != "model")
            if beside:  # either layout is read, but keys of both would silently lose one of them
                raise ConfigError(
                    f"{p}: key {beside[0]!r} is outside the [model] table; put every key in [model], or none"
                )
            values = dict(values["model"])
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"option --set: expected KEY=VALUE, got {item!r}")
        key, _, raw = item.partition("=")
        values[key.strip()] = _literal(raw.strip())
        source = "config (--set)" if not path else f"{path} with --set"
    return ModelConfig.from_mapping(values, source=source)


def _progress(items: Iterable[Any]) -> Iterable[Any]:
    from tqdm import tqdm

    bar: Iterable[Any] = tqdm(items, desc="parity", unit="batch", file=sys.stderr, disable=None)
    return bar


def _backend_names(option: str, value: str) -> list[str]:
    from parity.registry import registered_names

    names = [b.strip() for b in value.split(",") if b.strip()]
    known = registered_names()
    for name in names:
        if name not in known:  # a typo, not a framework that is missing: never a silent pass
            raise ParityInputError(
                f"option {option}: {name!r} is not a registered backend; registered: {', '.join(known) or 'none'}"
            )
    if not names:
        raise ParityInputError(f"option {option}: no backend named")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:  # a backend compared with itself proves nothing, and its results would overwrite each other
        raise ParityInputError(f"option {option}: {twice[0]!r} is named twice")
    return names


def _check_report_folder(folder: Path) -> None:
    """A report folder is new, empty or an earlier report's: one holding other files (a project's
    own README.md, someone's notes) would have report.md and the rest written over them."""
    from parity.report import HTML_NAME, JSON_NAME, LOCK_NAME, MARKDOWN_NAME, STATS_NAME

    if not folder.is_dir():
        return  # missing: created; a file: refused when claimed
    ours = {JSON_NAME, MARKDOWN_NAME, HTML_NAME, STATS_NAME, LOCK_NAME}
    # Folders inside are left alone (the pytest plugin's per-test reports share the default folder).
    others = sorted(
        p.name for p in folder.iterdir() if p.name not in ours and not p.name.startswith(".") and not p.is_dir()
    )
    if others:
        raise ParityInputError(
            f"option --report: folder {folder} holds files a report does not write ({', '.join(others[:3])}"
            f"{', ...' if len(others) > 3 else ''}); give a new or empty folder, or an earlier report's"
        )


def cmd_run(args: argparse.Namespace) -> int:
    from parity.report import claim_folder, write_reports
    from parity.session import RunSpec, prepare, require_from_env
    from parity.verdict import EXIT_CODES

    if not args.report.strip():  # "" would write the report into whatever folder the shell is in
        raise ParityInputError("option --report: empty; give the report folder")
    if args.weights and getattr(args, "seed_given", False):  # the file's weights would run, the seed ignored
        raise ParityInputError(
            "options --weights and --seed: give one (--seed generates the weights a file would hold)"
        )
    config = load_config(args.config, args.set)
    spec = RunSpec(
        config=config,
        fixture=args.fixture,
        backends=_backend_names("--backends", args.backends),
        reference=args.reference or None,
        device=args.device,
        batch_size=args.batch_size,
        max_groups=args.max_groups or None,
        weights=args.weights,
        weights_seed=args.seed,
        tolerances=args.tolerances,
        require=args.require_backends or require_from_env(),
        taps=[t.strip() for t in args.taps.split(",") if t.strip()] if args.taps else None,
        deviations=args.deviations,
        allow_config_diff=args.allow_config_diff,
        shipped_deviations=not args.no_shipped_deviations,
        local=not args.no_local,
        gradients=args.gradients,
    )
    # Every input is read and checked, then the report folder is claimed, before any backend is built:
    # bad input leaves nothing behind, and a folder that is a file, unwritable or in use by another run
    # is an error now, not after the forward passes.
    _check_report_folder(Path(args.report))
    prepared = prepare(spec)
    with contextlib.ExitStack() as stack:
        try:
            report = stack.enter_context(claim_folder(args.report))
        except ParityInputError as exc:
            raise ParityInputError(f"option --report: {exc}") from None
        result = prepared.run(progress=_progress)
        paths = write_reports(result, report, html=not args.no_html, all_taps=args.all_taps)
    for n, r in result.backends.items():
        if not r.available:
            print(f"backend {n} unavailable: {r.reason}", file=sys.stderr)
    print(f"verdict: {result.verdict}")
    if not result.passed:
        print(result.describe_failure())
    print(f"report: {paths['json']}")
    return EXIT_CODES[result.verdict]


# pytest's exit codes -> this command's (pytest.ExitCode: 0 ok, 1 tests failed, 2 interrupted, 3
# internal error, 4 usage error, 5 no tests collected).
_PYTEST_EXIT = {0: EXIT_PASS, 1: EXIT_FAIL, 2: EXIT_INTERRUPTED, 3: EXIT_CRASH, 4: EXIT_INPUT, 5: EXIT_INPUT}


def _pytest(arguments: Sequence[str]) -> int:
    """Run pytest in a child process (pytest advises against running it twice in one process).

    The child runs in a process group of its own, so a Ctrl-C reaches this process only, which passes
    exactly one SIGINT on: pytest then stops as after one Ctrl-C (a second one, arriving while it
    reports the first, would end it with a traceback), and the interrupt is raised here.
    """
    import signal
    import subprocess

    proc = subprocess.Popen([sys.executable, "-m", "pytest", *arguments], process_group=0)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise


def cmd_regen_baselines(args: argparse.Namespace) -> int:
    """Regenerate the baselines (``pytest -m parity --force-regen``), then verify in a fresh session,
    whose summary (the plugin's) names the baselines no collected test writes any more."""
    flag = "--regen-all" if args.all else "--force-regen"
    base = ["-m", "parity", "-p", "no:cacheprovider", *args.pytest_args]
    code = _pytest([*base, flag, "-q"])
    if code == 5:
        raise ParityInputError(
            "regen-baselines: pytest found no parity tests here (`pytest -m parity` collects nothing); run it "
            "from your project's root, or pass the test paths after --"
        )
    if code not in (0, 1):  # 1: baselines were rewritten (their check fails, as pytest-regressions' does)
        if code == 2:
            raise KeyboardInterrupt
        return _PYTEST_EXIT.get(code, EXIT_CRASH)
    code = _pytest([*base, "-q"])
    if code == 2:
        raise KeyboardInterrupt
    return _PYTEST_EXIT.get(code, EXIT_CRASH)


def cmd_make_fixtures(args: argparse.Namespace) -> int:
    import tempfile

    from parity.fixture import bundled_fixtures_dir
    from parity.simulate import compare_bundled, write_bundled_fixtures

    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            write_bundled_fixtures(tmp)
            problems = compare_bundled(bundled_fixtures_dir(), tmp)
        for p in problems:
            print(p, file=sys.stderr)
        print("fixtures reproduce bit for bit" if not problems else f"{len(problems)} differences")
        return EXIT_FAIL if problems else EXIT_PASS
    out = Path(args.out) if args.out else bundled_fixtures_dir()
    for name, digest in write_bundled_fixtures(out).items():
        print(f"{digest}  {out / name}")
    return EXIT_PASS


def _output_file(command: str, value: str, force: bool, kind: str) -> Path:
    """The file a command writes, checked before any work: an existing file (often a fixture or the
    weights a suite reads) is replaced only with ``--force``, and only if it is a file of the same
    ``kind`` ("fixture" or "weights file"): --force says "replace my old one", not "replace whatever
    is at this path" (make-weights onto a fixture's path had destroyed the fixture). A folder is never
    replaced, and a missing folder is not created (a typo in it would leave the file where nobody
    looks)."""
    out = Path(value)
    if out.is_dir():
        raise ParityInputError(f"{command}: {out} is a folder; give the file to write (e.g. {out / 'data.h5'})")
    if out.exists():
        if not force:
            raise ParityInputError(f"{command}: {out} exists; pass --force to replace it")
        found = _file_kind(out)
        if found != f"a {kind}":
            raise ParityInputError(
                f"{command}: {out} is {found}, not a {kind}; --force replaces only a {kind} "
                "(remove the file yourself if you mean to lose it, or write elsewhere)"
            )
    if not out.parent.is_dir():
        raise ParityInputError(f"{command}: folder {out.parent} does not exist")
    return out


def _file_kind(path: Path) -> str:
    """What an existing file is, as far as replacing it goes: "a fixture", "a weights file" (the two
    HDF5 files the harness writes, told apart by the dataset each must have), or a description."""
    try:
        with path.open("rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        return f"an unreadable file ({exc.strerror})"
    if head[:2] == b"PK":
        return "a NumPy .npz archive"
    if head != b"\x89HDF\r\n\x1a\n":
        return "a file that is not HDF5"
    import h5py

    try:
        with h5py.File(path, "r") as h5:
            if "log_scale" in h5:
                return "a weights file"
            if "diffraction" in h5:
                return "a fixture"
    except (OSError, RuntimeError) as exc:
        return f"an unreadable HDF5 file ({exc})"
    return "an HDF5 file that is neither a fixture nor a weights file"


def cmd_import_npz(args: argparse.Namespace) -> int:
    from parity.npz_import import import_npz

    out = _output_file("import-npz", args.out, args.force, "fixture")
    print(import_npz(args.npz, out, args.gridsize))
    return EXIT_PASS


def cmd_make_weights(args: argparse.Namespace) -> int:
    from parity.weights import generate_weights, save_weights

    out = _output_file("make-weights", args.out, args.force, "weights file")
    config = load_config(args.config, args.set)
    digest = save_weights(out, generate_weights(config, args.seed), config)
    print(f"{args.out} sha256(content)={digest}")
    return EXIT_PASS


def cmd_backends(args: argparse.Namespace) -> int:
    from parity.registry import discover

    for name, info in discover().items():
        state = "available" if info.available else f"unavailable: {info.error}"
        print(f"{name:12s} {info.target:45s} {state}")
    return EXIT_PASS


def cmd_env(args: argparse.Namespace) -> int:
    from parity.session import check_devices, instantiate
    from parity.weights import generate_weights

    config = ModelConfig()
    names = _backend_names("--backends", args.backends)
    check_devices(names, args.device)
    built, missing, crashed = instantiate(names, config, generate_weights(config), args.device, require=False)
    env: dict[str, Any] = {"python": sys.version.split()[0]}
    env.update({n: be.environment() for n, be in built.items()})
    env.update({n: {"available": False, "reason": r} for n, r in missing.items()})
    env.update({n: {"available": True, "crashed": t} for n, t in crashed.items()})
    print(json.dumps(env, indent=2, default=str))
    return EXIT_CRASH if crashed else EXIT_PASS


def cmd_measure_tolerances(args: argparse.Namespace) -> int:
    """Measure the factors of the tolerance model and write a tolerance file (see parity.measure)."""
    from parity import measure
    from parity.emulation import SETTINGS, runnable
    from parity.tolerances import load_tolerances

    template = load_tolerances(args.template)
    backends = _backend_names("--backends", args.backends) if args.backends else None
    for option, value in (("--out", args.out), ("--json", args.json)):  # before hours of runs, not after
        if value and Path(value).is_dir():
            raise ParityInputError(f"option {option}: {value} is a folder; give the file to write")
        if value and not Path(value).parent.is_dir():
            raise ParityInputError(f"option {option}: folder {Path(value).parent} does not exist")
    if args.cases < 0:
        raise ParityInputError(f"option --cases must be an integer >= 0, got {args.cases}")
    if not args.from_json and not args.matrix and args.cases == 0:
        raise ParityInputError("option --cases 0 without --matrix or --from-json: nothing to measure")
    if not (math.isfinite(args.safety) and args.safety >= 1):
        raise ParityInputError(f"option --safety must be a finite number >= 1, got {args.safety}")
    if not (math.isfinite(args.minimum) and args.minimum > 0):
        raise ParityInputError(f"option --minimum must be a finite number > 0, got {args.minimum}")
    families = [f.strip() for f in args.families.split(",") if f.strip()] if args.families else None
    if families == ["grad"]:  # shorthand: every gradient family
        families = measure.gradient_families(template)
    if families is not None:
        measure.check_families(template, families)
        if any(f.startswith("grad.") for f in families) and not (args.gradients or args.from_json):
            raise ParityInputError("option --families names gradient families: add --gradients to measure them")
    run_device = args.device or "cpu"
    if args.device == "cuda" and families is not None:  # before a long run, not after it
        raise ParityInputError(_GPU_FAMILIES)
    if args.device == "cuda" and args.emulate is not None:
        raise ParityInputError(
            "option --emulate: the emulated machines are CPU settings (threads, oneDNN, instruction sets); "
            "a GPU measurement runs natively"
        )
    if args.from_json:
        measurement = measure.Measurement()
        for source in args.from_json:
            loaded = measure.load_measurement(source)  # its errors name the option and the file
            try:
                measurement.merge(loaded)
            except ParityInputError as exc:
                raise ParityInputError(f"option --from-json: {source}: {exc}") from None
        settings = sorted(measurement.machines)  # every machine a merged run was measured under
        if args.device is not None and measurement.runs and measurement.device != args.device:
            raise ParityInputError(
                f"option --device {args.device}: the measurements of --from-json ran on "
                f"{', '.join(sorted(measurement.devices))}"
            )
    elif args.emulate is not None:
        settings = args.emulate or list(SETTINGS)
        unknown = [s for s in settings if s not in SETTINGS]
        if unknown:
            raise ParityInputError(f"option --emulate: unknown setting {unknown[0]!r}; known: {', '.join(SETTINGS)}")
        child = ["--cases", str(args.cases), "--seed", str(args.seed), "--template", str(template.source)]
        child += ["--matrix"] if args.matrix else []
        child += ["--backends", args.backends] if args.backends else []
        child += ["--gradients"] if args.gradients else []
        child += ["--families", ",".join(families)] if families is not None else []
        child += ["--device", run_device]
        settings = runnable(settings)
        measurement = measure.measure_emulated(settings, child)
    else:
        settings = []
        # A GPU's runs compare with its profile's normwise floors, as a GPU parity run does, but not its
        # device factor: what each family needs there is what that factor is made of.
        runs_with = template
        if run_device != "cpu":
            runs_with = dataclasses.replace(load_tolerances(args.template, profile="cuda"), device_factor=1.0)
        measurement = measure.measure_cases(
            runs_with, args.cases, args.seed, args.matrix, backends, args.label, args.gradients, families, run_device
        )
    if args.json:
        from parity.atomic import write_text

        write_text(Path(args.json), json.dumps(measurement.to_dict(), indent=1) + "\n")
    for fam in template.families:
        need = measurement.needed.get(fam.pattern)
        where = measurement.where.get(fam.pattern, "")
        needed = f"{need:8.3g}" if need is not None else "     n/a"  # not measured by these runs
        if measurement.device == "cuda" and need is not None:  # what the device factor is made of
            needed += f" ({need / fam.factor:6.3g} x its CPU factor)"
        print(f"{fam.pattern:24s} needed {needed}   {where}")
    measure.check_sane(measurement, template)
    if args.out and not measurement.runs:
        raise ParityInputError(f"option --out {args.out}: nothing was measured (0 runs); the file was not written")
    if not args.from_json and measurement.runs and measurement.device != run_device:
        raise ParityInputError(
            f"option --device {run_device}: the backends reported running on {', '.join(sorted(measurement.devices))}"
        )
    command = "ptycho-parity " + " ".join(args.argv)
    if measurement.device == "cuda":
        return _write_device_factor(args, template, measurement, settings, command)
    if args.out:
        text = Path(template.source).read_text(encoding="utf-8")
        if families is None and not args.keep_records:
            header = measure.header_lines(command, measurement, args.safety, settings, text)
        else:
            header = measure.remeasured_header(
                text, command, measurement, args.safety, settings, families, args.keep_records
            )
        cuda = load_tolerances(args.template, profile="cuda")
        rendered = measure.render(
            template,
            measurement,
            args.safety,
            args.minimum,
            header,
            cuda.device_factor,
            keep_records=args.keep_records,
            cuda_floors=cuda.normwise_floors,
        )
        _write_tolerances(Path(args.out), rendered)
        print(f"wrote {args.out}")
    return EXIT_PASS


def _write_tolerances(out: Path, rendered: str) -> None:
    """Write a measured tolerance file only if it loads: ``--out`` is often the bundled file itself,
    and a file that does not load would stop every later run until restored from git."""
    from parity.atomic import write_text
    from parity.tolerances import parse_tolerances

    parse_tolerances(rendered, f"option --out {out} (the file it would write; nothing was written)")
    write_text(out, rendered)


_GPU_FAMILIES = (
    "option --families applies to a CPU measurement; a GPU measurement sets only [profiles.cuda] device_factor"
)


def _write_device_factor(
    args: argparse.Namespace, template: Tolerances, measurement: Measurement, settings: list[str], command: str
) -> int:
    """A GPU measurement: the cuda profile's device factor it asks for, written into a copy of the
    template whose families (the CPU's evidence) stay as they are (docs/tolerances.md, "GPUs")."""
    from parity import measure
    from parity.tolerances import load_tolerances

    if args.families:
        raise ParityInputError(_GPU_FAMILIES)
    factor, where = measure.device_factor_needed(template, measurement, args.safety)
    print(f"device_factor needed {factor:g} on {', '.join(sorted(measurement.devices))}   {where}")
    cuda = load_tolerances(args.template, profile="cuda")
    if args.keep_records:  # one GPU's measurement adds to the evidence: it never lowers the factor
        factor = max(factor, cuda.device_factor)
    if args.out:
        text = Path(template.source).read_text(encoding="utf-8")
        header = measure.device_factor_header(text, command, measurement, args.safety, settings, args.keep_records)
        rendered = measure.render(
            template, measure.Measurement(), args.safety, args.minimum, header, factor, cuda_floors=cuda.normwise_floors
        )
        _write_tolerances(Path(args.out), rendered)
        print(f"wrote {args.out}")
    return EXIT_PASS


def cmd_emulate(args: argparse.Namespace) -> int:
    """Run a command once per emulated machine; fail if it fails under any."""
    from parity.emulation import SETTINGS, run_under, unavailable

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise ParityInputError(
            "emulate: give the command to run after --, e.g. `ptycho-parity emulate -- pytest -m parity`"
        )
    settings = args.settings.split(",") if args.settings else list(SETTINGS)
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        raise ParityInputError(f"option --settings: unknown setting {unknown[0]!r}; known: {', '.join(SETTINGS)}")
    if shutil.which(command[0]) is None:  # else a traceback per machine, exiting as if parity failed
        raise ParityInputError(f"emulate: command not found: {command[0]}")
    codes = run_under(settings, command)
    if not codes:
        raise ParityInputError("emulate: this CPU can run none of the settings asked for")
    skipped = unavailable()
    width = max(len(s) for s in settings)
    for name in settings:  # a skipped setting stays in the table: it was asked for and not run
        outcome = f"skipped ({skipped[name]})" if name not in codes else "pass" if codes[name] == 0 else None
        print(f"{name:{width}s}  {outcome or f'FAIL (exit {codes[name]})'}")
    return EXIT_PASS if all(c == 0 for c in codes.values()) else EXIT_FAIL


def cmd_make_fixture(args: argparse.Namespace) -> int:
    """Simulate one fixture like your experiment (parity.simulate) and write it."""
    from parity.fixture import write_fixture
    from parity.simulate import SimulationParams, simulate

    out = _output_file("make-fixture", args.out, args.force, "fixture")
    rows, _, cols = args.scan.partition("x")
    if not (rows.isdigit() and cols.isdigit()):
        raise ParityInputError(f"option --scan: expected ROWSxCOLS such as 9x9, got {args.scan!r}")
    params = SimulationParams(
        kind=args.kind,
        N=args.N,
        gridsize=args.gridsize,
        seed=args.seed,
        scan_shape=(int(rows), int(cols)),
        step=args.step,
        jitter=args.jitter,
        nphotons=args.nphotons,
        beamstop=args.beamstop,
        probe_phase=args.probe_phase,
    )
    path = write_fixture(out, simulate(params))
    from parity.fixture import file_sha256

    print(f"{file_sha256(path)}  {path}")
    return EXIT_PASS


def cmd_check_device(args: argparse.Namespace) -> int:
    """Fail fast (exit 2) when the requested device is not there, before any test can 'pass'.

    Each backend answers for itself (``Backend.device_problem``); a backend that cannot be loaded
    cannot run on any device, so it fails the check too.
    """
    from parity.registry import load_backend
    from parity.session import backend_device

    problems = []
    for name in _backend_names("--backends", args.backends):
        try:
            cls = load_backend(name)
        except BackendUnavailableError as exc:
            problems.append(str(exc))
            continue
        problem = cls.device_problem(backend_device(cls, args.device))
        if problem:
            problems.append(problem)
    if problems:
        print(f"ptycho-parity: error: device {args.device!r} is not usable: " + "; ".join(problems), file=sys.stderr)
        return EXIT_INPUT
    print(f"device {args.device!r} is usable by {args.backends}")
    return EXIT_PASS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ptycho-parity", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def config_opts(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", help="model config file (TOML or JSON; keys at top level or under [model])")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")

    r = sub.add_parser("run", help="compare backends on one fixture and config, write reports")
    config_opts(r)
    r.add_argument("--fixture", help="fixture file or bundled fixture name (default: the bundled one for N, gridsize)")
    r.add_argument(
        "--backends",
        default="reference,torch,tensorflow",
        help="comma-separated registered backends to compare (see `ptycho-parity backends`; default: %(default)s)",
    )
    r.add_argument("--reference", default="reference", help="float64 arbiter backend ('' for none)")
    r.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    r.add_argument("--batch-size", type=int, default=4)
    r.add_argument("--max-groups", type=int, default=8, help="groups of the fixture to run (0: all)")
    r.add_argument("--weights", help="canonical weights file (default: generated from --seed)")
    r.add_argument("--seed", type=int, default=None, help="weights seed (default: the canonical seed)")
    r.add_argument("--tolerances", help="tolerance TOML file (default: the bundled one)")
    r.add_argument("--report", default="parity-report", help="report folder (default: %(default)s)")
    r.add_argument("--all-taps", action="store_true", help="pictures for every tap in the HTML report")
    r.add_argument("--no-html", action="store_true")
    r.add_argument(
        "--require-backends",
        action="store_true",
        help="an unavailable backend is an error (also set by PTYCHO_PARITY_REQUIRE_BACKENDS=1)",
    )
    r.add_argument(
        "--taps",
        help="compare only taps matching these comma-separated shell patterns; '!PATTERN' leaves taps out "
        "(e.g. 'encoder.*' or '!loss.*,!output.intensity')",
    )
    r.add_argument(
        "--deviations",
        action="append",
        default=[],
        metavar="FILE",
        help="declared-deviation file (TOML, see docs/deviations.md): known differences shown as known, "
        "not as failures; one that no longer reproduces fails the run (repeatable)",
    )
    r.add_argument(
        "--allow-config-diff",
        action="append",
        default=[],
        metavar="KEY",
        help="go on past a difference of this effective-config key, for this run (repeatable; held as strictly)",
    )
    r.add_argument(
        "--no-shipped-deviations",
        action="store_true",
        help="ignore the deviation files the backends ship (see every known difference as a failure)",
    )
    r.add_argument(
        "--no-local",
        action="store_true",
        help="end-to-end parity only: skip running each stage on the reference's inputs (layer-local parity)",
    )
    r.add_argument(
        "--gradients",
        action="store_true",
        help="gradient parity too: both losses' gradients w.r.t. every parameter and the input, per backend",
    )
    r.set_defaults(func=cmd_run)

    g = sub.add_parser("regen-baselines", help="rewrite the stored baselines (pytest -m parity --force-regen)")
    g.add_argument("--all", action="store_true", help="--regen-all: rewrite every baseline, not only changed ones")
    g.add_argument("pytest_args", nargs="*", help="extra pytest arguments after -- (paths, -k ...)")
    g.set_defaults(func=cmd_regen_baselines)

    f = sub.add_parser("make-fixtures", help="regenerate the bundled fixtures from their seeds")
    f.add_argument("--out", help="folder (default: the bundled fixtures folder)")
    f.add_argument("--check", action="store_true", help="regenerate into a temp folder and compare, exit 1 on change")
    f.set_defaults(func=cmd_make_fixtures)

    n = sub.add_parser(
        "import-npz",
        help="turn an original PtychoPINN NPZ into a fixture (coords_relative with nn_indices: per-group offsets)",
    )
    n.add_argument("npz")
    n.add_argument("out")
    n.add_argument(
        "--gridsize", type=int, default=2, choices=(1, 2), help="patches per group: gridsize² (default: %(default)s)"
    )
    n.add_argument(
        "--force", action="store_true", help="replace an existing fixture (only a fixture: any other file is kept)"
    )
    n.set_defaults(func=cmd_import_npz)

    w = sub.add_parser("make-weights", help="write a canonical weights file generated from a seed")
    config_opts(w)
    w.add_argument("out")
    w.add_argument("--seed", type=int, default=None)
    w.add_argument(
        "--force",
        action="store_true",
        help="replace an existing weights file (only a weights file: any other file is kept)",
    )
    w.set_defaults(func=cmd_make_weights)

    b = sub.add_parser("backends", help="list registered backends and why any is unavailable")
    b.set_defaults(func=cmd_backends)

    e = sub.add_parser("env", help="print each backend's environment (versions, device, precision flags)")
    e.add_argument(
        "--backends",
        default="reference,torch,tensorflow",
        help="comma-separated registered backends (see `ptycho-parity backends`; default: %(default)s)",
    )
    e.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    e.set_defaults(func=cmd_env)

    m = sub.add_parser(
        "measure-tolerances",
        help="measure the tolerance model's factors over the matrix, random cases and emulated machines",
    )
    m.add_argument("--template", help="tolerance file whose model and families to measure (default: the bundled one)")
    m.add_argument("--out", help="write the measured tolerance file here")
    m.add_argument("--json", help="write the raw measurement (JSON) here")
    m.add_argument("--cases", type=int, default=20, help="random cases of the sweep (default: %(default)s)")
    m.add_argument("--seed", type=int, default=0, help="seed of the random cases (default: %(default)s)")
    m.add_argument("--matrix", action="store_true", help="also the parity suite's configs on the bundled fixtures")
    m.add_argument(
        "--backends", help="comma-separated registered backends to run (default: reference,torch,tensorflow)"
    )
    m.add_argument("--safety", type=float, default=2.5, help="factor = safety x measured (default: %(default)s)")
    m.add_argument("--minimum", type=float, default=2.0, help="smallest factor written (default: %(default)s)")
    m.add_argument(
        "--emulate",
        nargs="*",
        metavar="SETTING",
        help="measure in a child process per emulated machine (all settings when none named)",
    )
    m.add_argument(
        "--gradients",
        action="store_true",
        help="also compare both losses' gradients in every run, so the grad.* families are measured",
    )
    m.add_argument(
        "--families",
        help="comma-separated family patterns to measure and rewrite (the others keep their factors and "
        "records); 'grad' means every gradient family",
    )
    m.add_argument(
        "--from-json",
        nargs="+",
        metavar="JSON",
        help="run nothing: merge raw measurements written by --json (e.g. the matrix on one machine, random "
        "cases under every emulated one) and write the tolerance file from them",
    )
    m.add_argument(
        "--keep-records",
        action="store_true",
        help="a family's measured value is the larger of this measurement and the template's record: "
        "a measurement on another machine adds to the evidence instead of replacing it (on a GPU: the "
        "device factor is the larger of the measured one and the template's)",
    )
    m.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        help="where the float32 backends run (default: cpu; with --from-json, the files' device); a cuda "
        "measurement rewrites only [profiles.cuda] device_factor",
    )
    m.add_argument("--label", default="native", help=argparse.SUPPRESS)
    m.set_defaults(func=cmd_measure_tolerances)

    em = sub.add_parser("emulate", help="run a command once per emulated machine (threads, oneDNN, ISA caps)")
    em.add_argument("--settings", help="comma-separated settings (default: all; see parity/emulation.py)")
    em.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command, e.g. -- pytest -m parity")
    em.set_defaults(func=cmd_emulate)

    mf = sub.add_parser("make-fixture", help="simulate a fixture like your experiment (kind, size, scan, photons)")
    mf.add_argument("out", help="HDF5 file to write")
    mf.add_argument(
        "--kind", default="lines", choices=("lines", "grf"), help="object: lines or a Gaussian random field"
    )
    mf.add_argument("--N", type=int, default=64, choices=(64, 128), help="patch size (default: %(default)s)")
    mf.add_argument("--gridsize", type=int, default=2, choices=(1, 2), help="default: %(default)s")
    mf.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    mf.add_argument("--scan", default="9x9", help="scan grid ROWSxCOLS (default: %(default)s)")
    mf.add_argument("--step", type=float, default=4.0, help="pixels between scan points (default: %(default)s)")
    mf.add_argument(
        "--jitter", type=float, default=0.5, help="random position jitter, pixels, < 1 (default: %(default)s)"
    )
    mf.add_argument("--nphotons", type=float, default=1e9, help="mean counts per pattern (default: %(default)g)")
    mf.add_argument(
        "--probe-phase", type=float, default=0.5, help="probe's quadratic phase, radians (default: %(default)s)"
    )
    mf.add_argument(
        "--beamstop",
        type=int,
        default=0,
        help="side, even, of the central detector square that reads 0, pixels (default: %(default)s)",
    )
    mf.add_argument(
        "--force", action="store_true", help="replace an existing fixture (only a fixture: any other file is kept)"
    )
    mf.set_defaults(func=cmd_make_fixture)

    c = sub.add_parser("check-device", help="exit 2 unless every backend can use the device")
    c.add_argument("device", choices=("cpu", "cuda"))
    c.add_argument(
        "--backends",
        default="reference,torch,tensorflow",
        help="comma-separated registered backends (see `ptycho-parity backends`; default: %(default)s)",
    )
    c.set_defaults(func=cmd_check_device)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from parity.weights import DEFAULT_SEED

    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.seed_given = getattr(args, "seed", None) is not None
    if getattr(args, "seed", 0) is None:
        args.seed = DEFAULT_SEED
    try:
        if getattr(args, "seed", 0) < 0:  # NumPy's generators take none, and would say so in a traceback
            raise ParityInputError(f"option --seed must be an integer >= 0, got {args.seed}")
        return int(args.func(args))
    except (ParityInputError, BackendUnavailableError) as exc:
        print(f"ptycho-parity: error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print("ptycho-parity: interrupted; every file is as it was or completely written", file=sys.stderr)
        if argv is None:  # the process is ours (the command, not a caller's in-process use)
            # An interrupt that lands while an extension runs Python code through the C API (the
            # frameworks' imports do) leaves CPython's "unhandled KeyboardInterrupt" flag set even
            # though it was handled here, and the interpreter would then end itself by SIGINT instead
            # of exiting 130. Every file is closed and every lock released by now, so leave directly.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_INTERRUPTED)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())

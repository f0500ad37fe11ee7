"""Reports of a parity run: JSON (versioned schema, for machines), Markdown (for a pull request),
HTML (pictures, see :mod:`parity.report_html`) and the full per-patch statistics as ``statistics.npz``.

The JSON is described by a JSON Schema shipped in the package (:func:`schema_file`) and in prose in
docs/report-schema.md; bump ``SCHEMA_VERSION`` on any change that removes or renames a field.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import socket
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

import parity
from parity.atomic import atomic_path, staged
from parity.compare import ComparisonResult, _jsonable
from parity.errors import ParityInputError
from parity.runner import ParityResult, TapResult, statistics_summary

SCHEMA_VERSION = 5
JSON_NAME, MARKDOWN_NAME, HTML_NAME, STATS_NAME = "report.json", "report.md", "report.html", "statistics.npz"
LOCK_NAME = ".ptycho-parity.lock"
SIDE_BY_SIDE = ("mean", "std", "var_zero_mean", "min", "max", "l2")


def schema_file() -> Path:
    """The JSON Schema (draft 2020-12) every ``report.json`` follows, shipped in the package."""
    from importlib import resources

    return Path(str(resources.files("parity") / "report.schema.json"))


def _clean(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, (np.generic, complex)):
        return _jsonable(obj)
    return obj


def _baseline_by_tap(result: ParityResult) -> dict[str, list[ComparisonResult]]:
    """The baseline comparisons grouped by tap, once per report (thousands of them in a run)."""
    out: dict[str, list[ComparisonResult]] = {}
    for c in result.baseline:
        out.setdefault(c.tap, []).append(c)
    return out


def to_json_dict(result: ParityResult) -> Any:
    taps = []
    baseline = _baseline_by_tap(result)
    for t in result.taps:
        base = baseline.get(t.name, [])
        taps.append(
            {
                "name": t.name,
                "shape": t.expected_shape or next((s for s in t.shapes.values() if s), None),
                "shapes": t.shapes,
                "complex": t.complex,
                "scale": t.scale,
                "status": t.status,
                "not_exposed": t.not_exposed,
                "window": t.window,
                "passed": t.passed and all(c.passed for c in base),
                "comparisons": [c.to_dict() for c in t.comparisons],
                "stage": t.stage,
                "local": [c.to_dict() for c in t.local],
                "baseline": [c.to_dict() for c in base],
                "statistics": statistics_summary(result, t.name),
            }
        )
    return _clean(
        {
            "schema_version": SCHEMA_VERSION,
            "tool": {"name": "ptycho-parity", "version": parity.__version__},
            "verdict": result.verdict,
            "passed": result.passed,
            "rule": result.rule,
            "tolerances": {
                "source": result.tolerance_source,
                "profile": result.tolerance_profile,
                "blame_ratio": result.blame_ratio,
            },
            "first_divergence": result.first_divergence,
            "first_local_divergence": result.first_local_divergence,
            "local_unsupported": result.local_unsupported,
            "local_recomputed": result.local_recomputed,
            "gradients": {"enabled": result.gradients, "unsupported": result.gradients_unsupported},
            "reference": result.reference,
            "config": result.config,
            "config_diff": result.config_diff,
            "declared_config_diff": result.declared_config_diff,
            "deviations": result.deviations,
            "backends": {
                n: {
                    "available": r.available,
                    "reason": r.reason,
                    "crashed": r.crashed,
                    "precision": r.precision,
                    "environment": r.environment,
                    "effective_config": r.effective_config,
                }
                for n, r in result.backends.items()
            },
            "fixture": result.fixture,
            "weights_sha256": result.weights_sha256,
            "batches": result.batches,
            "groups": result.groups,
            "taps": taps,
            "baseline_notes": result.baseline_notes,
            "baseline_problems": result.baseline_problems,
            "files": {"statistics": STATS_NAME, "markdown": MARKDOWN_NAME, "html": HTML_NAME},
        }
    )


def json_text(doc: Mapping[str, Any]) -> str:
    """A report as JSON text: a line per top-level key and a line per tap, so an editor, ``grep`` or a
    diff finds a tap on its line. Written by the C encoder: ``indent=`` would go through the pure-Python
    one, several times slower on a report's tens of thousands of values."""
    lines = []
    for key, value in doc.items():
        if key == "taps" and value:
            text = "[\n" + ",\n".join("    " + json.dumps(tap) for tap in value) + "\n  ]"
        else:
            text = json.dumps(value)
        lines.append(f"  {json.dumps(key)}: {text}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def _g(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def _comparison_cell(c: ComparisonResult) -> str:
    mark = "✅" if c.passed else ("⚠️ known:" if c.known else "❌")
    if c.reason:
        return f"{mark} {c.reason}"
    out = "" if c.passed else f", {c.mismatched}/{c.numel} out"
    return f"{mark} margin {_g(c.margin)}{out}, max_abs {_g(c.max_abs)}"


def to_markdown(result: ParityResult, max_rows: int | None = None) -> str:
    lines = [f"# ptycho-parity report: **{result.verdict.upper()}**", ""]
    fd = result.first_divergence
    for r in result.backends.values():
        if r.crashed:
            lines += [f"**Backend `{r.name}` crashed**; the others were still compared:", "", "```text"]
            lines += [r.crashed.rstrip(), "```", ""]
    if result.verdict == "config_mismatch":
        lines += ["Effective configs differ between backends; no forward pass was run.", ""]
        lines += ["| key | " + " | ".join(result.backends) + " |", "|---|" + "---|" * len(result.backends)]
        for key, vals in result.config_diff.items():
            lines.append(f"| `{key}` | " + " | ".join(f"`{vals.get(b, '')!r}`" for b in result.backends) + " |")
        lines.append("")
    elif result.compared_nothing:
        lines += [f"**Nothing was compared:** {result.why_nothing_compared()}.", ""]
    elif fd:
        blamed = ", ".join(fd["blamed"]) or "undetermined"
        lines += [
            f"**First diverging tap:** `{fd['tap']}` (backends: {', '.join(fd['backends'])}; "
            f"off the float64 reference: **{blamed}**)",
            "",
        ]
        lines += [f"- note: {n}" for n in fd.get("notes", [])]
        lines += [f"- {s}" for s in fd["comparisons"]] + [""]
    elif result.verdict == "pass":
        lines += ["All compared taps agree within tolerance.", ""]
    local = result.first_local_divergence
    if local:
        how = (
            "the reference run on that backend's own inputs"
            if result.first_local_recomputed
            else "fed the reference's own inputs"
        )
        lines += [
            f"**First stage that computes differently** ({how}): `{local['stage']}`, "
            f"at `{local['tap']}` ({', '.join(local['backends'])}). Where this is later than the first diverging "
            "tap, the error there was carried in from upstream; where it is the same, that stage itself differs.",
            "",
        ]
        lines += [f"- {s}" for s in local["comparisons"]] + [""]
    for names, what, why in (
        (
            result.local_unsupported,
            "End-to-end parity only",
            "it cannot run a stage alone, so its local column is empty",
        ),
        (
            result.local_recomputed,
            "Layer-local parity",
            "a backend that cannot run a stage alone; its local column compares its outputs with the "
            "reference's stage run on its own inputs to it (where it gives them)",
        ),
        (
            result.gradients_unsupported,
            "Forward parity only",
            "it computes no gradients, so its `grad.*` taps are not exposed",
        ),
    ):
        if names:
            lines += [f"{what} for {', '.join(f'`{n}`' for n in names)}: {why}.", ""]
    stale = result.stale_deviations()
    if stale or result.deviations:
        lines += ["## Declared deviations", ""]
        lines += ["| declared | backend | status | reason | reference |", "|---|---|---|---|---|"]
        for d in result.deviations:
            what = f"config key `{d['config_key']}`" if d["config_key"] else f"tap `{d['tap']}`"
            status = {"reproduced": "✅ reproduced", "not_reproduced": "❌ not reproduced"}.get(
                d["status"], "not applicable"
            )
            lines.append(f"| {what} | {d['backend']} | {status} | {d['reason']} | {d['reference']} |")
        lines.append("")
        for key, vals in result.declared_config_diff.items():
            lines.append(f"- declared config difference `{key}`: " + ", ".join(f"{b}={v!r}" for b, v in vals.items()))
        if result.declared_config_diff:
            lines.append("")
    lines += [
        f"Rule: `{result.rule}`; tolerances: `{result.tolerance_source}` (profile {result.tolerance_profile}). "
        "Margin: the worst element's error over its tolerance (1 is on the edge).",
        "",
    ]
    if result.fixture:
        lines.append(f"Fixture: `{result.fixture.get('path')}` sha256 `{result.fixture.get('sha256')}`")
    if result.weights_sha256:
        lines.append(f"Weights sha256 `{result.weights_sha256}`")
    lines += [f"Batches: {result.batches}, groups: {result.groups}", "", "## Backends", ""]
    lines += [
        "| backend | available | precision | version | device | controls |",
        "|---|---|---|---|---|---|",
    ]
    for n, r in result.backends.items():
        env = r.environment
        ctrl = ", ".join(
            f"{k}={env[k]}" for k in sorted(env) if any(w in k for w in ("tf32", "determin", "onednn", "thread"))
        )
        lines.append(
            f"| {n} | {'yes' if r.available else 'no: ' + str(r.reason)} | {r.precision or ''} | "
            f"{env.get('framework_version', '')} | {env.get('device', '')} | {ctrl} |"
        )
    lines += ["", "## Taps", ""]
    if not result.taps:
        lines += ["No tap was compared."]
        return "\n".join(lines) + "\n"
    pairs: list[tuple[str, str, str]] = []
    for t in result.taps:
        for c in t.comparisons:
            pair = (c.kind, c.a, c.b)
            if c.kind != "structure" and pair not in pairs:
                pairs.append(pair)
    locals_ = [n for n in result.backends if any(c.a == n for t in result.taps for c in t.local)]
    header = ["tap", "shape", *(f"{a} vs {b}" for _, a, b in pairs), *(f"{n} local" for n in locals_), "baseline"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|---|---|" + "---|" * (len(pairs) + len(locals_) + 1))
    shown = result.taps if max_rows is None else result.taps[:max_rows]
    baseline = _baseline_by_tap(result)
    for t in shown:
        cells = []
        for kind, a, b in pairs:
            found = next((c for c in t.comparisons if (c.kind, c.a, c.b) == (kind, a, b)), None)
            hidden = a in t.not_exposed or b in t.not_exposed
            cells.append(_comparison_cell(found) if found else ("not exposed" if hidden else ""))
        for n in locals_:
            own = next((c for c in t.local if c.a == n), None)
            cells.append(_comparison_cell(own) if own else "")
        struct = [c for c in t.comparisons if c.kind == "structure"]
        base = baseline.get(t.name, [])
        bad_base = [c for c in base if not c.passed]
        bcell = "" if not base else ("✅" if not bad_base else f"❌ {len(bad_base)} statistics changed")
        name = f"`{t.name}`" + (" ❌ " + "; ".join(c.reason or "" for c in struct) if struct else "")
        if t.not_exposed:
            name += " (not exposed by " + ", ".join(t.not_exposed) + ")"
        if t.window:
            name += f" (compared on the centred {t.window[0]}×{t.window[1]} window both sides hold)"
        shape = "×".join(map(str, t.expected_shape or next((s for s in t.shapes.values() if s), [])))
        lines.append(f"| {name} | {shape} | " + " | ".join(cells) + f" | {bcell} |")
    lines += ["", "## Patch statistics, side by side", ""]
    lines.append("Mean over patches of each per-patch statistic (full arrays in `statistics.npz`).")
    lines.append("")
    for t in shown:
        summ = statistics_summary(result, t.name)
        if not summ:
            continue
        stats = [s for s in next(iter(summ.values())) if s.split(".")[-1] in SIDE_BY_SIDE]
        lines += [f"<details><summary><code>{t.name}</code></summary>", ""]
        lines.append("| statistic | " + " | ".join(summ) + " |")
        lines.append("|---|" + "---|" * len(summ))
        for s in stats:
            lines.append(
                f"| {s} | " + " | ".join(f"{summ[b][s]['mean']:.6g}" if s in summ[b] else "" for b in summ) + " |"
            )
        lines += ["", "</details>", ""]
    if result.baseline_notes or result.baseline_problems:
        lines += ["## Baselines", ""] + [f"- {n}" for n in result.baseline_notes + result.baseline_problems]
    return "\n".join(lines) + "\n"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _lock_owner(lock: Path) -> dict[str, Any]:
    """Who holds ``lock``: the JSON object a run wrote there, or {} when it holds anything else (a
    lock cut short, or written by hand): then nothing says which run holds it, and the error asks
    the user to delete it if no run is going on, naming it."""
    try:
        owner = json.loads(lock.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


@contextlib.contextmanager
def claim_folder(folder: str | Path) -> Iterator[Path]:
    """Make ``folder`` this run's report folder, before any work: created, writable, and not being
    written by another run at the same time (two runs into one folder would silently replace each
    other's report). The claim is a lock file naming the run; one left by a run that died is taken
    over. Errors are ParityInputErrors naming the folder."""
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise ParityInputError(f"report folder {path} exists and is not a folder")
    # The folders this claim creates, innermost first: removed again if the run ends without a report
    # in them (bad input found once the backends are built leaves nothing behind either).
    created = [p for p in [path, *path.parents] if not p.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ParityInputError(f"report folder {path} cannot be created ({exc.strerror or exc})") from None
    for name in (JSON_NAME, MARKDOWN_NAME, HTML_NAME, STATS_NAME):
        if (path / name).exists() and not (path / name).is_file():
            raise ParityInputError(f"report folder {path}: {name} is a folder; the report cannot be written")
    lock = path / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _lock_owner(lock)
            same_host = owner.get("host") == me["host"]
            if same_host and isinstance(owner.get("pid"), int) and not _alive(owner["pid"]):
                lock.unlink(missing_ok=True)  # left by a run that died: take it over
                continue
            if not owner:
                raise ParityInputError(
                    f"report folder {path}: its lock file {lock} does not say which run holds it (it is not a "
                    f"JSON object naming a pid and host); if no run is writing there, delete {lock}"
                ) from None
            raise ParityInputError(
                f"report folder {path} is being written by another run (pid {owner.get('pid', '?')} on "
                f"{owner.get('host', '?')}, since {owner.get('started', '?')}); wait for it to finish or "
                f"choose another report folder (if no run is going on, delete {lock})"
            ) from None
        except OSError as exc:
            why = "not writable" if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else exc.strerror
            raise ParityInputError(f"report folder {path} is {why}") from None
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(me))
        break
    else:
        raise ParityInputError(f"report folder {path}: its lock {lock} cannot be taken")
    try:
        yield path
    finally:
        lock.unlink(missing_ok=True)
        for made in created:
            try:
                made.rmdir()  # only when empty: a report written there keeps it
            except OSError:
                break


def _save_statistics(result: ParityResult, path: Path) -> None:
    arrays = {
        f"{backend}|{tap}|{stat}": values
        for backend, per_tap in result.statistics.items()
        for tap, per_stat in per_tap.items()
        for stat, values in per_stat.items()
    }
    with open(path, "wb") as fh:
        members: dict[str, Any] = dict(arrays)
        np.savez(fh, **members)


def write_statistics(result: ParityResult, path: Path) -> None:
    """One array per backend, tap and statistic, stored uncompressed: each holds a few patches'
    values, and compressing thousands of them doubled the time to write (0.22 against 0.11 s for the
    default config's gradient report) for a file 30 % smaller (1.9 against 2.7 MB)."""
    with atomic_path(path) as tmp:
        _save_statistics(result, tmp)


def write_reports(
    result: ParityResult, folder: str | Path, *, html: bool = True, all_taps: bool = False
) -> dict[str, Path]:
    """Write every report format into ``folder`` as one set; returns their paths.

    The files are one report (report.json names the others, and readers look at it first), so a
    folder must never hold files of two runs: each is written to a temporary first, the slow part
    (the HTML takes seconds), where an interrupt or an error leaves the earlier report as it was.
    Then the temporaries replace the earlier files in a fixed order, report.json last, with a Ctrl-C
    held for those few renames and a failing one undone (:func:`parity.atomic.staged`), and the
    earlier report's file this run does not write (report.html after ``--no-html``) is removed with
    them. After a run, completed or interrupted, the folder holds the whole old report or the whole
    new one.
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / JSON_NAME, "markdown": out / MARKDOWN_NAME, "statistics": out / STATS_NAME}
    if html:
        paths["html"] = out / HTML_NAME
    doc = to_json_dict(result)
    with staged(remove=[] if html else [out / HTML_NAME]) as stage:
        _save_statistics(result, stage(paths["statistics"]))
        stage(paths["markdown"]).write_text(to_markdown(result), encoding="utf-8")
        if html:
            from parity.report_html import to_html

            stage(paths["html"]).write_text(to_html(result, all_taps=all_taps, data=doc), encoding="utf-8")
        stage(paths["json"]).write_text(json_text(doc), encoding="utf-8")
    return paths


def failing_taps(result: ParityResult) -> Sequence[TapResult]:
    baseline = _baseline_by_tap(result)
    return [t for t in result.taps if not t.passed or any(not c.passed for c in baseline.get(t.name, []))]

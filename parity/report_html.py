"""HTML report: for each failing tap (or every tap on request) the patches of every backend side by
side with their difference from the reference, and a histogram of elementwise errors.

Pictures are PNGs rendered by matplotlib's Agg canvas and embedded as data URIs, so the report is a
single self-contained file that CI can upload as an artifact. Figures are ``matplotlib.figure.Figure``
objects drawn on their own canvas: pyplot and its global backend are never touched, because this
module runs inside users' pytest sessions, where other tests may depend on them.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping
from typing import Any

import numpy as np

from parity.compare import HIST_EDGES
from parity.report import failing_taps, to_json_dict
from parity.runner import ParityResult, TapResult, statistics_summary

CHANNELS_SHOWN = 4


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=72, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _as_image(arr: np.ndarray) -> np.ndarray:
    a = np.asarray(arr)
    return np.abs(a) if np.iscomplexobj(a) else a.astype(np.float64)


def _patch_grid(result: ParityResult, tap: TapResult) -> str | None:
    sides = [b for b in result.samples if tap.name in result.samples[b]]
    if not sides:
        return None
    ref = result.reference if result.reference in sides else sides[0]
    first = result.samples[ref][tap.name]
    if first.ndim < 3 or first.shape[-1] < 2 or first.shape[-2] < 2:
        return None  # scalars and offsets: nothing to picture
    channels = min(CHANNELS_SHOWN, first.shape[1]) if first.ndim == 4 else 1
    rows = [(b, _as_image(result.samples[b][tap.name])) for b in sides]
    diffs = [
        (f"|{b} − {ref}|", np.abs(result.samples[b][tap.name] - result.samples[ref][tap.name]))
        for b in sides
        if b != ref and result.samples[b][tap.name].shape == first.shape
    ]
    all_rows = rows + [(n, np.asarray(d, dtype=np.float64)) for n, d in diffs]
    fig = _figure(2.2 * channels, 2.2 * len(all_rows))
    axes = fig.subplots(len(all_rows), channels, squeeze=False)
    for r, (label, data) in enumerate(all_rows):
        for c in range(channels):
            img = data[0, c] if data.ndim == 4 else data[0]
            ax = axes[r][c]
            im = ax.imshow(img, cmap="magma" if r >= len(rows) else "viridis")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
            if r == 0:
                ax.set_title(f"channel {c}", fontsize=8)
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    fig.suptitle(f"{tap.name}: group 0" + (" (amplitude)" if tap.complex else ""), fontsize=9)
    return _png(fig)


def _histogram(tap: TapResult) -> str | None:
    comps = [c for c in tap.comparisons if c.histogram and sum(c.histogram)]
    if not comps:
        return None
    fig = _figure(6, 2.6)
    ax = fig.subplots()
    centres = HIST_EDGES / 2  # left edge of each bin
    for c in comps:
        ax.step(centres, c.histogram, where="post", label=f"{c.a} vs {c.b}")
        ax.axvline(c.atol if c.atol > 0 else HIST_EDGES[0], linestyle=":", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("|a − b| (dotted: atol at the worst element)")
    ax.set_ylabel("elements")
    ax.legend(fontsize=7)
    return _png(fig)


def _table(rows: list[list[str]], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def to_html(result: ParityResult, all_taps: bool = False, data: Mapping[str, Any] | None = None) -> str:
    """``data``: ``to_json_dict(result)``, when the caller has built it already (``write_reports``)."""
    data = to_json_dict(result) if data is None else data
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>ptycho-parity report</title>",
        "<style>body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;font-size:12px}"
        "td,th{border:1px solid #ccc;padding:2px 6px}.fail{color:#b00}.pass{color:#070}</style></head><body>",
        f"<h1>ptycho-parity: <span class='{'pass' if result.passed else 'fail'}'>{esc(result.verdict)}</span></h1>",
    ]
    fd = result.first_divergence
    if fd:
        parts.append(
            f"<p><b>First diverging tap:</b> <code>{esc(fd['tap'])}</code>; off the reference: "
            f"<b>{esc(', '.join(fd['blamed']) or 'undetermined')}</b></p><ul>"
            + "".join(f"<li>{esc(s)}</li>" for s in fd["comparisons"])
            + "</ul>"
        )
    local = result.first_local_divergence
    if local:
        how = (
            "the reference run on that backend's inputs"
            if result.first_local_recomputed
            else "fed the reference's inputs"
        )
        parts.append(
            f"<p><b>First stage that computes differently</b> ({how}): "
            f"<code>{esc(str(local['stage']))}</code> at <code>{esc(local['tap'])}</code> "
            f"({esc(', '.join(local['backends']))})</p>"
        )
    if result.local_unsupported:
        parts.append(f"<p>End-to-end parity only for {esc(', '.join(result.local_unsupported))}.</p>")
    if result.local_recomputed:
        parts.append(
            f"<p>Layer-local parity of {esc(', '.join(result.local_recomputed))} (they cannot run a stage alone): "
            "the reference ran each stage on their own inputs to it.</p>"
        )
    if result.config_diff:
        rows = [[esc(k)] + [esc(repr(v.get(b))) for b in result.backends] for k, v in result.config_diff.items()]
        parts.append("<h2>Config differences</h2>" + _table(rows, ["key", *result.backends]))
    parts.append(
        f"<p>Rule: <code>{esc(result.rule)}</code>. Tolerances: <code>{esc(result.tolerance_source)}</code>"
        f" (profile {esc(result.tolerance_profile)}).</p>"
    )
    if result.fixture:
        parts.append(
            f"<p>Fixture <code>{esc(str(result.fixture.get('path')))}</code> sha256 "
            f"<code>{esc(str(result.fixture.get('sha256')))}</code>; weights sha256 "
            f"<code>{esc(str(result.weights_sha256))}</code></p>"
        )
    env_rows = [
        [
            esc(n),
            "yes" if b["available"] else f"no: {esc(str(b['reason']))}",
            esc(", ".join(f"{k}={v}" for k, v in sorted(b["environment"].items()))),
        ]
        for n, b in data["backends"].items()
    ]
    parts.append("<h2>Backends</h2>" + _table(env_rows, ["backend", "available", "environment"]))
    rows = []
    for t in data["taps"]:
        cells = "<br>".join(
            f"<span class='{'pass' if c['passed'] else 'fail'}'>{esc(c['a'])} "
            + ("locally" if c["kind"] == "local_vs_reference" else "vs " + esc(c["b"]))
            + ": "
            + (
                esc(str(c["reason"]))
                if c.get("reason")
                else f"max_abs {c['max_abs']:.3g}"
                if isinstance(c["max_abs"], float)
                else esc(str(c["max_abs"]))
            )
            + "</span>"
            for c in [*t["comparisons"], *t["local"]]
        )
        rows.append([f"<code>{esc(t['name'])}</code>", esc(str(t["shape"])), cells])
    parts.append("<h2>Taps</h2>" + _table(rows, ["tap", "shape", "comparisons"]))
    shown = result.taps if all_taps else failing_taps(result)
    parts.append(f"<h2>{'All taps' if all_taps else 'Failing taps'}</h2>")
    if not shown:
        parts.append("<p>None.</p>")
    for t in shown:
        parts.append(f"<h3><code>{esc(t.name)}</code></h3>")
        summ = statistics_summary(result, t.name)
        if summ:
            stats = list(next(iter(summ.values())))
            srows = [[esc(s)] + [f"{summ[b][s]['mean']:.6g}" if s in summ[b] else "" for b in summ] for s in stats]
            parts.append(_table(srows, ["statistic (mean over patches)", *summ]))
        for uri in (_patch_grid(result, t), _histogram(t)):
            if uri:
                parts.append(f"<p><img src='{uri}'></p>")
    parts.append("</body></html>")
    return "\n".join(parts)

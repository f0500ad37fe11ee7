"""The parity run: identical batches through every backend, taps compared as they stream past.

This module knows nothing about frameworks: it drives :class:`parity.Backend` objects and compares
the NumPy arrays they return. Effective configurations are diffed before any forward pass; tap
presence and shapes are checked against the expected tap list, so a missing branch is reported where
it goes missing; every tap is compared backend vs reference and backend vs backend; statistics are
accumulated per backend. Only statistics and a few sample patches from the first batch are kept, so
memory does not grow with the number of batches.
"""

from __future__ import annotations

import functools
import itertools
import math
import traceback
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from parity.backend import Backend
from parity.batch import CanonicalBatch
from parity.compare import RULE, ComparisonResult, ElementwiseComparison
from parity.config import config_diff
from parity.deviations import NOT_REPRODUCED, Deviation, DeviationLedger
from parity.errors import ParityInputError
from parity.interrupt import check as check_interrupt
from parity.stages import Stage
from parity.stats import StatsAccumulator, summarise
from parity.taps import GRAD, TapSelection, TapSpec
from parity.tolerances import ConfigLike, Tolerances, config_values, magnitude_scale
from parity.verdict import decide

_MISSING = "tap missing from "
INPUT_PREFIX = "input."
SAMPLES_KEPT = 2  # groups of the first batch kept per tap for the HTML report's patch grids


@dataclass
class BackendRecord:
    name: str
    available: bool
    reason: str | None = None
    precision: str | None = None
    environment: dict[str, Any] = field(default_factory=dict)
    effective_config: dict[str, Any] = field(default_factory=dict)
    crashed: str | None = None  # the traceback, when the backend raised while it ran


@dataclass
class TapResult:
    name: str
    shapes: dict[str, list[int] | None]
    expected_shape: list[int] | None
    complex: bool
    comparisons: list[ComparisonResult]
    scale: str = "magnitude"  # "model": tolerances from the arbiter's error scales; "magnitude": fallback
    not_exposed: list[str] = field(default_factory=list)  # backends that declare they do not expose it
    window: list[int] | None = None  # (H, W) compared, when sides differ by a declared config key
    # Layer-local parity: each backend's stage fed the reference's inputs, against the reference.
    stage: str | None = None
    local: list[ComparisonResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """No failure other than declared ones (a tap nobody could compare has not failed)."""
        return all(c.passed or c.known is not None for c in [*self.comparisons, *self.local])

    @property
    def status(self) -> str:
        """pass | fail | known (every failure declared) | not exposed (nothing to compare it with)."""
        if not self.passed:
            return "fail"
        if any(not c.passed for c in [*self.comparisons, *self.local]):
            return "known"
        if self.not_exposed and not self.comparisons:
            return "not exposed"
        return "pass"


@dataclass
class ParityResult:
    """Everything a report needs; the JSON/Markdown/HTML writers read only this."""

    verdict: str  # decided by parity.verdict.decide: "pass" | "fail" | "config_mismatch" | "error"
    backends: dict[str, BackendRecord]
    reference: str | None
    config: dict[str, Any] | None
    config_diff: dict[str, dict[str, Any]]  # undeclared differences: they stop the run
    taps: list[TapResult] = field(default_factory=list)
    declared_config_diff: dict[str, dict[str, Any]] = field(default_factory=dict)
    deviations: list[dict[str, Any]] = field(default_factory=list)  # DeviationLedger.report()
    first_divergence: dict[str, Any] | None = None
    # The first stage whose own computation differs (layer-local parity), and the backends that
    # could not run stages alone (end-to-end parity only for them).
    first_local_divergence: dict[str, Any] | None = None
    local_unsupported: list[str] = field(default_factory=list)
    # Backends that cannot run a stage alone, checked stage by stage the other way round: the
    # reference ran each stage on that backend's own inputs to it (``_recompute_stages``).
    local_recomputed: list[str] = field(default_factory=list)
    # Gradient parity (``gradients=True``): whether it ran, and the backends that cannot compute
    # gradients (compared on the forward taps only).
    gradients: bool = False
    gradients_unsupported: list[str] = field(default_factory=list)
    fixture: dict[str, Any] | None = None
    weights_sha256: str | None = None
    tolerance_source: str = ""
    tolerance_profile: str = ""
    rule: str = RULE
    batches: int = 0
    groups: int = 0
    statistics: dict[str, dict[str, dict[str, np.ndarray]]] = field(default_factory=dict)
    # Per backend, tap and statistic: how far each statistic may move against a baseline.
    statistic_tolerances: dict[str, dict[str, dict[str, np.ndarray]]] = field(default_factory=dict)
    blame_ratio: float = 1.0
    samples: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    baseline: list[ComparisonResult] = field(default_factory=list)
    baseline_notes: list[str] = field(default_factory=list)
    # Baselines that could not be compared (missing, stale, unreadable): each one fails the verdict.
    baseline_problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.verdict == "pass"

    @property
    def first_local_recomputed(self) -> bool:
        """Whether the first local divergence is of backends whose stages the reference ran on their
        own inputs (they cannot run a stage alone), not backends fed the reference's inputs."""
        local = self.first_local_divergence
        return local is not None and set(local["backends"]) <= set(self.local_recomputed)

    @property
    def compared_nothing(self) -> bool:
        """No element of any tap was compared with another side, and no statistic with a baseline:
        one backend ran (the others unavailable or not named) and no baseline was checked. Such a run
        has checked nothing, so it must not pass."""
        compared = any(c.numel or c.reason for t in self.taps for c in [*t.comparisons, *t.local])
        return not compared and not self.baseline and not self.baseline_problems

    def why_nothing_compared(self) -> str:
        """Which backends ran and which could not, and what a run needs to compare something."""
        ran = [n for n, r in self.backends.items() if r.available and not r.crashed]
        return (
            f"{', '.join(ran) or 'no backend'} ran"
            + "".join(f", {n} unavailable ({r.reason})" for n, r in self.backends.items() if not r.available)
            + "; compare two backends (a float64 reference and one to check), or check statistics against baselines"
        )

    def failures(self) -> list[ComparisonResult]:
        out = [c for t in self.taps for c in [*t.comparisons, *t.local] if not c.passed and c.known is None]
        return out + [c for c in self.baseline if not c.passed]

    def stale_deviations(self) -> list[dict[str, Any]]:
        """Declared deviations whose backend ran but whose difference did not show."""
        return [d for d in self.deviations if d["status"] == NOT_REPRODUCED]

    def describe_failure(self, limit: int = 8) -> str:
        """Human-readable summary for assertion messages and the CLI."""
        crashed = [r for r in self.backends.values() if r.crashed]
        if crashed:
            lines = []
            for r in crashed:
                last = (r.crashed or "").strip().splitlines()[-1:]
                lines.append(f"backend {r.name} crashed: {last[0] if last else '?'} (traceback in the report)")
            rest = self.describe_divergence(limit)
            return "\n".join(lines + ([rest] if rest else []))
        return self.describe_divergence(limit)

    def describe_divergence(self, limit: int = 8) -> str:
        if self.verdict == "config_mismatch":
            lines = ["effective configs differ between backends (no forward pass was run):"]
            lines += [
                f"  {k}: " + ", ".join(f"{b}={v!r}" for b, v in vals.items()) for k, vals in self.config_diff.items()
            ]
            return "\n".join(lines)
        fd = self.first_divergence
        lines = [f"nothing was compared: {self.why_nothing_compared()}"] if self.compared_nothing else []
        lines += [
            "declared deviation not reproduced (remove it, or find what hides it): "
            + (f"config key {d['config_key']!r}" if d["config_key"] else f"tap {d['tap']!r}")
            + f" of {d['backend']} ({d['source']})"
            for d in self.stale_deviations()
        ]
        if fd:
            blamed = ", ".join(fd["blamed"]) or (
                "undetermined (no reference to arbitrate)" if self.reference is None else "none singled out"
            )
            lines.append(
                f"first diverging tap: {fd['tap']} (backends: {', '.join(fd['backends'])}; off the reference: {blamed})"
            )
            lines += ["  note: " + n for n in fd.get("notes", [])]
        local = self.first_local_divergence
        if local:
            how = (
                "the reference run on that backend's inputs to it"
                if self.first_local_recomputed
                else "fed the reference's inputs"
            )
            lines.append(
                f"first stage that computes differently ({how}): {local['stage']}, "
                f"at {local['tap']} ({', '.join(local['backends'])})"
            )
        if self.local_unsupported:
            lines.append(f"  end-to-end parity only (cannot run stages alone): {', '.join(self.local_unsupported)}")
        if self.local_recomputed:
            lines.append(
                "  layer-local parity by the reference running each stage on the backend's own inputs "
                f"(it cannot run stages alone): {', '.join(self.local_recomputed)}"
            )
        if self.gradients_unsupported:
            lines.append(f"  forward parity only (no gradients): {', '.join(self.gradients_unsupported)}")
        fails = self.failures()
        lines += ["  " + c.summary() for c in fails[:limit]]
        if len(fails) > limit:
            lines.append(f"  ... and {len(fails) - limit} more failing comparisons (see the report)")
        lines += ["  " + n for n in self.baseline_notes]
        return "\n".join(lines)


def _tap_order(
    expected: Sequence[TapSpec] | None, outputs: Mapping[str, Mapping[str, np.ndarray]], ref: str | None
) -> list[str]:
    order: list[str] = [s.name for s in expected] if expected is not None else []
    sources = ([ref] if ref is not None and ref in outputs else []) + [n for n in outputs if n != ref]
    for name in sources:
        for tap in outputs[name]:
            if tap not in order:
                order.append(tap)
    return order


def run_parity(
    backends: Mapping[str, Backend],
    batches: Iterable[Any],
    tolerances: Tolerances,
    *,
    config: ConfigLike = None,
    expected: Callable[[int], Sequence[TapSpec]] | None = None,
    reference: str | None = None,
    scale_source: Backend | None = None,
    unavailable: Mapping[str, str] | None = None,
    crashed: Mapping[str, str] | None = None,
    taps: Collection[str] | None = None,
    stages: Sequence[Stage] = (),
    deviations: Sequence[Deviation] = (),
    fixture: Mapping[str, Any] | None = None,
    weights_sha256: str | None = None,
    progress: Callable[[Iterable[Any]], Iterable[Any]] | None = None,
    gradients: bool = False,
) -> ParityResult:
    """Run every batch through every backend and compare; see the module docstring.

    ``expected(batch_size)`` gives the tap list every backend must produce (PtychoPINN:
    ``lambda b: tap_specs(config, b)``); ``reference`` names the float64 arbiter, if any;
    ``scale_source`` is the backend whose ``error_scales`` set the tolerances (default: the
    reference; PtychoPINN runs without a reference pass one that is not compared); ``taps``
    (shell-style patterns, ``!pattern`` to exclude) restricts the comparison to matching taps;
    ``stages`` (``parity.stages``) turn on layer-local parity: every backend that can runs each
    stage on the reference's inputs to it, compared with the reference's outputs under the error
    model's local scales; ``deviations`` are the declared, accepted differences (``parity.deviations``).
    ``gradients``: every backend that can (``Backend.computes_gradients``) also returns its gradient
    taps (``parity.taps.gradient_tap_specs``), which are compared like any other tap after the
    forward taps, in backward order; the others are compared on the forward taps only.
    """
    if reference is not None and reference not in backends and reference not in (unavailable or {}):
        raise ParityInputError(
            f"reference backend {reference!r} is not among the backends ({', '.join(backends) or 'none'})"
        )
    if expected is not None:
        for first in expected(1):
            tolerances.family(first.name)  # every tap needs a tolerance family, checked before any work
    records: dict[str, BackendRecord] = {
        name: BackendRecord(name, False, reason) for name, reason in (unavailable or {}).items()
    }
    for name, trace in (crashed or {}).items():
        records[name] = BackendRecord(name, True, None, crashed=trace)
    backends = dict(backends)
    exposed: dict[str, frozenset[str] | None] = {}
    for name, be in list(backends.items()):
        try:
            records[name] = BackendRecord(name, True, None, be.precision, be.environment(), be.effective_config())
            listed = be.exposed_taps()
            exposed[name] = None if listed is None else frozenset(listed)
        except ParityInputError:
            raise
        except Exception:
            check_interrupt()
            records[name] = BackendRecord(name, True, None, be.precision, crashed=traceback.format_exc())
            del backends[name]
    ledger = DeviationLedger(list(deviations), list(backends))
    undeclared, declared = ledger.split_config_diff(
        config_diff({n: r.effective_config for n, r in records.items() if r.available and not r.crashed}),
        reference if reference in backends else None,
    )
    ref = reference if reference in backends else None
    if ref is not None and backends[ref].precision != "float64":
        raise ParityInputError(
            f"reference backend {ref!r} computes in {backends[ref].precision}; the arbiter must be float64 "
            "(its tolerances are float32's against float64 values): name a float64 backend, or none "
            "(--reference '') to compare the backends pairwise"
        )
    scaler = scale_source if scale_source is not None else (backends[ref] if ref is not None else None)
    result = ParityResult(
        verdict="pass",
        backends=records,
        reference=ref,
        config=dict(config_values(config)) if config is not None else None,
        config_diff=undeclared,
        declared_config_diff=declared,
        fixture=dict(fixture) if fixture else None,
        weights_sha256=weights_sha256,
        tolerance_source=tolerances.source,
        tolerance_profile=tolerances.profile,
        rule=tolerances.rule(),
        blame_ratio=tolerances.blame_ratio,
        gradients=gradients,
    )
    if result.config_diff:
        result.deviations = ledger.report(())
        result.verdict = decide(result)
        return result

    others = [n for n in backends if n != ref]
    pairs = list(itertools.combinations(others, 2))
    comps: dict[tuple[str, str, str], ElementwiseComparison] = {}
    structure: dict[tuple[str, str], ElementwiseComparison] = {}
    stats = {n: StatsAccumulator() for n in backends}
    order: list[str] = []
    spec_by_name: dict[str, TapSpec] = {}
    shapes: dict[str, dict[str, list[int] | None]] = {}
    rows = 0
    scaled_taps: set[str] = set()
    not_exposed: dict[str, list[str]] = {}
    windows: dict[str, list[int]] = {}
    local_comps: dict[tuple[str, str], ElementwiseComparison] = {}
    stage_by_tap = {t: st.name for st in stages for t in st.outputs}
    local_unsupported: list[str] = []
    local_recomputed: list[str] = []
    no_gradients = [n for n, be in backends.items() if gradients and not be.computes_gradients]

    def local_comparison(tap: str, a: str) -> ElementwiseComparison:
        key = (tap, a)
        if key not in local_comps:
            rtol = tolerances.rtol(backends[a].precision)
            local_comps[key] = ElementwiseComparison(
                "local_vs_reference", tap, a, ref or "", 0.0, rtol, factor=tolerances.factor(tap)
            )
        return local_comps[key]

    def comparison(kind: str, tap: str, a: str, b: str) -> ElementwiseComparison:
        key = (tap, a, b)
        if key not in comps:
            rtol = tolerances.rtol(backends[a].precision)
            comps[key] = ElementwiseComparison(kind, tap, a, b, 0.0, rtol, factor=tolerances.factor(tap))
        return comps[key]

    def structure_failure(tap: str, name: str, why: str) -> None:
        structure.setdefault((tap, name), ElementwiseComparison("structure", tap, name, "spec", 0, 0)).fail(why)

    iterator = progress(batches) if progress else batches
    specs: list[TapSpec] | None = None  # the expected taps of the batch at hand
    # Taps whose leading axis is not the batch's (the probe, the weights' gradients): the tap list
    # says it, where there is one, by the same shape for batches of one group and of two.
    unbatched: frozenset[str] | None = None
    if expected is not None:
        of_two = {s.name: s.shape[:1] for s in expected(2)}
        unbatched = frozenset(s.name for s in expected(1) if of_two.get(s.name) == s.shape[:1])

    def _batched(tap: str, values: np.ndarray, size: int) -> bool:
        if unbatched is not None and (tap in unbatched or tap in of_two):
            return tap not in unbatched
        return values.ndim > 0 and values.shape[0] == size

    selection = TapSelection.parse(list(taps)) if taps else None

    def selected(name: str) -> bool:
        return selection is None or selection(name)

    def hidden(name: str, tap: str) -> bool:
        if name in no_gradients and tap.startswith(GRAD + "."):
            return True
        listed = exposed.get(name)
        return listed is not None and tap not in listed

    def windowed(spec: TapSpec | None, shape: tuple[int, ...], is_complex: bool) -> bool:
        """A shape that differs from the spec only in a centred (H, W) set by a declared config key."""
        if spec is None or spec.follows not in declared or is_complex != spec.complex:
            return False
        want = spec.shape
        return (
            len(shape) == len(want)
            and shape[:-2] == want[:-2]
            and all(s >= 1 and (s - w) % 2 == 0 for s, w in zip(shape[-2:], want[-2:], strict=True))
        )

    for batch_index, batch in enumerate(iterator):
        raw: dict[str, Mapping[str, np.ndarray]] = {}
        for name, be in list(backends.items()):
            try:
                produced = _numpy_taps(name, "forward", be.forward(batch))
                if gradients and be.computes_gradients:
                    produced = {**produced, **_numpy_taps(name, "gradients", be.gradients(batch))}
                raw[name] = produced  # only once all of it is there: a crash in gradients drops the forward too
                check_interrupt()  # a Ctrl-C the backend's extensions swallowed (parity.interrupt)
            except ParityInputError:
                raise
            except Exception:
                # A backend that crashes is reported as failing, with its traceback; the others go on.
                check_interrupt()
                records[name].crashed = f"in batch {batch_index}:\n{traceback.format_exc()}"
                del backends[name]
                others = [n for n in others if n != name]
                pairs = [p for p in pairs if name not in p]
                for dropped in [k for k in comps if name in k[1:]]:
                    del comps[dropped]
                for gone in [k for k in structure if k[1] == name]:
                    del structure[gone]
                stats.pop(name, None)
        if ref is not None and ref not in backends:
            ref = None  # a crashed arbiter arbitrates nothing: pairs are still compared
        if ref is not None:
            check_arbiter(raw[ref], float32_sides=[n for n in backends if backends[n].precision != "float64"])
        if selection is not None and batch_index == 0:
            selection.check({t for out in raw.values() for t in out}, "what the backends produce")
        if scaler is not None and (ref is not None or scale_source is not None):
            own = raw[ref] if ref is not None and scaler is backends[ref] else scaler.forward(batch)
            if gradients and scaler.computes_gradients and not (ref is not None and scaler is backends[ref]):
                own = {**own, **scaler.gradients(batch)}
            own_scales = scaler.error_scales(batch, dict(own))
            scales = {t: np.asarray(v) for t, v in own_scales.items() if selected(t)}
            check_error_scales(scales, _scaler_name(scaler, backends))
            scales = tolerances.floored_scales(scales)
        else:
            scales = {}
        size = _batch_size(batch, raw)
        specs = [s for s in expected(size) if selected(s.name)] if expected else None
        spec_by_name = {s.name: s for s in specs} if specs else {}
        if stages and ref is not None:
            staged = any(backends[n].runs_stages for n in others)  # only they read the reference's local scales
            local_scales = scaler.local_error_scales(batch, dict(own)) if staged and scaler is backends[ref] else {}
            check_error_scales(local_scales, f"backend {ref!r}", "a local error scale")
            local_scales = tolerances.floored_scales(local_scales)
            for name in others:
                if not backends[name].runs_stages:
                    if scaler is not backends[ref] or not backends[ref].runs_stages:
                        if name not in local_unsupported:
                            local_unsupported.append(name)
                        continue
                    checked = _recompute_stages(
                        name,
                        backends[name].precision,
                        raw[name],
                        backends[ref],
                        batch,
                        stages,
                        raw[ref],
                        tolerances,
                        selected,
                        local_comparison,
                    )
                    listed = local_recomputed if checked else local_unsupported
                    if name not in listed:
                        listed.append(name)
                    continue
                _run_stages(
                    name,
                    backends[name],
                    stages,
                    raw[ref],
                    local_scales,
                    tolerances,
                    selected,
                    local_comparison,
                    functools.partial(_windowed_tap, windowed, spec_by_name),
                )
        outputs = {name: {t: v for t, v in out.items() if selected(t)} for name, out in raw.items()}
        del raw
        bounds: dict[str, dict[str, dict[str, np.ndarray]]] = {n: {} for n in backends}
        patch_stats: dict[str, dict[str, dict[str, np.ndarray]]] = {n: {} for n in backends}
        for tap in _tap_order(specs, outputs, ref):
            if tap not in order:
                order.append(tap)
            shapes.setdefault(tap, {n: None for n in backends})
            for name, produced_taps in outputs.items():
                arr = produced_taps.get(tap)
                if arr is None:
                    if hidden(name, tap):
                        if name not in not_exposed.setdefault(tap, []):
                            not_exposed[tap].append(name)
                    elif specs is None or tap in spec_by_name:  # an unlisted tap is its producer's failure
                        structure_failure(tap, name, f"{_MISSING}{name}")
                    continue
                shapes[tap][name] = list(arr.shape)
                if arr.size == 0:
                    structure_failure(
                        tap, name, f"{name} gives an empty tap, shape {tuple(arr.shape)}: nothing to compare"
                    )
                spec = spec_by_name.get(tap)
                if spec is not None:
                    want = spec.shape
                    if tuple(arr.shape) != want and windowed(spec, tuple(arr.shape), np.iscomplexobj(arr)):
                        pass  # compared on the common window below
                    elif tuple(arr.shape) != want or np.iscomplexobj(arr) != spec.complex:
                        got = f"shape {tuple(arr.shape)}{' complex' if np.iscomplexobj(arr) else ''}"
                        wanted = f"shape {want}{' complex' if spec.complex else ''}"
                        structure_failure(tap, name, f"{name} gives {got}; expected {wanted}")
                elif specs is not None:
                    structure_failure(tap, name, f"{name} gives tap {tap!r}, which is not in the expected tap list")
            present = {n: outputs[n][tap] for n in outputs if tap in outputs[n]}
            scale = scales.get(tap)
            if scale is not None:
                scaled_taps.add(tap)
            sides = [(o, ref, "vs_reference") for o in others if ref is not None] + [
                (b, a, "backend_vs_backend") for a, b in pairs
            ]
            for a, b, kind in sides:
                assert b is not None
                if a not in present or b not in present:
                    missing = a if a not in present else b
                    if not hidden(missing, tap) and (specs is None or tap in spec_by_name):
                        comparison(kind, tap, a, b).fail(f"{_MISSING}{missing}")
                    continue
                acc = comparison(kind, tap, a, b)
                xa, xb = present[a], present[b]
                s = _fitting_scale(scale, xb)
                if xa.shape != xb.shape and windowed(spec_by_name.get(tap), xa.shape, np.iscomplexobj(xa)):
                    xa, xb = _centred_common(xa, xb)
                    if scale is not None and scale.ndim == xa.ndim and scale.shape[:-2] == xa.shape[:-2]:
                        s = _centred_common(scale, xa)[0]
                    else:
                        s = magnitude_scale(xb)
                    windows[tap] = list(xa.shape[-2:])
                per_scale = tolerances.atol_per_scale(
                    tap, pair=kind == "backend_vs_backend", precision=backends[a].precision
                )
                acc.add(xa, xb, s, times=per_scale, batched=_batched(tap, xa, size))
            for n, arr in present.items():
                if arr.size == 0:  # failed above; a patch statistic of nothing is not a number
                    del outputs[n][tap]
                    continue
                s = _fitting_scale(scale, arr)
                patch_stats[n][tap], bounds[n][tap] = tolerances.statistics_with_tolerances(
                    tap, arr, s, backends[n].precision
                )
            if batch_index == 0:
                for n, arr in present.items():
                    result.samples.setdefault(n, {})[tap] = np.array(arr[:SAMPLES_KEPT] if np.ndim(arr) else arr)
        for name, produced_taps in outputs.items():
            stats[name].add(produced_taps, bounds[name], statistics=patch_stats[name])
        rows += size
        result.batches += 1
    result.groups = rows
    if result.batches:  # no batch at all compared nothing, which the verdict says
        _fail_backends_that_computed_nothing(
            backends, order, shapes, structure_failure, selection, [s.name for s in specs or ()], exposed
        )

    for tap in order:
        spec = spec_by_name.get(tap)
        tap_comps = [c.finish() for (t, _), c in structure.items() if t == tap]
        tap_comps += [c.finish() for (t, _, _), c in comps.items() if t == tap]
        result.taps.append(
            TapResult(
                name=tap,
                shapes=shapes.get(tap, {}),
                expected_shape=list(spec.shape) if spec else None,
                complex=bool(spec.complex)
                if spec
                else any(np.iscomplexobj(s[tap]) for s in result.samples.values() if tap in s),
                comparisons=tap_comps,
                scale="model" if tap in scaled_taps else "magnitude",
                not_exposed=not_exposed.get(tap, []),
                window=windows.get(tap),
                stage=stage_by_tap.get(tap),
                local=[c.finish() for (t, n), c in local_comps.items() if t == tap and n in backends],
            )
        )
    for t in result.taps:
        for c in [*t.comparisons, *t.local]:
            if c.passed:
                continue
            declaration = next((d for side in (c.a, c.b) if (d := ledger.declared_tap(t.name, side))), None)
            if declaration is not None:
                c.known = declaration.describe()
                ledger.mark_tap(declaration, f"{t.name}: {c.kind} {c.a} vs {c.b}")
    result.deviations = ledger.report(order)
    result.statistics = {n: acc.result() for n, acc in stats.items()}
    result.statistic_tolerances = {n: acc.bounds() for n, acc in stats.items()}
    result.reference = ref
    result.first_divergence = _first_divergence(result.taps, ref, tolerances.blame_ratio)
    result.first_local_divergence = _first_local_divergence(result.taps)
    result.local_unsupported = [n for n in local_unsupported if n in backends]
    result.local_recomputed = [n for n in local_recomputed if n in backends]
    result.gradients_unsupported = [n for n in no_gradients if n in backends]
    result.verdict = decide(result)
    return result


FLOAT32_MAX = float(np.finfo(np.float32).max)


class ArbiterOutOfRangeError(ParityInputError):
    """The float64 reference produced what no float32 comparison can be made against: NaN or Inf
    from finite inputs, or values beyond float32's range. The run is invalid input, not a pass."""

    def __init__(self, tap: str, what: str) -> None:
        super().__init__(what)
        self.tap = tap


def check_arbiter(taps: Mapping[str, np.ndarray], float32_sides: Sequence[str] = ()) -> None:
    """Refuse a batch the arbiter cannot judge (see :class:`ArbiterOutOfRangeError`).

    NaN at the same place on two sides counts as agreement in a comparison; that must never turn a
    run whose reference itself went non-finite into a pass.
    """
    for name, values in taps.items():
        arr = np.asarray(values)
        if arr.dtype.kind not in "fc" or arr.size == 0:
            continue
        # Two passes and no temporary for a real tap: NaN propagates through min and max, and a
        # complex value with a non-finite part has a non-finite modulus.
        modulus = np.abs(arr) if arr.dtype.kind == "c" else arr
        lo, hi = float(np.min(modulus)), float(np.max(modulus))
        if not (math.isfinite(lo) and math.isfinite(hi)):
            where = tuple(int(i) for i in np.argwhere(~np.isfinite(arr))[0])
            if name.startswith("input."):
                raise ArbiterOutOfRangeError(
                    name, f"the batch holds NaN or Inf at {name}{list(where)}: the inputs themselves are out of range"
                )
            raise ArbiterOutOfRangeError(
                name,
                f"the float64 reference produced NaN or Inf at {name}{list(where)} (first tap in order of "
                "computation) from finite inputs: the config or the weights drive the model out of range",
            )
        if float32_sides and not name.startswith("input."):
            peak = max(-lo, hi)
            if peak > FLOAT32_MAX:
                raise ArbiterOutOfRangeError(
                    name,
                    f"the float64 reference reaches {peak:.3g} at {name}, beyond float32's range "
                    f"({FLOAT32_MAX:.3g}): {', '.join(float32_sides)} cannot represent it, so nothing can be compared",
                )


class InvalidErrorScaleError(ParityInputError):
    """An error scale that is NaN, infinite or negative somewhere. Each tolerance is factor·u·S_i, and
    no element fails under a NaN or infinite one: passing such scales on would make every difference
    at those elements pass, so the run stops instead."""


def check_error_scales(scales: Mapping[str, np.ndarray], source: str, what: str = "an error scale") -> None:
    """Refuse scales a tolerance cannot be made of (see :class:`InvalidErrorScaleError`): two
    reductions per tap, and a closer look only at a tap that fails them."""
    for tap, values in scales.items():
        arr = np.asarray(values)
        if arr.dtype.kind not in "fiu":
            raise InvalidErrorScaleError(
                f"{source} gave {what} of dtype {arr.dtype} for tap {tap!r}; it must be real (float)"
            )
        if arr.size == 0:
            continue
        lo, hi = float(np.min(arr)), float(np.max(arr))  # NaN propagates through both
        if lo >= 0.0 and hi < math.inf:
            continue
        nan, inf, negative = int(np.isnan(arr).sum()), int(np.isinf(arr).sum()), int((arr < 0).sum())
        where = tuple(int(i) for i in np.argwhere(~(np.isfinite(arr) & (arr >= 0)))[0])
        raise InvalidErrorScaleError(
            f"{source} gave {what} for tap {tap!r} with {nan} NaN, {inf} infinite and {negative} negative "
            f"of its {arr.size} elements (the first at {tap}{list(where)}); an error scale must be finite "
            "and >= 0: under a NaN or infinite one any difference passes"
        )


def _scaler_name(scaler: Backend, backends: Mapping[str, Backend]) -> str:
    """How an error message names the backend whose scales set the tolerances."""
    name = next((n for n, be in backends.items() if be is scaler), None)
    return f"backend {name!r}" if name is not None else f"the scale source ({type(scaler).__name__})"


def _fail_backends_that_computed_nothing(
    backends: Mapping[str, Backend],
    order: list[str],
    shapes: dict[str, dict[str, list[int] | None]],
    fail: Callable[[str, str, str], None],
    selection: TapSelection | None,
    expected: Sequence[str],
    exposed: Mapping[str, frozenset[str] | None],
) -> None:
    """A backend none of whose computed taps was compared fails, at the first computed tap.

    A tap a backend declares it does not expose (``exposed_taps``) is left out of its comparisons,
    not failed: so a wrapper whose tap list came out empty, or held the copied-through inputs alone,
    passed having checked nothing (until 2026-12-05). Inputs (``input.*``) are what the backend was
    given, not what it computes. A selection of input taps alone (``--taps 'input.*'``) asks for
    no computed tap, and gets this check of none."""
    if not backends:
        return  # every backend crashed: the verdict is already an error
    computed = [t for t in order if not t.startswith(INPUT_PREFIX)]
    asked = [t for t in expected if not t.startswith(INPUT_PREFIX) and (selection is None or selection(t))]
    if not computed and selection is not None and not asked:
        return
    if not computed:
        if not asked:
            raise ParityInputError("no backend gave a tap besides the inputs (input.*): nothing computed was compared")
        order.append(asked[0])
        shapes.setdefault(asked[0], {n: None for n in backends})
        computed = asked[:1]
    for name in backends:
        if any(shapes.get(t, {}).get(name) is not None for t in computed):
            continue
        listed = exposed.get(name)
        said = "its exposed_taps() lists none of them" if listed is not None else "its forward gave none of them"
        fail(
            computed[0],
            name,
            f"{name} gave no computed tap at all ({said}; inputs are not computed): nothing it computes was compared",
        )


def _numpy_taps(name: str, method: str, taps: Any) -> dict[str, np.ndarray]:
    """A backend's taps as the comparisons read them, or a TypeError that names the backend, the tap
    and what it is (raised inside the backend's run, so the backend is reported as crashed, with
    this as the reason). A tensor or a list would otherwise fail deep in a comparison, naming
    neither. NumPy scalars become 0-d arrays; numbers of any dtype kind pass on (a wrong dtype kind
    is a shape-and-kind failure at its tap)."""
    if not isinstance(taps, Mapping):
        raise TypeError(
            f"backend {name!r}: {method}() returned a {type(taps).__qualname__}, not a mapping of tap name to array"
        )
    out: dict[str, np.ndarray] = {}
    for tap, given in taps.items():
        value = np.asarray(given) if isinstance(given, np.generic) else given
        if not isinstance(value, np.ndarray):
            kind = f"{type(value).__module__}.{type(value).__qualname__}"
            raise TypeError(
                f"backend {name!r}: {method}() gave tap {tap!r} as a {kind}, not a NumPy array "
                "(convert on the way out: a torch tensor with .detach().cpu().numpy(), a TensorFlow one with .numpy())"
            )
        if value.dtype.kind not in "biufc":
            raise TypeError(
                f"backend {name!r}: {method}() gave tap {tap!r} of dtype {value.dtype}; a tap holds numbers"
            )
        out[tap] = value
    return out


def _batch_size(batch: Any, raw: Mapping[str, Mapping[str, Any]]) -> int:
    """The batch's number of groups: a canonical batch says it. For another kind (a custom
    backend's), the leading dimension most of the produced taps share: the first tap a backend
    happens to give may be one without a batch axis (the probe, a weight's gradient)."""
    if isinstance(batch, CanonicalBatch):
        return batch.size
    leading = Counter(int(np.shape(a)[0]) for out in raw.values() for a in out.values() if np.ndim(a))
    return leading.most_common(1)[0][0] if leading else 0


def _windowed_tap(
    windowed: Callable[[TapSpec | None, tuple[int, ...], bool], bool],
    specs: Mapping[str, TapSpec],
    tap: str,
    shape: tuple[int, ...],
    is_complex: bool,
) -> bool:
    return windowed(specs.get(tap), shape, is_complex)


def _as_precision(values: np.ndarray, precision: str) -> np.ndarray:
    """The reference's values as a backend of ``precision`` receives them (float32: rounded once)."""
    if precision == "float64":
        return values
    return values.astype(np.complex64 if np.iscomplexobj(values) else np.float32)


def _run_stages(
    name: str,
    backend: Backend,
    stages: Sequence[Stage],
    ref_taps: Mapping[str, np.ndarray],
    scales: Mapping[str, np.ndarray],
    tolerances: Tolerances,
    selected: Callable[[str], bool],
    comparison: Callable[[str, str], ElementwiseComparison],
    windowed: Callable[[str, tuple[int, ...], bool], bool],
) -> None:
    """Layer-local parity for one backend and batch: each stage on the reference's inputs to it."""
    for stage in stages:
        wanted = [t for t in stage.outputs if selected(t) and t in ref_taps]
        if not wanted:
            continue
        if any(n not in ref_taps for n in stage.inputs):
            continue  # an input the run left out (--taps) or the reference did not give
        inputs = {n: _as_precision(np.asarray(ref_taps[n]), backend.precision) for n in stage.inputs}
        try:
            produced = backend.run_stage(stage, inputs)
        except ParityInputError:
            raise
        except Exception as exc:
            check_interrupt()
            why = f"stage {stage.name} of {name} raised {type(exc).__name__}: {exc}"
            for t in wanted:
                comparison(t, name).fail(why)
            continue
        for t in wanted:
            acc = comparison(t, name)
            arr = produced.get(t)
            if arr is None:
                acc.fail(f"stage {stage.name} of {name} did not return {t}")
                continue
            got, expected = np.asarray(arr), np.asarray(ref_taps[t])
            s = _fitting_scale(scales.get(t), expected)
            if got.shape != expected.shape and windowed(t, got.shape, np.iscomplexobj(got)):
                # A declared config difference sizes this tap (the canvas): the centred window both hold.
                got, expected, s = _centred_common(got, expected, np.broadcast_to(s, expected.shape))
            acc.add(got, expected, s, times=tolerances.atol_per_scale(t, precision=backend.precision))


def _recompute_stages(
    name: str,
    precision: str,
    produced: Mapping[str, np.ndarray],
    reference: Backend,
    batch: Any,
    stages: Sequence[Stage],
    ref_taps: Mapping[str, np.ndarray],
    tolerances: Tolerances,
    selected: Callable[[str], bool],
    comparison: Callable[[str, str], ElementwiseComparison],
) -> bool:
    """Layer-local parity for a backend that cannot run a stage alone (a wrapped original): the
    reference runs each stage on the backend's own values of its inputs, and the backend's outputs
    are compared with that, under the error model's local scales taken on the backend's values.

    End to end, a float32 error that may be carried in (the merge's ring, where the denominator is
    a thousandth) widens every later tolerance, the diffraction's and the outputs' by a thousand
    times: a wrong square-root floor or an intensity 1.6 % off passed end to end. Computed from the
    backend's own inputs, each stage carries nothing in, as when it runs the reference's inputs. A
    stage is checked where the backend gives all its inputs with the reference's shapes; its outputs
    where the backend gives them. Returns whether any stage was checked.
    """
    same = {t: v for t, v in produced.items() if t in ref_taps and np.shape(v) == np.shape(ref_taps[t])}
    wanted = {st.name: [t for t in st.outputs if t in same and selected(t)] for st in stages}
    runnable = [st for st in stages if wanted[st.name] and all(n in same for n in st.inputs)]
    if not runnable:
        return False
    widened = {t: np.asarray(v, np.complex128 if np.iscomplexobj(v) else np.float64) for t, v in same.items()}

    def fail(stages_failed: Sequence[Stage], what: str, exc: Exception) -> None:
        # Values of the backend's the reference cannot compute with (a real tap where it reads a
        # complex one...): that backend's stages fail here, with the reason; the run goes on.
        check_interrupt()
        why = f"the reference could not {what} on {name}'s own values ({type(exc).__name__}: {exc})"
        for st in stages_failed:
            for t in wanted[st.name]:
                comparison(t, name).fail(why)

    try:
        scales = reference.local_error_scales(batch, {**ref_taps, **widened})
        check_error_scales(scales, "the reference", "a local error scale")
        scales = tolerances.floored_scales(scales)
    except ParityInputError:
        raise
    except Exception as exc:
        fail(runnable, "take the local error scales", exc)
        return True
    for stage in runnable:
        try:
            expected = reference.run_stage(stage, {n: same[n] for n in stage.inputs})
        except ParityInputError:
            raise
        except Exception as exc:
            fail([stage], f"run stage {stage.name}", exc)
            continue
        for t in wanted[stage.name]:
            got, want = np.asarray(same[t]), np.asarray(expected[t])
            acc = comparison(t, name)
            acc.add(
                got, want, _fitting_scale(scales.get(t), want), times=tolerances.atol_per_scale(t, precision=precision)
            )
    return True


def _first_local_divergence(taps: Sequence[TapResult]) -> dict[str, Any] | None:
    """The first tap, in order of computation, whose stage computes differently when fed the
    reference's inputs: that stage itself differs, whatever was carried into it end to end."""
    for tap in taps:
        failed = [c for c in tap.local if not c.passed and c.known is None]
        if failed:
            return {
                "stage": tap.stage,
                "tap": tap.name,
                "backends": [c.a for c in failed],
                "margins": {c.a: c.margin for c in tap.local if c.reason is None},
                "comparisons": [c.summary() for c in failed],
            }
    return None


def _centred_common(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """Each array cropped to the centred (H, W) window all of them hold."""
    h = min(a.shape[-2] for a in arrays)
    w = min(a.shape[-1] for a in arrays)
    out = []
    for a in arrays:
        top, left = (a.shape[-2] - h) // 2, (a.shape[-1] - w) // 2
        out.append(a[..., top : top + h, left : left + w])
    return tuple(out)


def _fitting_scale(scale: np.ndarray | None, values: np.ndarray) -> np.ndarray:
    """The arbiter's error scale when it fits the values compared, else their patch magnitudes."""
    if scale is not None and scale.shape == np.shape(values):
        return scale
    return magnitude_scale(values)


def _blame(failed: ComparisonResult, vs_ref: Mapping[str, ComparisonResult], ratio: float) -> str | None:
    """Who is off the reference at a failing vs_reference comparison, or None when it cannot be told.

    A backend is blamed when its margin is at least ``ratio`` times that of every other backend that
    stays within tolerance there. Otherwise the two scatter alike around the reference: the excess
    is out of tolerance, but nothing singles out one implementation.
    """
    passing = [c.margin for n, c in vs_ref.items() if n != failed.a and c.passed and c.reason is None]
    if all(failed.margin >= ratio * m for m in passing):
        return failed.a
    return None


def _first_divergence(taps: Sequence[TapResult], ref: str | None, blame_ratio: float = 1.0) -> dict[str, Any] | None:
    for tap in taps:
        failed = [c for c in tap.comparisons if not c.passed and c.known is None]
        if not failed:
            continue
        involved: list[str] = []
        blamed: list[str] = []
        undecided: list[str] = []
        vs_ref = {c.a: c for c in tap.comparisons if c.kind == "vs_reference"}
        for c in failed:
            for side in (c.a, c.b):
                if side != "spec" and side not in involved:
                    involved.append(side)
            culprit = None
            if c.reason and c.reason.startswith(_MISSING):
                culprit = c.reason[len(_MISSING) :]
            elif c.kind == "structure":
                culprit = c.a
            elif c.kind == "vs_reference":
                culprit = _blame(c, vs_ref, blame_ratio)
                if culprit is None and c.a not in undecided:
                    undecided.append(c.a)
            if culprit is not None and culprit not in blamed:
                blamed.append(culprit)
        notes = []
        if undecided:
            margins = ", ".join(f"{n} {c.margin:.3g}" for n, c in vs_ref.items() if c.reason is None)
            notes.append(
                f"{', '.join(undecided)} exceed{'s' if len(undecided) == 1 else ''} the tolerance, but another "
                f"backend scatters alike around the reference (margins vs the reference: {margins}; blame needs "
                f"{blame_ratio:g}x): not attributed to one backend"
            )
        failed_ref = [c for c in vs_ref.values() if not c.passed and c.reason is None]
        pair_ok = [c for c in tap.comparisons if c.kind == "backend_vs_backend" and c.passed]
        if len(failed_ref) >= 2 and len(failed_ref) == len(vs_ref) and pair_ok:
            notes.append(
                "every backend is off the reference while they agree with each other: suspect the reference "
                "or the tolerance model rather than the backends"
            )
        return {
            "tap": tap.name,
            "backends": involved,
            "blamed": blamed,
            "indistinguishable": undecided,
            "notes": notes,
            "margins": {c.a: c.margin for c in vs_ref.values() if c.reason is None},
            "comparisons": [c.summary() for c in failed],
        }
    return None


def statistics_summary(result: ParityResult, tap: str) -> dict[str, dict[str, dict[str, float]]]:
    """{backend: {statistic: {mean, min, max over patches}}} for one tap, for side-by-side tables."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for backend, per_tap in result.statistics.items():
        if tap in per_tap:
            out[backend] = {s: summarise(v) for s, v in per_tap[tap].items()}
    return out

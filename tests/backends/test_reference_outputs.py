"""The float64 reference computes what it computed before it was made faster.

The files in reference_outputs/ hold digests (``make_reference_outputs.digest``) of the reference's
forward taps, as the tree before the speed work on the reference computed them, and of its gradients,
as the first tree with a backward pass computed them (``RECORDED_BY``, checked against the
``sources`` in each file). Every later change to the reference was meant to give the same numbers in
less time; this test holds it to that: every sampled element within 1e-9 of its tap's largest
magnitude, every sum within 1e-9 of the magnitudes it was made of (plus one element's allowance,
which a block of a bias's one or two elements needs). The error scales (the tolerances) are pinned
too, as the tree that recorded them computed them, element by element relative to themselves: they
are float32 estimates whose sums run in an order each CPU's BLAS picks.

Measured on the recordings of 48ff8f1, an Intel Xeon with AVX-512, under OpenBLAS's SkylakeX,
Haswell, Sandybridge and Prescott kernels, one thread or two, NumPy's AVX-512 loops on or off (the
largest deviation in units of what is allowed times the rtol): forward taps 3.5e-14, gradients
4.1e-10 (an N=128 bias gradient, which sums cotangents that nearly cancel), forward error scales
2.8e-7, gradient error scales 8.8e-5 (the sampled part of that model runs in float32). Only x86
OpenBLAS was measured: another BLAS (MKL, Accelerate, an ARM build) reorders those bias sums its own
way, and the gradients' margin there is unknown.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from parity.batch import CanonicalBatch
from parity.config import ModelConfig
from parity.fixture import file_sha256, read_sha256sums
from parity.weights import generate_weights, weights_sha256

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("make_reference_outputs", HERE / "make_reference_outputs.py")
assert _spec is not None and _spec.loader is not None
recorder: Any = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(recorder)

# Deviation allowed, relative to the tap's largest magnitude (forward taps and gradients: the speed
# issue's 1e-9) or to each element (error scales, positive everywhere: 35 and 11 times the spread
# measured over BLAS kernels, see above).
RTOL = {"taps": 1e-9, "gradients": 1e-9, "scales": 1e-5, "gradient_scales": 1e-3}
# The trees whose outputs the reference is held to. Recording a kind again from another tree makes
# this test fail until this line is changed too: the reference is meant to compute these numbers, and
# a new recording from today's tree would hold it to nothing.
RECORDED_BY = {"taps": "17a8c48", "gradients": "3e89a40"}
_ITEMS = ("peak", "sum", "sum |v|", "projection", "projection |v|")


def allowed(kind: str, want: np.ndarray) -> np.ndarray:
    """What each item of a digest may move by: elements by rtol times the tap's peak (values) or
    themselves (error scales), sums by rtol times the magnitudes they were made of plus that same
    element allowance (a block of one or two elements, a bias's, is held as its elements are)."""
    r, blocks = RTOL[kind], recorder.BLOCKS
    scales = kind.endswith("scales")
    one = 0.0 if scales else want[recorder.PEAK]
    a = np.empty_like(want)
    a[recorder.PEAK] = r * want[recorder.PEAK]
    a[recorder.SUM] = a[recorder.SUM_ABS] = r * (want[recorder.SUM_ABS] + one)
    a[recorder.PROJECTION] = a[recorder.PROJECTION_ABS] = r * (want[recorder.PROJECTION_ABS] + one)
    a[5 : 5 + blocks] = a[5 + blocks : 5 + 2 * blocks] = r * (want[5 + blocks : 5 + 2 * blocks] + one)
    samples = want[recorder.HEAD :]
    a[recorder.HEAD :] = r * (np.abs(samples) if scales else want[recorder.PEAK])
    return a


def _item(i: int) -> str:
    if i < 5:
        return _ITEMS[i]
    if i < recorder.HEAD:
        block = (i - 5) % recorder.BLOCKS
        return f"{'sum' if i < 5 + recorder.BLOCKS else 'sum |v|'} of block {block} of {recorder.BLOCKS}"
    return f"sample {i - recorder.HEAD}"


def deviations(
    kind: str, got: dict[str, np.ndarray], recorded: dict[str, np.ndarray], shapes: dict[str, list[int]] | None = None
) -> list[tuple[float, str]]:
    """(ratio of the largest deviation to what is allowed, description) per tap that moved too far or
    whose set or shape differs, in tap order. A recorded 0 allows nothing (an exact zero of the
    reference, such as a parameter no loss reaches, stays exactly 0)."""
    problems: list[tuple[float, str]] = []
    for name in sorted(set(recorded) - set(got)):
        problems.append((np.inf, f"{kind} {name}: recorded, but the reference no longer computes it"))
    for name, values in got.items():
        if name not in recorded:
            problems.append((np.inf, f"{kind} {name}: computed, but not recorded"))
            continue
        if shapes is not None and list(np.shape(values)) != shapes[name]:
            problems.append((np.inf, f"{kind} {name}: shape {list(np.shape(values))}, recorded {shapes[name]}"))
            continue
        want, have = recorded[name], recorder.digest(values, name)
        if want.shape != have.shape:
            problems.append((np.inf, f"{kind} {name}: digest of {have.shape} items, recorded {want.shape}"))
            continue
        limit = allowed(kind, want)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(have == want, 0.0, np.abs(have - want) / limit)
        ratio = np.where(np.isnan(ratio), np.inf, ratio)  # a NaN on either side is a deviation
        worst = int(np.argmax(ratio))
        if not ratio[worst] <= 1.0:
            size = "any change" if limit[worst] == 0 else f"{ratio[worst]:.3g} x the allowed {limit[worst]:.3g}"
            problems.append(
                (
                    float(ratio[worst]),
                    f"{kind} {name}: {_item(worst)} is {have[worst]!r}, recorded {want[worst]!r}: "
                    f"{size} (rtol {RTOL[kind]:g})",
                )
            )
    return problems


def _recorded(case: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    path = recorder.OUT / f"{case}.npz"
    with np.load(path, allow_pickle=False) as f:
        arrays = {key: f[key] for key in f.files}
    return json.loads(str(arrays.pop("meta"))), arrays


def test_the_recorded_files_match_their_sha256sums():
    sums = read_sha256sums(recorder.OUT / "SHA256SUMS")
    assert set(sums) == {f"{case}.npz" for case in recorder.CASES}
    for name, digest in sums.items():
        assert file_sha256(recorder.OUT / name) == digest, name


@pytest.mark.parametrize("case", list(recorder.CASES))
def test_the_reference_computes_what_it_recorded(case):
    meta, arrays = _recorded(case)
    config = ModelConfig(**meta["config"])
    assert meta["weights_sha256"] == weights_sha256(generate_weights(config)), "the seeded weights changed"
    assert (meta["samples"], meta["blocks"]) == (recorder.SAMPLES, recorder.BLOCKS)
    kinds = [k for k in recorder.KINDS if k in meta["sources"]]
    assert kinds == list(recorder.CASE_KINDS[case])
    for kind, commit in RECORDED_BY.items():
        assert meta["sources"][kind].startswith(commit) and "uncommitted" not in meta["sources"][kind], (
            f"{case}: {kind} recorded by {meta['sources'][kind]}, not by {commit}"
        )
    batch = CanonicalBatch(x=arrays["batch.x"], offsets=arrays["batch.offsets"], probe=arrays["batch.probe"])
    got = recorder.outputs(meta["config"], batch, kinds)
    problems = []
    for kind in kinds:
        recorded = {key.split("/", 1)[1]: value for key, value in arrays.items() if key.startswith(f"{kind}/")}
        problems += deviations(kind, got[kind], recorded, meta["shapes"][kind])
    assert not problems, f"{case}: {len(problems)} taps moved; first: " + "\n".join(p for _, p in problems[:20])


def test_a_moved_element_is_found_by_the_samples_or_the_sums():
    """Where a sample reads, 1e-8 of the peak is found; where none does, the block sums find 1e-5 of
    the peak (in a tap of 16384 elements, 512 a block), and ulps of reordering pass."""
    name = "encoder.block0.conv0"
    values = np.random.default_rng(3).standard_normal((2, 8, 32, 32))
    peak = np.abs(values).max()
    recorded = {name: recorder.digest(values, name)}
    assert deviations("taps", {name: values * (1 + 1e-13)}, recorded) == []
    positions, _ = recorder.draws(name, values.size)
    unread = next(i for i in range(values.size) if i not in set(positions))
    for where, by, item in ((positions[5], 1e-8, "sample 5"), (unread, 1e-5, f"block {unread // 512} of 32")):
        moved = values.copy()
        moved.flat[where] += by * peak
        ((ratio, message),) = deviations("taps", {name: moved}, recorded)
        assert ratio > 1 and name in message and item in message, message


def test_what_else_the_comparison_of_digests_finds():
    name = "encoder.block0.conv0"
    values = np.random.default_rng(4).standard_normal((2, 8, 32, 32))
    recorded = {name: recorder.digest(values, name)}
    # A tap that disappeared or appeared, or came back in another shape with the same elements.
    assert deviations("taps", {}, recorded)[0][0] == np.inf
    assert deviations("taps", {name: values, "extra": values}, recorded)[0][0] == np.inf
    ((_, message),) = deviations("taps", {name: values.reshape(2, 8, 1024)}, recorded, {name: [2, 8, 32, 32]})
    assert "shape [2, 8, 1024]" in message
    # A NaN on either side is a deviation, never a pass.
    broken = values.copy()
    broken.flat[0] = np.nan
    assert deviations("taps", {name: broken}, recorded)
    nan_recorded = {name: recorded[name].copy()}
    nan_recorded[name][-1] = np.nan
    assert deviations("taps", {name: values * 2}, nan_recorded)
    # A complex tap's imaginary part, and a complex tap that is not contiguous.
    field = values[:, :4] + 1j * values[:, 4:]
    recorded = {"physics.illuminated": recorder.digest(field, "physics.illuminated")}
    assert deviations("taps", {"physics.illuminated": np.conj(field)}, recorded)
    assert deviations("taps", {"physics.illuminated": np.asfortranarray(field)}, recorded) == []
    # A tap the reference holds at exactly 0 must stay exactly 0.
    zeros = {"grad.mae.log_scale": recorder.digest(np.zeros(()), "grad.mae.log_scale")}
    ((_, message),) = deviations("gradients", {"grad.mae.log_scale": np.asarray(1e-300)}, zeros)
    assert "any change" in message
    # An error scale off by 1e-4 of itself is found; by 1e-6 (another summation order) it is not.
    s = np.abs(values) + 1.0
    recorded = {name: recorder.digest(s, name)}
    assert deviations("scales", {name: s * (1 + 1e-6)}, recorded) == []
    assert deviations("scales", {name: s * (1 + 1e-4)}, recorded)

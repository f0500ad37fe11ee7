"""Record what the float64 reference computes, so that a faster reference can be held to it.

    python tests/backends/make_reference_outputs.py --kinds taps            # from the tree imported
    python tests/backends/make_reference_outputs.py --kinds scales,gradient_scales

Each run adds the named kinds of output to ``tests/backends/reference_outputs/<case>.npz`` (one file
per config in ``CASES``), keeping the kinds it was not asked for, and rewrites SHA256SUMS there. Run
it with ``PYTHONPATH`` pointing at another checkout and that tree's reference is recorded: this is
how the committed taps and gradients were made from the trees that came before the speed work on the
reference, so ``test_reference_outputs.py`` holds today's reference to the outputs it had then
(``SOURCES`` in each file says which tree made each kind). Regenerate a kind only when the reference
is meant to compute something else (the spec changed), never to make that test pass.

A file does not hold whole taps (the gradient and forward taps of four configs are hundreds of MB):
per tap it holds a digest (``digest``), which the test recomputes from the reference's outputs now.
The batch is stored, so the inputs never depend on the batch generator; the weights are the seeded
default ones, checked by their SHA-256.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import itertools
import json
import os
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
OUT = HERE / "reference_outputs"
BATCH_SIZE = 2
BATCH_SEED = 7
# Elements of a tap read one by one (the rest enter through the digest's sums).
SAMPLES = 128
KINDS = ("taps", "gradients", "scales", "gradient_scales")
# The gradient parity suite's configs (tests/test_parity_matrix.py): between them every stage and
# every adjoint of the model. The gradient error model, a few seconds a config, is recorded for the
# two that take the merge and the padded canvas, the disk mask or not.
CASES: dict[str, dict[str, Any]] = {
    "default": {},
    "gridsize_1-object_big_0-probe_mask_1": {"gridsize": 1, "object_big": False, "probe_mask": True},
    "N_128": {"N": 128},
    "amp_activation_softplus-pad_object_0": {"pad_object": False, "amp_activation": "softplus"},
}
CASE_KINDS: dict[str, tuple[str, ...]] = {
    "default": KINDS,
    "gridsize_1-object_big_0-probe_mask_1": KINDS,
    "N_128": KINDS[:3],
    "amp_activation_softplus-pad_object_0": KINDS[:3],
}
# Where each digest item of a tap sits (``digest``): five numbers of the whole tap, then BLOCKS sums
# and BLOCKS sums of magnitudes over contiguous blocks, then the samples.
PEAK, SUM, SUM_ABS, PROJECTION, PROJECTION_ABS = range(5)
BLOCKS = 32
HEAD = 5 + 2 * BLOCKS


def draws(name: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The sampled positions and the projection's weights (standard normal) of a tap of ``size``
    elements, drawn from a seed made of its name: the same anywhere, for any tree. NumPy's legacy
    RandomState, whose streams NumPy keeps the same from version to version (NEP 19); Generator's
    may change, and with them every digest."""
    rng = np.random.RandomState(zlib.crc32(name.encode()))
    positions = np.sort(rng.choice(size, size=min(SAMPLES, size), replace=False))
    return positions, rng.standard_normal(size)


def flat_float64(values: np.ndarray) -> np.ndarray:
    """The tap as one float64 vector, a complex value as its real and imaginary parts."""
    v = np.asarray(values)
    if np.iscomplexobj(v):
        return np.ascontiguousarray(v, dtype=np.complex128).view(np.float64).ravel()
    return np.ascontiguousarray(v, dtype=np.float64).ravel()


def digest(values: np.ndarray, name: str) -> np.ndarray:
    """float64 [max |v|, Σ v, Σ |v|, Σ w·v, Σ |w·v|, Σ v and Σ |v| over each of BLOCKS contiguous
    blocks, then SAMPLES elements of v], over the real and imaginary parts of complex values
    (``draws``: which elements, and w). The samples hold single elements; the sums see every element,
    so a change where no sample reads shows once it moves a sum by more than rtol times the
    magnitudes summed: the block sums see a change confined to a region (an edge, the padding) with
    BLOCKS times the sensitivity of the whole tap's sums."""
    flat = flat_float64(values)
    positions, w = draws(name, flat.size)
    magnitude = np.abs(flat)
    head = [magnitude.max(initial=0.0), flat.sum(), magnitude.sum(), w @ flat, np.abs(w) @ magnitude]
    edges = np.linspace(0, flat.size, BLOCKS + 1).astype(np.int64)
    blocks = [flat[a:b].sum() for a, b in itertools.pairwise(edges)]
    block_magnitudes = [magnitude[a:b].sum() for a, b in itertools.pairwise(edges)]
    return np.concatenate([np.asarray(head + blocks + block_magnitudes, dtype=np.float64), flat[positions]])


def _source() -> str:
    """The commit of the tree whose ``backends`` and ``parity`` packages were imported (a worktree of
    an older commit, or this checkout), and whether either has uncommitted changes."""
    import backends
    import parity

    where = Path(backends.__file__).resolve().parent.parent
    if Path(parity.__file__).resolve().parent.parent != where:
        raise SystemExit(f"backends comes from {where} but parity from {Path(parity.__file__).parent}: one tree")
    try:
        commit = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(where), "status", "--porcelain", "--", ":/backends", ":/parity"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return f"unknown tree at {where}"
    return commit + (" with uncommitted changes" if dirty else "")


def outputs(config_kwargs: dict[str, Any], batch: Any, kinds: list[str]) -> dict[str, dict[str, np.ndarray]]:
    """{kind: {tap: values}} of the reference on ``batch``; only the public backend API, which every
    recorded tree has (forward and error_scales since the first, gradients since the backward pass)."""
    from backends.reference import ReferenceBackend
    from parity.config import ModelConfig
    from parity.weights import generate_weights

    config = ModelConfig(**config_kwargs)
    reference = ReferenceBackend(config, generate_weights(config), "cpu")
    taps = reference.forward(batch)
    out: dict[str, dict[str, np.ndarray]] = {"taps": taps}
    if "gradients" in kinds or "gradient_scales" in kinds:
        out["gradients"] = reference.gradients(batch)
    if "gradient_scales" in kinds:
        # One call gives both: the gradient scales are built on the forward ones, returned too.
        both = reference.error_scales(batch, {**taps, **out["gradients"]})
        out["gradient_scales"] = {name: both[name] for name in out["gradients"]}
        out["scales"] = {name: both[name] for name in taps}
    elif "scales" in kinds:
        out["scales"] = reference.error_scales(batch, taps)
    return {kind: out[kind] for kind in kinds}


def _read(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        return {}
    try:
        with np.load(path, allow_pickle=False) as f:
            return {key: f[key] for key in f.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise SystemExit(f"{path}: not a readable .npz of recorded outputs ({exc}); nothing was written") from exc


def record(case: str, kinds: list[str], out_dir: Path) -> Path:
    """Add ``kinds`` of ``case`` to its file (written atomically); other kinds already there stay.
    What the file already holds (config, batch, weights, digest layout) must be what this run uses."""
    from parity.atomic import write_bytes
    from parity.batch import CanonicalBatch, random_batch
    from parity.config import ModelConfig
    from parity.weights import generate_weights, weights_sha256

    config_kwargs = CASES[case]
    config = ModelConfig(**config_kwargs)
    path = out_dir / f"{case}.npz"
    arrays = _read(path)
    meta = json.loads(str(arrays["meta"])) if "meta" in arrays else {}
    settings = {
        "config": config_kwargs,
        "batch_seed": BATCH_SEED,
        "weights_sha256": weights_sha256(generate_weights(config)),
        "samples": SAMPLES,
        "blocks": BLOCKS,
    }
    for key, value in settings.items():
        if meta.get(key, value) != value:
            raise SystemExit(f"{path}: recorded with {key} {meta[key]!r}, this run has {value!r}; nothing was written")
    meta.update(settings)
    if "batch.x" in arrays:  # recorded already: the same inputs, whatever the generator does now
        batch = CanonicalBatch(x=arrays["batch.x"], offsets=arrays["batch.offsets"], probe=arrays["batch.probe"])
    else:
        batch = random_batch(config, BATCH_SIZE, seed=BATCH_SEED)
        arrays.update({"batch.x": batch.x, "batch.offsets": batch.offsets, "batch.probe": batch.probe})
    sources, shapes = meta.setdefault("sources", {}), meta.setdefault("shapes", {})
    for kind, taps in outputs(config_kwargs, batch, kinds).items():
        for key in [k for k in arrays if k.startswith(f"{kind}/")]:
            del arrays[key]
        shapes[kind] = {}
        for name, values in taps.items():
            summary = digest(values, name)
            if not np.all(np.isfinite(summary)):
                raise SystemExit(f"{path}: {kind} {name} holds non-finite values; nothing was written")
            arrays[f"{kind}/{name}"] = summary
            shapes[kind][name] = list(np.shape(values))
        sources[kind] = _source()
    arrays["meta"] = np.asarray(json.dumps(meta, sort_keys=True))
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    write_bytes(path, buffer.getvalue())
    return path


def write_sha256sums(out_dir: Path) -> None:
    from parity.atomic import write_text

    lines = [f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}\n" for p in sorted(out_dir.glob("*.npz"))]
    write_text(out_dir / "SHA256SUMS", "".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma-separated, of: " + ", ".join(KINDS))
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated, of: " + ", ".join(CASES))
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    cases = [c for c in args.cases.split(",") if c]
    for option, chosen, allowed in (("--kinds", kinds, KINDS), ("--cases", cases, tuple(CASES))):
        bad = set(chosen) - set(allowed)
        if bad:
            parser.error(f"{option}: unknown {sorted(bad)}; choose from {', '.join(allowed)}")
    os.makedirs(args.out, exist_ok=True)
    for case in cases:
        wanted = [k for k in kinds if k in CASE_KINDS[case]]
        if wanted:
            print(record(case, wanted, args.out))
    write_sha256sums(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

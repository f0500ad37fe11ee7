"""The canonical weights file (forward-model.md, section 7): names, shapes, generation, I/O, hashing.

One file feeds every backend. Kernels are stored as (kh, kw, in, out), biases as (out,); each backend
converts to its own layout on load and back on export. Loading is strict: a missing, extra or
mis-shaped parameter is an error naming it, because a silently skipped bias is one of the bugs this
harness exists to catch.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from parity.atomic import atomic_path
from parity.config import ModelConfig
from parity.errors import WeightsError
from parity.fixture import check_declared_size, stored_dataset
from parity.taps import HEADS

SCHEMA_VERSION = 1
DEFAULT_SEED = 20231104


def _conv(shapes: dict[str, tuple[int, ...]], name: str, cin: int, cout: int) -> None:
    shapes[f"{name}.kernel"] = (3, 3, cin, cout)
    shapes[f"{name}.bias"] = (cout,)


def parameter_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's canonical name and shape, in a fixed order."""
    shapes: dict[str, tuple[int, ...]] = {"log_scale": ()}
    cin = config.C
    for i, f in enumerate(config.encoder_filters):
        _conv(shapes, f"encoder.block{i}.conv0", cin, f)
        _conv(shapes, f"encoder.block{i}.conv1", f, f)
        cin = f
    bottleneck, F, g, out = cin, config.F, config.head_up_filters, config.out_ch
    for h in HEADS:
        cin = bottleneck
        for i, f in enumerate(config.decoder_filters):
            _conv(shapes, f"{h}.decoder.block{i}.conv0", cin, f)
            _conv(shapes, f"{h}.decoder.block{i}.conv1", f, f)
            cin = f
        if config.pad_object:
            _conv(shapes, f"{h}.head.centre", F - 4, out)
            if config.probe_big:
                _conv(shapes, f"{h}.head.border.conv0", 4, g)
                _conv(shapes, f"{h}.head.border.conv1", g, g)
                _conv(shapes, f"{h}.head.border.out", g, out)
        else:
            _conv(shapes, f"{h}.head.full.conv0", F, g)
            _conv(shapes, f"{h}.head.full.conv1", g, g)
            _conv(shapes, f"{h}.head.full.out", g, out)
    return shapes


def count_conv_parameters(config: ModelConfig) -> int:
    """Convolution weights and biases (log_scale excluded), the number the spec's table gives."""
    return sum(math.prod(s) for n, s in parameter_shapes(config).items() if n != "log_scale")


def generate_weights(config: ModelConfig, seed: int = DEFAULT_SEED) -> dict[str, np.ndarray]:
    """Seeded Glorot-uniform kernels and small non-zero biases, all float32."""
    rng = np.random.default_rng(seed)
    weights: dict[str, np.ndarray] = {}
    for name, shape in parameter_shapes(config).items():
        if name == "log_scale":
            weights[name] = np.asarray(np.log(config.input_scale), dtype=np.float32)
        elif name.endswith(".kernel"):
            kh, kw, cin, cout = shape
            limit = math.sqrt(6.0 / (kh * kw * cin + kh * kw * cout))
            weights[name] = rng.uniform(-limit, limit, size=shape).astype(np.float32)
        else:
            mag = rng.uniform(0.005, 0.05, size=shape)  # never (near) zero, so a lost bias shows
            sign = np.where(rng.random(size=shape) < 0.5, -1.0, 1.0)
            weights[name] = (sign * mag).astype(np.float32)
    return weights


def validate_weights(weights: Mapping[str, np.ndarray], config: ModelConfig, source: str = "weights") -> None:
    expected = parameter_shapes(config)
    missing = [n for n in expected if n not in weights]
    if missing:
        raise WeightsError(
            f"{source}: missing parameter {missing[0]!r} (shape {expected[missing[0]]}) "
            f"for config {config.short_id()}" + (f"; {len(missing) - 1} more missing" if len(missing) > 1 else "")
        )
    extra = [n for n in weights if n not in expected]
    if extra:
        raise WeightsError(
            f"{source}: unexpected parameter {extra[0]!r} (shape {np.shape(weights[extra[0]])}), "
            f"not part of the model for config {config.short_id()}"
        )
    for name, shape in expected.items():
        arr = np.asarray(weights[name])
        if arr.shape != shape:
            raise WeightsError(f"{source}: parameter {name!r} has shape {arr.shape}; expected {shape}")
        if arr.dtype != np.float32:
            raise WeightsError(f"{source}: parameter {name!r} has dtype {arr.dtype}; expected float32")
        if not np.all(np.isfinite(arr)):
            raise WeightsError(f"{source}: parameter {name!r} contains NaN or Inf")


def weights_sha256(weights: Mapping[str, np.ndarray]) -> str:
    """Content hash over names, shapes, dtypes and bytes, independent of HDF5 file layout."""
    h = hashlib.sha256()
    for name in sorted(weights):
        arr = np.ascontiguousarray(weights[name])
        h.update(f"{name}|{arr.dtype.str}|{arr.shape}|".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def save_weights(path: str | os.PathLike[str], weights: Mapping[str, np.ndarray], config: ModelConfig) -> str:
    """Validate and write atomically; returns the content SHA-256, also stored in the file."""
    import h5py

    validate_weights(weights, config, source=str(path))
    digest = weights_sha256(weights)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w", track_order=True) as fh:
            fh.attrs["schema_version"] = SCHEMA_VERSION
            fh.attrs["config"] = json.dumps(config.to_dict(), sort_keys=True)
            fh.attrs["sha256"] = digest
            for name in parameter_shapes(config):
                fh.create_dataset(name, data=np.asarray(weights[name]), track_times=False)
    return digest


def _attribute(fh: Any, key: str, where: str) -> str:
    if key not in fh.attrs:
        raise WeightsError(f"{where}: attribute {key!r} is missing (every weights file records its config and hash)")
    value = fh.attrs[key]
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if not isinstance(value, str):
        raise WeightsError(f"{where}: attribute {key!r} is {value!r} ({type(value).__name__}); expected a string")
    return value


def load_weights(path: str | os.PathLike[str], config: ModelConfig) -> dict[str, np.ndarray]:
    """Read and validate a weights file against ``config``; every error names the file and what is wrong.

    The file must record the config it was made for and its content hash: a file made for another
    config is refused even where its shapes would fit (an activation, a probe_big that builds nothing
    at pad_object=false, an nphotons that set log_scale), and a file whose content changed is corrupt.
    """
    import h5py

    p = Path(path)
    where = str(p)
    if not p.is_file():
        raise WeightsError(f"{p}: weights file does not exist" if not p.exists() else f"{p}: is not a file")
    try:
        with h5py.File(p, "r") as fh:
            if "diffraction" in fh and "log_scale" not in fh:  # the other HDF5 file a run reads
                raise WeightsError(f"{p}: is a fixture (it holds 'diffraction'), not a weights file")
            version = fh.attrs.get("schema_version")
            if isinstance(version, np.ndarray) and version.shape == ():
                version = version[()]
            if not isinstance(version, (int, np.integer)) or isinstance(version, bool) or version != SCHEMA_VERSION:
                raise WeightsError(f"{p}: attribute 'schema_version' is {version!r}; expected {SCHEMA_VERSION}")
            stored_config = _attribute(fh, "config", where)
            stored = _attribute(fh, "sha256", where)
            weights: dict[str, np.ndarray] = {}
            file_size = p.stat().st_size
            for name in fh:
                # As the fixture loader does: links refused by name (a dangling one would be a bare
                # KeyError), and a shape larger than the file refused before it is allocated.
                node = stored_dataset(fh, name, where, WeightsError, "weights file", "a dataset of parameters")
                check_declared_size(node, name, file_size, where, WeightsError, "weights file")
                weights[name] = np.asarray(node[()])
    except (OSError, RuntimeError, KeyError) as exc:
        raise WeightsError(f"{p}: not a readable HDF5 weights file ({exc})") from exc
    try:
        made_for = json.loads(stored_config)
    except json.JSONDecodeError as exc:
        raise WeightsError(f"{p}: attribute 'config' is not valid JSON ({exc})") from exc
    if not isinstance(made_for, dict):
        raise WeightsError(f"{p}: attribute 'config' is JSON {type(made_for).__name__}; expected an object")
    wanted = config.to_dict()
    differ = sorted(k for k in set(made_for) | set(wanted) if made_for.get(k) != wanted.get(k))
    if differ:
        both = "; ".join(
            f"{k}: file {made_for.get(k, '<missing>')!r}, run {wanted.get(k, '<missing>')!r}" for k in differ
        )
        raise WeightsError(f"{p}: made for another config than the run's ({both}); use weights made for this config")
    validate_weights(weights, config, source=str(p))
    if stored != weights_sha256(weights):
        raise WeightsError(f"{p}: contents do not match the SHA-256 recorded in attribute 'sha256' (corrupt?)")
    return weights

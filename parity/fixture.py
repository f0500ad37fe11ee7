"""Fixture files: the fixed diffraction data every parity run starts from (schema in docs/fixtures.md).

A fixture is the root of every comparison: baselines record its SHA-256, and every backend receives
batches built from it. So the loader trusts nothing. It checks every attribute, dataset, dtype, shape
and value, and re-hashes every dataset against the hash recorded at write time. Any violation raises
:class:`~parity.errors.FixtureError` naming the file, the dataset or attribute, and what is wrong, so a
damaged or hand-edited fixture is caught where it is read, not as a baffling parity failure later.

Writes are atomic and byte-deterministic (no HDF5 timestamps, a pinned file-format range, a fixed
attribute order), so regenerating a fixture from its seed reproduces the committed file bit for bit
and a file hash alone identifies its content.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import io
import json
import math
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from parity.atomic import atomic_path
from parity.batch import CanonicalBatch, disk_mask, normalise_probe
from parity.config import ModelConfig
from parity.errors import FixtureError, ParityInputError

SCHEMA_VERSION = 3
# Version 1 is still read: it had no dataset attributes, positions being pixels, x = column, by definition.
# Version 2 is still read and still written: version 3 only added the optional dataset 'offsets', and a
# file without it is written as version 2, so it stays byte-identical and readable by older readers.
READABLE_VERSIONS = (1, 2, 3)

#: Dataset name -> stored dtype, in the order they are written. Little-endian explicitly, so the
#: recorded hashes (of the stored bytes) do not depend on the machine that wrote or reads them.
DATASET_DTYPES: dict[str, np.dtype[Any]] = {
    "diffraction": np.dtype("<f4"),
    "xcoords": np.dtype("<f8"),
    "ycoords": np.dtype("<f8"),
    "probe": np.dtype("<c8"),
    "groups": np.dtype("<i8"),
    "object": np.dtype("<c8"),
    "offsets": np.dtype("<f8"),
}
REQUIRED_DATASETS = ("diffraction", "xcoords", "ycoords", "probe", "groups")
#: Attributes each dataset carries (schema 2 and later), with the only values this version reads: scan
#: positions and offsets are object pixels, xcoords the column (x) and ycoords the row (y) coordinate,
#: offsets [dx, dy] = [x, y]. A position file in metres or with swapped axes is refused by name instead
#: of shifting every patch.
DATASET_ATTRIBUTES: dict[str, dict[str, str]] = {
    "xcoords": {"units": "pixel", "axis": "x (column)"},
    "ycoords": {"units": "pixel", "axis": "y (row)"},
    "offsets": {"units": "pixel", "components": "[dx, dy] = [x (column), y (row)]"},
}
OPTIONAL_DATASETS = ("object", "offsets")
#: The schema version that introduced a dataset (absent: version 1). A file is written with the lowest
#: version that holds its datasets, and a file of an older version may not contain a newer dataset.
DATASET_SINCE: dict[str, int] = {"offsets": 3}
#: The version written for a file that holds only datasets older than version 3.
BASE_WRITE_VERSION = 2
ROOT_ATTRIBUTES = ("schema_version", "N", "gridsize", "kind", "seed", "params", "source", "sha256")
#: "lines" and "grf" are simulated by parity.simulate, "npz" came from parity.npz_import, "custom" is
#: anything else a user wrote with write_fixture.
KINDS = ("lines", "grf", "npz", "custom")

# Old-style (earliest) object headers carry no modification times, and pinning the newest format
# keeps a future HDF5 library from choosing a different layout for the same content.
_LIBVER = ("earliest", "v110")
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, kw_only=True)
class FixtureData:
    """The content of a fixture, before it has a file.

    diffraction: (n, N, N) float32 measured amplitudes, centred (fftshifted) like the model output.
    xcoords, ycoords: (n,) float64 scan positions in object pixels (x = column, y = row).
    probe: (N, N) complex64, raw (normalised only when a batch is built).
    groups: (n_groups, C) int64 position indices; a group's patches are fed in this order.
    object: (H, W) complex64 ground truth, when known.
    offsets: (n_groups, C, 2) float64 group-relative [dx, dy] in object pixels, one per member of
        ``groups`` in the same order, relative to an origin of the data's choosing (they need not sum to
        zero per group). When present, batches carry them (as float32) instead of the offsets derived
        from the positions, −(position − group mean).
    """

    diffraction: np.ndarray
    xcoords: np.ndarray
    ycoords: np.ndarray
    probe: np.ndarray
    groups: np.ndarray
    N: int
    gridsize: int
    kind: str
    seed: int
    params: dict[str, Any]
    source: str
    object: np.ndarray | None = None
    offsets: np.ndarray | None = None

    @property
    def C(self) -> int:
        return self.gridsize * self.gridsize

    @property
    def n_positions(self) -> int:
        return int(self.diffraction.shape[0])

    @property
    def n_groups(self) -> int:
        return int(self.groups.shape[0])

    @property
    def schema_version(self) -> int:
        """The version this content is written as: the lowest that holds every dataset present."""
        return max([BASE_WRITE_VERSION] + [DATASET_SINCE.get(name, 1) for name in self.arrays()])

    def arrays(self) -> dict[str, np.ndarray]:
        """Every dataset present, in schema order."""
        names = REQUIRED_DATASETS + tuple(n for n in OPTIONAL_DATASETS if getattr(self, n) is not None)
        return {name: getattr(self, name) for name in names}


@dataclass(frozen=True, kw_only=True)
class Fixture(FixtureData):
    """A validated fixture read from ``path``; its arrays are read-only.

    ``sha256`` is the hash of the file's bytes (what baselines record); ``dataset_sha256`` the
    per-dataset hashes recorded in, and verified against, the file.
    """

    path: Path
    sha256: str
    dataset_sha256: dict[str, str] = field(default_factory=dict)


def dataset_sha256(name: str, array: np.ndarray) -> str:
    """SHA-256 of the dataset's C-contiguous bytes in its stored (little-endian) dtype."""
    data = np.ascontiguousarray(array, dtype=DATASET_DTYPES[name])
    return hashlib.sha256(data.tobytes()).hexdigest()


def fixture_data_sha256(data: FixtureData) -> str:
    """One hash of a fixture held in memory: its datasets' hashes and its generating parameters."""
    h = hashlib.sha256()
    for name, arr in data.arrays().items():
        h.update(f"{name}={dataset_sha256(name, arr)};".encode())
    h.update(json.dumps(data.params, sort_keys=True, default=str).encode())
    return h.hexdigest()


def file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _first_index(mask: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argwhere(mask)[0])


def _check_structure(arrays: Mapping[str, np.ndarray], N: int, gridsize: int, where: str) -> None:
    """Names, dtypes and shapes; kept apart from the value checks so both writer and loader share it."""
    for name in REQUIRED_DATASETS:
        if name not in arrays:
            raise FixtureError(f"{where}: dataset {name!r} is missing (required: {', '.join(REQUIRED_DATASETS)})")
    for name in arrays:
        if name not in DATASET_DTYPES:
            raise FixtureError(
                f"{where}: dataset {name!r} is not part of fixture schema version {SCHEMA_VERSION} "
                f"(known: {', '.join(DATASET_DTYPES)})"
            )
    for name, arr in arrays.items():
        if arr.dtype != DATASET_DTYPES[name]:
            raise FixtureError(f"{where}: dataset {name!r} has dtype {arr.dtype}; expected {DATASET_DTYPES[name].name}")
    diff = arrays["diffraction"]
    if diff.ndim != 3 or diff.shape[1:] != (N, N) or diff.shape[0] < 1:
        raise FixtureError(
            f"{where}: dataset 'diffraction' has shape {diff.shape}; expected (n, {N}, {N}) with n >= 1 "
            f"(N={N} from the attribute 'N')"
        )
    n = diff.shape[0]
    for name in ("xcoords", "ycoords"):
        if arrays[name].shape != (n,):
            raise FixtureError(
                f"{where}: dataset {name!r} has shape {arrays[name].shape}; expected ({n},), one position "
                f"per diffraction pattern"
            )
    if arrays["probe"].shape != (N, N):
        raise FixtureError(f"{where}: dataset 'probe' has shape {arrays['probe'].shape}; expected ({N}, {N})")
    C = gridsize * gridsize
    groups = arrays["groups"]
    if groups.ndim != 2 or groups.shape[1] != C or groups.shape[0] < 1:
        raise FixtureError(
            f"{where}: dataset 'groups' has shape {groups.shape}; expected (n_groups, {C}) with "
            f"n_groups >= 1 (C = gridsize² = {C} from the attribute 'gridsize')"
        )
    obj = arrays.get("object")
    if obj is not None and (obj.ndim != 2 or obj.size == 0):
        raise FixtureError(f"{where}: dataset 'object' has shape {obj.shape}; expected a non-empty (H, W)")
    offsets = arrays.get("offsets")
    if offsets is not None and offsets.shape != (groups.shape[0], C, 2):
        raise FixtureError(
            f"{where}: dataset 'offsets' has shape {offsets.shape}; expected ({groups.shape[0]}, {C}, 2), "
            "one [dx, dy] per member of each group of 'groups'"
        )


def _check_values(arrays: Mapping[str, np.ndarray], where: str) -> None:
    for name, arr in arrays.items():
        if arr.dtype.kind in "fc":
            bad = ~np.isfinite(arr)
            if bad.any():
                idx = _first_index(bad)
                raise FixtureError(
                    f"{where}: dataset {name!r} contains {int(bad.sum())} non-finite values (NaN or Inf); "
                    f"first {arr[idx]} at index {idx}"
                )
    diff = arrays["diffraction"]
    neg = diff < 0
    if neg.any():
        idx = _first_index(neg)
        raise FixtureError(
            f"{where}: dataset 'diffraction' has {int(neg.sum())} negative amplitudes; first {diff[idx]} at "
            f"index {idx} (amplitudes are square roots of counts)"
        )
    if not diff.any():  # the inputs are scaled by their mean energy (forward-model.md, section 2)
        raise FixtureError(f"{where}: dataset 'diffraction' is all zero; it cannot be normalised")
    groups, n = arrays["groups"], diff.shape[0]
    out = (groups < 0) | (groups >= n)
    if out.any():
        idx = _first_index(out)
        raise FixtureError(
            f"{where}: dataset 'groups' holds position index {groups[idx]} at {idx}, outside [0, {n}) "
            f"({n} diffraction patterns)"
        )
    probe = arrays["probe"]
    if not np.mean(np.abs(disk_mask(probe.shape[-1]) * probe)) > 0:
        raise FixtureError(
            f"{where}: dataset 'probe' is zero inside the disk mask (radius N/4), so it cannot be normalised"
        )


def validate_fixture_data(data: FixtureData, where: str) -> None:
    """Everything the loader checks except hashes, so a bad fixture can never be written either."""
    for key in ("N", "gridsize", "seed"):
        value = getattr(data, key)
        if not isinstance(value, int | np.integer) or isinstance(value, bool):
            raise FixtureError(f"{where}: attribute {key!r} is {value!r}; expected an integer")
    if data.N < 2 or data.N % 2:
        raise FixtureError(f"{where}: attribute 'N' is {data.N}; expected a positive even integer")
    if data.gridsize < 1:
        raise FixtureError(f"{where}: attribute 'gridsize' is {data.gridsize}; expected an integer >= 1")
    if data.kind not in KINDS:
        raise FixtureError(f"{where}: attribute 'kind' is {data.kind!r}; expected one of {', '.join(KINDS)}")
    if not isinstance(data.params, dict):
        raise FixtureError(f"{where}: attribute 'params' is {type(data.params).__name__}; expected a JSON object")
    if not isinstance(data.source, str):
        raise FixtureError(f"{where}: attribute 'source' is {data.source!r}; expected a string")
    arrays = data.arrays()
    _check_structure(arrays, int(data.N), int(data.gridsize), where)
    _check_values(arrays, where)


def _params_json(params: Mapping[str, Any], where: str) -> str:
    try:
        return json.dumps(params, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise FixtureError(f"{where}: attribute 'params' cannot be stored as JSON ({exc})") from exc


def write_fixture(path: str | os.PathLike[str], data: FixtureData, config: ModelConfig | None = None) -> Path:
    """Validate ``data`` and write it atomically; the same content always gives the same bytes.

    With a ``config``, stored ``offsets`` must also fit its canvas (:func:`check_offsets`), as they
    must when the file is loaded with that config. The file is schema version 3 when it holds
    ``offsets`` and version 2 otherwise (:attr:`FixtureData.schema_version`).
    """
    import h5py

    target = Path(path)
    validate_fixture_data(data, str(target))
    if config is not None:
        check_offsets(data, config, str(target))
    arrays = data.arrays()
    params = _params_json(data.params, str(target))
    hashes = {name: dataset_sha256(name, arr) for name, arr in arrays.items()}
    with atomic_path(target) as tmp:
        with h5py.File(tmp, "w", libver=_LIBVER) as fh:
            attrs = {
                "schema_version": np.int64(data.schema_version),
                "N": np.int64(data.N),
                "gridsize": np.int64(data.gridsize),
                "kind": data.kind,
                "seed": np.int64(data.seed),
                "params": params,
                "source": data.source,
                "sha256": json.dumps(hashes, sort_keys=True),
            }
            for key in ROOT_ATTRIBUTES:
                fh.attrs[key] = attrs[key]
            for name, arr in arrays.items():
                ds = fh.create_dataset(
                    name, data=np.ascontiguousarray(arr, dtype=DATASET_DTYPES[name]), track_times=False
                )
                for key, value in DATASET_ATTRIBUTES.get(name, {}).items():
                    ds.attrs[key] = value
    return target


def _int_attr(attrs: Mapping[str, Any], key: str, where: str) -> int:
    value = attrs[key]
    if isinstance(value, np.ndarray) and value.shape == ():
        value = value[()]
    if not isinstance(value, int | np.integer) or isinstance(value, bool | np.bool_):
        shown = value.item() if isinstance(value, np.generic) else value
        raise FixtureError(f"{where}: attribute {key!r} is {shown!r} ({type(value).__name__}); expected an integer")
    return int(value)


def _str_attr(attrs: Mapping[str, Any], key: str, where: str) -> str:
    value = attrs[key]
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if not isinstance(value, str):
        shown = value.item() if isinstance(value, np.generic) else value
        raise FixtureError(f"{where}: attribute {key!r} is {shown!r} ({type(value).__name__}); expected a string")
    return value


def _json_object_attr(attrs: Mapping[str, Any], key: str, where: str) -> dict[str, Any]:
    text = _str_attr(attrs, key, where)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FixtureError(f"{where}: attribute {key!r} is not valid JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise FixtureError(f"{where}: attribute {key!r} is JSON {type(value).__name__}; expected an object")
    return value


def _read_attributes(attrs: Mapping[str, Any], where: str) -> dict[str, Any]:
    if "schema_version" not in attrs:
        raise FixtureError(f"{where}: attribute 'schema_version' is missing (not a ptycho-parity fixture?)")
    version = _int_attr(attrs, "schema_version", where)
    if version not in READABLE_VERSIONS:
        raise FixtureError(
            f"{where}: attribute 'schema_version' is {version}; this ptycho-parity reads versions "
            + ", ".join(map(str, READABLE_VERSIONS))
        )
    for key in ROOT_ATTRIBUTES:
        if key not in attrs:
            raise FixtureError(f"{where}: attribute {key!r} is missing")
    for key in attrs:
        if key not in ROOT_ATTRIBUTES:
            raise FixtureError(
                f"{where}: attribute {key!r} is not part of fixture schema version {SCHEMA_VERSION} "
                f"(known: {', '.join(ROOT_ATTRIBUTES)})"
            )
    out: dict[str, Any] = {
        "version": version,
        "N": _int_attr(attrs, "N", where),
        "gridsize": _int_attr(attrs, "gridsize", where),
        "seed": _int_attr(attrs, "seed", where),
        "kind": _str_attr(attrs, "kind", where),
        "source": _str_attr(attrs, "source", where),
        "params": _json_object_attr(attrs, "params", where),
    }
    hashes = _json_object_attr(attrs, "sha256", where)
    for name, digest in hashes.items():
        if not (isinstance(digest, str) and _HEX64.fullmatch(digest)):
            raise FixtureError(
                f"{where}: attribute 'sha256' records {digest!r} for dataset {name!r}; expected 64 hex digits"
            )
    out["sha256"] = hashes
    return out


def _check_config(N: int, gridsize: int, config: ModelConfig, where: str) -> None:
    if N != config.N:
        raise FixtureError(f"{where}: attribute 'N' is {N} but the config has N={config.N}")
    if gridsize != config.gridsize:
        raise FixtureError(f"{where}: attribute 'gridsize' is {gridsize} but the config has gridsize={config.gridsize}")


def _check_dataset_attributes(name: str, attrs: Mapping[str, Any], version: int, where: str) -> None:
    expected = DATASET_ATTRIBUTES.get(name, {}) if version >= 2 else {}
    for key in attrs:
        if key not in expected:
            known = ", ".join(expected) or "none"
            raise FixtureError(
                f"{where}: dataset {name!r} has attribute {key!r}, which is not part of fixture schema version "
                f"{version} (its attributes: {known})"
            )
    for key, value in expected.items():
        if key not in attrs:
            raise FixtureError(f"{where}: dataset {name!r} lacks attribute {key!r} (expected {value!r})")
        found = attrs[key]
        if isinstance(found, bytes):
            found = found.decode("utf-8", errors="replace")
        if not isinstance(found, str):
            # An array or a number: compared with ``!=`` an array has no single truth value.
            shown = found.tolist() if isinstance(found, np.ndarray | np.generic) else found
            raise FixtureError(
                f"{where}: dataset {name!r} has attribute {key!r} = {shown!r} ({type(found).__name__}); "
                f"expected the string {value!r}"
            )
        if found != value:
            raise FixtureError(f"{where}: dataset {name!r} has {key}={found!r}; this schema reads only {value!r}")


def stored_dataset(
    fh: Any, name: str, where: str, error: type[ParityInputError], holder: str, expected: str = "a dataset"
) -> Any:
    """Member ``name`` of the open HDF5 file ``fh`` as a dataset whose data lies in that file.

    Soft and external links, external storage and virtual datasets would pull data from other files,
    which no hash recorded in this one vouches for, and a dangling link fails with a bare KeyError when
    followed. So a link is refused by its name before it is followed, then a group, then a dataset
    stored elsewhere. Shared by the fixture and weights loaders; ``error`` is the loader's error
    class, ``holder`` what the file is ("fixture", "weights file"), ``expected`` what each member is.
    """
    import h5py

    link = fh.get(name, getlink=True)
    if not isinstance(link, h5py.HardLink):
        raise error(f"{where}: {name!r} is a {type(link).__name__}; a {holder} holds no links")
    node = fh[name]
    if not isinstance(node, h5py.Dataset):
        raise error(f"{where}: {name!r} is a {type(node).__name__}, not {expected}")
    if node.is_virtual or node.external:
        raise error(f"{where}: dataset {name!r} is stored outside the file (virtual or external)")
    return node


def _size_text(nbytes: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= size:
            return f"{nbytes / size:.1f} {unit}"
    return f"{nbytes} bytes"


def check_declared_size(
    node: Any, name: str, file_size: int, where: str, error: type[ParityInputError], holder: str
) -> None:
    """Refuse, before reading it, a dataset whose declared shape needs more bytes than the whole file.

    The writers store every dataset uncompressed, so its data cannot be larger than the file that
    holds it. A shape edited to (10⁷, 64, 64) in a 1.4 MB file would otherwise be allocated in full
    (153 GiB of fill values) before any check could see it.
    """
    shape = node.shape or ()  # None for an empty (null) dataspace, which reads as no data
    declared = math.prod(shape) * int(node.dtype.itemsize)
    if declared > file_size:
        raise error(
            f"{where}: dataset {name!r} declares shape {tuple(shape)} of {node.dtype}, {_size_text(declared)}, "
            f"more than the whole file ({_size_text(file_size)}); a {holder} stores its datasets uncompressed, "
            "so this one is damaged or was edited"
        )


def _read_datasets(
    fh: Any, where: str, version: int = SCHEMA_VERSION, file_size: int | None = None
) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    for name in fh:
        node = stored_dataset(fh, name, where, FixtureError, "fixture")
        if name not in DATASET_DTYPES:
            continue  # reported by the structure check, after missing datasets
        since = DATASET_SINCE.get(name, 1)
        if since > version:
            raise FixtureError(
                f"{where}: dataset {name!r} is not part of fixture schema version {version} (the file's "
                f"'schema_version'); it was added in version {since}"
            )
        try:
            attrs = dict(node.attrs)
        except (OSError, RuntimeError, KeyError) as exc:
            raise FixtureError(f"{where}: attributes of dataset {name!r} cannot be read (corrupt? {exc})") from exc
        _check_dataset_attributes(name, attrs, version, where)
        if file_size is not None:
            check_declared_size(node, name, file_size, where, FixtureError, "fixture")
        try:
            arrays[name] = np.asarray(node[()])
        except (OSError, RuntimeError, ValueError, TypeError) as exc:
            raise FixtureError(f"{where}: dataset {name!r} cannot be read (corrupt or truncated? {exc})") from exc
    unknown = [name for name in fh if name not in DATASET_DTYPES]
    for name in REQUIRED_DATASETS:
        if name not in arrays:
            raise FixtureError(f"{where}: dataset {name!r} is missing (required: {', '.join(REQUIRED_DATASETS)})")
    if unknown:
        known = [name for name in DATASET_DTYPES if DATASET_SINCE.get(name, 1) <= version]
        raise FixtureError(
            f"{where}: dataset {unknown[0]!r} is not part of fixture schema version {version} "
            f"(known: {', '.join(known)})"
        )
    return arrays


def load_fixture(path: str | os.PathLike[str], config: ModelConfig | None = None) -> Fixture:
    """Read and fully validate a fixture, optionally against the ``config`` it will be run with.

    The file is read once into memory and parsed from there, so ``Fixture.sha256`` is the hash of
    exactly the bytes that were validated, and the file is never opened for writing.
    """
    import h5py

    p = Path(path)
    where = str(p)
    if not p.exists():
        raise FixtureError(f"{where}: fixture file does not exist")
    if not p.is_file():
        raise FixtureError(f"{where}: fixture path is not a regular file")
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise FixtureError(f"{where}: fixture file cannot be read ({exc})") from exc
    try:
        fh = h5py.File(io.BytesIO(raw), "r")
    except (OSError, ValueError) as exc:
        if raw[:2] == b"PK":  # a zip: NumPy's .npz, the format PtychoPINN's data sets come in
            raise FixtureError(
                f"{where}: is a NumPy .npz archive, not an HDF5 fixture; convert it with "
                "`ptycho-parity import-npz` (docs/fixtures.md)"
            ) from None
        raise FixtureError(f"{where}: not a readable HDF5 file, truncated or corrupt ({exc})") from exc
    try:
        with fh:
            try:
                attrs = dict(fh.attrs)
            except (OSError, RuntimeError, KeyError) as exc:
                raise FixtureError(f"{where}: root attributes cannot be read (corrupt? {exc})") from exc
            meta = _read_attributes(attrs, where)
            if config is not None:
                _check_config(meta["N"], meta["gridsize"], config, where)
            arrays = _read_datasets(fh, where, meta["version"], len(raw))
    except (OSError, RuntimeError, KeyError) as exc:
        raise FixtureError(f"{where}: HDF5 structure cannot be read (corrupt? {exc})") from exc
    data_kwargs = {k: meta[k] for k in ("N", "gridsize", "kind", "seed", "params", "source")}
    data = FixtureData(**arrays, **data_kwargs)  # type: ignore[arg-type]
    validate_fixture_data(data, where)
    if config is not None:
        check_offsets(data, config, where)

    recorded: dict[str, str] = meta["sha256"]
    for name in arrays:
        if name not in recorded:
            raise FixtureError(f"{where}: attribute 'sha256' records no hash for dataset {name!r}")
    for name in recorded:
        if name not in arrays:
            raise FixtureError(
                f"{where}: attribute 'sha256' records a hash for dataset {name!r}, which is not in the file"
            )
    actual = {name: dataset_sha256(name, arr) for name, arr in arrays.items()}
    for name, digest in actual.items():
        if digest != recorded[name]:
            raise FixtureError(
                f"{where}: dataset {name!r} does not match its SHA-256 recorded in attribute 'sha256' "
                f"(recorded {recorded[name][:12]}..., actual {digest[:12]}...): modified or corrupt"
            )
    for arr in arrays.values():
        arr.setflags(write=False)
    return Fixture(
        **arrays,  # type: ignore[arg-type]
        **data_kwargs,
        path=p,
        sha256=hashlib.sha256(raw).hexdigest(),
        dataset_sha256=actual,
    )


def canvas_margin(config: ModelConfig) -> float:
    """(M − N)/2: how far, in pixels per axis, a patch can move on the merge canvas and stay on it."""
    return (config.M - config.N) / 2


def _config_canvas(config: ModelConfig) -> str:
    return (
        f"the canvas margin (M − N)/2 = {canvas_margin(config):g} pixels of the config (M = {config.M}, "
        f"N = {config.N}; M from config keys 'offset', 'max_position_jitter' or 'canvas_size')"
    )


def _positions(fixture: FixtureData) -> np.ndarray:
    """(n, 2) float64 scan positions as [x, y]."""
    return np.stack([np.asarray(fixture.xcoords, np.float64), np.asarray(fixture.ycoords, np.float64)], axis=-1)


def _derived_offsets(positions: np.ndarray, members: np.ndarray) -> np.ndarray:
    """−(position − group mean) of the groups ``members`` (..., C), float64 [dx, dy]: what batches
    carry when the fixture stores no offsets (rounded to float32 there)."""
    pos = positions[members]
    return np.asarray(-(pos - pos.mean(axis=-2, keepdims=True)))


def _check_derived_offsets(fixture: FixtureData, config: ModelConfig, where: str) -> None:
    """Refuse positions whose derived offsets move a patch entirely off the canvas.

    The stored offsets' rule, |d| <= (M − N)/2, is too strict here: configs with a margin smaller
    than the scan step are valid and run (the sweep's canvases without margin), their patches partly
    cut. But at |d| >= (M + N)/2 no pixel of the patch lands on the canvas, every re-extracted value
    is zero in every backend, and a comparison "passes" on nothing (one group member 1e7 pixels
    away did exactly that).
    """
    groups = np.asarray(fixture.groups, dtype=np.int64)
    d = _derived_offsets(_positions(fixture), groups)
    limit = (config.M + config.N) / 2
    bad = ~(np.abs(d) < limit)  # NaN is bad too
    if bad.any():
        g, c, k = _first_index(bad)
        axis, coords = ("dx", "xcoords") if k == 0 else ("dy", "ycoords")
        raise FixtureError(
            f"{where}: dataset {coords!r} puts member {c} of group {g} (position {int(groups[g, c])}) "
            f"{abs(d[g, c, k]):g} pixels from its group's mean position ({int(bad.sum())} values like it): the "
            f"offset derived from it, {axis} = {d[g, c, k]:g}, moves the patch entirely off the canvas (|{axis}| "
            f"must be below (M + N)/2 = {limit:g} pixels; M = {config.M}, N = {config.N}), so all its values would "
            "be zero and the comparison meaningless: check the positions' units and the dataset 'groups'"
        )


def check_offsets(fixture: FixtureData, config: ModelConfig, where: str | None = None) -> None:
    """Refuse offsets that do not fit the config's canvas (forward-model.md, section 4).

    Re-extraction translates the canvas by the raw offset d, so |dx|, |dy| <= (M − N)/2 for every
    stored offset, or the patch is cut from beyond the canvas. (The merge's own bound, on d − d̄, depends
    on the batch and is checked by :func:`iter_batches`.) Offsets derived from positions, when none are
    stored, must keep some of each patch on the canvas: |dx|, |dy| < (M + N)/2
    (:func:`_check_derived_offsets` says why not the stored bound).
    """
    where = where if where is not None else str(getattr(fixture, "path", "<unsaved fixture>"))
    if fixture.offsets is None:
        _check_derived_offsets(fixture, config, where)
        return
    d = np.asarray(fixture.offsets, dtype=np.float64)
    bad = ~(np.abs(d) <= canvas_margin(config))  # NaN is bad too
    if bad.any():
        g, c, k = _first_index(bad)
        raise FixtureError(
            f"{where}: dataset 'offsets' holds {'dx' if k == 0 else 'dy'} = {d[g, c, k]:g} for group {g}, member "
            f"{c} ({int(bad.sum())} values like it), beyond {_config_canvas(config)}: re-extraction, which "
            "translates the canvas by the raw offset, would cut the patch from outside the canvas"
        )


def normalised_input_scale(fixture: FixtureData, config: ModelConfig) -> float:
    """The factor taking stored amplitudes to the model input x = X·s (forward-model.md, section 2).

    X is the amplitude scaled so that the mean over ALL patterns of the fixture of Σ_xy X² is (N/2)²,
    whatever subset of groups is run, so a batch's values do not depend on ``max_groups``.
    """
    diff = np.asarray(fixture.diffraction, dtype=np.float64)
    mean_energy = float(np.mean(np.sum(diff * diff, axis=(-2, -1))))
    if not mean_energy > 0:
        raise FixtureError(
            f"{getattr(fixture, 'path', '<unsaved fixture>')}: dataset 'diffraction' is all zero; "
            "it cannot be normalised"
        )
    return (config.N / 2) / math.sqrt(mean_energy) * config.input_scale


def check_range(fixture: FixtureData, config: ModelConfig, max_groups: int | None = None) -> float:
    """Refuse, naming the config key, inputs that leave float32's range before any backend runs: a
    model input x = X·sqrt(nphotons)/(N/2) beyond float32's largest value, or a normalised probe that
    overflows or underflows to zero. Returns the factor taking stored amplitudes to x."""
    where = str(getattr(fixture, "path", "<unsaved fixture>"))
    biggest = float(np.finfo(np.float32).max)
    factor = normalised_input_scale(fixture, config)
    total = fixture.n_groups if max_groups is None else min(max_groups, fixture.n_groups)
    members = np.unique(np.asarray(fixture.groups[:total]))
    peak = float(np.max(np.abs(np.asarray(fixture.diffraction[members], dtype=np.float64)))) * factor
    if not peak <= biggest:
        raise ParityInputError(
            f"config key 'nphotons' ({config.nphotons:g}): the model input x = X·sqrt(nphotons)/(N/2) reaches "
            f"{peak:.3g} on {where}, beyond float32's range ({biggest:.3g})"
        )
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        probe = normalise_probe(fixture.probe, config.probe_scale)
    if not np.all(np.isfinite(probe)) or not np.any(probe):
        what = "overflows" if not np.all(np.isfinite(probe)) else "underflows to zero"
        raise ParityInputError(
            f"config key 'probe_scale' ({config.probe_scale:g}): the normalised probe, "
            f"probe / (probe_scale · mean|disk · probe|), {what} in complex64 for the probe of {where}"
        )
    return factor


def _stored_offsets(offsets: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """The batch offsets of groups ``idx``: the stored float64 values rounded once to float32."""
    return np.asarray(np.asarray(offsets)[idx], dtype=np.float64).astype(np.float32)


def _check_merge_shift(offsets: np.ndarray, idx: np.ndarray, batch_size: int, config: ModelConfig, where: str) -> None:
    """The merge moves patch (b, c) by −(d_bc − d̄), d̄ the mean of the batch's B·C offsets (float64
    here); it must stay within the canvas margin."""
    d = offsets.astype(np.float64)
    shift = d - d.reshape(-1, 2).mean(axis=0)
    bad = ~(np.abs(shift) <= canvas_margin(config))
    if bad.any():
        b, c, k = _first_index(bad)
        raise FixtureError(
            f"{where}: dataset 'offsets' of group {int(idx[b])}, member {c}, {'dx' if k == 0 else 'dy'} = "
            f"{d[b, c, k]:g} is {shift[b, c, k]:g} from the mean d̄ = {d[..., k].mean():g} of its batch (groups "
            f"{int(idx[0])} to {int(idx[-1])}, batch_size {batch_size}); the merge moves the patch by that much, "
            f"beyond {_config_canvas(config)}: use a smaller batch_size or offsets closer together"
        )


def iter_batches(
    fixture: FixtureData, config: ModelConfig, batch_size: int, max_groups: int | None = None
) -> Iterator[CanonicalBatch]:
    """Canonical batches of the fixture's groups, in group order; the last one may be smaller.

    ``max_groups`` keeps the first groups only (all of them when it is larger than their number).
    Offsets are the fixture's stored ``offsets`` (cast to float32, not centred) when it has them, and
    −(position − group mean) otherwise. Stored offsets must fit the canvas: |d| <= (M − N)/2 for every
    one (:func:`check_offsets`), and, since the merge moves each patch by −(d − d̄) with d̄ the mean of
    the batch's B·C offsets, |d − d̄| <= (M − N)/2 within every batch. Derived offsets must keep part of
    each patch on the canvas, |d| < (M + N)/2, for every group (:func:`check_offsets`).
    """
    where = str(getattr(fixture, "path", "<unsaved fixture>"))
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ParityInputError(f"batch_size is {batch_size!r}; expected an integer >= 1")
    if max_groups is not None and (isinstance(max_groups, bool) or not isinstance(max_groups, int) or max_groups < 1):
        raise ParityInputError(f"max_groups is {max_groups!r}; expected None or an integer >= 1")
    _check_config(int(fixture.N), int(fixture.gridsize), config, where)
    total = fixture.n_groups if max_groups is None else min(max_groups, fixture.n_groups)
    # Every batch is checked before the first is yielded, so a run fails before any backend runs.
    check_offsets(fixture, config, where)
    if fixture.offsets is not None:
        for start in range(0, total, batch_size):
            idx = np.arange(start, min(start + batch_size, total), dtype=np.int64)
            _check_merge_shift(_stored_offsets(fixture.offsets, idx), idx, batch_size, config, where)
    factor = check_range(fixture, config, max_groups)
    probe = normalise_probe(fixture.probe, config.probe_scale)
    diff = fixture.diffraction
    positions = _positions(fixture)
    for start in range(0, total, batch_size):
        idx = np.arange(start, min(start + batch_size, total), dtype=np.int64)
        members = np.asarray(fixture.groups[idx], dtype=np.int64)  # (B, C)
        x = (np.asarray(diff[members], dtype=np.float64) * factor).astype(np.float32)
        if fixture.offsets is None:
            offsets = _derived_offsets(positions, members).astype(np.float32)  # (B, C, 2) as [dx, dy]
        else:
            offsets = _stored_offsets(fixture.offsets, idx)
        batch = CanonicalBatch(x=x, offsets=offsets, probe=probe.copy(), groups=idx)
        batch.validate(config)
        yield batch


def _repo_fixtures_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "fixtures"


def bundled_fixtures_dir() -> Path:
    """Where the fixtures shipped with ptycho-parity live.

    A wheel carries them inside the package (``parity/_bundled_fixtures``); a source checkout or an
    editable install uses the repository's ``fixtures/``. The wheel location wins, and the checkout
    folder must contain ``make_fixtures.py``, so an unrelated top-level ``fixtures`` package next to
    an installed ``parity`` is never mistaken for ours.
    """
    packaged = importlib.resources.files("parity") / "_bundled_fixtures"
    if packaged.is_dir():
        return Path(str(packaged))
    repo = _repo_fixtures_dir()
    if (repo / "make_fixtures.py").is_file():
        return repo
    raise FixtureError(f"no bundled fixtures found (looked in {packaged} and {repo})")


def available_fixtures() -> list[str]:
    """Names of the bundled fixtures (file names without ``.h5``), sorted."""
    return sorted(p.stem for p in bundled_fixtures_dir().glob("*.h5"))


def _refuse_missing_path(name: str) -> None:
    """A name the user clearly meant as a file (a folder part, a suffix other than .h5, or a dangling
    symbolic link) is reported as a missing file, not as an unknown bundled fixture."""
    path = Path(name)
    if path.is_symlink() and not path.exists():
        raise FixtureError(
            f"{name}: fixture file does not exist (a symbolic link to {os.readlink(path)!r}, which does not)"
        )
    separators = {"/", "\\", os.sep} | ({os.altsep} if os.altsep else set())
    if any(sep in name for sep in separators) or path.suffix not in ("", ".h5"):
        if path.exists():
            return  # there after all: the caller decides what to do with it
        missing = next((p for p in reversed(path.parents) if not p.exists()), None)
        where = f"; folder {missing} does not exist" if missing is not None and str(missing) != "." else ""
        raise FixtureError(f"{name}: fixture file does not exist{where}")


def bundled_fixture(name: str) -> Path:
    """Path of the bundled fixture ``name`` (with or without ``.h5``)."""
    stem = name[:-3] if name.endswith(".h5") else name
    names = available_fixtures()
    if stem not in names or "/" in stem or "\\" in stem:
        _refuse_missing_path(name)
        raise FixtureError(f"bundled fixture {name!r} does not exist; available: {', '.join(names) or 'none'}")
    return bundled_fixtures_dir() / f"{stem}.h5"


def format_sha256sums(hashes: Mapping[str, str]) -> str:
    """``sha256sum`` format (two spaces, sorted by file name), so ``sha256sum -c`` can check it."""
    return "".join(f"{hashes[name]}  {name}\n" for name in sorted(hashes))


def read_sha256sums(path: str | os.PathLike[str]) -> dict[str, str]:
    p = Path(path)
    if not p.is_file():
        raise FixtureError(f"{p}: checksum file does not exist")
    out: dict[str, str] = {}
    for lineno, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        m = re.fullmatch(r"([0-9a-f]{64}) [ *](\S.*)", line)
        if m is None:
            raise FixtureError(f"{p}:{lineno}: not a sha256sum line: {line!r}")
        out[m.group(2)] = m.group(1)
    return out

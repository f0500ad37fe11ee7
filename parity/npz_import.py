"""Import a data set in the original PtychoPINN NPZ layout as a fixture.

Users who already have PtychoPINN data (simulated or measured) should be able to run the parity
suite on it without writing converters. The NPZ keys are read strictly: a missing key, a wrong shape,
a non-finite value or a negative amplitude is an error naming the file and the key, because a
silently reshaped or clipped array would make every later comparison meaningless. Keys other than
the ones listed below (PtychoPINN files carry many) are ignored.

Keys: ``diff3d`` or ``diffraction`` (n, N, N) amplitudes, ``xcoords`` and ``ycoords`` (n,) positions in
object pixels, ``probeGuess`` (N, N), optional ``objectGuess`` (H, W).

Optional grouped data, as PtychoPINN's grouping produces it (both keys or neither): ``nn_indices``
(n_groups, C) integer position indices, the groups, C = gridsize², used instead of the nearest-neighbour
groups; and ``coords_relative``, each member's group-relative offset in object pixels, with PtychoPINN's
sign (local_offset_sign = −1, so the same sign as the harness's −(position − origin)), in PtychoPINN's
layout (n_groups, 1, 2, C), [dx, dy] on axis 2, or in the fixture's (n_groups, C, 2). They become the
fixture datasets ``groups`` and ``offsets``: batches then carry these offsets as they are, not
re-centred, whatever origin they were measured from. Whether they fit a config's canvas is checked when
the fixture is loaded with that config. ``nn_indices`` without ``coords_relative`` is ignored, as before.
"""

from __future__ import annotations

import hashlib
import io
import lzma
import os
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from parity.batch import disk_mask
from parity.config import SUPPORTED_N
from parity.errors import FixtureError
from parity.fixture import FixtureData, write_fixture
from parity.simulate import nearest_neighbour_groups

DIFFRACTION_KEYS = ("diff3d", "diffraction")
OFFSETS_KEY = "coords_relative"
GROUPS_KEY = "nn_indices"


def _numeric(arr: np.ndarray, key: str, where: str, allow_complex: bool) -> None:
    kinds = "biufc" if allow_complex else "biuf"
    if arr.dtype.kind not in kinds or arr.dtype.kind == "b":
        what = "real or complex numbers" if allow_complex else "real numbers"
        raise FixtureError(f"{where}: key {key!r} has dtype {arr.dtype}; expected {what}")


def _finite(arr: np.ndarray, key: str, where: str) -> None:
    bad = ~np.isfinite(arr)
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise FixtureError(
            f"{where}: key {key!r} contains {int(bad.sum())} non-finite values (NaN or Inf); "
            f"first {arr[idx]} at index {idx}"
        )


def _member(npz: Any, key: str) -> str:
    """The zip member that holds ``key`` (numpy strips the ``.npy`` of a member's name)."""
    names = npz.zip.namelist() if getattr(npz, "zip", None) is not None else []
    return f"{key}.npy" if f"{key}.npy" in names else key


def _read(npz: Any, key: str, where: str) -> np.ndarray:
    try:
        return np.asarray(npz[key])
    except ValueError as exc:  # object arrays need pickle, which is never enabled for data files
        raise FixtureError(f"{where}: key {key!r} cannot be read without pickle ({exc})") from exc
    except (OSError, zipfile.BadZipFile, EOFError, zlib.error, lzma.LZMAError) as exc:
        raise FixtureError(f"{where}: key {key!r} cannot be read (corrupt? {exc})") from exc
    except RuntimeError as exc:
        # zipfile raises NotImplementedError for a compression method it lacks and RuntimeError for
        # an encrypted member: the archive is fine, but not one this reader (numpy's) can open.
        raise FixtureError(
            f"{where}: key {key!r} cannot be read: zip member {_member(npz, key)!r} uses a compression method "
            f"or encryption that Python's zipfile does not support ({exc}); write the NPZ with numpy.savez or "
            "numpy.savez_compressed"
        ) from exc


def _diffraction(npz: Any, keys: list[str], where: str) -> tuple[str, np.ndarray]:
    present = [k for k in DIFFRACTION_KEYS if k in keys]
    if not present:
        raise FixtureError(
            f"{where}: key 'diff3d' (or 'diffraction') is missing; keys present: {', '.join(keys) or 'none'}"
        )
    key = present[0]
    diff = _read(npz, key, where)
    if len(present) == 2 and not np.array_equal(diff, _read(npz, "diffraction", where)):
        raise FixtureError(f"{where}: keys 'diff3d' and 'diffraction' are both present and differ; keep one")
    _numeric(diff, key, where, allow_complex=False)
    if diff.ndim != 3 or diff.shape[1] != diff.shape[2] or diff.shape[0] < 1 or diff.shape[1] < 2:
        raise FixtureError(f"{where}: key {key!r} has shape {diff.shape}; expected (n, N, N) amplitudes")
    if diff.shape[1] % 2:
        raise FixtureError(f"{where}: key {key!r} has shape {diff.shape}; N must be even")
    if diff.shape[1] not in SUPPORTED_N:
        # A fixture of another N is valid as a file but no config runs it: say so now, not at the run.
        raise FixtureError(
            f"{where}: key {key!r} has shape {diff.shape}: patterns of N={diff.shape[1]}, and the model runs "
            f"N = {' or '.join(map(str, SUPPORTED_N))} only (config key 'N'); crop or bin them to one of those first"
        )
    _finite(diff, key, where)
    neg = diff < 0
    if neg.any():
        idx = tuple(int(i) for i in np.argwhere(neg)[0])
        raise FixtureError(
            f"{where}: key {key!r} has {int(neg.sum())} negative values; first {diff[idx]} at index {idx} "
            "(expected amplitudes, the square roots of counts)"
        )
    big = diff > np.finfo(np.float32).max
    if big.any():
        idx = tuple(int(i) for i in np.argwhere(big)[0])
        raise FixtureError(
            f"{where}: key {key!r} has {int(big.sum())} values beyond float32's range; first {diff[idx]} at index {idx}"
        )
    return key, diff.astype(np.float32)


def _grouped(npz: Any, keys: list[str], n: int, C: int, where: str) -> tuple[np.ndarray, np.ndarray] | None:
    """``nn_indices`` and ``coords_relative`` as fixture ``groups`` (g, C) and ``offsets`` (g, C, 2)."""
    if OFFSETS_KEY not in keys:
        return None
    if GROUPS_KEY not in keys:
        raise FixtureError(
            f"{where}: key {OFFSETS_KEY!r} needs key {GROUPS_KEY!r}, the groups its offsets belong to; "
            f"keys present: {', '.join(keys)}"
        )
    groups = _read(npz, GROUPS_KEY, where)
    if groups.dtype.kind not in "iu":
        raise FixtureError(f"{where}: key {GROUPS_KEY!r} has dtype {groups.dtype}; expected integers")
    if groups.ndim != 2 or groups.shape[0] < 1 or groups.shape[1] != C:
        raise FixtureError(
            f"{where}: key {GROUPS_KEY!r} has shape {groups.shape}; expected (n_groups, {C}), "
            f"C = gridsize² = {C} position indices per group"
        )
    out = (groups < 0) | (groups >= n)
    if out.any():
        idx = tuple(int(i) for i in np.argwhere(out)[0])
        raise FixtureError(
            f"{where}: key {GROUPS_KEY!r} holds position index {groups[idx]} at {idx}, outside [0, {n}) "
            f"({n} diffraction patterns)"
        )
    g = groups.shape[0]
    rel = _read(npz, OFFSETS_KEY, where)
    _numeric(rel, OFFSETS_KEY, where, allow_complex=False)
    if rel.shape == (g, 1, 2, C):  # PtychoPINN's layout: [x, y] on axis 2, group members on axis 3
        offsets = np.transpose(rel[:, 0], (0, 2, 1))
    elif rel.shape == (g, C, 2):
        offsets = rel
    else:
        raise FixtureError(
            f"{where}: key {OFFSETS_KEY!r} has shape {rel.shape}; expected ({g}, 1, 2, {C}) (PtychoPINN's "
            f"layout) or ({g}, {C}, 2), one [dx, dy] per member of the {g} groups of {GROUPS_KEY!r}"
        )
    _finite(rel, OFFSETS_KEY, where)
    return groups.astype(np.int64), np.ascontiguousarray(offsets, dtype=np.float64)


def import_npz(npz_path: str | os.PathLike[str], out_path: str | os.PathLike[str], gridsize: int) -> Path:
    """Validate a PtychoPINN NPZ, group its positions (C = gridsize² nearest) and write a fixture.

    When the NPZ holds ``coords_relative`` and ``nn_indices`` (see the module docstring), they are the
    fixture's ``offsets`` and ``groups`` instead.
    """
    p = Path(npz_path)
    where = str(p)
    out = Path(out_path)
    if out.is_dir():
        raise FixtureError(
            f"{out}: output is an existing folder; give the fixture file to write (e.g. {out / 'data.h5'})"
        )
    if not out.parent.is_dir():
        raise FixtureError(f"{out}: output folder {out.parent} does not exist")
    if isinstance(gridsize, bool) or not isinstance(gridsize, int) or gridsize < 1:
        raise FixtureError(f"{where}: gridsize {gridsize!r} is not an integer >= 1")
    if not p.is_file():
        raise FixtureError(f"{where}: NPZ file does not exist")
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise FixtureError(f"{where}: NPZ file cannot be read ({exc})") from exc
    try:
        npz = np.load(io.BytesIO(raw), allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise FixtureError(f"{where}: not a readable NPZ archive ({exc})") from exc
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise FixtureError(f"{where}: holds a single array, not an NPZ archive of named arrays")
    with npz:
        keys = list(npz.files)
        key, diffraction = _diffraction(npz, keys, where)
        n, N = diffraction.shape[0], diffraction.shape[1]
        coords: dict[str, np.ndarray] = {}
        for name in ("xcoords", "ycoords"):
            if name not in keys:
                raise FixtureError(f"{where}: key {name!r} is missing; keys present: {', '.join(keys)}")
            arr = _read(npz, name, where)
            _numeric(arr, name, where, allow_complex=False)
            if arr.shape != (n,):
                raise FixtureError(
                    f"{where}: key {name!r} has shape {arr.shape}; expected ({n},), one position per pattern of {key!r}"
                )
            _finite(arr, name, where)
            coords[name] = arr.astype(np.float64)
        if "probeGuess" not in keys:
            raise FixtureError(f"{where}: key 'probeGuess' is missing; keys present: {', '.join(keys)}")
        probe = _read(npz, "probeGuess", where)
        _numeric(probe, "probeGuess", where, allow_complex=True)
        if probe.shape != (N, N):
            raise FixtureError(
                f"{where}: key 'probeGuess' has shape {probe.shape}; expected ({N}, {N}) to match {key!r}"
            )
        _finite(probe, "probeGuess", where)
        probe64 = probe.astype(np.complex64)
        if not np.mean(np.abs(disk_mask(N) * probe64)) > 0:
            raise FixtureError(f"{where}: key 'probeGuess' is zero inside the disk mask (radius N/4)")
        obj: np.ndarray | None = None
        if "objectGuess" in keys:
            arr = _read(npz, "objectGuess", where)
            _numeric(arr, "objectGuess", where, allow_complex=True)
            if arr.ndim != 2 or arr.size == 0:
                raise FixtureError(f"{where}: key 'objectGuess' has shape {arr.shape}; expected (H, W)")
            _finite(arr, "objectGuess", where)
            obj = arr.astype(np.complex64)
        C = gridsize * gridsize
        grouped = _grouped(npz, keys, n, C, where)
    used = [key, "xcoords", "ycoords", "probeGuess"] + (["objectGuess"] if obj is not None else [])
    offsets: np.ndarray | None = None
    if grouped is not None:
        groups, offsets = grouped
        used += [GROUPS_KEY, OFFSETS_KEY]
        grouping = GROUPS_KEY
    else:
        if n < C:
            raise FixtureError(f"{where}: key {key!r} has {n} patterns; groups of gridsize² = {C} need at least {C}")
        groups = nearest_neighbour_groups(coords["xcoords"], coords["ycoords"], C)
        grouping = "nearest_neighbours"
    data = FixtureData(
        diffraction=diffraction,
        xcoords=coords["xcoords"],
        ycoords=coords["ycoords"],
        probe=probe64,
        groups=groups,
        object=obj,
        offsets=offsets,
        N=N,
        gridsize=gridsize,
        kind="npz",
        seed=-1,
        params={"diffraction_key": key, "keys_used": used, "grouping": grouping},
        source=f"npz:{p.name} sha256:{hashlib.sha256(raw).hexdigest()}",
    )
    return write_fixture(out_path, data)

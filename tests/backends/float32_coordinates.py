"""Float32 sample coordinates as implementations make them, for the error models' tests: rounded
once (j - d, ``translate``'s float32 mode) or on a normalised sampling grid (an affine grid, then
unnormalised, as torch's ``affine_grid`` and ``grid_sample`` and the PyTorch original compute them).
The values stay float64, so only the coordinates' error is left. Not a test module: the tests load
it by path (the suite imports in importlib mode, with no packages)."""

from __future__ import annotations

import numpy as np

from backends.reference import translate
from backends.reference.ops import pad_spatial
from backends.reference.physics import MERGE_EPSILON, centre_mask, merge_shift


def grid_coordinates(n: int, d: float, aligned: bool = False) -> np.ndarray:
    """The sample coordinates of n output pixels moved by d as a normalised sampling grid makes them
    in float32 (an affine grid, then unnormalised; align_corners false, or true as the PyTorch
    original's): several roundings, not one."""
    f = np.float32
    if aligned:
        base = f(-1) + f(2) * np.arange(n, dtype=f) / f(n - 1)
        return (((base - f(2) * f(d) / f(n - 1)) + f(1)) / f(2) * f(n - 1)).astype(np.float64)
    base = (f(2) * np.arange(n, dtype=f) + f(1)) / f(n) - f(1)
    moved = base - f(2) * f(d) / f(n)
    return (((moved + f(1)) * f(n) - f(1)) / f(2)).astype(np.float64)


def translate_on_a_grid(images: np.ndarray, shifts: np.ndarray, aligned: bool = False) -> np.ndarray:
    """Bilinear translation of (..., H, W) by (..., 2) shifts at ``grid_coordinates``."""
    H, W = images.shape[-2:]
    out = np.zeros(images.shape, dtype=np.complex128)
    for lead in np.ndindex(images.shape[:-2]):
        x, y = grid_coordinates(W, shifts[lead][0], aligned), grid_coordinates(H, shifts[lead][1], aligned)
        x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
        for yi, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
            for xi, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
                inside = ((yi >= 0) & (yi < H))[:, None] & ((xi >= 0) & (xi < W))[None, :]
                picked = images[lead][np.clip(yi, 0, H - 1)[:, None], np.clip(xi, 0, W - 1)[None, :]]
                out[lead] += wy[:, None] * wx[None, :] * np.where(inside, picked, 0)
    return out


def merged(patches: np.ndarray, offsets: np.ndarray, M: int, coordinates: str) -> np.ndarray:
    """The merge with float32 sample coordinates: rounded once (``translate``'s float32 mode) or on a
    normalised grid; the values themselves stay float64, so only the coordinates' error is left."""
    N = patches.shape[-1]
    pad, shift = (M - N) // 2, merge_shift(offsets)
    wide = (*patches.shape[:2], M, M)
    images = np.broadcast_to(pad_spatial(patches, pad), wide)
    mask = np.broadcast_to(pad_spatial(centre_mask(N), pad), wide)
    if coordinates in ("grid", "aligned grid"):
        aligned = coordinates == "aligned grid"
        moved = translate_on_a_grid(images, shift, aligned)
        covered = translate_on_a_grid(mask, shift, aligned).real
    else:
        moved, covered = translate(images, shift, np.float32), translate(mask, shift, np.float32)
    return moved.sum(axis=1, keepdims=True) / (covered.sum(axis=1, keepdims=True) + MERGE_EPSILON)

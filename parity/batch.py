"""The canonical batch: the exact arrays every backend receives (forward-model.md, section 2).

Backends get NumPy arrays in one fixed dtype and layout and convert them themselves; nothing about a
batch depends on a framework, which is what makes "identical inputs" checkable byte for byte.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from parity.config import ModelConfig
from parity.errors import ParityInputError


@dataclass(frozen=True)
class CanonicalBatch:
    """One batch of B groups of C = gridsize² patches.

    x: (B, C, N, N) float32, the model input X·s.
    offsets: (B, C, 2) float32, group-relative [dx, dy] in pixels (each group sums to zero when derived
        from positions; a fixture's stored offsets need not, nor need their batch mean d̄ be zero).
    probe: (N, N) complex64, already normalised.
    groups: (B,) int64, the fixture's group indices, so reports can point back into the data.
    """

    x: np.ndarray
    offsets: np.ndarray
    probe: np.ndarray
    groups: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def size(self) -> int:
        return int(self.x.shape[0])

    def validate(self, config: ModelConfig) -> None:
        """Raise if the arrays do not have the canonical dtypes and shapes for ``config``."""
        B, C, N = self.size, config.C, config.N
        expected = {
            "x": ((B, C, N, N), np.float32),
            "offsets": ((B, C, 2), np.float32),
            "probe": ((N, N), np.complex64),
        }
        for key, (shape, dtype) in expected.items():
            arr = getattr(self, key)
            if arr.shape != shape or arr.dtype != dtype:
                raise ParityInputError(
                    f"batch {key!r}: got shape {arr.shape} dtype {arr.dtype}; expected shape {shape} "
                    f"dtype {np.dtype(dtype)} for N={N}, gridsize={config.gridsize}"
                )


def disk_mask(N: int) -> np.ndarray:
    """Hard disk mask: pixel (i, j) has centre (i - N/2 + 0.5, j - N/2 + 0.5); inside when radius < N/4."""
    c = np.arange(N) - N / 2 + 0.5
    r2 = c[:, None] ** 2 + c[None, :] ** 2
    return (r2 < (N / 4) ** 2).astype(np.float64)


def normalise_probe(probe: np.ndarray, probe_scale: float) -> np.ndarray:
    """probe / (probe_scale · mean(|m·probe|)), m the hard disk mask, mean over all N² pixels."""
    p = np.asarray(probe, dtype=np.complex128)
    denom = probe_scale * np.mean(np.abs(disk_mask(p.shape[-1]) * p))
    if not np.isfinite(denom) or denom <= 0:
        raise ParityInputError(
            f"probe: probe_scale · mean|disk · probe| is {denom:g} (probe_scale={probe_scale:g}); "
            "it must be finite and > 0 to normalise the probe"
        )
    return (p / denom).astype(np.complex64)


def random_batch(config: ModelConfig, batch_size: int, seed: int = 0) -> CanonicalBatch:
    """A synthetic but physically plausible batch, for tests and property checks without a fixture.

    Offsets are sub-pixel and sum to zero per group, as the harness's group-relative offsets do.
    """
    rng = np.random.default_rng(seed)
    B, C, N = batch_size, config.C, config.N
    X = rng.gamma(2.0, 0.25, size=(B, C, N, N))
    X *= (N / 2) / np.sqrt(np.mean(np.sum(X**2, axis=(-2, -1))))
    x = (X * config.input_scale).astype(np.float32)
    raw = rng.uniform(-config.offset, config.offset, size=(B, C, 2))
    offsets = (raw - raw.mean(axis=1, keepdims=True)).astype(np.float32)
    c = np.arange(N) - N / 2 + 0.5
    r = np.sqrt(c[:, None] ** 2 + c[None, :] ** 2)
    probe = np.exp(-((r / (N / 5)) ** 4)) * np.exp(1j * 0.3 * (r / N) ** 2 * 2 * np.pi)
    return CanonicalBatch(
        x=x,
        offsets=offsets,
        probe=normalise_probe(probe, config.probe_scale),
        groups=np.arange(B, dtype=np.int64),
    )

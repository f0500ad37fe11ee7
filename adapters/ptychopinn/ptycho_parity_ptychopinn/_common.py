"""What the two adapters share, with no framework import: tap order, input taps, conv names, checks.

Kept apart from the adapters so that both produce taps the same way (canonical order, copies of
the inputs as received) and refuse the same bad input with the same message.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from parity.backend import Taps
from parity.batch import CanonicalBatch
from parity.config import ModelConfig
from parity.errors import BackendUnavailableError, ParityInputError
from parity.taps import HEADS, tap_specs
from parity.weights import parameter_shapes
from ptycho_parity_ptychopinn.locate import Original, OriginalUnavailableError, import_original

__all__ = ["HEADS", "conv_prefixes", "in_spec_order", "input_taps", "require_original", "tap_names"]


def require_original(backend: str, package: str, *submodules: str) -> Original:
    """The original ``package``, or BackendUnavailableError(backend, reason) saying why and what to do."""
    try:
        return import_original(package, *submodules)
    except OriginalUnavailableError as exc:
        raise BackendUnavailableError(backend, str(exc)) from None


def tap_names(config: ModelConfig) -> list[str]:
    """Every canonical tap of ``config``, in order of computation."""
    return [s.name for s in tap_specs(config, 1)]


def conv_prefixes(config: ModelConfig) -> list[str]:
    """Canonical convolution names (``encoder.block0.conv0``, ...) in the weights file's order."""
    return [name[: -len(".kernel")] for name in parameter_shapes(config) if name.endswith(".kernel")]


def input_taps(batch: CanonicalBatch, config: ModelConfig) -> Taps:
    """The inputs as this backend received them, as taps (copies, never views of the batch)."""
    B, C, N = batch.size, config.C, config.N
    return {
        "input.x": np.array(batch.x, copy=True),
        "input.offsets": np.array(batch.offsets, copy=True).reshape(B, C, 1, 2),
        "input.probe": np.array(batch.probe, copy=True).reshape(1, 1, N, N),
    }


def in_spec_order(taps: Mapping[str, np.ndarray], config: ModelConfig, batch_size: int) -> Taps:
    """Taps in the canonical order of computation; anything not in the spec keeps its place after.

    The order decides which tap the report calls the first divergence, so it must not depend on the
    order in which hooks happened to fire.
    """
    order = [s.name for s in tap_specs(config, batch_size)]
    out: Taps = {name: np.ascontiguousarray(taps[name]) for name in order if name in taps}
    out.update({name: np.ascontiguousarray(arr) for name, arr in taps.items() if name not in out})
    return out


def check_batch(batch: Any, config: ModelConfig) -> CanonicalBatch:
    """The batch, checked for canonical dtypes and shapes (a wrong batch is bad input, not a divergence)."""
    if not isinstance(batch, CanonicalBatch):
        raise ParityInputError(f"expected a parity.CanonicalBatch, got {type(batch).__name__}")
    batch.validate(config)
    return batch


def unused(names: Iterable[str], used: Iterable[str]) -> list[str]:
    """Names in ``names`` that are not in ``used``, in order (for strict weight loading messages)."""
    taken = set(used)
    return [n for n in names if n not in taken]

"""Compare on a subset of taps: wrap a built backend so that it returns only the named taps.

run_parity treats a tap that one side produces and another does not as a divergence, and a tap that
is not in the expected list as one too. When one implementation exposes fewer taps than the other
(an original model whose intermediate results are hidden inside a custom layer, say), wrap every
side in :class:`OnlyTaps` with the taps they have in common, and pass the same subset as ``expected``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from parity import Backend, Taps


class OnlyTaps(Backend):
    def __init__(self, inner: Backend, taps: Iterable[str]) -> None:
        super().__init__(inner.config, {}, inner.device)
        self.inner = inner
        self.taps = list(taps)
        # Backend declares these per class; a wrapper takes them from the backend it wraps.
        self.name = inner.name
        self.precision = inner.precision

    def forward(self, batch: Any) -> Taps:
        out = self.inner.forward(batch)
        return {name: out[name] for name in self.taps if name in out}  # a missing tap stays missing

    def effective_config(self) -> dict[str, Any]:
        return self.inner.effective_config()

    def environment(self) -> dict[str, Any]:
        return {**self.inner.environment(), "taps_compared": self.taps}

    def export_weights(self) -> dict[str, Any]:
        return self.inner.export_weights()

"""The backend interface: one small class per framework, in the manner of Polygraphy's runners.

The harness only ever sees NumPy arrays in the canonical layout coming out of :meth:`Backend.forward`,
plus two dictionaries describing what the backend actually built (its effective config) and where it
ran (its environment). Everything framework-specific stays behind this line, in ``backends/``.
"""

from __future__ import annotations

import abc
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import numpy as np

Taps = dict[str, np.ndarray]


class Backend(abc.ABC):
    """A model implementation the harness can drive.

    Subclasses set ``name`` (the registry key) and ``precision`` ("float32" or "float64"), and are
    constructed as ``cls(config, weights, device)``. ``config`` is a :class:`parity.config.ModelConfig`
    for PtychoPINN backends; a third-party backend pair may use any config object both sides share.
    Constructing a backend sets and verifies its precision and determinism controls.
    """

    name: str = ""
    precision: str = "float32"

    def __init__(self, config: Any, weights: Mapping[str, np.ndarray], device: str = "cpu") -> None:
        self.config = config
        self.device = device

    @classmethod
    def device_problem(cls, device: str) -> str | None:
        """Why this backend cannot run on ``device`` here, or None when it can.

        Cheap (no model is built), so the harness asks every backend before any work and a missing GPU
        is a clear input error, never a crash halfway or a quiet CPU run. The default accepts the CPU
        only; a backend that runs elsewhere says how to tell.
        """
        return None if device == "cpu" else f"backend {cls.name!r} runs on the CPU only, not on {device!r}"

    @classmethod
    def availability_problem(cls) -> str | None:
        """Why this backend cannot run here, found cheaply, or None when it may.

        A backend whose module imports its framework is unavailable when that import fails. A wrapper
        of code found at run time (an original located through an environment variable) imports
        without it; it says here what is missing, so ``ptycho-parity backends`` and every run report
        it as unavailable with the reason instead of failing when it is built.
        """
        return None

    @classmethod
    def shipped_deviations(cls) -> Path | None:
        """A deviation file (``parity.deviations``) shipped with this backend, or None.

        An adapter of an original that is known to differ declares it here, with reasons; runs
        apply it unless told not to (``--no-shipped-deviations``), and it is held as strictly as a
        user's own file: a declaration that stops reproducing fails the run.
        """
        return None

    @abc.abstractmethod
    def forward(self, batch: Any) -> Taps:
        """Run one forward pass and return every tap, in order of computation, as NumPy arrays.

        Layout is (B, channels, H, W); complex taps stay complex.
        """

    def exposed_taps(self) -> Collection[str] | None:
        """The canonical taps this backend computes for its config, or None for all of them.

        A wrapped original rarely exposes everything (no loss inside the model, an activation
        applied as a function no hook can see). Taps it declares unexposed are shown as "not
        exposed": neither failed nor counted as passed. A tap it declares but does not return is
        still a structure failure.
        """
        return None

    # Whether run_stage is implemented: a backend that cannot run a stage alone (a wrapped original
    # whose stages are not separable) keeps end-to-end parity only, and the report says so.
    runs_stages: bool = False

    def run_stage(self, stage: Any, inputs: Mapping[str, np.ndarray]) -> Taps:
        """Run one stage (``parity.stages.Stage``) on the reference's values of its inputs.

        ``inputs`` holds the stage's input taps in the canonical layout, already rounded to this
        backend's precision; the result holds the stage's output taps in that layout. This is what
        separates a layer that computes differently from error carried in from upstream.
        """
        raise NotImplementedError(f"backend {self.name!r} does not run stages alone")

    # Whether gradients is implemented: gradient parity compares only the backends that say so.
    computes_gradients: bool = False

    def gradients(self, batch: Any) -> Taps:
        """Gradients of both losses, each summed over the batch, w.r.t. every parameter and ``x``.

        Returns every tap of ``parity.taps.gradient_tap_specs`` for this batch, in that order and
        in the canonical parameter layout, computed at the loaded weights (nothing is updated). A
        float32 backend uses its framework's autograd; the float64 arbiter has its own adjoints.
        """
        raise NotImplementedError(f"backend {self.name!r} does not compute gradients")

    @abc.abstractmethod
    def effective_config(self) -> dict[str, Any]:
        """The configuration the backend really built, read back from the built model where possible."""

    @abc.abstractmethod
    def environment(self) -> dict[str, Any]:
        """Framework version, device, precision and determinism flags, as verified after setting them."""

    @abc.abstractmethod
    def export_weights(self) -> dict[str, np.ndarray]:
        """The model's parameters in the canonical names and layout (a round trip must be bit-exact)."""

    def error_scales(self, batch: Any, taps: Taps) -> Taps:
        """Per-element scales of the rounding error a float32 implementation makes at each tap.

        Only an arbiter (a float64 backend) can offer them: for the batch it just ran, and its own
        ``taps`` of that batch, it returns {tap: S} with S broadcastable to the tap, such that a
        faithful float32 computation is expected to be within about u·S of the exact value
        (u = 2⁻²⁴). The harness turns them into tolerances (``parity.tolerances``). The default,
        {}, makes the harness fall back to the magnitude of the values compared, patch by patch.
        """
        return {}

    def local_error_scales(self, batch: Any, taps: Taps) -> Taps:
        """Like :meth:`error_scales`, for layer-local parity: the error a float32 implementation makes
        at each tap when its stage is fed the reference's inputs rounded to float32, so no error is
        carried in from earlier stages. The default, {}, falls back to the magnitude as above.
        """
        return {}

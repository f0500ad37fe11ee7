"""The float64 NumPy reference backend: the side that says which float32 backend is wrong."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from backends.reference import backward
from backends.reference.gradient_error_model import gradient_error_scales
from backends.reference.model import ReferenceModel
from parity.backend import Backend, Taps
from parity.batch import CanonicalBatch
from parity.config import ModelConfig
from parity.errors import ParityInputError
from parity.stages import Stage
from parity.taps import GRAD, gradient_tap_specs, tap_specs
from parity.weights import validate_weights

_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _blas_info() -> dict[str, Any]:
    """Name and version of the BLAS NumPy was built against, from its build record (no probing)."""
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    except (KeyError, TypeError, ValueError):
        return {}
    return {key: str(blas[key]) for key in ("name", "version") if key in blas}


def _offsets(tap: np.ndarray) -> np.ndarray:
    """The offsets tap (B, C, 1, 2) as the model takes them, (B, C, 2)."""
    return tap.reshape(tap.shape[0], tap.shape[1], 2)


class ReferenceBackend(Backend):
    """Canonical forward model in float64 / complex128 on the CPU.

    Inputs arrive as the canonical float32 / complex64 batch, are echoed unchanged as the input taps,
    and are widened to float64 before any arithmetic, so the reference itself adds no float32 error.
    """

    name: str = "reference"
    precision: str = "float64"

    def __init__(self, config: ModelConfig, weights: Mapping[str, np.ndarray], device: str = "cpu") -> None:
        if not isinstance(config, ModelConfig):
            raise TypeError(f"reference backend: config must be a parity ModelConfig, got {type(config).__name__}")
        validate_weights(weights, config)
        if device != "cpu":
            raise ParityInputError(
                f"reference backend: device={device!r} is not supported; the NumPy reference runs on "
                "device='cpu' only (it is the CPU arbiter whatever device the framework backends use)"
            )
        super().__init__(config, weights, device)
        self.model = ReferenceModel(config, weights)

    def forward(self, batch: CanonicalBatch) -> Taps:
        batch.validate(self.config)
        B, C, N = batch.size, self.config.C, self.config.N
        taps: Taps = {
            "input.x": batch.x.copy(),
            "input.offsets": batch.offsets.reshape(B, C, 1, 2).copy(),
            "input.probe": batch.probe.reshape(1, 1, N, N).copy(),
        }
        self.model.forward(
            batch.x.astype(np.float64),
            batch.offsets.astype(np.float64),
            batch.probe.astype(np.complex128).reshape(1, 1, N, N),
            taps,
        )
        return {name: np.ascontiguousarray(value) for name, value in taps.items()}

    computes_gradients = True

    def gradients(self, batch: CanonicalBatch) -> Taps:
        """Both losses' gradients from the hand-written adjoints (``backward``), in float64, with the
        batch widened exactly as ``forward`` widens it, so they are the derivatives of its taps."""
        batch.validate(self.config)
        N = self.config.N
        grads = backward.gradients(
            self.model,
            batch.x.astype(np.float64),
            batch.offsets.astype(np.float64),
            batch.probe.astype(np.complex128).reshape(1, 1, N, N),
        )
        # np.asarray, not ascontiguousarray, which would turn log_scale's 0-d gradient into shape (1,).
        return {s.name: np.asarray(grads[s.name], order="C") for s in gradient_tap_specs(self.config, batch.size)}

    def error_scales(self, batch: CanonicalBatch, taps: Taps) -> Taps:
        """The float32 error scale of every tap in ``taps`` (``error_model`` for the forward taps,
        ``gradient_error_model`` for the gradient taps), from this backend's taps of ``batch``.

        The gradient scales need the whole forward pass (its taps and their scales); when ``taps``
        holds gradients but not every forward tap, the forward pass is run again here.
        """
        N = self.config.N
        offsets = batch.offsets.astype(np.float64)
        probe = batch.probe.astype(np.complex128).reshape(1, 1, N, N)
        forward = {name: np.asarray(v) for name, v in taps.items() if not name.startswith(GRAD + ".")}
        wanted = [name for name in taps if name.startswith(GRAD + ".")]
        if not wanted:
            return self.model.error_scales(forward, offsets, probe)
        if any(s.name not in forward for s in tap_specs(self.config, batch.size)):
            forward = {**self.forward(batch), **forward}
        scales = self.model.error_scales(forward, offsets, probe)
        values = {name: np.asarray(taps[name]) for name in wanted}
        if any(s.name not in values for s in gradient_tap_specs(self.config, batch.size)):
            values = {**self.gradients(batch), **values}
        grads = gradient_error_scales(self.model, forward, scales, offsets, probe, values)
        out = {name: scales[name] for name in taps if name in scales}
        out.update({name: grads[name] for name in wanted if name in grads})
        return out

    def local_error_scales(self, batch: CanonicalBatch, taps: Taps) -> Taps:
        """The error scale of every tap when its stage starts from the reference's inputs rounded to
        float32 (layer-local parity)."""
        N = self.config.N
        return self.model.error_scales(
            {name: np.asarray(v) for name, v in taps.items() if not name.startswith(GRAD + ".")},
            batch.offsets.astype(np.float64),
            batch.probe.astype(np.complex128).reshape(1, 1, N, N),
            local=True,
        )

    runs_stages = True

    def run_stage(self, stage: Stage, inputs: Mapping[str, np.ndarray]) -> Taps:
        """The stage in float64 on its inputs, widened first (it is fed its own taps in tests and by
        users checking a stage by hand; the harness compares float32 backends against its forward)."""
        m = self.model
        values = [
            np.asarray(inputs[n]).astype(np.complex128 if np.iscomplexobj(inputs[n]) else np.float64)
            for n in stage.inputs
        ]
        taps: Taps = {}
        kind, first = stage.kind, values[0]
        if kind == "input":
            m.scale_input(first, taps)
        elif kind == "encoder":
            assert stage.block is not None
            m.encoder[stage.block](first, taps)
        elif kind == "decoder":
            assert stage.branch is not None and stage.block is not None
            m.heads[stage.branch].decoder[stage.block](first, taps)
        elif kind == "head":
            assert stage.branch is not None
            m.head(stage.branch, first, taps)
        elif kind == "patches":
            m.object_patches(first, values[1], taps)
        elif kind == "merge":
            m.trim(m.merge(first, _offsets(values[1]), taps), taps)
        elif kind == "reextract":
            m.reextract(first, _offsets(values[1]), taps)
        elif kind == "illuminate":
            m.illuminate(first, values[1], taps)
        elif kind == "diffract":
            m.diffract(first, taps)
        elif kind == "output":
            m.outputs(first, taps)
        elif kind == "loss":
            m.losses(first, values[1], values[2], taps)
        else:
            raise ValueError(f"reference backend: unknown stage kind {kind!r} of stage {stage.name!r}")
        return {name: np.ascontiguousarray(taps[name]) for name in stage.outputs}

    def effective_config(self) -> dict[str, Any]:
        """Structural keys and the canvas read back from the built model; the rest from the config.

        offset and max_position_jitter only enter the model through the canvas size M (reported as
        canvas_size, as built), and probe_scale and nphotons not at all (they shape the batch and the
        initial log_scale), so those four come from the config.
        """
        built = self.model.built_config()
        requested = self.config.to_dict()
        return {**{key: built.get(key, value) for key, value in requested.items()}, "canvas_size": self.model.M}

    def environment(self) -> dict[str, Any]:
        dtypes = sorted({str(conv.kernel.dtype) for conv in self.model.convs()})
        return {
            "framework": "numpy",
            "framework_version": np.__version__,
            "numpy_version": np.__version__,
            "device": self.device,
            "dtype": dtypes[0] if len(dtypes) == 1 else ",".join(dtypes),
            "complex_dtype": "complex128",
            "blas": _blas_info(),
            "blas_threads": {var: os.environ.get(var, "default") for var in _THREAD_VARIABLES},
            # NumPy has no reduced-precision matmul mode and no nondeterministic kernels to switch off.
            "tf32": False,
            "deterministic": True,
        }

    def export_weights(self) -> dict[str, np.ndarray]:
        return self.model.export_weights()

    def parameter_count(self) -> int:
        """Convolution weights and biases of the built model (log_scale excluded)."""
        return self.model.parameter_count()

"""The PyTorch adapter: builds the canonical model, sets the precision controls, returns NumPy taps."""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from backends.torch.model import (
    ACTIVATION_NAMES,
    PtychoPINN,
    export_canonical_weights,
    torch_parameter_name,
)
from parity.backend import Backend, Taps
from parity.batch import CanonicalBatch
from parity.config import ModelConfig
from parity.errors import ParityInputError
from parity.stages import Stage
from parity.taps import GRAD, LOSSES, gradient_tap_specs, tap_specs
from parity.weights import parameter_shapes, validate_weights

SEED = 0
# cuBLAS refuses deterministic mode without a fixed workspace; it must be set before CUDA starts.
CUBLAS_WORKSPACE = ":4096:8"


def device_problem(device: str) -> str | None:
    """Why torch cannot run on ``device`` here ('cpu', 'cuda' or 'cuda:<n>'), or None."""
    if device == "cpu":
        return None
    if device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        if not torch.cuda.is_available():
            return (
                f"torch backend: device {device!r} was requested but torch.cuda.is_available() is False "
                f"(torch {torch.__version__}, built with CUDA {torch.version.cuda or 'none'}); "
                "install a CUDA build of torch on a machine with a GPU, or use device 'cpu'"
            )
        index = int(device[5:]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            return f"torch backend: device {device!r} does not exist (torch sees {torch.cuda.device_count()} GPUs)"
        return None
    return f"torch backend: device {device!r} is not supported; use 'cpu' or 'cuda'"


def resolve_device(device: str) -> torch.device:
    """The torch device for ``device``; one that is asked for but absent is an input error, never a CPU run."""
    problem = device_problem(device)
    if problem is not None:
        raise ParityInputError(problem)
    return torch.device(device)


def use_deterministic_algorithms() -> None:
    """``torch.use_deterministic_algorithms(True)`` without loading TorchInductor when nothing needs it.

    The public call imports ``torch._inductor`` (and Dynamo with it) only to set Inductor's own
    flag: about 1.2 s of every process that builds this backend, a CPU core's worth of each parity
    suite worker's start, for a compiler no backend here uses. So while Inductor is not loaded, the
    flag ATen's kernels read is set directly; once it is loaded (the process compiles something), or
    in a torch whose setter is gone or did not set it, the public call sets both. ``environment()``
    reads the flag back through the public getters either way.
    """
    setter = getattr(torch._C, "_set_deterministic_algorithms", None)
    if setter is not None and "torch._inductor" not in sys.modules:
        with contextlib.suppress(TypeError):  # a private setter whose signature has changed
            setter(True, warn_only=False)
        if torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled():
            return
    torch.use_deterministic_algorithms(True)


def set_precision_controls(device: torch.device) -> None:
    """Process-wide: TF32 off, deterministic kernels, no autotuning, fixed seed (harness.md)."""
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    use_deterministic_algorithms()
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.manual_seed(SEED)


def _canonical_gradient(name: str, grad: torch.Tensor) -> np.ndarray:
    """The gradient w.r.t. ``name`` (a canonical parameter or ``input.x``) as a float32 array in the
    canonical layout. A kernel's (out, in, kh, kw) becomes (kh, kw, in, out), the permutation
    ``export_canonical_weights`` applies, so a gradient and its parameter share one layout; chosen by
    name, not by rank, because the input's gradient is 4-D too and already canonical."""
    arr = grad.detach().cpu().numpy()
    if name.endswith(".kernel"):
        arr = arr.transpose(2, 3, 1, 0)
    return np.array(arr, dtype=np.float32, order="C")


class TorchBackend(Backend):
    """PtychoPINN in PyTorch, float32 / complex64, on CPU or one CUDA device."""

    name: str = "torch"
    precision: str = "float32"
    # The model built; a subclass of PtychoPINN overriding a stage or build hook plants a bug (a seam).
    model_class: type[PtychoPINN] = PtychoPINN

    @classmethod
    def device_problem(cls, device: str) -> str | None:
        return device_problem(device)

    def __init__(self, config: ModelConfig, weights: Mapping[str, np.ndarray], device: str = "cpu") -> None:
        validate_weights(weights, config)
        super().__init__(config, weights, device)
        self.torch_device = resolve_device(device)
        set_precision_controls(self.torch_device)
        model = self.model_class(config)
        model.load_weights(weights)
        self.model = model.to(self.torch_device).eval()

    def forward(self, batch: CanonicalBatch) -> Taps:
        batch.validate(self.config)
        dev = self.torch_device
        B, C, N = batch.size, self.config.C, self.config.N
        with torch.inference_mode():
            # torch.tensor copies, so the taps never alias the caller's arrays.
            x = torch.tensor(batch.x, device=dev)
            offsets = torch.tensor(batch.offsets, device=dev)
            probe = torch.tensor(batch.probe, device=dev)
            computed = self.model(x, offsets, probe)
            tensors = {
                "input.x": x,
                "input.offsets": offsets.reshape(B, C, 1, 2),
                "input.probe": probe.reshape(1, 1, N, N),
                **computed,
            }
            taps = {name: np.ascontiguousarray(t.detach().cpu().numpy()) for name, t in tensors.items()}
        return self._in_spec_order(taps, B)

    computes_gradients = True

    def gradients(self, batch: CanonicalBatch) -> Taps:
        """One forward pass with autograd on, then one ``torch.autograd.grad`` per loss.

        The graph is built here rather than in ``forward``, which stays under inference mode and
        so as fast as before. ``autograd.grad`` returns the gradients instead of accumulating them
        into ``.grad``, so nothing is left on the model, and the parameters are only read. The model
        is ``model_class``'s, so a planted bug changes the gradients as it changes the forward.
        """
        batch.validate(self.config)
        dev = self.torch_device
        names = list(parameter_shapes(self.config))
        params = dict(self.model.named_parameters())
        sources = [params[torch_parameter_name(name)] for name in names]
        # Explicitly out of inference mode and into grad mode, whatever the caller's context is.
        with torch.inference_mode(False), torch.enable_grad():
            x = torch.tensor(batch.x, device=dev, requires_grad=True)
            offsets = torch.tensor(batch.offsets, device=dev)
            probe = torch.tensor(batch.probe, device=dev)
            computed = self.model(x, offsets, probe)
            found: dict[str, np.ndarray] = {}
            for i, loss in enumerate(LOSSES):
                total = computed[f"loss.{loss}"].sum()
                # The graph is kept for the next loss only. materialize_grads: a parameter a mutated
                # model leaves unused has gradient zero, not None.
                grads = torch.autograd.grad(
                    total, [*sources, x], retain_graph=i + 1 < len(LOSSES), materialize_grads=True
                )
                for name, grad in zip([*names, "input.x"], grads, strict=True):
                    found[f"{GRAD}.{loss}.{name}"] = _canonical_gradient(name, grad)
        return {spec.name: found[spec.name] for spec in gradient_tap_specs(self.config, batch.size)}

    runs_stages = True

    def run_stage(self, stage: Stage, inputs: Mapping[str, np.ndarray]) -> Taps:
        with torch.inference_mode():
            tensors = [torch.tensor(np.asarray(inputs[n]), device=self.torch_device) for n in stage.inputs]
            computed = self.model.run_stage(stage, tensors)
            return {name: np.ascontiguousarray(t.detach().cpu().numpy()) for name, t in computed.items()}

    def _in_spec_order(self, taps: dict[str, np.ndarray], B: int) -> Taps:
        """Order taps as tap_specs lists them. Shapes, dtypes and missing or extra taps are the
        harness's to judge (it reports them at their place in the order), so nothing is checked here."""
        order = [s.name for s in tap_specs(self.config, B)]
        out: Taps = {name: taps[name] for name in order if name in taps}
        out.update({name: arr for name, arr in taps.items() if name not in out})
        return out

    def effective_config(self) -> dict[str, Any]:
        m = self.model
        N = m.patch_size
        first = m.encoder.blocks()[0]
        assert isinstance(first, nn.Module)
        conv0 = first.conv0
        assert isinstance(conv0, nn.Conv2d)
        gridsize = math.isqrt(conv0.in_channels)
        base = 32 if N == 64 else 16
        amp_head = m.amp.head
        pad_object = amp_head.centre is not None
        probe_big = amp_head.border is not None if pad_object else m.probe_big_requested
        offset = self.config.offset
        return {
            "N": N,
            "gridsize": gridsize,
            "n_filters_scale": conv0.out_channels // base,
            # The class read back where it is one of the four; a subclass's own module (a planted
            # bug) reports the name it was built for, as a port's own name table would.
            "amp_activation": ACTIVATION_NAMES.get(type(amp_head.activation), m.amp_activation_name),
            "object_big": m.object_big,
            "probe_big": probe_big,
            "probe_mask": m.disk is not None,
            "pad_object": pad_object,
            # Not used by the model (the harness normalises the probe and scales the input).
            "probe_scale": self.config.probe_scale,
            "nphotons": self.config.nphotons,
            # offset and the jitter margin only enter the model through the canvas, read back here.
            "offset": offset,
            "max_position_jitter": self.config.max_position_jitter,
            "canvas_size": m.canvas_size,
        }

    def environment(self) -> dict[str, Any]:
        dev = self.torch_device
        cuda: Any = torch.cuda  # some of torch.cuda / torch.backends.cudnn is untyped
        cudnn: Any = torch.backends.cudnn
        mkldnn: Any = torch.backends.mkldnn
        env: dict[str, Any] = {
            "framework": "torch",
            "framework_version": torch.__version__,
            "device": str(dev),
            "device_name": cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "dtype": "float32",
            "numpy_version": np.__version__,
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "deterministic_warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
            "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
            "cuda_matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
            "seed": int(torch.initial_seed()),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # ATen's kernels (ATEN_CPU_CAPABILITY)
            "mkl_enable_instructions": os.environ.get("MKL_ENABLE_INSTRUCTIONS", "unset"),
            "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "unset"),
            "threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(),
            "mkldnn_enabled": bool(torch.backends.mkldnn.enabled),
            "mkldnn_available": bool(mkldnn.is_available()),
            "cuda_version": torch.version.cuda,
            "cudnn_version": cudnn.version() if cudnn.is_available() else None,
            "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        }
        return env

    def export_weights(self) -> dict[str, np.ndarray]:
        return export_canonical_weights(self.model, list(parameter_shapes(self.config)))

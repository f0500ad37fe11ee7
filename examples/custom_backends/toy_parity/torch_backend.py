"""The PyTorch side: the model, the canonical-weights conversion, taps through forward hooks."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from parity import Backend, Taps
from parity.errors import ParityInputError
from toy_parity.spec import LAYERS, ToyConfig, parameter_shapes, validate_batch, validate_weights

SEED = 0


class ToyNet(nn.Module):
    """conv → ReLU → flatten → dense → softmax; every tapped step is its own named submodule."""

    def __init__(self, config: ToyConfig) -> None:
        super().__init__()
        self.conv = nn.Conv2d(config.in_channels, config.filters, 3, padding=1)
        self.relu = nn.ReLU()
        self.flatten = nn.Flatten()  # (B, F, S, S) → (B, F·S·S) in (channel, row, column) order
        self.dense = nn.Linear(config.flat_features, config.classes)
        self.softmax = nn.Softmax(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.softmax(self.dense(self.flatten(self.relu(self.conv(x)))))
        return y


def to_torch_state(weights: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Canonical weights → a state dict: conv (kh, kw, in, out) → (out, in, kh, kw), dense (in, out) → (out, in)."""
    state = {
        "conv.weight": weights["conv.kernel"].transpose(3, 2, 0, 1),
        "conv.bias": weights["conv.bias"],
        "dense.weight": weights["dense.kernel"].T,
        "dense.bias": weights["dense.bias"],
    }
    return {name: torch.from_numpy(np.array(value, dtype=np.float32)) for name, value in state.items()}


def from_torch_state(state: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The inverse of :func:`to_torch_state` (bit-exact: transposes only)."""
    arr = {name: t.detach().cpu().numpy() for name, t in state.items()}
    return {
        "conv.kernel": np.ascontiguousarray(arr["conv.weight"].transpose(2, 3, 1, 0)),
        "conv.bias": arr["conv.bias"].copy(),
        "dense.kernel": np.ascontiguousarray(arr["dense.weight"].T),
        "dense.bias": arr["dense.bias"].copy(),
    }


def collect_taps(model: nn.Module, names: Sequence[str], *inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Run ``model(*inputs)`` once and return the output of every named submodule, via forward hooks.

    Outputs are cloned as they pass, so an in-place operation later in the forward pass cannot change
    a tap after it was taken. A submodule that runs twice in one pass (one activation module reused
    by two layers, say) is an error: its two outputs would overwrite each other under one name.
    """
    captured: dict[str, torch.Tensor] = {}

    def hook_for(name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            if name in captured:
                raise RuntimeError(f"submodule {name!r} ran twice in one forward pass; tap another module")
            captured[name] = output.detach().clone()

        return hook

    handles = [model.get_submodule(name).register_forward_hook(hook_for(name)) for name in names]
    try:
        model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in names if name not in captured]
    if missing:
        raise RuntimeError(f"submodules {missing} never ran, so their taps are missing")
    return {name: captured[name] for name in names}


def resolve_device(device: str) -> torch.device:
    """'cpu' or 'cuda[:n]'; a GPU asked for but absent is an error, never a silent CPU run."""
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        if not torch.cuda.is_available():
            raise RuntimeError(f"toy-torch: device {device!r} requested but torch sees no CUDA device")
        return torch.device(device)
    raise ParityInputError(f"toy-torch: device {device!r} is not supported; use 'cpu' or 'cuda'")


def set_precision_controls() -> None:
    """TF32 off, deterministic kernels, fixed seed. Process-wide, so set on every construction."""
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.benchmark = False
    torch.manual_seed(SEED)


class ToyTorchBackend(Backend):
    name: str = "toy-torch"
    precision: str = "float32"

    def __init__(self, config: ToyConfig, weights: Mapping[str, np.ndarray], device: str = "cpu") -> None:
        validate_weights(weights, config)
        super().__init__(config, weights, device)
        self.torch_device = resolve_device(device)
        set_precision_controls()
        model = ToyNet(config)
        model.load_state_dict(to_torch_state(weights), strict=True)  # by name; strict: nothing left out
        self.model = model.to(self.torch_device).eval()

    def forward(self, batch: np.ndarray) -> Taps:
        x = validate_batch(batch, self.config)
        with torch.inference_mode():
            computed = collect_taps(self.model, LAYERS, torch.tensor(x, device=self.torch_device))
        taps: Taps = {"input.x": np.array(x, copy=True)}
        for name, tensor in computed.items():
            value = tensor.cpu().numpy()
            # Vectors (B, K) become (B, K, 1, 1); feature maps are already (B, C, H, W).
            taps[name] = value.reshape(*value.shape, 1, 1) if value.ndim == 2 else value
        return taps

    def effective_config(self) -> dict[str, Any]:
        conv, dense = self.model.conv, self.model.dense
        return {
            "in_channels": conv.in_channels,
            "size": math.isqrt(dense.in_features // conv.out_channels),
            "filters": conv.out_channels,
            "classes": dense.out_features,
        }

    def environment(self) -> dict[str, Any]:
        return {
            "framework": "torch",
            "framework_version": torch.__version__,
            "device": str(self.torch_device),
            "dtype": str(self.model.conv.weight.dtype).removeprefix("torch."),
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
            "cuda_matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "threads": torch.get_num_threads(),
            "seed": int(torch.initial_seed()),
        }

    def export_weights(self) -> dict[str, np.ndarray]:
        exported = from_torch_state(self.model.state_dict())
        return {name: exported[name] for name in parameter_shapes(self.config)}

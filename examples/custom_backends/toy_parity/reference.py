"""The float64 NumPy reference: the arbiter that says which float32 side is off when two disagree."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from parity import Backend, Taps
from parity.errors import ParityInputError
from toy_parity.spec import ToyConfig, validate_batch, validate_weights


def conv3x3_same(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Cross-correlation (what both frameworks call convolution), one pixel of zero padding."""
    B, _, H, W = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.zeros((B, kernel.shape[3], H, W))
    for i in range(3):
        for j in range(3):
            out += np.einsum("bchw,cf->bfhw", padded[:, :, i : i + H, j : j + W], kernel[i, j])
    out += bias[None, :, None, None]
    return out


class ToyReferenceBackend(Backend):
    name: str = "toy-reference"
    precision: str = "float64"

    def __init__(self, config: ToyConfig, weights: Mapping[str, np.ndarray], device: str = "cpu") -> None:
        validate_weights(weights, config)
        if device != "cpu":
            raise ParityInputError(f"toy-reference: runs on 'cpu' only, got device {device!r}")
        super().__init__(config, weights, device)
        self.params = {name: np.asarray(value, dtype=np.float64) for name, value in weights.items()}

    def forward(self, batch: np.ndarray) -> Taps:
        x = validate_batch(batch, self.config)
        p = self.params
        conv = conv3x3_same(x.astype(np.float64), p["conv.kernel"], p["conv.bias"])
        relu = np.maximum(conv, 0.0)
        dense = relu.reshape(len(x), -1) @ p["dense.kernel"] + p["dense.bias"]
        e = np.exp(dense - dense.max(axis=1, keepdims=True))
        softmax = e / e.sum(axis=1, keepdims=True)
        return {
            "input.x": np.array(x, copy=True),
            "conv": conv,
            "relu": relu,
            "dense": dense[:, :, None, None],
            "softmax": softmax[:, :, None, None],
        }

    def effective_config(self) -> dict[str, Any]:
        kernel, dense = self.params["conv.kernel"], self.params["dense.kernel"]
        return {
            "in_channels": kernel.shape[2],
            "size": math.isqrt(dense.shape[0] // kernel.shape[3]),
            "filters": kernel.shape[3],
            "classes": dense.shape[1],
        }

    def environment(self) -> dict[str, Any]:
        return {
            "framework": "numpy",
            "framework_version": np.__version__,
            "device": "cpu",
            "dtype": "float64",
            "tf32": False,
            "deterministic": True,
        }

    def export_weights(self) -> dict[str, np.ndarray]:
        return {name: value.astype(np.float32) for name, value in self.params.items()}

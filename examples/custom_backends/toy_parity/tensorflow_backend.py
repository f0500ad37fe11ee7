"""The TensorFlow / Keras 3 side: the model, the canonical-weights conversion, taps through a second
Keras model whose outputs are the intermediate layers, channels_last turned into (B, C, H, W)."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported

from collections.abc import Mapping, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from parity import Backend, Taps
from parity.errors import ParityInputError, WeightsError
from toy_parity.spec import LAYERS, ToyConfig, parameter_shapes, validate_batch, validate_weights

SEED = 0


def build_model(config: ToyConfig) -> Any:
    """The Keras model in its native channels_last layout; layer names match the canonical names."""
    inputs = keras.Input((config.size, config.size, config.in_channels), name="x")
    h = keras.layers.Conv2D(config.filters, 3, padding="same", name="conv")(inputs)
    h = keras.layers.ReLU(name="relu")(h)
    h = keras.layers.Flatten(name="flatten")(h)  # (B, S, S, F) → (B, S·S·F) in (row, column, channel) order
    h = keras.layers.Dense(config.classes, name="dense")(h)
    outputs = keras.layers.Softmax(name="softmax")(h)
    return keras.Model(inputs, outputs, name="toy")


def tap_model(model: Any, names: Sequence[str]) -> Any:
    """A second model over the same layers (so the same weights) whose outputs are the named layers'."""
    return keras.Model(model.inputs, [model.get_layer(name).output for name in names])


def to_keras_weights(weights: Mapping[str, np.ndarray], config: ToyConfig) -> dict[str, list[np.ndarray]]:
    """Canonical weights → {layer name: layer.get_weights() layout}.

    The conv kernel is already (kh, kw, in, out). The dense kernel's rows must be reordered: canonical
    rows follow the (channel, row, column) flattening of (B, C, H, W), Keras's Flatten of a
    channels_last tensor gives (row, column, channel).
    """
    F, S, K = config.filters, config.size, config.classes
    dense = weights["dense.kernel"].reshape(F, S, S, K).transpose(1, 2, 0, 3).reshape(S * S * F, K)
    return {
        "conv": [weights["conv.kernel"], weights["conv.bias"]],
        "dense": [np.ascontiguousarray(dense), weights["dense.bias"]],
    }


def from_keras_weights(layers: Mapping[str, Sequence[np.ndarray]], config: ToyConfig) -> dict[str, np.ndarray]:
    """The inverse of :func:`to_keras_weights` (bit-exact: reshapes and transposes only)."""
    F, S, K = config.filters, config.size, config.classes
    kernel, bias = layers["dense"]
    dense = np.asarray(kernel).reshape(S, S, F, K).transpose(2, 0, 1, 3).reshape(F * S * S, K)
    return {
        "conv.kernel": np.array(layers["conv"][0]),
        "conv.bias": np.array(layers["conv"][1]),
        "dense.kernel": np.ascontiguousarray(dense),
        "dense.bias": np.array(bias),
    }


def load_by_name(model: Any, layer_weights: Mapping[str, Sequence[np.ndarray]]) -> None:
    """Set every layer's weights by layer name; a layer left out or a shape that differs is an error."""
    with_weights = {layer.name for layer in model.layers if layer.weights}
    left_out = sorted(with_weights - set(layer_weights))
    if left_out:
        raise WeightsError(f"no canonical weights for Keras layers {left_out}")
    for name, values in layer_weights.items():
        layer = model.get_layer(name)  # raises ValueError naming the layer if there is none
        want = [tuple(w.shape) for w in layer.get_weights()]
        got = [tuple(np.shape(v)) for v in values]
        if want != got:
            raise WeightsError(f"Keras layer {name!r} holds weights of shapes {want}; got {got}")
        layer.set_weights([np.asarray(v) for v in values])


def nhwc_to_nchw(value: np.ndarray) -> np.ndarray:
    """channels_last feature maps (B, H, W, C) → (B, C, H, W); vectors (B, K) → (B, K, 1, 1)."""
    if value.ndim == 4:
        return np.ascontiguousarray(value.transpose(0, 3, 1, 2))
    if value.ndim == 2:
        return value.reshape(*value.shape, 1, 1)
    raise ValueError(f"no canonical layout for a tap of shape {value.shape}")


def resolve_device(device: str) -> str:
    """'cpu' → '/CPU:0', 'cuda[:n]' → '/GPU:n'; a GPU asked for but absent is an error."""
    if device == "cpu":
        return "/CPU:0"
    if device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        if not tf.config.list_physical_devices("GPU"):
            raise RuntimeError(f"toy-tensorflow: device {device!r} requested but TensorFlow sees no GPU")
        return f"/GPU:{device[5:] or 0}"
    raise ParityInputError(f"toy-tensorflow: device {device!r} is not supported; use 'cpu' or 'cuda'")


def set_precision_controls() -> None:
    """TF32 off, deterministic ops, fixed seed. Process-wide, so set on every construction."""
    tf.config.experimental.enable_op_determinism()
    tf.config.experimental.enable_tensor_float_32_execution(False)
    keras.utils.set_random_seed(SEED)


def op_determinism_enabled() -> bool | None:
    """Read back, not assumed: TF 2.21 has no public getter, its internal config module has one."""
    try:
        from tensorflow.python.framework import config as tf_config
    except ImportError:
        return None
    getter = getattr(tf_config, "is_op_determinism_enabled", None)
    return None if getter is None else bool(getter())


class ToyTensorFlowBackend(Backend):
    name: str = "toy-tensorflow"
    precision: str = "float32"

    def __init__(self, config: ToyConfig, weights: Mapping[str, np.ndarray], device: str = "cpu") -> None:
        validate_weights(weights, config)
        super().__init__(config, weights, device)
        self.tf_device = resolve_device(device)
        set_precision_controls()
        with tf.device(self.tf_device):
            self.model = build_model(config)
            load_by_name(self.model, to_keras_weights(weights, config))
            self.taps_model = tap_model(self.model, LAYERS)

    def forward(self, batch: np.ndarray) -> Taps:
        x = validate_batch(batch, self.config)
        with tf.device(self.tf_device):
            outputs = self.taps_model(tf.constant(x.transpose(0, 2, 3, 1)), training=False)
        taps: Taps = {"input.x": np.array(x, copy=True)}
        for name, tensor in zip(LAYERS, outputs, strict=True):
            taps[name] = nhwc_to_nchw(np.asarray(tensor))
        return taps

    def effective_config(self) -> dict[str, Any]:
        conv, dense = self.model.get_layer("conv"), self.model.get_layer("dense")
        return {
            "in_channels": int(conv.kernel.shape[2]),
            "size": int(self.model.inputs[0].shape[1]),
            "filters": int(conv.filters),
            "classes": int(dense.units),
        }

    def environment(self) -> dict[str, Any]:
        return {
            "framework": "tensorflow",
            "framework_version": tf.__version__,
            "keras_version": keras.__version__,
            "device": self.tf_device,
            "dtype": str(self.model.get_layer("conv").kernel.dtype),
            "execution": "eager",
            "data_format": "channels_last",
            "tf32_enabled": bool(tf.config.experimental.tensor_float_32_execution_enabled()),
            "op_determinism": op_determinism_enabled(),
            "onednn_opts": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default"),
            "seed": SEED,
        }

    def export_weights(self) -> dict[str, np.ndarray]:
        layers = {name: self.model.get_layer(name).get_weights() for name in ("conv", "dense")}
        exported = from_keras_weights(layers, self.config)
        return {name: exported[name] for name in parameter_shapes(self.config)}

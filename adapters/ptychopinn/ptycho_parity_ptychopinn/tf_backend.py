"""``ptychopinn-tf``: the ORIGINAL PtychoPINN TensorFlow model (package ``ptycho``) as a parity backend.

It builds the user's own Keras model with ``ptycho.model.create_model_with_gridsize``, writes the
canonical weights into its layers, feeds the canonical batch and returns every tap the original
computes (all canonical taps but ``loss.*``: the original has no loss inside its model).

What the original does that shapes this adapter:

- It keeps its configuration in a global dict, ``ptycho.params.cfg``, read at build time AND at
  call time (``probe.mask`` in ``ProbeIllumination.call``, the canvas size in
  ``PadReconstructionLayer.call``). The adapter writes its keys before building and again before
  every forward pass, so two instances of other configs in one process do not see each other's.
- ``log_scale`` is one ``tf.Variable`` shared by every model built in the process
  (``ptycho.model._lazy_cache``); the adapter keeps its own value and assigns it before each pass.
- The probe is fixed at build time, as a variable of the ``probe_illumination`` layer: the adapter
  builds with a placeholder and assigns the batch's probe before each pass.
- Layer names are automatic and follow construction order, not computation order, so the layers
  are found by walking the graph back from the named layers (``obj``, ``padded_obj_2``, ...) and
  checking the type of each layer met, never by automatic name.
- The re-extracted patches and the illuminated field come out flat, ``(B*C, N, N, 1)``.
- For B·C >= 64 the original merges all groups into one canvas (forward-model.md section 4); such
  a batch is refused as bad input.

Nothing of the original is imported when this module is imported, so the registry can list the
backend without PtychoPINN or TensorFlow; constructing it without them raises
``BackendUnavailableError`` with the reason.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import platform
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from parity.backend import Backend, Taps
from parity.batch import CanonicalBatch
from parity.config import ModelConfig
from parity.errors import ParityInputError, WeightsError
from parity.taps import HEADS
from parity.weights import parameter_shapes, validate_weights
from ptycho_parity_ptychopinn._common import (
    check_batch,
    conv_prefixes,
    in_spec_order,
    input_taps,
    require_original,
    tap_names,
    unused,
)
from ptycho_parity_ptychopinn.locate import availability_problem as _availability

SEED = 0
EXECUTION = "tf.function (graph, no XLA jit of the whole model) over a keras.Model of the original's layer outputs"
# The original merges every group into one canvas from B·C = 64 on (forward-model.md section 4).
MERGE_LIMIT = 64
# Keras ops the walk expects at each step; a different graph means another version of the original.
_CONV, _POOL, _UP = "Conv2D", "MaxPooling2D", "UpSampling2D"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The original prints debug lines (shapes, 'DEBUG _flat_to_channel', ...) while building and tracing."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def original_cfg(config: ModelConfig) -> dict[str, Any]:
    """Canonical keys -> the original's ``params.cfg`` keys, one entry per canonical key.

    The canvas is ``N + (gridsize - 1)·offset + max_position_jitter`` in the original, as in the
    canonical model; a set ``canvas_size`` is honoured through the jitter margin (or, if that would
    go negative, through the offset), which only enter the model through the canvas.
    """
    g, N, M = config.gridsize, config.N, config.M
    offset, jitter = config.offset, M - N - (g - 1) * config.offset
    if jitter < 0:  # canvas_size smaller than N + (g-1)·offset: put the whole margin in the offset
        offset, jitter = (M - N) // (g - 1), (M - N) % (g - 1)
    mapped: dict[str, tuple[str, Any]] = {
        "N": ("N", N),
        "gridsize": ("gridsize", g),
        "n_filters_scale": ("n_filters_scale", config.n_filters_scale),
        "amp_activation": ("amp_activation", config.amp_activation),
        "object_big": ("object.big", config.object_big),
        "probe_big": ("probe.big", config.probe_big),
        "probe_mask": ("probe.mask", config.probe_mask),
        "pad_object": ("pad_object", config.pad_object),
        "probe_scale": ("probe_scale", float(config.probe_scale)),  # unused by the model: the probe comes normalised
        "nphotons": ("nphotons", float(config.nphotons)),  # unused by the model: only sets the initial log_scale
        "offset": ("offset", offset),
        "max_position_jitter": ("max_position_jitter", jitter),
        "canvas_size": ("", None),  # through offset and max_position_jitter, above
    }
    missing = [k for k in config.to_dict() if k not in mapped]
    if missing:
        raise ParityInputError(
            f"config key {missing[0]!r} is not mapped to the original TensorFlow configuration by this adapter "
            "(ptycho_parity_ptychopinn.tf_backend.original_cfg); it would silently keep the original's default"
        )
    cfg = {key: value for key, value in mapped.values() if key}
    cfg.update(
        {
            # Not canonical keys, but read by the builder or at call time; set to the canonical behaviour.
            "intensity_scale": float(config.input_scale),  # initial log_scale; the weights overwrite it
            "gaussian_smoothing_sigma": 0.0,  # the canonical model has no smoothing of the illuminated field
            "probe.trainable": False,
            "intensity_scale.trainable": False,
        }
    )
    return cfg


def _producer(tensor: Any) -> Any:
    """The Keras operation that produced a KerasTensor."""
    return tensor._keras_history.operation


def _inputs(op: Any) -> list[Any]:
    return list(op._inbound_nodes[0].input_tensors)


def _parent(op: Any, index: int = 0, kind: str | None = None, where: str = "") -> Any:
    """The operation producing input ``index`` of ``op``, checked to be a ``kind`` (a class name)."""
    parent = _producer(_inputs(op)[index])
    if kind is not None and type(parent).__name__ != kind:
        raise ParityInputError(
            f"the original TensorFlow graph does not have the expected structure at {where or op.name}: "
            f"expected a {kind}, found {type(parent).__name__} {parent.name!r}; this adapter was written for "
            "hoidn/PtychoPINN 712c23f3"
        )
    return parent


class _Walk:
    """The original's tapped outputs and convolutions, found by walking its graph backwards.

    Tap order does not matter here (``in_spec_order`` puts the taps in canonical order); what matters
    is that every layer met has the expected type, so a different version of the original fails
    loudly at the place where its graph differs.
    """

    def __init__(self, model: Any, config: ModelConfig) -> None:
        self.taps: dict[str, Any] = {}  # canonical tap -> KerasTensor
        self.convs: dict[str, Any] = {}  # canonical conv prefix -> keras Conv2D layer
        obj = model.get_layer("obj")
        finals = [_producer(t) for t in _inputs(obj)]  # amplitude head, phase head
        bottleneck = None
        for h, final in zip(HEADS, finals, strict=True):
            last_up = self._head(h, final, config)
            pool = self._decoder(h, last_up, len(config.decoder_filters))
            if bottleneck is None:
                bottleneck = pool
            elif pool is not bottleneck:
                raise ParityInputError("the original's two decoders do not read the same encoder output")
        scaler = self._encoder(bottleneck, len(config.encoder_filters))
        if scaler is not model.get_layer("intensity_scaler"):
            raise ParityInputError("the original's encoder does not read the 'intensity_scaler' layer")
        self.taps.update(
            {
                "input.scaled": scaler.output,
                "object.patches": obj.output,
                "object.canvas": model.get_layer("padded_obj_2").output,
                "object.trimmed": model.get_layer("trimmed_obj").output,
                "object.reextracted": model.get_layer("padded_objs_with_offsets").output,
                "physics.illuminated": model.get_layer("probe_illumination").output[0],
                "physics.diffraction": model.get_layer("pred_diff_channels").output,
                "output.amplitude": model.get_layer("intensity_scaler_inv").output,
                "output.intensity": model.get_layer("pred_intensity").output,
            }
        )

    def _conv(self, name: str, layer: Any, tap: Any | None = None) -> None:
        self.convs[name] = layer
        self.taps[name] = layer.output if tap is None else tap

    def _head(self, h: str, final: Any, config: ModelConfig) -> Any:
        """Taps and convs of one head; returns the decoder's last upsampling."""
        if not config.pad_object:
            act = final  # ActivationLayer after the full head's output conv
            out = _parent(act, kind=_CONV, where=f"{h}.head.full.out")
            up = _parent(out, kind=_UP, where=f"{h}.head.full.up")
            c1 = _parent(up, kind=_CONV, where=f"{h}.head.full.conv1")
            c0 = _parent(c1, kind=_CONV, where=f"{h}.head.full.conv0")
            self._conv(f"{h}.head.full.conv0", c0)
            self._conv(f"{h}.head.full.conv1", c1)
            self._conv(f"{h}.head.full.out", out, act.output)
            self.taps[f"{h}.head.full.up"] = up.output
            return _parent(c0, kind=_UP, where=f"{h}.decoder (last block)")
        if config.probe_big:
            padded, masked = (_producer(t) for t in _inputs(final))  # centre padded + border masked
            swish = _parent(masked, 0)
            out = _parent(swish, kind=_CONV, where=f"{h}.head.border.out")
            up = _parent(out, kind=_UP, where=f"{h}.head.border.up")
            c1 = _parent(up, kind=_CONV, where=f"{h}.head.border.conv1")
            c0 = _parent(c1, kind=_CONV, where=f"{h}.head.border.conv0")
            self._conv(f"{h}.head.border.conv0", c0)
            self._conv(f"{h}.head.border.conv1", c1)
            self._conv(f"{h}.head.border.out", out, swish.output)
            self.taps[f"{h}.head.border.up"] = up.output
            self.taps[f"{h}.head.border.masked"] = masked.output
            self.taps[f"{h}.head.sum"] = final.output
        else:
            padded = final
        act = _parent(padded)  # ActivationLayer 'amp' / 'phi'
        centre = _parent(act, kind=_CONV, where=f"{h}.head.centre")
        self._conv(f"{h}.head.centre", centre, act.output)
        self.taps[f"{h}.head.padded"] = padded.output
        return _parent(_parent(centre), kind=_UP, where=f"{h}.decoder (last block)")  # through the channel slice

    def _decoder(self, h: str, up: Any, blocks: int) -> Any:
        """Taps and convs of one decoder, from its last upsampling back; returns the encoder's last pool."""
        for i in reversed(range(blocks)):
            c1 = _parent(up, kind=_CONV, where=f"{h}.decoder.block{i}.conv1")
            c0 = _parent(c1, kind=_CONV, where=f"{h}.decoder.block{i}.conv0")
            self._conv(f"{h}.decoder.block{i}.conv0", c0)
            self._conv(f"{h}.decoder.block{i}.conv1", c1)
            self.taps[f"{h}.decoder.block{i}.up"] = up.output
            up = _parent(c0, kind=_UP if i else _POOL, where=f"{h}.decoder.block{i} input")
        return up

    def _encoder(self, pool: Any, blocks: int) -> Any:
        """Taps and convs of the encoder, from its last pool back; returns the layer that feeds it."""
        for i in reversed(range(blocks)):
            c1 = _parent(pool, kind=_CONV, where=f"encoder.block{i}.conv1")
            c0 = _parent(c1, kind=_CONV, where=f"encoder.block{i}.conv0")
            self._conv(f"encoder.block{i}.conv0", c0)
            self._conv(f"encoder.block{i}.conv1", c1)
            self.taps[f"encoder.block{i}.pool"] = pool.output
            pool = _parent(c0, kind=_POOL if i else None, where=f"encoder.block{i} input")
        return pool


class PtychoPINNTFBackend(Backend):
    """The original PtychoPINN TensorFlow model (``ptycho``), float32, CPU, one tf.function per instance."""

    name: str = "ptychopinn-tf"
    precision: str = "float32"

    @classmethod
    def availability_problem(cls) -> str | None:
        """Why the original cannot be loaded, checked without importing it (None: try constructing)."""
        return _availability("ptycho", ("tensorflow",))

    def __init__(self, config: ModelConfig, weights: Mapping[str, np.ndarray], device: str = "cpu") -> None:
        problem = self.device_problem(device)
        if problem:
            raise ParityInputError(problem)
        self.original = require_original(self.name, "ptycho", "params", "model")
        if not isinstance(config, ModelConfig):
            raise ParityInputError(f"{self.name} is built from a parity.ModelConfig, got {type(config).__name__}")
        validate_weights(weights, config)
        super().__init__(config, weights, device)
        import tensorflow as tf

        params = self.original.module.params
        model_module = self.original.module.model
        self._params = params
        self._cfg = original_cfg(config)
        params.cfg.update(self._cfg)
        # Build-time probe: a placeholder of the right size (the original would otherwise make its own
        # default probe); the batch's probe is assigned before every forward pass.
        params.cfg["probe"] = np.ones((config.N, config.N, 1), np.complex64)
        with _quiet():
            self.model, _ = model_module.create_model_with_gridsize(config.gridsize, config.N)
        params.cfg.update(self._cfg)  # the builder restores N and gridsize to what they were before it
        from backends.tensorflow.backend import set_precision_controls

        set_precision_controls()  # the same controls as the project's tensorflow backend
        self._log_scale = model_module._lazy_cache["log_scale"]  # one variable for every model of the process
        self._probe_layer = self.model.get_layer("probe_illumination")
        walk = _Walk(self.model, config)
        self._tap_tensors = walk.taps
        self._convs = walk.convs
        self._load(weights)
        self.taps_model = tf.keras.Model(self.model.inputs, list(self._tap_tensors.values()), name="parity_taps")
        self._fn: Any = None

    # ------------------------------------------------------------------ weights
    def _load(self, weights: Mapping[str, np.ndarray]) -> None:
        """Write every canonical weight into the original's layers; refuse anything left over on either side."""
        prefixes = conv_prefixes(self.config)
        if sorted(self._convs) != sorted(prefixes):
            extra = unused(self._convs, prefixes) or unused(prefixes, self._convs)
            raise WeightsError(f"the original's convolutions do not map one to one onto the canonical ones: {extra}")
        all_convs = [layer for layer in self.model.layers if type(layer).__name__ == _CONV]
        untouched = [layer.name for layer in all_convs if not any(layer is c for c in self._convs.values())]
        if untouched:
            raise WeightsError(f"convolutions of the original that no canonical weight maps to: {untouched}")
        for prefix in prefixes:
            layer = self._convs[prefix]
            kernel = np.asarray(weights[f"{prefix}.kernel"], np.float32)
            bias = np.asarray(weights[f"{prefix}.bias"], np.float32)
            if tuple(layer.kernel.shape) != kernel.shape or tuple(layer.bias.shape) != bias.shape:
                raise WeightsError(
                    f"{prefix}: the original's layer {layer.name!r} has kernel {tuple(layer.kernel.shape)}, "
                    f"bias {tuple(layer.bias.shape)}; the canonical weights have {kernel.shape}, {bias.shape}"
                )
            layer.kernel.assign(kernel)  # Keras keeps (kh, kw, in, out), as the canonical file does
            layer.bias.assign(bias)
        # The shared variable may be reassigned by another instance; this one's value is kept here.
        self._log_scale_value = np.asarray(weights["log_scale"], np.float32).copy()
        self._log_scale.assign(self._log_scale_value)

    def export_weights(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {"log_scale": self._log_scale_value.copy()}
        for prefix, layer in self._convs.items():
            out[f"{prefix}.kernel"] = np.asarray(layer.kernel.numpy(), np.float32)
            out[f"{prefix}.bias"] = np.asarray(layer.bias.numpy(), np.float32)
        return {name: out[name] for name in parameter_shapes(self.config)}

    def count_conv_params(self) -> int:
        """Convolution weights and biases as Keras counts them in the original (log_scale excluded)."""
        return int(sum(layer.count_params() for layer in self._convs.values()))

    # ------------------------------------------------------------------ forward
    def exposed_taps(self) -> frozenset[str]:
        """Every canonical tap but the losses, which the original computes outside its model."""
        return frozenset(n for n in tap_names(self.config) if not n.startswith("loss."))

    def forward(self, batch: CanonicalBatch) -> Taps:
        import tensorflow as tf

        cfg = self.config
        batch = check_batch(batch, cfg)
        B, C, N = batch.size, cfg.C, cfg.N
        if B * C >= MERGE_LIMIT:
            raise ParityInputError(
                f"batch of {B} groups of {C} patches: B·C = {B * C} >= {MERGE_LIMIT}, where the original TensorFlow "
                "model merges all groups into one canvas (forward-model.md section 4); use a batch size below "
                f"{-(-MERGE_LIMIT // C)}"
            )
        # Keys the original reads at call time, and the process-wide log_scale, are this instance's again.
        self._params.cfg.update(self._cfg)
        self._log_scale.assign(self._log_scale_value)
        self._probe_layer.w.assign(batch.probe.reshape(1, N, N, 1))
        x = np.ascontiguousarray(batch.x.transpose(0, 2, 3, 1))  # (B, N, N, C)
        positions = np.ascontiguousarray(batch.offsets.transpose(0, 2, 1)[:, None])  # (B, 1, 2, C)
        if self._fn is None:
            self._fn = tf.function(
                lambda a, b: self.taps_model([a, b], training=False), jit_compile=False, reduce_retracing=True
            )
        with _quiet():
            outputs = self._fn(tf.constant(x), tf.constant(positions))
        taps = input_taps(batch, cfg)
        for name, tensor in zip(self._tap_tensors, outputs, strict=True):
            taps[name] = self._canonical(name, np.asarray(tensor.numpy()), B, C, N)
        return in_spec_order(taps, cfg, B)

    @staticmethod
    def _canonical(name: str, value: np.ndarray, B: int, C: int, N: int) -> np.ndarray:
        """channels_last (B, H, W, ch) -> (B, ch, H, W); the flat (B*C, N, N, 1) patch stacks -> (B, C, N, N)."""
        if value.ndim == 4 and value.shape[0] == B * C and value.shape[1:] == (N, N, 1) and B * C != B:
            return value.reshape(B, C, N, N)  # flat index b*C + c
        if value.ndim == 4:
            return value.transpose(0, 3, 1, 2)
        raise ParityInputError(f"the original's tap {name} has shape {value.shape}, which has no canonical layout")

    # ------------------------------------------------------------------ read back
    def effective_config(self) -> dict[str, Any]:
        # params.cfg is shared by every instance in the process; this instance's values are what forward()
        # writes into it before each pass (keys the original reads at call time, not in the graph).
        model, cfg = self.model, self._cfg
        x_in = model.inputs[0]
        N = int(x_in.shape[1])
        gridsize = math.isqrt(int(x_in.shape[-1]))
        pad_object = "amp.head.centre" in self._convs
        canvas = model.get_layer("padded_obj_2")
        object_big = type(canvas).__name__ == "ReassemblePatchesLayer"
        # The canvas as built (the layer's static output shape); PadReconstructionLayer reads the same size
        # from params.cfg again at call time, which forward() sets to this instance's values first.
        M = canvas.output.shape[1]
        if M is None:
            margin = (gridsize - 1) * cfg["offset"] + cfg["max_position_jitter"]  # params.get_padded_size()
            M = canvas.padded_size if object_big else cfg["N"] + margin
        base = 32 if N == 64 else 16
        return {
            "N": N,
            "gridsize": gridsize,
            "n_filters_scale": int(self._convs["encoder.block0.conv0"].filters) // base,
            "amp_activation": str(model.get_layer("amp").activation_name),
            "object_big": object_big,
            # The border branch exists only with pad_object; without it the key has no effect (as canonically).
            "probe_big": "amp.head.border.out" in self._convs if pad_object else bool(cfg["probe.big"]),
            "probe_mask": bool(cfg["probe.mask"]),  # read by ProbeIllumination.call at trace time
            "pad_object": pad_object,
            "probe_scale": self.config.probe_scale,  # used by batch preparation, not by the model
            "nphotons": self.config.nphotons,  # only sets the initial log_scale, which is loaded
            # offset and the jitter margin only enter the model through the canvas, read back here.
            "offset": self.config.offset,
            "max_position_jitter": self.config.max_position_jitter,
            "canvas_size": int(M),
        }

    def environment(self) -> dict[str, Any]:
        import keras
        import tensorflow as tf

        from backends.tensorflow.backend import op_determinism_enabled

        return {
            "framework": "tensorflow (original PtychoPINN, package ptycho)",
            "framework_version": tf.__version__,
            "keras_version": keras.__version__,
            "numpy_version": np.__version__,
            "python_version": platform.python_version(),
            "device": self.device,
            "dtype": "float32",
            "execution": EXECUTION,
            "original": self.original.record(),
            "tf32_enabled": bool(tf.config.experimental.tensor_float_32_execution_enabled()),
            "op_determinism": op_determinism_enabled(),
            "seed": SEED,
            "onednn_opts": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default"),
            "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
            "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
            "settings": {
                "params.cfg": {k: v for k, v in self._cfg.items()},
                "probe": "built with a placeholder; the batch's probe is assigned to probe_illumination.w per pass",
                "log_scale": "the process-wide variable ptycho.model._lazy_cache['log_scale'], assigned per pass",
                "probe_smoothing_sigma": float(self._probe_layer.sigma),
            },
        }

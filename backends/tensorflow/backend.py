"""The harness adapter for the TensorFlow model: devices, precision controls, taps as NumPy, environment."""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Mapping
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from backends.tensorflow.model import AMP_ACTIVATIONS, EXECUTION, SEED, PtychoModel
from parity.backend import Backend, Taps
from parity.batch import CanonicalBatch
from parity.config import ModelConfig
from parity.errors import ParityInputError
from parity.stages import Stage
from parity.taps import GRAD, LOSSES, gradient_tap_specs, tap_specs
from parity.weights import parameter_shapes, validate_weights

_DEVICES = {"cpu": "/CPU:0", "cuda": "/GPU:0"}


def device_problem(device: str) -> str | None:
    """Why TensorFlow cannot run on ``device`` here, or None."""
    if device not in _DEVICES:
        return f"device {device!r} is not supported by the tensorflow backend; use 'cpu' or 'cuda'"
    if device == "cuda" and not tf.config.list_physical_devices("GPU"):
        return (
            "tensorflow backend: device 'cuda' was requested but TensorFlow sees no GPU "
            "(tf.config.list_physical_devices('GPU') is empty); install tensorflow[and-cuda] on a "
            "CUDA machine, or run with device 'cpu'"
        )
    return None


def tf_device(device: str) -> str:
    """TensorFlow device string for the harness's device option; fails loudly, never falls back."""
    problem = device_problem(device)
    if problem is not None:
        raise ParityInputError(problem)
    return _DEVICES[device]


def set_precision_controls() -> None:
    """TF32 off, deterministic ops on, fixed seeds: process-wide, so set on every construction."""
    tf.config.experimental.enable_op_determinism()
    tf.config.experimental.enable_tensor_float_32_execution(False)
    keras.utils.set_random_seed(SEED)


def op_determinism_enabled() -> bool | None:
    fn = getattr(tf.config.experimental, "is_op_determinism_enabled", None)
    if fn is None:  # not public in TF 2.21; the internal module has had it since 2.8
        try:
            from tensorflow.python.framework import config as tf_config
        except ImportError:
            return None
        fn = getattr(tf_config, "is_op_determinism_enabled", None)
    return None if fn is None else bool(fn())


def _onednn_enabled() -> bool | None:
    """Whether TensorFlow's oneDNN custom ops are in use (the env var alone does not say what
    'default' means). Not whether oneDNN runs at all: its GEMM serves TensorFlow's matrix products
    and convolutions either way, and follows ONEDNN_MAX_CPU_ISA either way (measured 2026-12-05)."""
    try:
        from tensorflow.python.util import _pywrap_util_port
    except ImportError:
        return None
    return bool(_pywrap_util_port.IsMklEnabled())


def _env_threads(variable: str) -> int:
    value = os.environ.get(variable, "")
    return int(value) if value.isdigit() else 0


class TensorFlowBackend(Backend):
    """PtychoPINN forward model in TensorFlow / Keras 3, float32, one tf.function per instance.

    ``model_class`` is what gets built: a subclass naming a PtychoModel subclass is a mutant backend.
    """

    name: str = "tensorflow"
    precision: str = "float32"
    model_class: type[PtychoModel] = PtychoModel

    @classmethod
    def device_problem(cls, device: str) -> str | None:
        return device_problem(device)

    def __init__(self, config: ModelConfig, weights: Mapping[str, np.ndarray], device: str = "cpu") -> None:
        validate_weights(weights, config)
        super().__init__(config, weights, device)
        self._tf_device = tf_device(device)
        set_precision_controls()
        with tf.device(self._tf_device):
            self.model = self.model_class(config)
            self.model.load_weights(weights)
        # A fixed signature with a free batch size: one trace per instance, whatever the batch.
        self._graph = tf.function(
            self.model.forward,
            input_signature=self.model.input_spec,
            jit_compile=False,
            autograph=False,
        )
        self._concrete: Any = None
        self._gradient_graph = tf.function(
            self._loss_gradients,
            input_signature=self.model.input_spec,
            jit_compile=False,
            autograph=False,
        )
        self._gradient_concrete: Any = None

    def _traced(self) -> Any:
        """The forward graph, traced on first use (keeps construction fast for builds never run).

        Calling the concrete function directly also keeps TensorFlow from warning about
        "frequent retracing" when a process builds several backends, each traced exactly once.
        """
        if self._concrete is None:
            with tf.device(self._tf_device):
                self._concrete = self._graph.get_concrete_function(*self.model.input_spec)
        return self._concrete

    def forward(self, batch: CanonicalBatch) -> Taps:
        batch.validate(self.config)
        with tf.device(self._tf_device):
            computed = self._traced()(tf.constant(batch.x), tf.constant(batch.offsets), tf.constant(batch.probe))
        B, C, N = batch.size, self.config.C, self.config.N
        inputs = {
            "input.x": np.array(batch.x, copy=True),
            "input.offsets": np.array(batch.offsets, copy=True).reshape(B, C, 1, 2),
            "input.probe": np.array(batch.probe, copy=True).reshape(1, 1, N, N),
        }
        # Shapes, dtypes and missing or extra taps are the harness's to judge (it reports them at their
        # place in the order of computation), so nothing is checked here; taps come in spec order.
        order = [s.name for s in tap_specs(self.config, B)]
        produced = {**inputs, **{name: np.asarray(t.numpy()) for name, t in computed.items()}}
        taps: Taps = {name: produced[name] for name in order if name in produced}
        taps.update({name: arr for name, arr in produced.items() if name not in taps})
        return taps

    computes_gradients = True

    def gradients(self, batch: CanonicalBatch) -> Taps:
        """Gradients of both summed losses in a graph of their own, traced once per instance.

        A separate tf.function rather than more outputs of the forward's: the forward graph keeps
        no tape and stays as fast as before, and the gradients run in graph mode like the forward
        they differentiate (eager execution rounds differently). Variables are only read.
        """
        batch.validate(self.config)
        if self._gradient_concrete is None:
            with tf.device(self._tf_device):
                self._gradient_concrete = self._gradient_graph.get_concrete_function(*self.model.input_spec)
        with tf.device(self._tf_device):
            computed = self._gradient_concrete(
                tf.constant(batch.x), tf.constant(batch.offsets), tf.constant(batch.probe)
            )
        # Keras kernels are (kh, kw, in, out) and x is (B, C, N, N): both already canonical.
        return {
            spec.name: np.array(computed[spec.name].numpy(), dtype=np.float32, order="C")
            for spec in gradient_tap_specs(self.config, batch.size)
        }

    def _gradient_sources(self) -> dict[str, Any]:
        """Every canonical parameter's tf.Variable, in parameter order (a Keras variable's ``value``
        is the tf.Variable the layer reads, which is what a tape can watch)."""
        sources: dict[str, Any] = {"log_scale": self.model.log_scale}
        for prefix, layer in self.model.conv_layers().items():
            sources[f"{prefix}.kernel"] = layer.kernel.value
            sources[f"{prefix}.bias"] = layer.bias.value
        return {name: sources[name] for name in parameter_shapes(self.config)}

    def _loss_gradients(self, x: Any, offsets: Any, probe: Any) -> dict[str, Any]:
        """The traced body: one forward on a persistent tape, then one backward per loss.

        Only the parameters and x are watched (not whatever the forward happens to read), and a
        source a mutated model leaves unconnected gets a zero gradient instead of None.
        """
        sources = self._gradient_sources()
        with tf.GradientTape(persistent=True, watch_accessed_variables=False) as tape:
            tape.watch(x)
            for variable in sources.values():
                tape.watch(variable)
            computed = self.model.forward(x, offsets, probe)
            totals = {loss: tf.reduce_sum(computed[f"loss.{loss}"]) for loss in LOSSES}
        targets = {**sources, "input.x": x}
        out: dict[str, Any] = {}
        for loss in LOSSES:
            grads = tape.gradient(
                totals[loss], list(targets.values()), unconnected_gradients=tf.UnconnectedGradients.ZERO
            )
            for name, grad in zip(targets, grads, strict=True):
                out[f"{GRAD}.{loss}.{name}"] = grad
        return out

    def gradient_tracing_count(self) -> int:
        """How often the gradient graph was traced (1 after any number of calls, if all is well)."""
        return int(self._gradient_graph.experimental_get_tracing_count())

    runs_stages = True

    def run_stage(self, stage: Stage, inputs: Mapping[str, np.ndarray]) -> Taps:
        """The stage's model method, run eagerly.

        A stage runs once per batch, so tracing a graph for it cost more than running it. Eager
        stages gave the taps of a tf.function per stage at a third of the time, bitwise on an AMD
        EPYC; on an AVX2-only Xeon the graph's fused conv + bias + swish rounds a few ulps apart
        (docs/decisions.md). That is float32 rounding, which the local tolerances are modelled for.
        The forward and the gradients stay traced: those are how the model runs.
        """
        with tf.device(self._tf_device):
            computed = self.model.run_stage(stage, [tf.constant(np.asarray(inputs[n])) for n in stage.inputs])
        return {name: np.asarray(computed[name].numpy()) for name in stage.outputs if name in computed}

    def tracing_count(self) -> int:
        """How often the forward graph was traced (1 after any number of calls, if all is well)."""
        return int(self._graph.experimental_get_tracing_count())

    def count_conv_params(self) -> int:
        """Convolution weights and biases as Keras counts them (log_scale excluded)."""
        return self.model.count_conv_params()

    def effective_config(self) -> dict[str, Any]:
        m = self.model
        amp = m.heads["amp"]
        first = m.encoder[0].conv0
        N = int(m.input_spec[0].shape[-1])
        gridsize = math.isqrt(int(first.kernel.shape[2]))
        pad_object = amp.centre is not None
        # Read back from the built head; a subclass's own activation falls back to the name it was built for.
        activation = next((k for k, fn in AMP_ACTIVATIONS.items() if fn is amp.activation), m.amp_activation_name)
        offset = self.config.offset  # only enters through M, together with the jitter margin
        return {
            "N": N,
            "gridsize": gridsize,
            "n_filters_scale": int(amp.decoder[-1].conv1.filters) // 32,
            "amp_activation": activation,
            "object_big": m.object_big,
            "probe_big": amp.border is not None if pad_object else m._probe_big,
            "probe_mask": m.probe_mask is not None,
            "pad_object": pad_object,
            "probe_scale": self.config.probe_scale,  # used by batch preparation, not by the model
            "nphotons": self.config.nphotons,  # only sets the initial log_scale, which is loaded
            # offset and the jitter margin only enter the model through the canvas, read back here.
            "offset": offset,
            "max_position_jitter": self.config.max_position_jitter,
            "canvas_size": m.M,
        }

    def environment(self) -> dict[str, Any]:
        threads_inter = tf.config.threading.get_inter_op_parallelism_threads()
        threads_intra = tf.config.threading.get_intra_op_parallelism_threads()
        return {
            "framework": "tensorflow",
            "framework_version": tf.__version__,
            "keras_version": keras.__version__,
            "numpy_version": np.__version__,
            "python_version": platform.python_version(),
            "device": self.device,
            "tf_device": self._tf_device,
            "gpus_visible": [d.name for d in tf.config.list_physical_devices("GPU")],
            "dtype": "float32",
            "execution": EXECUTION,
            "stage_execution": "eager",
            "jit_compile": False,
            "data_format": "channels_last",
            "tf32_enabled": bool(tf.config.experimental.tensor_float_32_execution_enabled()),
            "op_determinism": op_determinism_enabled(),
            "seed": SEED,
            "onednn_opts": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default"),
            "onednn_enabled": _onednn_enabled(),
            "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "unset"),
            # 0 from the getters means TensorFlow chooses, unless TF_NUM_*_THREADS chose: the getters
            # do not read those variables, which the pools follow.
            "inter_op_threads": threads_inter or _env_threads("TF_NUM_INTEROP_THREADS"),
            "intra_op_threads": threads_intra or _env_threads("TF_NUM_INTRAOP_THREADS"),
            "cpu_count": os.cpu_count(),
        }

    def export_weights(self) -> dict[str, np.ndarray]:
        exported = self.model.export_weights()
        # Same names and order as the canonical file, so a mismatch shows as a missing name.
        return {name: exported[name] for name in parameter_shapes(self.config)}

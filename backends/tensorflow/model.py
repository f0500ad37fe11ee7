"""The canonical PtychoPINN forward model in Keras 3 / TensorFlow (the adapter is in ``backend.py``).

The network runs channels-last (Keras's native layout, so the canonical (kh, kw, in, out) kernels
load without any permutation); the physics runs in the canonical (B, C, H, W) layout of
``physics.py``. Every stage is its own method taking and returning TensorFlow tensors, so a stage can
later be fed the reference's input to that stage (layer-local parity). Network stages take and
return channels-last tensors; their taps are transposed to (B, C, H, W) only when collected.

The whole forward runs inside one ``tf.function`` (no XLA). Eager, graph and XLA execution of the
same Keras model differ by up to ~1e-5, as much as TF differs from PyTorch, so the mode is fixed here
and reported in ``environment()`` rather than left to whoever calls the model.

Stage methods carry the same names and argument orders as the torch model's. The pieces a porting
bug typically gets wrong (activation, pooling, upsampling, masks, translation) are built or called
through ``make_*`` and ``translate`` methods: a subclass overriding one changes the model, which is
how tests plant a bug without patching module globals.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from backends.tensorflow import physics
from parity.config import ModelConfig
from parity.stages import Stage
from parity.taps import HEADS

Tensor = Any  # tf.Tensor; TensorFlow ships no type stubs
Activation = Callable[[Tensor], Tensor]

EXECUTION = "tf.function"
SEED = 0


def _sigmoid(x: Tensor) -> Tensor:
    return tf.sigmoid(x)


def _swish(x: Tensor) -> Tensor:
    # Written out rather than tf.nn.silu so the formula is the spec's x·sigmoid(x) by construction.
    return x * tf.sigmoid(x)


def _softplus(x: Tensor) -> Tensor:
    return tf.nn.softplus(x)


def _relu(x: Tensor) -> Tensor:
    return tf.nn.relu(x)


def _pi_tanh(x: Tensor) -> Tensor:
    return np.float32(math.pi) * tf.tanh(x)


AMP_ACTIVATIONS: dict[str, Activation] = {
    "sigmoid": _sigmoid,
    "swish": _swish,
    "softplus": _softplus,
    "relu": _relu,
}


def _conv(name: str, cin: int, cout: int, size: int, relu: bool) -> Any:
    """A built 3x3 'same' conv with bias; zero-initialised because weights are always loaded."""
    layer = keras.layers.Conv2D(
        cout,
        3,
        strides=1,
        padding="same",
        data_format="channels_last",
        activation="relu" if relu else None,
        use_bias=True,
        kernel_initializer="zeros",
        bias_initializer="zeros",
        name=name,
    )
    layer.build((None, size, size, cin))
    return layer


class NearestUpsample2x(keras.layers.Layer):  # type: ignore[misc]  # Keras ships no type stubs
    """x2 nearest upsampling, channels-last: the very ops ``keras.layers.UpSampling2D(2)`` runs.

    UpSampling2D calls ``tf.repeat`` once per axis, which is ExpandDims, Tile and Reshape on the data
    plus about a dozen ops of shape arithmetic built in Python from the dynamic shape; that took a
    quarter of the time to trace the forward, and the model is traced for every config, its forward
    and its gradient graph. Here the same ExpandDims, Tile and Reshape per axis take the sizes the
    trace knows, so forward and gradients are bitwise those of UpSampling2D (a test holds them to it)
    and only the tracing is cheaper.
    """

    def call(self, x: Tensor) -> Tensor:
        # A size the trace does not know (never, in this model) is read from the tensor at run time.
        _, H, W, C = (n if n is not None else tf.shape(x)[i] for i, n in enumerate(x.shape))
        x = tf.reshape(tf.tile(tf.expand_dims(x, 2), [1, 1, 2, 1, 1]), [-1, 2 * H, W, C])
        return tf.reshape(tf.tile(tf.expand_dims(x, 3), [1, 1, 1, 2, 1]), [-1, 2 * H, 2 * W, C])


def _nchw(t: Tensor) -> Tensor:
    return tf.transpose(t, [0, 3, 1, 2])


def _nhwc(t: Tensor) -> Tensor:
    return tf.transpose(t, [0, 2, 3, 1])


def _offsets(tap: Tensor) -> Tensor:
    """The offsets tap (B, C, 1, 2) as the physics takes them, (B, C, 2)."""
    return tf.reshape(tap, [tf.shape(tap)[0], tf.shape(tap)[1], 2])


class ConvBlock:
    """Two ReLU convs then a resampling layer: a down block (tap ``pool``) or an up block (``up``).

    The resampling layer is the model's (``make_pool`` / ``make_upsample``), so a subclass can swap it.
    """

    def __init__(self, prefix: str, cin: int, filters: int, size: int, resample: Any, resample_tap: str) -> None:
        self.prefix = prefix
        self.conv0 = _conv(f"{prefix}.conv0", cin, filters, size, relu=True)
        self.conv1 = _conv(f"{prefix}.conv1", filters, filters, size, relu=True)
        self.resample = resample
        self.resample_tap = resample_tap

    def convs(self) -> dict[str, Any]:
        return {self.conv0.name: self.conv0, self.conv1.name: self.conv1}

    def __call__(self, h: Tensor, taps: dict[str, Tensor]) -> Tensor:
        h = self.conv0(h)
        taps[f"{self.prefix}.conv0"] = h
        h = self.conv1(h)
        taps[f"{self.prefix}.conv1"] = h
        h = self.resample(h)
        taps[f"{self.prefix}.{self.resample_tap}"] = h
        return h


class Head:
    """One output branch (amplitude or phase): its decoder and its head, with separate weights."""

    def __init__(
        self,
        name: str,
        config: ModelConfig,
        activation: Activation,
        make_upsample: Callable[[], Any],
        border_mask: np.ndarray,
    ) -> None:
        self.name = name
        self.activation = activation
        N, F, g, out = config.N, config.F, config.head_up_filters, config.out_ch
        size = N // 2 ** len(config.encoder_filters)
        cin = config.encoder_filters[-1]
        self.decoder: list[ConvBlock] = []
        for i, f in enumerate(config.decoder_filters):
            self.decoder.append(ConvBlock(f"{name}.decoder.block{i}", cin, f, size, make_upsample(), "up"))
            cin, size = f, size * 2
        half = N // 2
        self.centre: Any = None
        self.border: ConvBlock | None = None
        self.border_out: Any = None
        self.full: ConvBlock | None = None
        self.full_out: Any = None
        if config.pad_object:
            self.centre = _conv(f"{name}.head.centre", F - 4, out, half, relu=False)
            if config.probe_big:
                self.border = ConvBlock(f"{name}.head.border", 4, g, half, make_upsample(), "up")
                self.border_out = _conv(f"{name}.head.border.out", g, out, N, relu=False)
        else:
            self.full = ConvBlock(f"{name}.head.full", F, g, half, make_upsample(), "up")
            self.full_out = _conv(f"{name}.head.full.out", g, out, N, relu=False)
        self.N = N
        self.border_mask = tf.constant(np.asarray(border_mask, dtype=np.float32)[None, :, :, None])

    def convs(self) -> dict[str, Any]:
        """This head's convs in canonical parameter order (decoder, centre, border or full branch)."""
        layers: dict[str, Any] = {}
        for block in self.decoder:
            layers.update(block.convs())
        if self.centre is not None:
            layers[self.centre.name] = self.centre
        if self.border is not None:
            layers.update(self.border.convs())
            layers[self.border_out.name] = self.border_out
        if self.full is not None:
            layers.update(self.full.convs())
            layers[self.full_out.name] = self.full_out
        return layers

    # Stages (channels-last in and out) ----------------------------------------------------------

    def head(self, features: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Features (B, N/2, N/2, F) → this head's final map (B, N, N, out_ch)."""
        if self.full is not None:
            return self.head_full(features)
        return self.head_padded(features)

    def head_padded(self, features: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """pad_object=true: centre conv on channels [0, F-4), padded; plus the border branch."""
        taps: dict[str, Tensor] = {}
        F = int(features.shape[-1])
        centre = self.activation(self.centre(features[..., : F - 4]))
        taps[f"{self.name}.head.centre"] = centre
        q = self.N // 4
        padded = tf.pad(centre, [[0, 0], [q, q], [q, q], [0, 0]])
        taps[f"{self.name}.head.padded"] = padded
        if self.border is None:
            return padded, taps
        h = self.border(features[..., F - 4 :], taps)
        out = _swish(self.border_out(h))
        taps[f"{self.name}.head.border.out"] = out
        masked = out * self.border_mask
        taps[f"{self.name}.head.border.masked"] = masked
        total = padded + masked
        taps[f"{self.name}.head.sum"] = total
        return total, taps

    def head_full(self, features: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """pad_object=false: an up block on all F channels, conv, head activation."""
        assert self.full is not None
        taps: dict[str, Tensor] = {}
        h = self.full(features, taps)
        out = self.activation(self.full_out(h))
        taps[f"{self.name}.head.full.out"] = out
        return out, taps


class PtychoModel:
    """The canonical model built for one configuration; weights are loaded separately.

    Subclasses change the model through the ``make_*`` build hooks and ``translate`` (see the module
    docstring); the defaults build the canonical model.
    """

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        N, C = config.N, config.C
        self.N, self.M, self.C = N, config.M, C
        self.object_big = config.object_big
        self._probe_big = config.probe_big  # read back only where no border branch can show it
        # effective_config reads the activation back by identity; a hook's own function has no name.
        self.amp_activation_name = config.amp_activation
        self.log_scale = tf.Variable(0.0, dtype=tf.float32, trainable=True, name="log_scale")
        self.encoder: list[ConvBlock] = []
        cin, size = C, N
        for i, f in enumerate(config.encoder_filters):
            self.encoder.append(ConvBlock(f"encoder.block{i}", cin, f, size, self.make_pool(), "pool"))
            cin, size = f, size // 2
        self.centre_mask = np.asarray(self.make_centre_mask(N), dtype=np.float32)
        border = np.asarray(self.make_border_mask(N), dtype=np.float32)
        self.heads = {
            "amp": Head("amp", config, self.make_activation(config.amp_activation), self.make_upsample, border),
            "phase": Head("phase", config, _pi_tanh, self.make_upsample, border),
        }
        self.probe_mask = (
            tf.constant(np.asarray(self.make_disk_mask(N), dtype=np.float32)) if config.probe_mask else None
        )
        self.input_spec = (
            tf.TensorSpec([None, C, N, N], tf.float32, name="x"),
            tf.TensorSpec([None, C, 2], tf.float32, name="offsets"),
            tf.TensorSpec([N, N], tf.complex64, name="probe"),
        )

    # Build hooks (override in a subclass to change the model) --------------------------------------

    def make_activation(self, name: str) -> Activation:
        """The amplitude head's activation for ``amp_activation`` ``name``."""
        return AMP_ACTIVATIONS[name]

    def make_pool(self) -> Any:
        """The 2x2 max-pool ending a down block; called once per encoder block."""
        return keras.layers.MaxPooling2D(2, strides=2, padding="valid")

    def make_upsample(self) -> Any:
        """The x2 nearest upsampling ending an up block (decoder blocks, border and full heads)."""
        return NearestUpsample2x()

    def make_centre_mask(self, N: int) -> np.ndarray:
        """(N, N) float32 window whose moved copies the merge counts in its denominator."""
        return physics.centre_mask(N)

    def make_border_mask(self, N: int) -> np.ndarray:
        """(N, N) float32 mask multiplied into the border branch's output."""
        return physics.border_mask(N)

    def make_disk_mask(self, N: int) -> np.ndarray:
        """(N, N) float32 hard disk multiplied into the field when probe_mask is on."""
        return physics.disk_mask(N)

    def translate(self, images: Tensor, offsets: Tensor) -> Tensor:
        """The bilinear translation used by both merge and reextract. images (..., H, W), offsets
        (..., 2): the merge passes its patches' real and imaginary parts and its centre masks
        stacked on a new leading axis (real), the re-extraction the complex canvas, tiled."""
        return physics.translate(images, offsets)

    # Parameters -----------------------------------------------------------------------------------

    def conv_layers(self) -> dict[str, Any]:
        """Every Keras Conv2D, keyed by its canonical parameter prefix, in parameter order."""
        layers: dict[str, Any] = {}
        for block in self.encoder:
            layers.update(block.convs())
        for h in HEADS:
            layers.update(self.heads[h].convs())
        return layers

    def count_conv_params(self) -> int:
        return sum(int(layer.count_params()) for layer in self.conv_layers().values())

    def load_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Assign canonical weights; (kh, kw, in, out) is Keras's own kernel layout, so no permute."""
        self.log_scale.assign(np.asarray(weights["log_scale"], dtype=np.float32))
        for prefix, layer in self.conv_layers().items():
            layer.kernel.assign(np.asarray(weights[f"{prefix}.kernel"], dtype=np.float32))
            layer.bias.assign(np.asarray(weights[f"{prefix}.bias"], dtype=np.float32))

    def export_weights(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {"log_scale": np.asarray(self.log_scale.numpy(), dtype=np.float32)}
        for prefix, layer in self.conv_layers().items():
            out[f"{prefix}.kernel"] = np.asarray(layer.kernel.numpy(), dtype=np.float32)
            out[f"{prefix}.bias"] = np.asarray(layer.bias.numpy(), dtype=np.float32)
        return out

    # Stages -----------------------------------------------------------------------------------------

    def scale_input(self, x: Tensor) -> Tensor:
        """x (B, C, N, N) / exp(log_scale)."""
        return x / tf.exp(self.log_scale)

    def encoder_block(self, i: int, h: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Encoder block ``i``: the seam both ``encode`` and ``run_stage`` go through, so a block's
        bug shows end to end and when layer-local parity runs the block alone."""
        taps: dict[str, Tensor] = {}
        return self.encoder[i](h, taps), taps

    def decoder_block(self, branch: str, i: int, h: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Decoder block ``i`` of ``branch``, the seam of ``decode`` and ``run_stage`` alike."""
        taps: dict[str, Tensor] = {}
        return self.heads[branch].decoder[i](h, taps), taps

    def encode(self, h: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Scaled input (B, N, N, C), channels-last → bottleneck."""
        taps: dict[str, Tensor] = {}
        for i in range(len(self.encoder)):
            h, t = self.encoder_block(i, h)
            taps.update(t)
        return h, taps

    def decode(self, branch: str, z: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Bottleneck (B, n, n, c) → the branch's features (B, N/2, N/2, F)."""
        taps: dict[str, Tensor] = {}
        h = z
        for i in range(len(self.heads[branch].decoder)):
            h, t = self.decoder_block(branch, i, h)
            taps.update(t)
        return h, taps

    def head(self, branch: str, features: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        return self.heads[branch].head(features)

    def object_patches(self, amplitude: Tensor, phase: Tensor) -> Tensor:
        """Object patches A·exp(iφ) (B, out_ch, N, N) from the two heads' channels-last maps."""
        A, phi = _nchw(amplitude), _nchw(phase)
        return tf.complex(A * tf.cos(phi), A * tf.sin(phi))

    def merge(self, patches: Tensor, offsets: Tensor) -> Tensor:
        if self.object_big:
            return physics.merge(patches, offsets, self.M, translate=self.translate, centre_mask=self.centre_mask)
        return physics.pad_to_canvas(patches, self.M)

    def trim(self, canvas: Tensor) -> Tensor:
        return physics.crop_centre(canvas, self.N)

    def reextract(self, canvas: Tensor, offsets: Tensor) -> Tensor:
        return physics.reextract(canvas, offsets, self.N, translate=self.translate)

    def illuminate(self, patches: Tensor, probe: Tensor) -> Tensor:
        return physics.illuminate(patches, probe, self.probe_mask)

    def diffract(self, field: Tensor) -> Tensor:
        return physics.diffract(field)

    def outputs(self, diffraction: Tensor) -> tuple[Tensor, Tensor]:
        """Predicted amplitude (diffraction · exp(log_scale)) and intensity (its square)."""
        amplitude = diffraction * tf.exp(self.log_scale)
        return amplitude, tf.square(amplitude)

    def losses(self, amplitude: Tensor, intensity: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """Per-group Poisson NLL and MAE, (B, 1, 1, 1) each."""
        return physics.losses(amplitude, intensity, x)

    def run_stage(self, stage: Stage, inputs: list[Tensor]) -> dict[str, Tensor]:
        """One stage (``parity.stages``) on the given inputs, canonical (B, C, H, W) layout in and out."""
        kind, first = stage.kind, inputs[0]
        if kind == "input":
            return {"input.scaled": self.scale_input(first)}
        taps: dict[str, Tensor] = {}
        if kind == "encoder":
            assert stage.block is not None
            taps = self.encoder_block(stage.block, _nhwc(first))[1]
        elif kind == "decoder":
            assert stage.branch is not None and stage.block is not None
            taps = self.decoder_block(stage.branch, stage.block, _nhwc(first))[1]
        elif kind == "head":
            assert stage.branch is not None
            taps = self.head(stage.branch, _nhwc(first))[1]
        if taps:
            return {name: _nchw(value) for name, value in taps.items()}
        if kind == "patches":
            return {"object.patches": self.object_patches(_nhwc(first), _nhwc(inputs[1]))}
        if kind == "merge":
            canvas = self.merge(first, _offsets(inputs[1]))
            return {"object.canvas": canvas, "object.trimmed": self.trim(canvas)}
        if kind == "reextract":
            return {"object.reextracted": self.reextract(first, _offsets(inputs[1]))}
        if kind == "illuminate":
            return {"physics.illuminated": self.illuminate(first, tf.reshape(inputs[1], [self.N, self.N]))}
        if kind == "diffract":
            return {"physics.diffraction": self.diffract(first)}
        if kind == "output":
            amplitude, intensity = self.outputs(first)
            return {"output.amplitude": amplitude, "output.intensity": intensity}
        if kind == "loss":
            nll, mae = self.losses(first, inputs[1], inputs[2])
            return {"loss.poisson_nll": nll, "loss.mae": mae}
        raise ValueError(f"tensorflow backend: unknown stage kind {kind!r} of stage {stage.name!r}")

    def forward(self, x: Tensor, offsets: Tensor, probe: Tensor) -> dict[str, Tensor]:
        """All taps except the three input taps, each in the canonical (B, C, H, W) layout."""
        taps: dict[str, Tensor] = {}
        scaled = self.scale_input(x)
        taps["input.scaled"] = scaled
        network: dict[str, Tensor] = {}
        z, t = self.encode(_nhwc(scaled))
        network.update(t)
        final: dict[str, Tensor] = {}
        for h in HEADS:
            features, t = self.decode(h, z)
            network.update(t)
            final[h], t = self.head(h, features)
            network.update(t)
        taps.update({name: _nchw(value) for name, value in network.items()})
        patches = self.object_patches(final["amp"], final["phase"])
        taps["object.patches"] = patches
        canvas = self.merge(patches, offsets)
        taps["object.canvas"] = canvas
        taps["object.trimmed"] = self.trim(canvas)
        reextracted = self.reextract(canvas, offsets)
        taps["object.reextracted"] = reextracted
        psi = self.illuminate(reextracted, probe)
        taps["physics.illuminated"] = psi
        diffraction = self.diffract(psi)
        taps["physics.diffraction"] = diffraction
        amplitude, intensity = self.outputs(diffraction)
        taps["output.amplitude"] = amplitude
        taps["output.intensity"] = intensity
        taps["loss.poisson_nll"], taps["loss.mae"] = self.losses(amplitude, intensity, x)
        return taps

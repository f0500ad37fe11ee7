"""The canonical PtychoPINN forward model as a torch.nn.Module tree (forward-model.md, sections 3-4).

The module tree mirrors the canonical parameter names: the canonical ``amp.head.border.conv0.kernel``
is the torch parameter ``amp.head.border.conv0.weight``. That way the framework counts the parameters
itself, loading and exporting is a rename plus a layout transpose, and a misplaced weight cannot hide
behind a hand-written mapping table.

Every stage is its own method taking and returning tensors, so a layer-local parity run can feed any
stage the reference's input to it. Stages return their output plus the taps they produced, keyed by
canonical tap name.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as fn
from torch import nn

from backends.torch import physics
from parity.config import ModelConfig
from parity.stages import Stage
from parity.taps import HEADS

Tensor = torch.Tensor
TensorTaps = dict[str, Tensor]

# Canonical parameter suffix -> torch parameter suffix.
_SUFFIX = {"kernel": "weight", "bias": "bias"}


def _offsets(tap: Tensor) -> Tensor:
    """The offsets tap (B, C, 1, 2) as the physics takes them, (B, C, 2)."""
    return tap.reshape(tap.shape[0], tap.shape[1], 2)


class Swish(nn.Module):
    """x·sigmoid(x), written out rather than ``silu`` so the formula is the spec's own."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(x)


class PiTanh(nn.Module):
    """The phase head activation π·tanh, bounding the predicted phase to (-π, π)."""

    def forward(self, x: Tensor) -> Tensor:
        return math.pi * torch.tanh(x)


# Module class -> amp_activation name, read back by effective_config().
ACTIVATION_NAMES: dict[type[nn.Module], str] = {
    nn.Sigmoid: "sigmoid",
    Swish: "swish",
    nn.Softplus: "softplus",
    nn.ReLU: "relu",
}


def make_activation(name: str) -> nn.Module:
    if name == "sigmoid":
        return nn.Sigmoid()
    if name == "swish":
        return Swish()
    if name == "softplus":
        # log(1 + exp(x)); torch switches to the identity above x = 20, where log1p(exp(x)) already
        # rounds to x in float32, so the threshold changes no value.
        return nn.Softplus()
    if name == "relu":
        return nn.ReLU()
    raise ValueError(f"amp_activation {name!r} is not one of {', '.join(ACTIVATION_NAMES.values())}")


def conv3x3(cin: int, cout: int) -> nn.Conv2d:
    """3x3, stride 1, one pixel of zero padding, with bias: the only convolution the model uses."""
    return nn.Conv2d(cin, cout, kernel_size=3, stride=1, padding=1, bias=True)


class DownBlock(nn.Module):
    """conv → ReLU → conv → ReLU → max-pool 2x2 (the model's ``make_pool``)."""

    def __init__(self, cin: int, f: int, pool: nn.Module) -> None:
        super().__init__()
        self.conv0 = conv3x3(cin, f)
        self.conv1 = conv3x3(f, f)
        self.pool = pool

    def forward(self, x: Tensor, prefix: str) -> tuple[Tensor, TensorTaps]:
        a = fn.relu(self.conv0(x))
        b = fn.relu(self.conv1(a))
        p = self.pool(b)
        return p, {f"{prefix}.conv0": a, f"{prefix}.conv1": b, f"{prefix}.pool": p}


class UpBlock(nn.Module):
    """conv → ReLU → conv → ReLU → nearest upsample x2 (the model's ``make_upsample``); also the
    first half of the border and full heads."""

    def __init__(self, cin: int, f: int, up: nn.Module) -> None:
        super().__init__()
        self.conv0 = conv3x3(cin, f)
        self.conv1 = conv3x3(f, f)
        self.up = up

    def forward(self, x: Tensor, prefix: str) -> tuple[Tensor, TensorTaps]:
        a = fn.relu(self.conv0(x))
        b = fn.relu(self.conv1(a))
        u = self.up(b)
        return u, {f"{prefix}.conv0": a, f"{prefix}.conv1": b, f"{prefix}.up": u}


class UpHead(UpBlock):
    """An up block followed by the output conv: the border branch and the pad_object=false head."""

    def __init__(self, cin: int, f: int, cout: int, up: nn.Module) -> None:
        super().__init__(cin, f, up)
        self.out = conv3x3(f, cout)


class Blocks(nn.Module):
    """Numbered blocks registered as ``block0``, ``block1``... so parameter paths match the canonical
    names (``encoder.block0.conv0``) instead of ModuleList's ``blocks.0.conv0``."""

    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        for i, block in enumerate(blocks):
            self.add_module(f"block{i}", block)

    def blocks(self) -> list[nn.Module]:
        return list(self.children())


class Head(nn.Module):
    """Final layers of one branch: centre conv (+ border branch), or the full up-head."""

    def __init__(self, config: ModelConfig, activation: nn.Module, up: Callable[[], nn.Module]) -> None:
        super().__init__()
        F_, g, out = config.F, config.head_up_filters, config.out_ch
        self.activation = activation
        self.centre: nn.Conv2d | None = None
        self.border: UpHead | None = None
        self.full: UpHead | None = None
        if config.pad_object:
            self.centre = conv3x3(F_ - 4, out)
            if config.probe_big:
                self.border = UpHead(4, g, out, up())
                self.border_activation = Swish()
        else:
            self.full = UpHead(F_, g, out, up())


class Branch(nn.Module):
    """One decoder plus its head; amplitude and phase each have one, with separate weights."""

    def __init__(
        self, config: ModelConfig, activation: nn.Module, bottleneck: int, up: Callable[[], nn.Module]
    ) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        cin = bottleneck
        for f in config.decoder_filters:
            blocks.append(UpBlock(cin, f, up()))
            cin = f
        self.decoder = Blocks(blocks)
        self.head = Head(config, activation, up)


class PtychoPINN(nn.Module):
    """The whole forward model; ``forward`` returns every tap in order of computation.

    The seam for planting bugs (docs/mutations.md, "Seams"): a subclass may override any stage
    method below, ``translate`` (the merge and the re-extraction move images with it), or a build
    hook (``make_activation``, ``make_pool``, ``make_upsample``, ``make_centre_mask``,
    ``make_border_mask``, ``make_disk_mask``, ``load_weights``), which the model calls while it is
    built; ``TorchBackend`` subclasses then set ``model_class`` to it. The TensorFlow model has the
    same hooks under the same names.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        N, M, C = config.N, config.M, config.C
        self.log_scale = nn.Parameter(torch.tensor(math.log(config.input_scale), dtype=torch.float32))
        blocks: list[nn.Module] = []
        cin = C
        for f in config.encoder_filters:
            blocks.append(DownBlock(cin, f, self.make_pool()))
            cin = f
        self.encoder = Blocks(blocks)
        # Read back by effective_config() when the activation's class is not one it knows.
        self.amp_activation_name = config.amp_activation
        self.amp = Branch(config, self.make_activation(config.amp_activation), cin, self.make_upsample)
        self.phase = Branch(config, PiTanh(), cin, self.make_upsample)
        # The merge branches on this flag; effective_config() reads it back from here.
        self.object_big = config.object_big
        # Recorded for pad_object=false, where the flag builds nothing and so cannot be read back.
        self.probe_big_requested = config.probe_big
        self.register_buffer("centre_mask", self.make_centre_mask(N))
        self.register_buffer("border_mask", self.make_border_mask(N))
        self.canvas_size = M
        self.register_buffer("probe_disk", self.make_disk_mask(N) if config.probe_mask else None)

    # --- build hooks (called by __init__) -----------------------------------------------------------

    def make_activation(self, name: str) -> nn.Module:
        """The amplitude head's activation for ``name``."""
        return make_activation(name)

    def make_pool(self) -> nn.Module:
        """The 2x2 max-pool of one down block."""
        return nn.MaxPool2d(kernel_size=2, stride=2)

    def make_upsample(self) -> nn.Module:
        """The x2 nearest upsampling of one up block (decoder, border and full heads)."""
        return nn.Upsample(scale_factor=2, mode="nearest")

    def make_centre_mask(self, N: int) -> Tensor:
        """The central window the merge counts in its denominator."""
        return physics.centre_mask(N)

    def make_border_mask(self, N: int) -> Tensor:
        """What the border branch's output is multiplied by."""
        return physics.border_mask(N)

    def make_disk_mask(self, N: int) -> Tensor:
        """The hard disk multiplied into the illuminated field when probe_mask is on."""
        return physics.disk_mask(N)

    def load_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Copy canonical arrays into the model (every parameter exactly once)."""
        load_canonical_weights(self, weights)

    def translate(self, images: Tensor, offsets: Tensor) -> Tensor:
        """How the merge and the re-extraction move images."""
        return physics.translate(images, offsets)

    @property
    def patch_size(self) -> int:
        """N, read from the mask buffer the model was built with."""
        mask = self.centre_mask
        assert isinstance(mask, Tensor)
        return int(mask.shape[-1])

    @property
    def disk(self) -> Tensor | None:
        """The hard disk multiplied into the field when probe_mask is on, else None."""
        disk = self.probe_disk
        assert disk is None or isinstance(disk, Tensor)
        return disk

    def branch(self, h: str) -> Branch:
        b = getattr(self, h)
        assert isinstance(b, Branch)
        return b

    # --- stages -----------------------------------------------------------------------------------

    def scale_input(self, x: Tensor) -> Tensor:
        return x / torch.exp(self.log_scale)

    def encoder_block(self, i: int, x: Tensor) -> tuple[Tensor, TensorTaps]:
        """Encoder block ``i``: the seam both ``encode`` and ``run_stage`` go through, so a block's
        bug shows end to end and when layer-local parity runs the block alone."""
        block: nn.Module = self.encoder.blocks()[i]
        out: tuple[Tensor, TensorTaps] = block(x, f"encoder.block{i}")
        return out

    def decoder_block(self, h: str, i: int, x: Tensor) -> tuple[Tensor, TensorTaps]:
        """Decoder block ``i`` of branch ``h``, the seam of ``decode`` and ``run_stage`` alike."""
        block: nn.Module = self.branch(h).decoder.blocks()[i]
        out: tuple[Tensor, TensorTaps] = block(x, f"{h}.decoder.block{i}")
        return out

    def encode(self, scaled: Tensor) -> tuple[Tensor, TensorTaps]:
        taps: TensorTaps = {}
        y = scaled
        for i in range(len(self.encoder.blocks())):
            y, t = self.encoder_block(i, y)
            taps.update(t)
        return y, taps

    def decode(self, h: str, features: Tensor) -> tuple[Tensor, TensorTaps]:
        taps: TensorTaps = {}
        y = features
        for i in range(len(self.branch(h).decoder.blocks())):
            y, t = self.decoder_block(h, i, y)
            taps.update(t)
        return y, taps

    def head(self, h: str, decoded: Tensor) -> tuple[Tensor, TensorTaps]:
        """The head's final output (amplitude or phase of the patches) and its taps."""
        head = self.branch(h).head
        N = self.patch_size
        taps: TensorTaps = {}
        if head.centre is not None:
            F_ = decoded.shape[1]
            centre = head.activation(head.centre(decoded[:, : F_ - 4]))
            q = N // 4
            padded = fn.pad(centre, (q, q, q, q))
            taps[f"{h}.head.centre"] = centre
            taps[f"{h}.head.padded"] = padded
            if head.border is None:
                return padded, taps
            up, t = head.border(decoded[:, F_ - 4 :], f"{h}.head.border")
            taps.update(t)
            out = head.border_activation(head.border.out(up))
            masked = out * self.border_mask
            total = padded + masked
            taps[f"{h}.head.border.out"] = out
            taps[f"{h}.head.border.masked"] = masked
            taps[f"{h}.head.sum"] = total
            return total, taps
        assert head.full is not None
        up, t = head.full(decoded, f"{h}.head.full")
        taps.update(t)
        out = head.activation(head.full.out(up))
        taps[f"{h}.head.full.out"] = out
        return out, taps

    def object_patches(self, amplitude: Tensor, phase: Tensor) -> Tensor:
        """O = A·exp(iφ) as A·cos φ + i·A·sin φ; A may be negative in the border, so no polar()."""
        return torch.complex(amplitude * torch.cos(phase), amplitude * torch.sin(phase))

    def merge(self, patches: Tensor, offsets: Tensor) -> Tensor:
        M = self.canvas_size
        if self.object_big:
            mask = self.centre_mask
            assert isinstance(mask, Tensor)
            return physics.merge(patches, offsets, M, translate=self.translate, centre_mask=mask)
        return physics.pad_to_canvas(patches, M)

    def trim(self, canvas: Tensor) -> Tensor:
        return physics.crop_centre(canvas, self.patch_size)

    def reextract(self, canvas: Tensor, offsets: Tensor) -> Tensor:
        return physics.reextract(canvas, offsets, self.patch_size, translate=self.translate)

    def illuminate(self, patches: Tensor, probe: Tensor) -> Tensor:
        return physics.illuminate(patches, probe, self.disk)

    def diffract(self, field: Tensor) -> Tensor:
        return physics.diffract(field)

    def outputs(self, diffraction: Tensor) -> tuple[Tensor, Tensor]:
        amplitude = diffraction * torch.exp(self.log_scale)
        return amplitude, amplitude.square()

    def losses(self, amplitude: Tensor, intensity: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """Per-group Poisson NLL and MAE, shape (B, 1, 1, 1)."""
        return physics.losses(amplitude, intensity, x)

    def run_stage(self, stage: Stage, inputs: list[Tensor]) -> TensorTaps:
        """One stage (``parity.stages``) on the given input tensors, canonical layout in and out."""
        kind, first = stage.kind, inputs[0]
        if kind == "input":
            return {"input.scaled": self.scale_input(first)}
        if kind == "encoder":
            assert stage.block is not None
            return self.encoder_block(stage.block, first)[1]
        if kind == "decoder":
            assert stage.branch is not None and stage.block is not None
            return self.decoder_block(stage.branch, stage.block, first)[1]
        if kind == "head":
            assert stage.branch is not None
            return self.head(stage.branch, first)[1]
        if kind == "patches":
            return {"object.patches": self.object_patches(first, inputs[1])}
        if kind == "merge":
            canvas = self.merge(first, _offsets(inputs[1]))
            return {"object.canvas": canvas, "object.trimmed": self.trim(canvas)}
        if kind == "reextract":
            return {"object.reextracted": self.reextract(first, _offsets(inputs[1]))}
        if kind == "illuminate":
            return {"physics.illuminated": self.illuminate(first, inputs[1])}
        if kind == "diffract":
            return {"physics.diffraction": self.diffract(first)}
        if kind == "output":
            amplitude, intensity = self.outputs(first)
            return {"output.amplitude": amplitude, "output.intensity": intensity}
        if kind == "loss":
            nll, mae = self.losses(first, inputs[1], inputs[2])
            return {"loss.poisson_nll": nll, "loss.mae": mae}
        raise ValueError(f"torch backend: unknown stage kind {kind!r} of stage {stage.name!r}")

    # --- whole pass ---------------------------------------------------------------------------------

    def forward(self, x: Tensor, offsets: Tensor, probe: Tensor) -> TensorTaps:
        """x (B, C, N, N) float32, offsets (B, C, 2) float32, probe (N, N) complex64 → every tap
        after the input taps, in order of computation."""
        taps: TensorTaps = {}
        scaled = self.scale_input(x)
        taps["input.scaled"] = scaled
        features, t = self.encode(scaled)
        taps.update(t)
        final: dict[str, Tensor] = {}
        for h in HEADS:
            decoded, t = self.decode(h, features)
            taps.update(t)
            final[h], t = self.head(h, decoded)
            taps.update(t)
        patches = self.object_patches(final["amp"], final["phase"])
        canvas = self.merge(patches, offsets)
        trimmed = self.trim(canvas)
        reextracted = self.reextract(canvas, offsets)
        illuminated = self.illuminate(reextracted, probe.reshape(1, 1, *probe.shape[-2:]))
        diffraction = self.diffract(illuminated)
        amplitude, intensity = self.outputs(diffraction)
        nll, mae = self.losses(amplitude, intensity, x)
        taps.update(
            {
                "object.patches": patches,
                "object.canvas": canvas,
                "object.trimmed": trimmed,
                "object.reextracted": reextracted,
                "physics.illuminated": illuminated,
                "physics.diffraction": diffraction,
                "output.amplitude": amplitude,
                "output.intensity": intensity,
                "loss.poisson_nll": nll,
                "loss.mae": mae,
            }
        )
        return taps


# --- weights: canonical (kh, kw, in, out) <-> torch (out, in, kh, kw) ------------------------------


def torch_parameter_name(canonical: str) -> str:
    if canonical == "log_scale":
        return canonical
    path, _, suffix = canonical.rpartition(".")
    return f"{path}.{_SUFFIX[suffix]}"


def load_canonical_weights(model: PtychoPINN, weights: Mapping[str, np.ndarray]) -> None:
    """Copy canonical arrays into the model; every model parameter must be set exactly once."""
    params = dict(model.named_parameters())
    seen: set[str] = set()
    with torch.no_grad():
        for name, value in weights.items():
            target = torch_parameter_name(name)
            if target not in params:
                raise KeyError(f"canonical parameter {name!r} has no torch parameter {target!r}")
            arr = np.asarray(value, dtype=np.float32)
            if arr.ndim == 4:
                arr = arr.transpose(3, 2, 0, 1)
            params[target].copy_(torch.from_numpy(np.array(arr, dtype=np.float32, order="C")))
            seen.add(target)
    unset = sorted(set(params) - seen)
    if unset:
        raise KeyError(f"torch parameters not set from the canonical weights: {', '.join(unset)}")


def export_canonical_weights(model: PtychoPINN, names: list[str]) -> dict[str, np.ndarray]:
    params = dict(model.named_parameters())
    out: dict[str, np.ndarray] = {}
    for name in names:
        arr = params[torch_parameter_name(name)].detach().cpu().numpy()
        if arr.ndim == 4:
            arr = arr.transpose(2, 3, 1, 0)
        out[name] = np.array(arr, dtype=np.float32, order="C")
    return out

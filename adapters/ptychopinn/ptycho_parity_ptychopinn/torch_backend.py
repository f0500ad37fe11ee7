"""``ptychopinn-torch``: the ORIGINAL PtychoPINN PyTorch port (package ``ptycho_torch``) as a parity backend.

It builds ``ptycho_torch.model.PtychoPINN`` (CNN generator, amplitude/phase heads, 'amplitude'
physics) for the harness config, writes the canonical weights into its convolutions, feeds the
canonical batch and returns every tap the port computes in its forward pass.

What the port does that shapes this adapter:

- ReLU and SiLU are applied as functions (``F.relu``, ``F.silu``), so a convolution's forward hook
  sees the value BEFORE its activation. Post-activation taps are taken as the input of the module
  that follows (a forward pre-hook); the border branch's SiLU and its multiplication by the border
  mask, which have no module at all, are recorded by a ``TorchFunctionMode`` active only inside
  that head.
- The merge, the re-extraction and the FFT are plain functions of ``ptycho_torch.helper`` that
  ``ForwardModel.forward`` looks up at call time; they are wrapped for the duration of one forward
  pass to record their results, and restored afterwards.
- It never computes the trimmed object, the intensity or the losses in its forward pass: those
  taps are not exposed (``exposed_taps``), rather than recomputed here and passed off as the port's.
- ``log_scale`` is not a weight of the port: it takes ``input_scale_factor`` and
  ``output_scale_factor`` per call (x·f on the way in, amplitude / f on the way out); the adapter
  passes f = exp(-log_scale) for both.
- It divides the probe by its own ``DataConfig.probe_scale``; the canonical probe arrives
  normalised, so that is set to 1.
- Its canvas is ``N + (gridsize-1)·ceil(max_neighbor_distance)`` (+1 if that is odd), without a
  jitter margin (``helper.get_bigN``). With ``canvas_size`` unset the adapter keeps the port's own
  default neighbour distance, as a user's unmodified port would, and reports the canvas it really
  has (68 at the default config, where the canonical model has 78); with ``canvas_size`` set it
  picks the neighbour distance that gives that canvas where the port can.

Port defaults that differ from the canonical model and have no config key of their own (CBAM in
the encoder, SiLU for every activation name but sigmoid, the probe_scale division, the head's
channel split at gridsize 1, the soft probe mask) are set to the canonical behaviour where the port
allows it, and every such setting is listed in ``environment()['settings']``.
"""

from __future__ import annotations

import contextlib
import io
import math
import platform
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from parity.backend import Backend, Taps
from parity.batch import CanonicalBatch, disk_mask
from parity.config import ModelConfig
from parity.errors import BackendUnavailableError, ParityInputError, WeightsError
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
# Taps the port never computes in its forward pass (see the module docstring).
NOT_COMPUTED = ("object.trimmed", "output.intensity", "loss.poisson_nll", "loss.mae")
# Helper functions of ptycho_torch.helper wrapped during a pass: name -> (tap, which element of the result).
HELPER_TAPS: dict[str, tuple[str, int | None]] = {
    "reassemble_patches_position_real": ("object.canvas", 0),  # (canvas (B, M, M), mask, M)
    "extract_channels_from_region": ("object.reextracted", None),  # (B, C, N, N)
    "pad_and_diffract": ("physics.diffraction", 0),  # (amplitude, padded field)
}


def canvas_for(N: int, gridsize: int, max_neighbor_distance: float) -> int:
    """The port's canvas side for a neighbour distance (helper.get_bigN; its padded size adds nothing)."""
    step = math.ceil(max_neighbor_distance)
    if step % 2 == 1:
        step += 1
    return N + (gridsize - 1) * step


def neighbor_distance(config: ModelConfig, default: float) -> float:
    """The port's max_neighbor_distance: its own default unless ``canvas_size`` asks for a canvas it can make.

    At gridsize 1 the port's canvas is always N, whatever the distance: the default is kept and the
    canvas actually built is reported.
    """
    if config.canvas_size is None or config.gridsize == 1:
        return default
    step, rest = divmod(config.canvas_size - config.N, config.gridsize - 1)
    if rest or step % 2:  # not a canvas the port can make; keep the default and report what it builds
        return default
    return float(step)


def port_configs(config: ModelConfig, modules: Any) -> tuple[Any, Any, Any, dict[str, Any]]:
    """The port's (DataConfig, ModelConfig, TrainingConfig) for ``config``, and the settings made.

    One entry per canonical key, so a key added to the schema cannot be silently left at the port's
    default. Keys the port cannot represent are set as close as it allows; ``effective_config``
    then reports what was really built, and the harness's precheck names the key.
    """
    import torch

    cp = modules.config_params
    N, g, C = config.N, config.gridsize, config.C
    F = config.F
    mnd = neighbor_distance(config, cp.DataConfig.max_neighbor_distance)
    mapped: dict[str, str] = {
        "N": "DataConfig.N",
        "gridsize": "DataConfig.grid_size, DataConfig.C, ModelConfig.C_model, ModelConfig.C_forward",
        "n_filters_scale": "ModelConfig.n_filters_scale",
        "amp_activation": "ModelConfig.amp_activation ('sigmoid', else 'silu': the port knows no other)",
        "object_big": "ModelConfig.object_big",
        "probe_big": "ModelConfig.probe_big",
        "probe_mask": "ModelConfig.probe_mask, probe_mask_tensor (the hard disk)",
        "pad_object": "none: the port always predicts the central N/2 square and pads it",
        "probe_scale": "none: used by batch preparation; DataConfig.probe_scale = 1",
        "nphotons": "DataConfig.nphotons (unused by the model)",
        "offset": "ModelConfig.offset (unused by the forward pass)",
        "max_position_jitter": "ModelConfig.max_position_jitter (unused: the port's canvas has no jitter margin)",
        "canvas_size": "DataConfig.max_neighbor_distance",
    }
    missing = [k for k in config.to_dict() if k not in mapped]
    if missing:
        raise ParityInputError(
            f"config key {missing[0]!r} is not mapped to the PyTorch original's configuration by this adapter "
            "(ptycho_parity_ptychopinn.torch_backend.port_configs); it would silently keep the port's default"
        )
    if config.N != 64 and config.has_border:
        raise ParityInputError(
            f"config keys 'N' = {config.N} and 'probe_big' = true: the PyTorch original's border branch has "
            f"n_filters_scale·32 = {32 * config.n_filters_scale} filters at every N, the canonical model "
            f"n_filters_scale·2048/N = {config.head_up_filters}, so the canonical weights cannot be loaded into it"
        )
    if not config.object_big and g > 1:
        raise ParityInputError(
            f"config keys 'object_big' = false and 'gridsize' = {g}: without object_big the PyTorch original's "
            f"encoder takes one input channel, not a group of C = {C} patches, and it neither merges nor "
            "re-extracts, so the canonical weights (encoder input of C channels) cannot be loaded into it"
        )
    data = cp.DataConfig(
        N=N,
        C=C,
        grid_size=(g, g),
        probe_scale=1.0,
        max_neighbor_distance=mnd,
        nphotons=float(config.nphotons),
    )
    model = cp.ModelConfig(
        mode="Unsupervised",
        architecture="cnn",
        cnn_output_mode="amp_phase",
        use_shared_decoder=False,
        C_model=C,
        C_forward=C,
        n_filters_scale=config.n_filters_scale,
        amp_activation="sigmoid" if config.amp_activation == "sigmoid" else "silu",
        batch_norm=False,
        cbam_encoder=False,
        eca_encoder=False,
        cbam_bottleneck=False,
        cbam_decoder=False,
        eca_decoder=False,
        spatial_decoder=False,
        object_big=config.object_big,
        probe_big=config.probe_big,
        pad_object=config.pad_object,  # stored; the port never reads it
        probe_mask=bool(config.probe_mask),
        probe_mask_tensor=torch.from_numpy(disk_mask(N).astype(np.float32)) if config.probe_mask else None,
        offset=config.offset,
        max_position_jitter=config.max_position_jitter,
        use_legacy_decoder_channel_override=True,
        decoder_last_c_outer_fraction=4.0 / F,
        decoder_last_amp_channels=config.out_ch,
        intensity_scale_trainable=False,
        training_patch_weighting="central_mask",
        physics_forward_mode="amplitude",
        amplitude_physics_gain=1.0,
        gaussian_smoothing_sigma=0.0,
    )
    train = cp.TrainingConfig(device="cpu", strategy=None)
    default_model = cp.ModelConfig()
    settings: dict[str, Any] = {
        "mapping": mapped,
        "ModelConfig.cbam_encoder": f"False (port default {default_model.cbam_encoder}): no attention in the "
        "canonical encoder",
        "ModelConfig.amp_activation": f"{model.amp_activation!r} (port default {default_model.amp_activation!r}); "
        "the port applies SiLU for every name but 'sigmoid'",
        "DataConfig.probe_scale": f"1.0 (port default {cp.DataConfig.probe_scale}): the forward pass divides the "
        "probe by it, and the canonical probe arrives normalised",
        "DataConfig.max_neighbor_distance": f"{mnd:g} (port default {cp.DataConfig.max_neighbor_distance:g}): "
        f"sets the canvas, {canvas_for(N, g, mnd)} px here",
        "ModelConfig.offset": f"{config.offset} (port default {default_model.offset}); stored, unused by the forward",
        "ModelConfig.use_legacy_decoder_channel_override": "True, with decoder_last_c_outer_fraction = 4/F = "
        f"{4.0 / F:g} and decoder_last_amp_channels = {config.out_ch}: the canonical centre conv drops exactly the "
        f"last 4 feature channels; the port's default drops out_ch = {config.out_ch}"
        + (" (the same here)" if config.out_ch == 4 else ""),
        "ModelConfig.probe_mask_tensor": "the hard disk of forward-model.md section 2 (port default for "
        "probe_mask=True: a Gaussian-smoothed soft disk)"
        if config.probe_mask
        else "None (probe_mask off)",
        "ModelConfig.intensity_scale_trainable": "False (port default): True would add a log_scale parameter and "
        "alpha·pred + beta",
        "log_scale": "passed per call as input_scale_factor = output_scale_factor = exp(-log_scale)",
    }
    return data, model, train, settings


class _BorderRecorder:
    """Records ``F.silu`` results, and products whose first factor is the latest one, inside one head.

    The border branch of the port's last decoder stage applies SiLU and the border mask as plain
    tensor operations, which no hook can see; a TorchFunctionMode entered by a pre-hook on that
    head and left by its forward hook sees both.
    """

    def __init__(self) -> None:
        from torch.overrides import TorchFunctionMode

        recorder = self

        class _Mode(TorchFunctionMode):
            def __torch_function__(
                self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
            ) -> Any:
                return recorder.seen(func, args, func(*args, **(kwargs or {})))

        self.mode: Any = _Mode()
        self.silu: list[Any] = []
        self.masked: list[Any] = []
        self.active = False

    def seen(self, func: Any, args: tuple[Any, ...], out: Any) -> Any:
        import torch
        from torch.nn import functional

        if func is functional.silu:
            self.silu.append(out)
        elif func in (torch.Tensor.mul, torch.Tensor.__mul__, torch.mul) and self.silu:
            if args and args[0] is self.silu[-1]:  # identity, not ==: tensors compare elementwise
                self.masked.append(out)
        return out

    def enter(self) -> None:
        if not self.active:
            self.mode.__enter__()
            self.active = True

    def exit(self) -> None:
        if self.active:
            self.active = False
            self.mode.__exit__(None, None, None)


class _Modules:
    """The port's modules this adapter uses, imported once the port is located."""

    def __init__(self, backend: str) -> None:
        self.original = require_original(backend, "ptycho_torch", "config_params", "helper", "model")
        package = self.original.module
        # The port imports the TensorFlow package's helpers (ptycho.image, ptycho.debug_parity): both
        # must come from the same checkout, or the report would name a commit that was not what ran.
        tf_side = sys.modules.get("ptycho")
        tf_root = Path(tf_side.__file__).resolve().parent.parent if tf_side and tf_side.__file__ else None
        if tf_root is not None and tf_root != self.original.root.resolve():
            raise BackendUnavailableError(
                backend,
                f"ptycho_torch comes from {self.original.root} but the ptycho it imports comes from {tf_root}; "
                "run with one PtychoPINN per process",
            )
        self.config_params = package.config_params
        self.helper = package.helper
        self.model = package.model


class PtychoPINNTorchBackend(Backend):
    """The original PtychoPINN PyTorch port (``ptycho_torch``), float32 / complex64, CPU."""

    name: str = "ptychopinn-torch"
    precision: str = "float32"

    @classmethod
    def shipped_deviations(cls) -> Path | None:
        """The deviations this package declares for the port (its canvas size); see deviations.toml."""
        from ptycho_parity_ptychopinn import deviations_file

        return deviations_file()

    @classmethod
    def availability_problem(cls) -> str | None:
        """Why the original cannot be loaded, checked without importing it (None: try constructing)."""
        return _availability("ptycho_torch", ("torch",))

    def __init__(self, config: ModelConfig, weights: Mapping[str, np.ndarray], device: str = "cpu") -> None:
        problem = self.device_problem(device)
        if problem:
            raise ParityInputError(problem)
        modules = _Modules(self.name)
        self.original = modules.original
        if not isinstance(config, ModelConfig):
            raise ParityInputError(f"{self.name} is built from a parity.ModelConfig, got {type(config).__name__}")
        validate_weights(weights, config)
        super().__init__(config, weights, device)
        self._helper = modules.helper
        self.data_config, self.model_config, self.training_config, self._settings = port_configs(config, modules)
        import torch

        from backends.torch.backend import set_precision_controls

        set_precision_controls(torch.device("cpu"))  # the same controls as the project's torch backend
        with contextlib.redirect_stdout(io.StringIO()):  # "Decoder Block i: No attention module added."
            self.net = modules.model.PtychoPINN(self.model_config, self.data_config, self.training_config)
        self.net.eval()
        self._load(weights)

    # ------------------------------------------------------------------ weights
    def _conv_paths(self) -> dict[str, str]:
        """Canonical conv prefix -> the port's module path (its ``.weight`` / ``.bias``)."""
        cfg = self.config
        paths: dict[str, str] = {}
        for i in range(len(cfg.encoder_filters)):
            for j in (0, 1):
                paths[f"encoder.block{i}.conv{j}"] = f"autoencoder.encoder.blocks.{i}.conv{j + 1}"
        for h, decoder, last in (("amp", "decoder_amp", "amp"), ("phase", "decoder_phase", "phase")):
            for i in range(len(cfg.decoder_filters)):
                for j in (0, 1):
                    paths[f"{h}.decoder.block{i}.conv{j}"] = f"autoencoder.{decoder}.blocks.{i}.conv{j + 1}"
            paths[f"{h}.head.centre"] = f"autoencoder.{decoder}.{last}.conv1"
            if self.model_config.probe_big:
                paths[f"{h}.head.border.conv0"] = f"autoencoder.{decoder}.{last}.conv_up_block.conv1"
                paths[f"{h}.head.border.conv1"] = f"autoencoder.{decoder}.{last}.conv_up_block.conv2"
                paths[f"{h}.head.border.out"] = f"autoencoder.{decoder}.{last}.conv2"
        return paths

    def _load(self, weights: Mapping[str, np.ndarray]) -> None:
        """Write every canonical weight into the port's convolutions; refuse anything left over on either side."""
        import torch
        from torch import nn

        modules = dict(self.net.named_modules())
        paths = self._conv_paths()
        prefixes = conv_prefixes(self.config)
        self.unbuildable: str | None = None
        if not self.config.pad_object:
            # The port always pads its heads: it has no head.full.* to take the canonical head weights. It is
            # built anyway, so that effective_config() reports pad_object = true and the harness's precheck
            # names the key; the encoder and decoders are loaded, and forward/export refuse to run.
            self.unbuildable = (
                "config key 'pad_object' = false: the PyTorch original has no un-padded head (it always predicts "
                "the central N/2 square and pads it), so the canonical head weights amp.head.full.* and "
                "phase.head.full.* have nowhere to go"
            )
            prefixes = [p for p in prefixes if ".head." not in p]
            paths = {p: path for p, path in paths.items() if ".head." not in p}
        if sorted(paths) != sorted(prefixes):
            raise WeightsError(
                f"the port's convolutions do not map one to one onto the canonical ones: "
                f"{unused(prefixes, paths) or unused(paths, prefixes)}"
            )
        # Convs that run in this configuration: the border branch is built but unused without probe_big.
        skipped = () if self.model_config.probe_big else (".conv_up_block.", ".amp.conv2", ".phase.conv2")
        running = [
            name
            for name, m in modules.items()
            if isinstance(m, nn.Conv2d) and name.startswith("autoencoder.") and not any(s in name for s in skipped)
        ]
        untouched = unused(running, paths.values())
        if self.unbuildable:
            heads = (".decoder_amp.amp.", ".decoder_phase.phase.")
            untouched = [name for name in untouched if not any(h in name for h in heads)]
        if untouched:
            raise WeightsError(f"convolutions of the PyTorch original that no canonical weight maps to: {untouched}")
        self._convs: dict[str, Any] = {}
        with torch.no_grad():
            for prefix in prefixes:
                conv = modules[paths[prefix]]
                kernel = np.asarray(weights[f"{prefix}.kernel"], np.float32)
                bias = np.asarray(weights[f"{prefix}.bias"], np.float32)
                k = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))  # -> (out, in, kh, kw)
                if tuple(conv.weight.shape) != tuple(k.shape) or tuple(conv.bias.shape) != bias.shape:
                    raise WeightsError(
                        f"{prefix}: the port's {paths[prefix]} has weight {tuple(conv.weight.shape)}, bias "
                        f"{tuple(conv.bias.shape)}; the canonical weights give {tuple(k.shape)}, {bias.shape}"
                    )
                conv.weight.copy_(k)
                conv.bias.copy_(torch.from_numpy(bias.copy()))
                self._convs[prefix] = conv
        # Not a weight of the port: it enters each call as a scale factor (see forward).
        self._log_scale = np.asarray(weights["log_scale"], np.float32).copy()

    def _refuse_if_unbuildable(self) -> None:
        if self.unbuildable:
            raise ParityInputError(self.unbuildable)

    def export_weights(self) -> dict[str, np.ndarray]:
        self._refuse_if_unbuildable()
        out: dict[str, np.ndarray] = {"log_scale": self._log_scale.copy()}
        for prefix, conv in self._convs.items():
            out[f"{prefix}.kernel"] = np.ascontiguousarray(conv.weight.detach().cpu().numpy().transpose(2, 3, 1, 0))
            out[f"{prefix}.bias"] = conv.bias.detach().cpu().numpy().copy()
        return {name: out[name] for name in parameter_shapes(self.config)}

    def count_conv_params(self) -> int:
        """Convolution weights and biases of the port that hold canonical weights (log_scale excluded)."""
        return int(sum(c.weight.numel() + c.bias.numel() for c in self._convs.values()))

    # ------------------------------------------------------------------ forward
    def exposed_taps(self) -> frozenset[str]:
        """The canonical taps the port computes in its forward pass (not the trimmed object, intensity, losses).

        With object_big false the port has no canvas and no re-extraction at all.
        """
        absent = set(NOT_COMPUTED)
        if not self.model_config.object_big:
            absent |= {"object.canvas", "object.reextracted"}
        return frozenset(n for n in tap_names(self.config) if n not in absent)

    def forward(self, batch: CanonicalBatch) -> Taps:
        import torch

        self._refuse_if_unbuildable()
        cfg = self.config
        batch = check_batch(batch, cfg)
        B, C, N = batch.size, cfg.C, cfg.N
        captured: dict[str, Any] = {}
        with self._hooks(captured) as recorders, self._wrapped_helpers(captured), torch.no_grad():
            factor = float(np.float32(np.exp(-np.float64(self._log_scale))))
            f = torch.full((B, 1, 1, 1), factor, dtype=torch.float32)
            x = torch.from_numpy(batch.x.copy())
            positions = torch.from_numpy(batch.offsets.reshape(B, C, 1, 2).copy())
            probe = torch.from_numpy(batch.probe.reshape(1, 1, 1, N, N).copy())
            # x·f on the way in (= x / exp(log_scale)), amplitude / f on the way out (= · exp(log_scale)).
            amplitude, _, _ = self.net(x, positions, probe, f, f, None)
        for h, recorder in recorders.items():
            captured[f"{h}.head.border.out"] = recorder.silu[-1]
            captured[f"{h}.head.border.masked"] = recorder.masked[-1]
        captured["output.amplitude"] = amplitude
        taps = input_taps(batch, cfg)
        for name, tensor in captured.items():
            value = tensor.detach().cpu().numpy()
            if name == "object.canvas":
                value = value[:, None]  # (B, M, M) -> (B, 1, M, M)
            elif name == "physics.illuminated":
                value = value[:, :, 0]  # (B, C, P=1, N, N) -> (B, C, N, N)
            taps[name] = np.array(value, copy=True)
        return in_spec_order(taps, cfg, B)

    @contextlib.contextmanager
    def _hooks(self, captured: dict[str, Any]) -> Iterator[dict[str, _BorderRecorder]]:
        """Forward (pre-)hooks for every module-level tap; removed on exit, whatever happened."""
        ae = self.net.autoencoder
        handles: list[Any] = []

        def before(module: Any, name: str) -> None:
            def hook(_: Any, args: tuple[Any, ...]) -> None:
                captured[name] = args[0].clone()

            handles.append(module.register_forward_pre_hook(hook))

        def after(module: Any, name: str, index: int | None = None) -> None:
            def hook(_: Any, __: Any, out: Any) -> None:
                captured[name] = (out if index is None else out[index]).clone()

            handles.append(module.register_forward_hook(hook))

        before(ae, "input.scaled")
        for i, block in enumerate(ae.encoder.blocks):
            before(block.conv2, f"encoder.block{i}.conv0")  # F.relu(conv1(x)) is conv2's input
            before(block.pool, f"encoder.block{i}.conv1")  # F.relu(conv2(.)) is the pool's input (no CBAM)
            after(block.pool, f"encoder.block{i}.pool")
        recorders: dict[str, _BorderRecorder] = {}
        for h, decoder, last in (
            ("amp", ae.decoder_amp, ae.decoder_amp.amp),
            ("phase", ae.decoder_phase, ae.decoder_phase.phase),
        ):
            for i, block in enumerate(decoder.blocks):
                before(block.conv2, f"{h}.decoder.block{i}.conv0")
                before(block.up, f"{h}.decoder.block{i}.conv1")
                after(block.up, f"{h}.decoder.block{i}.up")
            after(last.padding, f"{h}.head.padded")
            before(last.padding, f"{h}.head.centre")  # the activation is a function here; its result is padded
            if self.model_config.probe_big:
                up = last.conv_up_block
                before(up.conv2, f"{h}.head.border.conv0")
                before(up.up, f"{h}.head.border.conv1")
                after(up.up, f"{h}.head.border.up")
                after(last, f"{h}.head.sum")
                recorder = recorders[h] = _BorderRecorder()
                handles.append(last.register_forward_pre_hook(lambda _m, _a, r=recorder: r.enter()))
                handles.append(last.register_forward_hook(lambda _m, _a, _o, r=recorder: r.exit()))
        after(self.net.combine_complex, "object.patches")
        after(self.net.forward_model.probe_illumination, "physics.illuminated", 0)
        try:
            yield recorders
        finally:
            for handle in handles:
                handle.remove()
            for recorder in recorders.values():  # in case the pass raised inside a head
                recorder.exit()

    @contextlib.contextmanager
    def _wrapped_helpers(self, captured: dict[str, Any]) -> Iterator[None]:
        """Wrap the helper functions the forward pass looks up at call time; restore them on exit."""
        helper = self._helper
        originals: dict[str, Callable[..., Any]] = {name: getattr(helper, name) for name in HELPER_TAPS}

        def wrap(name: str) -> Callable[..., Any]:
            fn, (tap, index) = originals[name], HELPER_TAPS[name]

            def wrapper(*args: Any, **kwargs: Any) -> Any:
                out = fn(*args, **kwargs)
                captured[tap] = (out if index is None else out[index]).clone()
                return out

            return wrapper

        try:
            for name in HELPER_TAPS:
                setattr(helper, name, wrap(name))
            yield
        finally:
            for name, fn in originals.items():
                setattr(helper, name, fn)

    # ------------------------------------------------------------------ read back
    def effective_config(self) -> dict[str, Any]:
        import torch

        net, ae = self.net, self.net.autoencoder
        first = ae.encoder.blocks[0].conv1
        last = ae.decoder_amp.amp
        N = 4 * int(last.padding.padding[0])  # the head pads N/4 on every side
        base = 32 if N == 64 else 16
        activation = ae.decoder_amp.amp_activation
        mask = net.forward_model.probe_illumination._resolve_probe_mask(torch.zeros(1, dtype=torch.float32))
        return {
            "N": N,
            "gridsize": math.isqrt(int(first.in_channels)),
            "n_filters_scale": int(first.out_channels) // base,
            "amp_activation": "sigmoid" if getattr(activation, "activation_type", None) == "sigmoid" else "swish",
            "object_big": bool(net.forward_model.object_big),
            "probe_big": bool(last.model_config.probe_big),  # Decoder_last reads it at call time
            "probe_mask": not bool(torch.all(mask == 1)),
            "pad_object": True,  # the port always predicts the central square and pads it (pad_object is never read)
            "probe_scale": self.config.probe_scale,  # used by batch preparation; the port's own is 1 (see settings)
            "nphotons": self.config.nphotons,  # unused by the model
            # offset and the jitter margin only enter the canonical model through the canvas, read back here.
            "offset": self.config.offset,
            "max_position_jitter": self.config.max_position_jitter,
            "canvas_size": int(self._helper.get_padded_size(net.data_config, net.model_config)),
        }

    def environment(self) -> dict[str, Any]:
        import torch

        return {
            "framework": "torch (original PtychoPINN port, package ptycho_torch)",
            "framework_version": torch.__version__,
            "numpy_version": np.__version__,
            "python_version": platform.python_version(),
            "device": self.device,
            "dtype": "float32",
            "execution": "eager, torch.no_grad",
            "original": self.original.record(),
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
            "cuda_matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "seed": SEED,
            "threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(),
            "settings": self._settings,
        }

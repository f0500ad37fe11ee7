"""The model's stages, for layer-local parity: which taps each stage reads and which it produces.

End to end, a float32 error made early is carried into every later tap, and a bug sitting downstream
of a larger upstream error is hidden behind it. Layer-local parity feeds each stage the reference's
own values of its inputs and compares only what that stage adds, so the report can tell "this layer
computes differently" from "error carried in from upstream".

A stage's outputs are named here by the tap list (``parity.taps``), grouped by prefix, so a stage and
its taps cannot drift apart: the one place a tap is named stays ``taps``.
"""

from __future__ import annotations

from dataclasses import dataclass

from parity.config import ModelConfig
from parity.taps import HEADS, tap_names

# What a stage computes, for a backend's dispatch: the same kind in every backend.
KINDS = (
    "input",
    "encoder",
    "decoder",
    "head",
    "patches",
    "merge",
    "reextract",
    "illuminate",
    "diffract",
    "output",
    "loss",
)


@dataclass(frozen=True)
class Stage:
    name: str
    kind: str  # one of KINDS
    inputs: tuple[str, ...]  # taps of the reference fed to the stage, in the order listed
    outputs: tuple[str, ...]  # taps the stage produces, in order of computation
    branch: str | None = None  # "amp" or "phase" for decoder blocks and heads
    block: int | None = None  # the block's index for encoder and decoder blocks


def stages(config: ModelConfig) -> list[Stage]:
    """Every stage of one forward pass, in order of computation; their outputs cover every tap
    after the input taps exactly once."""
    names = tap_names(config)

    def under(prefix: str) -> tuple[str, ...]:
        return tuple(n for n in names if n.startswith(prefix + "."))

    out = [Stage("input", "input", ("input.x",), ("input.scaled",))]
    previous = "input.scaled"
    for i in range(len(config.encoder_filters)):
        stage = Stage(f"encoder.block{i}", "encoder", (previous,), under(f"encoder.block{i}"), block=i)
        out.append(stage)
        previous = stage.outputs[-1]
    bottleneck = previous
    final: list[str] = []
    for h in HEADS:
        previous = bottleneck
        for i in range(len(config.decoder_filters)):
            name = f"{h}.decoder.block{i}"
            stage = Stage(name, "decoder", (previous,), under(name), branch=h, block=i)
            out.append(stage)
            previous = stage.outputs[-1]
        head = Stage(f"{h}.head", "head", (previous,), under(f"{h}.head"), branch=h)
        out.append(head)
        final.append(head.outputs[-1])  # head.sum, head.padded or head.full.out: the branch's map
    out += [
        Stage("object.patches", "patches", tuple(final), ("object.patches",)),
        Stage("object.merge", "merge", ("object.patches", "input.offsets"), ("object.canvas", "object.trimmed")),
        Stage("object.reextract", "reextract", ("object.canvas", "input.offsets"), ("object.reextracted",)),
        Stage("physics.illuminate", "illuminate", ("object.reextracted", "input.probe"), ("physics.illuminated",)),
        Stage("physics.diffract", "diffract", ("physics.illuminated",), ("physics.diffraction",)),
        Stage("output", "output", ("physics.diffraction",), ("output.amplitude", "output.intensity")),
        Stage("loss", "loss", ("output.amplitude", "output.intensity", "input.x"), ("loss.poisson_nll", "loss.mae")),
    ]
    return out


def stage_of(config: ModelConfig) -> dict[str, str]:
    """Tap name -> the stage that produces it."""
    return {tap: s.name for s in stages(config) for tap in s.outputs}

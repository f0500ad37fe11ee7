"""Tap names, order and shapes (forward-model.md, section 6): the one place a tap is named.

Every backend must return exactly these taps, in this order, in the canonical (B, C, H, W) layout.
The harness checks a backend's output against this list, so a missing branch or a wrong shape is
reported at its place in the order of computation instead of surfacing as a confusing mismatch later.
"""

from __future__ import annotations

import fnmatch
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from parity.config import ModelConfig
from parity.errors import ParityInputError

HEADS = ("amp", "phase")
# The two per-group losses whose gradients are compared, each summed over the batch.
LOSSES = ("poisson_nll", "mae")
GRAD = "grad"


@dataclass(frozen=True)
class TapSpec:
    name: str
    shape: tuple[int, ...]
    complex: bool = False
    # The config key that sets this tap's (H, W), centred: where a declared deviation lets two
    # sides differ in that key, they are compared on the centred window both hold.
    follows: str | None = None


def tap_specs(config: ModelConfig, batch_size: int) -> list[TapSpec]:
    """All taps of one forward pass, in order of computation."""
    B, C, N, M = batch_size, config.C, config.N, config.M
    out = config.out_ch
    specs = [
        TapSpec("input.x", (B, C, N, N)),
        TapSpec("input.offsets", (B, C, 1, 2)),
        TapSpec("input.probe", (1, 1, N, N), complex=True),
        TapSpec("input.scaled", (B, C, N, N)),
    ]
    size = N
    for i, f in enumerate(config.encoder_filters):
        specs += [
            TapSpec(f"encoder.block{i}.conv0", (B, f, size, size)),
            TapSpec(f"encoder.block{i}.conv1", (B, f, size, size)),
            TapSpec(f"encoder.block{i}.pool", (B, f, size // 2, size // 2)),
        ]
        size //= 2
    half, g = N // 2, config.head_up_filters
    for h in HEADS:
        size = N // 2 ** len(config.encoder_filters)
        for i, f in enumerate(config.decoder_filters):
            specs += [
                TapSpec(f"{h}.decoder.block{i}.conv0", (B, f, size, size)),
                TapSpec(f"{h}.decoder.block{i}.conv1", (B, f, size, size)),
                TapSpec(f"{h}.decoder.block{i}.up", (B, f, 2 * size, 2 * size)),
            ]
            size *= 2
        if config.pad_object:
            specs += [
                TapSpec(f"{h}.head.centre", (B, out, half, half)),
                TapSpec(f"{h}.head.padded", (B, out, N, N)),
            ]
            if config.probe_big:
                specs += [
                    TapSpec(f"{h}.head.border.conv0", (B, g, half, half)),
                    TapSpec(f"{h}.head.border.conv1", (B, g, half, half)),
                    TapSpec(f"{h}.head.border.up", (B, g, N, N)),
                    TapSpec(f"{h}.head.border.out", (B, out, N, N)),
                    TapSpec(f"{h}.head.border.masked", (B, out, N, N)),
                    TapSpec(f"{h}.head.sum", (B, out, N, N)),
                ]
        else:
            specs += [
                TapSpec(f"{h}.head.full.conv0", (B, g, half, half)),
                TapSpec(f"{h}.head.full.conv1", (B, g, half, half)),
                TapSpec(f"{h}.head.full.up", (B, g, N, N)),
                TapSpec(f"{h}.head.full.out", (B, out, N, N)),
            ]
    specs += [
        TapSpec("object.patches", (B, out, N, N), complex=True),
        TapSpec("object.canvas", (B, 1, M, M), complex=True, follows="canvas_size"),
        TapSpec("object.trimmed", (B, 1, N, N), complex=True),
        TapSpec("object.reextracted", (B, C, N, N), complex=True),
        TapSpec("physics.illuminated", (B, C, N, N), complex=True),
        TapSpec("physics.diffraction", (B, C, N, N)),
        TapSpec("output.amplitude", (B, C, N, N)),
        TapSpec("output.intensity", (B, C, N, N)),
        TapSpec("loss.poisson_nll", (B, 1, 1, 1)),
        TapSpec("loss.mae", (B, 1, 1, 1)),
    ]
    return specs


def gradient_tap_specs(config: ModelConfig, batch_size: int) -> list[TapSpec]:
    """Gradients of each loss (summed over the batch) w.r.t. every parameter and the input ``x``,
    named ``grad.<loss>.<parameter>`` and listed in backward order, so the first diverging one is the
    gradient nearest the loss that differs.

    Backward order is the reverse of the canonical parameter order (the phase head's last conv first,
    encoder block 0 last), then ``log_scale`` and ``input.x``: both are finished only when the backward
    pass reaches the input (log_scale also divides the input; x also enters the losses directly), so
    an error anywhere upstream reaches them and they must not be blamed before the convolutions.
    Shapes are the canonical parameter layouts (kernels (kh, kw, in, out), biases (out,), log_scale ()).
    """
    from parity.weights import parameter_shapes  # weights imports this module for HEADS

    shapes = parameter_shapes(config)
    convs = [name for name in shapes if name != "log_scale"]
    order: list[tuple[str, tuple[int, ...]]] = []
    for i in range(len(convs) - 2, -1, -2):  # (kernel, bias) pairs, last conv first
        order += [(convs[i], shapes[convs[i]]), (convs[i + 1], shapes[convs[i + 1]])]
    order += [("log_scale", ()), ("input.x", (batch_size, config.C, config.N, config.N))]
    return [TapSpec(f"{GRAD}.{loss}.{name}", shape) for loss in LOSSES for name, shape in order]


def tap_names(config: ModelConfig) -> list[str]:
    return [s.name for s in tap_specs(config, 1)]


@lru_cache(maxsize=1)
def all_tap_names() -> frozenset[str]:
    """Every tap name any valid configuration can produce, gradients included (used to reject typos in
    tolerance files and tap patterns)."""
    names: set[str] = set()
    for N, pad, big in itertools.product((64, 128), (True, False), (True, False)):
        config = ModelConfig(N=N, pad_object=pad, probe_big=big)
        names.update(tap_names(config))
        names.update(s.name for s in gradient_tap_specs(config, 1))
    return frozenset(names)


def matching_taps(pattern: str, names: frozenset[str] | list[str] | None = None) -> list[str]:
    """Tap names matched by a shell-style pattern (``encoder.*``, ``*.head.border.*``)."""
    pool = all_tap_names() if names is None else names
    return sorted(n for n in pool if fnmatch.fnmatchcase(n, pattern))


EXCLUDE = "!"


@dataclass(frozen=True)
class TapSelection:
    """The taps a run compares: shell-style patterns, and exclusions written ``!pattern``.

    With no include pattern every tap is included, so ``!loss.*,!output.intensity`` leaves out what
    one backend lacks in two patterns instead of listing everything else.
    """

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    @classmethod
    def parse(cls, patterns: Sequence[str] | None) -> TapSelection | None:
        if not patterns:
            return None
        include = tuple(p for p in patterns if not p.startswith(EXCLUDE))
        exclude = tuple(p[len(EXCLUDE) :] for p in patterns if p.startswith(EXCLUDE))
        return cls(include, exclude)

    def __call__(self, name: str) -> bool:
        if self.include and not any(fnmatch.fnmatchcase(name, p) for p in self.include):
            return False
        return not any(fnmatch.fnmatchcase(name, p) for p in self.exclude)

    def check(self, names: Iterable[str], what: str) -> None:
        """Every pattern must match a tap of ``what``, and something must be left: a typo never
        silently compares nothing or everything."""
        pool = list(names)
        for p in self.include:
            if not any(fnmatch.fnmatchcase(n, p) for n in pool):
                raise ParityInputError(f"option taps: pattern {p!r} matches no tap of {what}")
        for p in self.exclude:
            if not any(fnmatch.fnmatchcase(n, p) for n in pool):
                raise ParityInputError(f"option taps: exclusion {EXCLUDE + p!r} matches no tap of {what}")
        if not any(self(n) for n in pool):
            raise ParityInputError(f"option taps: the patterns leave no tap of {what} to compare")

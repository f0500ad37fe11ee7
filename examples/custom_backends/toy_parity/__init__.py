"""toy_parity: one small classifier kept in PyTorch and Keras 3, plus a float64 NumPy reference,
wrapped as ptycho-parity backends. The walk-through is docs/custom-backends.md.

Importing this package imports no framework: the backends live in ``toy_parity.torch_backend``,
``toy_parity.tensorflow_backend`` and ``toy_parity.reference`` and are loaded by the harness through
the ``ptycho_parity.backends`` entry points declared in pyproject.toml.
"""

from pathlib import Path

from toy_parity.spec import (
    LAYERS,
    ToyConfig,
    generate_weights,
    make_batches,
    parameter_shapes,
    tap_names,
    tap_specs,
    validate_weights,
)


def tolerance_file() -> Path:
    """The tolerance file that ships with this package (its taps are not PtychoPINN's)."""
    return Path(__file__).with_name("tolerances.toml")


__all__ = [
    "LAYERS",
    "ToyConfig",
    "generate_weights",
    "make_batches",
    "parameter_shapes",
    "tap_names",
    "tap_specs",
    "tolerance_file",
    "validate_weights",
]

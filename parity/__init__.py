"""ptycho-parity: forward-parity testing of one model kept in several frameworks.

This package never imports a framework; backends live in ``backends/`` and are found through the
``ptycho_parity.backends`` entry-point group, so ``import parity`` is fast and works with neither
TensorFlow nor PyTorch installed.
"""

from parity import _blas_threads  # noqa: F401  (first: it must run before anything loads NumPy)
from parity.backend import Backend, Taps
from parity.batch import CanonicalBatch
from parity.config import ModelConfig
from parity.errors import (
    BackendUnavailableError,
    BaselineError,
    ConfigError,
    ConfigMismatchError,
    FixtureError,
    ParityInputError,
    ToleranceError,
    WeightsError,
)
from parity.taps import TapSpec, tap_specs

__all__ = [
    "Backend",
    "BackendUnavailableError",
    "BaselineError",
    "CanonicalBatch",
    "ConfigError",
    "ConfigMismatchError",
    "FixtureError",
    "ModelConfig",
    "ParityInputError",
    "TapSpec",
    "Taps",
    "ToleranceError",
    "WeightsError",
    "tap_specs",
]
__version__ = "0.1.0"

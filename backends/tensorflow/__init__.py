"""TensorFlow / Keras 3 backend (float32): the canonical model in one tf.function, plus its physics.

``translate``, ``merge``, ``reextract``, ``diffract`` and ``intensity`` take and return NumPy arrays
(they wrap the ``*_tf`` functions of :mod:`backends.tensorflow.physics`, which the model graph uses).
"""

import os

# TensorFlow logs INFO lines on import; keep them out of test and CLI output unless asked for.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from backends.tensorflow.backend import TensorFlowBackend
from backends.tensorflow.model import PtychoModel
from backends.tensorflow.physics import diffract, intensity, merge, reextract, translate

__all__ = [
    "PtychoModel",
    "TensorFlowBackend",
    "diffract",
    "intensity",
    "merge",
    "reextract",
    "translate",
]

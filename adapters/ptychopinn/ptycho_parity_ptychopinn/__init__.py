"""ptycho-parity backends for the ORIGINAL PtychoPINN (hoidn/PtychoPINN): ``ptychopinn-tf`` and ``ptychopinn-torch``.

They wrap the user's own ``ptycho`` (TensorFlow) and ``ptycho_torch`` (PyTorch) packages, found through
``PTYCHOPINN_PATH`` or installed, so that ``ptycho-parity run --backends reference,ptychopinn-tf,ptychopinn-torch``
names the first layer where the two originals part ways. See docs/ptychopinn.md.

This package is GPL-3.0-or-later because it runs linked with the GPL-3 original; it copies none of
its code. Importing it imports neither framework nor the original: the backends live in
``ptycho_parity_ptychopinn.tf_backend`` and ``ptycho_parity_ptychopinn.torch_backend`` and are loaded by
the harness through the ``ptycho_parity.backends`` entry points.
"""

from pathlib import Path

__version__ = "0.1.0"


def deviations_file() -> Path:
    """The deviations this package declares between the originals and the canonical model (TOML).

    Each entry is a difference the team knows and accepts for now (a config key, or a tap, of one
    backend), with the reason and a reference into the original; a run given this file continues
    past a declared config difference and marks declared divergences as known.
    """
    return Path(__file__).with_name("deviations.toml")


__all__ = ["__version__", "deviations_file"]

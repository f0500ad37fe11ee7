"""Float64 NumPy reference backend, and the physics layer as plain functions on NumPy arrays."""

from backends.reference.backend import ReferenceBackend
from backends.reference.model import ReferenceModel
from backends.reference.physics import (
    border_mask,
    centre_mask,
    crop_centre,
    diffract,
    disk_mask,
    illuminate,
    losses,
    merge,
    pad_to_canvas,
    reextract,
    translate,
)

__all__ = [
    "ReferenceBackend",
    "ReferenceModel",
    "border_mask",
    "centre_mask",
    "crop_centre",
    "diffract",
    "disk_mask",
    "illuminate",
    "losses",
    "merge",
    "pad_to_canvas",
    "reextract",
    "translate",
]

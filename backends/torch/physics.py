"""The differentiable physics layer in PyTorch tensors (forward-model.md, section 4).

These functions are the single implementation the model's stages call, and they are exposed on their
own so tests (and layer-local parity runs) can drive each physical step with hand-made inputs.
Everything stays in float32 / complex64, the precision this backend is compared in.

Translation is a gather from the image extended by zeros, with the sampling coordinates computed per
output pixel in float32. ``torch.nn.functional.grid_sample`` was rejected: it takes normalised
coordinates in [-1, 1] and maps them back to pixels as ``(g + 1) / 2 * (W - 1)``, and that float32
round trip moves integer sample points by a few ulps, so an integer offset is NOT an exact shift
(measured with torch 2.13 on CPU: 1576 of 4096 pixels differ, up to 7e-6, for a (3, -2) shift of a
64 x 64 image). A translation by one offset is separable (the x coordinate depends only on the column,
y only on the row), so the gather runs once along x and once along y, in the same order of operations
as the original's TensorFlow kernel: interpolate along x on the floor and floor + 1 rows, then along y,
with weights (x0 + 1 - x) and (x - x0).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as fn

Tensor = torch.Tensor
_broadcast_shapes: Any = torch.broadcast_shapes  # untyped in torch's stubs

# Added to the merge denominator so canvas pixels no central window reaches stay finite.
MERGE_EPSILON = 0.001
# Clamp inside the Poisson log (spec, section 4).
NLL_FLOOR = 1e-12


def centre_mask(N: int, device: torch.device | str = "cpu") -> Tensor:
    """(N, N) float32 ones on rows and columns [N/4, 3N/4): where the centre head predicts."""
    mask = torch.zeros((N, N), dtype=torch.float32, device=device)
    mask[N // 4 : 3 * N // 4, N // 4 : 3 * N // 4] = 1.0
    return mask


_centre_window = centre_mask  # for merge, whose parameter of that name shadows it


def border_mask(N: int, device: torch.device | str = "cpu") -> Tensor:
    """1 - centre_mask: where the border branch predicts."""
    return 1.0 - centre_mask(N, device)


def disk_mask(N: int, device: torch.device | str = "cpu") -> Tensor:
    """The hard disk of parity.batch.disk_mask, built here so the forward pass never leaves torch.

    Pixel centres are (i - N/2 + 0.5); comparing squared radii in float64 keeps the boundary pixels
    identical to the NumPy definition (the values are exact in float64).
    """
    c = torch.arange(N, dtype=torch.float64, device=device) - N / 2 + 0.5
    r2 = c[:, None] ** 2 + c[None, :] ** 2
    return (r2 < (N / 4) ** 2).to(torch.float32)


def _interp_axis(img: Tensor, coord: Tensor, dim: int) -> Tensor:
    """Linear interpolation of ``img`` along ``dim`` (-1: x, -2: y) at float32 coordinates ``coord``.

    ``coord`` has shape (..., L) with L the output length along ``dim``; neighbours outside the image
    read as zero with their weight unchanged (the output pixel is never zeroed as a whole).
    """
    size = img.shape[dim]
    floor = torch.floor(coord)
    w_lo = (floor + 1.0) - coord
    w_hi = coord - floor
    lo = floor.to(torch.int64)
    if dim == -1:
        expand = (*img.shape[:-1], coord.shape[-1])

        def spread(t: Tensor) -> Tensor:
            return t.unsqueeze(-2)
    else:
        expand = (*img.shape[:-2], coord.shape[-1], img.shape[-1])

        def spread(t: Tensor) -> Tensor:
            return t.unsqueeze(-1)

    result: Tensor | None = None
    for idx, weight in ((lo, w_lo), (lo + 1, w_hi)):
        inside = (idx >= 0) & (idx < size)
        safe = idx.clamp(0, size - 1)
        picked = torch.gather(img, dim, spread(safe).expand(expand))
        value = torch.where(spread(inside), picked, torch.zeros((), dtype=img.dtype, device=img.device))
        term = value * spread(weight)
        result = term if result is None else result + term
    assert result is not None
    return result


def _translate_real(images: Tensor, dx: Tensor, dy: Tensor) -> Tensor:
    H, W = images.shape[-2:]
    cols = torch.arange(W, dtype=torch.float32, device=images.device)
    rows = torch.arange(H, dtype=torch.float32, device=images.device)
    x = cols - dx.unsqueeze(-1)  # (..., W): sample column of every output column
    y = rows - dy.unsqueeze(-1)  # (..., H)
    return _interp_axis(_interp_axis(images, x, dim=-1), y, dim=-2)


def translate(images: Tensor, offsets: Tensor) -> Tensor:
    """T(img, [dx, dy]): out[i, j] = bilinear sample of img at (x = j - dx, y = i - dy).

    images (..., H, W) float32 or complex64; offsets (..., 2) float32 [dx, dy], one per image (leading
    dimensions broadcast). Complex images are translated as real and imaginary parts with the same
    weights.
    """
    if offsets.shape[-1] != 2:
        raise ValueError(f"translate: offsets must end in a [dx, dy] axis of 2, got shape {tuple(offsets.shape)}")
    lead = _broadcast_shapes(images.shape[:-2], offsets.shape[:-1])
    imgs = images.expand(*lead, *images.shape[-2:])
    offs = offsets.to(torch.float32).expand(*lead, 2)
    dx, dy = offs[..., 0], offs[..., 1]
    if imgs.is_complex():
        parts = torch.stack((imgs.real, imgs.imag))
        moved = _translate_real(parts, dx.unsqueeze(0), dy.unsqueeze(0))
        return torch.complex(moved[0], moved[1])
    return _translate_real(imgs, dx, dy)


def pad_to_canvas(images: Tensor, M: int) -> Tensor:
    """Zero-pad the last two axes symmetrically from N to M ((M - N) / 2 on each side)."""
    N = images.shape[-1]
    p = (M - N) // 2
    if images.is_complex():
        return torch.complex(fn.pad(images.real, (p, p, p, p)), fn.pad(images.imag, (p, p, p, p)))
    return fn.pad(images, (p, p, p, p))


def crop_centre(images: Tensor, N: int) -> Tensor:
    """The central N x N window of the last two axes (start (M - N) // 2)."""
    p = (images.shape[-1] - N) // 2
    return images[..., p : p + N, p : p + N]


def merge(
    patches: Tensor,
    offsets: Tensor,
    M: int,
    *,
    translate: Callable[[Tensor, Tensor], Tensor] = translate,
    centre_mask: Tensor | None = None,
    epsilon: float = MERGE_EPSILON,
) -> Tensor:
    """Canvas (B, 1, M, M) complex64 from patches (B, C, N, N) complex64 at offsets (B, C, 2).

    Each patch is padded to M and moved by -(d_bc - d̄), d̄ the mean of all B·C offsets of the batch;
    the sum of full patches is divided by the summed, equally moved centre masks (``centre_mask``,
    default this module's) plus ``epsilon``, real and imaginary parts separately (not a complex
    division, which would round differently). ``translate`` is the model's, so a model that moves
    images differently moves them differently here too.
    """
    N = patches.shape[-1]
    dbar = offsets.reshape(-1, 2).mean(dim=0)
    shift = -(offsets - dbar)
    window = _centre_window(N, patches.device) if centre_mask is None else centre_mask
    mask = pad_to_canvas(window, M).expand(*patches.shape[:-2], M, M)
    moved = translate(pad_to_canvas(patches, M), shift)
    counts = translate(mask, shift)
    numerator = moved.sum(dim=1, keepdim=True)  # over C: (B, 1, M, M)
    denominator = counts.sum(dim=1, keepdim=True) + epsilon
    return torch.complex(numerator.real / denominator, numerator.imag / denominator)


def reextract(
    canvas: Tensor, offsets: Tensor, N: int, *, translate: Callable[[Tensor, Tensor], Tensor] = translate
) -> Tensor:
    """Patches (B, C, N, N): the group's canvas (B, 1, M, M) moved by the raw +d_bc, centre-cropped."""
    B, C = offsets.shape[:2]
    moved = translate(canvas.expand(B, C, *canvas.shape[-2:]), offsets)
    return crop_centre(moved, N)


def illuminate(patches: Tensor, probe: Tensor, mask: Tensor | None = None) -> Tensor:
    """ψ = probe · patch (probe (N, N) or (1, 1, N, N) broadcast); times the hard disk when given."""
    psi = probe * patches
    if mask is not None:
        psi = psi * mask
    return psi


def diffract(field: Tensor) -> Tensor:
    """Far-field amplitude sqrt(fftshift(|fft2(ψ)|² / N²)), shifted over the two spatial axes only.

    |F|² is taken as re² + im², avoiding the sqrt-then-square round trip of ``abs``.
    """
    N = field.shape[-1]
    spectrum = torch.fft.fft2(field, dim=(-2, -1))
    intensity = torch.fft.fftshift((spectrum.real.square() + spectrum.imag.square()) / float(N * N), dim=(-2, -1))
    # sqrt has no derivative at 0: autograd's inf there turns into NaN gradients wherever a faint field's
    # spectrum is exactly 0. The spec's subgradient there is 0 (reference backward.diffract_vjp); the
    # values are sqrt's, bit for bit (a NaN stays a NaN).
    dark = intensity == 0
    return torch.where(dark, 0.0, torch.sqrt(torch.where(dark, 1.0, intensity)))


def losses(amplitude: Tensor, intensity: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-group Poisson NLL (clamped log, the project's choice) and MAE, shape (B, 1, 1, 1)."""
    dims = (1, 2, 3)
    nll = (intensity - x.square() * torch.log(intensity.clamp_min(NLL_FLOOR))).mean(dim=dims, keepdim=True)
    mae = (amplitude - x).abs().mean(dim=dims, keepdim=True)
    return nll, mae

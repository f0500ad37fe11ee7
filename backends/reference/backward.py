"""Reverse mode of the float64 reference, written by hand: one adjoint per forward stage.

The reference is the arbiter of gradient parity, so it may not borrow a framework's autograd (that
would make it judge in its own case); every vector-Jacobian product here is derived from the
forward definition in ``ops`` / ``physics`` / ``model`` and checked against it in the tests, by
dot-product tests per stage and by finite differences of the whole forward.

Conventions
-----------
* A cotangent has the shape of the value it belongs to, with a leading *stack* axis ``S`` in front:
  both losses run through one backward pass as ``S = 2`` stacked cotangents (in ``LOSSES`` order),
  so every forward intermediate and every window matrix is shared by the two. The stage adjoints
  take any number of leading axes in front of the shape the forward value had; the forward values
  they need are passed without that axis and broadcast.
* A complex value ``z = u + i·v`` is the pair of reals ``(u, v)``; its cotangent is carried as the
  complex number ``∂L/∂u + i·∂L/∂v``. With that convention a complex-linear map ``z -> A z`` has the
  adjoint ``z̄ = Aᴴ w̄`` (conjugate transpose), and a real-linear map applied to the real and
  imaginary parts separately (translation, masks, the canvas division) has its real adjoint applied
  to both parts separately.
* Points where the forward is not differentiable get one documented one-sided choice each (a
  subgradient where one exists): ReLU'(0) = 0, d|a|/da at 0 = 0 (MAE), d sqrt(s) = 0 where the
  amplitude is 0, max(I, floor) passes the gradient only where I > floor, and a max-pool tie routes
  the gradient to the first maximal element of the window (``max_pool2_vjp``).
* Offsets are inputs of the harness, not differentiated.
* The network adjoints work in the cotangent's dtype: float64 for the reference's gradients. The
  gradient error model carries random realisations of an error through them in float32, where
  their rounding is far below their sampling noise; forward values are cast where they enter a product.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from backends.reference import physics
from backends.reference.model import Conv, ConvBlock, Head, ReferenceModel, Taps
from backends.reference.ops import (
    Activation,
    Array,
    conv2d,
    pad_spatial,
    pi_tanh,
    relu,
    row_windows,
    sigmoid,
    softplus,
    swish,
)
from parity.taps import GRAD, LOSSES

# ---- network operations -------------------------------------------------------------------------


def _kernel_vjp(x: Array, dy: Array) -> Array:
    """Kernel cotangent of a 'same' 3x3 convolution, (S, 3, 3, in, out), in dy's dtype: per kernel
    row kh, the forward's ``row_windows`` read from padded row kh on, times dy transposed. dy is
    laid out on the matrix's columns (image, padded row, x), with zeros in the two rows of each
    image that a chunk of several reads across into the next. The product is formed as ((in, kw),
    out), so that only whole rows of ``out`` values move to reach the canonical layout: formed as
    (out, (in, kw)), the transpose back, element by element, took as long as the products for the
    wide layers (n_filters_scale=4). The sums are the same bit for bit with OpenBLAS's SkylakeX
    kernels, to a few ulps with its Haswell ones (docs/decisions.md, "Speed")."""
    S, _, cout, H, W = dy.shape
    cin, image = x.shape[1], (H + 2) * W
    dkernel = np.zeros((S, 3, 3 * cin, cout), dtype=dy.dtype)  # [kh] ((in, kw), out)
    for chunk, cols in row_windows(x, dy.dtype):
        n = chunk.stop - chunk.start
        length = n * image - 2 * W
        if n == 1:
            g = dy[:, chunk.start].reshape(S, cout, H * W)
        else:
            spread = np.zeros((S, cout, n, H + 2, W), dtype=dy.dtype)
            spread[:, :, :, :H] = dy[:, chunk].transpose(0, 2, 1, 3, 4)
            g = spread.reshape(S, cout, n * image)[..., :length]
        g_t = g.transpose(0, 2, 1)
        for kh in range(3):
            dkernel[:, kh] += cols[:, kh * W : kh * W + length] @ g_t
    return np.ascontiguousarray(dkernel.reshape(S, 3, cin, 3, cout).transpose(0, 1, 3, 2, 4))


def _input_vjp(kernel: Array, dy: Array) -> Array:
    """Input cotangent of a 'same' 3x3 convolution, (S, B, in, H, W): the 'same' cross-correlation
    of dy with the kernel rotated by 180 degrees and its in/out axes swapped (one pixel of zero
    padding on each side is exactly what the transpose needs). With the window matrices of
    ``ops.row_windows`` this is faster than applying the transpose directly (one product into 9·in
    columns, each tap's columns added back at its place) even where the layer widens: 132 -> 66 ms
    for 64 -> 128 channels at 32x32, S = 2, batch 16 (the Xeon, min of 4)."""
    S, B, cout, H, W = dy.shape
    cin = kernel.shape[2]
    flipped = np.ascontiguousarray(kernel[::-1, ::-1].transpose(0, 1, 3, 2)).astype(dy.dtype, copy=False)
    zero = np.zeros(cin, dtype=dy.dtype)
    return conv2d(dy.reshape(S * B, cout, H, W), flipped, zero, dtype=dy.dtype).reshape(S, B, cin, H, W)


def conv2d_vjp(x: Array, kernel: Array, dy: Array) -> tuple[Array, Array, Array]:
    """Adjoint of ``ops.conv2d(x, kernel, bias)`` for stacked cotangents.

    x (B, in, H, W) is the forward input; dy (S, B, out, H, W) the cotangents of the output (before
    any activation). Returns (dx (S, B, in, H, W), dkernel (S, 3, 3, in, out), dbias (S, out)), the
    kernel in the canonical (kh, kw, in, out) layout.
    """
    return _input_vjp(kernel, dy), _kernel_vjp(x, dy), dy.sum(axis=(1, 3, 4))


def conv2d_activation_vjp(conv: Conv, x: Array, activation: Activation, dy: Array) -> tuple[Array, Array, Array]:
    """Adjoint of ``activation(conv(x))``, like ``conv2d_vjp`` but dy is the cotangent of the
    activation's output. The pre-activation is not a tap (the forward records only the activation's
    output, and swish is not invertible), so the conv recomputes it here, in dy's dtype."""
    dz = activation_vjp(activation, conv(x, dy.dtype), dy)
    return _input_vjp(conv.kernel, dz), _kernel_vjp(x, dz), dz.sum(axis=(1, 3, 4))


def max_pool2_vjp(x: Array, dy: Array) -> Array:
    """Adjoint of ``ops.max_pool2``: each window's cotangent goes to one element of the window.

    x (B, C, H, W) is the pool's input, dy (..., B, C, H/2, W/2). Tie rule: the cotangent goes to
    the FIRST maximal element in row-major window order, i.e. the argmax of the window flattened as
    (dy, dx): top-left, top-right, bottom-left, bottom-right. (max is not differentiable at a tie;
    any convex split is a valid subgradient, and frameworks differ, so the rule is fixed here and a
    planted pool that routes ties elsewhere is a detectable difference. After a ReLU, the common
    tie is an all-zero window, whose inputs are inactive anyway.)
    """
    B, C, H, W = x.shape
    h, w = H // 2, W // 2
    windows = x.reshape(B, C, h, 2, w, 2).transpose(0, 1, 2, 4, 3, 5).reshape(B, C, h, w, 4)
    route = windows.argmax(axis=-1)[..., None] == np.arange(4)  # argmax returns the first maximum
    dx = np.where(route, dy[..., None], 0.0)  # (..., B, C, h, w, 4)
    lead = dx.shape[:-2]  # (..., B, C, h)
    return np.ascontiguousarray(dx.reshape(*lead, w, 2, 2).swapaxes(-3, -2).reshape(*lead[:-1], H, W))


def upsample2_vjp(dy: Array) -> Array:
    """Adjoint of nearest ×2 upsampling: each input pixel collects the cotangents of its 2x2 copies."""
    H, W = dy.shape[-2:]
    return np.asarray(dy.reshape(*dy.shape[:-2], H // 2, 2, W // 2, 2).sum(axis=(-3, -1)))


def pad_spatial_vjp(dy: Array, width: int) -> Array:
    """Adjoint of zero padding: the padded border receives nothing back, so crop it off."""
    H, W = dy.shape[-2:]
    return dy[..., width : H - width, width : W - width]


def relu_vjp(y: Array, dy: Array) -> Array:
    """ReLU adjoint from its output (y > 0 exactly where the pre-activation is > 0); ReLU'(0) = 0."""
    return np.where(y > 0, dy, 0.0)


# The derivatives avoid 1 - σ(z) and 1 - tanh²(z), which lose all relative precision once σ or tanh
# rounds to ±1: σ(z)(1 - σ(z)) = σ(z)σ(-z) and 1 - tanh²(z) = sech²(z) = 4e^{-2|z|} / (1 + e^{-2|z|})².


def _sigmoid_derivative(z: Array) -> Array:
    return np.asarray(sigmoid(z) * sigmoid(-z))


def _swish_derivative(z: Array) -> Array:
    # d/dz z·σ(z) = σ(z) + z·σ(z)σ(-z)
    s = sigmoid(z)
    return np.asarray(s * (1.0 + z * sigmoid(-z)))


def _relu_derivative(z: Array) -> Array:
    return (z > 0).astype(z.dtype)


def _pi_tanh_derivative(z: Array) -> Array:
    e = np.exp(-2.0 * np.abs(z))
    return np.asarray(np.pi * 4.0 * e / (1.0 + e) ** 2)


# Keyed by the very functions the model applies, so a head's activation can never be paired with
# another one's derivative by name. softplus' = sigmoid.
_DERIVATIVES: dict[Activation, Callable[[Array], Array]] = {
    sigmoid: _sigmoid_derivative,
    swish: _swish_derivative,
    softplus: sigmoid,
    relu: _relu_derivative,
    pi_tanh: _pi_tanh_derivative,
}


def activation_vjp(activation: Activation, z: Array, dy: Array) -> Array:
    """Adjoint of an elementwise head activation at pre-activation z (derivative 0 at ReLU's kink)."""
    try:
        derivative = _DERIVATIVES[activation]
    except KeyError:
        raise ValueError(f"activation_vjp: no derivative for activation {activation!r}") from None
    return np.asarray(dy * derivative(z))


# ---- object and physics -------------------------------------------------------------------------


def complex_object_vjp(amplitude: Array, phase: Array, dpatches: Array) -> tuple[Array, Array]:
    """Adjoint of O = A·exp(iφ) = (A cos φ, A sin φ) for a complex cotangent g = gᵣ + i·gᵢ:
    Ā = gᵣ cos φ + gᵢ sin φ, φ̄ = A (gᵢ cos φ − gᵣ sin φ)."""
    c, s = np.cos(phase), np.sin(phase)
    gr, gi = dpatches.real, dpatches.imag
    return gr * c + gi * s, amplitude * (gi * c - gr * s)


def _interpolation_matrix(shift: Array, size: int) -> Array:
    """(K, size, size) matrices of 1-D linear interpolation at coordinate ``i - shift``.

    Row i holds weight (1 - f) at column floor(i - shift) and f at the column after it; a neighbour
    outside [0, size) matches no column, so it contributes 0 with its weight unchanged, as the spec
    requires. The coordinates are computed exactly as ``physics.translate`` computes them.
    """
    coord = np.arange(size, dtype=np.float64)[None, :] - shift[:, None]  # (K, size)
    lower = np.floor(coord)
    frac = coord - lower
    index = lower.astype(np.intp)[..., None]
    columns = np.arange(size)
    return np.where(columns == index, (1.0 - frac)[..., None], 0.0) + np.where(
        columns == index + 1, frac[..., None], 0.0
    )


def translate_vjp(dout: Array, offsets: Array) -> Array:
    """Adjoint of ``physics.translate``: the transpose of its interpolation, not an inverse shift.

    The bilinear translation of one image is separable: T(img) = Wy · img · Wxᵀ with the 1-D
    interpolation matrices of the row and column coordinates, so its transpose is Wyᵀ · ḡ · Wx,
    i.e. each output cotangent is scattered back, with its interpolation weight, onto the (up to
    four) input pixels it was read from. (With one shift for the whole image, as here, each axis is
    a 2-tap convolution with zero boundaries, whose transpose happens to equal the translation by
    -offsets, boundary included, to rounding; it is built as the transpose all the same, from the
    coordinates the forward samples, so it stays the adjoint if the sampling ever changes.)

    dout (..., H, W) real or complex (parts separately); offsets (..., 2) as [dx, dy], broadcast
    against the leading axes of ``dout``. The result has the shape of ``dout``: the adjoint w.r.t.
    an image already broadcast to the output's leading axes (a caller that translated one image to
    several offsets sums over those axes).
    """
    if np.iscomplexobj(dout):
        return physics.complex_from_parts(translate_vjp(dout.real, offsets), translate_vjp(dout.imag, offsets))
    offsets = np.asarray(offsets, dtype=np.float64)
    H, W = dout.shape[-2:]
    lead_off = offsets.shape[:-1]
    flat = offsets.reshape(-1, 2)
    Wx = _interpolation_matrix(flat[:, 0], W).reshape(*lead_off, W, W)
    Wy = _interpolation_matrix(flat[:, 1], H).reshape(*lead_off, H, H)
    return np.asarray(np.swapaxes(Wy, -1, -2) @ dout @ Wx)


def crop_centre_vjp(dy: Array, size: int) -> Array:
    """Adjoint of ``physics.crop_centre`` to ``size`` x ``size``: the crop's cotangent zero-padded back."""
    return pad_spatial(dy, (size - dy.shape[-1]) // 2)


def merge_vjp(dcanvas: Array, offsets: Array, N: int) -> Array:
    """Adjoint of ``physics.merge`` w.r.t. the patches; the coverage (denominator) depends on the
    offsets only, so it is a constant here.

    dcanvas (..., B, 1, M, M) complex; offsets (B, C, 2). Returns (..., B, C, N, N) complex:
    numerator cotangent = canvas cotangent / (coverage + ε), part by part, then for every patch the
    translation adjoint at its shift and the padding adjoint (centre crop).
    """
    M = dcanvas.shape[-1]
    pad = (M - N) // 2
    shift = physics.merge_shift(offsets)
    coverage = physics.translate(pad_spatial(physics.centre_mask(N), pad), shift).sum(axis=1, keepdims=True)
    dnumerator = physics.divide_complex(dcanvas, coverage + physics.MERGE_EPSILON)
    return pad_spatial_vjp(translate_vjp(dnumerator, shift), pad)


def pad_to_canvas_vjp(dcanvas: Array, N: int) -> Array:
    """Adjoint of ``physics.pad_to_canvas`` (object_big=false): the canvas's central N x N."""
    return pad_spatial_vjp(dcanvas, (dcanvas.shape[-1] - N) // 2)


def reextract_vjp(dpatches: Array, offsets: Array, M: int) -> Array:
    """Adjoint of ``physics.reextract`` w.r.t. the canvas.

    dpatches (..., B, C, N, N); offsets (B, C, 2). The crop's adjoint embeds each patch cotangent in
    an M x M canvas, the translation's adjoint moves it back, and the C patches, all read from the
    one canvas of their group, add up: (..., B, 1, M, M).
    """
    moved = translate_vjp(crop_centre_vjp(dpatches, M), offsets)
    return np.asarray(moved.sum(axis=-3, keepdims=True))


def illuminate_vjp(dpsi: Array, probe: Array, mask: Array | None = None) -> Array:
    """Adjoint of ψ = mask · (probe · patch): patch̄ = conj(probe) · (mask · ψ̄) (complex cotangent
    convention: the complex-linear factor is conjugated, the real mask acts on both parts)."""
    masked = dpsi if mask is None else physics.scale_complex(dpsi, mask)
    return np.asarray(np.conj(probe) * masked)


def diffract_vjp(field: Array, amplitude: Array, damplitude: Array) -> Array:
    """Adjoint of ``physics.diffract`` (a = sqrt(fftshift(|fft2 ψ|² / N²))) w.r.t. the field ψ.

    field ψ (B, C, N, N) and amplitude a (B, C, N, N) are the forward's; damplitude (..., B, C, N, N).
    sqrt has no derivative at 0: where a == 0 the cotangent is set to 0 (the spectrum F is 0 there
    too, so this is the minimum-norm subgradient of |F| at 0). With s̄ = ā / (2a) and Ī its
    ifftshift (the shift's adjoint), F̄ = 2 Ī F / N², and the FFT's adjoint is Wᴴ = N² · ifft2, so
    ψ̄ = 2 · ifft2(Ī · F).
    """
    lit = amplitude > 0
    ds = np.where(lit, damplitude / np.where(lit, 2.0 * amplitude, 1.0), 0.0)
    dintensity = np.fft.ifftshift(ds, axes=(-2, -1))
    spectrum = np.fft.fft2(field, axes=(-2, -1))
    return np.asarray(2.0 * np.fft.ifft2(physics.scale_complex(spectrum, dintensity), axes=(-2, -1)))


def losses_vjp(amplitude: Array, intensity: Array, x: Array) -> tuple[Array, Array, Array]:
    """Cotangents of both losses, each SUMMED over the batch, stacked in ``LOSSES`` order.

    Returns (d_amplitude, d_intensity, d_x), each (2, B, C, N, N); d_x is only the direct part (x is
    the target in both losses). Per group the loss is a mean over K = C·N·N elements:
    Poisson NLL: ∂/∂I = (1 - x²/I)/K where I > 1e-12, and 1/K where the clamp holds the log constant
    (at I == floor too); ∂/∂x = -2x·log(max(I, 1e-12))/K.
    MAE: ∂/∂A = sign(A - x)/K, ∂/∂x = -sign(A - x)/K, with sign(0) = 0 (the subgradient of |.| at 0).
    """
    K = x[0].size
    zero = np.zeros_like(intensity)
    above = intensity > physics.NLL_FLOOR
    d_nll_intensity = np.where(above, 1.0 - x**2 / np.where(above, intensity, 1.0), 1.0) / K
    d_nll_x = -2.0 * x * np.log(np.maximum(intensity, physics.NLL_FLOOR)) / K
    sign = np.sign(amplitude - x) / K
    return np.stack([zero, sign]), np.stack([d_nll_intensity, zero]), np.stack([d_nll_x, -sign])


def outputs_vjp(amplitude: Array, log_scale: float, damplitude: Array, dintensity: Array) -> tuple[Array, Array]:
    """Adjoint of A = a·exp(log_scale), I = A². amplitude is the forward's A (B, ...); the cotangents
    are (S, B, ...). Returns (d_diffraction (S, B, ...), d_log_scale (S,)): ∂A/∂log_scale = A."""
    dA = damplitude + 2.0 * amplitude * dintensity
    return dA * np.exp(log_scale), (dA * amplitude).reshape(dA.shape[0], -1).sum(axis=1)


def scale_input_vjp(scaled: Array, log_scale: float, dscaled: Array) -> tuple[Array, Array]:
    """Adjoint of x_s = x / exp(log_scale): (d_x, d_log_scale (S,)), with ∂x_s/∂log_scale = -x_s."""
    return dscaled / np.exp(log_scale), -(dscaled * scaled).reshape(dscaled.shape[0], -1).sum(axis=1)


# ---- the model ----------------------------------------------------------------------------------

ConvGradients = dict[str, tuple[Array, Array]]  # conv name -> (dkernel (S, ...), dbias (S, out))


def _conv_vjp(conv: Conv, x: Array, dz: Array, grads: ConvGradients, activation: Activation | None = None) -> Array:
    """A conv's adjoint, its parameter cotangents stored under its name; with ``activation``, dz is
    the cotangent of the activation's output (the head convs)."""
    if activation is None:
        dx, dkernel, dbias = conv2d_vjp(x, conv.kernel, dz)
    else:
        dx, dkernel, dbias = conv2d_activation_vjp(conv, x, activation, dz)
    grads[conv.name] = (dkernel, dbias)
    return dx


def _block_vjp(block: ConvBlock, x: Array, taps: Taps, dy: Array, grads: ConvGradients) -> Array:
    """Adjoint of a down or up block whose input was x; the ReLU masks come from its taps."""
    conv0, conv1 = block.conv0, block.conv1
    if block.resample_tap == "pool":
        d = max_pool2_vjp(taps[conv1.name], dy)
    else:
        d = upsample2_vjp(dy)
    d = _conv_vjp(conv1, taps[conv0.name], relu_vjp(taps[conv1.name], d), grads)
    return _conv_vjp(conv0, x, relu_vjp(taps[conv0.name], d), grads)


def _head_vjp(model: ReferenceModel, head: Head, features: Array, taps: Taps, dy: Array, grads: ConvGradients) -> Array:
    """Adjoint of one branch's head w.r.t. its decoder's output; dy is the cotangent of its N x N map."""
    h = head.name
    if head.full is not None and head.full_out is not None:
        dup = _conv_vjp(head.full_out, taps[f"{h}.head.full.up"], dy, grads, head.activation)
        return _block_vjp(head.full, features, taps, dup, grads)
    if head.centre is None:
        raise ValueError(f"{h} head has neither a centre nor a full branch")
    dfeatures = np.zeros((*dy.shape[:2], *features.shape[1:]), dtype=dy.dtype)
    # head.sum = padded + masked, so both branches receive dy; padding's adjoint is the crop.
    dcentre = pad_spatial_vjp(dy, model.N // 4)
    dfeatures[:, :, :-4] = _conv_vjp(head.centre, features[:, :-4], dcentre, grads, head.activation)
    if head.border is not None and head.border_out is not None:
        up = taps[f"{h}.head.border.up"]
        dup = _conv_vjp(head.border_out, up, dy * model.border_mask.astype(dy.dtype, copy=False), grads, swish)
        dfeatures[:, :, -4:] = _block_vjp(head.border, features[:, -4:], taps, dup, grads)
    return dfeatures


def _final_tap(head: Head) -> str:
    """The tap of the branch's final N x N map, the one the object is built from."""
    if head.centre is None:
        return f"{head.name}.head.full.out"
    return f"{head.name}.head.sum" if head.border is not None else f"{head.name}.head.padded"


def backward(model: ReferenceModel, taps: Taps, x: Array, offsets: Array, probe: Array) -> dict[str, Array]:
    """Gradients of both losses (summed over the batch) from the taps of ``model.forward(x, offsets,
    probe, taps)``: w.r.t. every parameter and ``x``, named and ordered as
    ``parity.taps.gradient_tap_specs`` names them, canonical layouts, float64.

    The two losses' cotangents travel stacked (S = 2) through one pass; only the loss stage tells
    them apart.
    """
    N, M = model.N, model.M
    log_scale = float(model.log_scale)
    grads: ConvGradients = {}

    d_amp, d_int, dx_direct = losses_vjp(taps["output.amplitude"], taps["output.intensity"], x)
    d_diffraction, dls_out = outputs_vjp(taps["output.amplitude"], log_scale, d_amp, d_int)
    dpsi = diffract_vjp(taps["physics.illuminated"], taps["physics.diffraction"], d_diffraction)
    dreextracted = illuminate_vjp(dpsi, probe, model.illumination_mask)
    dcanvas = reextract_vjp(dreextracted, offsets, M)
    dpatches = merge_vjp(dcanvas, offsets, N) if model.object_big else pad_to_canvas_vjp(dcanvas, N)

    final = {h: taps[_final_tap(head)] for h, head in model.heads.items()}
    d_amplitude, d_phase = complex_object_vjp(final["amp"], final["phase"], dpatches)

    depth = len(model.encoder)
    features = taps[f"encoder.block{depth - 1}.pool"]
    dfeatures = np.zeros((len(LOSSES), *features.shape))
    for h, dy in (("amp", d_amplitude), ("phase", d_phase)):
        head = model.heads[h]
        d = _head_vjp(model, head, taps[f"{h}.decoder.block{len(head.decoder) - 1}.up"], taps, dy, grads)
        for i in range(len(head.decoder) - 1, -1, -1):
            block_in = taps[f"{h}.decoder.block{i - 1}.up"] if i else features
            d = _block_vjp(head.decoder[i], block_in, taps, d, grads)
        dfeatures += d
    d = dfeatures
    for i in range(depth - 1, -1, -1):
        block_in = taps[f"encoder.block{i - 1}.pool"] if i else taps["input.scaled"]
        d = _block_vjp(model.encoder[i], block_in, taps, d, grads)
    dx_net, dls_in = scale_input_vjp(taps["input.scaled"], log_scale, d)
    dx, dls = dx_net + dx_direct, dls_out + dls_in

    out: dict[str, Array] = {}
    convs = list(model.convs())
    for s, loss in enumerate(LOSSES):
        prefix = f"{GRAD}.{loss}"
        for conv in reversed(convs):
            dkernel, dbias = grads[conv.name]
            out[f"{prefix}.{conv.name}.kernel"] = dkernel[s]
            out[f"{prefix}.{conv.name}.bias"] = dbias[s]
        out[f"{prefix}.log_scale"] = np.asarray(dls[s])
        out[f"{prefix}.input.x"] = dx[s]
    return out


def gradients(model: ReferenceModel, x: Array, offsets: Array, probe: Array) -> dict[str, Array]:
    """One forward pass of ``model`` (float64 x (B, C, N, N), offsets (B, C, 2), complex128 probe
    (1, 1, N, N)) and the backward pass of both losses from its taps; see ``backward``."""
    taps: Taps = {}
    model.forward(x, offsets, probe, taps)
    return backward(model, taps, x, offsets, probe)

"""The error model's compiled passes (backends/reference/fused.py) against the NumPy expressions of
``conv_scale`` they replaced, written out here: the scales, and so every tolerance, must not move
by a bit, whatever the input holds (NaN, inf, zeros, a sliced field, a float32 bias)."""

from __future__ import annotations

import numpy as np
import pytest

from backends.reference import error_model as em
from backends.reference import fused
from backends.reference.ops import conv2d


def _numpy_conv_scale(x, s_x, kernel, bias):
    """conv_scale as NumPy expressions, the definition the compiled passes must reproduce."""
    with np.errstate(invalid="ignore"):  # inf·0 in the special-value test, as in the compiled passes
        return _numpy_conv_scale_steps(x, s_x, kernel, bias)


def _numpy_conv_scale_steps(x, s_x, kernel, bias):
    q = s_x * s_x
    q += x * x
    peak = q.reshape(q.shape[0], -1).max(axis=1)
    peak = np.where(peak > 0, peak, 1.0)[:, None, None, None]
    scaled = np.divide(q, peak, out=np.empty(q.shape, np.float32), casting="same_kind")
    k2 = (kernel.astype(np.float64) ** 2).astype(np.float32)
    acc = conv2d(scaled, k2, np.zeros(kernel.shape[-1], dtype=np.float32), dtype=np.float32)
    out = np.multiply(acc, peak)
    out += (bias * bias)[None, :, None, None]
    np.sqrt(out, out=out)
    out += em.TINY
    return out


def _fields(seed: int):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((3, 8, 6, 6)) * np.array([1e-30, 1.0, 1e30])[:, None, None, None]
    s = np.abs(rng.standard_normal(x.shape)) * 3.0
    kernel = rng.standard_normal((3, 3, 8, 5)).astype(np.float32) * 0.1
    bias = rng.standard_normal(5).astype(np.float32)
    return x, s, kernel, bias


@pytest.mark.parametrize("seed", [0, 1])
def test_conv_scale_is_the_numpy_definition_bit_for_bit(seed):
    x, s, kernel, bias = _fields(seed)
    np.testing.assert_array_equal(em.conv_scale(x, s, kernel, bias), _numpy_conv_scale(x, s, kernel, bias))
    # A sliced, non-contiguous input (the heads' x[:, :-4]) and a float64 bias.
    xs, ss = x[:, :-3], s[:, :-3]
    k = kernel[:, :, :-3].astype(np.float64)
    b = bias.astype(np.float64)
    np.testing.assert_array_equal(em.conv_scale(xs, ss, k, b), _numpy_conv_scale(xs, ss, k, b))


def test_special_values_and_empty_samples_keep_the_numpy_peaks():
    x, s, kernel, bias = _fields(2)
    x[0] = 0.0
    s[0] = 0.0  # a sample with nothing in it: peak 1, scale sqrt(b²) + floor
    x[1, 2, 3, 4] = np.nan  # NaN anywhere in a sample: its peak is 1, as np.where(NaN > 0, ...) gives
    s[2, 0, 0, 0] = np.inf  # an infinite scale: the peak is inf, every scaled square 0 or NaN
    expected = _numpy_conv_scale(x, s, kernel, bias)
    np.testing.assert_array_equal(em.conv_scale(x, s, kernel, bias), expected)
    _, peak = fused.scaled_squares(x, s, gated=False)
    np.testing.assert_array_equal(peak, [1.0, 1.0, np.inf])


def test_gated_input_counts_only_active_units_error():
    x, s, kernel, bias = _fields(3)
    x[:, :, ::2] = np.abs(x[:, :, ::2])  # active and inactive units, and exact zeros
    x[:, :, 1, :] = 0.0
    x[0, 0, 0, 0] = np.nan
    gated = em.conv_scale(x, s, kernel, bias, gated=True)
    np.testing.assert_array_equal(gated, _numpy_conv_scale(x, em.relu_pass_on(x, s), kernel, bias))
    # and the gate matters: in the samples without NaN, the full S gives scales as large (but for
    # float32 rounding of the rescaled squares) and larger wherever an inactive unit is read
    full = em.conv_scale(x, s, kernel, bias)[1:]
    assert np.all(full >= gated[1:] * (1 - 1e-6))
    assert np.any(full > gated[1:] * 1.01)

"""Seeded simulation of ptychographic data, the source of the bundled fixtures.

Parity runs need inputs that look like measurements (a structured complex object, a band-limited
probe, sub-pixel scan positions, Poisson noise), so that every branch of the model sees realistic
values, yet that anyone can regenerate from a seed and check against the committed files. No
measured data set has to be shipped, and a fixture's provenance is a few numbers in its ``params``.

Reproducibility across machines: NumPy arithmetic on arrays is done operation by operation, so it is
the same everywhere; only compiled kernels (FFT, SIMD exp/sin/cos) may differ by an ulp between
CPUs. Such ulps are absorbed by rounding before the values that are stored or drawn from: the
object's amplitude and phase are quantised to 2⁻¹⁶, the object and probe are stored (and used) as
complex64, and the expected counts keep 16 significant bits before the Poisson draw. A one-ulp
difference then changes the output only when it straddles a rounding boundary (odds well below
1e-4 per fixture).

Geometry conventions (the same as the model's, forward-model.md section 4): pixel (i, j) of an image
sits at x = j, y = i. The patch of scan position (x, y) samples the object at
(y − N/2 + i, x − N/2 + j), bilinearly, so the object under the patch moves by −(x, y) and the model's
merge step, which translates patch c by +(position_c − group mean), puts it back in place.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from parity.atomic import write_text
from parity.errors import ParityInputError
from parity.fixture import (
    FixtureData,
    file_sha256,
    format_sha256sums,
    load_fixture,
    read_sha256sums,
    write_fixture,
)

#: Bumped whenever a change to this module changes the arrays produced for the same parameters.
GENERATOR_VERSION = 1
OBJECT_KINDS = ("lines", "grf")
#: Where each group's offsets are measured from. "group_mean": nothing is stored and batches derive
#: −(position − group mean), centred per group; "first_member": the fixture stores the dataset
#: 'offsets' = −(position − position of the group's first member), so groups do not sum to zero and a
#: batch of several groups has a nonzero mean offset d̄ (forward-model.md, section 4).
OFFSETS_ORIGINS = ("group_mean", "first_member")

_LINE_BLUR_SIGMAS = (0.5, 1.0, 2.0, 4.0)  # pixels: sharp edges and soft shading in one object
_PROBE_BAND_LIMIT = 0.25  # cycles per pixel: half of Nyquist
_PROBE_SMOOTHING = 1.0  # pixels: Gaussian blur that tames the ringing of the hard band limit
_FIELD_BITS = 16  # amplitude and phase fields are multiples of 2**-16
_COUNT_BITS = 16  # significant bits kept in the expected counts before the Poisson draw
#: Caps on what one simulation allocates, checked before anything is: scan positions (rows × columns)
#: and object pixels per side. At both caps a simulation holds about 2.3 GB and takes seconds; the
#: bundled fixtures use at most 81 positions and 170 pixels. Without them ``--step 1e6`` or ``--scan
#: 100000x100000`` asked for terabytes and ended in a MemoryError, an OverflowError or the OOM killer.
MAX_POSITIONS = 2048
MAX_OBJECT_SIDE = 1024
# Lines per object pixel of a 'lines' object, at most 3 times the default: its segments are sampled
# three times a pixel along lengths up to 0.6 of the object, so the samples grow as density x side³
# (at the cap and the largest object, about 2e7 samples, a gigabyte or two of temporaries); denser
# than one line per 50 pixels is a texture, not lines.
MAX_LINE_DENSITY = 0.02
#: The ``make-fixture`` option of each parameter, so that a refusal names what the user typed.
OPTIONS = {
    "kind": "--kind",
    "N": "--N",
    "gridsize": "--gridsize",
    "seed": "--seed",
    "scan_shape": "--scan",
    "step": "--step",
    "jitter": "--jitter",
    "nphotons": "--nphotons",
    "probe_phase": "--probe-phase",
    "beamstop": "--beamstop",
}


@dataclass(frozen=True)
class SimulationParams:
    """Every input of :func:`simulate`; stored as JSON in the fixture's ``params`` attribute."""

    kind: str
    N: int
    gridsize: int
    seed: int
    scan_shape: tuple[int, int] = (9, 9)  # rows, columns of the scan grid
    step: float = 4.0  # pixels between grid points: the model's nominal ``offset``
    jitter: float = 0.5  # positions move by up to ± this many pixels per axis, uniformly
    nphotons: float = 1e9  # mean total counts per diffraction pattern
    margin: int = 4  # object pixels beyond the outermost patch
    probe_phase: float = 0.5  # radians of quadratic phase at the radius N/4
    line_density: float = 1 / 150  # lines per object pixel ('lines')
    grf_exponent: float = 3.0  # power spectrum ∝ (k² + k0²)^(−exponent/2) ('grf')
    offsets_origin: str = "group_mean"  # see OFFSETS_ORIGINS
    beamstop: int = 0  # side, in detector pixels, of the central square a beamstop shadows (reads 0)

    def __post_init__(self) -> None:
        def bad(key: str, expected: str) -> ParityInputError:
            value = getattr(self, key)
            option = f" (make-fixture option {OPTIONS[key]})" if key in OPTIONS else ""
            return ParityInputError(f"simulation parameter {key!r} is {value!r}; expected {expected}{option}")

        if self.kind not in OBJECT_KINDS:
            raise bad("kind", f"one of {', '.join(OBJECT_KINDS)}")
        for key in ("N", "gridsize", "seed", "margin"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise bad(key, "an integer >= 0")
        if self.N < 2 or self.N % 2:
            raise bad("N", "a positive even integer")
        if self.gridsize < 1:
            raise bad("gridsize", "an integer >= 1")
        rows, cols = self.scan_shape
        if rows < 1 or cols < 1 or rows * cols < self.gridsize**2:
            raise bad("scan_shape", f"at least gridsize² = {self.gridsize**2} positions")
        for key in ("step", "nphotons", "line_density", "grf_exponent"):
            if not (math.isfinite(getattr(self, key)) and getattr(self, key) > 0):
                raise bad(key, "a finite number > 0")
        if self.line_density > MAX_LINE_DENSITY:
            raise bad("line_density", f"a number of lines per object pixel at most {MAX_LINE_DENSITY}")
        if not (math.isfinite(self.jitter) and 0 <= self.jitter < 1):
            raise bad("jitter", "a sub-pixel amplitude in [0, 1)")
        if not math.isfinite(self.probe_phase):
            raise bad("probe_phase", "a finite number")
        if self.offsets_origin not in OFFSETS_ORIGINS:
            raise bad("offsets_origin", f"one of {', '.join(OFFSETS_ORIGINS)}")
        if not 0 <= self.beamstop < self.N or self.beamstop % 2:  # N: every pixel in its shadow
            raise bad("beamstop", f"an even number of pixels from 0 to N - 2 = {self.N - 2}")
        self._check_size()

    def _check_size(self) -> None:
        """Refuse a scan or an object beyond the caps before anything is allocated (see MAX_POSITIONS).

        The object's extent is computed in floats and compared, never rounded to an int first, so a
        step of 1e300 is refused like one of 1e6 instead of overflowing.
        """
        rows, cols = self.scan_shape
        if rows * cols > MAX_POSITIONS:
            raise ParityInputError(
                f"simulation parameter 'scan_shape' is {rows}x{cols} = {rows * cols} scan positions; at most "
                f"{MAX_POSITIONS} are simulated (parity.simulate.MAX_POSITIONS) (make-fixture option --scan)"
            )
        if self.margin > MAX_OBJECT_SIDE:
            raise ParityInputError(
                f"simulation parameter 'margin' is {self.margin}; expected at most {MAX_OBJECT_SIDE} pixels, "
                f"the largest object side simulated (parity.simulate.MAX_OBJECT_SIDE)"
            )
        extent = 2 * self.margin + 2 * self.jitter + (max(rows, cols) - 1) * self.step
        # As object_shape computes it; rounded only when finite and small, so 1e300 cannot overflow.
        side = math.ceil(extent) + self.N + 1 if extent <= MAX_OBJECT_SIDE else extent + self.N + 1
        if not side <= MAX_OBJECT_SIDE:
            raise ParityInputError(
                f"simulation parameters 'scan_shape' ({rows}x{cols}) and 'step' ({self.step:g}) ask for an object "
                f"{side:.4g} pixels wide (ceil((max(rows, cols) − 1)·step + 2·(margin + jitter)) + N + 1); at most "
                f"{MAX_OBJECT_SIDE} are simulated (parity.simulate.MAX_OBJECT_SIDE): use a smaller make-fixture "
                "option --step or --scan"
            )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["scan_shape"] = list(self.scan_shape)
        if self.offsets_origin == "group_mean":
            # Added after the first fixtures were made: left out at its default, so those fixtures'
            # params, and hence their bytes, are unchanged.
            del d["offsets_origin"]
        if self.beamstop == 0:
            del d["beamstop"]  # likewise
        d["generator_version"] = GENERATOR_VERSION
        return d

    @property
    def object_shape(self) -> tuple[int, int]:
        """Large enough that every patch, bilinear neighbours included, lies inside the object."""
        rows, cols = self.scan_shape
        pad = 2 * self.margin + 2 * self.jitter
        return (
            math.ceil(pad + (rows - 1) * self.step) + self.N + 1,
            math.ceil(pad + (cols - 1) * self.step) + self.N + 1,
        )


#: The fixtures committed in fixtures/ (see fixtures/make_fixtures.py): name -> parameters.
BUNDLED_FIXTURES: dict[str, SimulationParams] = {
    "n64_g2_lines": SimulationParams(kind="lines", N=64, gridsize=2, seed=1001, nphotons=1e9),
    # Few photons: many zero-count pixels, so the zero-amplitude paths of the losses are exercised.
    "n64_g1_grf": SimulationParams(kind="grf", N=64, gridsize=1, seed=1002, nphotons=1e6),
    "n128_g2_lines": SimulationParams(kind="lines", N=128, gridsize=2, seed=1003, scan_shape=(8, 8)),
    # So that every config has a default fixture: N=128 at gridsize 1.
    "n128_g1_grf": SimulationParams(kind="grf", N=128, gridsize=1, seed=1004, scan_shape=(3, 3), nphotons=1e8),
    # A beamstop's shadow: the central 16x16 detector pixels read 0. The encoder sees a flat region
    # there, so its first block's max-pool windows hold exact ties of positive values, and the rule
    # that routes a tie's gradient matters (docs/mutations.md, "Gradient bugs"). Never a default: the
    # lines fixture of its N and gridsize comes first.
    "n64_g2_beamstop": SimulationParams(kind="lines", N=64, gridsize=2, seed=1006, scan_shape=(3, 3), beamstop=16),
    # Stored offsets relative to each group's first member: not centred, so a batch's mean offset d̄ is
    # nonzero and a merge that ignores d̄, or takes it per group, shows. Last, so that it is never the
    # default fixture of a config (parity.session takes the first match).
    "n64_g2_offcentre": SimulationParams(
        kind="lines", N=64, gridsize=2, seed=1005, scan_shape=(4, 4), offsets_origin="first_member"
    ),
}


def _quantise(x: np.ndarray, bits: int) -> np.ndarray:
    """Keep ``bits`` significant bits (frexp/ldexp and rounding are exact, so this is portable)."""
    mantissa, exponent = np.frexp(x)
    return np.asarray(np.ldexp(np.round(mantissa * 2.0**bits) / 2.0**bits, exponent), dtype=np.float64)


def _unit(field: np.ndarray) -> np.ndarray:
    """Rescale to [0, 1] and snap to a 2⁻¹⁶ grid (see the module docstring for why)."""
    lo, hi = float(field.min()), float(field.max())
    u = (field - lo) / (hi - lo) if hi > lo else np.zeros_like(field)
    return np.round(u * 2.0**_FIELD_BITS) / 2.0**_FIELD_BITS


def _gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur by FFT, zero-padded so that lines do not wrap around the edges."""
    pad = math.ceil(4 * sigma) + 1
    padded = np.pad(image, pad)
    fy = np.fft.fftfreq(padded.shape[0])[:, None]
    fx = np.fft.fftfreq(padded.shape[1])[None, :]
    kernel = np.exp(-2 * math.pi**2 * sigma**2 * (fx * fx + fy * fy))
    blurred = np.fft.ifft2(np.fft.fft2(padded) * kernel).real
    return blurred[pad:-pad, pad:-pad]


def _lines_field(rng: np.random.Generator, shape: tuple[int, int], density: float) -> np.ndarray:
    """Many thin random segments, splatted with sub-pixel accuracy, summed over several blur scales."""
    H, W = shape
    n_lines = max(1, round(density * H * W))
    cx = rng.uniform(0, W, n_lines)
    cy = rng.uniform(0, H, n_lines)
    theta = rng.uniform(0, math.pi, n_lines)
    length = rng.uniform(0.1, 0.6, n_lines) * max(H, W)
    weight = rng.uniform(0.3, 1.0, n_lines)
    xs, ys, ws = [], [], []
    for k in range(n_lines):
        n = math.ceil(3 * length[k]) + 1  # about three samples per pixel along the segment
        t = np.linspace(-0.5, 0.5, n) * length[k]
        xs.append(cx[k] + t * math.cos(theta[k]))
        ys.append(cy[k] + t * math.sin(theta[k]))
        ws.append(np.full(n, weight[k] / 3))
    x, y, w = np.concatenate(xs), np.concatenate(ys), np.concatenate(ws)
    image = np.zeros(shape)
    x0, y0 = np.floor(x), np.floor(y)
    fx, fy = x - x0, y - y0
    corners = ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx), (1, 0, fy * (1 - fx)), (1, 1, fy * fx))
    for dy, dx, wt in corners:
        r, c = (y0 + dy).astype(np.int64), (x0 + dx).astype(np.int64)
        inside = (r >= 0) & (r < H) & (c >= 0) & (c < W)
        np.add.at(image, (r[inside], c[inside]), (w * wt)[inside])
    total = np.zeros(shape)
    for sigma in _LINE_BLUR_SIGMAS:
        blurred = _gaussian_blur(image, sigma)
        total += blurred / max(float(blurred.max()), 1e-300)
    return total


def _grf_field(rng: np.random.Generator, shape: tuple[int, int], exponent: float) -> np.ndarray:
    """Gaussian random field with power spectrum (k² + k0²)^(−exponent/2), k0 the lowest frequency."""
    H, W = shape
    noise = rng.standard_normal(shape)
    fy = np.fft.fftfreq(H)[:, None]
    fx = np.fft.fftfreq(W)[None, :]
    k0 = 1.0 / max(H, W)
    amplitude = (fx * fx + fy * fy + k0 * k0) ** (-exponent / 4)
    amplitude[0, 0] = 0.0  # zero mean; the rescaling to [0, 1] sets the level anyway
    return np.fft.ifft2(np.fft.fft2(noise) * amplitude).real


def make_object(params: SimulationParams, rng: np.random.Generator) -> np.ndarray:
    """Complex object, amplitude in [0.5, 1] and phase in [−1, 1] rad, from independent fields.

    Independent amplitude and phase fields make a swapped or mis-signed amplitude/phase branch
    visible in the data. For 'lines' the lines absorb (darker amplitude) on a transparent background.
    """
    shape = params.object_shape
    if params.kind == "lines":
        u_amp = 1.0 - _unit(_lines_field(rng, shape, params.line_density))
        u_phase = _unit(_lines_field(rng, shape, params.line_density))
    else:
        u_amp = _unit(_grf_field(rng, shape, params.grf_exponent))
        u_phase = _unit(_grf_field(rng, shape, params.grf_exponent))
    amplitude = 0.5 + 0.5 * u_amp
    phase = 2.0 * u_phase - 1.0
    return np.asarray(amplitude * np.exp(1j * phase), dtype=np.complex64)


def make_probe(N: int, phase_at_edge: float = 0.5) -> np.ndarray:
    """A disk of radius N/4, band-limited and smoothed in Fourier space, with a weak quadratic phase.

    The disk is centred like the harness's hard mask (between the four central pixels), so the
    probe normalisation sees the probe it was designed for; the band limit gives the soft edge and
    slight ringing of a real focused probe, and the quadratic phase (defocus) makes it truly complex.
    """
    c = np.arange(N) - N / 2 + 0.5
    r = np.sqrt(c[:, None] ** 2 + c[None, :] ** 2)
    disk = (r < N / 4).astype(np.float64)
    f = np.fft.fftfreq(N)
    k2 = f[:, None] ** 2 + f[None, :] ** 2
    transfer = (k2 < _PROBE_BAND_LIMIT**2) * np.exp(-2 * math.pi**2 * _PROBE_SMOOTHING**2 * k2)
    amplitude = np.fft.ifft2(np.fft.fft2(disk) * transfer).real
    phase = phase_at_edge * (r / (N / 4)) ** 2
    return np.asarray(amplitude * np.exp(1j * phase), dtype=np.complex64)


def scan_positions(params: SimulationParams, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Row-major grid (y slow, x fast) with uniform sub-pixel jitter, inside the object's margins."""
    rows, cols = params.scan_shape
    origin = params.N / 2 + params.margin + params.jitter
    gy, gx = np.meshgrid(np.arange(rows) * params.step, np.arange(cols) * params.step, indexing="ij")
    jitter = rng.uniform(-params.jitter, params.jitter, size=(rows * cols, 2))
    return origin + gx.ravel() + jitter[:, 0], origin + gy.ravel() + jitter[:, 1]


def extract_patches(obj: np.ndarray, xcoords: np.ndarray, ycoords: np.ndarray, N: int) -> np.ndarray:
    """(n, N, N) complex128 patches, bilinearly interpolated at the sub-pixel scan positions."""
    o = np.asarray(obj, dtype=np.complex128)
    H, W = o.shape
    out = np.empty((len(xcoords), N, N), dtype=np.complex128)
    for k, (x, y) in enumerate(zip(xcoords, ycoords, strict=True)):
        sx, sy = float(x) - N / 2, float(y) - N / 2
        c0, r0 = math.floor(sx), math.floor(sy)
        if r0 < 0 or c0 < 0 or r0 + N >= H or c0 + N >= W:
            raise ParityInputError(
                f"scan position {k} at (x={x:.3f}, y={y:.3f}) needs object pixels outside the {H}x{W} object"
            )
        fx, fy = sx - c0, sy - r0
        w = o[r0 : r0 + N + 1, c0 : c0 + N + 1]
        out[k] = (1 - fy) * ((1 - fx) * w[:-1, :-1] + fx * w[:-1, 1:]) + fy * ((1 - fx) * w[1:, :-1] + fx * w[1:, 1:])
    return out


def expected_intensity(probe: np.ndarray, patches: np.ndarray) -> np.ndarray:
    """The model's physics without its scale: fftshift(|fft2(probe · patch)|² / N²), float64."""
    N = probe.shape[-1]
    field = np.fft.fft2(np.asarray(probe, np.complex128) * patches, axes=(-2, -1))
    intensity = (field.real * field.real + field.imag * field.imag) / (N * N)
    return np.fft.fftshift(intensity, axes=(-2, -1))


def diffraction_amplitudes(
    probe: np.ndarray, patches: np.ndarray, nphotons: float, rng: np.random.Generator, beamstop: int = 0
) -> np.ndarray:
    """sqrt of Poisson counts whose mean total per pattern, over the data set, is ``nphotons``; the
    central ``beamstop`` x ``beamstop`` pixels count nothing (drawn first, so the rest is unchanged).

    One scale for the whole data set (not per pattern), so patterns keep their natural differences
    in total intensity, as in a measurement with a steady beam.
    """
    intensity = expected_intensity(probe, patches)
    scale = nphotons / float(np.mean(np.sum(intensity, axis=(-2, -1))))
    counts = rng.poisson(_quantise(intensity * scale, _COUNT_BITS))
    if beamstop:
        # Centred on the zero frequency and on even pixels, so a flat square fills whole pool windows.
        lo = (probe.shape[-1] - beamstop) // 4 * 2
        counts[..., lo : lo + beamstop, lo : lo + beamstop] = 0
    return np.sqrt(counts.astype(np.float64)).astype(np.float32)


def nearest_neighbour_groups(xcoords: np.ndarray, ycoords: np.ndarray, C: int) -> np.ndarray:
    """For every position: itself, then its C − 1 nearest others, as (n, C) int64.

    Ties in distance go to the lower index, and a position always heads its own group even when
    another sits at exactly the same place. Rows are processed in chunks so that large imported
    scans (10⁵ positions) need no n × n matrix.
    """
    x = np.asarray(xcoords, dtype=np.float64)
    y = np.asarray(ycoords, dtype=np.float64)
    n = x.shape[0]
    if C < 1 or C > n:
        raise ParityInputError(f"cannot form groups of {C} positions from {n} positions")
    groups = np.empty((n, C), dtype=np.int64)
    chunk = max(1, 4_000_000 // n)
    for start in range(0, n, chunk):
        rows = np.arange(start, min(start + chunk, n))
        dx = x[None, :] - x[rows, None]
        dy = y[None, :] - y[rows, None]
        d2 = dx * dx + dy * dy
        d2[np.arange(len(rows)), rows] = -1.0  # itself first, whatever else sits at distance 0
        threshold = np.partition(d2, C - 1, axis=1)[:, C - 1 : C]
        r, c = np.nonzero(d2 <= threshold)  # the C nearest plus anything tied with the C-th
        order = np.lexsort((c, d2[r, c], r))
        r, c = r[order], c[order]
        rank = np.arange(len(r)) - np.searchsorted(r, r)
        groups[rows] = c[rank < C].reshape(len(rows), C)
    return groups


def first_member_offsets(xcoords: np.ndarray, ycoords: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """(n_groups, C, 2) float64 offsets −(position − position of the group's first member), [dx, dy]."""
    pos = np.stack([np.asarray(xcoords, np.float64), np.asarray(ycoords, np.float64)], axis=-1)[groups]
    return np.asarray(pos[:, :1] - pos)  # = −(position − first position); +0.0, not −0.0, for the first


def simulate(params: SimulationParams) -> FixtureData:
    """One simulated data set, a pure function of ``params`` (see the module docstring)."""
    obj_seq, pos_seq, noise_seq = np.random.SeedSequence(params.seed).spawn(3)
    obj = make_object(params, np.random.default_rng(obj_seq))
    probe = make_probe(params.N, params.probe_phase)
    xcoords, ycoords = scan_positions(params, np.random.default_rng(pos_seq))
    patches = extract_patches(obj, xcoords, ycoords, params.N)
    diffraction = diffraction_amplitudes(
        probe, patches, params.nphotons, np.random.default_rng(noise_seq), params.beamstop
    )
    groups = nearest_neighbour_groups(xcoords, ycoords, params.gridsize**2)
    offsets = first_member_offsets(xcoords, ycoords, groups) if params.offsets_origin == "first_member" else None
    return FixtureData(
        diffraction=diffraction,
        xcoords=xcoords,
        ycoords=ycoords,
        probe=probe,
        groups=groups,
        object=obj,
        offsets=offsets,
        N=params.N,
        gridsize=params.gridsize,
        kind=params.kind,
        seed=params.seed,
        params=params.to_dict(),
        source=f"parity.simulate generator_version={GENERATOR_VERSION}",
    )


def write_bundled_fixtures(out_dir: str | Path) -> dict[str, str]:
    """Regenerate every bundled fixture and its SHA256SUMS into ``out_dir``.

    Returns {file name: file SHA-256}, the content of the SHA256SUMS written next to them.
    """
    out = Path(out_dir)
    hashes: dict[str, str] = {}
    for name, params in BUNDLED_FIXTURES.items():
        path = write_fixture(out / f"{name}.h5", simulate(params))
        hashes[path.name] = file_sha256(path)
    write_text(out / "SHA256SUMS", format_sha256sums(hashes))
    return hashes


def compare_bundled(reference_dir: str | Path, regenerated_dir: str | Path) -> list[str]:
    """Differences between regenerated fixtures and the committed ones with their SHA256SUMS.

    Checks per-dataset hashes first, so a report says which content changed, not only that bytes did.
    An empty list means the committed fixtures are exactly what the generator produces.
    """
    ref, new = Path(reference_dir), Path(regenerated_dir)
    problems: list[str] = []
    sums = read_sha256sums(ref / "SHA256SUMS")
    expected = {f"{name}.h5" for name in BUNDLED_FIXTURES}
    for extra in sorted(set(sums) - expected):
        problems.append(f"SHA256SUMS lists {extra}, which the generator does not make")
    for fname in sorted(expected):
        if fname not in sums:
            problems.append(f"SHA256SUMS has no entry for {fname}")
            continue
        committed, regenerated = ref / fname, new / fname
        if not committed.is_file():
            problems.append(f"{committed} is missing")
        elif file_sha256(committed) != sums[fname]:
            problems.append(f"{committed} does not match its SHA256SUMS entry")
        else:
            old = load_fixture(committed).dataset_sha256
            fresh = load_fixture(regenerated)
            for dname, digest in fresh.dataset_sha256.items():
                if old.get(dname) != digest:
                    problems.append(f"{fname}: regenerated dataset {dname!r} differs from the committed one")
            if set(old) != set(fresh.dataset_sha256):
                new_names, old_names = sorted(fresh.dataset_sha256), sorted(old)
                problems.append(f"{fname}: regenerated datasets {new_names} != committed {old_names}")
        if file_sha256(regenerated) != sums[fname]:
            problems.append(f"{fname}: regenerated file's SHA-256 differs from SHA256SUMS")
    return problems

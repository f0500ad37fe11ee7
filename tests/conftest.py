"""Shared test setup: quiet TensorFlow before anything imports it; no garbage-collector passes over
what collection imports; hypothesis profiles."""

import gc
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# Every property test runs 25 examples under the CI profile (derandomized: the same on every machine
# and commit); the false-alarm sweep (tests/parity/test_sweep.py), whose runs take seconds each, takes
# 3 there, and 300 fresh ones under the long profile.
_SLOW = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True, suppress_health_check=_SLOW)
settings.register_profile("long", max_examples=300, deadline=None, suppress_health_check=_SLOW, print_blob=True)
settings.load_profile("ci")


@pytest.hookimpl(wrapper=True)
def pytest_collection(session: pytest.Session):
    """Collection imports both frameworks (TensorFlow's import alone makes hundreds of thousands of
    long-lived objects), and the cyclic collector's full passes over them cost each pytest-xdist
    worker about 1.6 s then and another second over the tests (measured, docs/decisions.md,
    "Speed"). So it is off while collecting, and what collection left (modules, frameworks, items)
    is frozen out of later passes; objects the tests make are collected as usual."""
    was_enabled = gc.isenabled()  # a process that runs without the collector keeps running without it
    gc.disable()
    try:
        return (yield)
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()


@pytest.fixture(scope="session")
def numba_compiler() -> None:
    """numba's modules that a compile imports lazily, imported: tests that run inner sessions
    in-process (pytester) take this before pytester's snapshot of sys.modules. pytester drops every
    module an inner session imported first, numba's registries keep what those modules registered,
    and the next compile imports them again and fails ("duplicate registration"; one CI run, where
    the kernels came from numba's disk cache and an inner session compiled a new signature).
    A throwaway function, never cached, of the kinds of arguments the kernels take."""
    from numba import njit

    @njit(cache=False, nogil=True)
    def throwaway(a, b, optional, x):
        total = 0.0
        for i in range(a.size):
            total += a[i] * x + abs(b[i])
            if optional is not None:
                total += optional[i]
        return total, np.zeros(2)

    values = np.ones(2)
    throwaway(values.astype(np.float32), values.astype(np.complex64), None, 1.0)
    throwaway(values, values, values, 1.0)


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto` (pyproject's addopts): a worker per core, at most four. Each worker holds both
    frameworks (about 2.6 GB at its peak, benchmarks/README.md), and the suite's longest tests, the
    false-alarm sweep's runs, take up to about 40 s each; beyond a few, more workers only cost
    memory."""
    from parity.emulation import usable_cores

    return min(4, usable_cores())


# forward-model.md section 5: convolution weights and biases per configuration (log_scale excluded).
SPEC_PARAMETER_COUNTS = [
    ({}, 2_340_208),
    ({"probe_big": False}, 2_257_000),
    ({"N": 128}, 4_667_056),
    ({"gridsize": 1}, 2_331_772),
    ({"pad_object": False}, 2_405_000),
    ({"N": 128, "pad_object": False}, 4_697_288),
    ({"object_big": False}, 2_333_500),
]


@pytest.fixture(
    params=SPEC_PARAMETER_COUNTS,
    ids=lambda p: "-".join(f"{k}={v}" for k, v in p[0].items()) or "default",
)
def spec_parameter_count(request: pytest.FixtureRequest) -> tuple[dict[str, object], int]:
    """(config changes, expected count) for each row of the spec's parameter-count table."""
    return request.param


def _spec_translate(img: np.ndarray, dx: float, dy: float, coords: type = np.float64) -> np.ndarray:
    """forward-model.md's bilinear translation, written per pixel: the slow, obvious oracle.

    ``coords`` is the precision the sampling coordinate is computed in (float32 for the float32
    backends, as the original does; float64 for the reference). Neighbours outside contribute 0.
    """
    H, W = img.shape
    out = np.zeros((H, W), dtype=np.complex128 if np.iscomplexobj(img) else np.float64)
    for i in range(H):
        for j in range(W):
            x, y = coords(j) - coords(dx), coords(i) - coords(dy)
            x0, y0 = int(np.floor(x)), int(np.floor(y))
            fx, fy = float(x - x0), float(y - y0)
            for yy, wy in ((y0, 1 - fy), (y0 + 1, fy)):
                for xx, wx in ((x0, 1 - fx), (x0 + 1, fx)):
                    if 0 <= yy < H and 0 <= xx < W:
                        out[i, j] += wy * wx * img[yy, xx]
    return out


@pytest.fixture
def spec_translate():
    """The per-pixel translation oracle shared by every backend's tests."""
    return _spec_translate


@pytest.fixture(autouse=True)
def _reports_follow_the_shipped_schema(monkeypatch):
    """Every report.json any test writes is validated against the JSON Schema the package ships (the
    JSON writer, ``to_json_dict``, is wrapped: every report goes through it, however it is imported)."""
    import parity.report

    validator = _report_validator()
    build = parity.report.to_json_dict

    def checked(result):
        data = build(result)
        # The dict itself, not a JSON round trip: jsonschema-rs rejects what json.dumps would not
        # write (NumPy scalars) or write as invalid JSON (NaN), and a dumps/loads per report cost
        # about a second of the parity suite.
        validator.validate(data)
        return data

    monkeypatch.setattr(parity.report, "to_json_dict", checked)


_VALIDATOR = []


def _report_validator():
    import json

    # jsonschema-rs: a few ms per report where the pure-Python jsonschema took seconds per report.
    import jsonschema_rs

    import parity.report

    if not _VALIDATOR:
        schema = json.loads(parity.report.schema_file().read_text(encoding="utf-8"))
        jsonschema_rs.meta.validate(schema)
        _VALIDATOR.append(jsonschema_rs.Draft202012Validator(schema))
    return _VALIDATOR[0]


# --- the original PtychoPINN (issue 9): tests marked ptychopinn need --ptychopinn=PATH -------------
_PTYCHOPINN_DESELECTED = pytest.StashKey[int]()


def pytest_addoption(parser):
    parser.addoption(
        "--ptychopinn",
        metavar="PATH",
        default=None,
        help="run the tests marked ptychopinn against the original PtychoPINN checkout at PATH (the folder "
        "holding ptycho/ and ptycho_torch/; sets PTYCHOPINN_PATH); without it they are deselected",
    )


def pytest_configure(config):
    # The marker itself is registered in pyproject.toml.
    path = config.getoption("ptychopinn")
    if path:
        root = Path(path).expanduser().resolve()
        missing = [p for p in ("ptycho", "ptycho_torch") if not (root / p / "__init__.py").is_file()]
        if missing:
            raise pytest.UsageError(
                f"--ptychopinn={path}: not a PtychoPINN checkout (no {', '.join(m + '/__init__.py' for m in missing)})"
            )
        os.environ["PTYCHOPINN_PATH"] = str(root)


def pytest_collection_modifyitems(config, items):
    if config.getoption("ptychopinn"):
        return
    keep = [item for item in items if item.get_closest_marker("ptychopinn") is None]
    dropped = [item for item in items if item.get_closest_marker("ptychopinn") is not None]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep
    config.stash[_PTYCHOPINN_DESELECTED] = len(dropped)


def pytest_report_collectionfinish(config, start_path, items):
    count = config.stash.get(_PTYCHOPINN_DESELECTED, 0)
    if count:
        return (
            f"ptychopinn: {count} test{'s' if count != 1 else ''} deselected; "
            "run them with --ptychopinn=PATH (a checkout of hoidn/PtychoPINN)"
        )
    return None

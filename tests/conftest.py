"""Shared test setup: quiet TensorFlow before anything imports it."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest

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

"""pytest plugin (entry point ``pytest11``): the ``parity`` marker, options and fixtures."""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("parity", "ptycho-parity forward-parity harness")
    group.addoption(
        "--parity-device",
        default="cpu",
        choices=("cpu", "cuda"),
        help="device the framework backends run on (default: cpu)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "parity: forward-parity tests comparing backends (select with -m parity)"
    )

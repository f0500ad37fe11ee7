from importlib.metadata import EntryPoint

import pytest

from parity import registry
from parity.errors import BackendUnavailableError


def _fake_eps(monkeypatch, *eps):
    monkeypatch.setattr(registry, "_entry_points", lambda: sorted(eps, key=lambda e: e.name))


def test_installed_backends_are_registered():
    assert {"reference", "torch", "tensorflow"} <= set(registry.registered_names())


def test_installed_backends_load():
    info = registry.discover()
    for name in ("reference", "torch", "tensorflow"):
        assert info[name].available, info[name].error
        assert info[name].backend.name == name


def test_broken_backend_reported_with_import_error(monkeypatch):
    _fake_eps(
        monkeypatch,
        EntryPoint("ghost", "no_such_module_xyz:Backend", registry.GROUP),
        EntryPoint("reference", "backends.reference:ReferenceBackend", registry.GROUP),
    )
    info = registry.discover()  # must not raise
    assert not info["ghost"].available
    assert "ModuleNotFoundError: No module named 'no_such_module_xyz'" in info["ghost"].error
    assert info["reference"].available
    with pytest.raises(BackendUnavailableError, match="backend 'ghost' is unavailable: ModuleNotFoundError"):
        registry.load_backend("ghost")


def test_non_backend_object_rejected(monkeypatch):
    _fake_eps(monkeypatch, EntryPoint("odd", "parity.config:ModelConfig", registry.GROUP))
    assert "is not a parity.Backend subclass" in registry.discover()["odd"].error


def test_unknown_name(monkeypatch):
    with pytest.raises(BackendUnavailableError, match="no backend of that name is registered"):
        registry.load_backend("nope")

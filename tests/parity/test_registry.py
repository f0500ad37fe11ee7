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


WRAPPER = '''
from backends.reference import ReferenceBackend
from parity.errors import BackendUnavailableError


class Missing(ReferenceBackend):
    """A wrapper of code found at run time, which is not there."""

    name = "missing"

    @classmethod
    def availability_problem(cls):
        return "ORIGINAL_PATH is not set; point it at a checkout"


class FailsWhenBuilt(ReferenceBackend):
    """Finds out only when built (the original's own import fails)."""

    name = "late"

    def __init__(self, config, weights, device="cpu"):
        raise BackendUnavailableError("late", "cannot import 'original': No module named 'dill'")
'''


def test_a_wrapper_whose_code_is_missing_is_unavailable_with_its_reason(monkeypatch, tmp_path):
    from parity.config import ModelConfig
    from parity.session import RunSpec, run

    (tmp_path / "wrappers_xyz.py").write_text(WRAPPER)
    monkeypatch.syspath_prepend(str(tmp_path))
    _fake_eps(
        monkeypatch,
        EntryPoint("missing", "wrappers_xyz:Missing", registry.GROUP),
        EntryPoint("late", "wrappers_xyz:FailsWhenBuilt", registry.GROUP),
        EntryPoint("reference", "backends.reference:ReferenceBackend", registry.GROUP),
    )
    info = registry.discover()
    assert not info["missing"].available and "ORIGINAL_PATH is not set" in info["missing"].error
    assert info["late"].available  # nothing cheap to check: found out when built
    spec = RunSpec(
        config=ModelConfig(gridsize=1, probe_big=False), backends=("reference", "missing", "late"), max_groups=1
    )
    result = run(spec)
    assert {n: (r.available, r.crashed) for n, r in result.backends.items()} == {
        "reference": (True, None),
        "missing": (False, None),
        "late": (False, None),
    }
    assert "No module named 'dill'" in result.backends["late"].reason
    with pytest.raises(BackendUnavailableError, match="'dill'"):
        run(RunSpec(config=spec.config, backends=("reference", "late"), max_groups=1, require=True))


def test_a_backend_put_on_the_path_at_run_time_is_found(tmp_path, monkeypatch):
    """The entry points are read once per sys.path: one added afterwards must still be seen."""
    assert "late" not in registry.registered_names()
    info = tmp_path / "late_backend-0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: late-backend\nVersion: 0.0\n")
    (info / "entry_points.txt").write_text(f"[{registry.GROUP}]\nlate = backends.reference:ReferenceBackend\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "late" in registry.registered_names()
    assert registry.load_backend("late").name == "reference"

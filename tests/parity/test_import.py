"""`import parity` must stay fast and framework-free: users install it next to whatever they have."""

import subprocess
import sys

FRAMEWORKS = ("torch", "tensorflow", "keras", "jax")


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys\nprint('\\n'.join(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
    )
    return set(out.stdout.split())


def test_import_parity_loads_no_framework():
    mods = _modules_after("import parity")
    assert "parity" in mods
    assert not {m for m in mods if m.split(".")[0] in FRAMEWORKS}


def test_harness_modules_load_no_framework():
    code = "\n".join(
        f"import parity.{m}"
        for m in (
            "runner",
            "compare",
            "kernels",
            "stats",
            "tolerances",
            "baseline",
            "report",
            "report_html",
            "session",
            "cli",
            "registry",
            "verdict",
            "measure",
            "sweep",
            "strategies",
            "emulation",
            "interrupt",
            "plugin",
        )
    )
    code += "\nfrom parity.registry import registered_names\nregistered_names()"
    mods = _modules_after(code)
    assert not {m for m in mods if m.split(".")[0] in FRAMEWORKS}


def test_import_works_with_frameworks_blocked():
    """Simulate a machine with neither framework: imports of torch/tensorflow raise ImportError."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'tensorflow', 'keras'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import parity, parity.cli, parity.session\n"
        "from parity.registry import discover\n"
        "info = discover()\n"
        "print('torch-error', info['torch'].error)\n"
        "print('reference-ok', info['reference'].available)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "torch-error ImportError: blocked: torch" in out
    assert "reference-ok True" in out

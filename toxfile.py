"""tox plugin (loaded by tox 4 from the project root): `tox -e gpu` fails at once without a GPU.

Without this, tox would first install the CUDA builds of both frameworks (several GB) and only then
find out there is nothing to run them on. After the install, `ptycho-parity check-device cuda` checks
that both frameworks really see the GPU.
"""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

from tox.plugin import impl
from tox.tox_env.errors import Fail


def gpu_problem() -> str | None:
    """Why no NVIDIA GPU is usable here, or None when nvidia-smi lists one."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "nvidia-smi is not on PATH (no NVIDIA driver)"
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"nvidia-smi failed to run ({exc})"
    if out.returncode != 0 or "GPU" not in out.stdout:
        return f"nvidia-smi lists no GPU ({(out.stderr or out.stdout).strip() or 'no output'})"
    return None


@impl
def tox_on_install(tox_env: Any, arguments: Any, section: str, of_type: str) -> None:
    if tox_env.name != "gpu":
        return
    problem = gpu_problem()
    if problem is not None:
        raise Fail(f"tox -e gpu needs a CUDA GPU and this machine has none: {problem}. Run `tox -e cpu` instead.")

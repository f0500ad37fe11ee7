"""`tox -e gpu` must never pass, or spend minutes installing CUDA wheels, on a machine without a GPU."""

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_env_refuses_a_machine_without_a_gpu_before_installing(tmp_path):
    if shutil.which("nvidia-smi"):  # on a GPU machine the gate must let the run through
        out = subprocess.run(
            [sys.executable, "-c", "import toxfile; print(toxfile.gpu_problem())"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        )
        assert out.stdout.strip() == "None"
        return
    out = subprocess.run(
        [sys.executable, "-m", "tox", "-e", "gpu", "--workdir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    text = out.stdout + out.stderr
    assert out.returncode != 0, text
    assert "tox -e gpu needs a CUDA GPU and this machine has none" in text
    assert not list(tmp_path.glob("gpu/lib*/python*/site-packages/torch")), "CUDA wheels were installed first"

"""``import parity`` shortens OpenBLAS's idle wait before NumPy loads OpenBLAS, which reads it only then."""

import os
import subprocess
import sys

from parity import _blas_threads

# Run in a fresh interpreter (this one loaded NumPy long ago): report the variable as it stood when
# NumPy's import began, and afterwards.
_SPY = f"""
import os, sys
seen = []
class Spy:
    def find_spec(self, name, path=None, target=None):
        if name == "numpy" and not seen:
            seen.append(os.environ.get({_blas_threads.IDLE_WAIT_VARIABLE!r}))
sys.meta_path.insert(0, Spy())
import parity
import numpy
print(seen, os.environ.get({_blas_threads.IDLE_WAIT_VARIABLE!r}))
"""


def _run(env_value: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != _blas_threads.IDLE_WAIT_VARIABLE}
    if env_value is not None:
        env[_blas_threads.IDLE_WAIT_VARIABLE] = env_value
    done = subprocess.run([sys.executable, "-c", _SPY], env=env, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def test_the_idle_wait_is_set_before_numpy_loads_openblas():
    assert _run(None) == f"['{_blas_threads.IDLE_WAIT}'] {_blas_threads.IDLE_WAIT}"


def test_a_value_the_user_set_is_kept():
    assert _run("28") == "['28'] 28"

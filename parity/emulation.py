"""Other machines, emulated on this one: the knobs that change how the frameworks round.

CI and users run on CPUs other than the one a tolerance was measured on. The differences that matter
to float32 results are the order of summation and the kernels chosen, and both frameworks expose
switches for them: thread counts (how a reduction is split), oneDNN on or off in TensorFlow, the
instruction set oneDNN may use (vector width, FMA), and PyTorch's CPU capability (its vectorised
kernels, and the instruction set of the MKL it calls). Each setting is a set of environment
variables read when a framework is imported, so a setting applies to a fresh process:
``ptycho-parity emulate -- <command>`` runs a command once per setting, and
``measure-tolerances --emulate`` measures under each.

A oneDNN cap above what this CPU has changes nothing; a PyTorch capability the CPU lacks would
crash (illegal instruction), so such a setting is skipped, saying why. The same matrix then means as
much as the machine can emulate.
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
import sys
from collections.abc import Mapping, Sequence

_ONE_THREAD = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "TF_NUM_INTRAOP_THREADS": "1",
    "TF_NUM_INTEROP_THREADS": "1",
}
_TWO_THREADS = {k: "2" for k in _ONE_THREAD}

SETTINGS: dict[str, dict[str, str]] = {
    "native": {},
    "threads=1": _ONE_THREAD,
    "threads=2": _TWO_THREADS,
    "tf-onednn=off": {"TF_ENABLE_ONEDNN_OPTS": "0"},
    "tf-onednn=on": {"TF_ENABLE_ONEDNN_OPTS": "1"},
    "onednn-isa=sse41": {"ONEDNN_MAX_CPU_ISA": "SSE41"},
    "onednn-isa=avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2"},
    # PyTorch's own vectorised kernels, and the MKL its CPU build carries for matrix products and
    # FFTs (torch.fft.fft2 in the diffraction): ATEN_CPU_CAPABILITY alone left MKL at this CPU's
    # widest set, so "avx2" emulated only half of an AVX2 machine (measured 2026-12-05: MKL's FFT and
    # matmul gave other bits only with MKL_ENABLE_INSTRUCTIONS).
    "aten=default": {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
    "aten=avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "aten=avx512": {"ATEN_CPU_CAPABILITY": "avx512"},
}
# Variables that any setting may touch: cleared first, so a setting is exactly what it names.
_ALL_VARIABLES = sorted({k for env in SETTINGS.values() for k in env})
# A setting that forces kernels of an instruction set runs only where the CPU has it (else SIGILL):
# the cpuinfo flags it needs (PyTorch's AVX-512 kernels use the F, BW, VL and DQ subsets).
_REQUIRES = {"aten=avx512": ("avx512f", "avx512bw", "avx512vl", "avx512dq"), "aten=avx2": ("avx2", "fma")}


def _cpuinfo(key: str) -> str | None:
    """The first value of ``key`` in /proc/cpuinfo (None where there is no such file or key)."""
    try:
        text = open("/proc/cpuinfo", encoding="ascii", errors="replace").read()
    except OSError:
        return None
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == key:
            return value.strip()
    return None


def _cpu_flags() -> set[str] | None:
    flags = _cpuinfo("flags")
    return None if flags is None else set(flags.split())


# The widest vector instruction set, by the cpuinfo flag that says the CPU has it.
_WIDEST = (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("sse4_1", "SSE4.1"))


def describe_cpu(model: str, flags: set[str] | None) -> str:
    """``model`` and the widest vector instruction set of ``flags``: "AMD EPYC, AVX-512"."""
    isa = next((label for flag, label in _WIDEST if flag in (flags or ())), None)
    return f"{model}, {isa}" if isa else model


@functools.cache
def cpu_model() -> str:
    """The machine a measurement or a benchmark ran on, which the emulated settings only approximate:
    its model name and widest vector instruction set. The settings cap oneDNN's instruction set but
    cannot raise it, and one model name ("AMD EPYC") covers CPUs with and without AVX-512, whose
    oneDNN kernels round differently (docs/tolerances.md, "A second CPU")."""
    model = _cpuinfo("model name") or platform.processor() or platform.machine() or "unknown CPU"
    return describe_cpu(model, _cpu_flags())


def unavailable() -> dict[str, str]:
    """{setting: why} for settings this CPU cannot run."""
    flags = _cpu_flags()
    if flags is None:
        return {}
    out = {}
    for name, needed in _REQUIRES.items():
        lacking = [flag for flag in needed if flag not in flags]
        if lacking:
            out[name] = f"this CPU has no {', '.join(lacking)}"
    return out


def runnable(settings: Sequence[str]) -> list[str]:
    """The settings of ``settings`` this CPU can run, telling on stderr which it skips and why."""
    skip = unavailable()
    for name in settings:
        if name in skip:
            print(f"== emulate {name}: skipped ({skip[name]})", file=sys.stderr, flush=True)
    return [name for name in settings if name not in skip]


def environment(setting: str, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a child process under ``setting`` (unknown names are a ValueError)."""
    if setting not in SETTINGS:
        raise ValueError(f"emulation setting {setting!r} is unknown; known: {', '.join(SETTINGS)}")
    env = {k: v for k, v in (base if base is not None else os.environ).items() if k not in _ALL_VARIABLES}
    env.update(SETTINGS[setting])
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one, else all)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def thread_count() -> int:
    """The threads this process should run: OMP_NUM_THREADS where set (the user's choice, or a
    pytest-xdist worker's share, ``share_cores``), else its usable cores."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else usable_cores()


def share_cores(workers: int) -> dict[str, str]:
    """Thread settings that give each of ``workers`` processes its share of this machine's cores:
    for pytest-xdist workers, which otherwise each start as many threads as there are cores."""
    return {k: str(max(1, usable_cores() // max(1, workers))) for k in _ONE_THREAD}


def run_under(settings: Sequence[str], command: Sequence[str]) -> dict[str, int]:
    """Run ``command`` once per setting this CPU can run, in the foreground; {setting: exit code}."""
    codes: dict[str, int] = {}
    for name in runnable(settings):
        print(f"== emulate {name}: {' '.join(command)}", file=sys.stderr, flush=True)
        codes[name] = subprocess.call(list(command), env=environment(name))
    return codes

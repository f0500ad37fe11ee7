"""What the emulation module says about the machine it runs on."""

from parity.emulation import _cpu_flags, cpu_model, describe_cpu


def test_a_cpu_is_named_with_its_widest_vector_instruction_set():
    """One model name covers CPUs with and without AVX-512 (oneDNN rounds differently on each), so a
    measurement names the instruction set too."""
    assert describe_cpu("AMD EPYC", {"sse4_1", "avx2", "avx512f", "fma"}) == "AMD EPYC, AVX-512"
    assert describe_cpu("AMD EPYC", {"sse4_1", "avx2", "fma"}) == "AMD EPYC, AVX2"
    assert describe_cpu("Some ARM core", {"neon"}) == "Some ARM core"
    assert describe_cpu("unknown CPU", None) == "unknown CPU"


def test_this_machine_is_described_from_its_cpuinfo():
    flags = _cpu_flags()
    if flags is not None and "avx512f" in flags:
        assert cpu_model().endswith(", AVX-512")
    elif flags is not None and "avx2" in flags:
        assert cpu_model().endswith(", AVX2")
    assert cpu_model() and cpu_model() == cpu_model()


def test_a_setting_the_cpu_lacks_a_flag_for_is_skipped_and_listed(monkeypatch, capsys):
    """PyTorch's AVX-512 kernels need the BW, VL and DQ subsets too, not only F (a CPU with F alone
    would end in an illegal instruction); the final table lists a skipped setting with the reason."""
    import parity.emulation
    from parity.cli import main

    monkeypatch.setattr(parity.emulation, "_cpu_flags", lambda: {"sse4_1", "avx2", "fma", "avx512f"})
    assert parity.emulation.unavailable() == {"aten=avx512": "this CPU has no avx512bw, avx512vl, avx512dq"}
    assert main(["emulate", "--settings", "aten=avx512,threads=1", "--", "true"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == ["aten=avx512  skipped (this CPU has no avx512bw, avx512vl, avx512dq)", "threads=1    pass"]


PROBE = """
import json, os
import threadpoolctl, torch
from parity.kernels import on_cores
from parity.emulation import thread_count
from backends.tensorflow.backend import TensorFlowBackend
from parity.config import ModelConfig
from parity.weights import generate_weights
config = ModelConfig(gridsize=1, probe_big=False)
tf_env = TensorFlowBackend(config, generate_weights(config), "cpu").environment()
blas = [p["num_threads"] for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"]
print(json.dumps({"aten": torch.backends.cpu.get_cpu_capability(), "torch_threads": torch.get_num_threads(),
                  "blas": blas, "kernels": thread_count(), "tf_intra": tf_env["intra_op_threads"],
                  "tf_inter": tf_env["inter_op_threads"], "mkl": os.environ.get("MKL_ENABLE_INSTRUCTIONS")}))
"""


def test_each_setting_takes_effect_in_the_process_it_runs(tmp_path):
    """Measured in a child started as ``run_under`` starts it, not read back from the variables:
    ATen's capability, torch's, BLAS's, TensorFlow's and the harness's own threads, and what
    TensorFlow's environment() reports (0 until 2026-12-05 while its pools ran one thread)."""
    import json
    import subprocess
    import sys

    from parity.emulation import environment, unavailable

    def measured(setting):
        done = subprocess.run(
            [sys.executable, "-c", PROBE], env=environment(setting), capture_output=True, text=True, check=True
        )
        return json.loads(done.stdout.strip().splitlines()[-1])

    one = measured("threads=1")
    assert (one["torch_threads"], one["kernels"], one["tf_intra"], one["tf_inter"]) == (1, 1, 1, 1)
    assert one["blas"] and set(one["blas"]) == {1}
    assert measured("aten=default")["aten"] == "DEFAULT"
    if "aten=avx2" not in unavailable():
        avx2 = measured("aten=avx2")
        assert (avx2["aten"], avx2["mkl"]) == ("AVX2", "AVX2")

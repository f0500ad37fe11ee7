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

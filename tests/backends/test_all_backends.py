"""What every registered PtychoPINN backend must do the same way: inputs, weights files, controls."""

import numpy as np
import pytest

from parity.config import ModelConfig
from parity.fixture import bundled_fixture, iter_batches, load_fixture
from parity.registry import load_backend
from parity.session import RunSpec, run
from parity.weights import generate_weights, load_weights, save_weights

BACKENDS = ("reference", "torch", "tensorflow")


@pytest.fixture(scope="module")
def built():
    cfg = ModelConfig()
    weights = generate_weights(cfg)
    return cfg, weights, {n: load_backend(n)(cfg, weights, "cpu") for n in BACKENDS}


def test_input_taps_are_byte_identical_to_the_fixture_batch(built):
    cfg, _, backends = built
    fixture = load_fixture(bundled_fixture("n64_g2_lines"), cfg)
    batch = next(iter_batches(fixture, cfg, batch_size=2))
    for name, be in backends.items():
        taps = be.forward(batch)
        assert taps["input.x"].dtype == np.float32 and taps["input.x"].tobytes() == batch.x.tobytes(), name
        assert taps["input.offsets"].tobytes() == batch.offsets.tobytes(), name
        assert taps["input.offsets"].shape == (2, 4, 1, 2)
        assert taps["input.probe"].dtype == np.complex64, name
        assert taps["input.probe"].tobytes() == batch.probe.tobytes(), name


def test_weights_exported_to_the_canonical_file_are_bit_exact(built, tmp_path):
    cfg, weights, backends = built
    for name, be in backends.items():
        path = tmp_path / f"{name}.h5"
        save_weights(path, be.export_weights(), cfg)
        back = load_weights(path, cfg)
        assert list(back) == list(weights)
        for key, arr in weights.items():
            assert back[key].dtype == arr.dtype and np.array_equal(back[key], arr), (name, key)


def test_precision_and_determinism_controls_are_set_and_reported(built):
    _, _, backends = built
    torch_env = backends["torch"].environment()
    assert torch_env["deterministic_algorithms"] is True
    assert torch_env["cudnn_allow_tf32"] is False and torch_env["cuda_matmul_allow_tf32"] is False
    tf_env = backends["tensorflow"].environment()
    assert tf_env["tf32_enabled"] is False and tf_env["op_determinism"] is True
    assert "onednn" in " ".join(tf_env).lower()
    ref_env = backends["reference"].environment()
    assert ref_env["dtype"] == "float64"
    for env in (torch_env, tf_env, ref_env):
        assert env["framework_version"] and env["device"]


def test_effective_configs_agree_for_every_option(built):
    for changes in (
        {},
        {"gridsize": 1, "probe_big": False},
        {"pad_object": False, "amp_activation": "relu"},
        {"canvas_size": 68},  # the original PyTorch port's canvas at the default config
    ):
        cfg = ModelConfig(**changes)
        weights = generate_weights(cfg)
        configs = [load_backend(n)(cfg, weights, "cpu").effective_config() for n in BACKENDS]
        assert configs[0] == configs[1] == configs[2] == cfg.resolved_dict()


@pytest.mark.parity
def test_two_runs_give_bitwise_identical_statistics():
    spec = RunSpec(config=ModelConfig(), batch_size=2, max_groups=2)
    first, second = run(spec), run(spec)
    assert first.passed and second.passed
    for backend, per_tap in first.statistics.items():
        for tap, per_stat in per_tap.items():
            for stat, values in per_stat.items():
                other = second.statistics[backend][tap][stat]
                assert values.tobytes() == other.tobytes(), (backend, tap, stat)


@pytest.mark.parity
def test_a_canvas_size_set_in_the_config_is_honoured_by_every_backend():
    # The original PyTorch port's canvas at the default config: no jitter margin.
    res = run(RunSpec(config=ModelConfig(canvas_size=68), batch_size=2, max_groups=2))
    assert res.passed, res.describe_failure()
    canvas = next(t for t in res.taps if t.name == "object.canvas")
    assert set(map(tuple, canvas.shapes.values())) == {(2, 1, 68, 68)}


@pytest.mark.parity
def test_a_declared_canvas_difference_is_compared_on_the_window_both_canvases_hold():
    """torch built with the port's 68-pixel canvas against the canonical 78: stopped at the precheck
    naming canvas_size unless declared; declared, the canvas is compared on the centred 68 x 68 window
    and passes (the merge computes the same there), and what the smaller canvas loses shows later."""
    from backends.torch import TorchBackend

    cfg = ModelConfig()
    weights = generate_weights(cfg)

    def once(**kw):
        port = TorchBackend(cfg.replace(canvas_size=68), weights)
        spec = RunSpec(config=cfg, batch_size=2, max_groups=2, backends=("reference", "torch"), **kw)
        return run(spec, backend_overrides={"torch": port})

    stopped = once()
    assert stopped.verdict == "config_mismatch" and list(stopped.config_diff) == ["canvas_size"]
    assert stopped.config_diff["canvas_size"] == {"reference": 78, "torch": 68}
    res = once(allow_config_diff=["canvas_size"])
    assert res.deviations[0]["status"] == "reproduced"
    canvas = next(t for t in res.taps if t.name == "object.canvas")
    assert canvas.window == [68, 68] and canvas.status == "pass"
    assert next(t for t in res.taps if t.name == "object.trimmed").status == "pass"
    # Re-extraction reads the ring the smaller canvas never held: a real consequence, named there.
    assert res.first_divergence is not None and res.first_divergence["tap"] == "object.reextracted"


STAGE_CONFIGS = [
    ModelConfig(),
    ModelConfig(pad_object=False),
    ModelConfig(gridsize=1, probe_big=False, probe_mask=True, amp_activation="relu"),
    ModelConfig(object_big=False, amp_activation="softplus"),
]


@pytest.mark.parametrize("cfg", STAGE_CONFIGS, ids=ModelConfig.short_id)
def test_every_stage_run_alone_gives_what_the_forward_gives(cfg):
    """Each backend's stage, fed its own forward's inputs to that stage, reproduces its own forward:
    the reference to the bit, the float32 backends to within float32 re-rounding of the same ops.
    Layer-local parity rests on this: a stage run alone is the stage the forward runs."""
    from parity.stages import stages

    weights = generate_weights(cfg)
    fixture = load_fixture(bundled_fixture("n64_g2_lines" if cfg.gridsize == 2 else "n64_g1_grf"), cfg)
    batch = next(iter_batches(fixture, cfg, batch_size=2))
    for name in BACKENDS:
        be = load_backend(name)(cfg, weights, "cpu")
        assert be.runs_stages, name
        taps = be.forward(batch)
        for stage in stages(cfg):
            out = be.run_stage(stage, {n: taps[n] for n in stage.inputs})
            assert list(out) == list(stage.outputs), (name, stage.name)
            for tap, value in out.items():
                assert value.shape == taps[tap].shape and value.dtype == taps[tap].dtype, (name, tap)
                if name == "reference":
                    np.testing.assert_array_equal(value, taps[tap], err_msg=tap)
                else:
                    scale = np.abs(taps[tap]).max() + 1e-30
                    np.testing.assert_allclose(value, taps[tap], rtol=0, atol=1e-5 * scale, err_msg=f"{name} {tap}")

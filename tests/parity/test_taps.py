from parity.config import ModelConfig
from parity.taps import all_tap_names, matching_taps, tap_names, tap_specs


def test_default_tap_order_and_shapes():
    specs = {s.name: s for s in tap_specs(ModelConfig(), 3)}
    names = [s.name for s in tap_specs(ModelConfig(), 3)]
    assert names[:4] == ["input.x", "input.offsets", "input.probe", "input.scaled"]
    assert names[-2:] == ["loss.poisson_nll", "loss.mae"]
    assert names.index("amp.head.sum") < names.index("phase.decoder.block0.conv0")
    assert specs["encoder.block2.pool"].shape == (3, 256, 8, 8)
    assert specs["amp.decoder.block1.up"].shape == (3, 64, 32, 32)
    assert specs["amp.head.centre"].shape == (3, 4, 32, 32)
    assert specs["amp.head.border.up"].shape == (3, 64, 64, 64)
    assert specs["object.canvas"].shape == (3, 1, 78, 78) and specs["object.canvas"].complex
    assert specs["input.offsets"].shape == (3, 4, 1, 2)
    assert specs["loss.mae"].shape == (3, 1, 1, 1)


def test_branches_follow_config():
    assert "amp.head.border.out" not in tap_names(ModelConfig(probe_big=False))
    full = tap_names(ModelConfig(pad_object=False))
    assert "phase.head.full.out" in full and "phase.head.centre" not in full
    n128 = {s.name: s.shape for s in tap_specs(ModelConfig(N=128), 1)}
    assert n128["encoder.block3.pool"] == (1, 256, 8, 8)
    assert n128["amp.decoder.block2.up"] == (1, 64, 64, 64)
    assert {s.name: s.shape for s in tap_specs(ModelConfig(object_big=False), 1)}["object.patches"] == (1, 1, 64, 64)


def test_universe_and_patterns():
    universe = all_tap_names()
    assert "encoder.block3.conv0" in universe and "amp.head.full.conv0" in universe
    assert matching_taps("*.head.border.out") == ["amp.head.border.out", "phase.head.border.out"]
    assert matching_taps("encodr.*") == []

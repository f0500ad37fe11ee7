"""The stages of layer-local parity: they cover the tap list exactly, in order, and read only what
came before them."""

import itertools

import pytest

from parity.config import ModelConfig
from parity.stages import KINDS, stage_of, stages
from parity.taps import tap_names

CONFIGS = [
    ModelConfig(N=N, gridsize=g, pad_object=pad, probe_big=big, object_big=obj)
    for N, g, pad, big, obj in itertools.product((64, 128), (1, 2), (True, False), (True, False), (True, False))
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=ModelConfig.short_id)
def test_stages_cover_every_computed_tap_once_in_order(cfg):
    names = tap_names(cfg)
    produced = [t for s in stages(cfg) for t in s.outputs]
    assert produced == [n for n in names if not n.startswith("input.") or n == "input.scaled"]
    assert list(stage_of(cfg)) == produced


@pytest.mark.parametrize("cfg", CONFIGS, ids=ModelConfig.short_id)
def test_a_stage_reads_only_taps_computed_before_it(cfg):
    order = {n: i for i, n in enumerate(tap_names(cfg))}
    for s in stages(cfg):
        assert s.kind in KINDS
        first_output = order[s.outputs[0]]
        assert all(order[n] < first_output for n in s.inputs), s.name


def test_heads_feed_the_object_from_their_last_map():
    by_name = {s.name: s for s in stages(ModelConfig())}
    assert by_name["object.patches"].inputs == ("amp.head.sum", "phase.head.sum")
    assert by_name["amp.head"].inputs == ("amp.decoder.block1.up",)  # N=64: two decoder blocks
    full = {s.name: s for s in stages(ModelConfig(pad_object=False))}
    assert full["object.patches"].inputs == ("amp.head.full.out", "phase.head.full.out")
    no_border = {s.name: s for s in stages(ModelConfig(probe_big=False))}
    assert no_border["object.patches"].inputs == ("amp.head.padded", "phase.head.padded")
    assert by_name["phase.decoder.block0"].inputs == ("encoder.block2.pool",)
    assert (by_name["encoder.block1"].kind, by_name["encoder.block1"].block) == ("encoder", 1)
    assert (by_name["phase.head"].kind, by_name["phase.head"].branch) == ("head", "phase")

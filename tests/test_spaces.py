import numpy as np
import pytest
import torch

from hwnas.errors import UserError
from hwnas.spaces import SPACES, OpKey, count_macs, get_space
from hwnas.spaces.layers import split_shuffle
from hwnas.spaces.shufflenet import ShuffleNetSpace

ALL = list(SPACES)


@pytest.mark.parametrize("name", ALL)
def test_arch_text_round_trips(name):
    space = get_space(name)
    rng = np.random.default_rng(0)
    for _ in range(20):
        a = space.sample(rng)
        assert space.parse(str(a)) == a
        assert str(a).startswith(space.name + ":")
        assert len(a.choices) == space.num_layers


@pytest.mark.parametrize("name", ALL)
def test_randomness_comes_from_the_generator(name):
    space = get_space(name)
    a = [space.sample(np.random.default_rng(3)) for _ in range(2)]
    assert a[0] == a[1]
    m1 = space.mutate(a[0], np.random.default_rng(5), prob=0.5)
    m2 = space.mutate(a[0], np.random.default_rng(5), prob=0.5)
    assert m1 == m2 and m1 != a[0]
    b = space.sample(np.random.default_rng(4))
    c = space.crossover(a[0], b, np.random.default_rng(1))
    assert all(x in (y, z) for x, y, z in zip(c.choices, a[0].choices, b.choices))


def test_mutation_always_changes_a_resampled_layer():
    space = get_space("det20")
    a = space.sample(np.random.default_rng(0))
    m = space.mutate(a, np.random.default_rng(0), prob=1.0)
    assert all(x != y for x, y in zip(a.choices, m.choices))


@pytest.mark.parametrize("text,why", [
    ("det20:0123", "exactly 20 tokens"),
    ("det20:01230123012301230124", "out of range"),
    ("det20:0123012301230123012x", "choice x at layer 19 is out of range"),
    ("det20:0123012301230123012X", "exactly 20 tokens"),
    ("det20:0123012301230123012\u0663", "exactly 20 tokens"),  # a non-ASCII digit
    ("det40:01230123012301230123", "belongs to space"),
])
def test_bad_arch_strings(text, why):
    with pytest.raises(UserError, match=why):
        get_space("det20").parse(text)


def test_unknown_space_and_width():
    with pytest.raises(UserError, match="unknown space"):
        get_space("nope")
    with pytest.raises(UserError, match="width multiplier"):
        get_space("det20-wabc")
    s = get_space("det20-w0.5")
    assert s.name == "det20-w0.5" and s.stage_channels == (32, 80, 160, 320)
    assert s.parse(str(s.sample(np.random.default_rng(0)))).space == "det20-w0.5"


def test_det_spaces_follow_the_papers():
    d20, d40 = get_space("det20"), get_space("det40")
    assert d20.cfg.stage_repeats == (4, 4, 8, 4) and d20.stage_channels == (64, 160, 320, 640)
    assert d20.stem_channels == 16 and d20.num_layers == 20
    assert d40.cfg.stage_repeats == (8, 8, 16, 8) and d40.stage_channels == (96, 240, 480, 960)
    assert d40.stem_channels == 48 and d40.num_layers == 40
    assert d20.choice_names == ("shuffle3", "shuffle5", "shuffle7", "xception")


@pytest.mark.parametrize("name", ALL)
def test_op_keys_walk_matches_the_built_model(name):
    space = get_space(name)
    if not isinstance(space, ShuffleNetSpace):
        # a detector space's walk (backbone + FPN + head + post) is checked against the built
        # detector in tests/test_detection_latency.py
        pytest.skip(f"{name} builds a detector, not a stem/blocks/head candidate")
    shape = (1, 3, 64, 64)
    arch = space.sample(np.random.default_rng(1))
    keys = space.op_keys(arch, shape)
    assert [k.kind for k in keys[1:-1]] == [g.kind for g in space.genes(arch)]
    model = space.build(arch)
    assert not model.training
    x = torch.zeros(shape)
    # feed the walk op by op through the built model's own modules: shapes must agree
    ops = [model.stem, *model.blocks, model.head]
    for key, op in zip(keys, ops):
        assert tuple(x.shape) == key.in_shape, str(key)
        x = op(x)
    assert tuple(x.shape) == (1, space.cfg.num_classes)
    feats = model.forward_features(torch.zeros(shape))
    assert [f.shape[1] for f in feats] == list(space.stage_channels)


@pytest.mark.parametrize("name", ALL)
def test_key_grid_agrees_with_op_keys(name):
    space = get_space(name)
    fixed, grid = space.key_grid()
    rng = np.random.default_rng(2)
    for _ in range(10):
        a = space.sample(rng)
        walk = [str(k) for k in space.op_keys(a)]
        chosen = [grid[i][c] for i, c in enumerate(a.choices)]
        if all(k is not None for k in chosen):  # every layer chooses: the walk's own order
            derived = [str(fixed[0])] + [str(k) for k in chosen] + [str(k) for k in fixed[1:]]
            assert walk == derived
        # a single-choice layer's op is a fixed one: the same ops either way
        assert sorted(walk) == sorted([str(k) for k in fixed] +
                                      [str(k) for k in chosen if k is not None])


def test_unique_keys_of_det20():
    keys = get_space("det20").unique_op_keys()
    # stem + head + per stage: 4 choices at stride 2 and 4 at stride 1
    assert len(keys) == 2 + 4 * 8
    assert len({str(k) for k in keys}) == len(keys)


def test_op_key_text_round_trips_and_rejects_garbage():
    k = OpKey("shuffle5", (1, 64, 40, 40), 160, 5, 2)
    assert str(k) == "shuffle5:1x64x40x40:o160:k5:s2:d1:fp32"
    assert OpKey.parse(str(k)) == k
    for bad in ("shuffle5:1x64:o1", "a:1x2:oX:k1:s1:d1:fp32", "a:1xq:o1:k1:s1:d1:fp32"):
        with pytest.raises(ValueError):
            OpKey.parse(bad)


def test_split_shuffle_equals_the_spos_reference():
    x = torch.randn(2, 8, 3, 3)
    b, c, h, w = x.shape
    ref = x.reshape(b * c // 2, 2, h * w).permute(1, 0, 2).reshape(2, -1, c // 2, h, w)
    a, m = split_shuffle(x)
    assert torch.equal(a, ref[0]) and torch.equal(m, ref[1])


def test_macs_counted_from_the_module():
    space = get_space("det20")
    k = space.op_keys(space.arch([0] * 20))[0]  # stem: 3x3 conv 3->16, s2, 320 -> 160
    assert count_macs(space.build_op(k), k.in_shape) == 160 * 160 * 16 * 3 * 9


@pytest.mark.parametrize("name", ["tiny", "det20-w0.25"])
def test_feature_info_matches_forward_features(name):
    space = get_space(name)
    arch = space.sample(np.random.default_rng(3))
    shape = space.default_input
    feats = space.build(arch).forward_features(torch.zeros(shape))
    info = space.feature_info(shape)
    assert [f.index for f in info] == list(range(len(feats)))
    assert [(f.channels, shape[2] // f.stride) for f in info] == \
        [(t.shape[1], t.shape[2]) for t in feats]


def test_general_space_has_per_layer_choices_of_several_dimensions(tiny_mixed_tables):
    from hwnas.latency import LatencyTable, LutPredictor, table_path

    space = get_space("tiny-mixed")
    assert space.num_choices == (4, 5, 1, 3)
    a = space.parse("tiny-mixed:1402")
    assert [g.name for g in space.genes(a)] == ["shuffle5", "xception_d2", "shuffle3",
                                                "xception_d2"]
    keys = space.op_keys(a)
    assert keys[2].dilation == 2 and keys[2].kind == "xception"
    with pytest.raises(UserError, match=r"layer 2 is out of range; that layer takes 0\.\.0"):
        space.parse("tiny-mixed:1412")
    # the model built from the keys runs, and a dilated block keeps its shapes
    out = space.build(a)(torch.zeros(space.default_input))
    assert out.shape == (1, 10)
    # priced from a real table: the walk and the vectorised grid agree
    t = LatencyTable.load(table_path(tiny_mixed_tables, "cpu-ort-fp32", "tiny-mixed",
                                     space.default_input))
    pred = LutPredictor(t, space)
    archs = space.sample_distinct(20, np.random.default_rng(0))
    assert np.allclose(pred.predict_many(archs), [pred.predict(x) for x in archs])
    assert pred.fastest_ms() <= min(pred.predict(x) for x in archs) * (1 + 1e-12)


def test_tokens_past_nine_are_letters():
    from hwnas.spaces.base import Gene
    from hwnas.spaces.shufflenet import ShuffleNetConfig, ShuffleNetSpace

    wide = tuple(Gene(k, kk, dilation=d) for d in (1, 2, 3)
                 for k, kk in (("shuffle3", 3), ("shuffle5", 5), ("shuffle7", 7), ("xception", 3)))
    space = ShuffleNetSpace(ShuffleNetConfig("wide", (2, 2), 8, (16, 32), (1, 3, 32, 32), 10,
                                             layer_choices=(wide,) * 4))
    a = space.arch([11, 0, 10, 3])
    assert str(a) == "wide:b0a3" and space.parse(str(a)) == a
    assert space.genes(a)[0].name == "xception_d3"
    with pytest.raises(UserError, match="tokens"):
        space.parse("wide:b0A3")


def test_multi_input_op_keys_round_trip():
    k = OpKey("fpn_merge", (1, 64, 40, 40), 64, 1, 1, 1, "int8", ((1, 160, 20, 20),))
    assert str(k) == "fpn_merge:1x64x40x40+1x160x20x20:o64:k1:s1:d1:int8"
    assert OpKey.parse(str(k)) == k and k.in_shapes[1] == (1, 160, 20, 20)
    with pytest.raises(ValueError):
        OpKey.parse("fpn_merge:1x64x40x40+:o64:k1:s1:d1:int8")

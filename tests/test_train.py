"""Supernet training on the tiny space: real steps, resume, refused checkpoints, scoring."""

import copy
import numpy as np
import pytest
import torch

from hwnas.errors import UserError
from hwnas.spaces import get_space
from hwnas.train import (SupernetScorer, SupernetTrainer, TrainConfig, load_supernet,
                         proxy_arch, train_standalone)
from hwnas.train.supernet import read_checkpoint




def cfg(**kw):
    base = dict(space="tiny", image_size=32, steps=6, batch_size=8, ckpt_every=2,
                warmup_steps=0, match_steps=0)
    base.update(kw)
    return TrainConfig(**base)


def test_resume_takes_the_same_steps(tmp_path, splits):
    full = SupernetTrainer(cfg(), tmp_path / "full.pt", splits, progress=False)
    full.run()
    part = SupernetTrainer(cfg(), tmp_path / "part.pt", splits, progress=False)
    part.train_to(4)  # "killed" after the step-4 checkpoint
    again = SupernetTrainer(cfg(), tmp_path / "part.pt", splits, progress=False)
    assert again.step == 4
    res = again.run()
    assert res["resumed_from"] == 4 and res["step"] == 6
    a, b = full.model.state_dict(), again.model.state_dict()
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)
    # real training moved the weights
    fresh = SupernetTrainer(cfg(), tmp_path / "fresh.pt", splits, progress=False)
    assert not torch.equal(fresh.model.stem.conv[0].weight, full.model.stem.conv[0].weight)


def _params(module):
    return [p.detach().clone() for p in module.parameters()]


def _changed(before, module):
    return [not torch.equal(a, b) for a, b in zip(before, module.parameters())]


def _sibling_distance(model, splits) -> float:
    """Mean squared distance of layer 0's other choices from its reference block (on a copy, so
    the BatchNorm statistics of the model under test stay untouched)."""
    m = copy.deepcopy(model).train()
    x, _ = splits.train.batch(np.arange(8))
    with torch.no_grad():
        h = m.stem(x)
        ref = m.layers[0][0](h)
        return float(np.mean([float(((b(h) - ref) ** 2).mean()) for b in list(m.layers[0])[1:]]))


def test_warmup_then_matching_then_spos(tmp_path, splits):
    c = cfg(steps=7, warmup_steps=2, match_steps=2, ckpt_every=1)
    tr = SupernetTrainer(c, tmp_path / "ck.pt", splits, progress=False)
    layers = tr.model.layers
    ref0, sib0 = _params(layers[0][0]), _params(layers[0][3])
    tr.train_to(2)  # warm-up: the reference path only
    assert all(_changed(ref0, layers[0][0])) and not any(_changed(sib0, layers[0][3]))
    ref1, sib1 = _params(layers[0][0]), _params(layers[0][3])
    tr.train_to(3)  # one matching step: siblings move towards the reference, which stays
    assert tr.match_loss is not None and tr.loss_ema is not None
    assert not any(_changed(ref1, layers[0][0])) and any(_changed(sib1, layers[0][3]))
    again = SupernetTrainer(c, tmp_path / "ck.pt", splits, progress=False)  # resume mid-match
    assert again.step == 3
    before = _sibling_distance(again.model, splits)
    again.train_to(4)
    assert _sibling_distance(again.model, splits) < before  # matching pulls siblings closer
    res = again.run()  # SPOS phase to the end
    assert res["step"] == 7
    # the same run without interruption ends with identical weights
    full = SupernetTrainer(c, tmp_path / "full.pt", splits, progress=False)
    full.run()
    a, b = full.model.state_dict(), again.model.state_dict()
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)


def test_start_phases_must_leave_spos_steps(tmp_path, splits):
    with pytest.raises(UserError, match="together less than --steps"):
        SupernetTrainer(cfg(steps=4, warmup_steps=2, match_steps=2), tmp_path / "x.pt", splits,
                        progress=False)


def test_checkpoint_is_weights_only_and_refuses_foreign_space(tmp_path, splits):
    out = tmp_path / "ck.pt"
    SupernetTrainer(cfg(steps=2), out, splits, progress=False).run()
    meta = read_checkpoint(out)["meta"]
    assert meta["space"] == "tiny" and meta["step"] == 2
    with pytest.raises(UserError, match="space 'tiny'"):
        SupernetTrainer(cfg(space="tiny-w2"), out, splits, progress=False)
    with pytest.raises(UserError, match="image_size"):
        SupernetTrainer(cfg(image_size=48), out, splits, progress=False)


def test_corrupt_checkpoint_refused_and_kept(tmp_path, splits):
    out = tmp_path / "ck.pt"
    SupernetTrainer(cfg(steps=2), out, splits, progress=False).run()
    data = out.read_bytes()
    out.write_bytes(data[: len(data) // 2])
    truncated = out.read_bytes()
    with pytest.raises(UserError, match="corrupt or truncated"):
        SupernetTrainer(cfg(), out, splits, progress=False)
    with pytest.raises(UserError, match="corrupt or truncated"):
        load_supernet(out)
    assert out.read_bytes() == truncated  # nothing overwritten
    out.write_bytes(b"garbage")
    with pytest.raises(UserError):
        load_supernet(out)


def test_scorer_recalibrates_and_scores(tmp_path, splits):
    tr = SupernetTrainer(cfg(steps=4), tmp_path / "ck.pt", splits, progress=False)
    tr.run()
    net, meta = load_supernet(tmp_path / "ck.pt")
    scorer = SupernetScorer(net, splits, bn_batches=2, bn_batch_size=16)
    tiny = get_space("tiny")
    archs = [tiny.parse("tiny:0123"), tiny.parse("tiny:3333")]
    s1 = scorer.predict(archs)
    assert s1.shape == (2,) and ((0 <= s1) & (s1 <= 1)).all()
    assert np.array_equal(s1, scorer.predict(archs))  # deterministic: fixed BN batches
    with pytest.raises(UserError, match="layers differ"):
        proxy_arch(get_space("det20").parse("det20:" + "0" * 20), tiny)


def test_standalone_training(splits):
    tiny = get_space("tiny")
    res = train_standalone(tiny, tiny.parse("tiny:0123"), splits, steps=3, batch_size=8)
    assert 0 <= res["test_acc"] <= 1 and res["arch"] == "tiny:0123"

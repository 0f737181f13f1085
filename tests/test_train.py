"""Supernet training on the tiny space: real steps, resume, refused checkpoints, scoring."""

import numpy as np
import pytest
import torch

from hwnas.data import load_data
from hwnas.errors import UserError
from hwnas.spaces import get_space
from hwnas.train import (SupernetScorer, SupernetTrainer, TrainConfig, load_supernet,
                         proxy_arch, train_standalone)
from hwnas.train.supernet import read_checkpoint

SMALL = {"train": 64, "val": 20, "test": 20}


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    import os

    old = os.environ.get("HWNAS_CACHE")
    os.environ["HWNAS_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    try:
        return load_data("shapes", 32, SMALL)
    finally:
        if old is None:
            os.environ.pop("HWNAS_CACHE")
        else:
            os.environ["HWNAS_CACHE"] = old


def cfg(**kw):
    base = dict(space="tiny", image_size=32, steps=6, batch_size=8, ckpt_every=2)
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

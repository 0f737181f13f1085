"""Issue 13, one test per defect class: numbers checked at the boundary, diverged training never
saved, resumed training refused under other settings, malformed checkpoints and data refused
in one line, outputs that honour the umask, orphaned temporary files cleaned."""

import argparse
import json
import math
import os
import struct
import zlib

import numpy as np
import pytest

from conftest import class_folders
import torch

from hwnas import argtypes
from hwnas.data import load_data
from hwnas.errors import UserError
from hwnas.fileio import atomic_write_text, clean_orphans
from hwnas.search import SearchResult
from hwnas.train import SupernetScorer, SupernetTrainer, TrainConfig, load_supernet
from hwnas.train.supernet import FORMAT, read_checkpoint




def cfg(**kw):
    base = dict(space="tiny", image_size=32, steps=4, batch_size=8, ckpt_every=2,
                warmup_steps=0, match_steps=0)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, splits):
    out = tmp_path_factory.mktemp("ck") / "good.pt"
    with SupernetTrainer(cfg(steps=2), out, splits, progress=False) as tr:
        tr.run()
    return out


# ---- 2. numbers --------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,flag", [
    (dict(lr=float("nan")), "--lr"), (dict(lr=-1.0), "--lr"), (dict(lr=0.0), "--lr"),
    (dict(lr=float("inf")), "--lr"), (dict(momentum=1.0), "--momentum"),
    (dict(weight_decay=float("nan")), "--weight-decay"), (dict(batch_size=0), "--batch-size"),
    (dict(steps=-3), "--steps"), (dict(seed=-1), "--seed"), (dict(warmup_steps=-1),
                                                             "--warmup-steps"),
    (dict(label_smoothing=1.0), "--label-smoothing")])
def test_train_config_refuses_bad_numbers(kw, flag):
    with pytest.raises(UserError, match=flag):
        cfg(**kw)


def test_diverged_training_is_refused_and_never_saved(tmp_path, splits):
    out = tmp_path / "ck.pt"
    tr = SupernetTrainer(cfg(steps=8, ckpt_every=1, lr=1e30), out, splits, progress=False)
    with pytest.raises(UserError, match="diverged|non-finite"):
        tr.run()
    assert tr.step < 8
    if out.exists():  # what was saved before the divergence is finite (read_checkpoint checks)
        read_checkpoint(out)


def test_checkpoint_with_nan_weights_refused(tmp_path, checkpoint, splits):
    ck = torch.load(checkpoint, weights_only=True)
    name = next(k for k, v in ck["model"].items() if v.is_floating_point())
    ck["model"][name][...] = float("nan")
    bad = tmp_path / "nan.pt"
    torch.save(ck, bad)
    with pytest.raises(UserError, match=f"non-finite.*{name}"):
        load_supernet(bad)
    with pytest.raises(UserError, match="non-finite"):
        SupernetTrainer(cfg(steps=2), bad, splits, progress=False)


def test_scorer_refuses_val_n_zero(checkpoint, splits):
    net, _ = load_supernet(checkpoint)
    with pytest.raises(UserError, match="--val-n"):
        SupernetScorer(net, splits, val_n=0)


def test_search_refuses_infinite_budget(tiny):
    from hwnas.search import RandomSearch

    class Flat:
        def predict_many(self, rows):
            return np.ones(len(rows))

    for budget in (float("inf"), float("nan"), -1.0):
        with pytest.raises(UserError, match="--budget-ms"):
            RandomSearch(tiny, Flat(), None, budget, 4, 0)


def test_argtypes_exit_2_with_one_line(capsys):
    ap = argtypes.OneLineParser(prog="hwnas")
    ap.add_argument("--lr", type=argtypes.positive_float)
    ap.add_argument("--n", type=argtypes.positive_int)
    ap.add_argument("--calibration-n", type=argtypes.nonneg_int)
    ap.add_argument("--span-s", type=argtypes.finite_float(0, 600))
    assert ap.parse_args(["--lr", "0.05", "--n", "3", "--calibration-n", "0",
                          "--span-s", "600"]) == argparse.Namespace(lr=0.05, n=3,
                                                                    calibration_n=0,
                                                                    span_s=600.0)
    for argv, why in ((["--lr", "nan"], "not a finite"), (["--lr", "inf"], "not a finite"),
                      (["--lr", "1e999"], "not a finite"), (["--lr", "-1"], "> 0"),
                      (["--lr", "0"], "> 0"), (["--n", "0"], "positive"),
                      (["--n", "2.5"], "not an integer"), (["--calibration-n", "-5"],
                                                          "zero or more"),
                      (["--span-s", "601"], "≤ 600"), (["--lr", "fast"], "not a number")):
        with pytest.raises(SystemExit) as e:
            ap.parse_args(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and why in err[0] and argv[0] in err[0]


def test_one_line_parser_subcommands():
    ap = argtypes.OneLineParser(prog="hwnas")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--steps", type=argtypes.positive_int, required=True)
    assert isinstance(t, argtypes.OneLineParser)
    for argv in (["train", "--steps", "0"], ["train"], ["nope"]):
        with pytest.raises(SystemExit) as e:
            ap.parse_args(argv)
        assert e.value.code == 2


def test_dumps_strict_refuses_nan_and_names_it():
    assert json.loads(argtypes.dumps_strict({"a": [1.5, None]})) == {"a": [1.5, None]}
    for bad, where in (({"loss_ema": float("nan")}, "loss_ema"),
                       ({"x": [{"y": 1.0}, {"y": -math.inf}]}, "x[1].y")):
        with pytest.raises(ValueError, match=where.replace("[", r"\[").replace("]", r"\]")):
            argtypes.dumps_strict(bad)


# ---- 4. resumed training under other settings ----------------------------------------------
@pytest.mark.parametrize("kw,flag", [(dict(lr=0.2), "--lr"), (dict(batch_size=4), "--batch-size"),
                                     (dict(steps=6), "--steps"),
                                     (dict(warmup_steps=1), "--warmup-steps")])
def test_resume_with_other_hyperparameters_refused_fresh_starts_over(tmp_path, splits, kw,
                                                                     flag):
    out = tmp_path / "ck.pt"
    with SupernetTrainer(cfg(), out, splits, progress=False) as tr:
        tr.train_to(2)
    before = out.read_bytes()
    with pytest.raises(UserError, match=f"{flag} .* \\(checkpoint\\) vs .* \\(now\\).*--fresh"):
        SupernetTrainer(cfg(**kw), out, splits, progress=False)
    assert out.read_bytes() == before  # nothing overwritten
    with SupernetTrainer(cfg(**kw, fresh=True), out, splits, progress=False) as tr:
        assert tr.step == 0
        tr.run()
    assert read_checkpoint(out)["meta"]["config"][flag[2:].replace("-", "_")] == kw[
        flag[2:].replace("-", "_")]
    with SupernetTrainer(cfg(**kw), out, splits, progress=False) as tr:  # now it resumes
        assert tr.step == tr.cfg.steps


# ---- 5. malformed inputs: one-line UserErrors -------------------------------------------------
def _edit(checkpoint, tmp_path, fn):
    ck = torch.load(checkpoint, weights_only=True)
    fn(ck)
    out = tmp_path / "edited.pt"
    torch.save(ck, out)
    return out


def test_checkpoint_with_wrong_shape_or_missing_config_refused(tmp_path, checkpoint, splits):
    name = "stem.conv.0.weight"

    def reshape(ck):
        ck["model"][name] = torch.zeros(3, 3)

    bad = _edit(checkpoint, tmp_path, reshape)
    with pytest.raises(UserError, match=f"{name}.*shape"):
        load_supernet(bad)
    with pytest.raises(UserError, match=f"{name}.*shape"):
        SupernetTrainer(cfg(steps=2), bad, splits, progress=False)
    bad = _edit(checkpoint, tmp_path, lambda ck: ck["meta"].pop("config"))
    with pytest.raises(UserError, match="malformed.*'config'"):
        load_supernet(bad)
    bad = _edit(checkpoint, tmp_path, lambda ck: ck["model"].pop(name))
    with pytest.raises(UserError, match=f"{name}.*missing"):
        load_supernet(bad)


def test_checkpoint_folder_and_pickled_objects_named_as_such(tmp_path):
    (tmp_path / "dir.pt").mkdir()
    with pytest.raises(UserError, match="is a folder"):
        load_supernet(tmp_path / "dir.pt")
    with pytest.raises(UserError, match="is a folder"):
        SupernetTrainer(cfg(), tmp_path / "dir.pt", progress=False)
    pickled = tmp_path / "pickled.pt"
    torch.save({"format": FORMAT, "meta": argparse.Namespace(space="tiny")}, pickled)
    with pytest.raises(UserError, match="not a weights-only checkpoint") as e:
        load_supernet(pickled)
    assert "corrupt" not in str(e.value)


def _png_header_only(path, width, height):
    """A PNG that declares `width`×`height` 1-bit pixels and carries one row of data: what a
    decompression bomb looks like to a reader that checks the header."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"\0" * (1 + (width + 7) // 8)))
                     + chunk(b"IEND", b""))


@pytest.mark.parametrize("side", [10_000, 14_000])  # PIL warns above 89.5 Mpx, errs above 2×
def test_decompression_bomb_in_data_refused(tmp_path, side):
    from PIL import Image

    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(4):
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / c / f"{i}.png")
    bomb = tmp_path / "b" / "0.png"
    _png_header_only(bomb, side, side)
    with pytest.raises(UserError, match=f"{bomb.name}.*too large.*decompression bomb"):
        load_data(str(tmp_path), 16)


def test_data_folder_relative_then_absolute_resumes(tmp_path, monkeypatch):
    class_folders(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    c = dict(data="data", image_size=16, batch_size=4)
    with SupernetTrainer(cfg(**c), "ck.pt", progress=False) as tr:
        tr.train_to(2)
    assert read_checkpoint(tmp_path / "ck.pt")["meta"]["data"] == str(tmp_path / "data")
    c["data"] = str(tmp_path / "data" / ".." / "data")
    with SupernetTrainer(cfg(**c), tmp_path / "ck.pt", progress=False) as tr:
        assert tr.step == 2


# ---- 6. file modes and orphans -----------------------------------------------------------------
@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_outputs_honour_the_umask(tmp_path, splits, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "t.json", "{}\n")
        with SupernetTrainer(cfg(steps=1, ckpt_every=1), tmp_path / "ck.pt", splits,
                             progress=False) as tr:
            tr.run()
        res = SearchResult(method="random", space="tiny", budget_ms=1.0, seed=0,
                           best_arch="tiny:0000", predicted_latency_ms=0.5, score=0.5,
                           evaluations=1, evaluated=[["tiny:0000", 0.5, 0.5, 0]])
        res.save(tmp_path / "r.json")
        res.plot(tmp_path / "r.png")
    finally:
        os.umask(old)
    for f in ("t.json", "ck.pt", "r.json", "r.png"):
        assert (tmp_path / f).stat().st_mode & 0o777 == mode, f
    assert not list(tmp_path.glob("*.tmp"))


def test_orphaned_temporary_files_cleaned_on_next_run(tmp_path, splits):
    out = tmp_path / "ck.pt"
    orphans = [tmp_path / "ck.pt.k1ll3d.tmp", tmp_path / "ck.pt.x_y.tmp"]
    keep = [tmp_path / "ck.pt.lock.bak", tmp_path / "other.pt.abc.tmp", tmp_path / "ck.pt2.a.tmp"]
    for p in orphans + keep:
        p.write_bytes(b"half a checkpoint")
    with SupernetTrainer(cfg(steps=1, ckpt_every=1), out, splits, progress=False) as tr:
        assert not any(p.exists() for p in orphans)
        tr.run()
    assert all(p.exists() for p in keep)
    assert clean_orphans(tmp_path / "nothing[*].json") == []


def test_search_cleans_its_orphaned_state_files(tmp_path, tiny):
    from hwnas.search import RandomSearch

    class Flat:
        def predict_many(self, rows):
            return np.ones(len(rows))

    class Zero:
        def predict(self, archs):
            return np.zeros(len(archs))

    state = tmp_path / "s.state.json"
    orphan = tmp_path / "s.state.json.q9z.tmp"
    orphan.write_text('{"half": ')
    RandomSearch(tiny, Flat(), Zero(), 2.0, 4, 0, state_path=state).run()
    assert not orphan.exists() and json.loads(state.read_text())["n_evals"] == 4

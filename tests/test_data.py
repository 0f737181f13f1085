"""Proxy data: the built-in generator and a user's class folders, including bad folders."""

import numpy as np
import pytest
import torch

from hwnas.data import load_data
from hwnas.data.shapes import CLASSES, generate
from hwnas.errors import UserError

SMALL = {"train": 60, "val": 20, "test": 20}


def test_shapes_deterministic_and_balanced():
    x1, y1 = generate(40, 32, seed=0, split=0)
    x2, y2 = generate(40, 32, seed=0, split=0)
    assert x1.shape == (40, 3, 32, 32) and x1.dtype == np.uint8
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    assert np.bincount(y1, minlength=len(CLASSES)).tolist() == [4] * len(CLASSES)
    x3, _ = generate(40, 32, seed=0, split=1)
    assert not np.array_equal(x1, x3)  # splits are different images


def test_builtin_splits_are_fixed_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("HWNAS_CACHE", str(tmp_path))
    a = load_data("shapes", 32, SMALL)
    assert (len(a.train), len(a.val), len(a.test)) == (60, 20, 20)
    assert list(tmp_path.glob("shapes-32-*.npz"))
    b = load_data("shapes", 32, SMALL)  # from the cache
    assert torch.equal(a.val.images, b.val.images) and a.num_classes == 10
    x, y = a.train.batch(np.arange(5))
    assert x.dtype == torch.float32 and x.shape == (5, 3, 32, 32) and y.shape == (5,)


def _write_folder(root, classes=("cat", "dog"), n=10, size=20):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(
                root / c / f"{i}.png")
    return root


def test_folder_loader(tmp_path):
    root = _write_folder(tmp_path / "d")
    d = load_data(str(root), 16)
    assert d.classes == ("cat", "dog")
    assert len(d.train) + len(d.val) + len(d.test) == 20
    assert d.train.images.shape[1:] == (3, 16, 16)
    assert set(d.train.labels.tolist()) == {0, 1}


def test_folder_errors_name_the_problem(tmp_path):
    empty = tmp_path / "empty"
    (empty / "a").mkdir(parents=True)
    with pytest.raises(UserError, match="no images"):
        load_data(str(empty), 16)
    one = _write_folder(tmp_path / "one", classes=("only",))
    with pytest.raises(UserError, match="one class"):
        load_data(str(one), 16)
    bad = _write_folder(tmp_path / "bad")
    (bad / "dog" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="broken.png"):
        load_data(str(bad), 16)
    with pytest.raises(UserError, match="neither"):
        load_data(str(tmp_path / "missing"), 16)

"""Proxy data for supernet training and candidate scoring.

`load_data(spec, image_size)` returns fixed `Splits`: `train` (supernet and stand-alone training),
`val` (the search-validation split SPOS holds out of the training data: candidates are scored on
it, never on test) and `test` (stand-alone accuracy, reported only). `spec` is either ``shapes``
(the built-in offline generator, `hwnas.data.shapes`) or a folder of class sub-folders
(`hwnas.data.folder`).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from hwnas.errors import UserError
from hwnas.fileio import atomic_path

BUILTIN = "shapes"
# sizes of the built-in proxy's splits: 10 classes, balanced
SHAPES_SIZES = {"train": 10000, "val": 1000, "test": 2000}


@dataclass
class Split:
    """Images uint8 [N, 3, S, S] and labels int64 [N]."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, idx: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised float [B, 3, S, S] and labels [B] for the given indices."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        return to_float(self.images[idx]), self.labels[idx]

    def images_from(self, k: int) -> "Split":
        """The split without its first `k` images."""
        return Split(self.images[k:], self.labels[k:])


def to_float(images: torch.Tensor) -> torch.Tensor:
    # fixed normalisation (not dataset statistics) so a user's folder and the proxy match
    return (images.float() / 255.0 - 0.5) / 0.25


@dataclass
class Splits:
    train: Split
    val: Split
    test: Split
    classes: tuple[str, ...]
    spec: str
    image_size: int
    _fingerprint: str | None = field(default=None, repr=False, compare=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def fingerprint(self) -> str:
        """SHA-256 of the content (classes, image size, every split's pixels and labels): what
        a result scored on this data depends on, whatever path or name it was loaded by."""
        if self._fingerprint is None:
            h = hashlib.sha256(repr((self.classes, self.image_size)).encode())
            for split in (self.train, self.val, self.test):
                for t in (split.images, split.labels):
                    h.update(repr((t.dtype, tuple(t.shape))).encode())
                    h.update(t.contiguous().numpy().tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def describe(self) -> str:
        return (f"{self.spec}: {len(self.classes)} classes, {self.image_size}x{self.image_size}, "
                f"train {len(self.train)} / val {len(self.val)} / test {len(self.test)}")


def cache_dir() -> Path:
    return Path(os.environ.get("HWNAS_CACHE", Path.home() / ".cache" / "hwnas"))


def _shapes(image_size: int, sizes: dict[str, int], seed: int = 0) -> Splits:
    from hwnas.data.shapes import CLASSES, generate

    tag = hashlib.sha1(repr((image_size, sorted(sizes.items()), seed,
                             Path(__file__).with_name("shapes.py").read_bytes())).encode())
    path = cache_dir() / f"shapes-{image_size}-{tag.hexdigest()[:12]}.npz"
    arrays: dict[str, np.ndarray] = {}
    if path.is_file():
        try:
            with np.load(path) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError):  # a damaged cache is regenerated, never trusted
            arrays = {}
    if not arrays:
        for i, (name, n) in enumerate(sizes.items()):
            arrays[f"{name}_x"], arrays[f"{name}_y"] = generate(n, image_size, seed, split=i)
        try:
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                np.savez(f, **arrays)
        except OSError:
            pass  # a read-only home only costs regeneration next time
    split = {k: Split(torch.from_numpy(arrays[f"{k}_x"]), torch.from_numpy(arrays[f"{k}_y"]))
             for k in sizes}
    return Splits(split["train"], split["val"], split["test"], CLASSES, BUILTIN, image_size)


def load_data(spec: str, image_size: int = 64, sizes: dict[str, int] | None = None) -> Splits:
    """The proxy task named by `spec` at `image_size`×`image_size` (see module docstring)."""
    if spec == BUILTIN:
        return _shapes(image_size, dict(sizes or SHAPES_SIZES))
    from hwnas.data.folder import load_folder

    path = Path(spec)
    if not path.exists():
        raise UserError(f"data {spec!r} is neither the built-in proxy {BUILTIN!r} nor an existing "
                        "folder; pass --data shapes or a folder with one sub-folder per class")
    return load_folder(path, image_size)


__all__ = ["BUILTIN", "Split", "Splits", "load_data", "to_float"]

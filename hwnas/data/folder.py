"""A user's image-classification data: one sub-folder per class, images inside.

Every image is read once (Pillow), converted to RGB and resized to a square; the fixed split is a
per-class seeded permutation: 70% train, 15% search-validation, 15% test (at least one image of
each class in train). Bad folders are `UserError`s naming the folder or file.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from hwnas.errors import UserError, first_line

EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
FRACTIONS = (0.70, 0.15, 0.15)  # train, val, test


def load_folder(root: Path, image_size: int, seed: int = 0):
    from PIL import Image, UnidentifiedImageError

    from hwnas.data import Split, Splits

    if not root.is_dir():
        raise UserError(f"data {str(root)!r} is not a folder; give a folder with one sub-folder "
                        "per class")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    files = {d.name: sorted(f for f in d.rglob("*") if f.is_file()
                            and f.suffix.lower() in EXTENSIONS) for d in class_dirs}
    files = {k: v for k, v in files.items() if v}
    if not files:
        raise UserError(f"data folder {str(root)!r} has no images in class sub-folders "
                        f"(looked for {', '.join(sorted(EXTENSIONS))} files in "
                        f"{root}/<class>/)")
    if len(files) < 2:
        raise UserError(f"data folder {str(root)!r} has images for one class only "
                        f"({next(iter(files))!r}); classification needs at least two class "
                        "sub-folders")
    classes = tuple(files)
    few = [k for k, v in files.items() if len(v) < 4]
    if few:
        raise UserError(f"class folder {str(root / few[0])!r} has {len(files[few[0]])} images; "
                        "each class needs at least 4 (train, search-validation and test splits)")
    rng = np.random.default_rng(seed)
    parts: list[list[tuple[Path, int]]] = [[], [], []]
    for label, name in enumerate(classes):
        paths = files[name]
        order = rng.permutation(len(paths))
        n_val = int(round(FRACTIONS[1] * len(paths)))
        n_test = int(round(FRACTIONS[2] * len(paths)))
        n_train = max(1, len(paths) - n_val - n_test)
        cuts = (n_train, n_train + n_val)
        for j, i in enumerate(order):
            parts[0 if j < cuts[0] else 1 if j < cuts[1] else 2].append((paths[i], label))

    def read(items: list[tuple[Path, int]]) -> Split:
        x = np.zeros((len(items), 3, image_size, image_size), np.uint8)
        for i, (p, _) in enumerate(items):
            try:
                # Pillow only warns between MAX_IMAGE_PIXELS and twice that, and would then
                # decode gigabytes; an image that large is refused like the larger ones
                with warnings.catch_warnings():
                    warnings.simplefilter("error", Image.DecompressionBombWarning)
                    with Image.open(p) as im:
                        im = im.convert("RGB").resize((image_size, image_size), Image.BILINEAR)
                        x[i] = np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
                raise UserError(f"image {str(p)!r} is too large to decode safely ("
                                f"{first_line(e)}); it may be a decompression bomb — shrink "
                                "or remove the file") from None
            except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
                raise UserError(f"cannot read image {str(p)!r} ({type(e).__name__}: "
                                f"{first_line(e)}); fix or remove the file") from None
        return Split(torch.from_numpy(x), torch.tensor([y for _, y in items], dtype=torch.long))

    # the resolved path is the spec: a checkpoint names its data the same way whichever form
    # (relative, absolute, through a link) the user typed, and a search run elsewhere finds it
    return Splits(read(parts[0]), read(parts[1]), read(parts[2]), classes, str(root.resolve()),
                  image_size)

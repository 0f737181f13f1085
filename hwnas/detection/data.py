"""Detection data in COCO format: the offline `shapes-det` generator and a loader for any
COCO-format dataset.

**shapes-det** (`generate_shapes_det`, seeded, numpy + PIL only, nothing downloaded): 128×128 RGB
images, each with 2–5 objects of four classes — rectangle, ellipse, triangle, cross — filled with
a solid colour or a two-colour stripe/checker texture, on a textured background (a random grating)
with clutter (random line segments and small dots that are not objects) and pixel noise. Object
sizes span COCO's three area ranges: of the boxes, ~50% are small (< 32² px), ~45% medium and
~6% large (> 96² px; one image in five has one). Objects are drawn largest first, and a
placement is rejected if it would hide more than half of an earlier object's box, so there is
partial occlusion but every object stays identifiable; a box is the tight extent of the object's
full (amodal) shape.

Why 128×128: on 2 CPU cores the detector's cost is dominated by its FPN + FCOS head, which scales
with the number of P3 locations (16×16 at 128 px, 40×40 at 320 px), so 128 px trains ~6× faster
than 320 px while still holding objects from 8 px to 120 px; smaller images (64 px) would not
fit COCO's "large" range (> 96² px) at all.

Splits are fixed: image `i` of split `s` is a pure function of (seed, s, i). The dataset is
cached (default ``$HWNAS_CACHE/shapes-det-<tag>``, ``~/.cache/hwnas`` when unset) and generated
only when missing; it is written to a temporary folder that is renamed into place when complete,
so a killed generation never leaves a half dataset behind.

**Layout of a COCO-format folder** (what `load_coco` reads, and what the generator writes)::

    DIR/annotations/instances_{split}.json     (also DIR/instances_{split}.json)
    DIR/{split}/<file_name>                    (also DIR/{split}2017/, DIR/images/, DIR/)

**Pre-processing (part of the deployable contract; the exported ONNX expects exactly this):**
RGB; *letterbox* to S×S — scale by ``r = S / max(width, height)`` (bilinear, PIL), place at the
top-left corner, pad right/bottom with grey 128; then ``x = (pixel / 255 − 0.5) / 0.25`` per
channel (`hwnas.data.to_float`, the same normalisation as the classification proxy), NCHW float32.
Boxes in network-input pixels are ``r ×`` original boxes; detections map back by ``/ r``. An image
already S×S (as shapes-det) is untouched but normalised.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from hwnas.data import cache_dir, to_float
from hwnas.errors import UserError

from hwnas.detection.config import BUILTIN  # noqa: E402
CLASSES = ("rectangle", "ellipse", "triangle", "cross")
SIZES = {"train": 3000, "val": 300, "test": 300}
IMAGE_SIZE = 128
PAD_VALUE = 128  # letterbox padding (grey: 0 after normalisation)
GENERATOR_VERSION = 1  # bump when render_image changes its pixels or boxes
_SPLIT_INDEX = {"train": 0, "val": 1, "test": 2}


# ---- the generator ----------------------------------------------------------------------------
def _object_side(rng: np.random.Generator, allow_large: bool, s: int) -> float:
    """A square-equivalent side in pixels from a mixture over COCO's area ranges (at s = 128;
    other image sizes scale the ranges by s / 128)."""
    k = s / IMAGE_SIZE
    u = rng.random()
    if allow_large and u < 0.2:
        return rng.uniform(100 * k, 0.92 * s)  # large: area > 96² px even at aspect 0.7
    if u < 0.55:
        return rng.uniform(10 * k, 29 * k)  # small: area < 32² px
    return rng.uniform(36 * k, 88 * k)  # medium


def _shape_mask(cls: int, box: tuple[int, int, int, int], s: int,
                rng: np.random.Generator) -> np.ndarray:
    """Boolean [s, s] mask of class `cls` drawn inside the integer box (x0, y0, x1, y1)."""
    img = Image.new("L", (s, s), 0)
    d = ImageDraw.Draw(img)
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    name = CLASSES[cls]
    if name == "rectangle":
        d.rectangle((x0, y0, x1 - 1, y1 - 1), fill=255)
    elif name == "ellipse":
        d.ellipse((x0, y0, x1 - 1, y1 - 1), fill=255)
    elif name == "triangle":  # apex on one side's middle, base on the opposite side
        side = int(rng.integers(4))
        pts = [((x0 + x1 - 1) / 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)]
        if side == 1:
            pts = [((x0 + x1 - 1) / 2, y1 - 1), (x0, y0), (x1 - 1, y0)]
        elif side == 2:
            pts = [(x0, (y0 + y1 - 1) / 2), (x1 - 1, y0), (x1 - 1, y1 - 1)]
        elif side == 3:
            pts = [(x1 - 1, (y0 + y1 - 1) / 2), (x0, y0), (x0, y1 - 1)]
        d.polygon(pts, fill=255)
    else:  # cross: a horizontal and a vertical bar through the centre
        t = rng.uniform(0.28, 0.42)
        aw, ah = max(2, round(w * t)), max(2, round(h * t))
        cx, cy = x0 + (w - aw) // 2, y0 + (h - ah) // 2
        d.rectangle((x0, cy, x1 - 1, cy + ah - 1), fill=255)
        d.rectangle((cx, y0, cx + aw - 1, y1 - 1), fill=255)
    return np.asarray(img) > 127


def _fill(rng: np.random.Generator, s: int, bg_mean: np.ndarray) -> np.ndarray:
    """A float [s, s, 3] fill: solid, or two-colour stripes/checker; contrasted to `bg_mean`."""
    def colour() -> np.ndarray:
        for _ in range(20):
            c = rng.uniform(0, 1, 3)
            if np.abs(c - bg_mean).mean() > 0.3:
                return c
        return 1.0 - bg_mean
    a = colour()
    if rng.random() < 0.5:
        return np.broadcast_to(a, (s, s, 3))
    b = colour()
    yy, xx = np.mgrid[0:s, 0:s]
    period = rng.integers(3, 8)
    if rng.random() < 0.5:
        ang = rng.uniform(0, np.pi)
        on = (np.floor((xx * np.cos(ang) + yy * np.sin(ang)) / period) % 2).astype(bool)
    else:
        on = ((xx // period + yy // period) % 2).astype(bool)
    return np.where(on[..., None], a, b)


def render_image(seed: int, split: int, index: int, s: int = IMAGE_SIZE,
                 ) -> tuple[np.ndarray, list[tuple[int, list[int]]]]:
    """Image uint8 [s, s, 3] and its objects as (class index, [x0, y0, x1, y1] pixel box)."""
    rng = np.random.default_rng([seed, split, index])
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    bg = rng.uniform(0.05, 0.6, 3)
    ori, freq = rng.uniform(0, np.pi), rng.uniform(0.1, 0.5)
    wave = np.sin(freq * (xx * np.cos(ori) + yy * np.sin(ori)) + rng.uniform(0, 2 * np.pi))
    img = bg + rng.uniform(0.03, 0.1) * wave[..., None]
    clutter = Image.new("RGB", (s, s))
    cmask = Image.new("L", (s, s), 0)
    dc, dm = ImageDraw.Draw(clutter), ImageDraw.Draw(cmask)
    for _ in range(int(rng.integers(3, 9))):  # lines and dots: texture, not objects
        col = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.6:
            pts = [tuple(rng.uniform(0, s, 2)) for _ in range(2)]
            wid = int(rng.integers(1, 3))
            dc.line(pts, fill=col, width=wid)
            dm.line(pts, fill=255, width=wid)
        else:
            cx, cy, r = *rng.uniform(0, s, 2), rng.uniform(1, 3)
            dc.ellipse((cx - r, cy - r, cx + r, cy + r), fill=col)
            dm.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    cm = np.asarray(cmask)[..., None] > 127
    img = np.where(cm, np.asarray(clutter) / 255.0, img)

    n = int(rng.integers(2, 6))
    sides = sorted((_object_side(rng, i == 0, s) for i in range(n)), reverse=True)
    objects: list[tuple[int, list[int]]] = []
    cover = np.zeros((0, s, s), bool)  # per earlier object: its box pixels still visible
    for side in sides:
        for _ in range(30):  # bounded placement tries
            aspect = rng.uniform(0.7, 1.4)
            w = int(np.clip(round(side * np.sqrt(aspect)), 8, s - 2))
            h = int(np.clip(round(side / np.sqrt(aspect)), 8, s - 2))
            x0, y0 = int(rng.integers(0, s - w + 1)), int(rng.integers(0, s - h + 1))
            new = np.zeros((s, s), bool)
            new[y0:y0 + h, x0:x0 + w] = True
            if len(objects):
                areas = np.array([(b[2] - b[0]) * (b[3] - b[1]) for _, b in objects])
                visible = (cover & ~new).sum((1, 2))
                if (visible < 0.5 * areas).any():
                    continue
            cls = int(rng.integers(len(CLASSES)))
            mask = _shape_mask(cls, (x0, y0, x0 + w, y0 + h), s, rng)
            ys, xs = np.nonzero(mask)
            img = np.where(mask[..., None], _fill(rng, s, bg), img)
            objects.append((cls, [int(xs.min()), int(ys.min()), int(xs.max()) + 1,
                                  int(ys.max()) + 1]))
            cover = np.concatenate([cover & ~new, new[None]])
            break
    img = img + rng.normal(0, rng.uniform(0.01, 0.04), img.shape)
    return np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8), objects


def _generator_tag(seed: int, sizes: dict[str, int], s: int) -> str:
    return hashlib.sha1(repr((seed, sorted(sizes.items()), s, GENERATOR_VERSION)).encode()
                        ).hexdigest()[:12]


def generate_shapes_det(root: str | Path | None = None, seed: int = 0,
                        sizes: dict[str, int] | None = None, image_size: int = IMAGE_SIZE,
                        ) -> Path:
    """Write shapes-det to `root` (default: the cache) unless it is already there; its path.

    A `root` that exists but holds another generation (other seed, sizes or generator version)
    is refused, never overwritten.
    """
    sizes = dict(sizes or SIZES)
    tag = _generator_tag(seed, sizes, image_size)
    root = Path(root) if root is not None else cache_dir() / f"{BUILTIN}-{tag}"
    meta = {"generator": BUILTIN, "tag": tag, "seed": seed, "sizes": sizes,
            "image_size": image_size, "classes": list(CLASSES)}
    stamp = root / "shapes-det.json"
    if root.exists():
        try:
            old = json.loads(stamp.read_text())
        except (OSError, ValueError):
            old = None
        if old == meta:
            return root
        raise UserError(f"{str(root)!r} exists but is not this shapes-det generation (seed "
                        f"{seed}, sizes {sizes}); pass another folder or remove it")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=root.name + ".", suffix=".tmp", dir=root.parent))
    try:
        (tmp / "annotations").mkdir()
        categories = [{"id": i + 1, "name": n, "supercategory": "shape"}
                      for i, n in enumerate(CLASSES)]
        for split, n in sizes.items():
            (tmp / split).mkdir()
            images, anns = [], []
            for i in range(n):
                img, objects = render_image(seed, _SPLIT_INDEX[split], i, image_size)
                name = f"{i:06d}.png"
                Image.fromarray(img).save(tmp / split / name)
                images.append({"id": i + 1, "file_name": name, "width": image_size,
                               "height": image_size})
                for cls, (x0, y0, x1, y1) in objects:
                    anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cls + 1,
                                 "bbox": [x0, y0, x1 - x0, y1 - y0],
                                 "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
            (tmp / "annotations" / f"instances_{split}.json").write_text(json.dumps(
                {"images": images, "annotations": anns, "categories": categories}))
        (tmp / "shapes-det.json").write_text(json.dumps(meta))
        os.replace(tmp, root)  # the folder appears only complete
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


# ---- the loader -------------------------------------------------------------------------------
def letterbox(img: Image.Image, size: int) -> tuple[torch.Tensor, tuple[float, float]]:
    """uint8 [3, size, size] and the (x, y) scale from original to network-input pixels."""
    w, h = img.size
    r = size / max(w, h)
    nw, nh = max(1, round(w * r)), max(1, round(h * r))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BILINEAR)
    canvas = np.full((size, size, 3), PAD_VALUE, np.uint8)
    canvas[:nh, :nw] = np.asarray(img)
    return torch.from_numpy(canvas).permute(2, 0, 1).contiguous(), (nw / w, nh / h)


@dataclass
class CocoSplit:
    """One split of a COCO-format dataset, letterboxed to `image_size`.

    `classes[k]` is the name of contiguous label k, whose COCO category id is `cat_ids[k]`.
    Decoded images are kept in memory (uint8), which suits datasets of a few thousand images.
    """

    ann_file: Path
    image_dir: Path
    image_size: int
    image_ids: list[int]
    files: list[str]
    boxes: list[np.ndarray]  # per image [K, 4] xyxy, original pixels
    labels: list[np.ndarray]  # per image [K] contiguous label
    cat_ids: list[int]
    classes: list[str]
    _cache: dict[int, tuple[torch.Tensor, tuple[float, float]]] = field(default_factory=dict,
                                                                         repr=False)

    def __len__(self) -> int:
        return len(self.image_ids)

    def images_from(self, k: int) -> "CocoSplit":
        """The split without its first `k` images (the annotation file is shared; evaluation
        reads only `image_ids`)."""
        return replace(self, image_ids=self.image_ids[k:], files=self.files[k:],
                       boxes=self.boxes[k:], labels=self.labels[k:], _cache={})

    @property
    def num_classes(self) -> int:
        return len(self.cat_ids)

    def image(self, i: int) -> tuple[torch.Tensor, tuple[float, float]]:
        """uint8 [3, S, S] letterboxed image `i` and its (x, y) scale."""
        if i not in self._cache:
            path = self.image_dir / self.files[i]
            try:
                with Image.open(path) as im:
                    im = im.convert("RGB")
                    self._cache[i] = letterbox(im, self.image_size)
            except FileNotFoundError:
                raise UserError(f"{self.ann_file}: image id {self.image_ids[i]}: file "
                                f"{str(path)!r} is missing; restore it or remove the entry"
                                ) from None
            except (OSError, ValueError, SyntaxError) as e:
                raise UserError(f"{self.ann_file}: image id {self.image_ids[i]}: file "
                                f"{str(path)!r} is not a readable image ({type(e).__name__}); "
                                "replace it or remove the entry") from None
        return self._cache[i]

    def target(self, i: int) -> dict[str, torch.Tensor]:
        """boxes [K, 4] float32 xyxy in network-input pixels, labels [K] int64."""
        _, (sx, sy) = self.image(i)
        boxes = torch.from_numpy(self.boxes[i]).float() * torch.tensor([sx, sy, sx, sy])
        return {"boxes": boxes, "labels": torch.from_numpy(self.labels[i]).long()}

    def batch(self, idx, hflip: np.ndarray | None = None, vflip: np.ndarray | None = None,
              ) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
        """Normalised float [B, 3, S, S] and targets; `hflip[b]` / `vflip[b]` mirror image b
        (and its boxes) left-right / top-bottom."""
        s = self.image_size
        xs, ts = [], []
        for b, i in enumerate(idx):
            x, t = self.image(int(i))[0], self.target(int(i))
            bx = t["boxes"]
            if hflip is not None and hflip[b]:
                x = x.flip(2)
                bx = torch.stack([s - bx[:, 2], bx[:, 1], s - bx[:, 0], bx[:, 3]], 1)
            if vflip is not None and vflip[b]:
                x = x.flip(1)
                bx = torch.stack([bx[:, 0], s - bx[:, 3], bx[:, 2], s - bx[:, 1]], 1)
            t["boxes"] = bx
            xs.append(x)
            ts.append(t)
        return to_float(torch.stack(xs)), ts

    def check_images(self) -> None:
        """Decode every image now (a `UserError` names the first bad one)."""
        for i in range(len(self)):
            self.image(i)


def _find(root: Path, split: str) -> tuple[Path, Path]:
    """The annotation file and the image folder of `split` (layout in the module doc)."""
    for ann in (root / "annotations" / f"instances_{split}.json",
                root / f"instances_{split}.json",
                root / "annotations" / f"instances_{split}2017.json"):
        if ann.is_file():
            break
    else:
        raise UserError(f"no annotation file for split {split!r} in {str(root)!r}: expected "
                        f"annotations/instances_{split}.json (COCO format)")
    for d in (root / split, root / f"{split}2017", root / "images"):
        if d.is_dir():
            return ann, d
    return ann, root


def _bad(ann: Path, what: str) -> UserError:
    return UserError(f"{ann}: {what}; fix the annotation file (COCO format)")


def load_coco(root: str | Path, split: str, image_size: int = IMAGE_SIZE) -> CocoSplit:
    """Read and check split `split` of the COCO-format dataset in `root` (layout: module doc).

    Crowd annotations (``iscrowd: 1``) are skipped, as torchvision's detection references do.
    Images are checked when first decoded (`CocoSplit.check_images` checks them all at once).
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"data {str(root)!r} is not a folder; pass --data {BUILTIN} or a "
                        "COCO-format folder (annotations/instances_<split>.json + images)")
    ann, image_dir = _find(root, split)
    try:
        data = json.loads(ann.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise _bad(ann, f"not valid JSON ({type(e).__name__})") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list)
                                             for k in ("images", "annotations", "categories")):
        raise _bad(ann, "needs the lists 'images', 'annotations' and 'categories'")
    if not data["images"]:
        raise _bad(ann, "has no images")
    if not data["categories"]:
        raise _bad(ann, "has no categories")
    try:
        cats = sorted((int(c["id"]), str(c["name"])) for c in data["categories"])
    except (KeyError, TypeError, ValueError):
        raise _bad(ann, "a category lacks an integer 'id' or a 'name'") from None
    label_of = {cid: k for k, (cid, _) in enumerate(cats)}
    index: dict[int, int] = {}
    ids, files, sizes = [], [], []
    for e in data["images"]:
        try:
            iid, fname = int(e["id"]), str(e["file_name"])
            w, h = int(e["width"]), int(e["height"])
        except (KeyError, TypeError, ValueError):
            raise _bad(ann, f"image entry {str(e)[:80]} lacks id/file_name/width/height") from None
        if iid in index or w <= 0 or h <= 0:
            raise _bad(ann, f"image id {iid}: duplicate id or non-positive size")
        index[iid] = len(ids)
        ids.append(iid)
        files.append(fname)
        sizes.append((w, h))
    boxes: list[list[list[float]]] = [[] for _ in ids]
    labels: list[list[int]] = [[] for _ in ids]
    for a in data["annotations"]:
        try:
            aid, iid, cid = a.get("id"), int(a["image_id"]), int(a["category_id"])
            x, y, w, h = (float(v) for v in a["bbox"])
        except (KeyError, TypeError, ValueError, AttributeError):
            raise _bad(ann, f"annotation {str(a)[:80]} lacks image_id/category_id/"
                       "bbox [x, y, w, h]") from None
        if a.get("iscrowd", 0):
            continue
        if iid not in index:
            raise _bad(ann, f"annotation id {aid}: unknown image_id {iid}")
        if cid not in label_of:
            raise _bad(ann, f"annotation id {aid}: unknown category_id {cid} (categories: "
                       f"{', '.join(str(c) for c, _ in cats)})")
        if not (w > 0 and h > 0 and np.isfinite([x, y, w, h]).all()):
            raise _bad(ann, f"annotation id {aid}: degenerate box {[x, y, w, h]} (width and "
                       "height must be positive)")
        iw, ih = sizes[index[iid]]
        eps = 1e-3
        if x < -eps or y < -eps or x + w > iw + eps or y + h > ih + eps:
            raise _bad(ann, f"annotation id {aid}: box {[x, y, w, h]} lies outside image "
                       f"{iid} ({iw}×{ih})")
        boxes[index[iid]].append([x, y, x + w, y + h])
        labels[index[iid]].append(label_of[cid])
    return CocoSplit(ann, image_dir, image_size, ids, files,
                     [np.asarray(b, np.float32).reshape(-1, 4) for b in boxes],
                     [np.asarray(lab, np.int64) for lab in labels],
                     [c for c, _ in cats], [n for _, n in cats])


def resolve_data(spec: str, seed: int = 0) -> Path:
    """`shapes-det` (generated into the cache if missing) or a COCO-format folder."""
    if spec == BUILTIN:
        return generate_shapes_det(seed=seed)
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise UserError(f"data {spec!r} is neither {BUILTIN!r} nor a folder; pass --data "
                        f"{BUILTIN} or a COCO-format folder")
    return path

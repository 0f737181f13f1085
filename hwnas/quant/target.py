"""What is quantised: a trained model of a candidate, its real data, and its metric.

Two kinds of checkpoint:

- a **classifier** (``hwnas-classifier/1``, `save_classifier`): a stand-alone candidate of a
  ShuffleNet space trained on proxy data (`hwnas.train.evaluate.train_standalone`;
  `tools/train_classifier.py`); its metric is top-1 on the proxy's test split. It may be a
  narrower, smaller-input copy of the priced candidate (det20-w0.25 @ 64 px for det20 @ 320), as
  the search's supernet is: the layers and choices are the same, so the units are too;
- a **detector** (``hwnas-detector/1``, `hwnas detect train`): the FCOS detector of a detector
  space's candidate; its metric is COCO AP (pycocotools) on its data.

A `Target` exports the trained model (`export`), gives real training batches (for the Hessian),
real calibration inputs (for the quantiser), the loss (for the Hessian), the torch module of
each unit, and the metric of a realised ONNX file. `matches_priced` says whether the trained
model *is* the priced model (same space, width and input): then the realised file itself is
timed; otherwise its latency twin (the priced candidate with the same assignment, realised the
same way) is, since onnxruntime's CPU latency does not depend on weight values.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from hwnas.errors import UserError
from hwnas.fileio import atomic_path
from hwnas.spaces import get_space
from hwnas.spaces.base import Arch, SearchSpace, Shape

CLASSIFIER_FORMAT = "hwnas-classifier/1"


def save_classifier(path: Path, space: SearchSpace, arch: Arch, image_size: int, data: str,
                    classes: tuple[str, ...], model: nn.Module, meta: dict | None = None) -> None:
    """Write a stand-alone classifier checkpoint atomically."""
    with atomic_path(Path(path)) as tmp:
        torch.save({"format": CLASSIFIER_FORMAT,
                    "meta": {"space": space.name, "arch": str(arch), "image_size": image_size,
                             "data": data, "classes": list(classes), **(meta or {})},
                    "model": model.state_dict()}, tmp)


def _read(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {str(path)!r} does not exist; train a classifier with "
                        "`python tools/train_classifier.py` or a detector with `hwnas detect "
                        "train`")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and torch errors have no common base
        raise UserError(f"checkpoint {str(path)!r} is corrupt or not a weights-only torch file "
                        f"({type(e).__name__})") from None
    if not isinstance(ck, dict) or ck.get("format") not in (CLASSIFIER_FORMAT,
                                                            "hwnas-detector/1"):
        raise UserError(f"{str(path)!r} is neither a classifier checkpoint "
                        f"({CLASSIFIER_FORMAT}) nor a detector checkpoint (hwnas-detector/1)")
    return ck


def _load_state(model: nn.Module, state: dict, path: Path, what: str) -> None:
    own = model.state_dict()
    bad = ([k for k in own if k not in state] + [k for k in state if k not in own]
           + [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)])
    if bad:
        raise UserError(f"checkpoint {str(path)!r} does not match {what}: tensor {bad[0]!r} is "
                        "missing, unexpected or of another shape; give the checkpoint of that "
                        "candidate")
    model.load_state_dict(state)


@dataclass
class Target:
    """A trained model to quantise (see the module docstring)."""

    kind: str  # "classifier" | "detector"
    ckpt: Path
    space: SearchSpace  # the priced space
    arch: Arch  # in the priced space
    module: nn.Module  # the trained model as exported (eval mode)
    input_shape: Shape  # of `module`
    unit_modules: list[nn.Module | None]  # per unit of the priced candidate (None: not quantised)
    metric_name: str
    data: str
    _loss: Callable[[nn.Module, object], torch.Tensor]
    _batch: Callable[[np.ndarray], object]
    _train_len: int
    _images: Callable[[np.ndarray], torch.Tensor]
    _evaluate: Callable[[Path, object], float]  # (ONNX file, a split of `split`) -> metric
    _split: Callable[[str, int | None], object]  # see `split`
    matches_priced: bool

    def export(self, path: Path) -> Path:
        from hwnas.export import export_onnx

        if self.kind == "detector":
            from hwnas.detection.export import export_detector

            export_detector(self.module.det, path)
            return Path(path)
        return export_onnx(self.module, self.input_shape, path)

    def batches(self, n: int, batch_size: int, seed: int) -> list:
        """`n` real training batches (fixed by `seed`)."""
        rng = np.random.default_rng([seed, 11])
        return [self._batch(rng.choice(self._train_len, min(batch_size, self._train_len),
                                       replace=False)) for _ in range(n)]

    def loss(self, batch) -> torch.Tensor:
        return self._loss(self.module, batch)

    def calibration_feeds(self, n: int, seed: int, shape: Shape | None = None
                          ) -> list[dict[str, np.ndarray]]:
        """`n` real training images as quantiser feeds (``{"input": [1, 3, S, S]}``), resized
        to `shape` if given (for a latency twin of another input size)."""
        rng = np.random.default_rng([seed, 13])
        idx = rng.choice(self._train_len, min(n, self._train_len), replace=False)
        x = self._images(idx)  # [n, 3, S, S] normalised
        if shape is not None and tuple(x.shape[2:]) != tuple(shape[2:]):
            x = nn.functional.interpolate(x, size=tuple(shape[2:]), mode="bilinear",
                                          align_corners=False)
        return [{"input": x[i:i + 1].numpy().astype(np.float32)} for i in range(len(x))]

    def split(self, name: str, n: int | None = None):
        """The data's split `name` (a proxy `Split`, or the detector's COCO split); with `n`,
        that split of the built-in generated data drawn with `n` images instead (the same
        generator and the split's own seed, so disjoint from the other splits), for metric
        differences below the standard split's noise; a `UserError` for other data."""
        self.check_draw(name, n)
        return self._split(name, n)

    def check_draw(self, name: str, n: int | None) -> None:
        """A `UserError` (one line) unless `split(name, n)` can be drawn."""
        if n is not None and self.data not in ("shapes", "shapes-det"):
            raise UserError(f"{n} {name} images need the built-in generated data; the "
                            f"checkpoint's data is {self.data!r}: leave the image count out")

    def evaluate(self, onnx_path: Path, split: str = "test", n: int | None = None) -> float:
        """The metric (top-1 in [0, 1], or COCO AP) of an ONNX file of this model on `split`
        (`n`: see `split`)."""
        return self.metric(onnx_path, self.split(split, n))

    def metric(self, onnx_path: Path, data) -> float:
        """The metric of an ONNX file of this model on `data`, a split from `split` (loaded
        once for many files)."""
        return self._evaluate(Path(onnx_path), data)

    def identity(self) -> dict:
        h = hashlib.sha256(Path(self.ckpt).read_bytes()).hexdigest()
        return {"ckpt": str(self.ckpt), "ckpt_sha256": h, "kind": self.kind,
                "space": self.space.name, "arch": str(self.arch), "data": self.data}


def load_target(ckpt: Path, space: SearchSpace, arch: Arch, input_shape: Shape,
                data: str | None = None) -> Target:
    """The trained model in `ckpt`, checked against the priced `space`/`arch`: a `UserError`
    (one line) when the checkpoint is for another candidate, width, or kind of model."""
    from hwnas.detection.space import DetectorSpace

    ck = _read(ckpt)
    if ck["format"] == CLASSIFIER_FORMAT:
        if isinstance(space, DetectorSpace):
            raise UserError(f"checkpoint {str(ckpt)!r} is a classifier; space {space.name} is a "
                            "detector space: give a detector checkpoint (`hwnas detect train`)")
        return _classifier(Path(ckpt), ck, space, arch, tuple(input_shape), data)
    if not isinstance(space, DetectorSpace):
        raise UserError(f"checkpoint {str(ckpt)!r} is a detector; space {space.name} is not a "
                        "detector space (use e.g. det20-fcos-w0.5)")
    return _detector(Path(ckpt), ck, space, arch, tuple(input_shape), data)


def _check_arch(ckpt: Path, space: SearchSpace, arch: Arch, ck_space: str, ck_arch: str) -> Arch:
    from hwnas.train.supernet import base_name

    own = get_space(ck_space)
    base = getattr(space, "backbone", space)  # a detector space prices its backbone's archs
    if base_name(own.name) != base_name(base.name):
        raise UserError(f"checkpoint {str(ckpt)!r} is a {own.name} model, not one of "
                        f"{space.name}'s candidates; give a checkpoint of that space")
    theirs = own.parse(ck_arch) if ck_arch.startswith(own.name + ":") else (
        get_space(ck_arch.rpartition(":")[0]).parse(ck_arch))
    if theirs.choices != arch.choices:
        raise UserError(f"checkpoint {str(ckpt)!r} holds arch {ck_arch}, not {arch}; give the "
                        "checkpoint of that arch (or pass --arch " + ck_arch + ")")
    return Arch(own.name, theirs.choices)


def _classifier(ckpt, ck, space, arch, input_shape, data) -> Target:
    from hwnas.data import load_data
    from hwnas.train.supernet import build_standalone

    meta = ck["meta"]
    own_arch = _check_arch(ckpt, space, arch, meta["space"], meta["arch"])
    own = get_space(meta["space"])
    size, classes = int(meta["image_size"]), list(meta["classes"])
    model = build_standalone(own, own_arch, size, len(classes))
    _load_state(model, ck["model"], ckpt, f"{own.name} {own_arch} with {len(classes)} classes")
    model.eval()
    spec = data or meta["data"]
    splits = load_data(spec, size)
    if list(splits.classes) != classes:
        raise UserError(f"the data's classes {list(splits.classes)} are not the checkpoint's "
                        f"{classes}; evaluate on the data it was trained on")

    def loss(m, batch):
        x, y = batch
        return nn.functional.cross_entropy(m(x), y)

    def split(name: str, n: int | None):
        if n is None:
            return getattr(splits, name)
        return getattr(load_data(spec, size, {"train": 1, "val": 1, "test": 1, name: n}), name)

    shape = (1, 3, size, size)
    return Target("classifier", ckpt, space, arch, model, shape,
                  [model.stem] + list(model.blocks) + [model.head], "top1", spec, loss,
                  splits.train.batch, len(splits.train),
                  lambda idx: splits.train.batch(idx)[0], onnx_top1, split,
                  own.name == space.name and shape == tuple(input_shape))


def onnx_top1(path: Path, split, threads: int = 1) -> float:
    """Top-1 of a batch-1 classifier ONNX file on a proxy `Split` (onnxruntime, CPU)."""
    return float(onnx_correct(path, split, threads).mean()) if len(split) else 0.0


def classifier_logits(path: Path, threads: int = 1):
    """A function of images ``[N, 3, S, S]`` (numpy) to the batch-1 classifier ONNX file's
    logits ``[N, classes]``, run image by image (onnxruntime, CPU; one session)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name

    def logits(x: np.ndarray) -> np.ndarray:
        return np.concatenate([sess.run(None, {name: x[j:j + 1]})[0] for j in range(len(x))])
    return logits


def onnx_correct(path: Path, split, threads: int = 1) -> np.ndarray:
    """Per image of `split`, whether the batch-1 classifier ONNX file's top-1 is its label
    (bool [N]): what a paired comparison of two models on the same images needs."""
    logits = classifier_logits(path, threads)
    out = np.zeros(len(split), bool)
    for i in range(0, len(split), 500):
        x, y = split.batch(np.arange(i, min(i + 500, len(split))))
        out[i:i + len(x)] = logits(x.numpy()).argmax(1) == y.numpy()
    return out


class _Deployable(nn.Module):
    """The detector as `hwnas detect export` ships it, holding the trained `Detector` as
    ``det`` (so its exported node names are ``/det/backbone/…``, the units' prefixes)."""

    def __init__(self, det):
        super().__init__()
        self.det = det


def _detector(ckpt, ck, space, arch, input_shape, data) -> Target:
    from hwnas.detection.data import load_coco, resolve_data
    from hwnas.detection.evaluate import coco_metrics, detect_onnx
    from hwnas.detection.model import DetectorConfig, build_detector

    meta = ck["meta"]
    cfg = DetectorConfig(**meta["detector"])
    own_arch = _check_arch(ckpt, space, arch, cfg.space, cfg.arch)
    want = space.cfg
    for field in ("image_size", "fpn_channels", "head_convs", "num_classes", "max_stride"):
        if getattr(cfg, field) != getattr(want, field):
            raise UserError(f"checkpoint {str(ckpt)!r} is a detector with {field} "
                            f"{getattr(cfg, field)}; space {space.name} prices {field} "
                            f"{getattr(want, field)}")
    if cfg.space != space.backbone.name:
        raise UserError(f"checkpoint {str(ckpt)!r} has a {cfg.space} backbone; space "
                        f"{space.name} prices a {space.backbone.name} backbone")
    det = build_detector(cfg)
    _load_state(det, ck["model"], ckpt, f"a {cfg.space} {own_arch} detector")
    det.eval()
    spec = data or meta["config"]["data"]
    root = resolve_data(spec)
    splits: dict = {}

    def split(name: str, n: int | None = None):
        if (name, n) not in splits:
            where = root
            if n is not None:
                from hwnas.detection.data import generate_shapes_det

                where = generate_shapes_det(sizes={"train": 1, "val": 1, "test": 1, name: n},
                                            image_size=cfg.image_size)
            s = load_coco(where, name, cfg.image_size)
            if list(s.cat_ids) != list(meta["cat_ids"]):
                raise UserError(f"the data's categories {s.cat_ids} are not the "
                                f"checkpoint's {meta['cat_ids']}")
            splits[name, n] = s
        return splits[name, n]

    train = split("train")

    def loss(m, batch):
        x, targets = batch
        d = m.det
        return sum(d.loss(d(x), targets).values())

    def evaluate(path: Path, s) -> float:
        return float(coco_metrics(s, detect_onnx(path, s))["AP"])

    body = det.backbone.body
    units = [body.stem] + list(body.blocks) + [det.neck, det.head, None]
    shape = (1, 3, cfg.image_size, cfg.image_size)
    return Target("detector", ckpt, space, arch, _Deployable(det), shape, units, "AP", spec,
                  loss, lambda idx: train.batch(idx), len(train),
                  lambda idx: train.batch(idx)[0], evaluate, split, shape == tuple(input_shape))

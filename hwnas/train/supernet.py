"""The SPOS weight-sharing supernet of a single-path ShuffleNetV2 space, and its checkpoints.

`Supernet` holds one `ChoiceBlock` per choice per layer — built by the space's own `build_op`
(with ``affine=False`` BatchNorm, as in SPOS: the per-path statistics are recalibrated before a
candidate is scored, and affine parameters shared across paths would blur them) from the same
`key_grid` walk the LUT prices — so there is no second copy of the block code. `forward(x,
choices)` runs one path.

**Proxy mapping.** The LUT prices the deployment space (``det20`` at 1×3×320×320); the supernet is
trained on a narrower copy (``det20-w0.25``) at a small input on the proxy task. Both have the same
layers and choices, so an `Arch` of one is an `Arch` of the other with the same digits:
`proxy_arch` makes that mapping explicit and refuses it between spaces whose layers differ
(SPOS and DetNAS likewise price the deployed shape while scoring on a proxy).
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from hwnas.data import BUILTIN
from hwnas.errors import UserError, first_line
from hwnas.fileio import atomic_path
from hwnas.spaces import get_space
from hwnas.spaces.base import Arch, SearchSpace
from hwnas.spaces.shufflenet import Candidate, Head

FORMAT = "hwnas-supernet/1"


def base_name(space_name: str) -> str:
    return space_name.partition("-w")[0]


def proxy_arch(arch: Arch, proxy: SearchSpace) -> Arch:
    """`arch` (of the priced space, e.g. det20) as the same choices in `proxy` (det20-w0.25)."""
    if base_name(arch.space) != base_name(proxy.name) or len(arch.choices) != proxy.num_layers:
        raise UserError(f"arch {arch} cannot be scored by a supernet of space {proxy.name!r}: "
                        f"the layers differ; train a supernet of {base_name(arch.space)} "
                        "(any width) with `hwnas supernet train`")
    return Arch(proxy.name, arch.choices)


def choice_modules(space: SearchSpace, image_size: int) -> tuple[nn.Module, nn.ModuleList]:
    """The stem and, per layer, one non-affine module per choice (`layers[i][c]`), built by
    `space.build_op` from the same `key_grid` walk the LUT prices. A layer with one choice
    (whose op `key_grid` counts among the fixed ones) gets that op as its only module."""
    shape = (1, 3, image_size, image_size)
    fixed, grid = space.key_grid(shape)
    canary = space.op_keys(space.canary(), shape)
    layers = nn.ModuleList(
        nn.ModuleList(space.build_op(k, affine=False) for k in row[:n]) if n > 1
        else nn.ModuleList([space.build_op(canary[i + 1], affine=False)])
        for i, (row, n) in enumerate(zip(grid, space.num_choices)))
    return space.build_op(fixed[0], affine=False), layers


class Supernet(nn.Module):
    """Stem → `num_layers` × {one `ChoiceBlock` per choice} → head; input [N, 3, S, S]."""

    def __init__(self, space: SearchSpace, image_size: int, num_classes: int):
        super().__init__()
        self.space, self.image_size, self.num_classes = space, image_size, num_classes
        self.stem, self.layers = choice_modules(space, image_size)
        self.head = Head(space.op_keys(space.canary(), (1, 3, image_size, image_size))[-1]
                         .in_shape[1], num_classes)
        self.train()

    def forward(self, x: torch.Tensor, choices: Sequence[int]) -> torch.Tensor:
        """Logits [N, num_classes] of the path `choices` (one index per layer)."""
        x = self.stem(x)
        for layer, c in zip(self.layers, choices):
            x = layer[int(c)](x)
        return self.head(x)

    def path_modules(self, choices: Sequence[int]) -> list[nn.Module]:
        return [self.stem] + [layer[int(c)] for layer, c in zip(self.layers, choices)]


def build_standalone(space: SearchSpace, arch: Arch, image_size: int,
                     num_classes: int) -> Candidate:
    """A fresh stand-alone network of `arch` for the proxy task (affine BN, own head)."""
    keys = space.op_keys(arch, (1, 3, image_size, image_size))
    ops = [space.build_op(k) for k in keys[:-1]]
    return Candidate(ops[0], ops[1:], Head(keys[-1].in_shape[1], num_classes),
                     space.stage_ends).train()


def check_finite(state: dict, what: str) -> None:
    """A `UserError` naming the first tensor of `state` (name → tensor) with NaN/±inf."""
    for name, t in state.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(
                torch.isfinite(t).all()):
            raise UserError(f"{what} has non-finite weights (NaN or inf in {name!r}): training "
                            "diverged; retrain with a lower --lr into a new file")


def save_checkpoint(path: Path, meta: dict, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None = None) -> None:
    """Write atomically: the previous good checkpoint stays until the new one is complete.
    Weights with NaN/inf are refused (a `UserError`), so a diverged run never replaces a good
    checkpoint with a useless one."""
    state = model.state_dict()
    check_finite(state, f"the supernet to be saved in {str(path)!r}")
    with atomic_path(Path(path)) as tmp:
        torch.save({"format": FORMAT, "meta": meta, "model": state,
                    "optimizer": optimizer.state_dict() if optimizer is not None else None}, tmp)


# what a checkpoint's meta must hold, and the type of each (load_supernet and resume read them)
META_FIELDS = {"space": str, "image_size": int, "data": str, "num_classes": int, "step": int,
               "config": dict}


def read_checkpoint(path: Path) -> dict:
    """Load with ``weights_only=True``; a `UserError` for a missing, corrupt, foreign or
    malformed file (missing metadata, tensors that are not tensors, NaN/inf weights)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"supernet checkpoint {str(path)!r} is a folder, not a checkpoint file; "
                        "give the .pt file `hwnas supernet train -o FILE` wrote")
    if not path.is_file():
        raise UserError(f"supernet checkpoint {str(path)!r} does not exist; train one with "
                        "`hwnas supernet train --space det20-w0.25 --data shapes -o FILE`")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only load failed" in str(e).lower():
            raise UserError(f"{str(path)!r} is not a weights-only checkpoint: it holds pickled "
                            "Python objects, which hwnas does not load (loading them could run "
                            "code); give a checkpoint written by `hwnas supernet train`") from None
        raise UserError(f"supernet checkpoint {str(path)!r} is corrupt or truncated "
                        f"({type(e).__name__}); it was left untouched — restore it or retrain "
                        "into a new file") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise UserError(f"supernet checkpoint {str(path)!r} is corrupt or truncated "
                        f"({type(e).__name__}); it was left untouched — restore it or retrain "
                        "into a new file") from None
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise UserError(f"{str(path)!r} is not an hwnas supernet checkpoint (format "
                        f"{ck.get('format') if isinstance(ck, dict) else type(ck).__name__!r}, "
                        f"expected {FORMAT!r})")
    meta, model = ck.get("meta"), ck.get("model")
    bad = ("meta" if not isinstance(meta, dict) else
           next((f"meta field {k!r}" for k, t in META_FIELDS.items()
                 if not isinstance(meta.get(k), t) or isinstance(meta.get(k), bool)), None))
    if bad is None and not (isinstance(model, dict) and model and all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in model.items())):
        bad = "model weights"
    if bad is None and not (ck.get("optimizer") is None or isinstance(ck["optimizer"], dict)):
        bad = "optimizer state"
    if bad is not None:
        raise UserError(f"supernet checkpoint {str(path)!r} is malformed: its {bad} is missing "
                        "or of the wrong type; retrain it with `hwnas supernet train` into a new "
                        "file")
    check_finite(model, f"supernet checkpoint {str(path)!r}")
    return ck


def same_data(a, b) -> bool:
    """Whether two data specs name the same data: equal, or folders that resolve to the same
    path (``data/`` and ``/home/me/data`` are one folder; a relative spec resolves against the
    current folder)."""
    if a == b:
        return True
    if not isinstance(a, str) or not isinstance(b, str) or BUILTIN in (a, b):
        return False
    try:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    except (OSError, RuntimeError):
        return False


def check_compatible(meta: dict, path: Path, space: str | None = None,
                     image_size: int | None = None, data: str | None = None,
                     num_classes: int | None = None) -> None:
    """Refuse, with the reason, a checkpoint of another space/width/input/data."""
    wanted = {"space": space, "image_size": image_size, "data": data,
              "num_classes": num_classes}
    for field, want in wanted.items():
        if field == "data" and want is not None and same_data(meta.get(field), want):
            continue
        if want is not None and meta.get(field) != want:
            raise UserError(f"checkpoint {str(path)!r} is for {field} {meta.get(field)!r}, not "
                            f"{want!r}; use a checkpoint trained with {field} {want!r} or "
                            "another output file")


def load_weights(model: nn.Module, state: dict, path: Path) -> None:
    """`model.load_state_dict(state)`, or a `UserError` naming the first missing, unexpected or
    wrongly shaped tensor (torch's own message starts with a line that names none of them)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    shaped = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    why = (f"tensor {missing[0]!r} is missing" if missing else
           f"it has an unexpected tensor {extra[0]!r}" if extra else
           f"tensor {shaped[0]!r} has shape {tuple(state[shaped[0]].shape)}, the space needs "
           f"{tuple(own[shaped[0]].shape)}" if shaped else None)
    if why is None:
        try:
            model.load_state_dict(state)
            return
        except RuntimeError as e:  # e.g. a dtype torch cannot copy
            why = first_line(e)
    raise UserError(f"checkpoint {str(path)!r} does not match the supernet its metadata "
                    f"describes ({model.space.name}, {model.image_size}x{model.image_size}, "
                    f"{model.num_classes} classes): {why}; retrain it into a new file") from None


def load_supernet(path: Path) -> tuple[Supernet, dict]:
    """The supernet in a checkpoint, with its metadata."""
    ck = read_checkpoint(path)
    meta = ck["meta"]
    if not (meta["image_size"] > 0 and meta["num_classes"] >= 2):
        raise UserError(f"supernet checkpoint {str(path)!r} is malformed: image_size "
                        f"{meta['image_size']}, num_classes {meta['num_classes']}")
    model = Supernet(get_space(meta["space"]), int(meta["image_size"]), int(meta["num_classes"]))
    load_weights(model, ck["model"], path)
    return model, meta

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

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from hwnas.errors import UserError
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


class Supernet(nn.Module):
    """Stem → `num_layers` × {one `ChoiceBlock` per choice} → head; input [N, 3, S, S]."""

    def __init__(self, space: SearchSpace, image_size: int, num_classes: int):
        super().__init__()
        self.space, self.image_size, self.num_classes = space, image_size, num_classes
        fixed, grid = space.key_grid((1, 3, image_size, image_size))
        self.stem = space.build_op(fixed[0], affine=False)
        self.layers = nn.ModuleList(nn.ModuleList(space.build_op(k, affine=False) for k in row)
                                    for row in grid)
        self.head = Head(grid[-1][0].out_channels, num_classes)
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


def save_checkpoint(path: Path, meta: dict, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None = None) -> None:
    """Write atomically: the previous good checkpoint stays until the new one is complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".tmp", prefix=path.name + ".", dir=path.parent)
    os.close(fd)
    try:
        torch.save({"format": FORMAT, "meta": meta, "model": model.state_dict(),
                    "optimizer": optimizer.state_dict() if optimizer is not None else None}, tmp)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would make the checkpoint private to its writer
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_checkpoint(path: Path) -> dict:
    """Load with ``weights_only=True``; a `UserError` for a missing, corrupt or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"supernet checkpoint {str(path)!r} does not exist; train one with "
                        "`hwnas supernet train --space det20-w0.25 --data shapes -o FILE`")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError,
            zipfile.BadZipFile) as e:
        raise UserError(f"supernet checkpoint {str(path)!r} is corrupt or truncated "
                        f"({type(e).__name__}); it was left untouched — restore it or retrain "
                        "into a new file") from None
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise UserError(f"{str(path)!r} is not an hwnas supernet checkpoint (format "
                        f"{ck.get('format') if isinstance(ck, dict) else type(ck).__name__!r}, "
                        f"expected {FORMAT!r})")
    return ck


def check_compatible(meta: dict, path: Path, space: str | None = None,
                     image_size: int | None = None, data: str | None = None,
                     num_classes: int | None = None) -> None:
    """Refuse, with the reason, a checkpoint of another space/width/input/data."""
    wanted = {"space": space, "image_size": image_size, "data": data,
              "num_classes": num_classes}
    for field, want in wanted.items():
        if want is not None and meta.get(field) != want:
            raise UserError(f"checkpoint {str(path)!r} is for {field} {meta.get(field)!r}, not "
                            f"{want!r}; use a checkpoint trained with {field} {want!r} or "
                            "another output file")


def load_supernet(path: Path) -> tuple[Supernet, dict]:
    """The supernet in a checkpoint, with its metadata."""
    ck = read_checkpoint(path)
    meta = ck["meta"]
    model = Supernet(get_space(meta["space"]), int(meta["image_size"]), int(meta["num_classes"]))
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as e:
        raise UserError(f"checkpoint {str(path)!r} does not match space {meta['space']!r}: "
                        f"{str(e).splitlines()[0]}") from None
    return model, meta

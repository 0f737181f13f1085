"""The command line's boundary for numbers: argparse `type=` checkers in, strict JSON out.

Each checker turns the flag's text into a value or raises `argparse.ArgumentTypeError` with what
is wrong; argparse then prints ``hwnas CMD: error: argument --lr: …`` and exits 2 — one line, no
traceback, as the CLI contract asks. Python's `float()` accepts ``nan``, ``inf`` and ``1e999``;
none of them is a learning rate or a budget, so every float checker refuses non-finite values.

    p.add_argument("--lr", type=positive_float, default=0.1)
    p.add_argument("--val-n", type=positive_int, default=None)
    p.add_argument("--span-s", type=finite_float(0, 600), default=None)

`dumps_strict` is `json.dumps` that refuses NaN and ±Infinity (which `json.dumps` writes as the
non-JSON tokens ``NaN``/``Infinity`` that strict parsers reject), naming where the value is.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any, Callable

__all__ = ["OneLineParser", "dumps_strict", "finite_float", "int_range", "nonneg_float", "nonneg_int",
           "positive_float", "positive_int", "probability"]


class OneLineParser(argparse.ArgumentParser):
    """An `ArgumentParser` whose errors are one line on stderr (``hwnas train: error: argument
    --lr: 'nan' is not a finite number; see --help``) and exit code 2, as the CLI contract asks
    of every bad input; argparse's default prints the whole usage block first. Sub-parsers made
    by `add_subparsers` are of the same class."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def _int(text: str) -> int:
    try:
        return int(str(text).strip().replace("_", ""), 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def int_range(lo: int | None = None, hi: int | None = None) -> Callable[[str], int]:
    """An integer checker for lo ≤ value ≤ hi (either bound may be None)."""

    def check(text: str) -> int:
        v = _int(text)
        if lo is not None and v < lo:
            raise argparse.ArgumentTypeError(
                f"{v} is too small: must be at least {lo}" if lo > 1 else
                f"{v} must be {'positive' if lo == 1 else 'zero or more'}")
        if hi is not None and v > hi:
            raise argparse.ArgumentTypeError(f"{v} is too large: must be at most {hi}")
        return v

    check.__name__ = "integer"  # argparse names the type in some messages
    return check


positive_int = int_range(1)
nonneg_int = int_range(0)


def finite_float(lo: float | None = None, hi: float | None = None, lo_inclusive: bool = True,
                 hi_inclusive: bool = True) -> Callable[[str], float]:
    """A float checker: finite (no nan/inf), and within [lo, hi] (open ends by the flags)."""

    def check(text: str) -> float:
        try:
            v = float(str(text).strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if lo is not None and (v < lo or (v == lo and not lo_inclusive)):
            raise argparse.ArgumentTypeError(
                f"{v:g} must be {'≥' if lo_inclusive else '>'} {lo:g}")
        if hi is not None and (v > hi or (v == hi and not hi_inclusive)):
            raise argparse.ArgumentTypeError(
                f"{v:g} must be {'≤' if hi_inclusive else '<'} {hi:g}")
        return v

    check.__name__ = "number"
    return check


positive_float = finite_float(0, lo_inclusive=False)
nonneg_float = finite_float(0)
probability = finite_float(0, 1)


def _non_finite_at(obj: Any, where: str = "") -> str | None:
    if isinstance(obj, float) and not math.isfinite(obj):
        return f"{where or 'the value'} = {obj}"
    if isinstance(obj, dict):
        for k, v in obj.items():
            found = _non_finite_at(v, f"{where}.{k}" if where else str(k))
            if found:
                return found
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            found = _non_finite_at(v, f"{where}[{i}]")
            if found:
                return found
    return None


def dumps_strict(obj: Any, **kw) -> str:
    """`json.dumps(obj, allow_nan=False, **kw)`; a `ValueError` naming the first non-finite
    number's place (``loss_ema = nan``) instead of writing invalid JSON. A non-finite number
    in an output is a bug upstream (inputs are checked), so this is not a `UserError`."""
    try:
        return json.dumps(obj, allow_nan=False, **kw)
    except ValueError:
        where = _non_finite_at(obj)
        if where is None:
            raise
        raise ValueError(f"refusing to write invalid JSON: {where}") from None

"""What a synthetic task is (`nlc.runtime.tasks` holds the tasks themselves): its options, parsed
from `--task NAME:key=value,...`, and the `Task` base class, which checks them against the model's
vocabulary and the context and turns a task's `sequences` into training batches (`x`, and `y` with
IGNORE wherever no memory can predict the next token).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

from nlc.runtime.data import IGNORE, DataError, generator

HELP = "nlc train --task help"


# ---------------------------------------------------------------- options

@dataclass(frozen=True)
class Option:
    name: str
    default: object
    help: str
    parse: Callable[[str], object]     # text -> value; ValueError(what a value must be)


def whole(lo: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < lo:
            raise ValueError(f"a whole number of at least {lo}")
        return value
    return parse


def depth(text: str):
    if text == "any":
        return text
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:
        raise ValueError("`any` or a fraction from 0 (the start) to 1 (the end)")
    return value


# ---------------------------------------------------------------- the tasks

class Task:
    """A synthetic task: `options` parsed from `--task`, `batch(split, index, size)` -> (x, y)."""
    name: ClassVar[str]
    about: ClassVar[str]                         # one line for `--task help`
    options: ClassVar[tuple[Option, ...]] = ()
    min_context: ClassVar[int] = 4

    def __init__(self, vocab: int, context: int, seed: int, **opts):
        unknown = set(opts) - {o.name for o in self.options}
        if unknown:
            raise self.error(f"`{self.name}` has no option `{sorted(unknown)[0]}`")
        if context < self.min_context:
            raise DataError(f"the {self.name} task needs --context of at least {self.min_context}")
        self.vocab, self.context, self.seed = vocab, context, seed
        self.given = dict(opts)
        self.opt = {o.name: opts.get(o.name, o.default) for o in self.options}
        self.floor: float | None = None
        self.setup()

    def setup(self) -> None:
        """Check the options against the vocabulary and the context; derive the layout."""

    @property
    def spelled(self) -> str:
        return self.name + (":" + ",".join(f"{k}={v}" for k, v in self.opt.items()) if self.opt else "")

    @classmethod
    def takes(cls) -> str:
        return ", ".join(f"{o.name}={o.default}" for o in cls.options) or "no options"

    @classmethod
    def error(cls, message: str) -> DataError:
        return DataError(f"{message}\nhint: `{cls.name}` takes {cls.takes()} (`{HELP}` says what they mean)")

    def fit(self, name: str, value: int, limit: int, why: str) -> int:
        """`value` lowered to `limit`, unless the option was given: then an error saying `why`."""
        if value <= limit:
            return value
        if name in self.given:
            raise self.error(f"`{self.name}:{name}={value}`: {why}")
        return limit

    def alphabet(self, per_item: int) -> int:
        """The `symbols` option: `per_item` alphabets of it, and the separator, fit the vocabulary."""
        s = self.fit("symbols", self.opt["symbols"], (self.vocab - 1) // per_item,
                     f"{self.opt['symbols']} symbols take {per_item * self.opt['symbols'] + 1} token ids here "
                     f"(the separator and {per_item} alphabet{'s' * (per_item > 1)}); the model's vocab is {self.vocab}")
        if s < 2:
            raise DataError(f"the {self.name} task needs a vocabulary of at least {2 * per_item + 1}")
        return s

    def batch(self, split: str, index: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        seq, counts = self.sequences(split, size, generator(self.seed, split, index))
        y = seq[:, 1:].clone()
        y[~counts[:, 1:]] = IGNORE
        return seq[:, :-1].contiguous(), y

    def sequences(self, split: str, size: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """`size` sequences of `context + 1` tokens, and where the loss counts."""
        raise NotImplementedError

    @property
    def describe(self) -> str:
        floor = f" (loss without memory: {self.floor:.3f})" if self.floor else ""
        return f"synthetic task `{self.spelled}`, {self.layout()}{floor}"

    def layout(self) -> str:
        return f"{self.context} tokens per sequence"


def _pack(parts: list[tuple[torch.Tensor, torch.Tensor]], size: int, length: int):
    """Episodes side by side, padded with 0 (not counted) to `length`."""
    seq = torch.zeros(size, length, dtype=torch.long)
    counts = torch.zeros(size, length, dtype=torch.bool)
    at = 0
    for s, c in parts:
        seq[:, at:at + s.shape[1]], counts[:, at:at + s.shape[1]] = s, c
        at += s.shape[1]
    return seq, counts


def _episodes(sizes: list) -> str:
    whole = sizes[:-1] if len(sizes) > 1 and sizes[-1] != sizes[0] else sizes
    text = f"{len(whole)} episode{'s' * (len(whole) != 1)} of {whole[0]}" if whole else ""
    return text + (f" and one of {sizes[-1]}" if len(whole) < len(sizes) else "")

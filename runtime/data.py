"""Training data: windows of a text file's bytes, or a synthetic task that needs memory.

Every batch is a pure function of (seed, split, index): batch `i` of a run is the same whether
the run went straight through or was stopped and resumed, so resuming needs no data state.
A batch is `(x, y)`, both `[B, T]` token ids; `y` is the next token of `x`, or `IGNORE` where the
loss does not count (the random half of a synthetic sequence, which no memory can predict).

- `TextData`: a file read as bytes (vocab 256), the first 90% for training, the rest for
  validation; a batch is `B` random windows of `T + 1` bytes.
- `CopyTask`: `T/2` random symbols, a separator, the same symbols again; the loss counts the
  copy. Without memory the best loss is `ln(alphabet)` (`floor`); below it the model remembers.
- `RecallTask` (associative recall): `key value` pairs with distinct keys, then the keys again
  in a new order, each followed by its value; the loss counts the recalled values.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

IGNORE = -100          # cross_entropy's ignore_index
SPLITS = ("train", "val")
TASKS = ("copy", "recall")
ALPHABET = 16          # symbols of the synthetic tasks (fewer when the vocabulary is small)


class DataError(ValueError):
    """The data cannot be used as asked (a file too short, a vocabulary too small)."""


def generator(seed: int, split: str, index: int) -> torch.Generator:
    """The seeded generator of batch `index` of `split`: independent of every other batch."""
    mixed = (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + SPLITS.index(split)) % (1 << 63)
    return torch.Generator().manual_seed(mixed)


class TextData:
    vocab = 256

    def __init__(self, path: Path, context: int, seed: int):
        try:
            raw = Path(path).read_bytes()
        except OSError as e:
            raise DataError(f"cannot read {path}: {e.strerror or e}") from None
        tokens = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long() if raw else torch.zeros(0, dtype=torch.long)
        cut = int(0.9 * len(tokens))
        self.parts = {"train": tokens[:cut], "val": tokens[cut:]}
        need = context + 1
        if len(self.parts["val"]) < need:
            raise DataError(f"{path} has {len(tokens)} bytes; with --context {context} it needs at least "
                            f"{math.ceil(need / 0.1)} (10% of it, the validation split, holds whole windows)")
        self.context, self.seed = context, seed
        self.floor = None
        self.describe = f"{path} ({len(tokens):,} bytes: {cut:,} train, {len(tokens) - cut:,} val)"

    def batch(self, split: str, index: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        data, T = self.parts[split], self.context
        starts = torch.randint(0, len(data) - T, (size,), generator=generator(self.seed, split, index))
        rows = torch.stack([data[s:s + T + 1] for s in starts.tolist()])
        return rows[:, :-1], rows[:, 1:]


class _Task:
    """A synthetic task over `alphabet` symbols (ids 1..alphabet); id 0 is the separator/padding."""

    min_context = 4

    def __init__(self, vocab: int, context: int, seed: int):
        if context < self.min_context:
            raise DataError(f"the {self.name} task needs --context of at least {self.min_context}")
        self.context, self.seed = context, seed
        self.alphabet = min(ALPHABET, (vocab - 1) // self.symbols_per_item)
        if self.alphabet < 2:
            raise DataError(f"the {self.name} task needs a vocabulary of at least {2 * self.symbols_per_item + 1}")
        self.floor = math.log(self.alphabet)   # the best loss without memory
        self.describe = f"synthetic `{self.name}` task, {self.alphabet} symbols (loss without memory: {self.floor:.3f})"

    def batch(self, split: str, index: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        seq, counts = self.sequences(size, generator(self.seed, split, index))
        y = seq[:, 1:].clone()
        y[~counts[:, 1:]] = IGNORE
        return seq[:, :-1].contiguous(), y


class CopyTask(_Task):
    name, symbols_per_item = "copy", 1

    def sequences(self, size: int, g: torch.Generator):
        T = self.context + 1
        n = (T - 1) // 2
        sym = torch.randint(1, self.alphabet + 1, (size, n), generator=g)
        seq = torch.zeros(size, T, dtype=torch.long)
        seq[:, :n], seq[:, n + 1:2 * n + 1] = sym, sym
        counts = torch.zeros(size, T, dtype=torch.bool)
        counts[:, n + 1:2 * n + 1] = True
        return seq, counts


class RecallTask(_Task):
    name, symbols_per_item, min_context = "recall", 2, 8

    def sequences(self, size: int, g: torch.Generator):
        T = self.context + 1
        n = min(self.alphabet, T // 4)        # pairs; keys are distinct
        keys = torch.argsort(torch.rand(size, self.alphabet, generator=g), dim=1)[:, :n] + 1
        values = torch.randint(self.alphabet + 1, 2 * self.alphabet + 1, (size, n), generator=g)
        order = torch.argsort(torch.rand(size, n, generator=g), dim=1)
        pairs = torch.stack([keys, values], 2).flatten(1)
        asked = torch.stack([keys.gather(1, order), values.gather(1, order)], 2).flatten(1)
        seq = torch.zeros(size, T, dtype=torch.long)
        seq[:, :2 * n], seq[:, 2 * n:4 * n] = pairs, asked
        counts = torch.zeros(size, T, dtype=torch.bool)
        counts[:, 2 * n + 1:4 * n:2] = True    # the values after the asked keys
        return seq, counts


def make_data(data: Path | None, task: str, vocab: int, context: int, seed: int):
    """The data a run trains on: a text file (`data`) or a synthetic `task`."""
    if data is not None:
        if vocab < TextData.vocab:
            raise DataError(f"text is read as bytes (256 symbols), but the model's vocab is {vocab}: "
                            f"set `--set model.vocab=256`")
        return TextData(data, context, seed)
    tasks = {"copy": CopyTask, "recall": RecallTask}
    if task not in tasks:
        raise DataError(f"unknown task `{task}`: use one of {', '.join(tasks)}")
    return tasks[task](vocab, context, seed)

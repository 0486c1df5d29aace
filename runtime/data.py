"""Training data: windows of text read as bytes, or a synthetic task that needs memory.

Every batch is a pure function of (seed, split, index): batch `i` of a run is the same whether
the run went straight through or was stopped and resumed, so resuming needs no data state.
A batch is `(x, y)`, both `[B, T]` token ids; `y` is the next token of `x`, or `IGNORE` where the
loss and the accuracy do not count (in a synthetic task, what no memory can predict).

- `TextData`: a file, or every file in a folder (recursively, in sorted path order, hidden ones
  skipped), read as bytes (vocab 256) and concatenated; the first 90% for training, the rest for
  validation; a batch is `B` random windows of `T + 1` bytes.
- the synthetic tasks (`copy`, `recall`, `mqar`, `niah`, `parity`, `anbn`, `stream`) are in
  `nlc.runtime.tasks`; `nlc train --task help` lists them with their options.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

IGNORE = -100          # cross_entropy's ignore_index
SPLITS = ("train", "val")


class DataError(ValueError):
    """The data cannot be used as asked (a file too short, a vocabulary too small, a bad task option)."""


def generator(seed: int, split: str, index: int) -> torch.Generator:
    """The seeded generator of batch `index` of `split`: independent of every other batch."""
    mixed = (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + SPLITS.index(split)) % (1 << 63)
    return torch.Generator().manual_seed(mixed)


def correct(logits: torch.Tensor, y: torch.Tensor) -> tuple[int, int]:
    """(predictions right, predictions counted): the arg-max of `logits` [B, T, V] against `y` [B, T]
    where `y` is not IGNORE. Summed over batches, their ratio is the exact accuracy."""
    counted = y != IGNORE
    right = (logits.argmax(-1) == y) & counted
    return int(right.sum()), int(counted.sum())


def text_files(path: Path) -> list[Path]:
    """The files that `--data path` reads: the file itself, or a folder's files (recursively, not
    hidden ones), sorted by their path in the folder."""
    path = Path(path)
    if not path.is_dir():
        return [path]
    found = [p for p in path.rglob("*") if p.is_file()
             and not any(part.startswith(".") for part in p.relative_to(path).parts)]
    return sorted(found, key=lambda p: p.relative_to(path).as_posix())


class TextData:
    vocab = 256

    def __init__(self, path: Path, context: int, seed: int):
        files = text_files(path)
        if not files:
            raise DataError(f"{path} is a folder without files to read")
        try:
            raw = b"".join(p.read_bytes() for p in files)
        except OSError as e:
            raise DataError(f"cannot read {e.filename or path}: {e.strerror or e}") from None
        tokens = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long() if raw else torch.zeros(0, dtype=torch.long)
        cut = int(0.9 * len(tokens))
        self.parts = {"train": tokens[:cut], "val": tokens[cut:]}
        need = context + 1
        if len(self.parts["val"]) < need:
            raise DataError(f"{path} has {len(tokens)} bytes; with --context {context} it needs at least "
                            f"{math.ceil(need / 0.1)} (10% of it, the validation split, holds whole windows)")
        self.context, self.seed = context, seed
        self.floor = None
        what = f"{len(files)} files, " if Path(path).is_dir() else ""
        self.describe = f"{path} ({what}{len(tokens):,} bytes: {cut:,} train, {len(tokens) - cut:,} val)"

    def batch(self, split: str, index: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        data, T = self.parts[split], self.context
        starts = torch.randint(0, len(data) - T, (size,), generator=generator(self.seed, split, index))
        rows = torch.stack([data[s:s + T + 1] for s in starts.tolist()])
        return rows[:, :-1], rows[:, 1:]


def make_data(data: Path | None, task: str, vocab: int, context: int, seed: int):
    """The data a run trains on: text (`data`, a file or a folder) or a synthetic `task`
    (`name` or `name:key=value,...`)."""
    if data is not None:
        if vocab < TextData.vocab:
            raise DataError(f"text is read as bytes (256 symbols), but the model's vocab is {vocab}: "
                            f"set `--set model.vocab=256`")
        return TextData(data, context, seed)
    from nlc.runtime.tasks import make_task
    return make_task(task, vocab, context, seed)

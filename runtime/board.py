"""`--tensorboard`: the run's scalars for TensorBoard, in OUT/tensorboard (`tensorboard --logdir OUT`).

TensorBoard is not a dependency of nlc: without it (`torch.utils.tensorboard` does not import)
`--tensorboard` is refused before anything is computed, exit status 2, saying what to install."""
from __future__ import annotations

from pathlib import Path

SCALARS = {"loss": "train/loss", "lr": "train/lr", "tokens_per_s": "train/tokens_per_s",
           "val_loss": "eval/loss", "val_acc": "eval/accuracy"}
MISSING = ("--tensorboard needs TensorBoard, which is not installed here ({why}): pip install tensorboard, "
           "or train without --tensorboard")


def writer_class():
    """torch's SummaryWriter; ImportError with the message to show when TensorBoard is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception as e:      # ImportError, or a broken install failing some other way
        raise ImportError(MISSING.format(why=f"{type(e).__name__}: {e}")) from None
    return SummaryWriter


class Board:
    """Writes each history record's scalars at its step."""

    def __init__(self, out: Path, writer_cls):
        self.writer = writer_cls(log_dir=str(Path(out) / "tensorboard"))

    def record(self, r: dict) -> None:
        for key, tag in SCALARS.items():
            if r.get(key) is not None:
                self.writer.add_scalar(tag, r[key], r["step"])

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()

"""Checkpoints of a training run: one directory per run, every file written atomically.

    DIR/ckpt.pt        model and optimizer state dicts, step, RNG states, the spec's canonical text
                       and its hash, the run's settings and its history (torch.save; loaded with
                       weights_only=True, so loading never runs code from the file)
    DIR/spec.yaml      the canonical text of the spec trained (after --set), for people
    DIR/metrics.jsonl  one JSON record per logged step and per evaluation
    DIR/loss.png       the loss curves, when matplotlib is installed

A file is written to a temporary name beside its target and renamed over it
(`nlc.fileio.atomic_write`), so an interrupted save leaves the previous checkpoint whole.
"""
from __future__ import annotations

import hashlib
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from nlc.fileio import atomic_write

FORMAT = 1
CKPT, SPEC, METRICS, PLOT = "ckpt.pt", "spec.yaml", "metrics.jsonl", "loss.png"


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or from another spec."""


def spec_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


@dataclass
class Checkpoint:
    step: int
    model: dict
    optimizer: dict
    rng: dict
    spec: str              # canonical text of the spec (nlc.spec.dump)
    spec_sha256: str
    config: dict           # the run's settings (JSON types)
    history: list          # metric records so far

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        torch.save({"format": FORMAT, **self.__dict__}, buf)
        return buf.getvalue()


def save(out: Path, ck: Checkpoint, plot: bool = True) -> Path:
    """Write the run's files into `out`, each atomically; the checkpoint last of all."""
    out = Path(out)
    atomic_write(out / SPEC, ck.spec)
    atomic_write(out / METRICS, "".join(json.dumps(r) + "\n" for r in ck.history))
    if plot:
        plot_losses(ck.history, out / PLOT)
    return atomic_write(out / CKPT, ck.to_bytes())


def load(out: Path, device: str | torch.device = "cpu") -> Checkpoint:
    path = Path(out) / CKPT
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: train without --resume first")
    try:
        data = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # a truncated or foreign file: say so, never a traceback
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict) or data.pop("format", None) != FORMAT or set(data) != set(Checkpoint.__annotations__):
        raise CheckpointError(f"{path} is not an nlc checkpoint of format {FORMAT}")
    return Checkpoint(**data)


def plot_losses(history: list, path: Path) -> Path | None:
    """loss.png: training and validation loss against step; skipped without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    train = [(r["step"], r["loss"]) for r in history if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in history if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    for pts, label in ((train, "train"), (val, "val")):
        if pts:
            ax.plot(*zip(*pts), label=label, marker="." if label == "val" else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return atomic_write(path, buf.getvalue())

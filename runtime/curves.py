"""curves.png: a run's curves at its end, from its metric history (what metrics.jsonl holds):
training loss and validation loss, validation accuracy where the run evaluated it, and the learning
rate, one panel each, against the step. Written atomically; matplotlib draws it (Agg, no display)."""
from __future__ import annotations

import io
from pathlib import Path

from nlc.fileio import atomic_write

CURVES = "curves.png"


def _points(history: list, key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in history if r.get(key) is not None]   # None: not finite


def write(history: list, out: Path) -> Path:
    """Draw `history` into OUT/curves.png; returns its path."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    panels = [("loss (nats/token)", [("train", _points(history, "loss")), ("val", _points(history, "val_loss"))])]
    if _points(history, "val_acc"):
        panels.append(("val accuracy", [("val", _points(history, "val_acc"))]))
    if _points(history, "lr"):
        panels.append(("learning rate", [("lr", _points(history, "lr"))]))
    fig = Figure(figsize=(5 * len(panels), 3.6))
    for ax, (label, series) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        for name, pts in series:
            if pts:
                ax.plot(*zip(*pts), label=name, marker="." if name == "val" or len(pts) == 1 else None)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        if len([s for s in series if s[1]]) > 1:
            ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return atomic_write(Path(out) / CURVES, buf.getvalue())

"""What a run leaves besides its checkpoints: curves.png at its end, and with --tensorboard the
scalars for TensorBoard (refused, exit 2, with what to install, where TensorBoard is missing)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nlc.runtime import board
from nlc.runtime.cli import app
from nlc.runtime.train import TrainConfig, train

ROOT = Path(__file__).parent.parent.parent
TINY = ("model.d_model=32", "model.layers=1", "model.heads=2")
ARGS = ["--steps", "3", "--batch", "2", "--context", "16", "--device", "cpu", "--log-every", "1", "--eval-every", "2",
        "--set", "model.d_model=32", "--set", "model.layers=1", "--set", "model.heads=2"]


def tiny(out, **kw):
    kw = {"spec": ROOT / "specs/transformer.yaml", "sets": TINY, "steps": 3, "batch": 2, "context": 16, "out": out,
          "device": "cpu", "log_every": 1, "eval_every": 2, "eval_batches": 1, **kw}
    return train(TrainConfig(**kw), log=lambda s: None)


def test_a_run_ends_with_curves_png(tmp_path):
    out = tmp_path / "run"
    tiny(out)
    png = (out / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]     # written atomically: no leftovers
    before = png
    tiny(out, steps=5, resume=True)                                       # redrawn with the resumed steps
    assert (out / "curves.png").read_bytes() != before


def test_tensorboard_missing_is_a_message_and_exit_2(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)   # `import` of it raises ImportError
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["train", str(ROOT / "specs/transformer.yaml"), "--out", str(out), "--tensorboard",
                                 *ARGS])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert r.stderr.startswith("error: --tensorboard needs TensorBoard, which is not installed here"), r.stderr
    assert "pip install tensorboard" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not out.exists()                                               # refused before anything was done


def test_tensorboard_gets_every_scalar_at_its_step(tmp_path, monkeypatch):
    written = []

    class Writer:                 # stands for torch's SummaryWriter, which needs the tensorboard package
        def __init__(self, log_dir):
            written.append(("dir", log_dir))

        def add_scalar(self, tag, value, step):
            written.append((tag, step))

        def flush(self):
            pass

        def close(self):
            written.append(("closed",))
    monkeypatch.setattr(board, "writer_class", lambda: Writer)
    out = tmp_path / "run"
    tiny(out, tensorboard=True)
    assert written[0] == ("dir", str(out / "tensorboard")) and written[-1] == ("closed",)
    for step in (1, 2, 3):
        assert {("train/loss", step), ("train/lr", step), ("train/tokens_per_s", step)} <= set(written)
    for step in (0, 2, 3):
        assert {("eval/loss", step), ("eval/accuracy", step)} <= set(written)
    written.clear()
    tiny(tmp_path / "plain")
    assert written == []                                                  # only with --tensorboard


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                    reason="tensorboard is not installed (it is not a dependency of nlc): the event file cannot be "
                           "written; the message without it is tested above")
def test_tensorboard_writes_an_event_file(tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["train", str(ROOT / "specs/transformer.yaml"), "--out", str(out), "--tensorboard",
                                 *ARGS])
    assert r.exit_code == 0, r.output
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))

"""On a terminal `nlc train` draws a one-line progress bar in place under its log lines; anywhere
else (a pipe, a file) its output is the log lines exactly."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

from nlc.runtime.progress import ERASE, Console, bar_text, eta_text
from nlc.runtime.train import TrainConfig, train

ROOT = Path(__file__).parent.parent.parent
TINY = ("model.d_model=32", "model.layers=1", "model.heads=2")


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def tiny(out, console, lines):
    def log(line):
        lines.append(line)
        console.log(line)
    cfg = TrainConfig(spec=ROOT / "specs/transformer.yaml", sets=TINY, steps=4, batch=2, context=16, out=out,
                      device="cpu", log_every=2, eval_every=1000, eval_batches=1)
    return train(cfg, log=log, progress=console.step)


def test_off_a_terminal_the_output_is_the_log_lines_unchanged(tmp_path):
    stream, lines = io.StringIO(), []
    tiny(tmp_path / "run", Console(stream), lines)
    assert stream.getvalue() == "".join(line + "\n" for line in lines)
    assert "\r" not in stream.getvalue() and "\x1b" not in stream.getvalue()
    args = ("train", "specs/transformer.yaml", "--steps", 2, "--batch", 2, "--context", 16, "--device", "cpu",
            "--out", tmp_path / "cli", *[a for s in TINY for a in ("--set", s)])
    r = subprocess.run([sys.executable, "-m", "nlc.runtime.cli", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stdout and "\x1b" not in r.stdout and r.stdout.splitlines()[-1].startswith("done: step 2/2")


def test_on_a_terminal_a_bar_is_redrawn_in_place_under_the_log_lines():
    clock = Clock()
    tty = FakeTTY()
    c = Console(tty, clock=clock, every=0.5)
    c.log("train `x`: ...")
    assert tty.getvalue() == "train `x`: ...\n"
    c.step(1, 10, 5.0, 100)                         # the first step starts the clock
    clock.t += 1.0
    c.step(2, 10, 4.5, 100)
    assert tty.getvalue().endswith(ERASE + "step 2/10 [####----------------]  20% | loss 4.5000 | 100 tok/s | "
                                           "ETA 0:08")
    clock.t += 0.1
    before = tty.getvalue()
    c.step(3, 10, 4.4, 100)                         # within `every` of the last drawing: not drawn
    assert tty.getvalue() == before
    c.log("step      3/10 | loss 4.4000")            # a log line takes the bar's line; the bar is drawn below it
    assert tty.getvalue().endswith(ERASE + "step      3/10 | loss 4.4000\n" + c.shown)
    clock.t += 0.1
    c.step(10, 10, 4.0, 100)                        # the last step is always drawn
    assert c.shown.startswith("step 10/10 [####################] 100% | loss 4.0000")
    c.close()
    assert tty.getvalue().endswith(ERASE) and c.shown == ""
    assert "\n" not in tty.getvalue().rsplit("loss 4.4000\n", 1)[1]   # redrawn in place: no new lines


def test_the_bar_through_a_run_on_a_fake_terminal(tmp_path):
    tty, lines = FakeTTY(), []
    console = Console(tty, every=0.0)
    tiny(tmp_path / "run", console, lines)
    console.close()
    text = tty.getvalue()
    assert "step 4/4 [####################] 100% | loss " in text and " tok/s" in text and "ETA 0:00" in text
    for line in lines:
        assert line + "\n" in text
    assert text.endswith(ERASE)


def test_bar_text_fits_and_eta_reads():
    assert eta_text(83) == "1:23" and eta_text(3725) == "1:02:05"
    assert len(bar_text(5, 100, 1.23456, 12345.6, 3725, width=30)) == 29
    assert bar_text(0, 0, None, None, None) == "step 0/0 [####################] 100%"

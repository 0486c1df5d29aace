"""Where `nlc train` writes its log: plain lines, or on a terminal the same lines above a live
one-line progress bar (step/total, loss, tokens/s, ETA) that is redrawn in place.

`Console.log` takes the run's log lines, `Console.step` each finished step; off a terminal (a pipe,
a file, a CI log) `step` draws nothing and the output is the log lines exactly as they were.
"""
from __future__ import annotations

import shutil
import sys
import time
from typing import Callable, TextIO

ERASE = "\r\x1b[2K"          # back to the line's start and clear it


def eta_text(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def bar_text(step: int, total: int, loss: float | None, tokens_per_s: float | None, eta: float | None,
             width: int = 80) -> str:
    """`step 12/200 [##------] 6% | loss 4.1234 | 12,345 tok/s | ETA 1:23`, cut to `width`."""
    frac = min(max(step / total, 0.0), 1.0) if total else 1.0
    cells = 20
    filled = int(frac * cells)
    text = (f"step {step}/{total} [{'#' * filled}{'-' * (cells - filled)}] {100 * frac:3.0f}%"
            + (f" | loss {loss:.4f}" if loss is not None else "")
            + (f" | {tokens_per_s:,.0f} tok/s" if tokens_per_s else "")
            + (f" | ETA {eta_text(eta)}" if eta is not None else ""))
    return text[:max(width - 1, 10)]


class Console:
    def __init__(self, stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic,
                 every: float = 0.1):
        self.stream = stream if stream is not None else sys.stdout
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty and isatty())
        self.clock, self.every = clock, every
        self.shown = ""                   # the bar on screen, "" when none
        self.t0 = self.drawn = None       # when the first step was reported, when the bar was last drawn
        self.first = self.tokens = 0

    def log(self, line: str) -> None:
        """A log line; on a terminal it goes above the bar, which is drawn again under it."""
        if self.tty and self.shown:
            self.stream.write(ERASE + line + "\n" + self.shown)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def step(self, step: int, total: int, loss: float | None, tokens: int) -> None:
        """A step done (`tokens` trained in it): redraws the bar, at most every `every` seconds."""
        if not self.tty:
            return
        now = self.clock()
        if self.t0 is None:               # the rate counts from the first step reported (after compiling)
            self.t0, self.first = now, step
            self.tokens = 0
        else:
            self.tokens += tokens
        if self.drawn is not None and now - self.drawn < self.every and step < total:
            return
        spent, done = now - self.t0, step - self.first
        rate = self.tokens / spent if spent > 0 and self.tokens else None
        eta = (total - step) * spent / done if done > 0 else None
        width = shutil.get_terminal_size((80, 24)).columns
        self.shown = bar_text(step, total, loss, rate, eta, width)
        self.stream.write(ERASE + self.shown)
        self.stream.flush()
        self.drawn = now

    def close(self) -> None:
        """Take the bar off the screen (the run's last lines stay)."""
        if self.tty and self.shown:
            self.stream.write(ERASE)
            self.stream.flush()
            self.shown = ""

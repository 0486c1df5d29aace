"""Ctrl-C and SIGTERM during `nlc train`: the first asks the loop to stop after the current step
and save; a second Ctrl-C interrupts at once."""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Callable


@contextmanager
def stop_requests(log: Callable[[str], None]):
    """The first Ctrl-C (or SIGTERM) asks the loop to stop after the current step and save; a
    second Ctrl-C interrupts at once. `flag["stop"]` says whether a stop was asked for."""
    flag = {"stop": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag["stop"] and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag["stop"] = True
        log("interrupted: finishing this step and saving (Ctrl-C again to quit at once)")
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)

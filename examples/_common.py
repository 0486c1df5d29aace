"""What every tutorial here starts with: the repository root, its output folder, the --toy switch,
and `nlc(...)`, which runs the command line exactly as you would type it at a shell."""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent      # the repository: every path in the tutorials is relative to it


def start(name: str, doc: str) -> tuple[Path, bool, float]:
    """The tutorial's output folder (under runs/examples/, or $NLC_EXAMPLES_OUT), created; whether
    --toy was asked for (or NLC_EXAMPLES_TOY=1); and the start time."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--toy", action="store_true", default=os.environ.get("NLC_EXAMPLES_TOY") == "1",
                        help="shrink everything to run in seconds (also NLC_EXAMPLES_TOY=1)")
    toy = parser.parse_args().toy
    out = Path(os.environ.get("NLC_EXAMPLES_OUT", "runs/examples")) / name
    (ROOT / out).mkdir(parents=True, exist_ok=True)
    return out, toy, time.perf_counter()


def nlc(*args: str, expect: int = 0) -> None:
    """Run `nlc ARGS` from the repository root, as you would at a shell, and check its exit status.
    (OMP_NUM_THREADS=1 unless you set it: small models train faster with one thread on a busy CPU.)"""
    print(f"\n$ nlc {' '.join(shlex.quote(a) for a in args)}", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    rc = subprocess.run([sys.executable, "-m", "nlc.runtime.cli", *args], cwd=ROOT, env=env).returncode
    if rc != expect:
        sys.exit(f"`nlc {args[0]}` exited with status {rc}" + (f", expected {expect}" if expect else ""))

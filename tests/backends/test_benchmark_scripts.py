"""The card session's scripts run on a CPU at toy sizes under Triton's interpreter, so that a
script bug does not cost device time: `benchmarks/kernels.py --toy` (the issue's benchmark) writes
its table with a time for every row it was asked for."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_kernel_benchmark_runs_at_toy_size(tmp_path):
    out = tmp_path / "kernels.md"
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernels.py"), "--toy", "--rows", "delta,momentum",
                        "--out", str(out)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [ln.split("|")[1:-1] for ln in out.read_text().splitlines() if ln.startswith("| 40 |")]
    assert [c[1].strip() for c in rows] == ["nlc triton", "nlc torch chunk", "momentum memory triton",
                                            "momentum memory torch"]
    for c in rows:                      # fwd ms and fwd+bwd ms: measured, positive, finite
        assert all(0 < float(x) < math.inf for x in (c[2], c[3])), c

"""Every kernel the shipped specs generate compiles for an H100 (sm_90) and fits its shared memory,
checked on this CPU: Triton's bundled ptxas compiles for a target without a GPU present.

The interpreter forgives what a GPU rejects (tiles over the shared memory, shapes a dot cannot
take), so this holds the launch configurations of ``delta.launch`` and ``deep._config`` to the
card: the generalized delta kernels at the benchmark's K = V = 128 (the widest tiles nlc
launches), the DPLR, momentum-memory and deep-memory kernels at the shipped levels' own sizes, the flow prologue. By
default the widest variant of each skeleton (about 3 minutes on 2 cores with a cold Triton cache,
seconds with a warm one); ``NLC_SM90_ALL=1`` compiles every variant in float32 and bfloat16 (for
skeletons 1c, 1d and 2: with the TF32 products of 16-bit inputs too); ``NLC_SM90_CORNERS=1`` also
compiles each skeleton at the corners of the sizes its plan accepts (about 10 minutes).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

H100_SMEM = 232448          # bytes of shared memory one block may use on sm_90 (227 KB)


def test_every_shipped_kernel_compiles_for_sm90_and_fits():
    pytest.importorskip("triton", reason="compiling for sm_90 needs Triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["NLC_CACHE_DIR"] = os.environ.get("NLC_CACHE_DIR", "")
    script = Path(__file__).with_name("sm90_compile.py")
    args = ["--all"] if os.environ.get("NLC_SM90_ALL") else []    # every variant: about 8 minutes
    r = subprocess.run([sys.executable, str(script), *args], env={k: v for k, v in env.items() if v}, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    kernels = {row["kernel"] for row in rows}
    assert {"delta_prep", "delta_state_fwd", "delta_out", "delta_state_bwd", "delta_chunk_bwd",
            "mlp_chunk_fwd", "mlp_chunk_bwd", "diag_state_fwd", "diag_out", "diag_state_bwd", "diag_dw", "diag_dqk", "flow_fwd", "flow_bwd",
            "momentum_fwd", "momentum_bwd", "dplr_prep", "dplr_state_fwd", "dplr_out", "dplr_state_bwd",
            "dplr_chunk_bwd"} <= kernels
    over = [row for row in rows if row["smem"] > H100_SMEM]
    assert not over, f"over the H100's {H100_SMEM} bytes of shared memory: {over}"


@pytest.mark.skipif(not os.environ.get("NLC_SM90_CORNERS"),
                    reason="each skeleton at the corners of the sizes its plan accepts, every products choice: about "
                           "10 minutes on 2 cores; run with NLC_SM90_CORNERS=1")
def test_the_largest_levels_each_skeleton_accepts_fit():
    """What a user's spec can send to a kernel compiles for an H100 and fits its shared memory: the
    bounds plan.DPLR_MAX_K, MOMENTUM_TILE, MLP_MAX_DIM (and DELTA_MAX_K, the default test's K)."""
    pytest.importorskip("triton", reason="compiling for sm_90 needs Triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("sm90_compile.py")
    r = subprocess.run([sys.executable, str(script), "--corners"], env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 3 * 5 + 12 + 12, rows       # DPLR: 3 dtypes x 5 kernels; momentum, deep: 12 each
    over = [row for row in rows if row["smem"] > H100_SMEM]
    assert not over, f"over the H100's {H100_SMEM} bytes of shared memory: {over}"

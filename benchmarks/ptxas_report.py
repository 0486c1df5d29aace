"""What ptxas makes of nlc's Triton kernels for an H100 (sm_90), on a CPU: registers per thread,
spill stores and loads (bytes) and shared memory (bytes, Triton's dynamic allocation) of every
kernel of every skeleton variant, as a markdown table. Triton's bundled ptxas needs no GPU.

    python benchmarks/ptxas_report.py [--only delta] > report.md

Kernels: the generalized delta (skeleton 1, every DECAY x ERASE variant) and the per-channel one
(skeleton 1b) at K = V = 128, chunk 64, with float32 and with bfloat16 inputs (the pointers the
wrapper passes: the inputs in their dtype, workspaces and outputs in float32), each kernel with
the launch configuration (tile constants, num_warps, num_stages) that ``delta.launch`` /
``diag.launch`` give; the deep memory (skeleton 2) at Titans' memory level (D 64, hidden 128,
chunk 64, momentum, retention, current read) and at Hope's M_mem (256 wide, erase, self target),
whose wrapper casts every input to float32; the momentum matrix memory (skeleton 1c) at
titans_linear's level (K = V = 64) and at K = V = 128 with and without the erase, chunk 64, float32;
the DPLR form (skeleton 1d) at rwkv7's K = V = 64 and at 128, float32; the flow prologue (skeleton
3) at gated DeltaNet's key flow (convolution 4, SiLU, l2norm), K = 128, float32 and bfloat16. Skeletons 1c, 1d and 2 also
with the TF32 products they take for 16-bit inputs (``plan.products``; float32 tiles either way).
Run it without ``TRITON_INTERPRET``; a kernel that fails to compile is a row saying so.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from nlc.backends.triton import template  # noqa: E402

TY = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}
# pointer arguments that carry the caller's inputs (their dtype); every other pointer is float32
INPUTS = {"q_ptr", "k_ptr", "w_ptr", "la_ptr", "b_ptr", "h0_ptr", "p_ptr", "dy_ptr"}


def ptxas_stats(log: str) -> dict:
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {"regs": int(regs.group(1)) if regs else None,
            "spill_st": int(spill.group(1)) if spill else None,
            "spill_ld": int(spill.group(2)) if spill else None}


def compile_stats(fn, constexprs: dict, stages: int, warps: int, dtype) -> dict:
    sig = {n: "constexpr" if n in constexprs else
           ((TY[dtype] if n in INPUTS else "*fp32") if n.endswith("_ptr") else "i32") for n in fn.arg_names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    out = io.StringIO()
    knobs.nvidia.dump_ptxas_log = True
    t0 = time.time()
    with contextlib.redirect_stdout(out):
        ck = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_stages": stages, "num_warps": warps})
    log = out.getvalue()
    if "registers" not in log:      # a Triton cache hit: ptxas did not run, run it on the PTX
        from triton.backends.nvidia.compiler import get_ptxas
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(ck.asm["ptx"])
        try:
            r = subprocess.run([get_ptxas(90).path, "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a", f.name,
                                "-o", os.devnull], capture_output=True, text=True)
            log = r.stderr + r.stdout
        finally:
            os.unlink(f.name)
    return dict(ptxas_stats(log), smem=ck.metadata.shared, secs=time.time() - t0)


def delta_rows(dtypes):
    from nlc.backends.triton.delta import launch, variant
    extra = {"delta_state_fwd": {"HAS_H0": True}, "delta_state_bwd": {"HAS_DHT": True}}
    for decay, erase in itertools.product((False, True), repeat=2):
        mod = template.load("delta_chunk", variant(decay, erase), interpret=False)
        name = "delta " + ("+".join(f for f, on in (("DECAY", decay), ("ERASE", erase)) if on) or "plain")
        for dtype in dtypes:
            for kern, cfg in launch(128, 128, 64, dtype).items():
                if hasattr(mod, kern):
                    meta, stages, warps = _unpack(cfg)
                    yield name, dtype, kern, getattr(mod, kern), dict(meta, **extra.get(kern, {})), stages, warps
        for kern, cfg in launch(128, 128, 64, torch.float32).items():   # float32 with the other skeletons' products
            if hasattr(mod, kern):
                meta, stages, warps = _unpack(cfg)
                yield (f"{name} (tf32x3)", torch.float32, kern, getattr(mod, kern),
                       dict(meta, PREC="tf32x3", **extra.get(kern, {})), stages, warps)


def diag_rows(dtypes):
    from nlc.backends.triton.diag import launch
    mod = template.load("diag_chunk", {}, interpret=False)
    extra = {"diag_state_fwd": {"HAS_H0": True}, "diag_state_bwd": {"HAS_DHT": True}}
    for dtype in dtypes:
        for kern, cfg in launch(128, 128, dtype).items():
            meta, stages, warps = _unpack(cfg)
            yield "diag", dtype, kern, getattr(mod, kern), dict(meta, **extra.get(kern, {})), stages, warps
    for kern, cfg in launch(128, 128, torch.float32).items():   # float32 with the other skeletons' products
        meta, stages, warps = _unpack(cfg)
        yield "diag (tf32x3)", torch.float32, kern, getattr(mod, kern), dict(meta, PREC="tf32x3", **extra.get(kern, {})), stages, warps


def mlp_rows():
    from nlc.backends.triton.deep import _config, _pow2
    from nlc.backends.triton.plan import mlp_slice
    titans = dict(MOMENTUM=True, RETAIN=True, ERASE=False, SELF_TARGET=False, RESIDUAL=True, CURRENT=True,
                  L2=True, GELU=False)               # titans.yaml's memory level: D 64, hidden 128
    hope = dict(MOMENTUM=False, RETAIN=True, ERASE=True, SELF_TARGET=True, RESIDUAL=True, CURRENT=True,
                L2=True, GELU=False)                 # hope.yaml's M_mem: one 256-wide head, hidden 256
    gen = dict(hope, CURRENT=False)                  # hope.yaml's generators: read at the anchor, chunk 16
    # (name, flags, D, hidden, chunk): the shipped levels, then Hope's flags at the backward
    # kernel's tile bound (plan.MLP_BWD_TILE: chunk x width 4096)
    levels = (("mlp titans", titans, 64, 128, 64), ("mlp hope M_mem", hope, 256, 256, 64),
              ("mlp hope generators", gen, 256, 256, 16), ("mlp hope flags 64 x 64", hope, 64, 128, 64),
              ("mlp hope flags 32 x 128", hope, 128, 128, 32))
    # float32 inputs ("tf32x3" products), then 16-bit inputs ("tf32"; the wrapper casts the inputs
    # to float32, so the pointers are float32 either way)
    for prec, only in (("tf32x3", None), ("tf32", None)):
        for name, flags, D, hidden, C in levels:
            if only is not None and name not in only:
                continue
            mod = template.load("mlp_chunk", flags, interpret=False)
            W = [torch.empty(1, 1, D, hidden), torch.empty(1, 1, hidden, D)]
            *_, cfg, warps = _config(torch.empty(1, 1, 1, D), W, C, prec)
            label = name if prec == "tf32x3" else f"{name} (16-bit inputs: tf32)"
            yield label, torch.float32, "mlp_chunk_fwd", mod.mlp_chunk_fwd, dict(cfg, BV=_pow2(D)), 1, warps
            bwd = dict({k: cfg[k] for k in ("BC", "BO", "BJ", "ACC", "PREC")}, BK=mlp_slice(C, D), DETACH=False)
            yield label, torch.float32, "mlp_chunk_bwd", mod.mlp_chunk_bwd, bwd, 1, warps


def dplr_rows():
    from nlc.backends.triton.dplr import launch
    mod = template.load("dplr_chunk", {}, interpret=False)
    extra = {"dplr_state_fwd": {"HAS_H0": True}, "dplr_state_bwd": {"HAS_DHT": True}}
    for K, prec in itertools.product((64, 128), ("tf32x3", "tf32")):   # rwkv7.yaml's heads, the benchmark's
        label = f"dplr K {K}" + ("" if prec == "tf32x3" else " (16-bit inputs: tf32)")
        for kern, (meta, stages, warps) in launch(K, K, torch.float32, prec).items():
            yield label, torch.float32, kern, getattr(mod, kern), dict(meta, **extra.get(kern, {})), stages, warps


def momentum_rows():
    from nlc.backends.triton.momentum import launch, precision, variant
    # (name, erase, K = V, chunk): titans_linear.yaml's memory level (K 64), the benchmark's heads,
    # and the other end of plan.MOMENTUM_TILE (K 256 at chunk 32)
    levels = (("momentum titans_linear", False, 64, 64), ("momentum", False, 128, 64), ("momentum ERASE", True, 128, 64),
              ("momentum ERASE", True, 256, 32))
    for (name, erase, K, C), half in itertools.product(levels, (False, True)):
        mod = template.load("momentum_chunk", variant("l2", erase), interpret=False)
        prec = precision(torch.bfloat16 if half else torch.float32, K)
        meta, warps = launch(K, K, torch.float32, prec)
        label = f"{name} K {K} chunk {C}" + (f" (16-bit inputs: {prec})" if half else "")
        for kern in ("momentum_fwd", "momentum_bwd"):
            yield label, torch.float32, kern, getattr(mod, kern), dict(meta, BC=C, NM=4 if erase else 1), 1, warps


def flow_rows(dtypes):
    """Skeleton 3 at gated DeltaNet's key flow, l2norm(silu(conv(proj(x), 4))), at K = 128."""
    import triton.language as tl
    from nlc.backends.triton.prologue import halo, kernels
    mod = kernels(True, ("silu", "l2norm"), False)
    meta = dict(W=4, BT=16, BK=128, ACC=tl.float32)
    for dtype in dtypes:
        yield "flow conv4 silu l2norm", dtype, "flow_fwd", mod.flow_fwd, meta, 1, 4
        yield "flow conv4 silu l2norm", dtype, "flow_bwd", mod.flow_bwd, dict(meta, HB=halo(4)), 1, 4


def _unpack(cfg):
    """(meta, stages) or (meta, stages, warps): the launch tables before and after num_warps."""
    return (*cfg, 4) if len(cfg) == 2 else cfg


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--only", choices=["delta", "diag", "dplr", "mlp", "momentum", "flow"], action="append")
    args = p.parse_args()
    only = set(args.only or ["delta", "diag", "dplr", "mlp", "momentum", "flow"])
    dtypes = (torch.float32, torch.bfloat16)
    rows = itertools.chain(delta_rows(dtypes) if "delta" in only else (), diag_rows(dtypes) if "diag" in only else (),
                           mlp_rows() if "mlp" in only else (), momentum_rows() if "momentum" in only else (),
                           dplr_rows() if "dplr" in only else (), flow_rows(dtypes) if "flow" in only else ())
    print(f"ptxas for sm_90 (triton {triton.__version__}), K = V = 128, chunk 64; smem: Triton's dynamic shared memory\n")
    print("| variant | inputs | kernel | warps | stages | regs/thread | spill stores (B) | spill loads (B) | smem (B) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, dtype, kern, fn, meta, stages, warps in rows:
        dt = str(dtype).replace("torch.", "")
        try:
            s = compile_stats(fn, meta, stages, warps, dtype)
            cells = [s["regs"], s["spill_st"], s["spill_ld"], s["smem"]]
        except Exception as e:  # noqa: BLE001 - a kernel that does not compile is a row
            cells = [f"error: {type(e).__name__}: {str(e).splitlines()[0][:80]}", "", "", ""]
            s = {"secs": 0}
        print(f"| {name} | {dt} | {kern} | {warps} | {stages} | " + " | ".join(map(str, cells)) + " |", flush=True)
        print(f"{name} {dt} {kern}: {s['secs']:.0f} s", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()

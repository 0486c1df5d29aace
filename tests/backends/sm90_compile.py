"""Compile the kernels the shipped specs generate for an H100 (sm_90) and print, as JSON lines,
each one's shared memory in bytes: ``{"variant": ..., "kernel": ..., "smem": ...}``.

Run in its own process (test_triton_sm90.py does): Triton must be imported without
``TRITON_INTERPRET``, which the test session sets. Triton's bundled ptxas compiles for a target
that is not present, so no GPU is needed.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import nlc
from nlc.backends.triton import template
from nlc.backends.triton.plan import mlp_slice, plan

ROOT = Path(__file__).resolve().parents[2]


# the products of float32 inputs and of 16-bit ones (plan.products), for skeletons 1c, 1d and 2
PRECS = ("tf32x3", "tf32")
INPUTS = {"q_ptr", "k_ptr", "w_ptr", "la_ptr", "b_ptr", "h0_ptr"}   # the caller's tensors, in its dtype


def compile_smem(fn, constexprs: dict, stages: int, warps: int = 4, dtype=torch.float32) -> int:
    """Shared memory of ``fn`` compiled for sm_90; the pointers named in INPUTS are of ``dtype``
    (the generalized delta's inputs as its wrapper passes them), every other one float32."""
    ty = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}[dtype]
    sig = {n: "constexpr" if n in constexprs else ((ty if n in INPUTS else "*fp32") if n.endswith("_ptr") else "i32")
           for n in fn.arg_names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_stages": stages, "num_warps": warps}).metadata.shared


def placements():
    from nlc.instance import instanced
    for path in sorted((ROOT / "specs").glob("*.yaml")):
        spec = nlc.load(path)
        if not hasattr(spec, "levels"):
            continue
        inst = instanced(spec)
        K = spec.model.d_model // spec.model.heads
        for name, p in plan(spec).items():
            if p.skeleton:
                lv = inst.levels[name]
                d_out = 1 if lv.out == "scalar" else K
                yield spec.name, name, p, (K, int(round(K * getattr(lv.memory, "expansion", 1))), d_out, lv.chunk_size())


def main(everything: bool):
    """``everything``: every variant in float32 and bfloat16, every deep-memory level; else, since
    each compile takes 5-80 s on a CPU, the widest of each skeleton: the generalized delta with
    retention and erase (the superset of its tiles) in float32, the per-channel kernels, and
    the deep memory of titans (the largest tiles: D 64, hidden 256, momentum)."""
    from nlc.backends.triton.deep import _config, _pow2
    from nlc.backends.triton.delta import launch
    seen = set()
    for spec, level, p, (D, hidden, d_out, chunk) in placements():
        key = (p.skeleton, tuple(sorted(p.flags.items())), D, hidden, d_out, chunk)
        if key in seen or (not everything and p.skeleton == "delta_chunk" and not all(p.flags.values())):
            continue
        if not everything and p.skeleton == "mlp_chunk" and (spec, level) != ("titans", "memory"):
            continue
        seen.add(key)
        mod = template.load(p.skeleton, p.flags, interpret=False)
        variant = f"{spec}/{level}"
        if p.skeleton == "delta_chunk":   # at the benchmark's widest tiles, K = V = 128, both input dtypes
            for dtype in (torch.float32, torch.bfloat16)[:2 if everything else 1]:
                for name, (meta, stages, warps) in launch(128, 128, 64, dtype).items():
                    if hasattr(mod, name):
                        extra = {"delta_state_fwd": {"HAS_H0": True}, "delta_state_bwd": {"HAS_DHT": True}}.get(name, {})
                        print(json.dumps({"variant": f"{variant} {dtype}", "kernel": name,
                                          "smem": compile_smem(getattr(mod, name), dict(meta, **extra), stages, warps,
                                                               dtype)}), flush=True)
        elif p.skeleton == "diag_chunk":
            from nlc.backends.triton.diag import launch as diag_launch
            for name, (meta, stages, warps) in diag_launch(128, 128, torch.float32).items():
                extra = {"diag_state_fwd": {"HAS_H0": True}, "diag_state_bwd": {"HAS_DHT": True}}.get(name, {})
                print(json.dumps({"variant": variant, "kernel": name,
                                  "smem": compile_smem(getattr(mod, name), dict(meta, **extra), stages, warps)}),
                      flush=True)
        elif p.skeleton == "dplr_chunk":       # at the spec's head size (--all: 128 too)
            from nlc.backends.triton.dplr import launch as dplr_launch
            extra = {"dplr_state_fwd": {"HAS_H0": True}, "dplr_state_bwd": {"HAS_DHT": True}}
            for prec in PRECS[:2 if everything else 1]:
                for name, (meta, stages, warps) in dplr_launch(128 if everything else D, 128 if everything else D,
                                                               torch.float32, prec).items():
                    print(json.dumps({"variant": f"{variant} {prec}", "kernel": name,
                                      "smem": compile_smem(getattr(mod, name), dict(meta, **extra.get(name, {})),
                                                           stages, warps)}), flush=True)
        elif p.skeleton == "momentum_chunk":   # at the spec's head size (--all: 128 too) and chunk
            from nlc.backends.triton.momentum import launch as momentum_launch, precision
            K = 128 if everything else D
            for prec in sorted({precision(dtype, K) for dtype in (torch.float32, torch.bfloat16)[:2 if everything else 1]}):
                meta, warps = momentum_launch(K, K, torch.float32, prec)
                meta = dict(meta, BC=chunk, NM=4 if p.flags["ERASE"] else 1)
                for name in ("momentum_fwd", "momentum_bwd"):
                    print(json.dumps({"variant": f"{variant} {prec}", "kernel": name,
                                      "smem": compile_smem(getattr(mod, name), meta, 1, warps)}), flush=True)
        else:                              # at the spec's own sizes
            W = [torch.empty(1, 1, d_out, hidden), torch.empty(1, 1, hidden, D)]
            for prec in PRECS[:2 if everything else 1]:
                *_, cfg, warps = _config(torch.empty(1, 1, 1, D), W, chunk, prec)
                cfg = dict(cfg, BV=_pow2(D if p.flags["SELF_TARGET"] else d_out))
                print(json.dumps({"variant": f"{variant} {prec}", "kernel": "mlp_chunk_fwd",
                                  "smem": compile_smem(mod.mlp_chunk_fwd, cfg, 1, warps)}), flush=True)
                bwd = dict({k: cfg[k] for k in ("BC", "BO", "BJ", "ACC", "PREC")}, DETACH=False,
                           BK=mlp_slice(chunk, D, d_out))
                print(json.dumps({"variant": f"{variant} {prec}", "kernel": "mlp_chunk_bwd",
                                  "smem": compile_smem(mod.mlp_chunk_bwd, bwd, 1, warps)}), flush=True)


def prologues(everything: bool):
    """Skeleton 3 for the chains of the shipped specs' fused flows (K = 64, convolution width 4)."""
    import triton.language as tl
    from nlc.backends.triton.plan import flow_chains
    from nlc.backends.triton.prologue import halo, kernels
    chains = set()
    for path in sorted((ROOT / "specs").glob("*.yaml")):
        spec = nlc.load(path)
        if hasattr(spec, "levels"):                  # model specs, not optimizer specs
            chains |= set(flow_chains(spec))
    for width, ops in sorted(chains)[-1 if not everything else 0:]:   # the widest: conv + the most functions
        mod = kernels(width > 0, ops, False)
        meta = dict(W=max(width, 1), BT=16, BK=64, ACC=tl.float32)
        for name, extra in (("flow_fwd", {}), ("flow_bwd", {"HB": halo(max(width, 1))})):
            print(json.dumps({"variant": f"conv{width} {'-'.join(ops) or 'proj'}", "kernel": name,
                              "smem": compile_smem(getattr(mod, name), {**meta, **extra}, 1)}), flush=True)


def corners():
    """Each skeleton at the corners of the sizes its plan accepts, with every flag that enlarges its
    tiles and every products choice it can take (float32, 16-bit, float64): what a user's spec can
    send to a kernel, not only what the shipped specs do. The DPLR form at K = 128
    (``plan.DPLR_MAX_K``); the momentum memory with the erase at chunk x K 64 x 128 and 32 x 256
    (``plan.MOMENTUM_TILE``); the deep memory with every flag on at 256 wide (``plan.MLP_MAX_DIM``),
    chunks 64 and 16. (The delta kernels' corner, K = 128, is the default run's.)"""
    import triton.language as tl
    from nlc.backends.triton.deep import _config, _pow2
    from nlc.backends.triton.dplr import launch as dplr_launch
    from nlc.backends.triton.momentum import launch as momentum_launch, precision, variant
    dplr = template.load("dplr_chunk", {}, interpret=False)
    extra = {"dplr_state_fwd": {"HAS_H0": True}, "dplr_state_bwd": {"HAS_DHT": True}}
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for name, (meta, stages, warps) in dplr_launch(128, 128, dtype).items():
            print(json.dumps({"variant": f"dplr K 128 {dtype}", "kernel": name,
                              "smem": compile_smem(getattr(dplr, name), dict(meta, **extra.get(name, {})), stages, warps)}),
                  flush=True)
    mod = template.load("momentum_chunk", variant("l2", True), interpret=False)
    for (C, K), dtype in ((c, d) for c in ((64, 128), (32, 256)) for d in (torch.float32, torch.bfloat16, torch.float64)):
        meta, warps = momentum_launch(K, K, dtype, precision(dtype, K))
        for name in ("momentum_fwd", "momentum_bwd"):
            print(json.dumps({"variant": f"momentum ERASE {C} x {K} {meta['PREC']}", "kernel": name,
                              "smem": compile_smem(getattr(mod, name), dict(meta, BC=C, NM=4), 1, warps)}), flush=True)
    flags = dict(MOMENTUM=True, RETAIN=True, ERASE=True, SELF_TARGET=True, RESIDUAL=True, CURRENT=True, L2=True,
                 GELU=True)
    mod = template.load("mlp_chunk", flags, interpret=False)
    W = [torch.empty(1, 1, 256, 256), torch.empty(1, 1, 256, 256)]
    for C, prec in ((c, p) for c in (64, 16) for p in ("tf32x3", "tf32", "ieee")):
        q = torch.empty(1, 1, 1, 256, dtype=torch.float64 if prec == "ieee" else torch.float32)
        *_, cfg, warps = _config(q, W, C, prec)
        assert cfg["ACC"] == (tl.float64 if prec == "ieee" else tl.float32)
        bwd = dict({k: cfg[k] for k in ("BC", "BO", "BJ", "ACC", "PREC")}, DETACH=False, BK=mlp_slice(C, 256))
        for name, meta in (("mlp_chunk_fwd", dict(cfg, BV=_pow2(256))), ("mlp_chunk_bwd", bwd)):
            print(json.dumps({"variant": f"mlp every flag 256 chunk {C} {prec}", "kernel": name,
                              "smem": compile_smem(getattr(mod, name), meta, 1, warps)}), flush=True)


if __name__ == "__main__":
    if "--corners" in sys.argv:
        sys.exit(corners())
    prologues("--all" in sys.argv)
    sys.exit(main("--all" in sys.argv))

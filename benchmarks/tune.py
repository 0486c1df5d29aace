"""Sweep a Triton kernel family's launch choices on a GPU, float32 or bfloat16 inputs (--dtype):
tl.dot's input precision and warps per program (and, for the deep memory, the hidden block BJ).
For each choice: forward and forward + backward ms (do_bench) and the largest relative error of the
output and of every input's gradient against the float64 torch form on the same input values, all
in one run.

  --kernel mlp: Titans' memory level (D 64, hidden 128, chunk 64, H 16, B 1).
  --kernel delta: gated DeltaNet (K = V = 128, chunk 64, H 16, B 1), every kernel of the family.
  --kernel momentum: the momentum matrix memory (K = V = 128, chunk 64, H 16, B 1, retention).
  --kernel dplr: the DPLR form (RWKV-7's; K = V = 128, H 16, B 1), every kernel of the family.

Compiling is most of the cost, so the choices are first compiled side by side in worker
processes (Triton's on-disk cache then serves the timing process), then timed one at a time; a
choice whose compile fails or runs past --compile-s is left out of the table.

    python benchmarks/tune.py --kernel mlp [--T 2048] [--dtype bf16]   # on a GPU
    TRITON_INTERPRET=1 python benchmarks/tune.py --kernel delta --toy   # CPU: the script itself
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import time

import torch

import kernels as bench

# per family: (input precision, num_warps or None for the shipped ones, BJ); the shipped choice first
CHOICES = {
    "mlp": [("tf32x3", 4, 16), ("ieee", 16, 16), ("ieee", 8, 16), ("tf32x3", 8, 32), ("tf32", 4, 32)],
    "delta": [("ieee", None, None), ("tf32x3", None, None), ("tf32x3", 4, None), ("tf32", None, None)],
    "momentum": [("tf32x3", None, None), ("ieee", None, None), ("ieee", 8, None), ("tf32x3", 8, None),
                 ("tf32", None, None)],
    "dplr": [("tf32x3", None, None), ("ieee", None, None), ("tf32x3", 8, None), ("tf32", None, None)],
}
# with bfloat16 inputs (plan.products: TF32 products), the shipped choice first; the deep memory's
# BJ 32 fits every shipped level since its backward takes slices (131 KB of shared memory at most)
CHOICES16 = {
    "mlp": [("tf32", 4, 16), ("tf32", 4, 32), ("tf32x3", 4, 16), ("tf32", 8, 32)],
    "delta": [(None, None, None), ("tf32", 4, None)],
    "momentum": [("tf32", None, None), ("tf32x3", None, None), ("tf32", 8, None)],
    "dplr": [("tf32", None, None), ("tf32x3", None, None), ("tf32", 8, None)],
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def use(kernel, choice):
    """Make the family's kernels launch with this choice (patches its launch configuration)."""
    prec, warps, bj = choice
    if kernel == "mlp":
        from nlc.backends.triton import deep
        orig = deep.__dict__.setdefault("_config_shipped", deep._config)

        def config(q, W, C, shipped_prec=None):
            D, hid, d_out, cfg, shipped = orig(q, W, C, shipped_prec)
            cfg.update(BJ=bj, PREC=prec if q.dtype != torch.float64 else "ieee")
            return D, hid, d_out, cfg, warps or shipped
        deep._config = config
    elif kernel == "momentum":
        from nlc.backends.triton import momentum
        orig = momentum.__dict__.setdefault("_launch_shipped", momentum.launch)

        def launch(K, V, dtype, shipped_prec=None):
            meta, shipped = orig(K, V, dtype, shipped_prec)
            return (dict(meta, PREC=prec) if dtype != torch.float64 else meta), warps or shipped
        momentum.launch = launch
    elif kernel == "dplr":
        from nlc.backends.triton import dplr
        orig = dplr.__dict__.setdefault("_launch_shipped", dplr.launch)

        def launch(K, V, dtype, shipped_prec=None):
            cfg = orig(K, V, dtype, shipped_prec)
            if dtype == torch.float64:
                return cfg
            return {n: (dict(meta, PREC=prec), stages, warps or w) for n, (meta, stages, w) in cfg.items()}
        dplr.launch = launch
    else:
        from nlc.backends.triton import delta
        orig = delta.__dict__.setdefault("_launch_shipped", delta.launch)

        def launch(K, V, chunk_size, dtype, interpret=False):
            cfg = orig(K, V, chunk_size, dtype, interpret)
            if dtype == torch.float64:
                return cfg
            return {n: (dict(meta, PREC=prec or meta["PREC"]), stages, warps or w)
                    for n, (meta, stages, w) in cfg.items()}
        delta.launch = launch


def inputs(kernel, args, dtype):
    if kernel == "mlp":
        B, T, H, D, hid = (1, 64, 2, 16, 32) if args.toy else (1, args.T, 16, 64, 128)
        return bench.mlp_inputs(B, T, H, D, hid, dtype, args.device), f"B={B} T={T} H={H} D={D} hidden={hid} chunk 64"
    B, T, H, K = (1, 40, 2, 16) if args.toy else (1, args.T, 16, 128)
    if kernel == "momentum":
        return bench.momentum_inputs(B, T, H, K, dtype, args.device), f"B={B} T={T} H={H} K=V={K} chunk 64"
    if kernel == "dplr":
        return bench.dplr_inputs(B, T, H, K, dtype, args.device), f"B={B} T={T} H={H} K=V={K} chunk 16"
    return bench.inputs(B, T, H, K, K, dtype, args.device), f"B={B} T={T} H={H} K=V={K} chunk 64"


def call(kernel, x, backend):
    if kernel == "mlp":
        return bench.mlp_call(x, backend)
    if kernel == "momentum":
        return bench.momentum_call(x, backend)
    if kernel == "dplr":
        return bench.dplr_call(x, backend)
    from nlc.backends.torch import ops
    return ops.gated_delta_rule(x["q"], x["k"], x["v"], x["beta"], x["g"], backend=backend)[0]


def compile_one(kernel, choice, args):
    use(kernel, choice)
    call(kernel, inputs(kernel, args, DTYPES[args.dtype])[0], "triton").sum().backward()
    return choice


def rel(a, b):
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kernel", choices=list(CHOICES), default="mlp")
    p.add_argument("--T", type=int, default=2048)
    p.add_argument("--jobs", type=int, default=8)
    p.add_argument("--compile-s", type=float, default=150, help="the compile phase's time limit")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--toy", action="store_true", help="tiny sizes on CPU under the interpreter")
    args = p.parse_args()
    args.device = "cpu" if args.toy else "cuda"
    table = (CHOICES if args.dtype == "fp32" else CHOICES16)[args.kernel]
    choices = table[:2] if args.toy else table
    pool = mp.get_context("spawn").Pool(min(args.jobs, len(choices)))
    pending = [(c, pool.apply_async(compile_one, (args.kernel, c, args))) for c in choices]
    t0, ready = time.monotonic(), []
    for c, r in pending:
        try:
            r.get(timeout=max(1.0, t0 + args.compile_s - time.monotonic()))
            ready.append(c)
            print("compiled", c, f"{time.monotonic() - t0:.0f} s", flush=True)
        except Exception as e:   # a compile error, a crash on the card, or past the limit
            print("left out", c, type(e).__name__, str(e)[:100], flush=True)
    pool.terminate()
    x, shape = inputs(args.kernel, args, DTYPES[args.dtype])
    x64 = {n: t.detach().double().requires_grad_() for n, t in x.items()}
    o64 = call(args.kernel, x64, "torch")
    w = torch.randn_like(o64)
    ref = [o64.detach()] + list(torch.autograd.grad((o64 * w).sum(), list(x64.values())))
    timer = bench.timer(args.device)
    print(f"{args.kernel}: {shape}, {args.dtype} inputs, {args.device}")
    print("| products | warps | BJ | fwd ms | fwd+bwd ms | max rel err (output, grads) |\n"
          "| --- | ---: | ---: | ---: | ---: | ---: |")
    for c in [("torch", "", "")] + ready:
        backend = "torch" if c[0] == "torch" else "triton"
        if backend == "triton":
            use(args.kernel, c)
        try:
            o = call(args.kernel, x, backend)
            got = [o.detach()] + list(torch.autograd.grad((o * w.float()).sum(), list(x.values())))
            err = max(rel(g, r) for g, r in zip(got, ref))

            def fwd():
                with torch.no_grad():
                    call(args.kernel, x, backend)
            tf, tfb = timer(fwd), timer(lambda: call(args.kernel, x, backend).sum().backward())
            shown = ["shipped" if v is None else v for v in c]
            print(f"| {shown[0]} | {shown[1]} | {shown[2]} | {tf:.3f} | {tfb:.3f} | {err:.2e} |", flush=True)
        except Exception as e:   # one failing choice must not lose the table
            print(f"| {c[0]} | {c[1]} | {c[2]} | {type(e).__name__}: {str(e)[:100]} | | |", flush=True)


if __name__ == "__main__":
    main()

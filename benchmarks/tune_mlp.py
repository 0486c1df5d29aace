"""Sweep the deep-memory kernels' launch choices on a GPU: tl.dot's input precision, warps per
program and the hidden block BJ, on Titans' memory level (D 64, hidden 128, chunk 64, H 16,
float32, B 1). For each choice: forward and forward + backward ms (do_bench), and the relative
error of the output and of every input's gradient against the float64 torch chunk form.

Compiling is most of the cost, so the choices are first compiled side by side in worker
processes (Triton's on-disk cache then serves the timing process), then timed one at a time.

    python benchmarks/tune_mlp.py [--T 2048] [--jobs 10]          # on a GPU
    TRITON_INTERPRET=1 python benchmarks/tune_mlp.py --toy        # CPU: the script itself
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import time

import torch

import kernels as bench

# (input precision, num_warps, BJ); the shipped choice first
CHOICES = [("ieee", 16, 16), ("ieee", 8, 16), ("ieee", 4, 16), ("ieee", 8, 32),
           ("tf32x3", 16, 16), ("tf32x3", 8, 16), ("tf32x3", 4, 16), ("tf32x3", 8, 32),
           ("tf32", 8, 16), ("tf32", 4, 32)]


def use(choice):
    """Make the deep-memory kernels launch with this choice (patches ``deep._config``)."""
    from nlc.backends.triton import deep
    orig = deep.__dict__.setdefault("_config_shipped", deep._config)
    prec, warps, bj = choice

    def config(q, W, C):
        D, hid, d_out, cfg, _ = orig(q, W, C)
        cfg.update(BJ=bj, PREC=prec if q.dtype != torch.float64 else "ieee")
        return D, hid, d_out, cfg, warps
    deep._config = config


def shape(args):
    return (1, 64, 2, 16, 32) if args.toy else (1, args.T, 16, 64, 128)   # B, T, H, D, hidden


def compile_one(choice, args):
    use(choice)
    B, T, H, D, hid = shape(args)
    x = bench.mlp_inputs(B, T, H, D, hid, torch.float32, args.device)
    bench.mlp_call(x, "triton").sum().backward()
    return choice


def rel(a, b):
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--T", type=int, default=2048)
    p.add_argument("--jobs", type=int, default=len(CHOICES))
    p.add_argument("--compile-s", type=float, default=150, help="the compile phase's time limit")
    p.add_argument("--toy", action="store_true", help="tiny sizes on CPU under the interpreter")
    args = p.parse_args()
    args.device = "cpu" if args.toy else "cuda"
    choices = [CHOICES[i] for i in (0, 3, 4)] if args.toy else CHOICES
    pool = mp.get_context("spawn").Pool(min(args.jobs, len(choices)))
    pending = [(c, pool.apply_async(compile_one, (c, args))) for c in choices]
    deadline, ready = time.monotonic() + args.compile_s, []
    for c, r in pending:   # a choice whose compile runs past the deadline is left out
        try:
            r.get(timeout=max(1.0, deadline - time.monotonic()))
            ready.append(c)
            print("compiled", c, f"{time.monotonic() - deadline + args.compile_s:.0f} s", flush=True)
        except Exception as e:
            print("left out", c, type(e).__name__, str(e)[:100], flush=True)
    pool.terminate()
    choices = ready
    B, T, H, D, hid = shape(args)
    x = bench.mlp_inputs(B, T, H, D, hid, torch.float32, args.device)
    x64 = {n: t.detach().double().requires_grad_() for n, t in x.items()}
    o64 = bench.mlp_call(x64, "torch")
    w = torch.randn_like(o64)
    ref = [o64.detach()] + list(torch.autograd.grad((o64 * w).sum(), list(x64.values())))
    bench_fn = bench.timer(args.device)
    print(f"Titans' memory level, B={B} T={T} H={H} D={D} hidden={hid} chunk 64, float32, {args.device}")
    print("| precision | warps | BJ | fwd ms | fwd+bwd ms | max rel err (output, grads) |\n| --- | ---: | ---: | ---: | ---: | ---: |")
    for c in [("torch", "", "")] + choices:
        backend = "torch" if c[0] == "torch" else "triton"
        if backend == "triton":
            use(c)
        try:
            o = bench.mlp_call(x, backend)
            got = [o.detach()] + list(torch.autograd.grad((o * w.float()).sum(), list(x.values())))
            err = max(rel(g, r) for g, r in zip(got, ref))

            def fwd():
                with torch.no_grad():
                    bench.mlp_call(x, backend)
            tf, tfb = bench_fn(fwd), bench_fn(lambda: bench.mlp_call(x, backend).sum().backward())
            print(f"| {c[0]} | {c[1]} | {c[2]} | {tf:.3f} | {tfb:.3f} | {err:.2e} |", flush=True)
        except Exception as e:   # one failing choice must not lose the table
            print(f"| {c[0]} | {c[1]} | {c[2]} | {type(e).__name__}: {str(e)[:100]} | | |", flush=True)


if __name__ == "__main__":
    main()

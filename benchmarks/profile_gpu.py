"""Where the time of nlc's Triton kernels goes on a GPU: per-kernel CUDA time (torch.profiler) of
gated DeltaNet's chunked kernels (forward + backward) as shipped (each kernel's own num_warps) or
forced to the counts in --warps, and of Titans' MLP
memory (Triton forward and backward kernels, against the torch chunk form). A diagnostic for benchmarks/kernels.py's
table, run by benchmarks/gpu_check.sh (STEPS=profile).

    python benchmarks/profile_gpu.py [--T 8192] [--dtype bf16] [--warps 4 8] [--mlp-T 0]
    python benchmarks/profile_gpu.py --models gated_deltanet,transformer [--model-T 4096]

--models profiles one forward + backward of each shipped model spec instead (float32, B=1, on
`backend="auto"` and `"torch"`): where a model's step goes once the recurrence is a kernel. A wall
time far above the CUDA kernels' total is time spent launching (Python, small ops).
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from nlc.backends.torch import ops
from nlc.backends.triton import delta

import kernels as bench   # benchmarks/kernels.py: the same inputs as the table


def breakdown(fn, label, steps=3, top=10):
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / steps * 1e3
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total / 1e3, e.count) for e in prof.key_averages()]
    rows = sorted((r for r in rows if r[1] > 0), key=lambda r: -r[1])
    total = sum(r[1] for r in rows)
    print(f"\n{label}: wall {wall:.3f} ms per call, CUDA kernels {total:.3f} ms")
    for key, ms, n in rows[:top]:
        print(f"  {ms:9.3f} ms  x{n:<4} {key[:90]}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--T", type=int, default=8192, help="gated delta's T; 0 skips it")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--mlp-T", type=int, default=2048, help="0 skips the MLP memory")
    p.add_argument("--warps", type=int, nargs="*", default=[], help="also force these num_warps on every kernel")
    p.add_argument("--models", default="", help="comma-separated model specs: profile their training step instead")
    p.add_argument("--model-T", type=int, default=4096)
    p.add_argument("--model-backends", default="auto,torch")
    args = p.parse_args()
    if args.models:
        return models(args.models.split(","), args.model_T, args.model_backends.split(","))
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    if args.T:
        delta_rows(args, dtype)
    if not args.mlp_T:
        return

    class A:
        H, K = 16, 128
    mlp = bench.mlp_rows(1, args.mlp_T, A, dtype, "cuda")
    for name, fn in mlp.items():
        breakdown(lambda: fn().sum().backward(), f"{name} T={args.mlp_T} fwd+bwd", steps=1)
        with torch.no_grad():
            breakdown(fn, f"{name} T={args.mlp_T} fwd", steps=1)


def delta_rows(args, dtype):
    x = bench.inputs(1, args.T, 16, 128, 128, dtype, "cuda")
    qkv = [x[n] for n in ("q", "k", "v")]
    breakdown(lambda: ops.gated_delta_rule(*qkv, x["beta"], x["g"], backend="triton")[0].sum().backward(),
              f"gated delta triton T={args.T} {args.dtype} as shipped fwd+bwd")
    go = delta._go
    for warps in args.warps:
        delta._go = lambda mod, cfg, name, grid, *a, **f: go(mod, cfg, name, grid, *a, num_warps=warps, **f)
        breakdown(lambda: ops.gated_delta_rule(*qkv, x["beta"], x["g"], backend="triton")[0].sum().backward(),
                  f"gated delta triton T={args.T} {args.dtype} num_warps={warps} fwd+bwd")
    delta._go = go
    breakdown(lambda: ops.gated_delta_rule(*qkv, x["beta"], x["g"], backend="torch")[0].sum().backward(),
              f"gated delta torch chunk T={args.T} {args.dtype} fwd+bwd")


def models(names, T, backends):
    """One forward + backward of each compiled model spec, per backend: CUDA kernels by time."""
    import nlc
    ids = torch.randint(0, 256, (1, T), device="cuda")
    for name in names:
        for backend in backends:
            model = nlc.compile(f"specs/{name}.yaml", backend=backend).cuda()

            def step(model=model):
                logits, _ = model(ids)
                logits.float().logsumexp(-1).mean().backward()
            breakdown(step, f"model {name} backend={backend} T={T} float32 fwd+bwd", steps=2, top=15)
            del model
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

"""Benchmark nlc's Triton kernels against nlc's torch chunked form, flash-linear-attention's
hand-written kernels (when importable) and torch SDPA attention.

Every row is timed in the same run on the same card (``triton.testing.do_bench``: median ms over
repeats after a warm-up), forward alone (no grad) and forward + backward. Shapes default to the
issue's: B=1, H=16, K=V=128, T in 2K/8K/16K, bfloat16. Each row also gives tokens/s and the
fraction of the card's memory bandwidth (minimum bytes: every input read and every output written
once) and of its dense bfloat16 matmul peak (the chunked form's matmul FLOPs, counted below).

    python benchmarks/kernels.py                      # on a GPU
    python benchmarks/kernels.py --fla .bench          # also fla, from a directory holding fla/
    TRITON_INTERPRET=1 python benchmarks/kernels.py --toy   # CPU: the script itself, toy sizes

``--fla DIR`` imports ``fla.ops.gated_delta_rule.chunk`` from DIR without running fla's package
``__init__`` (which needs transformers); fla is never a project dependency.
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

from nlc.backends.torch import ops

# peak dense bf16 matmul TFLOP/s and memory TB/s, by a substring of the device name
PEAKS = {"H200": (989.0, 4.8), "H100 PCIe": (756.0, 2.0), "H100": (989.0, 3.35), "A100": (312.0, 2.0)}


def load_fla(root: str):
    """fla's chunk_gated_delta_rule, or the reason it cannot be imported."""
    path = Path(root) / "fla"
    try:
        sys.path.insert(0, str(Path(root)))
        for name, p in (("fla", path), ("fla.modules", path / "modules")):
            m = types.ModuleType(name)
            m.__path__ = [str(p)]
            m.__version__ = "bench"
            sys.modules[name] = m
        from fla.ops.gated_delta_rule.chunk import chunk_gated_delta_rule
        return chunk_gated_delta_rule, None
    except Exception as e:  # a version mismatch on the card's image: report it, keep the rest
        return None, f"{type(e).__name__}: {e}"


def inputs(B, T, H, K, V, dtype, device, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = dict(q=torch.randn(B, T, H, K, generator=gen), k=F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1),
             v=torch.randn(B, T, H, V, generator=gen), beta=torch.rand(B, T, H, generator=gen).sigmoid(),
             g=F.logsigmoid(torch.randn(B, T, H, generator=gen) + 4.0))
    return {n: t.to(device=device, dtype=dtype).requires_grad_() for n, t in x.items()}


def timer(device):
    if device == "cuda":
        from triton.testing import do_bench
        return lambda fn: do_bench(fn, warmup=25, rep=100)

    def cpu(fn, n=2):
        fn()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return 1000 * (time.perf_counter() - t0) / n
    return cpu


def delta_flops(T, H, K, V, C=64):
    """Matmul FLOPs of the chunked gated delta forward per (batch): per chunk k k^T, q k^T (C C K
    each), the solve's products T w and T (d k) (C C V + C C K), the state pass W h and kd^T Z
    (2 C K V), the output P Z and q h (C C V + C K V), each 2 FLOPs per multiply-add."""
    per_chunk = 2 * (3 * C * C * K + 2 * C * C * V + 3 * C * K * V)
    return H * (T // C) * per_chunk


def mlp_inputs(B, T, H, D, hid, dtype, device, seed=1):
    """Titans' memory level's inputs: keys normalised, eta up to 0.1, momentum, retention near 1."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = dict(q=torch.randn(B, T, H, D, generator=gen), k=F.normalize(torch.randn(B, T, H, D, generator=gen), dim=-1),
             v=torch.randn(B, T, H, D, generator=gen), eta=0.1 * torch.rand(B, T, H, generator=gen),
             beta=0.9 * torch.rand(B, T, H, generator=gen), alpha=1 - 0.01 * torch.rand(B, T, H, generator=gen),
             W1=0.1 * torch.randn(H, D, hid, generator=gen), W2=0.1 * torch.randn(H, hid, D, generator=gen))
    return {n: t.to(device=device, dtype=dtype).requires_grad_() for n, t in x.items()}


def mlp_call(x, backend):
    """One call of Titans' memory level (read at the current weights, chunk 64): its output."""
    from nlc.backends.torch.memories import mlp_memory
    return mlp_memory(x["q"], x["k"], x["v"], x["eta"], x["beta"], x["alpha"], None,
                      initial_state=(x["W1"], x["W2"]), read="current", chunk_size=64, backend=backend)[0]


def mlp_rows(B, T, args, dtype, device):
    """Titans' memory level: a depth-2 residual MLP memory (D = 64, hidden 128 per head, H = 16),
    momentum, retention, read at the current weights, chunk 64; Triton vs nlc's torch form."""
    D = min(args.K, 64)
    x = mlp_inputs(B, T, args.H, D, 2 * D, dtype, device)
    return {f"mlp memory (titans) {b}": (lambda b=b: mlp_call(x, b)) for b in ("triton", "torch")}


def mlp_wide_rows(B, T, args, dtype, device):
    """Hope's M_mem level: 256-wide heads (H / 4 of them), hidden 256, retention, the DGD erase, a
    self-generated target, read at the current weights, chunk 64 (the backward kernel takes it in
    64-wide slices); Triton vs nlc's torch form."""
    from nlc.backends.torch.memories import mlp_memory
    D = min(256, 2 * args.K)                      # 256 at the benchmark's K = 128
    x = mlp_inputs(B, T, max(1, args.H // 4), D, D, dtype, device)
    gen = torch.Generator(device="cpu").manual_seed(2)
    erase = (0.5 * torch.rand(x["eta"].shape, generator=gen)).to(device=device, dtype=dtype).requires_grad_()

    def call(b):
        return mlp_memory(x["q"], x["k"], x["v"], x["eta"], None, x["alpha"], erase, initial_state=(x["W1"], x["W2"]),
                          self_target=True, read="current", chunk_size=64, backend=b)[0]
    return {f"mlp memory (hope M_mem) {b}": (lambda b=b: call(b)) for b in ("triton", "torch")}


def dplr_rows(B, T, args, dtype, device):
    """The DPLR form (RWKV-7's) at the benchmark's K = V, H; Triton vs nlc's torch form."""
    x = dplr_inputs(B, T, args.H, args.K, dtype, device)
    return {f"dplr (rwkv7) {b}": (lambda b=b: dplr_call(x, b)) for b in ("triton", "torch")}


def dplr_inputs(B, T, H, K, dtype, device, seed=2):
    """RWKV-7's shapes: a retention per key channel, an erase along a separate key (u = iclr kappa,
    e = kappa), keys normalised."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    rand = lambda *s: torch.randn(B, T, H, *s, generator=gen)  # noqa: E731
    kappa = F.normalize(rand(K), dim=-1)
    x = dict(q=rand(K), k=F.normalize(rand(K), dim=-1), w=rand(K), a=torch.sigmoid(rand(K) + 2.0),
             u=kappa * torch.rand(B, T, H, 1, generator=gen), e=kappa)
    return {n: t.to(device=device, dtype=dtype).requires_grad_() for n, t in x.items()}


def dplr_call(x, backend):
    return ops.generalized_delta(x["q"], x["k"], x["w"], x["a"], erase=(x["u"], x["e"]), chunk_size=16,
                                 backend=backend)[0]


def momentum_rows(B, T, args, dtype, device):
    """A matrix memory with Titans momentum (titans_linear's level at the benchmark's K = V, H):
    retention, the L2 objective, chunk 64; Triton vs nlc's torch form."""
    x = momentum_inputs(B, T, args.H, args.K, dtype, device)
    return {f"momentum memory {b}": (lambda b=b: momentum_call(x, b)) for b in ("triton", "torch")}


def momentum_inputs(B, T, H, K, dtype, device):
    """mlp_inputs without the MLP's weights: the memory starts at zero."""
    return {n: t for n, t in mlp_inputs(B, T, H, K, 16, dtype, device).items() if n not in ("W1", "W2")}


def momentum_call(x, backend):
    from nlc.backends.torch.memories import momentum_memory
    return momentum_memory(x["q"], x["k"], x["v"], x["eta"], x["beta"], x["alpha"], chunk_size=64,
                           backend=backend)[0]


def rows(args):
    device = "cuda" if torch.cuda.is_available() and not args.toy else "cpu"
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    bench = timer(device)
    fla, fla_why = load_fla(args.fla) if args.fla else (None, "not requested (--fla DIR)")
    B, H, K, V = 1, args.H, args.K, args.K
    want = set(args.rows.split(","))
    out = []
    for T in args.T:
        x = inputs(B, T, H, K, V, dtype, device)
        qkv = [x[n] for n in ("q", "k", "v")]
        impls = {}
        if "delta" in want:
            impls["nlc triton"] = lambda: ops.gated_delta_rule(*qkv, x["beta"], x["g"], backend="triton")[0]
            impls["nlc torch chunk"] = lambda: ops.gated_delta_rule(*qkv, x["beta"], x["g"], backend="torch")[0]
            if fla is not None:
                impls["fla chunk_gated_delta_rule"] = lambda: fla(*qkv, x["g"], x["beta"], output_final_state=True)[0]
        if "sdpa" in want:
            sdpa_in = [t.detach().transpose(1, 2).contiguous().requires_grad_() for t in qkv]
            impls["torch SDPA (causal softmax)"] = lambda: F.scaled_dot_product_attention(*sdpa_in, is_causal=True)
        if "mlp" in want:
            impls.update(mlp_rows(B, T, args, dtype, device))
        if "mlp_wide" in want:
            impls.update(mlp_wide_rows(B, T, args, dtype, device))
        if "momentum" in want:
            impls.update(momentum_rows(B, T, args, dtype, device))
        if "dplr" in want:
            impls.update(dplr_rows(B, T, args, dtype, device))
        io_bytes = (2 * B * T * H * K + 2 * B * T * H * V + 2 * B * T * H) * x["q"].element_size()
        for name, fn in impls.items():
            def fwd():
                with torch.no_grad():
                    fn()

            def fwd_bwd():
                fn().sum().backward()
            times, notes = [], []
            for part in (fwd, fwd_bwd):   # timed apart: fla's backward refuses Triton 3.6 on Hopper
                try:
                    times.append(bench(part))
                except Exception as e:  # one failing part (out of memory, say) must not lose the table
                    times.append(None)
                    notes.append(f"{part.__name__}: {type(e).__name__}: {str(e)[:90]}")
            out.append((T, name, *times, "; ".join(notes)))
            print(f"T={T} {name}: {times} {notes}", flush=True)
        out.append((T, "_io", io_bytes, delta_flops(T, H, K, V), ""))
    return device, fla_why, out


def table(device, fla_why, out, args):
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (Triton interpreter)"
    peak = next((p for key, p in PEAKS.items() if key in name), None)
    lines = [f"Device: {name}; torch {torch.__version__}; {args.dtype}; B=1, H={args.H}, K=V={args.K}; "
             f"{datetime.date.today()}; fla: {'imported' if fla_why is None else fla_why}", "",
             "| T | kernel | fwd ms | fwd+bwd ms | fwd tokens/s | fwd+bwd tokens/s | fwd % BW | fwd % matmul peak | note |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    io = {T: (b, f) for T, n, b, f, _ in out if n == "_io"}
    for T, n, t_f, t_fb, note in out:
        if n == "_io":
            continue
        ms = lambda t: "" if t is None else f"{t:.3f}"            # noqa: E731
        tps = lambda t: "" if t is None else f"{T / t * 1e3:,.0f}"  # noqa: E731
        bw = mm = ""
        if peak and t_f is not None and "SDPA" not in n and "memory" not in n and "dplr" not in n:
            bw = f"{100 * io[T][0] / (t_f * 1e-3) / (peak[1] * 1e12):.1f}"
            mm = f"{100 * io[T][1] / (t_f * 1e-3) / (peak[0] * 1e12):.1f}"
        lines.append(f"| {T} | {n} | {ms(t_f)} | {ms(t_fb)} | {tps(t_f)} | {tps(t_fb)} | {bw} | {mm} | {note} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--T", type=int, nargs="+", default=[2048, 8192, 16384])
    p.add_argument("--H", type=int, default=16)
    p.add_argument("--K", type=int, default=128, help="key and value size per head")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--fla", default=None, help="directory holding fla/ (flash-linear-attention's source)")
    p.add_argument("--toy", action="store_true", help="tiny sizes on CPU: checks the script, not speed")
    p.add_argument("--out", default=None, help="also write the table to this file")
    p.add_argument("--rows", default="delta,sdpa,mlp,mlp_wide,momentum,dplr",
                   help="which rows: delta (nlc and fla), sdpa, mlp (Titans' level), mlp_wide (Hope's M_mem), "
                        "momentum, dplr")
    args = p.parse_args()
    unknown = set(args.rows.split(",")) - {"delta", "sdpa", "mlp", "mlp_wide", "momentum", "dplr"}
    if unknown:
        p.error(f"unknown rows {', '.join(sorted(unknown))}")
    if args.toy:
        args.T, args.H, args.K = [40], 2, 16
    text = table(*rows(args), args)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()

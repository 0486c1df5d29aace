"""Forward+backward throughput of the shipped model specs, and the aten ops each dispatches per
token (a benchmark, not a test).

    .venv/bin/python benchmarks/models.py [--T 4096] [--threads 1,2] [--specs transformer,titans,hope]
                                          [--compile] [--flush-denormal] [--ops-T 256] [--no-ops] [--ops-split]
                                          [--device cpu|cuda] [--backend torch,auto] [--cuda-graphs]
                                          [--precision float32|bf16]

--device cuda runs on the GPU (threads are then irrelevant); --backend takes one or several of
torch, triton, auto (nlc.compile(spec, backend=...)), each timed in turn beside the others.
--cuda-graphs (GPU only) also times each row's forward + backward captured as one CUDA graph and
replayed, and prints how far the replayed gradients are from an eager step's: what graph capture
would buy a launch-bound model (Hope), measured before nlc train offers it.

Every spec is compiled at its shipped size (d_model 256, 4 layers) and run on the same random
tokens, float32, batch --B; tokens per second of one forward + backward (median of --repeats after
a warm-up), each spec beside `transformer` in the same run (the ratio column). With --threads
1,2 each spec runs at each thread count. The op count runs the eager model once under a
TorchDispatchMode at --ops-T tokens and divides by the tokens: a regression in the generated code
(an op per token more in a scan) shows there before it shows in a timing.

--compile runs the hot loops under torch.compile (nlc.compile(spec, compile=True); the first call
compiles and is not timed). --flush-denormal sets torch.set_flush_denormal(True): untrained Hope's
fast weights decay towards zero over long sequences and float32 denormals then slow its backward
several times over; training setups commonly flush them.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import subprocess
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import nlc
from nlc.backends.torch.codegen import Unsupported

ALL = ["transformer", "linear_attention", "deltanet", "gated_deltanet", "titans", "hope_attention", "hope"]


class OpCount(TorchDispatchMode):
    """Counts the aten ops dispatched inside it (views included: each costs a dispatch)."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def model_of(name: str, compile: bool = False, backend: str = "torch", device: str = "cpu"):
    try:
        return nlc.compile(f"specs/{name}.yaml", compile=compile, backend=backend).to(device)
    except Unsupported as e:
        print(f"  {name}: skipped ({e})")
        return None


PRECISION = ["float32"]     # --precision: bf16 runs the model under autocast, as nlc train --precision bf16


def forward(model, ids):
    if PRECISION[0] == "bf16":
        with torch.autocast(ids.device.type, dtype=torch.bfloat16):
            return model(ids)
    return model(ids)


def step(model, ids):
    logits, _ = forward(model, ids)
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()).backward()
    model.zero_grad(set_to_none=True)


def tokens(model, B: int, T: int):
    ids = torch.randint(0, model.embed.num_embeddings, (B, T), generator=torch.Generator().manual_seed(0))
    return ids.to(model.embed.weight.device)


def sync(ids):
    if ids.is_cuda:
        torch.cuda.synchronize()


def bench(model, B: int, T: int, repeats: int) -> float:
    ids = tokens(model, B, T)
    step(model, ids)                     # warm-up (and torch.compile's compilation)
    times = []
    for _ in range(repeats):
        sync(ids)
        t0 = time.perf_counter()
        step(model, ids)
        sync(ids)
        times.append(time.perf_counter() - t0)
    return B * T / statistics.median(times)


def graphed(model, ids):
    """One forward + backward of ``model`` on ``ids`` captured as a CUDA graph (PyTorch's
    partial-network capture: the gradients are the graph's outputs, the optimizer would run after
    each replay). Returns (replay, the largest relative difference of the replayed gradients from
    an eager step's): a capture that is not the same computation shows there."""
    def backward():
        logits, _ = forward(model, ids)
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()).backward()
    params = [p for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    backward()
    want = [None if p.grad is None else p.grad.clone() for p in params]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):                 # warm-up off the capture stream, as PyTorch asks
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            backward()
    torch.cuda.current_stream().wait_stream(side)
    model.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        backward()
    graph.replay()
    torch.cuda.synchronize()
    err = max(((p.grad - w).norm() / w.norm().clamp_min(1e-30)).item()
              for p, w in zip(params, want) if w is not None)
    return graph.replay, err


def bench_graphed(model, B: int, T: int, repeats: int) -> tuple[float, float]:
    """Tokens/s of replaying a captured forward + backward, and the gradients' difference."""
    ids = tokens(model, B, T)
    replay, err = graphed(model, ids)
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        replay()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return B * T / statistics.median(times), err


def ops_by_call(model, T: int) -> dict:
    """Aten ops per token of one eager forward + backward (batch 1), split by who dispatches them:
    the CMS's in-context gradient (``cms_step``), the generators' updates and reads, the rest of
    the forward, and the backward."""
    from unittest import mock

    from nlc.backends.torch import cms, lib
    ids = tokens(model, 1, T)
    count = OpCount()
    split = {"cms_step": 0, "update_generators": 0, "read_generators": 0}

    def tagged(module, fn_name):
        real = getattr(module, fn_name)

        def call(*a, **kw):
            before = count.n
            out = real(*a, **kw)
            split[fn_name] += count.n - before
            return out
        return mock.patch.object(module, fn_name, call)
    with tagged(cms, "cms_step"), tagged(lib, "update_generators"), tagged(lib, "read_generators"), count:
        logits, _ = model(ids)
        forward = count.n
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    split["rest of the forward"] = forward - sum(split.values())
    split["backward"] = count.n - forward
    return {k: v / T for k, v in split.items()}


def ops_per_token(model, T: int) -> tuple[float, float]:
    """Aten ops per token of the forward, and of forward + backward, eager, batch 1."""
    ids = tokens(model, 1, T)
    count = OpCount()
    with count:
        logits, _ = model(ids)
        forward = count.n
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    model.zero_grad(set_to_none=True)
    return forward / T, count.n / T


def machine(device: str = "cpu") -> str:
    if device == "cuda":
        import triton
        return (f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
                f"{datetime.date.today().isoformat()}")
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        cpu = next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        cpu = platform.processor() or platform.machine()
    import os
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {datetime.date.today().isoformat()}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--T", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", default=str(torch.get_num_threads()), help="thread counts, e.g. 1,2")
    ap.add_argument("--specs", default=",".join(ALL))
    ap.add_argument("--compile", action="store_true", help="nlc.compile(spec, compile=True)")
    ap.add_argument("--flush-denormal", action="store_true", help="torch.set_flush_denormal(True)")
    ap.add_argument("--ops-T", type=int, default=256, help="tokens of the op-count run")
    ap.add_argument("--no-ops", action="store_true", help="skip the op count")
    ap.add_argument("--precision", choices=["float32", "bf16"], default="float32",
                    help="bf16: the model under torch.autocast, as nlc train --precision bf16")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="also time each spec's forward + backward captured as one CUDA graph (--device cuda)")
    ap.add_argument("--ops-split", action="store_true",
                    help="also split each spec's op count by call (CMS step, generators, rest, backward)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--backend", default="torch", help="torch, triton, auto, or several: torch,auto")
    args = ap.parse_args()
    if args.cuda_graphs and args.device != "cuda":
        ap.error("--cuda-graphs needs --device cuda (CUDA graphs capture GPU work)")
    torch.manual_seed(0)
    PRECISION[0] = args.precision
    if args.flush_denormal:
        torch.set_flush_denormal(True)
    names = args.specs.split(",")
    print(f"{machine(args.device)}")
    print(f"B={args.B}, T={args.T}, {'bf16 autocast' if args.precision == 'bf16' else 'float32'}, forward+backward, "
          f"median of {args.repeats}, {args.device}"
          + (", torch.compile" if args.compile else "") + (", denormals flushed" if args.flush_denormal else "") + "\n")
    print("| spec | backend | threads | tokens/s | x transformer |\n| --- | --- | ---: | ---: | ---: |")
    threads_list = [torch.get_num_threads()] if args.device == "cuda" else list(map(int, args.threads.split(",")))
    for threads in threads_list:
        torch.set_num_threads(threads)
        base = None
        for name in names:
            for backend in args.backend.split(","):
                model = model_of(name, args.compile, backend, args.device)
                if model is None:
                    continue
                try:
                    tps = bench(model, args.B, args.T, args.repeats)
                except Exception as e:  # a spec that fails on this device must not lose the table
                    print(f"| {name} | {backend} | {threads} | {type(e).__name__}: {str(e)[:80]} | |", flush=True)
                    continue
                base = tps if name == "transformer" and base is None else base
                ratio = f"{tps / base:.3f}" if base else ""
                print(f"| {name} | {backend} | {threads} | {tps:,.0f} | {ratio} |", flush=True)
                if args.cuda_graphs:
                    try:
                        tps, err = bench_graphed(model, args.B, args.T, args.repeats)
                        ratio = f"{tps / base:.3f}" if base else ""
                        print(f"| {name} | {backend}, one CUDA graph (gradients {err:.1e} from eager) | {threads} "
                              f"| {tps:,.0f} | {ratio} |", flush=True)
                    except Exception as e:  # what cannot be captured says so, in the table
                        print(f"| {name} | {backend}, one CUDA graph | {threads} | {type(e).__name__}: "
                              f"{str(e)[:80]} | |", flush=True)
    if not args.no_ops:
        torch.set_num_threads(1)
        print("\n| spec | aten ops / token, forward | forward + backward |\n| --- | ---: | ---: |")
        splits = []
        for name in names:
            model = model_of(name)
            if model is not None:
                fwd, both = ops_per_token(model, args.ops_T)
                print(f"| {name} | {fwd:,.0f} | {both:,.0f} |", flush=True)
                if args.ops_split:   # the same model, counted again by call
                    splits.append((name, ops_by_call(model, args.ops_T)))
        print(f"(eager, T={args.ops_T}, B=1)")
        for name, split in splits:
            print(f"{name}: " + ", ".join(f"{k} {v:,.1f}" for k, v in split.items()), flush=True)


if __name__ == "__main__":
    main()

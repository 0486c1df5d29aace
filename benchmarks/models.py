"""Forward+backward throughput of the shipped model specs on CPU (a benchmark, not a test).

    .venv/bin/python benchmarks/models.py [--T 256] [--B 1] [--specs transformer,titans,hope]

Every spec is compiled at its shipped size (d_model 256, 4 layers, 4 heads) and run on the same
random tokens; the table gives tokens per second of one forward + backward (median of repeats).
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

import nlc
from nlc.backends.torch.codegen import Unsupported

ALL = ["transformer", "linear_attention", "deltanet", "gated_deltanet", "titans", "hope_attention", "hope"]


def bench(name: str, B: int, T: int, repeats: int) -> float | None:
    try:
        model = nlc.compile(f"specs/{name}.yaml")
    except Unsupported as e:
        print(f"  {name}: skipped ({e})")
        return None
    ids = torch.randint(0, model.embed.num_embeddings, (B, T), generator=torch.Generator().manual_seed(0))
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        logits, _ = model(ids)
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
        if i:  # the first run warms up
            times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    return B * T / statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--T", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--specs", default=",".join(ALL))
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"B={args.B}, T={args.T}, float32, forward+backward\n")
    print("| spec | tokens/s |\n| --- | ---: |")
    for name in args.specs.split(","):
        tps = bench(name, args.B, args.T, args.repeats)
        if tps is not None:
            print(f"| {name} | {tps:,.0f} |")


if __name__ == "__main__":
    main()

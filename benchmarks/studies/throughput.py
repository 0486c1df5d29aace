"""Study 8, throughput: training tokens/s of every model spec, and Hope against the Transformer.

Each shipped model spec at its shipped size, float32, batch 1: one forward + backward of the
next-token loss (`benchmarks/models.py`'s step, median of `repeats` after a warm-up), every spec
in the same run as `transformer`, so the ratios compare like with like. The op count (aten ops
dispatched per token, forward + backward) shows the dispatch overhead that bounds small models.
"""
from __future__ import annotations

import torch

from benchmarks.studies.common import SPECS

PARALLEL = False      # a timing: models run one at a time, alone on the machine
TITLE = "Throughput: training tokens/s of every model spec (CPU)"
CLAIM = ("Nested Learning / Titans: the memory levels train in chunkwise-parallel form, so Titans and "
         "Hope train at a useful fraction of a Transformer's speed (the speed issue's goal: Hope at no "
         "less than half a same-size Transformer's tokens/s at T=4K).")
ALL = ["transformer", "linear_attention", "retnet", "gla", "deltanet", "gated_deltanet", "gdn_swa", "rwkv7",
       "titans", "ttt_mlp", "hope_attention", "hope", "hope_heads"]

SIZES = {
    "toy": dict(specs=["transformer", "titans"], T=[64], threads=[1], repeats=1, ops_T=32,
                sets=["model.d_model=64", "model.layers=1"]),
    "default": dict(specs=ALL, T=[1024, 4096], threads=[1, 2], repeats=2, ops_T=256, sets=[],
                    two_threads=["transformer", "titans", "hope"]),
}


def _model(name: str, sets: list[str]):
    import nlc
    from nlc.backends.torch.codegen import Unsupported
    from benchmarks.studies.common import Variant, build
    try:
        return build(Variant(name, SPECS / f"{name}.yaml", tuple(sets))) if sets else nlc.compile(SPECS / f"{name}.yaml")
    except Unsupported as e:
        return str(e)


def run(cfg: dict, log) -> dict:
    from benchmarks import models as bench
    old_threads, flush = torch.get_num_threads(), torch.set_flush_denormal(True)
    rows = []
    try:
        for name in cfg["specs"]:
            model = _model(name, cfg["sets"])
            if isinstance(model, str):
                rows.append(dict(spec=name, skipped=model))
                continue
            params = sum(p.numel() for p in model.parameters())
            torch.set_num_threads(1)
            fwd, total = bench.ops_per_token(model, cfg["ops_T"])
            for threads in cfg["threads"]:
                if threads > 1 and name not in cfg.get("two_threads", cfg["specs"]):
                    continue
                torch.set_num_threads(threads)
                for T in cfg["T"]:
                    tps = bench.bench(model, 1, T, cfg["repeats"])
                    log(f"throughput {name} T={T} threads={threads}: {tps:,.0f} tok/s")
                    rows.append(dict(spec=name, params=params, T=T, threads=threads, tokens_per_s=tps,
                                     ops_fwd=fwd, ops_total=total))
    finally:
        torch.set_num_threads(old_threads)
        torch.set_flush_denormal(False)
    return {"rows": rows, "flush_denormal": flush}


def _tps(result: dict) -> dict:
    return {(r["spec"], r["T"], r["threads"]): r["tokens_per_s"] for r in result["rows"] if "T" in r}


def report(result: dict) -> str:
    cfg, tps = result["config"], _tps(result)
    Ts, threads = cfg["T"], cfg["threads"]
    cols = [(T, th) for th in threads for T in Ts]
    lines = [f"Shipped sizes{' with ' + ', '.join(cfg['sets']) if cfg['sets'] else ''}, float32, batch 1, forward + "
             f"backward of the next-token loss, median of {cfg['repeats']} after a warm-up, denormals flushed; "
             f"tokens/s, and in brackets the ratio to `transformer` in the same run. Aten ops per token "
             f"(forward + backward, eager) at T={cfg['ops_T']}.", "",
             "| spec | params | " + " | ".join(f"T={T} ({th} thr)" for T, th in cols) + " | ops/token |",
             "| --- | ---: | " + " | ".join("---:" for _ in cols) + " | ---: |"]
    seen = []
    for r in result["rows"]:
        if r["spec"] in seen:
            continue
        seen.append(r["spec"])
        if "skipped" in r:
            lines.append(f"| {r['spec']} | skipped: {r['skipped'][:80]} |")
            continue
        cells = []
        for T, th in cols:
            v, base = tps.get((r["spec"], T, th)), tps.get(("transformer", T, th))
            cells.append("" if v is None else f"{v:,.0f}" + (f" ({v / base:.2f}x)" if base else ""))
        lines.append(f"| {r['spec']} | {r['params']:,} | " + " | ".join(cells) + f" | {r['ops_total']:,.0f} |")
    T = max(Ts)
    if ("hope", T, 1) in tps and ("transformer", T, 1) in tps:
        ratio = tps[("hope", T, 1)] / tps[("transformer", T, 1)]
        lines += ["", f"**Verdict** (criterion: Hope at ≥ 0.5x the Transformer's tokens/s at T={T}, one thread): "
                      f"{'holds' if ratio >= 0.5 else 'does not hold'}: {ratio:.3f}x."]
    return "\n".join(lines)


def plot(result: dict, plt):
    cfg, tps = result["config"], _tps(result)
    T = max(cfg["T"])
    names = [r["spec"] for r in result["rows"] if (r["spec"], T, 1) in tps]
    names = list(dict.fromkeys(names))
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(names) + 1))
    ax.barh(names, [tps[(n, T, 1)] for n in names])
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set_xlabel(f"training tokens/s at T={T}, one thread (log)")
    ax.set_title("Throughput (CPU)")
    return fig

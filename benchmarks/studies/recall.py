"""Study 1, recall: MQAR accuracy against the number of pairs and the sequence length.

Every model is trained once on MQAR at the training context with a mix of loads, then scored
on a grid of (pairs, context) it was not all trained on: capacity (more pairs than trained) and
length (longer sequences filled with more episodes). Models are matched in parameter count.
`hope` is the shipped spec (CMS periods 64, 512, 4096 tokens, `M_mem` chunk 64); `hope_small` is
Hope at the studies' scale (benchmarks/studies/specs/hope_small.yaml: CMS periods 16, 32, 64 and
chunk 16, so that every CMS level updates inside a 128-token sequence), matched in size like the
others.
"""
from __future__ import annotations

from benchmarks.studies.common import Variant, fmt, matched, mean_sd, parallel, score, spec_of, train

TITLE = "Recall: MQAR accuracy against pairs and sequence length"
CLAIM = ("Nested Learning §8 / Titans: memories that learn in context (Titans, Hope) recall more "
         "key-value pairs than linear attention and the delta rule, at a fraction of a Transformer's "
         "cost, and hold up better as sequences grow (paper: Hope and Titans ≥ DeltaNet-family on recall).")
MODELS = ["transformer", "linear_attention", "deltanet", "gated_deltanet", "titans", "hope", "hope_small",
          "hope_attention"]

SIZES = {
    "toy": dict(models=["transformer", "deltanet", "titans"], target=60_000, layers=1, steps=4, batch=4,
                context=32, train_pairs=4, pairs=[2, 4], contexts=[32, 48], batches=1, seeds=1, lr=3e-3),
    "default": dict(models=MODELS, target=150_000, layers=2, steps=300, batch=16, context=128,
                    train_pairs=8, pairs=[4, 8, 16], contexts=[128, 256], batches=4, seeds=1, lr=3e-3),
}


def task(pairs: int) -> str:
    return f"mqar:pairs={pairs},queries={pairs},symbols=32"


def run(cfg: dict, log) -> dict:
    calls = []
    for name in cfg["models"]:
        v = matched(Variant(name, spec_of(name), (f"model.layers={cfg['layers']}", f"lr={cfg['lr']}")), cfg["target"])
        calls += [(cell, dict(v=v, seed=seed, cfg=cfg)) for seed in range(cfg["seeds"])]
    return {"rows": parallel(calls, log)}


def cell(v: Variant, seed: int, cfg: dict) -> dict:
    """One model and seed: trained at the training load, scored on the grid."""
    t = train(v, task=task(cfg["train_pairs"]), steps=cfg["steps"], batch=cfg["batch"], context=cfg["context"],
              seed=seed)
    grid = {}
    for p in cfg["pairs"]:
        for c in cfg["contexts"]:
            if 4 * p > c:
                continue
            grid[f"{p}x{c}"] = score(t.model, task=task(p), context=c, batches=cfg["batches"], batch=cfg["batch"],
                                     seed=seed)["accuracy"]
    return dict(model=v.label, seed=seed, params=t.params, sets=list(v.sets), seconds=t.seconds,
                final_loss=t.summary["last_loss"], grid=grid,
                log=f"recall {v.label} seed {seed}: {t.params:,} params, {t.seconds:.0f} s, "
                    + ", ".join(f"{k} {a:.3f}" for k, a in grid.items()))


def _means(result: dict) -> dict:
    out = {}
    for r in result["rows"]:
        m = out.setdefault(r["model"], {"params": r["params"], "seconds": [], "grid": {}})
        m["seconds"].append(r["seconds"])
        for k, a in r["grid"].items():
            m["grid"].setdefault(k, []).append(a)
    return out


def report(result: dict) -> str:
    cfg, means = result["config"], _means(result)
    keys = list(next(iter(means.values()))["grid"])
    lines = [f"Trained on `{task(cfg['train_pairs'])}` at context {cfg['context']}, {cfg['steps']} steps of "
             f"{cfg['batch']}, AdamW lr {cfg['lr']}, {cfg['layers']} layers, widths matched to "
             f"~{cfg['target']:,} parameters; {cfg['seeds']} seed(s); accuracy on the asked values "
             f"({cfg['batches']} validation batches). Columns: pairs x context.", "",
             "| model | params | " + " | ".join(keys) + " | mean | train s |",
             "| --- | ---: | " + " | ".join("---:" for _ in keys) + " | ---: | ---: |"]
    avg = {}
    for name, m in means.items():
        cells = [fmt(*mean_sd(m["grid"][k])) for k in keys]
        avg[name] = mean_sd([x for k in keys for x in m["grid"][k]])[0]
        lines.append(f"| {name} | {m['params']:,} | " + " | ".join(cells) + f" | {avg[name]:.3f} | "
                     f"{mean_sd(m['seconds'])[0]:.0f} |")
    lines.append("")
    nl = [n for n in ("titans", "hope", "hope_small") if n in avg]
    linear = [n for n in ("linear_attention", "deltanet", "gated_deltanet") if n in avg]
    if nl and linear:
        best_nl, best_lin = max(nl, key=avg.get), max(linear, key=avg.get)
        held = avg[best_nl] > avg[best_lin]
        lines.append(f"**Verdict** (criterion: the best of Titans/Hope beats the best linear-recurrent "
                     f"baseline on mean accuracy over the grid): {'holds' if held else 'does not hold'} "
                     f"at this scale: {best_nl} {avg[best_nl]:.3f} vs {best_lin} {avg[best_lin]:.3f}"
                     + (f"; transformer {avg['transformer']:.3f}" if "transformer" in avg else "") + ".")
    return "\n".join(lines)


def plot(result: dict, plt):
    means = _means(result)
    keys = list(next(iter(means.values()))["grid"])
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(means)
    for i, (name, m) in enumerate(means.items()):
        ax.bar([j + i * width for j in range(len(keys))], [mean_sd(m["grid"][k])[0] for k in keys], width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))], keys)
    ax.set_xlabel("pairs x context")
    ax.set_ylabel("MQAR accuracy")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("Recall")
    return fig

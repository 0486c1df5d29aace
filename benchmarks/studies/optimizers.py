"""Study 7, optimizers on a non-i.i.d. stream: M3 as printed, its fixes, and the baselines.

The stream of `benchmarks/optimizers.py`: an MLP regresses one of four random teachers with
shifted inputs, the teacher switching every 200 steps. Every optimizer is a spec; each runs at
its best learning rate from a grid (best mean online loss over a tuning run on another seed),
then on the study's seeds. The M3 fixes are specs that differ from `m3` or `m3_ema` in one place
(`benchmarks/studies/specs/m3_*.yaml`), shown as diffs: the division by sqrt(V) moved inside
Newton-Schulz, or no second moment at all. `m3` keeps Algorithm 1's accumulating sums, which
never forget; `m3_ema` replaces them with moving averages.
"""
from __future__ import annotations

import statistics

import torch

from benchmarks.studies.common import SPECS, VARIANTS, fmt, mean_sd, parallel, spec_diff

TITLE = "Optimizers on a non-i.i.d. stream: M3 as printed, its fixes, Muon, AdamW, delta momentum"
CLAIM = ("Nested Learning §6 (M3, Algorithm 1): multi-scale momentum Muon learns a non-stationary stream "
         "better than Muon and AdamW; the optimizer benchmark found M3 as printed barely learns, because it "
         "divides the orthogonalised step element-wise by sqrt(V).")
OPTIMIZERS = {   # label: (spec, the lr grid, 3x apart)
    "adamw": ("adamw", [1e-3, 3e-3, 1e-2, 3e-2]),
    "muon": ("muon", [1e-2, 3e-2, 1e-1, 3e-1]),
    "delta_momentum": ("delta_momentum", [1e-3, 3e-3, 1e-2, 3e-2]),
    "m3": ("m3", [1e-5, 3e-5, 1e-4, 3e-4]),
    "m3_ema": ("m3_ema", [1e-6, 3e-6, 1e-5, 3e-5]),
    "m3_predivide": (str(VARIANTS / "m3_predivide.yaml"), [3e-3, 1e-2, 3e-2, 1e-1]),
    "m3_no_v": (str(VARIANTS / "m3_no_v.yaml"), [3e-3, 1e-2, 3e-2, 1e-1]),
    "m3_ema_predivide": (str(VARIANTS / "m3_ema_predivide.yaml"), [3e-3, 1e-2, 3e-2, 1e-1]),
    "m3_ema_no_v": (str(VARIANTS / "m3_ema_no_v.yaml"), [3e-3, 1e-2, 3e-2, 1e-1]),
}
FIXES = {"m3_predivide": "m3", "m3_no_v": "m3", "m3_ema_predivide": "m3_ema", "m3_ema_no_v": "m3_ema"}  # fix: parent

SIZES = {
    "toy": dict(optimizers=["adamw", "m3", "m3_no_v"], steps=40, tune_steps=20, seeds=1, grid_points=2),
    "default": dict(optimizers=list(OPTIMIZERS), steps=2000, tune_steps=800, seeds=3, grid_points=4),
}


def _stream():
    threads = torch.get_num_threads()
    from benchmarks import optimizers as bench      # its stream, its model, its side-by-side loop
    torch.set_num_threads(threads)                   # (it pins one thread for its own timings)
    return bench


def run(cfg: dict, log) -> dict:
    names = cfg["optimizers"]
    grids = dict(zip(names, parallel([(tune, dict(name=n, grid=OPTIMIZERS[n][1][:cfg["grid_points"]],
                                                  steps=cfg["tune_steps"])) for n in names], log)))
    best = {n: float(min(g, key=g.get)) for n, g in grids.items()}
    runs = parallel([(train_one, dict(name=n, lr=best[n], steps=cfg["steps"], seed=seed))
                     for seed in range(cfg["seeds"]) for n in names], log)
    rows = []
    for seed in range(cfg["seeds"]):
        mine = [r for r in runs if r["seed"] == seed]
        rows += [{k: v for k, v in r.items() if k != "untrained"} for r in mine]
        rows.append(dict(optimizer="untrained", seed=seed, final=mine[0]["untrained"]))
        log(f"optimizers seed {seed}: " + ", ".join(f"{r['optimizer']} {r['online']:.4f}" for r in mine))
    bench = _stream()
    diffs = {n: spec_diff(VARIANTS / f"{n}.yaml", SPECS / f"{p}.yaml") for n, p in FIXES.items() if n in names}
    return {"rows": rows, "grids": grids, "best": best, "diffs": diffs,
            "stream": dict(switch=bench.SWITCH, tasks=bench.TASKS, batch=bench.BATCH)}


def tune(name: str, grid: list[float], steps: int) -> dict:
    """The mean online loss of each learning rate of the grid over a tuning run (seed 123, not a
    study seed), side by side on one stream; a diverged run counts as 1e9."""
    res = _stream().run({f"{lr:g}": (OPTIMIZERS[name][0], lr) for lr in grid}, steps, seed=123)
    score = {f"{lr:g}": statistics.mean(x if x == x else 1e9 for x in res[f"{lr:g}"][0]) for lr in grid}
    return {**score, "log": f"optimizers: tune {name}: " + ", ".join(f"{lr} {s:.4f}" for lr, s in score.items())
            + f" -> {min(score, key=score.get)}"}


def train_one(name: str, lr: float, steps: int, seed: int) -> dict:
    """One optimizer at its learning rate on the seed's stream (the same stream and initial
    model for every optimizer at that seed)."""
    res = _stream().run({name: (OPTIMIZERS[name][0], lr)}, steps, seed=seed)
    losses, _, final = res[name]
    return dict(optimizer=name, seed=seed, lr=lr, online=statistics.mean(losses), last=statistics.mean(losses[-200:]),
                final=final, curve=losses[::10], untrained=res["untrained"][2],
                log=f"optimizers {name} seed {seed} at lr {lr:g}: online {statistics.mean(losses):.4f}")


def report(result: dict) -> str:
    cfg, best = result["config"], result["best"]
    by: dict = {}
    for r in result["rows"]:
        by.setdefault(r["optimizer"], []).append(r)
    s = result["stream"]
    lines = [f"MLP 32-128-128-8 (GELU), MSE on one of {s['tasks']} teachers, switching every {s['switch']} steps, "
             f"batch {s['batch']}; {cfg['steps']} steps, seeds 0..{cfg['seeds'] - 1}; the lr of each optimizer is "
             f"the best mean online loss over {cfg['tune_steps']} steps of seed 123 on its grid (below). "
             f"Other hyperparameters are the specs' defaults.", "",
             "| optimizer | lr | online loss, whole run | online loss, last 200 | final loss, all tasks |",
             "| --- | ---: | ---: | ---: | ---: |"]
    online = {}
    for n, rs in by.items():
        if n == "untrained":
            continue
        online[n] = mean_sd([r["online"] for r in rs])
        lines.append(f"| {n} | {best[n]:g} | {fmt(*online[n], 4)} | {fmt(*mean_sd([r['last'] for r in rs]), 4)} | "
                     f"{fmt(*mean_sd([r['final'] for r in rs]), 4)} |")
    if "untrained" in by:
        lines.append(f"| untrained network | | | | {fmt(*mean_sd([r['final'] for r in by['untrained']]), 4)} |")
    edge = [n for n, g in result["grids"].items() if f"{best[n]:g}" in (list(g)[0], list(g)[-1])]
    if edge:
        lines += ["", f"Best lr at the edge of its grid (the optimum may lie beyond it): {', '.join(edge)}."]
    lines += ["", "Grids (lr: mean online loss of the tuning run): "
              + "; ".join(f"{n}: " + ", ".join(f"{lr} {v:.3g}" for lr, v in g.items()) for n, g in result["grids"].items())]
    verdicts = []
    if "m3" in online and "muon" in online:
        verdicts.append(f"M3 as printed beats Muon: {'yes' if online['m3'][0] < online['muon'][0] else 'no'} "
                        f"({online['m3'][0]:.4f} vs {online['muon'][0]:.4f})")
    fixes = [n for n in FIXES if n in online]
    if fixes and "m3" in online:
        best_fix = min(fixes, key=lambda n: online[n][0])
        verdicts.append(f"the best fix is `{best_fix}` ({online[best_fix][0]:.4f}, M3 as printed {online['m3'][0]:.4f})")
        for base in ("muon", "adamw"):
            if base in online:
                verdicts.append(f"`{best_fix}` beats {base}: {'yes' if online[best_fix][0] < online[base][0] else 'no'}")
    if verdicts:
        lines += ["", "**Verdict** (criterion: mean online loss over the seeds): " + "; ".join(verdicts) + "."]
    if result["diffs"]:
        lines += ["", "The fixes, each a spec that differs from its parent (`m3` or `m3_ema`) in one place:", ""]
        for n, d in result["diffs"].items():
            lines += [f"`{n}`:", "```diff", "\n".join(ln for ln in d.splitlines()
                                                     if "name:" not in ln and not ln[1:].startswith("#")), "```", ""]
    return "\n".join(lines)


def plot(result: dict, plt):
    by: dict = {}
    for r in result["rows"]:
        if r["optimizer"] != "untrained":
            by.setdefault(r["optimizer"], []).append(r["curve"])
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for n, curves in by.items():
        mean = [statistics.mean(c[i] for c in curves) for i in range(len(curves[0]))]
        k = 10
        smooth = [statistics.mean(mean[max(0, i - k):i + 1]) for i in range(len(mean))]
        ax.plot([10 * i for i in range(len(smooth))], smooth, label=n, lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("online loss (smoothed)")
    ax.legend(fontsize=7)
    ax.set_title("Optimizers on a non-i.i.d. stream")
    return fig

"""M3 against AdamW: optimizers compiled from specs, on a gradient stream that changes under them.

    python examples/m3_vs_adamw.py          # about a minute on a laptop CPU
    python examples/m3_vs_adamw.py --toy    # seconds (NLC_EXAMPLES_TOY=1 too)

In nlc an optimizer is a spec like a model: levels over the gradient stream, each with its own rule
and clock, and an update that reads them. M3 (Nested Learning, Algorithm 1; specs/m3.yaml) keeps a
fast momentum M1, a second moment V and a slow momentum M2 written once every `slow_every` steps,
and steps along Newton-Schulz-orthogonalised momenta divided by sqrt(V). The slow memory is meant
for streams whose distribution shifts, so the task here shifts: a small MLP regresses one of four
random teacher networks, and the teacher (and where its inputs lie) switches every SWITCH steps.

The script:
1. shows the specs (`nlc explain specs/m3.yaml` prints the update it compiles);
2. writes a variant of M3 of its own, as a spec file, with no Python;
3. gives each optimizer its best learning rate from a small grid (on another seed);
4. trains one model per optimizer from the same initial weights on the same batches, and reports
   the online loss (the loss of each batch before its step: how well it keeps up with the
   stream), the loss over the last stretch, and the final loss over all four teachers (what it
   kept of the earlier ones). Plot and numbers go to runs/examples/m3_vs_adamw/.

This is the stream of the optimizer benchmark (benchmarks/optimizers.py), written out here so the
example stands alone.
"""
from __future__ import annotations

import json
import statistics
import time

import torch
from torch import nn

import nlc as nlc_api


from _common import ROOT, nlc, start   # examples/_common.py: the tutorials' shared set-up

OUT, toy, t_start = start("m3_vs_adamw", __doc__)
torch.set_num_threads(1)     # tiny matrices: one thread is fastest, and fair to everything else on the CPU

# ---------------------------------------------------------------- 1. the optimizers are specs
# `nlc explain` renders an optimizer spec's levels and update as Markdown with LaTeX. M3 as printed
# divides the orthogonalised step element-wise by sqrt(V) + eps.
nlc("explain", "specs/m3.yaml")

# ---------------------------------------------------------------- 2. a variant of your own
# M3 divides the orthogonalised step element-wise by sqrt(V): an entry whose gradient has been tiny
# gets a huge step, so M3 as printed tolerates only very small learning rates, at which it barely
# moves. A variant is a spec that differs in one place. Here, from M3-EMA (specs/m3_ema.yaml): V
# moved inside Newton-Schulz, so that V preconditions what is orthogonalised and the step keeps
# Muon's scale. Any `.yaml` or `.nl` optimizer spec compiles the same way, and `nlc check` checks
# it with located errors. (The same change to `m3` itself does not rescue it here: its M1 and M2
# are sums that never forget, which a switching stream punishes.)
variant = OUT / "m3_ema_predivide.yaml"
printed = "update: -lr * (newton_schulz(M1, ns_steps) + alpha * newton_schulz(prev(M2), ns_steps)) / (sqrt(V) + eps)"
changed = ("update: -lr * (newton_schulz(M1 / (sqrt(V) + eps), ns_steps)"
           " + alpha * newton_schulz(prev(M2) / (sqrt(V) + eps), ns_steps))")
text = (ROOT / "specs/m3_ema.yaml").read_text()
assert printed in text, "specs/m3_ema.yaml changed: update this example's variant"
(ROOT / variant).write_text("# M3-EMA with sqrt(V) moved inside Newton-Schulz: written by examples/m3_vs_adamw.py\n"
                   + text.replace("name: m3_ema\n", "name: m3_ema_predivide\n").replace(printed, changed))
nlc("check", str(variant))
print(f"the changed line:\n-    {printed}\n+    {changed}")

# Each entry: the spec (a shipped name or a path) and its learning-rate grid, 3x apart. The grids
# sit where each optimizer learns at all: M3 and M3-EMA need lrs about 1000x below Muon's.
OPTIMIZERS = {
    "AdamW": ("adamw", [1e-3, 3e-3, 1e-2, 3e-2]),
    "M3": ("m3", [1e-5, 3e-5, 1e-4, 3e-4]),
    "M3-EMA": ("m3_ema", [1e-6, 3e-6, 1e-5, 3e-5]),
    "M3-EMA, V in NS": (str(ROOT / variant), [1e-3, 3e-3, 1e-2, 3e-2]),
}

# ---------------------------------------------------------------- the stream
D_IN, HIDDEN, D_OUT, BATCH, TASKS = 32, 128, 8, 64, 4
SWITCH, STEPS, TUNE_STEPS, SEEDS, GRID = (20, 80, 40, (0,), 2) if toy else (200, 2000, 800, (0, 1), 4)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, HIDDEN), nn.GELU(),
                         nn.Linear(HIDDEN, D_OUT))


class Stream:
    """Task k: inputs around a random mean mu_k, targets from a random tanh network. Batches come from
    task (step // SWITCH) % TASKS, drawn from one generator: every optimizer sees the same batches."""

    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)
        self.teachers = [(torch.randn(D_IN, 64, generator=self.g) / D_IN ** 0.5,
                          torch.randn(64, D_OUT, generator=self.g) / 8, torch.randn(D_IN, generator=self.g))
                         for _ in range(TASKS)]

    def batch(self, task: int, n: int = BATCH):
        w1, w2, mu = self.teachers[task]
        x = torch.randn(n, D_IN, generator=self.g) + mu
        return x, torch.tanh(x @ w1) @ w2 * 3


def run(spec: str, lr: float, steps: int, seed: int) -> dict:
    """Train a fresh MLP (initialised from `seed`) with the optimizer compiled from `spec`."""
    stream = Stream(seed)
    torch.manual_seed(seed)
    model = mlp()
    # The optimizer compiled from its spec: a torch.optim.Optimizer; keyword arguments override the
    # spec's hyperparameters by name (range-checked).
    opt = nlc_api.compile_optimizer(spec, model.parameters(), lr=lr)
    online = []
    for step in range(steps):
        x, y = stream.batch((step // SWITCH) % TASKS)
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        online.append(loss.item() if loss.isfinite() else float("inf"))
    with torch.no_grad():   # after the last step: every teacher, earlier ones included
        final = statistics.mean(nn.functional.mse_loss(model(x), y).item()
                                for x, y in (stream.batch(k, 1024) for k in range(TASKS)))
    return {"online": online, "final": final}


def score(online: list[float]) -> float:
    """The mean online loss; a diverged run (inf, nan) scores worst."""
    return statistics.mean(x if x == x and x != float("inf") else 1e9 for x in online)


# ---------------------------------------------------------------- 3. learning rates
# Each optimizer at its best lr from its grid, chosen on seed 123 (not a seed it is scored on).
print(f"\n== learning rates: the best mean online loss over {TUNE_STEPS} steps (seed 123)")
best = {}
for label, (spec, grid) in OPTIMIZERS.items():
    scores = {lr: score(run(spec, lr, TUNE_STEPS, 123)["online"]) for lr in grid[:GRID]}
    best[label] = min(scores, key=scores.get)
    print(f"{label:>16}: " + ", ".join(f"lr {lr:g} -> {s:.4g}" for lr, s in scores.items()) + f"; best {best[label]:g}")

# ---------------------------------------------------------------- 4. the comparison
print(f"\n== {STEPS} steps, the teacher switching every {SWITCH}, seeds {SEEDS}")
results = {}
for label, (spec, _) in OPTIMIZERS.items():
    runs = [run(spec, best[label], STEPS, s) for s in SEEDS]
    online = [statistics.mean(r["online"][i] for r in runs) for i in range(STEPS)]
    results[label] = {"spec": spec, "lr": best[label], "online": online,
                      "online_mean": score(online), "last": score(online[-SWITCH:]),
                      "final": statistics.mean(r["final"] for r in runs)}
untrained = statistics.mean(run("adamw", 1e-3, 0, s)["final"] for s in SEEDS)    # 0 steps: the initial weights

print(f"{'optimizer':>16} | {'lr':>7} | {'online loss':>11} | {'last ' + str(SWITCH) + ' steps':>14} | "
      f"{'final, all 4 teachers':>21}")
for label, r in results.items():
    print(f"{label:>16} | {r['lr']:>7g} | {r['online_mean']:>11.4f} | {r['last']:>14.4f} | {r['final']:>21.4f}")
print(f"{'untrained':>16} | {'':>7} | {'':>11} | {'':>14} | {untrained:>21.4f}")

(ROOT / OUT / "results.json").write_text(json.dumps({"steps": STEPS, "switch": SWITCH, "seeds": list(SEEDS),
                                              "untrained_final": untrained, "optimizers": results}, indent=1))
try:                       # the curves, if matplotlib is installed
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 4.5))
    k = max(1, SWITCH // 8)
    for label, r in results.items():
        xs = r["online"]
        ax.plot([statistics.mean(xs[max(0, i - k + 1):i + 1]) for i in range(len(xs))],
                label=f"{label} (lr {r['lr']:g})", lw=1.2)
    for s in range(SWITCH, STEPS, SWITCH):
        ax.axvline(s, color="grey", lw=0.5, ls=":")
    ax.set(yscale="log", xlabel=f"step (the teacher switches every {SWITCH}, dotted)",
           ylabel=f"online MSE ({k}-step mean)", title="optimizer specs on a switching regression stream")
    ax.legend()
    fig.tight_layout()
    fig.savefig(ROOT / OUT / "online_loss.png", dpi=110)
except ImportError:
    pass

ranked = sorted(results, key=lambda label: results[label]["online_mean"])
print("\nby online loss, best first: " + ", ".join(f"{label} {results[label]['online_mean']:.4f}" for label in ranked))
adamw = results["AdamW"]
print(f"AdamW: final online loss {adamw['online'][-1]:.4f} < first {adamw['online'][0]:.4f}: "
      f"{'yes' if adamw['online'][-1] < adamw['online'][0] else 'NO'}")
print(f"outputs in {OUT}/ (results.json, online_loss.png, m3_ema_predivide.yaml); "
      f"{time.perf_counter() - t_start:.0f} s in all")

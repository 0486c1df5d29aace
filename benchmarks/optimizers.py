"""Compiled optimizer specs on a non-i.i.d. gradient stream (CPU): AdamW, Muon, M3, M3-EMA.

The task: an MLP (32 -> 128 -> 128 -> 8, GELU) regresses one of four random teacher MLPs, and the
teacher (with its input distribution) switches every SWITCH steps, cycling 0, 1, 2, 3, 0, ...:
the gradient stream is non-stationary, the setting that motivates M3's slow memory.

1. lr: each optimizer runs a short grid (4 values, 3x apart) on another seed for TUNE_STEPS steps;
   the lr with the lowest mean online loss is kept.
2. The four nlc optimizers, plus torch.optim.AdamW and torch.optim.Muon (+ AdamW for the rest) as
   timing references, train side by side in one loop, one step each in rotating order, from the
   same initial weights on the same batches (two seeds). opt.step() is timed alone (median).
3. Newton-Schulz batched across parameters of equal shape against per parameter.

Writes benchmarks/optimizers.png (online loss, smoothed) and prints the markdown for BENCHMARKS.md.
Run: python benchmarks/optimizers.py  (about 2 minutes on one core).
"""
from __future__ import annotations

import datetime
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch
from torch import nn

from nlc.backends.torch.optim import NS_BATCH_MAX_NUMEL_CPU, compile_optimizer, newton_schulz

THREADS = 1   # the machine's 2 cores are shared with other jobs; 2 OpenMP threads then spin and stall
torch.set_num_threads(THREADS)
D_IN, HIDDEN, D_OUT, BATCH, TASKS = 32, 128, 8, 64, 4
SWITCH, STEPS, TUNE_STEPS, SEEDS = 200, 2000, 800, (0, 1)
# M3 as printed divides the orthogonalised step element-wise by sqrt(V): where a gradient entry is
# tiny the step is huge, so its usable lrs are orders of magnitude below Muon's (probed by hand).
GRID = {"adamw": [1e-3, 3e-3, 1e-2, 3e-2], "muon": [1e-2, 3e-2, 1e-1, 3e-1],
        "m3": [1e-5, 3e-5, 1e-4, 3e-4], "m3_ema": [1e-6, 3e-6, 1e-5, 3e-5]}
HERE = Path(__file__).parent


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, D_OUT))


class Stream:
    """Batches from task (step // SWITCH) % TASKS: a random tanh teacher and a shifted input mean."""

    def __init__(self, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.g = g
        self.teachers = [(torch.randn(D_IN, 64, generator=g) / D_IN ** 0.5, torch.randn(64, D_OUT, generator=g) / 8,
                          torch.randn(D_IN, generator=g)) for _ in range(TASKS)]

    def task(self, step: int) -> int:
        return (step // SWITCH) % TASKS

    def batch(self, task: int, n: int = BATCH):
        W1, W2, mu = self.teachers[task]
        x = torch.randn(n, D_IN, generator=self.g) + mu
        return x, torch.tanh(x @ W1) @ W2 * 3


def make_opt(name: str, model: nn.Module, lr: float):
    if name == "torch_adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr)
    if name == "torch_muon":          # torch's own Muon for 2-D weights, AdamW (same lr) for the rest
        mats = [p for p in model.parameters() if p.ndim == 2]
        rest = [p for p in model.parameters() if p.ndim != 2]
        return _Pair(torch.optim.Muon(mats, lr=lr), torch.optim.AdamW(rest, lr=lr))
    return compile_optimizer(name, model.parameters(), lr=lr)


class _Pair:
    def __init__(self, *opts):
        self.opts = opts

    def zero_grad(self):
        for o in self.opts:
            o.zero_grad()

    def step(self):
        for o in self.opts:
            o.step()


def run(names_lrs: dict[str, tuple[str, float]], steps: int, seed: int):
    """Train one model per entry side by side on one stream; online losses and step times."""
    stream = Stream(seed)
    torch.manual_seed(seed)
    init = mlp()
    runs = {}
    for label, (name, lr) in names_lrs.items():
        model = mlp()
        model.load_state_dict(init.state_dict())
        runs[label] = (model, make_opt(name, model, lr), [], [])
    labels = list(runs)
    for step in range(steps):
        x, y = stream.batch(stream.task(step))
        for label in labels[step % len(labels):] + labels[:step % len(labels)]:
            model, opt, losses, times = runs[label]
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            t0 = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - t0)
            losses.append(loss.item())
    evals = [stream.batch(k, 1024) for k in range(TASKS)]
    with torch.no_grad():
        final = {label: statistics.mean(nn.functional.mse_loss(m(x), y).item() for x, y in evals)
                 for label, (m, *_r) in [*runs.items(), ("untrained", (init,))]}
    out = {label: (losses, times, final[label]) for label, (_m, _o, losses, times) in runs.items()}
    out["untrained"] = ([], [], final["untrained"])
    return out


def tune(name: str) -> float:
    res = run({f"{lr:g}": (name, lr) for lr in GRID[name]}, TUNE_STEPS, seed=123)
    score = {lr: statistics.mean(l if l == l else 1e9 for l in res[f"{lr:g}"][0]) for lr in GRID[name]}
    best = min(score, key=score.get)
    print(f"tune {name}: " + ", ".join(f"{lr:g}: {s:.4f}" for lr, s in score.items()) + f" -> {best:g}")
    return best


def ns_bench():
    """Batched NS (one bmm chain per shape) against one NS per parameter, float32, and M3 steps."""
    rows = []
    for n, r, c in [(64, 32, 32), (32, 64, 64), (16, 96, 96), (16, 128, 128), (4, 256, 256)]:
        xs = [torch.randn(r, c) for _ in range(n)]
        per = _best_of(lambda: [newton_schulz(x[None])[0] for x in xs])
        bat = _best_of(lambda: newton_schulz(torch.stack(xs)))
        ps = [torch.randn(r, c, requires_grad=True) for _ in range(n)]
        for p in ps:
            p.grad = torch.randn(r, c)
        step_ms = {}
        for batch in (False, True):
            opt = compile_optimizer("m3", ps)
            opt.batch_ns = batch
            opt.step()
            step_ms[batch] = _best_of(opt.step)
        rows.append((n, r, c, per, bat, step_ms[False], step_ms[True]))
    return rows


def _best_of(fn, reps: int = 5) -> float:
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts) * 1e3


def smooth(xs, k=25):
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x - (xs[i - k] if i >= k else 0.0)
        out.append(acc / min(i + 1, k))
    return out


def main():
    t_start = time.time()
    lrs = {name: tune(name) for name in GRID}
    entries = {"torch AdamW": ("torch_adamw", lrs["adamw"]), "torch Muon": ("torch_muon", lrs["muon"]),
               "AdamW": ("adamw", lrs["adamw"]), "Muon": ("muon", lrs["muon"]),
               "M3": ("m3", lrs["m3"]), "M3-EMA": ("m3_ema", lrs["m3_ema"])}
    per_seed = [run(entries, STEPS, seed=s) for s in SEEDS]
    res = {label: ([statistics.mean(r[label][0][i] for r in per_seed) for i in range(STEPS)],
                   [t for r in per_seed for t in r[label][1]],
                   statistics.mean(r[label][2] for r in per_seed)) for label in entries}
    untrained = statistics.mean(r["untrained"][2] for r in per_seed)
    ns_rows = ns_bench()

    base = statistics.median(res["torch AdamW"][1])
    base_nlc = statistics.median(res["AdamW"][1])
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for label in ("AdamW", "Muon", "M3", "M3-EMA"):
        ax.plot(smooth(res[label][0]), label=f"{label} (lr {entries[label][1]:g})", lw=1.2)
    for s in range(SWITCH, STEPS, SWITCH):
        ax.axvline(s, color="grey", lw=0.5, ls=":")
    ax.set(yscale="log", xlabel="step (task switches every %d steps, dotted)" % SWITCH,
           ylabel=f"online MSE (25-step mean, {len(SEEDS)} seeds)", title="nlc optimizer specs on a switching-task MLP regression")
    ax.legend()
    fig.tight_layout()
    fig.savefig(HERE / "optimizers.png", dpi=110)

    cpu = next((ln.split(":", 1)[1].strip() for ln in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
                if ln.startswith("Model name")), platform.processor())
    lines = [f"Machine: {cpu} (2 cores, shared), torch threads {THREADS}; torch {torch.__version__}; "
             f"{datetime.date.today().isoformat()}; `python benchmarks/optimizers.py` "
             f"({time.time() - t_start:.0f} s).", "",
             f"Task: MLP {D_IN}-{HIDDEN}-{HIDDEN}-{D_OUT} (GELU), MSE on one of {TASKS} random teacher MLPs with "
             f"shifted inputs, the teacher switching every {SWITCH} steps ({STEPS} steps, batch {BATCH}). "
             f"lr per optimizer: best mean online loss over {TUNE_STEPS} steps of another seed on a 4-point grid "
             f"(3x apart: {'; '.join(f'{k} {v[0]:g}-{v[-1]:g}' for k, v in GRID.items())}); other hyperparameters "
             f"are the specs' defaults. Losses are means over seeds {SEEDS}. opt.step() time: median over the "
             f"runs, the six optimizers stepping in rotating order in one loop.", "",
             "| optimizer | lr | online loss, whole run | online loss, last 200 steps | final loss, all 4 tasks "
             "| opt.step() ms | vs torch AdamW | vs nlc AdamW |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for label, (losses, times, final) in res.items():
        med = statistics.median(times)
        lines.append(f"| {label} | {entries[label][1]:g} | {statistics.mean(losses):.4f} | "
                     f"{statistics.mean(losses[-200:]):.4f} | {final:.4f} | "
                     f"{med * 1e3:.3f} | {med / base:.2f}x | {med / base_nlc:.2f}x |")
    lines.append(f"| untrained network | | | | {untrained:.4f} | | | |")
    lines += ["", "Newton-Schulz (5 steps, float32) for n parameters of one shape: one per parameter "
              "against one batched bmm chain (best of 5); and a whole M3 `opt.step()` with `batch_ns` off / on "
              f"(on CPU the interpreter batches only matrices of at most {NS_BATCH_MAX_NUMEL_CPU} elements, "
              "so the two M3 columns differ only up to that size).", "",
              "| n x shape | NS per parameter ms | NS batched ms | speed-up | M3 step, per parameter ms | M3 step, batched ms |",
              "| --- | --- | --- | --- | --- | --- |"]
    for n, r, c, per, bat, s0, s1 in ns_rows:
        lines.append(f"| {n} x {r}x{c} | {per:.2f} | {bat:.2f} | {per / bat:.2f}x | {s0:.2f} | {s1:.2f} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Study 5, continual learning: forgetting on the `stream` task.

Each model trains on copy, then MQAR, then parity (`stream`, `every` steps each). Each
part is scored (in its training distribution) right after its own phase and again at the end:
forgetting = accuracy after its phase - accuracy at the end. The phases are separate runs
resumed from one another (`nlc train --resume` with a longer `--steps`), so the run is exactly
the stream's, with checkpoints to score in between. Each part is the task of
that name with its defaults, as `stream` makes it; parity is scored on its training lengths.

Memory fidelity: one self-modifying memory level (Hope's MLP memory, `mlp_memory`, depth 2,
residual) with a fixed random initialisation and no outer training, written with task A's
key-value pairs, then task B's (other keys), each pair seen `repeats` times in random order.
Recall = the mean cosine between the memory's read of a key and its value. Fidelity = recall of A
after B / recall of A right after A: how much of A survives the switch, per inner rule.
"""
from __future__ import annotations

from pathlib import Path
import tempfile

from benchmarks.studies.common import fmt, matched, mean_sd, parallel, score

TITLE = "Continual learning: forgetting on a stream of tasks"
CLAIM = ("Nested Learning §7–8: the CMS's slow levels keep what earlier context taught, so Hope "
         "forgets earlier tasks less than Hope without CMS, Titans and a Transformer.")
PARTS = [("copy", "copy"), ("mqar", "mqar"), ("parity", "parity:train=1,eval=16")]

SIZES = {
    "toy": dict(models=["transformer", "titans"], target=50_000, layers=1, every=2, batch=4, context=48,
                batches=1, seeds=1, lr=3e-3, fidelity=dict(dim=16, pairs=4, repeats=2, eta=0.5, alpha=0.98, seeds=1)),
    "default": dict(models=["transformer", "titans", "hope_small", "hope_no_cms"], target=150_000, layers=1,
                    every=150, batch=16, context=96, batches=4, seeds=2, lr=3e-3,
                    fidelity=dict(dim=32, pairs=16, repeats=8, eta=0.5, alpha=0.982, seeds=5)),
}


def variant(name: str, cfg: dict):
    from benchmarks.studies.common import VARIANTS, Variant, spec_of
    v = Variant(name, spec_of(name), (f"model.layers={cfg['layers']}", f"lr={cfg['lr']}"))
    return v if v.spec.parent == VARIANTS else matched(v, cfg["target"])   # the Hope pair keeps its width


def run(cfg: dict, log) -> dict:
    stream = "stream:tasks=" + "+".join(n for n, _ in PARTS) + f",every={cfg['every']}"
    calls = [(cell, dict(v=variant(name, cfg), seed=seed, cfg=cfg, stream=stream))
             for name in cfg["models"] for seed in range(cfg["seeds"])]
    out = parallel(calls + [(fidelity, cfg["fidelity"])], log)
    return {"rows": out[:-1], "stream": stream, "parts": [t for _, t in PARTS], "fidelity": out[-1]}


def cell(v, seed: int, cfg: dict, stream: str) -> dict:
    """One model and seed through the stream's phases, every part scored after each phase."""
    from nlc.runtime.evaluate import load_run
    from nlc.runtime.train import TrainConfig, train
    with tempfile.TemporaryDirectory(prefix="nlc-study-") as tmp:
        acc, seconds, params = [], 0.0, 0
        for phase in range(len(PARTS)):
            c = TrainConfig(spec=v.spec, task=stream, steps=cfg["every"] * (phase + 1), batch=cfg["batch"],
                            context=cfg["context"], seed=seed, out=Path(tmp), sets=v.sets, resume=phase > 0,
                            log_every=cfg["every"], eval_every=10 ** 9, eval_batches=1,
                            save_every=cfg["every"], keep=1, device="cpu")
            s = train(c, log=lambda _: None)
            seconds += s["seconds"]
            model = load_run(Path(s["checkpoint"])).model
            params = sum(p.numel() for p in model.parameters())
            acc.append([score(model, task=t, context=cfg["context"], batches=cfg["batches"],
                              batch=cfg["batch"], seed=seed)["accuracy"] for _, t in PARTS])
    return dict(model=v.label, seed=seed, params=params, acc=acc, seconds=seconds,
                log=f"continual {v.label} seed {seed}: after each phase {[[round(a, 3) for a in r] for r in acc]}")


RULES = {"gd": (False, False), "dgd (Hope)": (True, False), "gd + retention": (False, True),
         "dgd + retention (Hope)": (True, True)}      # name: (DGD erase, retention)


def fidelity(dim: int, pairs: int, repeats: int, eta: float, alpha: float, seeds: int) -> dict:
    """Recall of task A after A, of A after B and of B after B, per inner rule, averaged over seeds."""
    import torch
    import torch.nn.functional as F
    from nlc.backends.torch import lib as L
    from nlc.backends.torch.deep_memory import mlp_memory
    out = {name: [] for name in RULES}
    for seed in range(seeds):
        g = torch.Generator().manual_seed(seed)
        tasks = [(F.normalize(torch.randn(pairs, dim, generator=g), dim=-1),
                  F.normalize(torch.randn(pairs, dim, generator=g), dim=-1)) for _ in range(2)]
        orders = [torch.cat([torch.randperm(pairs, generator=g) for _ in range(repeats)]) for _ in range(2)]
        torch.manual_seed(seed)
        init = L.mlp_params(1, dim, dim, dim, depth=2, residual=True)
        with torch.no_grad():
            init[0].normal_(0, dim ** -0.5)                   # a fixed, non-trivial starting memory

        def recall(st, k, v):
            y = L.mlp_read(st, k[None, :, None, :], "silu", True)[0, :, 0]
            return F.cosine_similarity(y, v, dim=-1).mean().item()
        for name, (erase, retain) in RULES.items():
            st, got = L.mlp_state({}, "m", init, momentum=False), []
            for (k, v), order in zip(tasks, orders):
                T = len(order)
                e = torch.full((1, T, 1), eta)
                with torch.no_grad():
                    _, st = mlp_memory(k[order][None, :, None], k[order][None, :, None], v[order][None, :, None], e,
                                       None, torch.full((1, T, 1), alpha) if retain else None, e if erase else None,
                                       initial_state=st, objective="l2", activation="silu", residual=True,
                                       chunk_size=16, mode="chunk", backend="torch")
                got.append((recall(st, *tasks[0]), recall(st, *tasks[1])))
            out[name].append({"A_after_A": got[0][0], "A_after_B": got[1][0], "B_after_B": got[1][1]})
    return {"config": dict(dim=dim, pairs=pairs, repeats=repeats, eta=eta, alpha=alpha, seeds=seeds),
            "rules": out, "log": "continual: memory fidelity of the inner rules"}


def forgetting(acc: list[list[float]]) -> list[float]:
    """Per task but the last: its accuracy right after its phase minus at the end."""
    return [acc[k][k] - acc[-1][k] for k in range(len(acc) - 1)]


def report(result: dict) -> str:
    cfg = result["config"]
    names = [n for n, _ in PARTS]
    lines = [f"`{result['stream']}` at context {cfg['context']}, batch {cfg['batch']}, lr {cfg['lr']}, "
             f"{cfg['layers']} layer(s); Transformer and Titans matched to ~{cfg['target']:,} parameters, the "
             f"Hope pair at the studies' width (d_model 64). Each task is scored in its training distribution "
             f"({', '.join(result['parts'])}) after its own phase and at the end; forgetting = the drop.", "",
             "| model | params | " + " | ".join(f"{n} after its phase" for n in names) + " | "
             + " | ".join(f"{n} at the end" for n in names) + " | mean forgetting | earlier tasks kept |",
             "| --- | ---: | " + " | ".join("---:" for _ in range(2 * len(names) + 2)) + " |"]
    mean_f, kept = {}, {}
    by: dict = {}
    for r in result["rows"]:
        by.setdefault(r["model"], []).append(r)
    for name, rs in by.items():
        own = [mean_sd([r["acc"][k][k] for r in rs])[0] for k in range(len(names))]
        end = [mean_sd([r["acc"][-1][k] for r in rs])[0] for k in range(len(names))]
        f = mean_sd([x for r in rs for x in forgetting(r["acc"])])
        mean_f[name] = f[0]
        kept[name] = sum(end[:-1]) / (len(names) - 1)
        lines.append(f"| {name} | {rs[0]['params']:,} | " + " | ".join(f"{a:.3f}" for a in own) + " | "
                     + " | ".join(f"{a:.3f}" for a in end) + f" | {fmt(*f)} | {kept[name]:.3f} |")
    hope = "hope_small" if "hope_small" in mean_f else None
    if hope:
        least = all(mean_f[hope] < f for n, f in mean_f.items() if n != hope)
        most = all(kept[hope] > k for n, k in kept.items() if n != hope)
        lines += ["", "Forgetting is the drop from what a task reached after its own phase, so a model that never "
                      "learned a task cannot forget it; \"earlier tasks kept\" is the mean accuracy at the end on "
                      "every task but the last.", "",
                  f"**Verdict** (criterion 1: Hope forgets least): {'holds' if least else 'does not hold'} "
                  f"(" + ", ".join(f"{n} {f:.3f}" for n, f in mean_f.items()) + "). "
                  f"(Criterion 2: Hope keeps the most of the earlier tasks): {'holds' if most else 'does not hold'} "
                  f"(" + ", ".join(f"{n} {k:.3f}" for n, k in kept.items()) + "). At this scale."]
    fc = result["fidelity"]["config"]
    lines += ["", f"**Memory fidelity**: one MLP memory (d {fc['dim']}, depth 2, residual, a fixed random start), "
                  f"{fc['pairs']} pairs of task A then {fc['pairs']} of task B, each seen {fc['repeats']} times; "
                  f"eta {fc['eta']}, retention {fc['alpha']} per token where present (Hope's alpha at initialisation, "
                  f"sigmoid(4)); chunk 16; {fc['seeds']} seeds. "
                  f"Recall: mean cosine of read and value.", "",
              "| inner rule | A after A | A after B | B after B | fidelity (A after B / A after A) |",
              "| --- | ---: | ---: | ---: | ---: |"]
    for name, runs in result["fidelity"]["rules"].items():
        m = {k: mean_sd([r[k] for r in runs])[0] for k in ("A_after_A", "A_after_B", "B_after_B")}
        fid = m["A_after_B"] / m["A_after_A"] if m["A_after_A"] > 0 else float("nan")
        lines.append(f"| {name} | {m['A_after_A']:.3f} | {m['A_after_B']:.3f} | {m['B_after_B']:.3f} | {fid:.3f} |")
    return "\n".join(lines)


def plot(result: dict, plt):
    by: dict = {}
    for r in result["rows"]:
        by.setdefault(r["model"], []).append(r)
    names = [n for n, _ in PARTS]
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2), squeeze=False)
    for k, ax in enumerate(axes[0]):
        for name, rs in by.items():
            ax.plot(range(1, len(names) + 1), [mean_sd([r["acc"][p][k] for r in rs])[0] for p in range(len(names))],
                    marker="o", label=name)
        ax.set_title(f"{names[k]} accuracy")
        ax.set_xlabel("after phase")
        ax.set_xticks(range(1, len(names) + 1), names)
        ax.set_ylim(0, 1.05)
    axes[0][0].legend(fontsize=7)
    return fig

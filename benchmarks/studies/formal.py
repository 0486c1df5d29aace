"""Study 3, formal languages: parity and a^n b^n, trained short, tested 2x and 4x longer.

Each model trains on episodes of length 1..L and is scored on lengths up to L (in
distribution), L+1..2L and 2L+1..4L (the `eval` split of the same task with other options).
"""
from __future__ import annotations

from benchmarks.studies.common import fmt, matched, mean_sd, parallel, score, shipped, train

TITLE = "Formal languages: parity and aⁿbⁿ, trained short, tested 2x and 4x longer"
CLAIM = ("Nested Learning §8 (formal language recognition): Hope's self-modifying, non-linear "
         "recurrence recognises parity and counting languages and extrapolates to longer strings, "
         "where Transformers and linear recurrences do not.")

SIZES = {
    "toy": dict(models=["transformer", "titans"], languages=["parity"], target=40_000, layers=1, steps=4,
                batch=4, L=4, context=24, batches=1, seeds=1, lr=3e-3),
    "default": dict(models=["transformer", "deltanet", "gated_deltanet", "titans", "hope"],
                    languages=["parity", "anbn"], target=100_000, layers=2, steps=300, batch=16, L=8,
                    context=96, batches=4, seeds=1, lr=3e-3),
}


def spelled(lang: str, lo: int, hi: int) -> str:
    return f"{lang}:train={lo},eval={hi}"


def length_ranges(L: int) -> dict:
    """The scored ranges of lengths: trained on (up to 2L), and 2x and 4x beyond."""
    return {"≤L": (1, L), "L+1..2L": (L, 2 * L), "2L+1..4L": (2 * L, 4 * L)}


def run(cfg: dict, log) -> dict:
    calls = []
    for lang in cfg["languages"]:
        for name in cfg["models"]:
            v = matched(shipped(name, name, f"model.layers={cfg['layers']}", f"lr={cfg['lr']}"), cfg["target"])
            calls += [(cell, dict(lang=lang, v=v, seed=seed, cfg=cfg)) for seed in range(cfg["seeds"])]
    return {"rows": parallel(calls, log), "ranges": {k: list(r) for k, r in length_ranges(cfg["L"]).items()}}


def cell(lang: str, v, seed: int, cfg: dict) -> dict:
    """One language, model and seed: trained on lengths up to 2L, scored on three length ranges."""
    L = cfg["L"]
    t = train(v, task=spelled(lang, L, 2 * L), steps=cfg["steps"], batch=cfg["batch"], context=cfg["context"],
              seed=seed)
    acc = {}
    for label, (lo, hi) in length_ranges(L).items():
        ctx = max(cfg["context"], 3 * (2 * hi + 2))      # room for a few episodes
        acc[label] = score(t.model, task=spelled(lang, lo, hi), context=ctx, batches=cfg["batches"],
                           batch=cfg["batch"], seed=seed)["accuracy"]
    return dict(language=lang, model=v.label, seed=seed, params=t.params, accuracy=acc, seconds=t.seconds,
                log=f"formal {lang} {v.label} seed {seed}: " + ", ".join(f"{k} {a:.3f}" for k, a in acc.items()))


def _table(result: dict) -> dict:
    out = {}
    for r in result["rows"]:
        m = out.setdefault((r["language"], r["model"]), {"params": r["params"], "acc": {}})
        for k, a in r["accuracy"].items():
            m["acc"].setdefault(k, []).append(a)
    return out


def report(result: dict) -> str:
    cfg, tab = result["config"], _table(result)
    ranges = list(result["ranges"])
    lines = [f"Trained on lengths 1..{cfg['L']} (`train` option; a^n b^n: n), context {cfg['context']}, "
             f"{cfg['steps']} steps of {cfg['batch']}, lr {cfg['lr']}, {cfg['layers']} layers, ~{cfg['target']:,} "
             f"parameters; scored on the validation episodes of each length range (exact accuracy on the "
             f"scored tokens: parity's answer bit; a^n b^n's b's after the first, and `$`). Chance: parity 0.5.", "",
             "| language | model | params | " + " | ".join(ranges) + " |",
             "| --- | --- | ---: | " + " | ".join("---:" for _ in ranges) + " |"]
    for (lang, name), m in tab.items():
        lines.append(f"| {lang} | {name} | {m['params']:,} | "
                     + " | ".join(fmt(*mean_sd(m["acc"][k])) for k in ranges) + " |")
    lines.append("")
    far = ranges[-1]
    for lang in cfg["languages"]:
        scores = {name: mean_sd(m["acc"][far])[0] for (lg, name), m in tab.items() if lg == lang}
        if "hope" in scores:
            best = max(scores, key=scores.get)
            held = best == "hope" or scores["hope"] >= scores[best] - 1e-9
            lines += [""] if lines[-1].startswith("**Verdict") else []
            lines.append(f"**Verdict, {lang}** (criterion: Hope has the best accuracy at 4x the training "
                         f"length): {'holds' if held else 'does not hold'} at this scale "
                         f"(hope {scores['hope']:.3f}; best {best} {scores[best]:.3f}).")
    return "\n".join(lines)


def plot(result: dict, plt):
    tab = _table(result)
    langs = sorted({lang for lang, _ in tab})
    ranges = list(result["ranges"])
    fig, axes = plt.subplots(1, len(langs), figsize=(5 * len(langs), 3.5), squeeze=False)
    for ax, lang in zip(axes[0], langs):
        for (lg, name), m in tab.items():
            if lg == lang:
                ax.plot(ranges, [mean_sd(m["acc"][k])[0] for k in ranges], marker="o", label=name)
        ax.set_title(lang)
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=7)
    return fig

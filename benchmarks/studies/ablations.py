"""Study 4, Hope ablations (the paper's Table 6): each a spec that differs from its parent in one place.

The parent is `hope_small` (Hope at the studies' scale, `benchmarks/studies/specs/hope_small.yaml`);
every ablation is a file next to it, and the report prints its diff. All train on the same
bytes of the standard library (study 2's corpus). The parent runs with several seeds, so the
table can say which differences stand out of the seed-to-seed spread.
"""
from __future__ import annotations

from benchmarks.studies.common import VARIANTS, Variant, fmt, mean_sd, parallel, score, spec_diff, train
from benchmarks.studies.language import corpus

TITLE = "Hope ablations (Table 6): one spec change each"
CLAIM = ("Nested Learning Table 6: every component of Hope helps: removing DGD (plain GD), momentum, "
         "retention or the CMS, or making k or v static, raises the loss; CMS levels at several "
         "frequencies beat one frequency, and more CMS levels help.")
ABLATIONS = [
    ("hope_gd", "DGD replaced by plain GD"),
    ("hope_momentum", "with momentum (Hope as printed has none: the paper's 'w/o momentum' is the parent)"),
    ("hope_no_retention", "no retention (alpha = 1)"),
    ("hope_no_cms", "no CMS (one static MLP)"),
    ("hope_static_k", "static k (a projection)"),
    ("hope_static_v", "static v (a projection)"),
    ("hope_adaptive_q", "adaptive q (the parent's q is static, as the paper's Hope)"),
    ("hope_cms_one_freq", "all CMS levels at one frequency (16, 16, 16)"),
    ("hope_cms_1", "CMS with 1 level (16)"),
    ("hope_cms_2", "CMS with 2 levels (16, 64)"),
    ("hope_cms_4", "CMS with 4 levels (16, 32, 64, 128)"),
    ("hope_cms_8", "CMS with 8 levels (16, 16, 32, 32, 64, 64, 128, 128)"),
    ("hope_low_32", "lowest frequency 1/32 (16, 32, 32)"),
    ("hope_low_128", "lowest frequency 1/128 (16, 32, 128)"),
]

SIZES = {
    "toy": dict(ablations=["hope_gd"], layers=1, steps=2, batch=2, context=32, batches=1, seeds=1, parent_seeds=1,
                lr=3e-3),
    "default": dict(ablations=[a for a, _ in ABLATIONS], layers=1, steps=200, batch=8, context=128, batches=8,
                    seeds=2, parent_seeds=3, lr=3e-3),
}
PARENT = "hope_small"


def run(cfg: dict, log) -> dict:
    path, sha, _ = corpus()
    names = [(PARENT, cfg["parent_seeds"])] + [(a, cfg["seeds"]) for a in cfg["ablations"]]
    rows = parallel([(cell, dict(name=name, seed=seed, cfg=cfg, path=path))
                     for name, seeds in names for seed in range(seeds)], log)
    diffs = {a: spec_diff(VARIANTS / f"{a}.yaml", VARIANTS / f"{PARENT}.yaml") for a in cfg["ablations"]}
    return {"rows": rows, "diffs": diffs, "corpus_sha256": sha}


def cell(name: str, seed: int, cfg: dict, path) -> dict:
    """One variant and seed: trained on the corpus, its validation loss."""
    v = Variant(name, VARIANTS / f"{name}.yaml", (f"model.layers={cfg['layers']}", f"lr={cfg['lr']}"))
    t = train(v, data=path, steps=cfg["steps"], batch=cfg["batch"], context=cfg["context"], seed=seed,
              lr_schedule="cosine", warmup=max(1, cfg["steps"] // 20))
    s = score(t.model, data=path, context=cfg["context"], batches=cfg["batches"], batch=cfg["batch"], seed=seed)
    return dict(variant=name, seed=seed, params=t.params, loss=s["loss"], seconds=t.seconds,
                log=f"ablation {name} seed {seed}: val loss {s['loss']:.4f} ({t.seconds:.0f} s)")


def _by(result: dict) -> dict:
    out = {}
    for r in result["rows"]:
        m = out.setdefault(r["variant"], {"params": r["params"], "loss": [], "seconds": []})
        m["loss"].append(r["loss"])
        m["seconds"].append(r["seconds"])
    return out


def report(result: dict) -> str:
    cfg, by = result["config"], _by(result)
    about = dict(ABLATIONS)
    p_mean, p_sd = mean_sd(by[PARENT]["loss"])
    parent_at = {r["seed"]: r["loss"] for r in result["rows"] if r["variant"] == PARENT}
    band = max(2 * p_sd, 1e-3)
    lines = [f"Parent `{PARENT}` at {cfg['layers']} layer(s), d_model 64; the corpus of study 2 (SHA-256 "
             f"`{result['corpus_sha256'][:16]}…`); {cfg['steps']} steps of {cfg['batch']} x {cfg['context']} bytes, "
             f"AdamW lr {cfg['lr']} (cosine); validation loss (nats/byte) on {cfg['batches']} batches. The parent "
             f"ran {cfg['parent_seeds']} seed(s), each ablation {cfg['seeds']}; Δ is the difference from the parent "
             f"at the same seed(s). A Δ within two standard deviations of the parent's seeds ({band:.4f}) is marked "
             f"`~` (not distinguishable here), one under 0.001 `none` (the change did nothing measurable).", "",
             "| variant | change | params | val loss | Δ vs parent, same seed | |",
             "| --- | --- | ---: | ---: | ---: | --- |",
             f"| `{PARENT}` | the parent | {by[PARENT]['params']:,} | {fmt(p_mean, p_sd, 4)} | | |"]
    worse = []
    for a in cfg["ablations"]:
        rows = [r for r in result["rows"] if r["variant"] == a]
        m, _ = mean_sd([r["loss"] for r in rows])
        d = mean_sd([r["loss"] - parent_at[r["seed"]] for r in rows if r["seed"] in parent_at])[0]
        mark = "none" if abs(d) < 1e-3 else "~" if abs(d) <= band else ("worse" if d > 0 else "better")
        if mark == "worse":
            worse.append(a)
        lines.append(f"| `{a}` | {about[a]} | {by[a]['params']:,} | {fmt(m, None, 4)} | {d:+.4f} | {mark} |")
    removals = [a for a in ("hope_gd", "hope_no_retention", "hope_no_cms", "hope_static_k", "hope_static_v")
                if a in cfg["ablations"]]
    held = [a for a in removals if a in worse]
    lines += ["", f"**Verdict** (criterion: removing a component — DGD, retention, the CMS, adaptive k or v — "
                  f"raises the loss beyond the seed spread): holds for {len(held)} of {len(removals)} "
                  f"({', '.join(held) or 'none'}) at this scale."]
    if "hope_no_cms" in by and "hope_cms_1" in by and by["hope_no_cms"]["params"] == by["hope_cms_1"]["params"]:
        one, static = mean_sd(by["hope_cms_1"]["loss"])[0], mean_sd(by["hope_no_cms"]["loss"])[0]
        lines += ["", f"At equal parameters ({by['hope_cms_1']['params']:,}), one CMS level (an MLP updated in context "
                      f"every 16 tokens) against the same MLP static: {one:.4f} vs {static:.4f} ({one - static:+.4f}). "
                      f"`hope_no_cms` has fewer parameters than the parent, so its row alone does not separate the "
                      f"CMS's in-context updates from its size."]
    lines += ["", "<details><summary>The spec diffs</summary>", ""]
    for a in cfg["ablations"]:
        diff = "\n".join(ln for ln in result["diffs"][a].splitlines() if "name:" not in ln)
        lines += [f"`{a}`:", "```diff", diff, "```", ""]
    lines.append("</details>")
    return "\n".join(lines)


def plot(result: dict, plt):
    by = _by(result)
    names = list(by)
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(names) + 1))
    means = [mean_sd(by[n]["loss"])[0] for n in names]
    ax.barh(names, means, color=["tab:orange" if n == PARENT else "tab:blue" for n in names])
    ax.axvline(means[0], color="tab:orange", lw=1)
    ax.set_xlim(min(means) - 0.05, max(means) + 0.05)
    ax.invert_yaxis()
    ax.set_xlabel("validation loss (nats/byte)")
    ax.set_title("Hope ablations")
    return fig

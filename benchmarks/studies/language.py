"""Study 2, language modelling: byte-level loss on the Python standard library's own source.

The corpus needs no download: a fixed list of modules of the running Python's standard library,
concatenated in that order into one file (its SHA-256 is in the report: another Python version
gives another corpus). `nlc train --data` splits it 90/10 (train/validation); the score is the
validation loss in one whole-context call, and its value per position in bins (does a model use
more context?).
"""
from __future__ import annotations

import hashlib
import os
import sysconfig
from pathlib import Path

from benchmarks.studies.common import ROOT, fmt, matched, mean_sd, parallel, score, shipped, train

TITLE = "Language modelling: bytes of the Python standard library"
CLAIM = ("Nested Learning §8 (Table 1): Hope reaches a lower language-modelling loss than Titans, "
         "the DeltaNet family and a Transformer of the same size, and its loss keeps falling as "
         "the context grows.")
FILES = ["json/decoder.py", "json/encoder.py", "json/scanner.py", "json/__init__.py", "textwrap.py",
         "string.py", "heapq.py", "bisect.py", "fractions.py", "statistics.py", "difflib.py", "shlex.py",
         "calendar.py", "colorsys.py", "base64.py", "argparse.py"]

SIZES = {
    "toy": dict(models=["transformer", "titans"], target=50_000, layers=1, steps=4, batch=2, context=64,
                batches=1, bins=4, seeds=1, lr=3e-3),
    "default": dict(models=["transformer", "gated_deltanet", "titans", "hope"], target=150_000, layers=2,
                    steps=300, batch=8, context=256, batches=8, bins=8, seeds=3, lr=3e-3),
}


def corpus() -> tuple[Path, str, int]:
    """The corpus file (written once, atomically, under runs/studies/), its SHA-256 and size."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    data = b"".join((lib / f).read_bytes() for f in FILES)
    sha = hashlib.sha256(data).hexdigest()
    path = ROOT / "runs" / "studies" / f"stdlib-{sha[:12]}.txt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return path, sha, len(data)


def run(cfg: dict, log) -> dict:
    path, sha, size = corpus()
    calls = []
    for name in cfg["models"]:
        v = matched(shipped(name, name, f"model.layers={cfg['layers']}", f"lr={cfg['lr']}"), cfg["target"])
        calls += [(cell, dict(v=v, seed=seed, cfg=cfg, path=path)) for seed in range(cfg["seeds"])]
    return {"rows": parallel(calls, log), "corpus": {"files": FILES, "sha256": sha, "bytes": size,
                                                     "stdlib": sysconfig.get_paths()["stdlib"]}}


def cell(v, seed: int, cfg: dict, path: Path) -> dict:
    """One model and seed: trained on the corpus, its validation loss in bins of position."""
    t = train(v, data=path, steps=cfg["steps"], batch=cfg["batch"], context=cfg["context"], seed=seed,
              lr_schedule="cosine", warmup=max(1, cfg["steps"] // 20))
    s = score(t.model, data=path, context=cfg["context"], batches=cfg["batches"], batch=cfg["batch"], seed=seed,
              bins=cfg["bins"])
    return dict(model=v.label, seed=seed, params=t.params, loss=s["loss"], bins=s["bins"], seconds=t.seconds,
                tokens_per_s=cfg["steps"] * cfg["batch"] * cfg["context"] / t.seconds,
                log=f"language {v.label} seed {seed}: {t.params:,} params, val loss {s['loss']:.4f} ({t.seconds:.0f} s)")


def _by_model(result: dict) -> dict:
    out = {}
    for r in result["rows"]:
        m = out.setdefault(r["model"], {"params": r["params"], "loss": [], "bins": [], "tps": []})
        m["loss"].append(r["loss"])
        m["bins"].append([b[2] for b in r["bins"]])
        m["tps"].append(r["tokens_per_s"])
    return out


def report(result: dict) -> str:
    cfg, c, by = result["config"], result["corpus"], _by_model(result)
    edges = [f"{b[0]}-{b[1]}" for b in result["rows"][0]["bins"]]
    lines = [f"Corpus: {len(c['files'])} files of the standard library ({c['stdlib']}): "
             f"{', '.join(c['files'])}; {c['bytes']:,} bytes, SHA-256 `{c['sha256'][:16]}…`; the first 90% "
             f"trains, the last 10% validates. {cfg['steps']} steps of {cfg['batch']} x {cfg['context']} bytes, "
             f"AdamW lr {cfg['lr']} (cosine, warmup), {cfg['layers']} layers, ~{cfg['target']:,} parameters; "
             f"{cfg['seeds']} seed(s). Loss in nats per byte on {cfg['batches']} validation batches.", "",
             "| model | params | val loss | train tokens/s | " + " | ".join(f"pos {e}" for e in edges) + " |",
             "| --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in edges) + " |"]
    for name, m in by.items():
        bins = [mean_sd([b[i] for b in m["bins"]])[0] for i in range(len(edges))]
        lines.append(f"| {name} | {m['params']:,} | {fmt(*mean_sd(m['loss']))} | {mean_sd(m['tps'])[0]:,.0f} | "
                     + " | ".join(f"{b:.3f}" for b in bins) + " |")
    lines.append("")
    loss = {n: mean_sd(m["loss"])[0] for n, m in by.items()}
    if "hope" in loss:
        best = min(loss, key=loss.get)
        other = min((n for n in loss if n != "hope"), key=loss.get, default=None)
        lines.append(f"**Verdict** (criterion: Hope has the lowest validation loss): "
                     f"{'holds' if best == 'hope' else 'does not hold'} at this scale (hope {loss['hope']:.4f}, "
                     f"{by['hope']['params']:,} parameters"
                     + (f"; the best other, {other}, {loss[other]:.4f} with {by[other]['params']:,}" if other else "")
                     + "; the widths are the closest to the target the 16-wide steps allow).")
    return "\n".join(lines)


def plot(result: dict, plt):
    by = _by_model(result)
    mids = [(b[0] + b[1]) / 2 for b in result["rows"][0]["bins"]]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, m in by.items():
        ax.plot(mids, [mean_sd([b[i] for b in m["bins"]])[0] for i in range(len(mids))], marker="o", label=name)
    ax.set_xlabel("position in the context")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title("Loss as context grows")
    ax.legend(fontsize=7)
    return fig

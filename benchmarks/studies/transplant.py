"""Study 6, CMS initialised from a pretrained Transformer (Nested Learning §7.3).

A Transformer trains on the text corpus; its MLP of each layer initialises every CMS level of
that layer in Hope (and its embedding, final norm and head initialise Hope's: the shapes match
at the same width), written as a safetensors file that `nlc train --init` loads. That Hope then
trains; a Hope from scratch trains for the same total compute (the Transformer's wall time
converted into Hope steps at Hope's measured speed). A control, Hope from scratch for the same
steps as the transplanted one, separates what the transplant gives from what the extra steps give;
it trains beside the Transformer, so Hope's speed is measured under the same load as the
Transformer's wall time.
All are scored on the validation split.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from benchmarks.studies.common import VARIANTS, Variant, build, parallel, score, shipped, train
from benchmarks.studies.language import corpus

TITLE = "CMS initialised from a pretrained Transformer's MLPs (§7.3)"
CLAIM = ("Nested Learning §7.3: a Transformer's MLP blocks are a CMS of one frequency, so they can "
         "initialise Hope's CMS; starting from them beats training Hope from scratch at equal compute.")

SIZES = {
    "toy": dict(layers=1, transformer_steps=3, hope_steps=2, batch=2, context=32, batches=1, seeds=1, lr=3e-3),
    "default": dict(layers=1, transformer_steps=400, hope_steps=150, batch=8, context=128, batches=8, seeds=3,
                    lr=3e-3),
}


def transplant(transformer, hope) -> dict:
    """Hope's tensors taken from the Transformer: per layer, its MLP into every CMS level (the
    pre-norm too), and the embedding, final norm and head."""
    t, h = transformer.state_dict(), hope.state_dict()
    out = {k: t[k] for k in ("embed.weight", "norm.weight", "head.weight")}
    for key in h:
        parts = key.split(".")       # blocks.i.cmsN_mlp.layers.j.weight, blocks.i.cms(N)_norm.weight
        if len(parts) > 2 and parts[0] == "blocks" and parts[2].startswith("cms"):
            kind = "mlp_mlp" if parts[2].endswith("_mlp") else "mlp_norm"
            out[key] = t[".".join(["blocks", parts[1], kind, *parts[3:]])]
    for k, v in out.items():
        assert h[k].shape == v.shape, (k, h[k].shape, v.shape)
    return out


def run(cfg: dict, log) -> dict:
    """Per seed, two rounds of two jobs: the Transformer beside Hope from scratch for the
    transplant's steps (which gives Hope's seconds per step under the same load as the
    Transformer's seconds), then the transplanted Hope beside Hope from scratch at equal compute."""
    path, sha, _ = corpus()
    common = dict(path=str(path), cfg=cfg)
    rows = []
    for seed in range(cfg["seeds"]):
        with tempfile.TemporaryDirectory(prefix="nlc-study-") as tmp:
            init = str(Path(tmp) / "init.safetensors")
            t, same = parallel([(cell, dict(kind="transformer", seed=seed, steps=cfg["transformer_steps"],
                                            save_init=init, **common)),
                                (cell, dict(kind="hope", seed=seed, steps=cfg["hope_steps"], **common))], log)
            per_step = same["seconds"] / cfg["hope_steps"]
            extra = round(t["seconds"] / per_step)
            h, s = parallel([(cell, dict(kind="hope", seed=seed, steps=cfg["hope_steps"], init=init, **common)),
                             (cell, dict(kind="hope", seed=seed, steps=cfg["hope_steps"] + extra, **common))], log)
        row = dict(seed=seed, transformer_seconds=t["seconds"], hope_seconds_per_step=per_step,
                   scratch_steps=cfg["hope_steps"] + extra, transformer=t["loss"], transplanted=h["loss"],
                   scratch=s["loss"], scratch_same_steps=same["loss"], transformer_params=t["params"],
                   hope_params=h["params"])
        log(f"transplant seed {seed}: transformer {row['transformer']:.4f}, hope from it {row['transplanted']:.4f} "
            f"({cfg['hope_steps']} steps), hope from scratch {row['scratch']:.4f} ({row['scratch_steps']} steps), "
            f"{row['scratch_same_steps']:.4f} ({cfg['hope_steps']} steps)")
        rows.append(row)
    return {"rows": rows}


def cell(kind: str, seed: int, steps: int, path: str, cfg: dict, init: str | None = None,
         save_init: str | None = None) -> dict:
    """Train the Transformer (and write the Hope tensors it gives to ``save_init``) or Hope (from
    ``init``, else from scratch) for ``steps``; its validation loss, seconds and parameters."""
    sets = (f"model.layers={cfg['layers']}", f"lr={cfg['lr']}")
    hv = Variant("hope_small", VARIANTS / "hope_small.yaml", sets)
    v = shipped("transformer", "transformer", *sets, "model.d_model=64") if kind == "transformer" else hv
    t = train(v, steps=steps, seed=seed, data=Path(path), batch=cfg["batch"], context=cfg["context"],
              init=Path(init) if init else None)
    if save_init:
        from nlc.runtime.safetensors import save_file
        save_file(transplant(t.model, build(hv)), Path(save_init))
    loss = score(t.model, data=Path(path), context=cfg["context"], batches=cfg["batches"], batch=cfg["batch"],
                 seed=seed)["loss"]
    return dict(loss=loss, seconds=t.seconds, params=t.params,
                log=f"transplant {kind}{' from the Transformer' if init else ''} seed {seed}, {steps} steps: "
                    f"val loss {loss:.4f} ({t.seconds:.0f} s)")


def report(result: dict) -> str:
    cfg, rows = result["config"], result["rows"]
    r0 = rows[0]
    lines = [f"Corpus of study 2; batch {cfg['batch']} x {cfg['context']} bytes, AdamW lr {cfg['lr']}, "
             f"{cfg['layers']} layer(s), d_model 64 for both. The Transformer ({r0['transformer_params']:,} "
             f"parameters) trains {cfg['transformer_steps']} steps; its tensors initialise Hope "
             f"({r0['hope_params']:,} parameters), which trains {cfg['hope_steps']} steps. Hope from scratch "
             f"trains the same steps plus the Transformer's wall time in Hope steps (equal compute); the "
             f"control trains from scratch for the transplanted Hope's {cfg['hope_steps']} steps.", "",
             "| seed | Transformer | Hope from the Transformer | from scratch, equal compute (steps) | difference "
             "| from scratch, equal steps | difference |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        same = r.get("scratch_same_steps")
        control = ("| | |" if same is None else f"| {same:.4f} | {r['transplanted'] - same:+.4f} |")
        lines.append(f"| {r['seed']} | {r['transformer']:.4f} | {r['transplanted']:.4f} | "
                     f"{r['scratch']:.4f} ({r['scratch_steps']}) | {r['transplanted'] - r['scratch']:+.4f} " + control)
    held = all(r["transplanted"] < r["scratch"] for r in rows)
    lines += ["", f"**Verdict** (criterion: the transplanted Hope has the lower validation loss at equal "
                  f"compute, every seed): {'holds' if held else 'does not hold'} at this scale."]
    if all("scratch_same_steps" in r for r in rows):
        helps = all(r["transplanted"] < r["scratch_same_steps"] for r in rows)
        lines.append(f"At equal steps (the control) the transplant {'helps' if helps else 'does not help'}: "
                     f"the initialisation itself is {'worth' if helps else 'not worth'} something here, "
                     f"whatever its cost in Transformer training.")
    return "\n".join(lines)


def plot(result: dict, plt):
    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    labels = ["transformer", "transplanted", "scratch"] + (["scratch_same_steps"] if "scratch_same_steps" in rows[0] else [])
    ax.bar([lb.replace("_same_steps", "\n(same steps)") for lb in labels],
           [sum(r[k] for r in rows) / len(rows) for k in labels], color=["gray", "tab:green", "tab:blue", "tab:cyan"][:len(labels)])
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_ylim(min(sum(r[k] for r in rows) / len(rows) for k in labels) - 0.1, None)
    ax.set_title("Hope's CMS from a Transformer")
    return fig

"""Write your own level: a new update rule in a spec, with no Python, checked, explained, verified
and trained.

    python examples/own_level.py          # a few minutes on a laptop CPU
    python examples/own_level.py --toy    # seconds: tiny model, few steps (NLC_EXAMPLES_TOY=1 too)

The level is in examples/my_level.nl: gated DeltaNet's L2 objective with GLA's retention per key
channel (read its header). This script walks it through what you would type at a shell, printing
each command before it runs it, so every step can be copied and run by hand:

1. `nlc check`   parse, validate and check it (and what a mistake looks like);
2. `nlc explain` the update rule nlc derives from the rule chain;
3. `nlc verify`  the compiled chunkwise-parallel form against the token-by-token recurrence;
4. `nlc train`   a short run on the associative-recall task: the loss falls below what any model
                 without memory can reach; then the same run for its parent, gated DeltaNet.

Outputs go to runs/examples/own_level/ (runs/ is git-ignored).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from _common import ROOT, nlc, start   # examples/_common.py: the tutorials' shared set-up

SPEC = "examples/my_level.nl"


def curve(run: Path) -> tuple[list[dict], list[dict]]:
    """A run's training log lines and its evaluations, from DIR/metrics.jsonl (one JSON per line)."""
    rows = [json.loads(line) for line in (ROOT / run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if "loss" in r], [r for r in rows if "val_loss" in r]


OUT, toy, t_start = start("own_level", __doc__)

# ---------------------------------------------------------------- 1. check
# `nlc check` parses the spec, validates it against the language's schema and runs every semantic
# check: shapes of flows, which objectives a memory can take, the rule chain, clocks and chunks.
print("== 1. check the spec")
nlc("check", SPEC)

# A mistake is reported with its file, line, column and a hint, and exit status 2. Here the spec
# with one primitive misspelt (`scal` for `scale`), written next to the run's outputs:
bad = OUT / "typo.nl"
(ROOT / bad).write_text((ROOT / SPEC).read_text().replace("scale(beta)", "scal(beta)"))
nlc("check", str(bad), expect=2)

# The same spec from Python: `nlc.load` returns the validated Spec (nlc's core needs no torch).
import nlc as nlc_api                               # noqa: E402  (imported where the tutorial first uses it)

spec = nlc_api.load(ROOT / SPEC)
level = spec.levels["memory"]
print(f"\nfrom Python: level `memory` is a {level.memory.kind} memory, objective {level.objective}, "
      f"rule {' |> '.join(str(step) for step in level.rule)}")     # the chain: a tuple of parsed calls

# ---------------------------------------------------------------- 2. explain
# `nlc explain` derives each level's update rule from its objective and rule chain, as Markdown
# with LaTeX. For a matrix memory it is the generalised delta rule M_t = M_(t-1)(a I - b k k^T) + w k^T;
# a retention per key channel turns `a I` into diag(a): the "diagonal plus rank one" form, which
# the backend computes chunk by chunk with a WY transform with per-channel decays.
print("\n== 2. the derived update rule")
nlc("explain", SPEC, "-o", str(OUT / "explain.md"))
print((ROOT / OUT / "explain.md").read_text())

# ---------------------------------------------------------------- 3. verify
# The training form of the level is chunkwise-parallel; its definition is the recurrence, one token
# at a time. `nlc verify` compiles the spec (one block, float64), runs both forms from the same
# weights and random tokens, and prints the largest relative difference of the logits, each level's
# final state and every parameter's gradient; it exits 1 above the tolerance (1e-8). `--backend
# torch` skips the Triton kernels (on a CPU they run under Triton's slow interpreter; on a GPU drop
# it to check the kernels too).
print("== 3. verify: recurrent vs chunked")
nlc("verify", SPEC, "--backend", "torch", *(["--tokens", "35"] if toy else []))

# ---------------------------------------------------------------- 4. train
# Associative recall: 16 key-value pairs, then every key again in a new order; the loss counts only
# the asked values. A model with no memory of the pairs can do no better than ln(16) = 2.77 (the log
# calls it "loss without memory"), so a loss below that is the new level recalling in context.
# `--set` shrinks the model for the toy run without editing the spec (and checks it again).
steps = 30 if toy else 500
common = ["--task", "recall", "--steps", str(steps), "--context", "64", "--batch", "8" if toy else "16",
          "--eval-every", str(steps), "--log-every", "10" if toy else "50", "--save-every", str(steps), "--keep", "1"]
shrink = ["--set", "model.d_model=32", "--set", "model.layers=1"] if toy else []
print("\n== 4. train it on associative recall")
nlc("train", SPEC, *common, *shrink, "--out", str(OUT / "my_level"))

# Its parent, gated DeltaNet (one retention per head), at the same width, heads, learning rate and
# data: the comparison a researcher would make first. (Skipped in the toy run.)
if not toy:
    nlc("train", "specs/gated_deltanet.yaml", *common, "--set", "model.d_model=64", "--set", "model.layers=2",
        "--set", "model.heads=2", "--set", "lr=3e-3", "--out", str(OUT / "gated_deltanet"))

# ---------------------------------------------------------------- the result
print("\n== result")
from nlc.runtime.data import make_data             # noqa: E402  (the data of `nlc train`, as a function)

floor = make_data(None, "recall", 256, 64, 0).floor     # the best loss without memory: ln 16
for name in ["my_level"] + ([] if toy else ["gated_deltanet"]):
    train, evals = curve(OUT / name)
    print(f"{name:>15}: train loss {train[0]['loss']:.3f} (step {train[0]['step']}) -> {train[-1]['loss']:.3f} "
          f"(step {train[-1]['step']}); val loss {evals[-1]['val_loss']:.3f}, recall accuracy "
          f"{evals[-1]['val_acc']:.3f}; loss without memory {floor:.3f}")
train, _ = curve(OUT / "my_level")
print(f"final loss {train[-1]['loss']:.4f} < first loss {train[0]['loss']:.4f}: "
      f"{'yes' if train[-1]['loss'] < train[0]['loss'] else 'NO'}")
print(f"outputs in {OUT}/ (explain.md, each run's metrics.jsonl, loss.png and checkpoint); "
      f"{time.perf_counter() - t_start:.0f} s in all")

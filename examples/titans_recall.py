"""Titans on associative recall: train a deep memory that learns at test time, then test it on
sequences longer than it was trained on.

    python examples/titans_recall.py          # a few minutes on a laptop CPU
    python examples/titans_recall.py --toy    # seconds: a tiny model, a few steps (NLC_EXAMPLES_TOY=1 too)

Titans (specs/titans.yaml; Behrouz et al., 2025) keeps an MLP as its memory and trains it inside
each sequence by gradient descent with momentum and a forget gate. Recall is the test of such a
memory: key-value pairs, then every key again; the score counts the values only, which nothing
but a memory of this sequence can predict.

The script trains Titans on 64-token sequences, evaluates it there and at 4x the length (`nlc eval
--context`), where it sees the memory fill up, then continues the same run on long sequences
(`nlc train --resume`) and evaluates again. Outputs go to runs/examples/titans_recall/.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from _common import ROOT, nlc, start   # examples/_common.py: the tutorials' shared set-up

OUT, toy, t_start = start("titans_recall", __doc__)
RUN = OUT / "run"


def accuracy(path: Path) -> dict:
    """Recall accuracy per mode of an eval.json: whole sequence, pieces carried, pieces reset."""
    rows = json.loads((ROOT / path).read_text())["rows"]
    return {mode: row["accuracy"] for mode, row in rows.items()}


# ---------------------------------------------------------------- 1. train
# The task: 8 key-value pairs over 16 symbols, then the 8 keys again; a 64-token sequence holds two
# such episodes. Chance is 1/16 and the best loss without memory ln 16 = 2.77 (the log prints it).
#
# The spec is 4 layers of 256; `--set` edits it for a laptop without touching the file, and the
# edited spec is checked again:
# - d_model 64, 2 layers, 2 heads: a memory MLP per head of width 32 (with 4 heads each would see 16);
# - chunk 16: an MLP memory takes every gradient of a chunk at the chunk's starting state (mini-batch
#   gradient descent; chunk 1 is the exact token-by-token rule), so a smaller chunk is closer to
#   the rule as written, and it allows a larger inner step:
# - eta = 0.05 * gate(x): the inner learning rate; the spec's bound chunk * eta / (1 - beta) < 2
#   (beta is momentum's 0.5; docs/design.md) gives 16 * 0.05 / 0.5 = 1.6.
TASK = "recall:pairs=8"
steps = 20 if toy else 400
shrink = ["--set", f"model.d_model={16 if toy else 64}", "--set", f"model.layers={1 if toy else 2}",
          "--set", "model.heads=2", "--set", "levels.memory.chunk=16", "--set", "signals.eta=0.05 * gate(x)"]
print("== 1. train Titans on recall, 64 tokens per sequence")
nlc("train", "specs/titans.yaml", "--task", TASK, "--context", "64", "--steps", str(steps),
    "--batch", "4" if toy else "16", *shrink, "--set", "lr=3e-3", "--log-every", str(max(1, steps // 10)),
    "--eval-every", str(max(1, steps // 4)), "--save-every", str(steps), "--keep", "1", "--out", str(RUN))

# ---------------------------------------------------------------- 2. evaluate, then 4x longer
# `nlc eval` rebuilds the model from the spec text in the checkpoint and scores the validation
# episodes three ways: each sequence whole; cut into 4 pieces with the memory's state carried from
# piece to piece (equal to whole here: the cuts fall on multiples of the chunk, and the table says
# so); the same pieces with the state reset at each cut, so nothing is remembered across pieces.
# `--context 256` asks for sequences 4x longer than training's: 8 episodes in a row, so the memory
# must let old pairs go (its forget gate) to store new ones.
batches = ["--batches", "1" if toy else "8", "--progress-every", "0"]
print("\n== 2. evaluate at the training length (64), then at 256")
nlc("eval", str(RUN), *batches, "--out", str(OUT / "eval-64.json"))
nlc("eval", str(RUN), "--context", "256", *batches, "--out", str(OUT / "eval-256.json"))

# ---------------------------------------------------------------- 3. train on long sequences
# `--resume` continues the run from its checkpoint (model, optimizer state, data position, RNG),
# with the settings given again winning: here 256-token sequences, for some more steps.
more = 4 if toy else 100
print(f"\n== 3. continue the run on 256-token sequences for {more} steps")
nlc("train", "specs/titans.yaml", "--resume", "--out", str(RUN), "--context", "256", "--batch", "2" if toy else "8",
    "--steps", str(steps + more), "--eval-every", str(more), "--save-every", str(more),
    "--log-every", str(max(1, more // 5)))
nlc("eval", str(RUN), "--context", "256", *batches, "--out", str(OUT / "eval-256-resumed.json"))

# ---------------------------------------------------------------- the result
rows = [json.loads(line) for line in (ROOT / RUN / "metrics.jsonl").read_text().splitlines() if line.strip()]
train = [r for r in rows if "loss" in r and r["step"] <= steps]
print("\n== result (recall accuracy; chance 0.0625)")
print(f"{'':>36} {'whole':>7} {'carried':>8} {'reset':>7}")
for label, path in [(f"trained at 64, step {steps}, at 64", "eval-64.json"),
                    (f"trained at 64, step {steps}, at 256", "eval-256.json"),
                    (f"+{more} steps at 256, at 256", "eval-256-resumed.json")]:
    a = accuracy(OUT / path)
    print(f"{label:>36} {a['whole']:>7.3f} {a['carried']:>8.3f} {a['reset']:>7.3f}")
print(f"final loss {train[-1]['loss']:.4f} < first loss {train[0]['loss']:.4f}: "
      f"{'yes' if train[-1]['loss'] < train[0]['loss'] else 'NO'} (training at 64 tokens)")
print(f"outputs in {OUT}/ (run/ with metrics.jsonl, loss.png and the checkpoint; eval-*.json); "
      f"{time.perf_counter() - t_start:.0f} s in all")

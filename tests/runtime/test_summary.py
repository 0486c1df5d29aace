"""The end-of-run summary gives the final step's loss (logged or not) and this run's totals; after
--resume, the resumed run's own first numbers, not those of the run it continues."""
from __future__ import annotations

from pathlib import Path

from nlc.runtime import checkpoint
from nlc.runtime.train import TrainConfig, resolve, train

ROOT = Path(__file__).parent.parent.parent
TINY = ("model.d_model=32", "model.layers=1", "model.heads=2")


def run(out, **kw) -> dict:
    kw = {"spec": ROOT / "specs/transformer.yaml", "sets": TINY, "steps": 5, "batch": 4, "context": 16, "out": out,
          "device": "cpu", "eval_every": 1000, "eval_batches": 1, **kw}
    lines: list[str] = []
    s = train(resolve(kw) if kw.get("resume") else TrainConfig(**kw), log=lines.append)
    s["log"] = lines
    return s


def losses(out) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in checkpoint.load(out, tensors=False).history if "loss" in r}


def test_the_summary_gives_the_final_steps_loss_not_the_last_logged(tmp_path):
    every = run(tmp_path / "every", log_every=1)
    losses_of_every_step = losses(tmp_path / "every")
    assert sorted(losses_of_every_step) == [1, 2, 3, 4, 5]
    s = run(tmp_path / "sparse", log_every=2)                  # logs steps 1, 2 and 4; the run ends at 5
    assert sorted(losses(tmp_path / "sparse")) == [1, 2, 4]
    assert s["last_loss"] == losses_of_every_step[5] == every["last_loss"]
    assert s["last_loss"] != losses_of_every_step[4]
    assert s["first_loss"] == losses_of_every_step[1]
    assert s["tokens"] == 5 * 4 * 16 and s["tokens_per_s"] > 0
    done = s["log"][-1]
    assert done.startswith("done: step 5/5 (5 steps, 320 tokens in "), done
    assert f"train loss {losses_of_every_step[1]:.4f} (step 1) -> {losses_of_every_step[5]:.4f} (step 5)" in done


def test_a_resumed_runs_summary_is_its_own(tmp_path):
    straight = run(tmp_path / "a", steps=6, log_every=1, eval_every=3)
    per_step = losses(tmp_path / "a")
    run(tmp_path / "b", steps=3, log_every=1, eval_every=3)
    s = run(tmp_path / "b", steps=6, resume=True)              # the checkpoint's history holds steps 1-3
    assert s["first_loss"] == per_step[4] and s["last_loss"] == per_step[6] == straight["last_loss"]
    assert s["tokens"] == 3 * 4 * 16
    vals = {r["step"]: r["val_loss"] for r in checkpoint.load(tmp_path / "a", tensors=False).history
            if "val_loss" in r}
    assert s["first_val"] == vals[3] and s["last_val"] == vals[6]   # from where it resumed, not step 0
    done = s["log"][-1]
    assert done.startswith("done: step 6/6 (3 steps, 192 tokens in "), done
    assert f"train loss {per_step[4]:.4f} (step 4) -> {per_step[6]:.4f} (step 6)" in done
    assert f"val loss {vals[3]:.4f} (step 3) -> {vals[6]:.4f} (step 6)" in done

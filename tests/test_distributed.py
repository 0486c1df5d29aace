"""`torchrun -m nlc.runtime.cli train`: two processes on gloo (CPU) follow a one-process run on the same
global batch, resume, and only rank 0 logs and writes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nlc.runtime import checkpoint, distributed
from nlc.runtime.train import TrainConfig, TrainError, train

ROOT = Path(__file__).parent.parent
SPEC = ROOT / "specs/transformer.yaml"
SETS = ("model.d_model=32", "model.layers=1")
ARGS = dict(batch=8, context=16, log_every=1, eval_every=2, device="cpu")


def torchrun(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "nlc.runtime.cli", "train", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch without gloo")
def test_two_processes_follow_one_process_and_resume(tmp_path):
    """Stopped at step 2 and resumed to 4, two processes (4 sequences each) follow one process on
    the batch of 8 straight through. float32: the two ranks sum their halves of the batch apart
    and DDP adds them, so losses differ by a few ulps (measured 1.4e-6 at 5.9, rel 2.4e-7) and
    parameters by 1.5e-8; the tolerances leave room for another BLAS."""
    one = tmp_path / "one"
    train(TrainConfig(spec=SPEC, sets=SETS, steps=4, out=one, **ARGS), log=lambda s: None)
    two = tmp_path / "two"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in ARGS.items()] + [a for s in SETS for a in ("--set", s)]
    first = torchrun(SPEC, "--steps", 2, "--out", two, *flags)
    assert first.returncode == 0, first.stderr
    resumed = torchrun(SPEC, "--steps", 4, "--out", two, "--resume", "--device", "cpu")
    assert resumed.returncode == 0, resumed.stderr
    # rank 0 alone logs: each line once
    assert first.stdout.count("train `transformer`") == 1 and "2 processes, 4 sequences each" in first.stdout
    assert first.stdout.count("step      1/2 | loss") == 1 and first.stdout.count("done: step 2/2") == 1
    assert "resumed at step 2" in resumed.stdout and resumed.stdout.count("done: step 4/4") == 1
    # the same trajectory: train loss (the mean over both ranks' rows) and validation loss at every step
    a, b = records(one), records(two)
    assert [(r["step"], "loss" in r) for r in a] == [(r["step"], "loss" in r) for r in b]
    for ra, rb in zip(a, b):
        key = "loss" if "loss" in ra else "val_loss"
        assert rb[key] == pytest.approx(ra[key], rel=1e-6, abs=0), (ra, rb)
    # rank 0 alone saves: its checkpoints, with its history (rank 1 has no validation records)
    assert sorted(p.name for p in two.glob("ckpt-*")) == ["ckpt-00000002.json", "ckpt-00000002.safetensors",
                                                          "ckpt-00000004.json", "ckpt-00000004.safetensors"]
    assert not list(two.glob("*.tmp")) and not list(two.glob(".*.tmp"))
    ca, cb = checkpoint.load(one), checkpoint.load(two)
    assert cb.step == 4 and cb.history == b and cb.config["batch"] == 8
    assert ca.model.keys() == cb.model.keys()
    for k in ca.model:
        torch.testing.assert_close(cb.model[k], ca.model[k], rtol=0, atol=1e-6, msg=k)


def test_the_global_batch_divides_among_the_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert distributed.world() == distributed.World(2, 0, 0)
    with pytest.raises(TrainError, match=r"--batch 7 is the global batch, split evenly over the 2 processes: "
                                         r"make it a multiple of 2"):
        train(TrainConfig(spec=SPEC, sets=SETS, steps=1, batch=7, context=16, out=tmp_path / "run", device="cpu"),
              log=lambda s: None)
    assert not torch.distributed.is_initialized() and not (tmp_path / "run").exists()


def test_each_rank_takes_its_rows_and_its_share_of_the_loss():
    x = torch.arange(24).reshape(6, 4)
    y = x.clone()
    y[0, :3] = -100      # the counted tokens differ between the ranks' rows
    rows = [distributed.shard(x, y, distributed.World(3, r, r)) for r in range(3)]
    assert torch.equal(torch.cat([xs for xs, _, _ in rows]), x) and all(xs.shape == (2, 4) for xs, _, _ in rows)
    assert {c for _, _, c in rows} == {21 / 3}           # each rank's summed loss / (21 counted / 3 ranks)
    xs, ys, counted = distributed.shard(x, y, distributed.World())   # one process: all of it, the mean loss
    assert torch.equal(xs, x) and torch.equal(ys, y) and counted == 21

"""A run whose loss or gradient turns NaN or infinite stops with exit status 3, naming the step and
the first tensor that went bad, and keeps its last checkpoint, which is finite."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from nlc.runtime import checkpoint, diverge
from nlc.runtime.train import Diverged, TrainError

ROOT = Path(__file__).parent.parent.parent
TINY = ("model.d_model=32", "model.layers=1", "model.heads=2")


def nlc_cli(*args):
    return subprocess.run([sys.executable, "-m", "nlc.runtime.cli", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_a_diverging_run_exits_3_naming_the_step_and_a_tensor_and_keeps_a_finite_checkpoint(tmp_path):
    out = tmp_path / "run"
    r = nlc_cli("train", "specs/transformer.yaml", "--steps", 8, "--batch", 4, "--context", 16, "--device", "cpu",
                "--out", out, "--log-every", 1, "--save-every", 1, "--eval-every", 100, "--clip", 0,
                "--set", "lr=1e6", *[a for s in TINY for a in ("--set", s)])
    assert r.returncode == 3, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
    m = re.match(r"error: the (loss|gradient) is (nan|inf|-inf) at step (\d+)\b.*?: (parameter|memory state|"
                 r"the output of|the gradient of) ([\w.]+) .*training diverged.*nothing saved, the last checkpoint "
                 r"\((.*ckpt-(\d+)\.json)\) is kept$", r.stderr.strip())
    assert m, r.stderr
    step, name, kept, kept_step = int(m[3]), m[5], Path(m[6]), int(m[7])
    assert step >= 2 and kept_step == step - 1       # saved every step up to the one before
    model_names = {n for n, _ in checkpoint.load(out).model.items()}
    assert any(n == name or n.startswith(name + ".") for n in model_names), (name, model_names)
    assert checkpoint.latest(out) == kept
    ck = checkpoint.load(out)
    assert ck.step == step - 1 and checkpoint.non_finite(ck.model, ck.optimizer) is None
    assert max(checkpoint.steps(out)) == step - 1    # nothing saved at or after the step that diverged


def test_the_culprit_is_the_first_bad_parameter_then_memory_state_then_gradient():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    assert diverge.culprit(model, {"0": {"S": torch.zeros(2)}}) is None
    assert diverge.culprit(model, {"0": {"S": torch.tensor([0.0, float("nan")])}}) == "memory state 0.S is NaN"
    model[1].bias.grad = torch.tensor([float("inf"), 0.0])
    assert diverge.culprit(model, {}) == "the gradient of 1.bias is infinite"
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")
    assert diverge.culprit(model, {"0": {"S": torch.tensor([float("nan")])}}) == "parameter 1.weight is NaN"


def test_the_culprit_names_the_first_module_whose_output_is_not_finite():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Softmax(-1), torch.nn.Linear(2, 2))
    with torch.no_grad():
        model[0].weight.fill_(1e38)
    x = torch.full((1, 2), 1e38)
    bad = diverge.culprit(model, None, rerun=lambda: model(x))
    assert bad.startswith("the output of 0 (Linear) is infinite"), bad


def test_divergence_is_its_own_error():
    assert issubclass(Diverged, TrainError)
    text = diverge.message(5, float("nan"), float("nan"), "parameter w is NaN", None)
    assert text.startswith("the loss is nan at step 5: parameter w is NaN: training diverged")
    assert text.endswith("nothing saved, no checkpoint was saved before it")

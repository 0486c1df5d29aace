"""`nlc train`: the loss falls on a task that needs memory, resuming repeats the trajectory bit for
bit, checkpoints are whole files, and a run that diverges stops before it saves NaN. The command's
mistakes, each a located diagnostic with exit status 2: ``test_train_mistakes``."""
from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nlc
from nlc.backends.torch.optim import compile_optimizer, optimizer_of
from nlc.runtime import checkpoint
from nlc.runtime.data import IGNORE, TextData
from nlc.runtime.tasks import CopyTask, RecallTask
from nlc.runtime.train import TrainConfig, TrainError, train

ROOT = Path(__file__).parent.parent
INLINE = ROOT / "tests" / "specs" / "inline_optimizer.yaml"
TINY = ("model.d_model=32", "model.layers=2", "model.heads=2")   # the shipped specs are vocab 256


def run(tmp_path, spec="specs/transformer.yaml", sets=TINY, **kw) -> dict:
    kw = {"steps": 6, "batch": 8, "context": 32, "out": tmp_path / "run", "device": "cpu", "eval_every": 1000,
          "eval_batches": 2, **kw}
    lines: list[str] = []
    summary = train(TrainConfig(spec=ROOT / spec if not Path(spec).is_absolute() else spec, sets=sets, **kw),
                    log=lines.append)
    summary["log"] = lines
    return summary


def nlc_cli(*args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}   # as conftest.py does for this process
    return subprocess.run([sys.executable, "-m", "nlc.runtime.cli", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120, **kw)


# ---------------------------------------------------------------- data

def test_tasks_are_seeded_and_count_only_what_memory_can_predict():
    copy = CopyTask(256, 32, seed=1)
    x, y = copy.batch("train", 5, 4)
    assert x.shape == y.shape == (4, 32)
    assert torch.equal(x, copy.batch("train", 5, 4)[0]) and not torch.equal(x, copy.batch("train", 6, 4)[0])
    assert not torch.equal(x, copy.batch("val", 5, 4)[0])
    n = 16
    counted = y != IGNORE
    assert counted.sum(1).tolist() == [n] * 4 and torch.equal(y[:, n:], x[:, :n])   # the copy, after the separator
    recall = RecallTask(256, 32, seed=1)
    x, y = recall.batch("train", 0, 4)
    for row_x, row_y in zip(x, y):
        pairs = dict(zip(row_x[:16:2].tolist(), row_x[1:16:2].tolist()))
        asked = row_y != IGNORE
        keys = row_x[asked]
        assert len(pairs) == 8 and asked.sum() == 8
        assert [pairs[k] for k in keys.tolist()] == row_y[asked].tolist()


def test_text_data_windows(tmp_path):
    p = tmp_path / "t.txt"
    p.write_bytes(bytes(range(256)) * 4)
    data = TextData(p, context=16, seed=0)
    x, y = data.batch("val", 0, 3)
    assert torch.equal(x[:, 1:], y[:, :-1]) and int(x.max()) < 256
    assert len(data.parts["train"]) == int(0.9 * 1024)


# ---------------------------------------------------------------- training

def test_loss_falls_on_the_copy_task(tmp_path):
    s = run(tmp_path, steps=30, batch=16, sets=TINY + ("lr=3e-3",), log_every=10)
    assert s["first_val"] > 5.0 and s["last_val"] < s["first_val"] - 2.0, s["log"]   # ln(256) = 5.55 at the start
    assert s["last_loss"] < s["first_loss"] - 2.0
    steps = [ln for ln in s["log"] if "| loss" in ln]
    assert len(steps) == 4 and "tok/s" in steps[0] and steps[-1].startswith("step     30/30")
    assert s["log"][-1].startswith("done: step 30/30")


def test_resume_repeats_the_trajectory_bit_for_bit(tmp_path):
    spec = INLINE   # its optimizer's slow level sums steps 1-4 and fires at step 4: resumed in between
    straight = run(tmp_path, spec=spec, out=tmp_path / "a", steps=6)
    first = run(tmp_path, spec=spec, out=tmp_path / "b", steps=3)
    assert first["step"] == 3
    resumed = run(tmp_path, spec=spec, out=tmp_path / "b", steps=6, resume=True)
    assert resumed["step"] == 6 and any("resumed at step 3" in ln for ln in resumed["log"])
    assert resumed["last_val"] == straight["last_val"]
    a, b = checkpoint.load(tmp_path / "a"), checkpoint.load(tmp_path / "b")
    assert any("s.sum" in st for st in b.optimizer["state"].values())
    assert a.model.keys() == b.model.keys()
    for k in a.model:
        assert torch.equal(a.model[k], b.model[k]), k
    sa, sb = a.optimizer["state"], b.optimizer["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k in sa[i]:
            assert torch.equal(torch.as_tensor(sa[i][k]), torch.as_tensor(sb[i][k])), (i, k)
    # a finished run has nothing to do; another spec cannot resume it
    again = run(tmp_path, spec=spec, out=tmp_path / "b", steps=6, resume=True)
    assert again["step"] == 6 and "nothing to do" in again["log"][-1]
    with pytest.raises(TrainError, match="trained from another spec"):
        run(tmp_path, spec=spec, out=tmp_path / "b", steps=8, resume=True, sets=("model.d_model=64",))


def test_checkpoint_files(tmp_path, monkeypatch):
    s = run(tmp_path, steps=4, log_every=2)
    out = tmp_path / "run"
    assert s["checkpoint"] == out / "ckpt-00000004.json"
    names = sorted(p.name for p in out.iterdir())
    assert {"ckpt-00000004.json", "ckpt-00000004.safetensors", "spec.yaml", "metrics.jsonl"} <= set(names)
    assert not [n for n in names if n.endswith(".tmp")]
    ck = checkpoint.load(out)
    text = (out / "spec.yaml").read_text()
    assert ck.step == 4 and ck.spec == text and ck.spec_sha256 == hashlib.sha256(text.encode()).hexdigest()
    assert ck.config["sets"] == list(TINY) and ck.config["steps"] == 4
    assert set(ck.rng) >= {"torch", "python"} and "state" in ck.optimizer
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records == ck.history and [r["step"] for r in records if "loss" in r] == [1, 2, 4]
    # the spec as trained (sizes from --set, the optimizer inline) is itself a spec that checks
    spec = nlc.load(out / "spec.yaml")
    assert spec.model.d_model == 32 and spec.optimizer.hyper["lr"] == 4e-4
    model = nlc.compile(spec)
    model.load_state_dict(ck.model)
    # a save that fails half way leaves the previous checkpoint whole
    files = [out / "ckpt-00000004.json", out / "ckpt-00000004.safetensors"]
    before = [f.read_bytes() for f in files]

    def fail(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        checkpoint.save(out, ck, plot=False)
    assert [f.read_bytes() for f in files] == before and not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))


def test_inline_optimizer_trains(tmp_path):
    spec = nlc.load(INLINE)
    opt = optimizer_of(spec, INLINE.parent)
    assert opt == spec.optimizer and opt.name == "inline_optimizer_optimizer"
    model = nlc.compile(spec)
    o = compile_optimizer(spec.optimizer, model.parameters(), lr=1e-3)
    assert o.defaults["lr"] == 1e-3 and o.defaults["slow_every"] == 4
    named = optimizer_of(nlc.load(ROOT / "specs/titans.yaml"), ROOT / "specs")
    assert named.name == "adamw" and named.hyper["lr"] == 4e-4 and named.hyper["weight_decay"] == 0.1
    s = run(tmp_path, spec=INLINE, sets=(), steps=5, context=16)
    assert s["last_val"] < s["first_val"] and "optimizer `inline_optimizer_optimizer`" in s["log"][0]
    # a group's `use:` of a file beside the model resolves there, not where the optimizer is compiled
    (tmp_path / "opts").mkdir()
    (tmp_path / "opts" / "mine.yaml").write_text((ROOT / "specs/sgd_momentum.yaml").read_text())
    (tmp_path / "m.yaml").write_text(INLINE.read_text().replace("use: adamw(lr=lr, eps=eps)", "use: {use: opts/mine.yaml}"))
    opt = optimizer_of(nlc.load(tmp_path / "m.yaml"), tmp_path)
    assert opt.groups[1].use.use == str((tmp_path / "opts" / "mine.yaml").resolve())
    compile_optimizer(opt, model.parameters())


# ---------------------------------------------------------------- the command

def test_cli_trains_and_ctrl_c_saves(tmp_path):
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "nlc.runtime.cli", "train", "specs/transformer.yaml", "--steps",
                          "100000", "--context", "16", "--batch", "4", "--log-every", "1", "--out", out, "--device",
                          "cpu", *[a for s in TINY for a in ("--set", s)]], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    seen = 0
    for line in p.stdout:
        seen += line.startswith("step ") and "| loss" in line
        if seen == 3:
            p.send_signal(signal.SIGINT)
            break
    rest, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "Traceback" not in err and "interrupted: step" in rest and "continue with --resume" in rest
    step = checkpoint.load(out).step
    assert step >= 3
    r = nlc_cli("train", "specs/transformer.yaml", "--out", out, "--resume", "--steps", step + 2)
    assert r.returncode == 0, r.stderr
    assert f"resumed at step {step}" in r.stdout and f"done: step {step + 2}/{step + 2}" in r.stdout


def test_weights_gone_bad_are_never_saved(tmp_path, monkeypatch):
    """Weights that the optimizer made NaN with a finite gradient are found before the save, which
    is refused: the last good checkpoint stays the newest, as the message says."""
    real, calls = torch.nn.utils.clip_grad_norm_, []

    def clip(params, max_norm):  # the fourth step's optimizer step writes NaN into the weights
        params = list(params)
        calls.append(max_norm)
        norm = real(params, max_norm)
        if len(calls) == 4:
            with torch.no_grad():
                params[0].fill_(float("nan"))
        return norm
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    out = tmp_path / "run"
    with pytest.raises(TrainError, match=r"^step 4: model\.\S+ is NaN: training diverged .*nothing saved, the last "
                                         r"checkpoint \(.*ckpt-00000002\.json\) is kept$"):
        run(tmp_path, steps=6, save_every=2, eval_every=2)
    ck = checkpoint.load(out)
    assert ck.step == 2 and checkpoint.non_finite(ck.model, ck.optimizer) is None


def test_backend_chooses_who_runs_the_levels(tmp_path):
    """--backend triton trains through the kernels (on a CPU under Triton's interpreter, as
    conftest sets it up) and says so; the torch form gives the same first loss and no note."""
    from unittest import mock

    from nlc.backends.triton import delta
    kw = dict(steps=2, batch=2, context=16, sets=("model.d_model=32", "model.layers=1", "model.heads=2"))
    with mock.patch.object(delta, "chunk_generalized_delta", wraps=delta.chunk_generalized_delta) as kernel:
        tri = run(tmp_path / "tri", "specs/gated_deltanet.yaml", backend="triton", out=tmp_path / "tri", **kw)
    assert kernel.called
    assert any(ln.startswith("note: level memory, flow memory.key, flow memory.value, flow memory.query run their "
                             "kernels under Triton's interpreter") for ln in tri["log"]), tri["log"]
    ref = run(tmp_path / "ref", "specs/gated_deltanet.yaml", backend="torch", out=tmp_path / "ref", **kw)
    assert not any("Triton" in ln for ln in ref["log"])
    assert math.isfinite(tri["last_loss"]) and abs(tri["first_loss"] - ref["first_loss"]) < 1e-4
    r = nlc_cli("train", "specs/gated_deltanet.yaml", "--backend", "cuda")
    assert r.returncode == 2 and "--backend: input should be 'auto', 'torch' or 'triton'" in r.stderr


def test_a_non_finite_gradient_stops_before_the_step(tmp_path, monkeypatch):
    """A NaN at a position the loss ignores leaves the loss finite but the gradient NaN: the run
    stops at that step, before the optimizer writes NaN into the parameters."""
    real, calls = torch.nn.utils.clip_grad_norm_, []

    def clip(params, max_norm):  # the third step's gradient is NaN
        calls.append(max_norm)
        norm = real(params, max_norm)
        return norm * float("nan") if len(calls) == 3 else norm
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    with pytest.raises(TrainError, match=r"the gradient is nan at step 3 \(loss [0-9.]+\)"):
        run(tmp_path, steps=5)


MODEL_SPECS = sorted(p.stem for p in (ROOT / "specs").glob("*.yaml") if "model:" in p.read_text())


@pytest.mark.parametrize("name", [n for n in MODEL_SPECS if n != "hope"])   # hope: the longer test below
def test_every_shipped_model_learns(tmp_path, name):
    """A shipped model spec is done when it learns a shipped task on a CPU without NaN."""
    heads = nlc.load(ROOT / "specs" / f"{name}.yaml").model.heads
    s = run(tmp_path, spec=f"specs/{name}.yaml", steps=40, batch=8, context=64, task="copy", log_every=10,
            sets=TINY[:2] + (("model.heads=2",) if heads > 1 else ()) + ("lr=3e-3",))
    assert s["last_loss"] < s["first_loss"] - 2.0 and s["last_val"] < s["first_val"] - 2.0, s["log"]


@pytest.mark.parametrize("lr, steps", [("4e-4", 50), ("2e-3", 40)])
def test_hope_trains_past_its_first_windows(tmp_path, lr, steps):
    """Hope over 256-token recall sequences (four windows of recall episodes) at the spec's learning
    rate for 50 steps and at 5x it for 40: no NaN, and the loss falls. With momentum(0.9) in its
    rule the generators' weights ran to NaN within 4 steps."""
    s = run(tmp_path, spec="specs/hope.yaml", steps=steps, batch=8, context=256, task="recall", log_every=10,
            sets=("model.d_model=64", "model.layers=2", f"lr={lr}"))
    assert s["step"] == steps and math.isfinite(s["last_val"]), s["log"]
    assert s["last_loss"] < s["first_loss"] - 2.0, s["log"]


def test_init_starts_from_another_runs_weights(tmp_path):
    a = run(tmp_path, out=tmp_path / "a")
    b = run(tmp_path, out=tmp_path / "b", init=tmp_path / "a", steps=1)   # a fresh run, from a's trained weights
    n = len(checkpoint.read(a["checkpoint"]).model)
    assert any(ln.startswith(f"init: {n} of the model's {n} tensors from {tmp_path / 'a'}: ") and "new" not in ln
               for ln in b["log"])
    assert b["first_val"] == a["last_val"]                          # step 0 of b is a's last model
    part = {"embed.weight": torch.randn(256, 32, generator=torch.Generator().manual_seed(1))}
    from nlc.runtime.safetensors import save_file
    save_file(part, tmp_path / "part.safetensors")
    c = run(tmp_path, out=tmp_path / "c", init=tmp_path / "part.safetensors", steps=1)
    assert any(ln.startswith("init: 1 of the model's") and ": embed.weight; new (from the seed): " in ln
               for ln in c["log"])
    d = run(tmp_path, out=tmp_path / "d", spec="specs/gated_deltanet.yaml", init=tmp_path / "a", steps=1)
    line = next(ln for ln in d["log"] if ln.startswith("init: "))    # another architecture: what matches
    assert "embed.weight" in line.split("; new")[0] and "head.weight" in line.split("; new")[0]
    assert "attn" not in line.split("; new")[0]
    got = checkpoint.read(c["checkpoint"]).model["embed.weight"]
    assert (got - part["embed.weight"]).abs().max() < 0.05          # one small step away from what was given
    save_file({"embed.weight": torch.zeros(3, 3), "nope": torch.zeros(1)}, tmp_path / "bad.safetensors")
    with pytest.raises(TrainError, match="names no tensor of the model: nope"):
        run(tmp_path, out=tmp_path / "d", init=tmp_path / "bad.safetensors")
    save_file({"embed.weight": torch.zeros(3, 3)}, tmp_path / "bad.safetensors")
    with pytest.raises(TrainError, match=r"embed.weight \(3, 3\) \(the model's is \(256, 32\)\)"):
        run(tmp_path, out=tmp_path / "d", init=tmp_path / "bad.safetensors")

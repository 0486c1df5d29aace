"""Checkpoints anyone can load safely (safetensors and JSON, nothing pickled), the last --keep of them
kept, and learning-rate schedules that resume bit for bit."""
from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import signal
import struct
from pathlib import Path

import pytest
import torch

from nlc.runtime import checkpoint, safetensors, schedule
from nlc.runtime.train import resolve, train

ROOT = Path(__file__).parent.parent
TINY = ("model.d_model=32", "model.layers=2", "model.heads=2")


def run(out, interrupt_at: int | None = None, **kw) -> dict:
    """A tiny run, its settings resolved as the command does (on --resume, those not given are the
    checkpoint's); `interrupt_at`: Ctrl-C once step N is logged (the run saves and stops there)."""
    kw = {"spec": ROOT / "specs/transformer.yaml", "sets": TINY, "steps": 6, "batch": 4, "context": 16, "out": out,
          "device": "cpu", "eval_every": 1000, "eval_batches": 1, "log_every": 1, **kw}
    lines: list[str] = []

    def log(line):
        lines.append(line)
        if interrupt_at is not None and line.startswith(f"step {interrupt_at:>6}/") and "| loss" in line:
            os.kill(os.getpid(), signal.SIGINT)
    summary = train(resolve(kw), log=log)
    summary["log"] = lines
    return summary


# ---------------------------------------------------------------- safetensors

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.int64, torch.uint8, torch.float16, torch.int32, torch.bool]


def test_safetensors_round_trip_of_every_dtype():
    g = torch.Generator().manual_seed(0)
    tensors = {f"t.{dtype}".replace("torch.", ""): (torch.randn(3, 5, generator=g) * 100).to(dtype) for dtype in DTYPES}
    tensors |= {"scalar": torch.tensor(2.5, dtype=torch.float64), "empty": torch.zeros(0, 4),
                "strided": torch.arange(12.0).reshape(3, 4).t(), "big": torch.tensor([-1, 2**40], dtype=torch.int64)}
    blob = safetensors.dumps(tensors, {"format": "test"})
    back = safetensors.loads(blob)
    assert list(back) == list(tensors)
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape and torch.equal(back[k], t), k
    # the layout, read independently: u64 little-endian header length, JSON, raw little-endian bytes
    (n,) = struct.unpack("<Q", blob[:8])
    head = json.loads(blob[8:8 + n])
    assert n % 8 == 0 and head["__metadata__"] == {"format": "test"}
    assert head["t.bfloat16"]["dtype"] == "BF16" and head["t.float32"] == {"dtype": "F32", "shape": [3, 5],
                                                                           "data_offsets": head["t.float32"]["data_offsets"]}
    begin, end = head["big"]["data_offsets"]
    assert blob[8 + n + begin:8 + n + end] == struct.pack("<qq", -1, 2**40)
    begin, end = head["t.float32"]["data_offsets"]
    assert blob[8 + n + begin:8 + n + end] == struct.pack("<15f", *tensors["t.float32"].flatten().tolist())
    assert safetensors.metadata(blob) == {"format": "test"}


def test_safetensors_rejects_malformed_bytes():
    blob = safetensors.dumps({"a": torch.ones(4), "b": torch.ones(2, dtype=torch.int64)})
    (n,) = struct.unpack("<Q", blob[:8])
    head = json.loads(blob[8:8 + n])
    for bad, why in [(blob[:5], "too short"), (blob[:-1], "do not hold"), (blob + b"x", "after the last tensor"),
                     (struct.pack("<Q", 10**12) + blob[8:], "does not fit"),
                     (struct.pack("<Q", 8) + b"not json" + blob[8 + 8:], "not JSON"),
                     (_with_header(head | {"a": {**head["a"], "dtype": "F99"}}, blob), "known dtype"),
                     (_with_header(head | {"b": {**head["b"], "data_offsets": [0, 16]}}, blob), "overlap")]:
        with pytest.raises(safetensors.SafetensorsError, match=why):
            safetensors.loads(bad)


def _with_header(head: dict, blob: bytes) -> bytes:
    (n,) = struct.unpack("<Q", blob[:8])
    text = json.dumps(head).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + blob[8 + n:]


def test_the_reference_safetensors_reads_and_writes_the_same_files():
    reference = pytest.importorskip("safetensors.torch")
    tensors = {"w": torch.randn(4, 3), "b": torch.randn(3).bfloat16(), "i": torch.arange(5)}
    for k, t in reference.load(safetensors.dumps(tensors)).items():
        assert torch.equal(t, tensors[k])
    for k, t in safetensors.loads(reference.save(tensors)).items():
        assert torch.equal(t, tensors[k])


# ---------------------------------------------------------------- schedules

def test_schedules_at_known_steps():
    f = schedule.factor
    # warmup: linear from 1/warmup at the first update to 1 at update `warmup - 1`
    assert f("constant", 0, 100, 10) == pytest.approx(0.1) and f("constant", 9, 100, 10) == 1.0
    assert f("constant", 4, 100, 10) == pytest.approx(0.5) and f("constant", 50, 100, 10) == 1.0
    assert f("constant", 0, 100) == 1.0 == f("constant", 99, 100)
    # cosine: 1 right after the warmup, 1/2 half way through the rest, to 0 at `steps`
    assert f("cosine", 10, 110, 10) == 1.0 and f("cosine", 60, 110, 10) == pytest.approx(0.5)
    assert f("cosine", 99, 100) == pytest.approx(0.5 * (1 + math.cos(math.pi * 99 / 100)))
    assert 0 < f("cosine", 99, 100) < 1e-3 and f("cosine", 5, 100, 10) == pytest.approx(0.6)
    # wsd: stable until the last 20% of the steps, then linear to 0 at `steps`
    assert schedule.decay_start(100) == 80 and schedule.decay_start(6) == 5
    assert f("wsd", 0, 100, 10) == pytest.approx(0.1) and f("wsd", 79, 100, 10) == 1.0 and f("wsd", 80, 100) == 1.0
    assert f("wsd", 90, 100) == pytest.approx(0.5) and f("wsd", 99, 100) == pytest.approx(0.05)
    assert f("wsd", 3, 4) == 1.0        # 20% of 4 steps is no step
    with pytest.raises(ValueError):
        f("linear", 0, 10)


def test_resume_with_a_cosine_schedule_is_bit_exact(tmp_path):
    kw = dict(lr_schedule="cosine", warmup=2, sets=TINY + ("lr=3e-3",))
    straight = run(tmp_path / "a", **kw)
    first = run(tmp_path / "b", interrupt_at=3, **kw)
    assert first["interrupted"] and first["step"] == 3 and checkpoint.load(tmp_path / "b").step == 3
    resumed = run(tmp_path / "b", resume=True, steps=6)      # the schedule and lr: the checkpoint's
    assert resumed["step"] == 6 and any("resumed at step 3" in ln for ln in resumed["log"])
    a, b = checkpoint.load(tmp_path / "a"), checkpoint.load(tmp_path / "b")
    assert a.config["lr_schedule"] == b.config["lr_schedule"] == "cosine" and b.config["warmup"] == 2
    for k in a.model:
        assert torch.equal(a.model[k], b.model[k]), k
    for i, st in a.optimizer["state"].items():
        for k, v in st.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(b.optimizer["state"][i][k])), (i, k)
    lrs = lambda ck: [(r["step"], r["lr"]) for r in ck.history if "lr" in r]   # noqa: E731
    assert lrs(a) == lrs(b)
    expected = [3e-3 * schedule.factor("cosine", s - 1, 6, 2) for s in range(1, 7)]
    assert [lr for _, lr in lrs(a)] == expected and expected[0] == 1.5e-3 and expected[1] == 3e-3
    assert straight["last_val"] == resumed["last_val"]


# ---------------------------------------------------------------- checkpoint files

def test_a_checkpoint_holds_no_pickle_and_loads_without_one(tmp_path, monkeypatch):
    out = tmp_path / "run"
    s = run(out, steps=3, save_every=1, keep=2, eval_every=3, task="parity:train=3,eval=6")
    names = {p.name for p in out.iterdir()} - {"loss.png", "curves.png"}      # the plots
    assert names == {"ckpt-00000002.json", "ckpt-00000002.safetensors", "ckpt-00000003.json",
                     "ckpt-00000003.safetensors", "metrics.jsonl", "spec.yaml", ".lock"}   # --keep 2; .lock: the
    assert (out / ".lock").read_text() == f"{os.getpid()}\n"        # run directory's lock, its last holder's pid
    assert s["checkpoint"] == out / "ckpt-00000003.json"
    for p in out.iterdir():
        head = p.read_bytes()[:4]
        assert not head.startswith(b"\x80") and head != b"PK\x03\x04", p   # neither a pickle nor torch.save's zip
    meta = json.loads((out / "ckpt-00000003.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    blob = (out / meta["tensors"]).read_bytes()
    assert meta["tensors_sha256"] == hashlib.sha256(blob).hexdigest()
    assert meta["spec_sha256"] == hashlib.sha256(meta["spec"].encode()).hexdigest() == checkpoint.spec_hash(
        (out / "spec.yaml").read_text())
    assert meta["format"] == 2 and meta["nlc_version"] and meta["step"] == 3 and meta["data"]["next_batch"] == 3
    assert isinstance(meta["rng"]["torch"], str) and len(meta["rng"]["python"][1]) == 625
    named = safetensors.loads(blob)
    state = meta["optimizer"]["state"]["0"]
    assert state["step"] == 3 and all(v == {"tensor": f"optimizer.0.{k}"} for k, v in state.items() if k != "step")
    assert {f"optimizer.0.{k}" for k in state if k != "step"} <= set(named)
    # metrics: the learning rate of every logged step, the accuracy of every evaluation
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in records if "loss" in r] == [4e-4] * 3
    assert [r["step"] for r in records if "val_acc" in r] == [0, 3] and all(0 <= r["val_acc"] <= 1 for r in records
                                                                            if "val_acc" in r)
    assert any("| acc " in ln for ln in s["log"])
    # nothing is unpickled on load, and a run resumes from it
    def no(*a, **k):
        raise AssertionError("unpickled")
    for mod, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(mod, name, no)
    ck = checkpoint.load(out)
    assert ck.step == 3 and {"model." + k for k in ck.model} == {k for k in named if k.startswith("model.")}
    assert all(torch.equal(v, named["model." + k]) for k, v in ck.model.items())
    assert run(out, steps=4, resume=True, keep=2)["step"] == 4
    assert sorted(p.name for p in out.glob("ckpt-*.json")) == ["ckpt-00000003.json", "ckpt-00000004.json"]


def test_keep_prunes_and_starting_over_removes_the_run_before(tmp_path):
    out = tmp_path / "run"
    run(out, steps=5, save_every=1, keep=2)
    assert sorted(checkpoint.steps(out)) == [4, 5]
    assert all(len(files) == 2 for files in checkpoint.steps(out).values())      # a JSON and its tensors
    s = run(out, steps=6, save_every=5, keep=3)          # starting over: its first save removes the run before
    assert sorted(checkpoint.steps(out)) == [5, 6] and any("starting over" in ln for ln in s["log"])
    assert checkpoint.load(out).step == 6
    # a tensors file that is not the one saved is refused, and an old pickle is not loaded
    (out / "ckpt-00000006.safetensors").write_bytes((out / "ckpt-00000005.safetensors").read_bytes())
    with pytest.raises(checkpoint.CheckpointError, match="sha256 differs"):
        checkpoint.load(out)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "ckpt.pt").write_bytes(b"\x80\x04")
    with pytest.raises(checkpoint.CheckpointError, match="older nlc .a pickle."):
        checkpoint.load(tmp_path / "old")


def test_numbers_that_are_not_finite_are_written_as_null(tmp_path):
    """metrics.jsonl and the checkpoint's JSON are JSON: a NaN or infinite metric is null (it used
    to be a bare NaN, which no JSON reader takes), and a run resumes from such a history."""
    out = tmp_path / "run"
    run(out, steps=2)
    ck = checkpoint.load(out)
    ck.history.append({"step": 2, "val_loss": float("nan"), "val_acc": 0.0, "loss": float("inf")})
    checkpoint.save(out, ck, plot=True)

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    records = [strict(line) for line in (out / checkpoint.METRICS).read_text().splitlines()]
    assert records[-1] == {"step": 2, "val_loss": None, "val_acc": 0.0, "loss": None}
    assert strict(checkpoint.latest(out).read_text())["history"] == records
    s = run(out, steps=3, resume=True)
    assert s["step"] == 3 and s["first_val"] is not None and math.isfinite(s["last_loss"])

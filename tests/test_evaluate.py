"""`nlc eval`: a run's checkpoint, loaded without unpickling and rebuilt from its stored spec, scored
on the validation split whole, in pieces with the state carried and reset, and with its CMS
updates off; a table, eval.json, and every mistake a message with exit status 2."""
from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from nlc.runtime import checkpoint
from nlc.runtime.cli import app
from nlc.runtime.evaluate import EvalError, evaluate, load_run, table
from nlc.runtime.train import TrainConfig, train

ROOT = Path(__file__).parent.parent
TINY = ("model.d_model=32", "model.layers=2", "model.heads=2")


def trained(out: Path, spec="specs/transformer.yaml", sets=TINY, **kw) -> Path:
    kw = {"steps": 30, "batch": 8, "context": 32, "device": "cpu", "eval_every": 1000, "eval_batches": 4, **kw}
    train(TrainConfig(spec=ROOT / spec, out=out, sets=sets, **kw), log=lambda s: None)
    return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A transformer that learnt some of the copy task: it needs its memory across pieces."""
    return trained(tmp_path_factory.mktemp("eval") / "run", sets=TINY + ("lr=3e-3",))


@pytest.fixture(scope="module")
def cms_dir(tmp_path_factory):
    """hope_attention (attention and a CMS every 8, 16, 32 tokens) after two steps."""
    return trained(tmp_path_factory.mktemp("cms") / "run", spec="specs/hope_attention.yaml", steps=2, batch=2,
                   context=16, sets=TINY + ("levels.cms.every=8, 16, 32 tokens",))


def invoke(*args):
    return CliRunner().invoke(app, ["eval", *map(str, args)])


def test_eval_reproduces_the_runs_validation_and_writes_eval_json(run_dir, monkeypatch):
    def no(*a, **k):
        raise AssertionError("unpickled")
    for mod, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(mod, name, no)
    r = invoke(run_dir, "--batches", 4, "--progress-every", 2, "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "eval: batch 2/4" in r.stderr and "batch 4/4" not in r.stderr        # progress on stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"eval `transformer` at step 30 ({run_dir / 'ckpt-00000030.json'})"
    assert any(ln.startswith("whole sequence ") for ln in lines) and lines[-1] == f"wrote {run_dir / 'eval.json'}"
    assert any(ln.startswith("4 pieces of 8, state reset") for ln in lines)
    assert "exact: this model's pieces equal the whole at any cut" in r.stdout
    result = json.loads((run_dir / "eval.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert not list(run_dir.glob(".*.tmp"))
    rows = result["rows"]
    assert list(rows) == ["whole", "carried", "reset"] and result["cms"] is None
    assert result["task"] == "copy:length=0,symbols=16" and result["context"] == 32 and result["batch"] == 8
    # the same batches as the run's last evaluation: the same loss and accuracy
    last = [h for h in checkpoint.load(run_dir, tensors=False).history if "val_loss" in h][-1]
    assert rows["whole"]["loss"] == pytest.approx(last["val_loss"], rel=1e-5)
    assert rows["whole"]["accuracy"] == pytest.approx(last["val_acc"], abs=1e-9)
    assert rows["whole"]["perplexity"] == pytest.approx(torch.tensor(rows["whole"]["loss"]).exp().item(), rel=1e-6)
    assert rows["whole"]["counted"] == 4 * 8 * 16 and rows["whole"]["tokens"] == 4 * 8 * 32
    # carrying the state across pieces is the whole pass; resetting it forgets what the copy needs
    assert rows["carried"]["loss"] == pytest.approx(rows["whole"]["loss"], rel=1e-5)
    assert result["carried_vs_whole_max_abs_logit"] < 1e-4
    assert rows["reset"]["loss"] > rows["whole"]["loss"] + 0.1 and rows["reset"]["accuracy"] < rows["whole"]["accuracy"]
    assert all(row["tokens_per_s"] > 0 for row in rows.values())


def test_eval_of_a_given_checkpoint_on_other_data_into_out(run_dir, tmp_path):
    text = tmp_path / "t.txt"
    text.write_bytes(bytes(range(256)) * 8)
    r = invoke(run_dir / "ckpt-00000030.safetensors", "--data", text, "--context", 16, "--batches", 2,
               "--pieces", 1, "--out", tmp_path)
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["text"] == str(text) and result["task"] is None and result["context"] == 16
    assert list(result["rows"]) == ["whole"] and result["rows"]["whole"]["accuracy"] is None
    assert "carried vs whole" not in r.stdout and f"wrote {tmp_path / 'eval.json'}" in r.stdout


def test_cms_updates_on_and_off(cms_dir):
    """CMS off is the model without its in-context CMS updates: the same as on until the first
    window ends, different after; pieces carry exactly whether or not the cuts fall on windows."""
    run = load_run(cms_dir)
    short = evaluate(run, context=8, batches=1, pieces=1)["rows"]
    assert list(short) == ["whole", "cms_off"]
    assert short["cms_off"]["loss"] == pytest.approx(short["whole"]["loss"], rel=1e-6)
    result = evaluate(run, context=48, batches=1, pieces=3)              # pieces of 16: multiples of 8
    rows = result["rows"]
    assert result["cms"] == [["cms0", 8, 0.01], ["cms1", 16, 0.01], ["cms2", 32, 0.01]]
    assert abs(rows["cms_off"]["loss"] - rows["whole"]["loss"]) > 1e-4
    assert result["streaming"]["exact_at_any_cut"] and result["carried_vs_whole_max_abs_logit"] < 1e-4
    odd = evaluate(run, context=48, batches=1, pieces=4)                 # pieces of 12: windows cut open
    assert odd["carried_vs_whole_max_abs_logit"] < 1e-4
    assert odd["rows"]["carried"]["loss"] == pytest.approx(odd["rows"]["whole"]["loss"], rel=1e-5)
    text = table(odd)
    assert "whole, CMS updates off" in text and "exact: this model's pieces equal the whole at any cut" in text


def _corrupt(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    meta_path = dst / "ckpt-00000030.json"
    meta = json.loads(meta_path.read_text())
    edit(meta, dst)
    meta_path.write_text(json.dumps(meta))
    return dst


def test_eval_mistakes_exit_2_and_change_nothing(run_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    other = (tmp_path / "other.yaml")
    other.write_text((ROOT / "specs/deltanet.yaml").read_text())

    def another_spec(meta, d):          # a consistent JSON naming another spec: its tensors do not fit
        meta["spec"] = (ROOT / "specs/deltanet.yaml").read_text()
        meta["spec_sha256"] = checkpoint.spec_hash(meta["spec"])

    def edited_spec(meta, d):
        meta["spec"] = meta["spec"].replace("d_model: 32", "d_model: 64")

    def truncated(meta, d):
        p = d / "ckpt-00000030.safetensors"
        p.write_bytes(p.read_bytes()[:-10])
    cases = [((tmp_path / "empty",), "no checkpoint in"),
             ((tmp_path / "none",), "does not exist"),
             ((run_dir / "ckpt-00000099.json",), "does not exist"),
             ((run_dir, "--task", "nosuch"), "unknown task `nosuch`"),
             ((run_dir, "--task", "mqar:pair=3"), "no option `pair`"),
             ((run_dir, "--task", "copy", "--data", other), "give --task or --data, not both"),
             ((run_dir, "--data", tmp_path / "missing.txt"), "cannot read"),
             ((run_dir, "--batches", 0), "--batches must be at least 1"),
             ((run_dir, "--pieces", 99), "more than the 32 tokens"),
             ((run_dir, "--out", tmp_path / "no" / "dir" / "e.json"), "is not a directory"),
             ((run_dir, "--device", "cuda:7"), "use --device cpu" if not torch.cuda.is_available() else "cuda"),
             ((_corrupt(run_dir, tmp_path / "a", another_spec),), "tensors do not fit the spec it stores"),
             ((_corrupt(run_dir, tmp_path / "b", edited_spec),), "spec text does not match its sha256"),
             ((_corrupt(run_dir, tmp_path / "c", truncated),), "its sha256 differs")]
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for args, message in cases:
        r = invoke(*args)
        assert r.exit_code == 2 and isinstance(r.exception, SystemExit), (args, r.output)
        assert r.stderr.startswith("error: ") and message in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.output and r.stdout == ""
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before                               # no eval.json, nothing changed
    with pytest.raises(EvalError, match="spec text does not match"):
        load_run(tmp_path / "b")

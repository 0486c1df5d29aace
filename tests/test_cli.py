"""The `nlc` command as a user runs it: exit codes, diagnostics on stderr, files written."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def nlc(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "nlc.runtime.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_check_ok():
    r = nlc("check", "specs/hope.yaml", "specs/hope.nl", "specs/m3.yaml")
    assert r.returncode == 0, r.stderr
    assert "ok  specs/hope.yaml  (model `hope`: 6 levels" in r.stdout


def test_check_reports_every_file_and_exits_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "specs/titans.yaml").read_text().replace("block: [memory, mlp]", "block: [memroy, mlp]"))
    empty = tmp_path / "empty.nl"
    empty.write_text("")
    r = nlc("check", "specs/titans.yaml", bad, empty)
    assert r.returncode == 2
    assert "ok  specs/titans.yaml" in r.stdout
    assert f"{bad}:5:64: error[E204 unknown-level]: block names level `memroy`" in r.stderr
    assert "hint: did you mean `memory`?" in r.stderr
    assert f"{empty}:1:1: error[E001 empty-file]" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("args", [("check", "no/such/file.yaml"), ("graph", "no/such.yaml", "-o", "x.svg"),
                                  ("explain", "README.md"), ("check",), ("frobnicate",)])
def test_user_mistakes_exit_2_without_traceback(args):
    r = nlc(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr


def test_build_of_an_optimizer_spec_says_where_it_belongs(tmp_path):
    r = nlc("build", "specs/muon.yaml", "-o", tmp_path / "b")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert ("specs/muon.yaml is the optimizer spec `muon`; `nlc build` takes a model spec "
            "(name this optimizer in one: `optimizer: muon(lr=...)`)") in r.stderr
    assert not (tmp_path / "b").exists()


def test_build_into_a_file_says_so(tmp_path):
    (tmp_path / "f").write_text("kept")
    r = nlc("build", "specs/titans.yaml", "-o", tmp_path / "f")
    assert r.returncode == 2 and f"{tmp_path / 'f'} is a file: -o takes the directory" in r.stderr
    assert (tmp_path / "f").read_text() == "kept"


def test_graph_writes_svg_png_dot(tmp_path):
    for suffix, magic in (("svg", "<svg"), ("png", "PNG"), ("dot", "digraph")):
        out = tmp_path / f"hope.{suffix}"
        r = nlc("graph", "specs/hope.yaml", "-o", out)
        assert r.returncode == 0, r.stderr
        assert magic in out.read_bytes()[:400].decode("latin-1")
    r = nlc("graph", "specs/hope.yaml", "-o", tmp_path / "hope.pdf")
    assert r.returncode == 2 and "use a .dot, .svg or .png" in r.stderr
    assert not (tmp_path / "hope.pdf").exists()
    r = nlc("graph", "specs/titans.nl", "--dump")
    assert r.returncode == 0 and "memory -> mlp  conditioning" in r.stdout


def test_explain_and_schema():
    r = nlc("explain", "specs/titans.yaml")
    assert r.returncode == 0
    assert r.stdout.startswith("# `titans`: derived update rules")
    assert r"S_t = \beta_t\, S_{t-1} + \eta_t\, \nabla \mathcal{L}(M_{\xi})" in r.stdout
    # what runs: each level's placement on the backend models compile with (auto), and on another
    assert '## What runs (`backend="auto"`)' in r.stdout
    assert "| `memory` | Triton skeleton `mlp_chunk` (CURRENT, L2, MOMENTUM, RESIDUAL, RETAIN): forward and " \
           "backward kernels |" in r.stdout
    assert "| `mlp` | torch: a static MLP" in r.stdout and "`memory.key`: `l2norm(silu(conv(proj(x), 4)))`" in r.stdout
    r = nlc("explain", "specs/hope.yaml", "--backend", "auto")
    m_mem = next(ln for ln in r.stdout.splitlines() if ln.startswith("| `M_mem` |"))
    assert "forward and backward kernels" in m_mem and "torch" not in m_mem, m_mem   # 256 wide: in slices
    assert "| `M_k` | torch: the stacked scan of every generator" in r.stdout
    assert "`q`: `l2norm(conv(proj(x), 4))`" in r.stdout and "`k`:" not in r.stdout    # k is a generator's output
    r = nlc("explain", "specs/titans.yaml", "--backend", "torch")
    assert "Every level and flow runs as torch ops" in r.stdout and "| `memory` |" not in r.stdout
    r = nlc("explain", "specs/titans.yaml", "--backend", "cuda")
    assert r.returncode == 2 and "--backend must be one of" in r.stderr + r.stdout
    r = nlc("schema")
    schema = json.loads(r.stdout)
    assert {"ModelSpec", "OptimizerSpec", "Level", "MLPMemory"} <= set(schema["$defs"])
    assert "use" in schema["$defs"]["Level"]["properties"]
    assert schema["$defs"]["Level"]["properties"]["chunk"]["description"]


@pytest.mark.parametrize("cmd", ["check", "graph", "explain", "schema"])
def test_help_has_an_example(cmd):
    r = nlc(cmd, "--help")
    assert r.returncode == 0 and "Example" in r.stdout and "nlc " + cmd in r.stdout


def test_train_refuses_data_with_task(tmp_path):
    """`--data` with `--task` is an error (the task used to be ignored), and so is `--task` on
    resuming a run that trains on text; `--resume` alone takes the checkpoint's `--data`."""
    from typer.testing import CliRunner

    from nlc.runtime.cli import app
    from nlc.runtime.train import TrainConfig, train
    text = tmp_path / "t.txt"
    text.write_bytes(bytes(range(256)) * 8)
    out = tmp_path / "run"
    runner = CliRunner()
    r = runner.invoke(app, ["train", str(ROOT / "specs/transformer.yaml"), "--data", str(text), "--task", "recall",
                            "--out", str(out)])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert r.stderr == (f"error: --data {text} and --task recall both say what to train on: drop --task to train "
                        f"on the text, or drop --data to train on the task\n")
    assert not out.exists()
    train(TrainConfig(spec=ROOT / "specs/transformer.yaml", data=text, steps=1, batch=2, context=16, out=out,
                      device="cpu", sets=("model.d_model=32", "model.layers=1")), log=lambda s: None)
    r = runner.invoke(app, ["train", str(ROOT / "specs/transformer.yaml"), "--out", str(out), "--resume",
                            "--task", "recall", "--steps", "2"])
    assert r.exit_code == 2, r.output
    assert r.stderr == (f"error: --task recall: the run in {out} trains on --data {text} (its checkpoint's): drop "
                        f"--task to resume it, or train the task into another --out\n")
    r = runner.invoke(app, ["train", str(ROOT / "specs/transformer.yaml"), "--out", str(out), "--resume",
                            "--steps", "2", "--device", "cpu"])
    assert r.exit_code == 0 and f"data: {text} (" in r.stdout and "done: step 2/2" in r.stdout, r.output


def test_train_out_of_memory_exits_2(tmp_path, monkeypatch):
    """Running out of memory is a message and exit 2, not a traceback."""
    import torch
    from typer.testing import CliRunner

    from nlc.runtime import train as T
    from nlc.runtime.cli import app

    def oom(cfg, log=None, progress=None):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(T, "train", oom)
    r = CliRunner().invoke(app, ["train", str(ROOT / "specs/transformer.yaml"), "--out", str(tmp_path / "run")])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert r.stderr.startswith("error: out of memory: lower --batch or --context"), r.output

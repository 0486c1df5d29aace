"""The tutorials in examples/: each runs end to end at its toy size (`--toy`) in a subprocess, as a
reader would run it, writing into a temporary folder (NLC_EXAMPLES_OUT), and what it shows holds
at that size: the loss falls, the files it promises exist. About a minute in all on a busy 2-core
CPU (Hope is the slowest)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_example(name: str, out: Path, *args: str) -> str:
    """Run examples/NAME with ARGS, its outputs under `out`; its stdout and stderr, together."""
    env = {**os.environ, "NLC_EXAMPLES_OUT": str(out), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    env.pop("NLC_EXAMPLES_TOY", None)
    r = subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{name} exited {r.returncode}\n--- stdout\n{r.stdout[-4000:]}\n--- stderr\n{r.stderr[-4000:]}"
    return r.stdout + r.stderr


def train_losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["loss"] for r in rows if "loss" in r]


def test_tour_prints_every_form():
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "tour.py"), "specs/titans.yaml"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for part in ("== 1. Spec", "== 2. Level graph", "== 3. Derived update rules", "== 4. The drawing"):
        assert part in out.stdout


def test_own_level(tmp_path):
    stdout = run_example("own_level.py", tmp_path, "--toy")
    out = tmp_path / "own_level"
    assert "error[E203 unknown-rule]" in stdout and "did you mean `scale`?" in stdout   # the deliberate mistake
    assert "Diagonal plus rank one" in (out / "explain.md").read_text()         # the derived rule
    assert "chunk vs recurrent" in stdout and " NO " not in stdout              # nlc verify passed
    losses = train_losses(out / "my_level")
    assert losses[-1] < losses[0] - 1.0, losses
    assert list((out / "my_level").glob("ckpt-*.safetensors"))


def test_titans_recall(tmp_path):
    stdout = run_example("titans_recall.py", tmp_path, "--toy")
    out = tmp_path / "titans_recall"
    losses = train_losses(out / "run")
    assert losses[-1] < losses[0], losses
    for name in ("eval-64.json", "eval-256.json", "eval-256-resumed.json"):
        result = json.loads((out / name).read_text())
        assert set(result["rows"]) >= {"whole", "carried", "reset"}
    assert json.loads((out / "eval-256.json").read_text())["context"] == 256
    assert json.loads((out / "eval-256-resumed.json").read_text())["step"] > json.loads(
        (out / "eval-64.json").read_text())["step"]                                 # --resume trained on
    assert "== result" in stdout


def test_m3_vs_adamw(tmp_path):
    stdout = run_example("m3_vs_adamw.py", tmp_path, "--toy")
    out = tmp_path / "m3_vs_adamw"
    result = json.loads((out / "results.json").read_text())
    assert set(result["optimizers"]) == {"AdamW", "M3", "M3-EMA", "M3-EMA, V in NS"}
    adamw = result["optimizers"]["AdamW"]["online"]
    assert adamw[-1] < adamw[0], adamw
    assert (out / "m3_ema_predivide.yaml").exists() and "ok  " in stdout       # the variant checked
    assert (out / "online_loss.png").read_bytes()[:4] == b"\x89PNG"


def test_hope_text(tmp_path):
    stdout = run_example("hope_text.py", tmp_path, "--toy")
    out = tmp_path / "hope_text"
    losses = train_losses(out / "run")
    assert losses[-1] < losses[0], losses
    rows = json.loads((out / "run" / "eval.json").read_text())["rows"]
    assert "cms_off" in rows                                                     # Hope has a CMS to switch off
    assert (out / "sample.txt").read_text().startswith("import ")
    assert "sampled 40 tokens" in stdout and (out / "corpus.txt").stat().st_size > 10_000

"""`nlc train`'s options come from TrainConfig's fields (one declaration), hyperparameters must be
finite in float32, and expressions holding an infinite number print."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from nlc.check_common import hyper_problem
from nlc.expr import Bin, Neg, Num

ROOT = Path(__file__).parent.parent


def nlc(*args):
    return subprocess.run([sys.executable, "-m", "nlc.runtime.cli", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


# ---------------------------------------------------------------- one declaration of the options

def test_every_setting_is_an_option_with_its_help_and_default():
    from nlc.runtime.cli import _flag
    from nlc.runtime.train import TrainConfig
    r = nlc("train", "--help")
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())                      # the help, unwrapped
    for name, field in TrainConfig.model_fields.items():
        how = (field.json_schema_extra or {}).get("cli", {})
        if not how.get("cli", True) or name == "spec":
            continue
        assert f"--{_flag(name)} " in text, name
        help_text = field.description.format(default=field.default)
        assert " ".join(help_text.split()) in text, name
    # the defaults shown are the settings' own (they were written twice, and could differ)
    for flag, default in [("steps", 200), ("batch", 16), ("context", 64), ("log-every", 10), ("keep", 3),
                          ("clip", 1.0), ("warmup", 0), ("seed", 0), ("device", "auto")]:
        field = TrainConfig.model_fields[flag.replace("-", "_")]
        assert field.default == default and re.search(rf"--{flag} .*?\[{re.escape(str(default))}\]", text), flag
    assert "--set KEY=VALUE" in text and "--task NAME[:KEY=VALUE,...]" in text and "--lr-schedule constant|cosine|wsd" in text
    assert "--eval-batches" not in text


def test_the_options_given_become_the_settings(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from nlc.runtime import train as T
    from nlc.runtime.cli import app
    seen = {}

    def fake(cfg, log=None, progress=None):
        seen["cfg"] = cfg
        return {"interrupted": False}
    monkeypatch.setattr(T, "train", fake)
    r = CliRunner().invoke(app, ["train", str(ROOT / "specs/transformer.yaml"), "--steps", "7", "--set", "lr=1e-3",
                                 "--set", "model.d_model=32", "--lr-schedule", "cosine", "--compile", "--clip", "0.5",
                                 "--out", str(tmp_path / "x"), "--task", "recall", "--log-every", "3"])
    assert r.exit_code == 0, r.output
    cfg = seen["cfg"]
    assert (cfg.steps, cfg.sets, cfg.lr_schedule, cfg.compile, cfg.clip, cfg.out, cfg.task, cfg.log_every) == \
        (7, ("lr=1e-3", "model.d_model=32"), "cosine", True, 0.5, tmp_path / "x", "recall", 3)
    assert (cfg.batch, cfg.resume, cfg.tensorboard, cfg.eval_batches) == (16, False, False, 4)   # the defaults
    r = CliRunner().invoke(app, ["train", str(ROOT / "specs/transformer.yaml"), "--keep", "0"])
    assert r.exit_code == 2 and r.stderr == "error: --keep: input should be greater than 0\n", r.output


# ---------------------------------------------------------------- finite in float32

@pytest.mark.parametrize("value, ok", [(1e39, False), (-1e39, False), (3.5e38, False), (10 ** 39, False),
                                       (3.4e38, True), (1e-45, True), (4e-4, True)])
def test_a_hyperparameter_must_be_finite_in_float32(value, ok):
    problem = hyper_problem("weight_decay", value)
    assert (problem is None) == ok, problem
    if not ok:
        assert problem.startswith("`weight_decay` must be finite in float32, not ")


def test_a_huge_hyperparameter_is_refused_from_the_command_line_and_from_a_spec(tmp_path):
    r = nlc("train", "specs/transformer.yaml", "--steps", 1, "--set", "lr=1e39", "--out", tmp_path / "run")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("<command line>:1:10: error[E502 bad-hyper]: `--set lr=1e39`: not a valid value")
    assert "hint: `lr` must be finite in float32, not 1e+39" in r.stderr and not (tmp_path / "run").exists()
    r = nlc("train", "specs/transformer.yaml", "--steps", 1, "--set", "betas=[0.9,1e39]")
    assert r.returncode == 2 and "<command line>:1:13: error[E502 bad-hyper]" in r.stderr, r.stderr
    spec = tmp_path / "t.yaml"
    spec.write_text((ROOT / "specs/transformer.yaml").read_text().replace("adamw(lr=4e-4", "adamw(lr=1e39"))
    r = nlc("check", spec)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"{spec}:17:21: error[E502 bad-hyper]" in r.stderr and "`lr` must be finite in float32" in r.stderr
    opt = tmp_path / "opt.yaml"
    opt.write_text((ROOT / "specs/adamw.yaml").read_text().replace("lr: 1.0e-3", "lr: 1.0e39"))
    r = nlc("check", opt)
    assert r.returncode == 2 and "must be finite in float32" in r.stderr and "E502" in r.stderr, r.stderr


# ---------------------------------------------------------------- printing inf

def test_an_infinite_number_prints_and_reads_back():
    assert str(Num(value=float("inf"))) == "1e999" and str(Num(value=float("-inf"))) == "-1e999"
    assert str(Num(value=float("nan"))) == "nan"
    assert str(Bin(op="*", left=Num(value=float("inf")), right=Num(value=2.0))) == "1e999 * 2"
    assert str(Neg(arg=Num(value=float("inf")))) == "-1e999"
    assert hash(Num(value=float("inf"))) == hash(Num(value=float("inf")))


def test_explain_prints_a_spec_holding_an_infinite_constant(tmp_path):
    spec = tmp_path / "titans.yaml"
    text = (ROOT / "specs/titans.yaml").read_text()
    assert "alpha: sigmoid(rate(x) + 4)" in text
    spec.write_text(text.replace("alpha: sigmoid(rate(x) + 4)", "alpha: sigmoid(rate(x) + 1e999)"))
    r = nlc("explain", spec)                                # it crashed: OverflowError in Num.__str__
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert r"\mathrm{rate}(x_t) + 1e999" in r.stdout

"""`nlc train`'s mistakes: each is a located diagnostic, or a one-line error that names what is
wrong, with exit status 2 and no traceback.

A bad ``--set`` is located on the command line and a spec's bad hyperparameter in the spec (which
``compile_optimizer`` refuses too); an ``--out`` that cannot be written or that another training
holds, an unusable ``--device``, a missing spec, an optimizer spec where a model spec belongs and
a missing checkpoint are refused. The helpers (``run``, ``nlc_cli``, the tiny model sizes) are
``test_train``'s.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

from nlc.backends.torch.optim import compile_optimizer
from nlc.runtime import checkpoint
from nlc.runtime.train import TrainError

from test_train import ROOT, TINY, nlc_cli, run


@pytest.mark.parametrize("args, where, pattern", [
    (("--set", "lrr=1e-3"), "<command line>:1:7: error[E208 unknown-hyper]", r"hint: did you mean `lr`\?"),
    (("--set", "lr=-1e-3"), "<command line>:1:10: error[E502 bad-hyper]", r"a learning rate is positive"),
    (("--set", "model.heads=3"), "<command line>:1:19: error[E301 shape-mismatch]", r"d_model 256 is not divisible by heads 3"),
    (("--set", "model.d_modle=64"), "<command line>:1:7: error[E102 unknown-key]", r"did you mean `d_model`"),
    (("--set", "lr=nan"), "<command line>:1:10: error[E502 bad-hyper]", r"`lr` must be finite, not nan"),
    (("--set", "lr=inf"), "<command line>:1:10: error[E502 bad-hyper]", r"`lr` must be finite, not inf"),
    (("--set", "betas=[0.9,nan]"), "<command line>:1:13: error[E502 bad-hyper]", r"`betas` must be finite, not nan"),
    (("--set", "betas=[0.9]"), "<command line>:1:13: error[E502 bad-hyper]",
     r"`betas` is a list of 2 numbers, like its default `\[0.9, 0.999\]`; 1 given"),
    (("--set", "betas=[0.9,0.99,0.5]"), "<command line>:1:13: error[E502 bad-hyper]", r"2 numbers.*; 3 given"),
])
def test_cli_bad_set_is_located_on_the_command_line(args, where, pattern):
    r = nlc_cli("train", "specs/transformer.yaml", "--steps", 1, *args)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith(where), r.stderr
    assert re.search(pattern, r.stderr)


def test_spec_hyperparameters_are_finite_and_as_long_as_their_defaults(tmp_path):
    """The check of `--set` is the check of a spec's values: `adamw(betas=[0.9])` fails `nlc check`
    (it used to pass, and `nlc train` crashed with an IndexError), as do an infinite override and an
    optimizer spec's own NaN; `compile_optimizer` refuses the same values."""
    from nlc.diagnostics import SpecError
    text = (ROOT / "specs/transformer.yaml").read_text()
    assert "optimizer: adamw(lr=4e-4, weight_decay=0.1)" in text
    for i, (ref, hint) in enumerate([("adamw(betas=[0.9])", "`betas` is a list of 2 numbers, like its default "
                                                            "`[0.9, 0.999]`; 1 given"),
                                     ("adamw(betas=[0.9, 0.99, 0.5])", "; 3 given"),
                                     ("adamw(betas=0.9)", "; not a list"),
                                     ("adamw(lr=[0.1, 0.2])", "`lr` is one number, like its default"),
                                     ("adamw(lr=1e999)", "`lr` must be finite, not inf")]):
        spec = tmp_path / f"t{i}.yaml"
        spec.write_text(text.replace("adamw(lr=4e-4, weight_decay=0.1)", ref))
        r = nlc_cli("check", spec)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert f"{spec}:17:" in r.stderr and "error[E502 bad-hyper]" in r.stderr and hint in r.stderr, r.stderr
    r = nlc_cli("train", tmp_path / "t0.yaml", "--steps", 1, "--out", tmp_path / "run")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "1 given" in r.stderr and not (tmp_path / "run").exists()
    opt = tmp_path / "opt.yaml"
    opt.write_text((ROOT / "specs/adamw.yaml").read_text().replace("lr: 1.0e-3", "lr: .nan"))
    r = nlc_cli("check", opt)
    assert r.returncode == 2 and "`lr` = nan is out of range" in r.stderr and "must be finite" in r.stderr, r.stderr
    params = [torch.nn.Parameter(torch.zeros(2))]
    for hyper in ({"betas": [0.9]}, {"lr": float("nan")}, {"eps": float("inf")}):
        with pytest.raises(SpecError, match="E502"):
            compile_optimizer("adamw", params, **hyper)


def test_out_must_be_writable_before_the_first_step(tmp_path):
    """An --out that cannot be written is refused before anything is computed, exit 2, the path and
    the reason named (it used to be found at the first save), and nothing there changes."""
    file = tmp_path / "file"
    file.write_text("mine")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    cases = [(file, f"--out {file} is a file, not a directory"),
             (file / "sub", f"--out {file / 'sub'}: cannot create the directory (Not a directory)"),
             (Path("/proc/nlc-run"), "--out /proc/nlc-run: cannot create the directory")]
    if os.geteuid() != 0:       # root writes into a read-only directory
        cases.append((ro, f"--out {ro}: cannot write files in it (Permission denied)"))
    for out, message in cases:
        r = nlc_cli("train", "specs/transformer.yaml", "--steps", 2, "--batch", 2, "--context", 16, "--device", "cpu",
                    "--out", out, *[a for s in TINY for a in ("--set", s)])
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.startswith(f"error: {message}") and r.stderr.count("\n") == 1, r.stderr
        assert "step " not in r.stdout, r.stdout
    assert file.read_text() == "mine" and not list(ro.iterdir())


def test_a_run_directory_is_trained_into_by_one_process_at_a_time(tmp_path):
    """A second training into the same --out is refused at once, naming the process that holds it
    (the two used to both exit 0, one replacing the other's checkpoints); after, it trains."""
    out = tmp_path / "run"
    args = ("train", "specs/transformer.yaml", "--steps", 2, "--batch", 2, "--context", 16, "--device", "cpu",
            "--out", out, *[a for s in TINY for a in ("--set", s)])
    r = nlc_cli(*args)
    assert r.returncode == 0 and "done: step 2/2" in r.stdout, r.stderr
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.name != ".lock"}
    with checkpoint.claim(out):                      # as a run in this process holds it
        assert (out / ".lock").read_text() == f"{os.getpid()}\n"
        for extra in (("--steps", 3), ("--resume", "--steps", 3)):
            r = nlc_cli(*args, *extra)
            assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
            assert r.stderr.startswith(f"error: --out {out} is in use: another training (process {os.getpid()}) "), \
                r.stderr
        with pytest.raises(TrainError, match="is in use"):
            run(tmp_path, steps=1)
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != ".lock"} == before
        assert (out / ".lock").read_text() == f"{os.getpid()}\n"           # the refused ones wrote nothing
    r = nlc_cli(*args, "--resume", "--steps", 3)     # released when its holder let go
    assert r.returncode == 0 and "done: step 3/3" in r.stdout, r.stderr


@pytest.mark.parametrize("device, message", [("mps", "device `mps`: nlc runs on a CPU or a CUDA GPU"),
                                             ("meta", "device `meta`: nlc runs on a CPU or a CUDA GPU"),
                                             ("tpu9", "unknown device `tpu9`")])
def test_an_unusable_device_exits_2(tmp_path, device, message):
    r = nlc_cli("train", "specs/transformer.yaml", "--steps", 1, "--device", device, "--out", tmp_path / "run",
                *[a for s in TINY for a in ("--set", s)])
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.startswith(f"error: {message}"), r.stderr
    assert not (tmp_path / "run").exists()


def test_cli_mistakes_exit_2(tmp_path):
    r = nlc_cli("train", "no/such.yaml")
    assert r.returncode == 2 and "no/such.yaml:1:1: error[E009" in r.stderr and "Traceback" not in r.stderr
    r = nlc_cli("train", "specs/adamw.yaml")
    assert r.returncode == 2 and "is the optimizer spec `adamw`" in r.stderr and "`nlc train` takes a model spec" in r.stderr and "optimizer: adamw(lr=...)" in r.stderr
    r = nlc_cli("train", "specs/transformer.yaml", "--resume", "--out", tmp_path / "none")
    assert r.returncode == 2 and "no checkpoint at" in r.stderr and "Traceback" not in r.stderr

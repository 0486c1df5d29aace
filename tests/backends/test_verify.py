"""`nlc verify`: the forms of every level agree on shipped specs, a wrong kernel is caught (exit 1),
and mistakes are exit 2. The specs are shrunk (`--set`-free: through `small`) to keep the
interpreter quick; `nlc verify` itself runs at the spec's own widths."""
from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

import nlc
from nlc.runtime.cli import app
from nlc.runtime.verify import render, verify

from .test_compile import COMPILED, ROOT, small


def test_verify_agrees_on_a_delta_spec(tmp_path):
    rows, facts = verify(nlc.load(small("gated_deltanet", tmp_path)), tokens=21)
    forms = {(r.level, r.compare) for r in rows}
    assert ("memory", "triton vs chunk") in forms and ("memory", "chunk vs recurrent") in forms
    assert all(r.ok for r in rows), render(rows, facts, "gated_deltanet")
    mem = next(r for r in rows if r.level == "memory" and r.compare == "triton vs chunk")
    assert mem.state is not None and mem.grad is not None and "delta_chunk" in mem.note


def test_verify_torch_only_on_a_deep_memory_spec(tmp_path):
    rows, _ = verify(nlc.load(small("titans", tmp_path)), backend="torch", tokens=19)
    assert {r.compare for r in rows} == {"chunk vs recurrent"}
    assert all(r.ok for r in rows)
    assert any(r.level == "memory" and r.state is not None for r in rows)


def test_a_wrong_kernel_fails_verify(tmp_path, monkeypatch):
    import nlc.backends.triton.delta as delta
    real = delta.chunk_generalized_delta

    def off_by_a_little(q, k, w, log_a, b, h0, chunk_size):
        o, h = real(q, k, w, log_a, b, h0, chunk_size)
        return o * (1 + 1e-6), h
    monkeypatch.setattr(delta, "chunk_generalized_delta", off_by_a_little)
    r = CliRunner().invoke(app, ["verify", str(small("deltanet", tmp_path)), "--tokens", "17"])
    assert r.exit_code == 1, r.output
    assert " NO " in r.output and "FAILED" in r.output


FLOW_ONLY = """nlc: 1
name: flow_only
model: {vocab: 64, d_model: 32, layers: 1, heads: 2, block: [attn, mlp]}
levels:
  attn:
    memory: attention
    key: l2norm(silu(conv(proj(x), 4)))
    value: proj(x)
    query: proj(x)
  mlp:
    memory: {kind: mlp, depth: 2, expansion: 2, activation: gelu, residual: false}
    every: never
"""


def test_a_fused_flow_is_verified_where_no_level_has_a_kernel(tmp_path, monkeypatch):
    """Attention runs on torch, but its key flow is one Triton kernel under backend="triton": verify
    holds it to the torch ops, and a wrong flow kernel fails it."""
    import nlc.backends.triton.prologue as prologue
    spec = tmp_path / "flow_only.yaml"
    spec.write_text(FLOW_ONLY)
    rows, facts = verify(nlc.load(spec), tokens=19)
    attn = next(r for r in rows if r.level == "attn" and r.compare == "triton vs chunk")
    assert attn.ok and attn.grad is not None and "fused flow `attn.key` on Triton" in attn.note, render(rows, facts, "f")
    real = prologue.flow
    monkeypatch.setattr(prologue, "flow", lambda p, ops, weight=None, past=None: real(p, ops, weight, past) * (1 + 1e-6))
    rows, facts = verify(nlc.load(spec), tokens=19)
    assert not next(r for r in rows if r.level == "attn" and r.compare == "triton vs chunk").ok, render(rows, facts, "f")


def test_verify_cli_prints_the_table(tmp_path):
    r = CliRunner().invoke(app, ["verify", str(small("retnet", tmp_path)), "--tokens", "18"])
    assert r.exit_code == 0, r.output
    assert "verify `retnet`" in r.output and "retention" in r.output and "triton vs chunk" in r.output


@pytest.mark.parametrize("args,message", [
    (["specs/m3.yaml"], "is the optimizer spec `m3`; `nlc verify` takes a model spec (name this optimizer in one: `optimizer: m3(lr=...)`)"),
    (["specs/titans.yaml", "--backend", "cuda"], "--backend must be torch or triton"),
    (["specs/titans.yaml", "--dtype", "half"], "--dtype must be"),
    (["specs/titans.yaml", "--tokens", "0"], "--tokens must be at least 1"),
])
def test_verify_mistakes_are_exit_2(args, message):
    args = [str(ROOT / a) if a.startswith("specs/") else a for a in args]
    r = CliRunner().invoke(app, ["verify", *args])
    assert r.exit_code == 2 and message in r.output


def test_float32_verify_uses_its_tolerance(tmp_path):
    rows, facts = verify(nlc.load(small("linear_attention", tmp_path)), dtype=torch.float32, tokens=20)
    assert facts["tol"] == 1e-3 and all(r.ok for r in rows)


@pytest.mark.parametrize("name", COMPILED)
def test_every_shipped_spec_passes_verify(name, tmp_path):
    """Issue 8's and 9's bar: every shipped model spec passes `nlc verify` (here shrunk by `small`;
    the note of the issue records the full-size runs)."""
    rows, facts = verify(nlc.load(small(name, tmp_path)), tokens=21)
    assert rows and all(r.ok for r in rows), render(rows, facts, name)


def test_verify_length_covers_two_chunks_of_the_levels_that_have_them(tmp_path):
    """Two whole chunks and a part of the longest chunk of a memory level; a static MLP (frequency
    0) and attention have no chunk and do not lengthen the run."""
    spec = nlc.load(small("titans", tmp_path))
    memory = spec.levels["memory"].chunk_size()
    assert spec.levels["mlp"].every.period is None and spec.levels["mlp"].chunk_size() > memory
    _, facts = verify(spec, backend="torch")
    assert facts["T"] == 2 * memory + 3

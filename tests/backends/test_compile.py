"""Compiled models: generated source (golden), chunk == recurrent, carried state, build == compile."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

import nlc
from nlc.backends.torch.codegen import Unsupported, build, generate

ROOT = Path(__file__).parent.parent.parent
GOLDEN = ROOT / "tests" / "golden"
COMPILED = ["transformer", "linear_attention", "deltanet", "gated_deltanet"]
NOT_YET = ["titans", "hope", "hope_attention"]


def small(name: str, tmp_path: Path) -> Path:
    """The shipped spec shrunk to test size (2 layers, d_model 32, 2 heads, vocab 50, chunk 8)."""
    text = (ROOT / "specs" / f"{name}.yaml").read_text()
    text = text.replace("vocab: 256, d_model: 256, layers: 4, heads: 4", "vocab: 50, d_model: 32, layers: 2, heads: 2")
    text = text.replace("chunk: 64", "chunk: 8")
    p = tmp_path / f"{name}.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("name", COMPILED)
def test_generated_source_matches_golden(name):
    source = generate(nlc.load(ROOT / "specs" / f"{name}.yaml"), f"{name}.yaml")
    golden = GOLDEN / f"{name}.py.txt"
    if os.environ.get("NLC_REGEN_GOLDEN"):
        golden.write_text(source)
    assert golden.exists(), f"no golden file: run NLC_REGEN_GOLDEN=1 pytest {__file__}"
    assert source == golden.read_text(), "generated source changed: review the diff, then NLC_REGEN_GOLDEN=1"


@pytest.mark.parametrize("name", COMPILED)
def test_chunk_equals_recurrent_and_state_carries(name, tmp_path):
    torch.manual_seed(0)
    model = nlc.compile(small(name, tmp_path)).double()
    for p in model.parameters():  # learned initial states start at zero: make them count
        if p.dim() == 3:
            torch.nn.init.normal_(p, std=0.1)
    ids = torch.randint(0, 50, (2, 29))
    logits, state = model(ids)
    assert logits.shape == (2, 29, 50) and torch.isfinite(logits).all()
    first, carried = model(ids[:, :11])
    second, carried = model(ids[:, 11:], carried)
    torch.testing.assert_close(torch.cat([first, second], 1), logits, rtol=1e-10, atol=1e-10)
    for key in state:
        torch.testing.assert_close(carried[key], state[key], rtol=1e-10, atol=1e-10)
    model.mode = "recurrent"
    rec, rec_state = model(ids)
    torch.testing.assert_close(rec, logits, rtol=1e-10, atol=1e-10)
    # gradients of every parameter agree between the chunked and the recurrent forms
    model.mode = "chunk"
    g_chunk = torch.autograd.grad(model(ids)[0].square().mean(), list(model.parameters()), allow_unused=True)
    model.mode = "recurrent"
    g_rec = torch.autograd.grad(model(ids)[0].square().mean(), list(model.parameters()), allow_unused=True)
    for (n, _), a, b in zip(model.named_parameters(), g_chunk, g_rec):
        assert a is not None, f"{n} gets no gradient"
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=n)


@pytest.mark.parametrize("name", ["deltanet", "transformer"])
def test_build_is_deterministic_and_agrees_with_compile(name, tmp_path):
    spec = small(name, tmp_path)
    a, b = tmp_path / "a", tmp_path / "b"
    build(spec, a)
    build(spec, b)
    for f in ("model.py", "manifest.json", "graph.svg"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    mod_spec = importlib.util.spec_from_file_location(f"built_{name}", a / "model.py")
    built = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(built)
    torch.manual_seed(1)
    compiled = nlc.compile(spec).double()
    imported = built.Model().double()
    imported.load_state_dict(compiled.state_dict())
    ids = torch.randint(0, 50, (1, 13))
    torch.testing.assert_close(imported(ids)[0], compiled(ids)[0], rtol=0, atol=0)


@pytest.mark.parametrize("name", NOT_YET)
def test_unsupported_levels_are_refused_clearly(name):
    with pytest.raises(Unsupported, match="not supported by the torch backend yet"):
        generate(nlc.load(ROOT / "specs" / f"{name}.yaml"))

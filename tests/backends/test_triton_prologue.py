"""Skeleton 3, the fused flow prologue: generated from a flow's expression, it equals the same chain
in torch (float64 under the interpreter), outputs and the gradients of the projection output, the
convolution's weights and its carried inputs; and it reads the chains of the shipped specs."""
from __future__ import annotations

import pytest
import torch

import nlc
from nlc.backends.triton import template
from nlc.backends.triton.prologue import OPS, chain_of, code, flow, flow_torch

from .numerics import assert_rel
from .test_compile import ROOT
from .test_triton_delta import DEVICE


@pytest.mark.parametrize("ops,conv,past", [
    (("silu", "l2norm"), True, True),        # gated DeltaNet's query and key
    (("silu",), True, False),                # its value, no carried inputs
    (("l2norm",), False, False),             # linear attention's query and key
    (("gelu", "tanh", "softplus", "sigmoid", "relu", "exp"), True, True),
], ids=["silu-l2norm", "silu", "l2norm", "every-function"])
def test_prologue_equals_torch(ops, conv, past):
    gen = torch.Generator().manual_seed(len(ops) + 10 * conv + 100 * past)
    B, T, H, K, W = 2, 37, 2, 20, 4            # T and K not multiples of the tiles
    x = {"p": torch.randn(B, T, H, K, generator=gen, dtype=torch.float64)}
    if conv:
        x["weight"] = 0.5 * torch.randn(H * K, W, generator=gen, dtype=torch.float64)
    if past:
        x["past"] = torch.randn(B, W - 1, H * K, generator=gen, dtype=torch.float64)
    x = {n: t.to(DEVICE).requires_grad_() for n, t in x.items()}
    dy = torch.randn(B, T, H, K, generator=gen, dtype=torch.float64).to(DEVICE)
    outs = {}
    for name, fn in (("triton", flow), ("torch", flow_torch)):
        y = fn(x["p"], ops, x.get("weight"), x.get("past"))
        outs[name] = (y.detach(), torch.autograd.grad((y * dy).sum(), list(x.values())))
    assert_rel("y", outs["triton"][0].cpu(), outs["torch"][0].cpu(), 1e-12)
    for n, gt, gr in zip(x, outs["triton"][1], outs["torch"][1]):
        assert_rel(f"d{n}", gt.cpu(), gr.cpu(), 1e-12)


def test_the_shipped_flows_are_chains():
    from nlc.expr import Call
    spec = nlc.load(ROOT / "specs" / "gated_deltanet.yaml")
    lv = spec.levels["memory"]
    width, ops, proj = chain_of(lv.key)
    assert width == 4 and ops == ("silu", "l2norm") and isinstance(proj, Call) and proj.fn == "proj"
    assert chain_of(lv.value)[:2] == (4, ("silu",))
    assert chain_of(nlc.load(ROOT / "specs" / "linear_attention.yaml").levels["memory"].key)[:2] == (0, ("l2norm",))
    assert chain_of(nlc.load(ROOT / "specs" / "hope.yaml").levels["M_mem"].key) is None   # a generator's output


def test_the_generated_chain_holds_only_its_functions():
    text = template.body("flow_prologue", {"CONV": True}, code(("silu", "l2norm")))
    assert "z1 = z0 * tl.sigmoid(z0)" in text and "tl.rsqrt(tl.sum(z1 * z1, 1)" in text
    assert not any(ln.strip() in ("# {FORWARD}", "# {BACKWARD}") for ln in text.splitlines())
    assert "tl.erf" not in text and "if CONV" not in text
    assert set(OPS) >= {"silu", "gelu", "sigmoid", "tanh", "relu", "softplus", "exp", "l2norm"}


def test_bad_prologue_calls_name_the_way_out():
    p = torch.randn(1, 3, 1, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="no Triton code for `log`.*backend='torch'"):
        flow(p, ("log",))
    with pytest.raises(ValueError, match="no convolution"):
        flow(p, ("silu",), None, torch.zeros(1, 3, 16, dtype=torch.float64))

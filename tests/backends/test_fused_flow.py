"""Flows in generated models (`L.flow`): a chain `f_n(...f_1([conv](proj(x))))` runs op by op on
torch and as one fused Triton kernel (skeleton 3) where the backend runs Triton. Both forms give
the same outputs, convolution state and gradients in float64 (the Triton one under the
interpreter), over pieces of a sequence carrying the convolution's past; the codegen fuses only
where it saves kernels."""
from __future__ import annotations

import pytest
import torch

import nlc
from nlc.backends.torch import lib as L

from .numerics import assert_rel


def run_pieces(backend, p, ops, conv, cuts):
    """The flow over `p` fed in pieces (cut at `cuts`), the convolution's past carried."""
    state, outs = {}, []
    for a, b in zip([0, *cuts], [*cuts, p.shape[1]]):
        new = {}
        outs.append(L.flow(p[:, a:b], ops, conv, state, new, "c", backend))
        state = new
    return torch.cat(outs, 1), state.get("c")


@pytest.mark.parametrize("ops,width", [(("silu", "l2norm"), 4), (("silu",), 3), (("l2norm",), 0),
                                       (("sigmoid",), 2), (("tanh", "l2norm"), 6)],
                         ids=["silu-l2norm-conv4", "silu-conv3", "l2norm", "sigmoid-conv2", "tanh-l2norm-conv6"])
def test_fused_flow_equals_torch_over_pieces(ops, width):
    gen = torch.Generator().manual_seed(7 + width)
    B, T, H, K = 2, 29, 2, 12
    p = torch.randn(B, T, H, K, generator=gen, dtype=torch.float64).requires_grad_()
    conv = None
    if width:
        conv = L.CausalConv(H * K, width).double()
        with torch.no_grad():
            conv.weight.copy_(torch.randn(H * K, width, generator=gen, dtype=torch.float64))
    dy = torch.randn(B, T, H, K, generator=gen, dtype=torch.float64)
    params = [p] + ([conv.weight] if conv else [])
    got = {}
    for backend in ("torch", "triton"):
        y, past = run_pieces(backend, p, ops, conv, cuts=[5, 6, 17])
        got[backend] = (y.detach(), past, torch.autograd.grad((y * dy).sum(), params))
    assert_rel("y", got["triton"][0], got["torch"][0], 1e-12)
    if width:
        assert torch.equal(got["triton"][1], got["torch"][1].detach())       # the carried inputs
    for name, a, b in zip(["dp", "dweight"], got["triton"][2], got["torch"][2]):
        assert_rel(name, a, b, 1e-12)
    whole, _ = run_pieces("torch", p, ops, conv, cuts=[])
    assert_rel("pieces vs whole", got["torch"][0], whole.detach(), 1e-12)


def test_auto_on_cpu_runs_the_torch_ops_exactly():
    gen = torch.Generator().manual_seed(3)
    p = torch.randn(1, 9, 2, 8, generator=gen)
    conv = L.CausalConv(16, 4)
    y = L.flow(p, ("silu", "l2norm"), conv, {}, {}, "c", "auto")
    assert torch.equal(y, L.l2norm(L.silu(conv(p, {}, {}, "c"))))


def test_codegen_fuses_only_where_it_saves_kernels():
    from nlc.backends.torch.codegen import generate
    source = generate(nlc.load("specs/gdn_swa.yaml"))
    assert "L.flow(self.gdn_key_proj(x), ('silu', 'l2norm'), self.gdn_key_conv" in source      # conv + two ops
    assert "L.flow(self.gdn_value_proj(x), ('silu',), self.gdn_value_conv" in source           # conv + one op
    assert "L.silu(self.gdn_output_proj(x))" in source                                         # one op: as written
    linear = generate(nlc.load("specs/linear_attention.yaml"))
    assert "('l2norm',), None, cstate, cnew, None, backend)" in linear                          # an l2norm alone

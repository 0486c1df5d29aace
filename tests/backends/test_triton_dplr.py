"""Skeleton 1d (``nlc.backends.triton.dplr``): the DPLR delta rule on Triton == the torch chunk form.

    h_t = diag(a_t) h_{t-1} - u_t (e_t^T h_{t-1}) + k_t w_t^T,    o_t = h_t^T (scale q_t)

Under Triton's interpreter (tests/conftest.py), float64: ``generalized_delta(backend="triton")``
with a per-channel retention and an erase (a general pair, or ``b`` along k) is held to
``backend="torch"`` at 1e-9 on outputs, final states and the gradients of every input (q, k, w,
a, u, e or b, the initial state). Shapes are odd: T not a multiple of the kernels' 16-token chunk,
K and V not powers of two, K over one 16-channel block, V over one value block.

``NLC_TEST_DEVICE=cuda`` runs the same tests on a GPU, compiled.
"""
from __future__ import annotations

import os

import pytest
import torch

from nlc.backends.torch import ops

from .test_ops_dplr import call, make_inputs, run_with_grads
from .numerics import assert_rel
from .spy import launches

TOL64 = 1e-9
DEVICE = os.environ.get("NLC_TEST_DEVICE", "cpu")
DPLR = ["per_channel_a_b", "erase", "both"]          # test_ops_dplr's cases that have an erase


def both(x, **kw):
    x = {n: t.detach().to(DEVICE).requires_grad_() for n, t in x.items()}
    got = run_with_grads(x, mode="chunk", backend="triton", **kw)
    want = run_with_grads(x, mode="chunk", backend="torch", **kw)
    return got, want


def compare(got, want, tol_out=TOL64, tol_grad=TOL64):
    (o, S, g), (o_t, S_t, g_t) = got, want
    assert_rel("o", o.double().cpu(), o_t.double().cpu(), tol_out)
    assert_rel("final_state", S.double().cpu(), S_t.double().cpu(), tol_out)
    assert g.keys() == g_t.keys()
    for name in g_t:
        assert_rel(f"d{name}", g[name].double().cpu(), g_t[name].double().cpu(), tol_grad)


def test_the_kernels_run(monkeypatch):
    """backend='triton' reaches every DPLR kernel (the comparisons below are not torch vs torch)."""
    from nlc.backends.triton import dplr
    names = ["dplr_prep", "dplr_state_fwd", "dplr_out", "dplr_state_bwd", "dplr_chunk_bwd"]
    calls = launches(monkeypatch, dplr.kernels(DEVICE == "cpu"), names)
    both(make_inputs("erase", B=1, T=5, H=1))
    assert calls == names


@pytest.mark.parametrize("case", DPLR)
def test_triton_dplr_equals_torch(case):
    """T = 37: two whole 16-token chunks and a ragged one; K = 6, V = 5 (masked tiles)."""
    compare(*both(make_inputs(case, T=37, seed=1)))


def test_triton_dplr_blocks_and_no_initial_state():
    """K = 40 (three 16-channel blocks of the per-channel products), V = 40 (two value blocks of
    32), no initial state, and a chunk size the kernels ignore (their chunk is 16: exact)."""
    compare(*both(make_inputs("both", B=1, T=21, H=2, K=40, V=40, h0=False, seed=2), chunk_size=64))


def test_triton_dplr_strong_decays_and_unnormalised_keys():
    """Retentions down to e^-8 per token (every exponent the kernels take is <= 0: no overflow) and
    an erase of norm ~2.5 along unnormalised keys (the UT system's entries grow past 1)."""
    x = make_inputs("both", T=33, seed=3)
    with torch.no_grad():
        x["a"].copy_(torch.exp(-8 * torch.rand(x["a"].shape, generator=torch.Generator().manual_seed(4),
                                               dtype=x["a"].dtype)))
        x["u"].mul_(2.5)
        x["e"].mul_(1.5)
    compare(*both(x))


def test_triton_dplr_float32():
    """float32 inputs against the float64 reference: 1e-4 on outputs and states, 1e-3 on gradients."""
    x64 = make_inputs("both", T=37, seed=5)
    x32 = {n: t.detach().float().to(DEVICE).requires_grad_() for n, t in x64.items()}
    res = []
    for x, backend in ((x32, "triton"), (x64, "torch")):
        o, S = call(x, mode="chunk", backend=backend)
        gen = torch.Generator().manual_seed(6)          # the same cotangents, drawn in float64
        wo, wS = (torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.device, t.dtype) for t in (o, S))
        grads = torch.autograd.grad((o * wo).sum() + (S * wS).sum(), list(x.values()))
        res.append((o.detach(), S.detach(), dict(zip(x, grads))))
    assert res[0][0].dtype == torch.float32
    compare(*res, 1e-4, 1e-3)


def test_triton_dplr_empty_and_too_wide():
    x = make_inputs("erase", T=0)
    o, S = ops.generalized_delta(x["q"], x["k"], x["w"], x["a"], erase=(x["u"], x["e"]),
                                 initial_state=x["initial_state"], backend="triton")
    assert o.shape[1] == 0 and torch.equal(S, x["initial_state"])
    wide = make_inputs("erase", B=1, T=3, H=1, K=136)
    args = (wide["q"], wide["k"], wide["w"], wide["a"])
    with pytest.raises(ValueError, match="K up to 128.*backend='torch'"):
        ops.generalized_delta(*args, erase=(wide["u"], wide["e"]), backend="triton")
    ops.generalized_delta(*args, erase=(wide["u"], wide["e"]), backend="auto")   # auto: torch runs it

"""16-bit inputs on the Triton kernels of skeletons 1b, 1c, 1d and 2 (skeleton 1's are in
test_triton_delta.py): bfloat16 q, k and v (or w), everything else float32, against the float32
torch form, the issue's measure, relative RMSE under 5e-3. The output and the final state are held
to the torch form on the original float32 values, so the inputs' own rounding is inside the bound.
The gradients are held to the torch form on the same bfloat16-rounded values: with the original
ones, the torch form itself on bfloat16 inputs misses the bound (Titans' memory: d alpha 6.8e-3,
d beta 5.3e-3 from the rounding of q, k and v alone), which no kernel can change; what remains is
the kernel's own error, with the rounding of the bfloat16 cotangent and gradients.

What the kernels get: every wrapper computes in float32 tiles and takes its products as TF32 for
16-bit inputs (``plan.products``; float32 inputs take "tf32x3", float64 "ieee"), which each test
checks by recording the launch configuration. Under Triton's interpreter (this CPU) a product
runs in float32 whatever its precision, so here the bound measures the rounding and the plumbing
(dtypes in and out, the kernels reached); ``NLC_TEST_DEVICE=cuda`` runs the same tests compiled,
where the TF32 products are inside the bound too.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from nlc.backends.torch import deep_memory as dm
from nlc.backends.torch import memories as mem
from nlc.backends.torch import ops
from nlc.backends.triton import deep, diag, dplr, momentum, plan

from . import test_triton_mlp as mlp_t
from . import test_triton_momentum as mom_t
from .numerics import assert_rmse
from .test_ops_dplr import make_inputs as dplr_inputs

DEVICE = os.environ.get("NLC_TEST_DEVICE", "cpu")
HALF = torch.bfloat16
TOL = 5e-3


def split(x32: dict, half: tuple) -> tuple[dict, dict, dict]:
    """Leaves of one draw three times: the 16-bit run's (``half`` in bfloat16, the rest float32),
    the float32 reference's on the original values, and on the values the 16-bit run sees."""
    leaf = lambda t, dt: None if t is None else t.detach().to(DEVICE, dt).requires_grad_()  # noqa: E731
    low = {n: leaf(t, HALF if n in half else torch.float32) for n, t in x32.items()}
    ref = {n: leaf(t, torch.float32) for n, t in x32.items()}
    same = {n: None if t is None else leaf(t.detach(), torch.float32) for n, t in low.items()}
    return low, ref, same


def record(monkeypatch, module, name: str, prec_of) -> list:
    """Record the product precision of each call to ``module.name`` (a launch configuration)."""
    seen, real = [], getattr(module, name)

    def spy(*a, **kw):
        out = real(*a, **kw)
        seen.append(prec_of(out))
        return out
    monkeypatch.setattr(module, name, spy)
    return seen


def compare(names, run, low, ref, same, key):
    """``run(leaves)`` -> outputs: those of the 16-bit run against the reference on the original
    values, then the gradients of one random functional against the reference on the same values."""
    got, want, want_same = run(low), run(ref), run(same)
    for n, a, b in zip(names, got, want):
        assert_rmse(n, a.float(), b, TOL)
    g = torch.Generator().manual_seed(len(key))
    ws = [torch.randn(t.shape, generator=g).to(DEVICE) for t in want]
    leaves = [n for n, t in ref.items() if t is not None]
    gl = torch.autograd.grad(sum((a.float() * w).sum() for a, w in zip(got, ws)), [low[n] for n in leaves])
    gr = torch.autograd.grad(sum((b * w).sum() for b, w in zip(want_same, ws)), [same[n] for n in leaves])
    for n, a, b in zip(leaves, gl, gr):
        assert a.dtype == low[n].dtype, f"d{n}: {a.dtype}, its input {low[n].dtype}"
        assert_rmse(f"d{n}", a.float(), b, TOL)
    return got


def test_one_rule_for_the_products():
    assert [plan.products(d) for d in (torch.float64, torch.float32, torch.bfloat16, torch.float16)] == \
        ["ieee", "tf32x3", "tf32", "tf32"]
    assert plan.products("float32", float32="ieee") == "ieee"       # skeletons 1 and 1b's float32
    import nlc
    titans = nlc.load(Path(__file__).resolve().parents[2] / "specs" / "titans.yaml")
    assert plan.PRODUCTS in plan.describe(titans, "triton")                 # nlc explain says it


@pytest.mark.parametrize("case", ["titans", "hope_memory"])
def test_mlp_memory(monkeypatch, case):
    seen = record(monkeypatch, deep, "_config", lambda out: out[3]["PREC"])

    def run(x):
        return mlp_t.run(x, case, backend="triton" if x["q"].dtype == HALF else "torch", dispatch=True)
    x = mlp_t.leaves(case, dtype=torch.float32)
    got = compare(["o", "W1", "W2", "S1", "S2"], run, *split(x, ("q", "k", "v")), case)
    assert got[0].dtype == HALF and all(w.dtype == torch.float32 for w in got[1:])
    assert seen and set(seen) == {"tf32"}, seen                       # forward and backward kernels


@pytest.mark.parametrize("case", ["l2_erase", "dot"])
def test_momentum_memory(monkeypatch, case):
    seen = record(monkeypatch, momentum, "launch", lambda out: out[0]["PREC"])

    def run(x):
        o, st = mom_t.run(x, case, backend="triton" if x["q"].dtype == HALF else "torch")
        return [o, st.M, st.S]
    got = compare(["o", "M", "S"], run, *split(mom_t.leaves(case, dtype=torch.float32), ("q", "k", "v")), case)
    assert got[0].dtype == HALF and got[1].dtype == torch.float32
    assert seen and set(seen) == {"tf32"}, seen


def test_momentum_memory_wide_heads_take_three_products(monkeypatch):
    """Over K = 64 TF32's operands would not fit an H100's shared memory (plan.MOMENTUM_TILE):
    16-bit inputs take tf32x3 there, and still hold the RMSE."""
    seen = record(monkeypatch, momentum, "launch", lambda out: out[0]["PREC"])

    def run(x):
        o, st = mom_t.run(x, "wide_heads", backend="triton" if x["q"].dtype == HALF else "torch")
        return [o, st.M, st.S]
    x = mom_t.leaves("wide_heads", dtype=torch.float32)
    got = compare(["o", "M", "S"], run, *split(x, ("q", "k", "v")), "wide")
    assert got[0].dtype == HALF
    assert seen and set(seen) == {"tf32x3"}, seen


@pytest.mark.parametrize("case", ["both", "per_channel_a_b", "per_channel_a"])
def test_per_channel_retention(monkeypatch, case):
    """RWKV-7's DPLR form (an erase: skeleton 1d) and GLA's (none: skeleton 1b), through the op."""
    module = diag if case == "per_channel_a" else dplr
    seen = record(monkeypatch, module, "launch", lambda out: {m["PREC"] for m, *_ in out.values()})

    def run(x):
        erase = (x["u"], x["e"]) if "u" in x else None
        return list(ops.generalized_delta(x["q"], x["k"], x["w"], x["a"], x.get("b"), erase=erase,
                                          initial_state=x["initial_state"],
                                          backend="triton" if x["q"].dtype == HALF else "torch"))
    x = {n: t.float() for n, t in dplr_inputs(case, T=37, K=24, V=20, seed=2).items()}
    got = compare(["o", "final_state"], run, *split(x, ("q", "k", "w")), case)
    assert got[0].dtype == HALF and got[1].dtype == torch.float32
    assert seen and set().union(*seen) == {"tf32"}, seen


def test_mixed_widths_compute_in_the_widest():
    """bfloat16 q, k, v with a float64 initial state: the memory computes in float64 and the
    kernel takes float64 products (no 16-bit path, no mixed tiles)."""
    x = mlp_t.leaves("plain_anchor", T=9)
    low = {n: None if t is None else (t.detach().to(HALF) if n in ("q", "k", "v") else t.detach())
           for n, t in x.items()}
    o, st = dm.mlp_memory(low["q"], low["k"], low["v"], low["eta"], None, low["alpha"], None,
                          initial_state=(low["W1"], low["W2"]), read="anchor", backend="triton", chunk_size=16)
    assert o.dtype == HALF and st.weights[0].dtype == torch.float64
    o_m, st_m = mem.momentum_memory(low["q"], low["k"], low["v"][..., :16], low["eta"], low["eta"],
                                    initial_state=(low["W2"].new_zeros(2, 2, 16, 16), None), backend="triton")
    assert st_m.M.dtype == torch.float64

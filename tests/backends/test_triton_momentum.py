"""Skeleton 1c (``nlc.backends.triton.momentum``): the momentum matrix memory on Triton == torch.

Under Triton's interpreter (tests/conftest.py), float64: ``momentum_memory(backend="triton")`` is
held to ``backend="torch"`` (the chunk form) and to ``mode="recurrent"`` (the token loop) at 1e-9,
on outputs, final memory and momentum, and the gradients of every input (q, k, v, eta, beta,
alpha, erase, the initial memory and momentum) for a random linear functional of all of them.
Shapes are tiny and odd: T not a multiple of the chunk, K and V not powers of two, V over one
value block (the kernel's grid splits V; what sums over it is reduced by the wrapper).

``NLC_TEST_DEVICE=cuda`` runs the same tests on a GPU, compiled.
"""
from __future__ import annotations

import os
import zlib
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from nlc.backends.torch import memories as mem
from nlc.backends.triton import momentum

from .numerics import assert_rel
from .spy import launches

TOL64 = 1e-9
DEVICE = os.environ.get("NLC_TEST_DEVICE", "cpu")

# name -> (objective, erase, retention, K, V, chunk_size, T): the flags both ways, the tiles
CASES = {
    "l2": ("l2", False, True, 16, 24, 16, 37),
    "l2_erase": ("l2", True, True, 16, 24, 16, 37),
    "dot": ("dot", False, True, 16, 24, 16, 37),
    "dot_erase": ("dot", True, True, 16, 24, 16, 37),
    "no_retention": ("l2", True, False, 16, 24, 16, 21),
    "two_value_blocks": ("l2", True, True, 24, 40, 16, 21),    # BK 32 masked; V = 40: blocks of 32
    "chunk32": ("l2", True, True, 16, 16, 32, 45),
    "chunk64": ("dot", True, True, 16, 16, 64, 70),
    "wide_heads": ("l2", True, True, 72, 20, 16, 19),          # BK 128 masked (16-bit inputs: tf32x3)
}


def leaves(case, B=2, H=2, seed=0, dtype=torch.float64, normalise=True):
    objective, erase, retain, K, V, C, T = CASES[case]
    g = torch.Generator().manual_seed(zlib.crc32(repr((case, seed)).encode()))
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(B, T, H, generator=g, dtype=dtype)  # noqa: E731
    k = torch.randn(B, T, H, K, generator=g, dtype=dtype)
    x = {"q": torch.randn(B, T, H, K, generator=g, dtype=dtype), "k": F.normalize(k, dim=-1) if normalise else k,
         "v": torch.randn(B, T, H, V, generator=g, dtype=dtype), "eta": u(0.05, 0.6), "beta": u(0.1, 0.95),
         "alpha": u(0.7, 1.0) if retain else None, "erase": u(0.05, 0.5) if erase else None,
         "M": 0.5 * torch.randn(B, H, K, V, generator=g, dtype=dtype),
         "S": 0.1 * torch.randn(B, H, K, V, generator=g, dtype=dtype)}
    return {n: None if t is None else t.to(DEVICE).requires_grad_() for n, t in x.items()}


def run(x, case, backend="triton", mode="chunk", state=None, a=0, b=None):
    """``momentum_memory`` on tokens [a, b) of the case's leaves, from ``state`` (None: M, S)."""
    objective, _, _, _, _, C, T = CASES[case]
    sl = lambda t: None if t is None else t[:, a:b]  # noqa: E731
    st = mem.MomentumState(x["M"], x["S"]) if state is None else state
    o, st = mem.momentum_memory(*(sl(x[n]) for n in ("q", "k", "v", "eta", "beta", "alpha", "erase")),
                                objective=objective, initial_state=st, mode=mode, chunk_size=C, backend=backend)
    return o, st


def grads(outs, x, key):
    """Gradients of a random linear functional of ``outs`` w.r.t. every leaf."""
    g = torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))
    loss = sum((t * torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.device, t.dtype)).sum()
               for t in outs)
    names = [n for n, t in x.items() if t is not None]
    return dict(zip(names, torch.autograd.grad(loss, [x[n] for n in names])))


def compare(x_got, outs_got, x_want, outs_want, key, tol_out, tol_grad):
    for name, a, b in zip(("o", "M", "S"), outs_got, outs_want):
        assert_rel(name, a.detach().double(), b.detach().double(), tol_out)
    gg, gw = grads(outs_got, x_got, key), grads(outs_want, x_want, key)
    assert set(gg) == set(gw)
    for name in gw:
        assert_rel(f"d{name}", gg[name].double(), gw[name].double(), tol_grad)


def test_the_kernels_run(monkeypatch):
    """backend='triton' reaches both kernels (the comparisons below are not torch vs torch)."""
    calls = launches(monkeypatch, momentum.kernels(momentum.variant("l2", True), DEVICE == "cpu"),
                     ("momentum_fwd", "momentum_bwd"))
    x = leaves("l2_erase", B=1, H=1)
    o, st = run(x, "l2_erase")
    grads([o, st.M, st.S], x, "reach")
    assert calls == ["momentum_fwd"] * 2 + ["momentum_bwd"] * 2     # the whole chunks, the open one


@pytest.mark.parametrize("case", list(CASES))
def test_triton_momentum_equals_torch_chunk(case):
    x = leaves(case)
    o, st = run(x, case)
    o_t, st_t = run(x, case, backend="torch")
    compare(x, [o, st.M, st.S], x, [o_t, st_t.M, st_t.S], case, TOL64, TOL64)


@pytest.mark.parametrize("case", ["l2_erase", "dot"])
def test_triton_momentum_equals_recurrent(case):
    """The token loop (the anchor refreshed every chunk): the rule itself, not the chunked algebra."""
    x = leaves(case)
    o, st = run(x, case)
    o_r, st_r = run(x, case, backend="torch", mode="recurrent")
    compare(x, [o, st.M, st.S], x, [o_r, st_r.M, st_r.S], case, TOL64, TOL64)


def test_carried_state_in_pieces():
    """A sequence fed in pieces cut inside chunks (an open chunk carried with its anchor: its rest
    on torch, the chunks after it on the kernel) equals it fed whole on torch."""
    case = "l2_erase"
    x = leaves(case, B=1)
    T = CASES[case][-1]
    outs, st = [], None
    for a, b in ((0, 5), (5, 30), (30, T)):
        o, st = run(x, case, state=st, a=a, b=b)
        outs.append(o)
    assert st.offset == T % 16 and st.anchor is not None
    o_t, st_t = run(x, case, backend="torch")
    compare(x, [torch.cat(outs, 1), st.M, st.S], x, [o_t, st_t.M, st_t.S], "pieces", TOL64, TOL64)


def test_unnormalised_keys_with_the_erase():
    """Keys of norm ~4 (not L2-normalised): the erase's triangular system grows with the chunk.
    Here L's entries (erase * decay * k.k) reach 4.2 and (I + L)^-1's 6.8e3 at chunk 64 (measured
    on these inputs). The kernel inverts it blockwise (16 x 16 blocks by substitution, then
    merged), torch by a triangular solve: in float64 they still agree at 1e-9."""
    x = leaves("chunk64", normalise=False)
    with torch.no_grad():
        x["k"].mul_(4.0 / x["k"].norm(dim=-1, keepdim=True).mean())
    o, st = run(x, "chunk64")
    o_t, st_t = run(x, "chunk64", backend="torch")
    compare(x, [o, st.M, st.S], x, [o_t, st_t.M, st_t.S], "unnormalised", TOL64, TOL64)


@pytest.mark.parametrize("case", ["l2_erase", "dot"])
def test_triton_momentum_float32(case):
    """float32 inputs (accumulation in float32) against the float64 reference: outputs and states
    to 1e-4, gradients to 1e-3 (the issue's tolerances)."""
    x64 = leaves(case)
    x32 = {n: None if t is None else t.detach().float().requires_grad_() for n, t in x64.items()}
    o, st = run(x32, case)
    assert o.dtype == torch.float32
    o_t, st_t = run(x64, case, backend="torch")
    compare(x32, [o, st.M, st.S], x64, [o_t, st_t.M, st_t.S], case, 1e-4, 1e-3)


def test_auto_runs_torch_on_cpu_and_what_the_kernel_cannot_take_is_an_error():
    x = leaves("l2", B=1, H=1)
    with mock.patch.object(momentum, "chunk_momentum_memory") as kernel:
        run(x, "l2", backend="auto")
    assert not kernel.called
    args = [x[n] for n in ("q", "k", "v", "eta", "beta", "alpha", "erase")]
    for C in (1, 8, 24, 128):
        with pytest.raises(ValueError, match="chunk_size.*backend='torch'"):
            mem.momentum_memory(*args, chunk_size=C, backend="triton")
    wide = torch.randn(1, 3, 1, 257, dtype=torch.float64)
    with pytest.raises(ValueError, match="at most 256.*backend='torch'"):
        mem.momentum_memory(wide, wide, wide, 0.1, 0.9, chunk_size=16, backend="triton")
    wide = wide[..., :129]                                  # chunk x K over plan.MOMENTUM_TILE (64 x 128)
    with pytest.raises(ValueError, match="chunk_size x K must be at most 8192.*got 64 x 129.*backend='torch'"):
        mem.momentum_memory(wide, wide, wide, 0.1, 0.9, chunk_size=64, backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        mem.momentum_memory(*args, chunk_size=16, backend="cuda")


def test_each_variant_holds_only_its_terms():
    from itertools import product

    from nlc.backends.triton import template
    assert set(template.flags_of("momentum_chunk")) == {"ERASE", "L2"}
    for erase, l2 in product([False, True], repeat=2):
        text = template.body("momentum_chunk", {"ERASE": erase, "L2": l2})
        assert ("Tinv" in text) == erase and ("_unit_lower_inv" in text) == erase
        assert ("kM - v" in text) == l2

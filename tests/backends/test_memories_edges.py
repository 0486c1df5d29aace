"""Functional memories at their edges: state carried across calls, float32, empty sequences and
defaults, and the arguments they refuse.

The momentum and MLP memories with ``test_memories``' seeded leaves and relative max error: a
sequence split at a chunk boundary and run in two calls with the state carried equals one call,
float32 agrees with itself across modes, a zero-length sequence returns its initial state, and a
wrong shape, mode, state or activation is a ValueError that names it.
"""
from __future__ import annotations

import pytest
import torch

from nlc.backends.torch import memories as mem

from .test_memories import K_DIM, V_DIM, assert_rel, flat_state, mlp_leaves, momentum_leaves, run_mlp, run_momentum


@pytest.mark.parametrize("which", ["momentum", "mlp", "mlp_current"])
@pytest.mark.parametrize("mode", mem.MODES)
def test_carried_state(which, mode):
    """[0:T1] then [T1:T] == [0:T] with T1 a multiple of the chunk (the anchors line up)."""
    T, T1, C = 33, 12, 4
    if which == "momentum":
        x = {n: (t if t is None else t.detach()) for n, t in momentum_leaves(T, 2, erase=True).items()}
        call = lambda y, st: mem.momentum_memory(  # noqa: E731
            y["q"], y["k"], y["v"], y["eta"], y["beta"], y["alpha"], y["erase"], initial_state=st,
            mode=mode, chunk_size=C)
        st0 = (x["M0"], x["S0"])
    else:
        x, depth, kw = mlp_leaves("hope", T, 2)
        x = {n: (t if t is None else t.detach()) for n, t in x.items()}
        kw["read"] = "current" if which == "mlp_current" else "anchor"
        call = lambda y, st: mem.mlp_memory(  # noqa: E731
            y["q"], y["k"], y["v"], y["eta"], y["beta"], y["alpha"], y["erase"], initial_state=st,
            mode=mode, chunk_size=C, **kw)
        st0 = mem.MLPState((x["W1"], x["W2"]), (x["S1"], x["S2"]))
    tok = [n for n in ("q", "k", "v", "eta", "beta", "alpha", "erase")]
    o, st = call(x, st0)
    o1, st1 = call({n: x[n][:, :T1] for n in tok}, st0)
    o2, st2 = call({n: x[n][:, T1:] for n in tok}, st1)
    assert_rel("o", torch.cat([o1, o2], 1), o, 1e-12)
    flat = (lambda s: list(s)) if which == "momentum" else flat_state
    for i, (a, b) in enumerate(zip(flat(st2), flat(st))):
        assert_rel(f"state[{i}]", a, b, 1e-12)


def test_float32():
    x = {n: (t if t is None else t.detach().float()) for n, t in momentum_leaves(40, 2, erase=True).items()}
    res = [run_momentum(x, mode=m, chunk_size=16) for m in mem.MODES]
    assert res[0][0].dtype == res[0][1].M.dtype == torch.float32
    assert_rel("o", res[0][0], res[1][0], 1e-5)
    y, depth, kw = mlp_leaves("hope", 40, 2, dtype=torch.float32)
    with torch.no_grad():
        res = [run_mlp(y, depth, mode=m, chunk_size=16, **kw) for m in mem.MODES]
    assert res[0][0].dtype == res[0][1].weights[0].dtype == torch.float32
    assert_rel("o", res[0][0], res[1][0], 1e-5)
    assert_rel("W2", res[0][1].weights[1], res[1][1].weights[1], 1e-5)


@pytest.mark.parametrize("mode", mem.MODES)
def test_empty_sequence_and_defaults(mode):
    x = {n: (t if t is None else t.detach()) for n, t in momentum_leaves(0, 2, erase=False).items()}
    o, (M, S) = run_momentum(x, mode=mode)
    assert o.shape == (2, 0, 2, V_DIM) and torch.equal(M, x["M0"]) and torch.equal(S, x["S0"])
    y = {n: (t if t is None else t.detach()) for n, t in momentum_leaves(5, 2, erase=False).items()}
    o, (M, S) = mem.momentum_memory(y["q"], y["k"], y["v"], 0.1, 0.9, 1.0, mode=mode, chunk_size=2)
    assert o.shape == (2, 5, 2, V_DIM) and M.shape == S.shape == (2, 2, K_DIM, V_DIM)
    assert torch.isfinite(o).all() and torch.isfinite(M).all()


def test_argument_errors():
    x, depth, kw = mlp_leaves("hope", 5, 2)
    W = (x["W1"], x["W2"])
    with pytest.raises(ValueError, match="eta must have shape"):
        mem.mlp_memory(x["q"], x["k"], x["v"], x["eta"][:, :2], initial_state=W)
    with pytest.raises(ValueError, match="residual=True needs"):
        mem.mlp_memory(x["q"], x["k"], x["v"][..., :1], x["eta"], initial_state=(x["W1"][:, :1], x["W2"]))
    with pytest.raises(ValueError, match="mode must be"):
        mem.momentum_memory(x["q"], x["k"], x["v"], x["eta"], 0.9, 1.0, mode="fast")
    with pytest.raises(ValueError, match="initial_state"):
        mem.momentum_memory(x["q"], x["k"], x["v"], x["eta"], 0.9, 1.0, initial_state=(x["W1"], None))
    with pytest.raises(ValueError, match="activation"):
        mem.mlp_memory(x["q"], x["k"], x["v"], x["eta"], initial_state=W, activation="swish")
    with pytest.raises(ValueError, match=r"mlp_memory: read must be one of \('anchor', 'current'\), got 'latest'"):
        mem.mlp_memory(x["q"], x["k"], x["v"], x["eta"], initial_state=W, read="latest")

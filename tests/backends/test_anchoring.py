"""Chunks anchored at absolute positions: a sequence fed whole, cut anywhere, or token by token.

``mlp_memory`` and ``momentum_memory`` take each token's inner gradient at its chunk's anchor,
chunks starting at multiples of ``chunk_size`` from the sequence start; the carried state holds the
open chunk's anchor and offset. Float64, fresh random inputs (``test_memories``' leaves: never
zeros, keys L2-normalised, an initial state with momenta), several heads, T odd: the whole
sequence, the sequence cut at 3, 7, 16 and token by token give the same outputs and final states
in both modes, and the cut form the same gradients (through the carried states) as the whole.
"""
from __future__ import annotations

from unittest import mock

import pytest
import torch

from nlc.backends.torch import deep_memory as dm
from nlc.backends.torch import memories as mem

from .numerics import rel_err
from .test_memories import assert_all, assert_rel, grads_of, mlp_leaves, momentum_leaves

TOL = 1e-12
T = 23
CUTS = (3, 7, 16)
TOK = ("q", "k", "v", "eta", "beta", "alpha", "erase")

# the shipped specs' flags: hope (self target, erase, retention, residual; here with momentum too),
# titans (momentum, retention), ttt_mlp (no momentum, retention or erase; gelu), and depth 3 (dot,
# no residual, a batched initial state)
MLP_VARIANTS = ("hope", "titans", "ttt", "deep")
MOMENTUM_VARIANTS = {"l2": ("l2", False), "l2_erase": ("l2", True), "dot_erase": ("dot", True)}


def mlp_setup(variant, H=3):
    x, depth, kw = mlp_leaves("titans" if variant == "ttt" else variant, T, H, seed=7)
    if variant == "ttt":
        x = {n: t for n, t in x.items() if n not in ("S1", "S2")}
        x.update(beta=None, alpha=None, erase=None)
        kw["activation"] = "gelu"
    W = tuple(x[f"W{i + 1}"] for i in range(depth))
    S = tuple(x[f"S{i + 1}"] for i in range(depth)) if "S1" in x else None
    return x, mem.MLPState(W, S), kw


def mlp_call(x, st, a, b, **kw):
    y = {n: None if x[n] is None else x[n][:, a:b] for n in TOK}
    return mem.mlp_memory(*(y[n] for n in TOK), initial_state=st, **kw)


def momentum_setup(variant, H=3):
    objective, erase = MOMENTUM_VARIANTS[variant]
    x = momentum_leaves(T, H, erase, seed=7)
    return x, mem.MomentumState(x["M0"], x["S0"]), dict(objective=objective)


def momentum_call(x, st, a, b, **kw):
    y = {n: None if x[n] is None else x[n][:, a:b] for n in TOK}
    return mem.momentum_memory(*(y[n] for n in TOK), initial_state=st, **kw)


def flat(st):
    """The tensors of a state: weights (M), momenta (S), the open chunk's anchor."""
    if isinstance(st, mem.MomentumState):
        return [st.M, st.S, *(() if st.anchor is None else (st.anchor,))]
    return [*st.weights, *(st.momenta or ()), *(st.anchor or ())]


def feed(call, x, st, cuts, **kw):
    """Call on [0, c1), [c1, c2), ..., [c_n, T), carrying the state: (o, final state)."""
    outs = []
    for a, b in zip((0, *cuts), (*cuts, T)):
        o, st = call(x, st, a, b, **kw)
        outs.append(o)
    return torch.cat(outs, 1), st


def assert_same_run(name, got, want, tol=TOL):
    (o_g, st_g), (o_w, st_w) = got, want
    assert_rel(f"{name}: o", o_g.detach(), o_w.detach(), tol)
    assert st_g.offset == st_w.offset, f"{name}: offset {st_g.offset} != {st_w.offset}"
    s_g, s_w = flat(st_g), flat(st_w)
    assert len(s_g) == len(s_w), f"{name}: state has {len(s_g)} tensors, want {len(s_w)}"
    for i, (a, b) in enumerate(zip(s_g, s_w)):
        assert_rel(f"{name}: state[{i}]", a.detach(), b.detach(), tol)


def check_forms(call, x, st0, key, **kw):
    """whole (chunk) == whole (recurrent) == cut == token by token, both modes; cut gradients == whole."""
    ref = call(x, st0, 0, T, mode="recurrent", **kw)
    assert ref[1].offset == T % kw["chunk_size"] > 0 and ref[1].anchor is not None
    leaves = {n: t for n, t in x.items() if t is not None}
    for mode in mem.MODES:
        whole = call(x, st0, 0, T, mode=mode, **kw)
        assert_same_run(f"{mode} whole", whole, ref)
        cut = feed(call, x, st0, CUTS, mode=mode, **kw)
        assert_same_run(f"{mode} cut {CUTS}", cut, ref)
        with torch.no_grad():
            assert_same_run(f"{mode} token by token", feed(call, x, st0, range(1, T), mode=mode, **kw), ref)
        g_whole = grads_of((whole[0], *flat(whole[1])), leaves, key)
        g_cut = grads_of((cut[0], *flat(cut[1])), leaves, key)
        assert_all(f"{mode} d", g_cut, g_whole, 1e-11)


@pytest.mark.parametrize("chunk_size", [4, 8])
@pytest.mark.parametrize("read", mem.READS)
@pytest.mark.parametrize("variant", MLP_VARIANTS)
def test_mlp_cuts(variant, read, chunk_size):
    x, st0, kw = mlp_setup(variant)
    check_forms(mlp_call, x, st0, (variant, read, chunk_size), read=read, chunk_size=chunk_size, **kw)


@pytest.mark.parametrize("chunk_size", [4, 8])
@pytest.mark.parametrize("variant", list(MOMENTUM_VARIANTS))
def test_momentum_cuts(variant, chunk_size):
    x, st0, kw = momentum_setup(variant)
    check_forms(momentum_call, x, st0, (variant, chunk_size), chunk_size=chunk_size, **kw)


@pytest.mark.parametrize("mode", mem.MODES)
@pytest.mark.parametrize("which", ["mlp", "momentum"])
def test_anchor_round_trip_is_needed(which, mode):
    """Cut at 3 (chunk 4): dropping the carried anchor and offset, or keeping the offset with the
    running weights as the anchor, changes the numbers; carrying both does not."""
    C = 4
    if which == "mlp":
        x, st0, kw = mlp_setup("hope")
        call, kw = mlp_call, dict(kw, read="current")
        reset = lambda st: mem.MLPState(st.weights, st.momenta)                     # noqa: E731
        wrong = lambda st: st._replace(anchor=st.weights)                           # noqa: E731
    else:
        x, st0, kw = momentum_setup("l2_erase")
        call = momentum_call
        reset = lambda st: mem.MomentumState(st.M, st.S)                            # noqa: E731
        wrong = lambda st: st._replace(anchor=st.M)                                 # noqa: E731
    kw.update(mode=mode, chunk_size=C)
    with torch.no_grad():
        o, st = call(x, st0, 0, T, **kw)
        o1, st1 = call(x, st0, 0, 3, **kw)
        assert st1.offset == 3 and st1.anchor is not None
        o2, st2 = call(x, st1, 3, T, **kw)
        assert rel_err(torch.cat([o1, o2], 1), o) <= TOL
        for name, bad in (("no anchor, no offset", reset(st1)), ("anchor = weights", wrong(st1))):
            o2, st2 = call(x, bad, 3, T, **kw)
            err = rel_err(torch.cat([o1, o2], 1), o)
            assert err > 1e-6, f"{name}: the cut equals the whole ({err:.1e}): the test cannot fail"


@pytest.mark.parametrize("mode", mem.MODES)
def test_offset_zero_ignores_the_anchor_and_empty_calls_keep_it(mode):
    x, st0, kw = mlp_setup("titans")
    kw.update(mode=mode, chunk_size=4)
    with torch.no_grad():
        o, st = mlp_call(x, st0, 0, 8, **kw)
        assert st.offset == 0 and st.anchor is None
        garbage = tuple(torch.randn_like(w) for w in st.weights)
        o2, st2 = mlp_call(x, st._replace(anchor=garbage), 8, T, **kw)
        o3, st3 = mlp_call(x, st, 8, T, **kw)
        assert torch.equal(o2, o3)
        _, st4 = mlp_call(x, st3, T, T, **kw)
        assert st4.offset == st3.offset == 3 and all(torch.equal(a, b) for a, b in zip(flat(st4), flat(st3)))


def test_state_errors():
    x, st0, kw = mlp_setup("titans")
    _, st = mlp_call(x, st0, 0, 3, chunk_size=4, **kw)
    with pytest.raises(ValueError, match=r"offset must be an int in \[0, chunk_size\)"):
        mlp_call(x, st, 3, T, chunk_size=2, **kw)
    with pytest.raises(ValueError, match="must carry that chunk's anchor"):
        mlp_call(x, st._replace(anchor=None), 3, T, chunk_size=4, **kw)
    with pytest.raises(ValueError, match="anchor"):
        mlp_call(x, st._replace(anchor=st.anchor[:1]), 3, T, chunk_size=4, **kw)
    y, m0, mkw = momentum_setup("l2")
    with pytest.raises(ValueError, match="must carry that chunk's anchor"):
        momentum_call(y, mem.MomentumState(y["M0"], y["S0"], None, 2), 0, T, chunk_size=4, **mkw)


def test_momentum_state_is_still_a_pair():
    """Generated code and callers unpack ``M, S = state``: the open chunk rides as attributes."""
    import copy
    import pickle
    x, st0, kw = momentum_setup("l2")
    with torch.no_grad():
        _, st = momentum_call(x, st0, 0, 5, chunk_size=4, **kw)
    M, S = st
    assert M is st.M and S is st.S and st.offset == 1 and st.anchor.shape == M.shape
    for back in (pickle.loads(pickle.dumps(st)), copy.deepcopy(st)):
        assert back.offset == 1 and torch.equal(back.anchor, st.anchor) and torch.equal(back.M, M)
    o, st2 = mem.momentum_memory(*(x[n][:, 5:] if x[n] is not None else None for n in TOK),
                                 initial_state=(M, S), chunk_size=4, **kw)   # a plain pair: offset 0
    assert st2.offset == (T - 5) % 4


def test_triton_from_a_mid_chunk_state():
    """A state inside a chunk on backend='triton' (and 'auto'): the rest of the open chunk runs on
    the torch core at its carried anchor, the chunks after it on the kernel; outputs, final state
    and gradients equal backend='torch' (float64, the kernel under Triton's interpreter on a CPU)."""
    from nlc.backends.triton import deep
    n = 45                                          # chunk 16 (the kernel's smallest tile), cut at 5
    x, depth, kw = mlp_leaves("titans", n, 2, seed=7)
    st0 = mem.MLPState(tuple(x[f"W{i + 1}"] for i in range(depth)), tuple(x[f"S{i + 1}"] for i in range(depth)))
    kw.update(chunk_size=16, read="current")
    with torch.no_grad():
        _, st = mlp_call(x, st0, 0, 5, **kw)
    assert st.offset == 5 and st.anchor is not None
    leaves = {n: t for n, t in x.items() if t is not None}
    want = mlp_call(x, st, 5, n, backend="torch", **kw)
    with mock.patch.object(deep, "chunk_mlp_memory", wraps=deep.chunk_mlp_memory) as kernel:
        got = mlp_call(x, st, 5, n, backend="triton", **kw)
    assert [c.args[0].shape[1] for c in kernel.call_args_list] == [16, 13]   # [16, 32), then the open [32, 45)
    assert_same_run("triton from offset 5", got, want, 1e-10)
    key = ("triton-offset",)
    g_want = grads_of((want[0], *flat(want[1])), leaves, key)
    assert_all("d", grads_of((got[0], *flat(got[1])), leaves, key), g_want, 1e-9)
    with mock.patch.object(dm, "pick", return_value="triton") as pick:
        auto = mlp_call(x, st, 5, n, backend="auto", **kw)
    assert pick.called                              # auto trains through the kernel where the backward
    assert_same_run("auto under autograd", auto, want, 1e-10)   # kernel takes the level (this one)
    assert_all("d", grads_of((auto[0], *flat(auto[1])), leaves, key), g_want, 1e-9)

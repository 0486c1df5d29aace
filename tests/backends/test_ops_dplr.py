"""generalized_delta's DPLR widening and the retention floor.

    h_t = diag(a_t) h_{t-1} - u_t (e_t^T h_{t-1}) + k_t w_t^T,    o_t = h_t^T (scale q_t)

chunk == recurrent == a hand-written loop, outputs, final states and the gradients of every input;
the widening reduces to the scalar path; a retention that underflows to 0 keeps both modes finite.
float64 on fresh random inputs from seeded generators (never zeros), as ``test_ops.py``.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nlc.backends.torch import ops

from .test_ops import _generator, assert_rel

DT = torch.float64
K_DIM, V_DIM = 6, 5           # K != V so a transposed state cannot pass

# case -> (per-channel a?, erase as "b" (along k), "ue" (general pair) or None)
CASES = {
    "per_channel_a": (True, None),
    "per_channel_a_b": (True, "b"),
    "erase": (False, "ue"),
    "both": (True, "ue"),
}


def make_inputs(case, B=2, T=13, H=2, K=K_DIM, V=V_DIM, h0=True, seed=0):
    """Leaf tensors: L2-normalised k and e, u = (0.1..0.9) x a unit vector, a in (0.5, 1)."""
    per_channel, erase = CASES[case]
    gen = _generator("dplr", case, B, T, H, K, V, h0, seed)

    def rand(*shape, lo, hi):
        return lo + (hi - lo) * torch.rand(*shape, generator=gen, dtype=DT)

    def unit(*shape):
        return F.normalize(torch.randn(*shape, generator=gen, dtype=DT), dim=-1)

    x = {"q": torch.randn(B, T, H, K, generator=gen, dtype=DT), "k": unit(B, T, H, K),
         "w": torch.randn(B, T, H, V, generator=gen, dtype=DT),
         "a": rand(B, T, H, *((K,) if per_channel else ()), lo=0.5, hi=1.0)}
    if erase == "b":
        x["b"] = rand(B, T, H, lo=0.05, hi=0.95)
    elif erase == "ue":
        x["u"] = rand(B, T, H, 1, lo=0.1, hi=0.9) * unit(B, T, H, K)
        x["e"] = unit(B, T, H, K)
    if h0:
        x["initial_state"] = torch.randn(B, H, K, V, generator=gen, dtype=DT)
    return {n: t.requires_grad_() for n, t in x.items()}


def call(x, **kwargs):
    erase = (x["u"], x["e"]) if "u" in x else None
    return ops.generalized_delta(x["q"], x["k"], x["w"], x["a"], x.get("b"), erase=erase,
                                 initial_state=x.get("initial_state"), **kwargs)


def run_with_grads(x, **kwargs):
    """(o, S, {input name: gradient}) of a random linear functional of o and S."""
    o, S = call(x, **kwargs)
    gen = _generator("cotangent", tuple(o.shape))
    loss = ((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum()
            + (S * torch.randn(S.shape, generator=gen, dtype=S.dtype)).sum())
    names = list(x)
    return o.detach(), S.detach(), dict(zip(names, torch.autograd.grad(loss, [x[n] for n in names])))


def naive_dplr(x, scale, floor=True):
    """The DPLR equation, one (batch, head) and one token at a time, matrices written out.
    ``floor=False`` takes a as given (no A_MIN floor)."""
    q, k, w, a = x["q"], x["k"], x["w"], x["a"]
    B, T, H, K = q.shape
    o = torch.zeros(B, T, H, w.shape[-1], dtype=q.dtype)
    S = torch.zeros(B, H, K, w.shape[-1], dtype=q.dtype)
    for bi in range(B):
        for hi in range(H):
            h = x["initial_state"][bi, hi].clone()
            for t in range(T):
                at = a[bi, t, hi]
                if floor:
                    at = torch.where((at >= 0) & (at < ops.A_MIN), torch.full_like(at, ops.A_MIN), at)
                D = torch.diag(at * torch.ones(K, dtype=q.dtype))        # diag(a_t)
                kt = k[bi, t, hi][:, None]
                if "b" in x:
                    ut, et = x["b"][bi, t, hi] * kt, kt
                elif "u" in x:
                    ut, et = x["u"][bi, t, hi][:, None], x["e"][bi, t, hi][:, None]
                else:
                    ut = et = torch.zeros(K, 1, dtype=q.dtype)
                h = (D - ut @ et.T) @ h + kt @ x["w"][bi, t, hi][None, :]
                o[bi, t, hi] = h.T @ (scale * q[bi, t, hi])
            S[bi, hi] = h
    return o, S


# ---------------------------------------------------------------------------------------------
# chunk == recurrent, outputs, final state and every gradient


@pytest.mark.parametrize("h0", [False, True], ids=["no_h0", "h0"])
@pytest.mark.parametrize("chunk_size", [1, 4, 16, 64])
@pytest.mark.parametrize("T", [1, 13, 37])
@pytest.mark.parametrize("case", list(CASES))
def test_dplr_chunk_equals_recurrent(case, T, chunk_size, h0):
    x = make_inputs(case, T=T, h0=h0)
    o_r, S_r, g_r = run_with_grads(x, mode="recurrent")
    o_c, S_c, g_c = run_with_grads(x, mode="chunk", chunk_size=chunk_size)
    assert_rel("o", o_c, o_r)
    assert_rel("final_state", S_c, S_r)
    for name in x:
        assert_rel(f"d{name}", g_c[name], g_r[name])


@pytest.mark.parametrize("case", list(CASES))
def test_dplr_float32_chunk_close_to_float64(case):
    """float32 is computed as given; the per-channel decays are exact per (r, i, c), not factored."""
    x = {n: t.detach() for n, t in make_inputs(case, T=50).items()}
    o64, S64 = call(x, mode="recurrent")
    o, S = call({n: t.float() for n, t in x.items()}, mode="chunk", chunk_size=16)
    assert o.dtype == S.dtype == torch.float32
    assert_rel("o", o.double(), o64, 1e-5)
    assert_rel("final_state", S.double(), S64, 1e-5)


@pytest.mark.parametrize("mode", ops.MODES)
@pytest.mark.parametrize("case", ["per_channel_a_b", "both"])
@pytest.mark.parametrize("T1", [1, 13])
def test_dplr_carried_state(case, mode, T1):
    x = {n: t.detach() for n, t in make_inputs(case, T=37).items()}
    whole_o, whole_S = call(x, mode=mode, chunk_size=8)
    first = {n: (t if n == "initial_state" else t[:, :T1]) for n, t in x.items()}
    o1, S1 = call(first, mode=mode, chunk_size=8)
    second = {n: t[:, T1:] for n, t in x.items() if n != "initial_state"}
    o2, S2 = call({**second, "initial_state": S1}, mode=mode, chunk_size=8)
    assert_rel("o", torch.cat([o1, o2], dim=1), whole_o, 1e-12)
    assert_rel("final_state", S2, whole_S, 1e-12)


@pytest.mark.parametrize("case", list(CASES))
def test_dplr_recurrent_matches_the_equation(case):
    x = {n: t.detach() for n, t in make_inputs(case, T=11).items()}
    o, S = call(x, mode="recurrent", scale=0.7)
    o_ref, S_ref = naive_dplr(x, 0.7)
    assert_rel("o", o, o_ref, 1e-12)
    assert_rel("final_state", S, S_ref, 1e-12)


# ---------------------------------------------------------------------------------------------
# the widening reduces to the scalar family


@pytest.mark.parametrize("mode", ops.MODES)
def test_broadcast_per_channel_a_equals_scalar_a(mode):
    x = {n: t.detach() for n, t in make_inputs("per_channel_a_b", T=21).items()}
    a = x["a"][..., 0]                                   # scalar a, then the same a per channel
    o_s, S_s = ops.generalized_delta(x["q"], x["k"], x["w"], a, x["b"],
                                     initial_state=x["initial_state"], mode=mode, chunk_size=8)
    o_c, S_c = ops.generalized_delta(x["q"], x["k"], x["w"], a[..., None].expand_as(x["k"]),
                                     x["b"], initial_state=x["initial_state"], mode=mode,
                                     chunk_size=8)
    assert_rel("o", o_c, o_s, 1e-12)
    assert_rel("final_state", S_c, S_s, 1e-12)


@pytest.mark.parametrize("mode", ops.MODES)
@pytest.mark.parametrize("per_channel", [False, True], ids=["scalar_a", "per_channel_a"])
def test_erase_bk_k_equals_b(mode, per_channel):
    x = {n: t.detach() for n, t in make_inputs("per_channel_a_b", T=21).items()}
    a = x["a"] if per_channel else x["a"][..., 0]
    q, k, w, b, h0 = x["q"], x["k"], x["w"], x["b"], x["initial_state"]
    o_b, S_b = ops.generalized_delta(q, k, w, a, b, initial_state=h0, mode=mode, chunk_size=8)
    o_e, S_e = ops.generalized_delta(q, k, w, a, None, erase=(b[..., None] * k, k),
                                     initial_state=h0, mode=mode, chunk_size=8)
    assert_rel("o", o_e, o_b, 1e-12)
    assert_rel("final_state", S_e, S_b, 1e-12)


# ---------------------------------------------------------------------------------------------
# a retention that underflows to 0: floored at A_MIN = e^-30 in both modes


def _with_zeros(case, T=21, chunk_size=8):
    """Inputs of ``case`` whose a is exactly 0 at about a quarter of its entries (fixed mask)."""
    x = make_inputs(case, T=T)
    mask = torch.rand(x["a"].shape, generator=_generator("zeros", case)) < 0.25
    with torch.no_grad():
        x["a"].masked_fill_(mask, 0.0)
    assert bool((x["a"] == 0).any())
    return x


@pytest.mark.parametrize("case", ["per_channel_a_b", "both", "erase", "scalar_b"])
def test_zero_retention_chunk_is_finite_and_equals_recurrent(case):
    if case == "scalar_b":              # the scalar fast path (chunk.py)
        x = _with_zeros("per_channel_a_b")
        x = {n: (t[..., 0].detach().requires_grad_() if n == "a" else t) for n, t in x.items()}
    else:
        x = _with_zeros(case)
    o_r, S_r, g_r = run_with_grads(x, mode="recurrent")
    o_c, S_c, g_c = run_with_grads(x, mode="chunk", chunk_size=8)
    assert_rel("o", o_c, o_r)
    assert_rel("final_state", S_c, S_r)
    for name in x:                      # assert_rel also checks finiteness
        assert_rel(f"d{name}", g_c[name], g_r[name])
    assert bool((g_c["a"][x["a"] == 0] == 0).all()), "gradient at a = 0 must be 0 (floored)"


@pytest.mark.parametrize("case", ["per_channel_a_b", "both"])
def test_softplus_decay_underflow(case):
    """A realistic decay a = exp(-softplus(z)) with z ~ 1e3 underflows to exactly 0."""
    x = make_inputs(case, T=21)
    gen = _generator("softplus", case)
    z = torch.randn(x["a"].shape, generator=gen, dtype=DT)
    z = torch.where(torch.rand(z.shape, generator=gen) < 0.3, 1e3 + z, z).requires_grad_()
    results = {}
    for mode in ops.MODES:
        a = torch.exp(-F.softplus(z))
        assert bool((a == 0).any())
        o, S = call({**x, "a": a}, mode=mode, chunk_size=8)
        loss = o.square().sum() + S.sum()
        grads = torch.autograd.grad(loss, [z, x["q"], x["k"], x["w"]])
        results[mode] = (o.detach(), S.detach(), grads)
    (o_r, S_r, g_r), (o_c, S_c, g_c) = results["recurrent"], results["chunk"]
    assert_rel("o", o_c, o_r)
    assert_rel("final_state", S_c, S_r)
    for name, gc, gr in zip(["dz", "dq", "dk", "dw"], g_c, g_r):
        assert_rel(name, gc, gr)


@pytest.mark.parametrize("case", ["per_channel_a_b", "both", "erase"])
def test_floor_changes_the_result_negligibly(case):
    x = {n: t.detach() for n, t in _with_zeros(case).items()}
    o, S = call(x, mode="chunk", chunk_size=8, scale=0.7)
    o_ref, S_ref = naive_dplr(x, 0.7, floor=False)       # a = 0 taken literally
    assert_rel("o", o, o_ref, 1e-12)
    assert_rel("final_state", S, S_ref, 1e-12)


def test_gated_delta_rule_log_decay_underflow():
    gen = _generator("gated underflow")
    B, T, H, K, V = 2, 17, 2, K_DIM, V_DIM
    q = torch.randn(B, T, H, K, generator=gen, dtype=DT)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen, dtype=DT), dim=-1)
    v = torch.randn(B, T, H, V, generator=gen, dtype=DT)
    beta = torch.rand(B, T, H, generator=gen, dtype=DT)
    g = -torch.rand(B, T, H, generator=gen, dtype=DT)
    g = torch.where(torch.rand(g.shape, generator=gen) < 0.3, g - 1e3, g).requires_grad_()
    h0 = torch.randn(B, H, K, V, generator=gen, dtype=DT)
    res = {}
    for mode in ops.MODES:
        o, S = ops.gated_delta_rule(q, k, v, beta, g, initial_state=h0, mode=mode, chunk_size=4)
        res[mode] = (o, S, torch.autograd.grad(o.square().sum() + S.sum(), g)[0])
    for i, name in enumerate(["o", "final_state", "dg"]):
        assert_rel(name, res["chunk"][i].detach(), res["recurrent"][i].detach())
    assert bool((res["chunk"][2][g < ops.LOG_A_MIN] == 0).all())


def test_negative_retention_recurrent_is_not_floored():
    """Recurrent mode takes any a; only [0, A_MIN) is floored, -1e-20 stays as given."""
    x = {n: t.detach() for n, t in make_inputs("both", T=9).items()}
    x["a"][0, 3, 1, 2] = -1e-20
    x["a"][1, 5, 0, 0] = -0.5
    o, S = call(x, mode="recurrent", scale=0.7)
    o_ref, S_ref = naive_dplr(x, 0.7)
    assert_rel("o", o, o_ref, 1e-12)
    assert_rel("final_state", S, S_ref, 1e-12)


# ---------------------------------------------------------------------------------------------
# bad arguments

B_, T_, H_, K_, V_ = 2, 5, 3, 4, 6
_gen = _generator("dplr bad arguments")
_q, _k = torch.randn(B_, T_, H_, K_, generator=_gen), torch.randn(B_, T_, H_, K_, generator=_gen)
_w, _s = torch.randn(B_, T_, H_, V_, generator=_gen), torch.rand(B_, T_, H_, generator=_gen)
_a4 = torch.rand(B_, T_, H_, K_, generator=_gen)

BAD = [
    ((_q, _k, _w, _a4[..., :3], _s), {},
     r"a must have shape \[B, T, H\] = \[2, 5, 3\] \(one retention per head\) or "
     r"\[B, T, H, K\] = \[2, 5, 3, 4\] \(one per key channel\), got \(2, 5, 3, 3\)"),
    ((_q, _k, _w, _s[:, :4]), {}, r"a must have shape \[B, T, H\] = \[2, 5, 3\]"),
    ((_q, _k, _w, _a4, _s), {"erase": (_q, _k)}, r"b and erase are exclusive"),
    ((_q, _k, _w, _a4), {"erase": _q}, r"erase must be a pair \(u, e\) of \[B, T, H, K\] tensors"),
    ((_q, _k, _w, _a4), {"erase": (_q, _k, _k)}, r"erase must be a pair .* of length 3"),
    ((_q, _k, _w, _a4), {"erase": (_q[..., :2], _k)},
     r"erase\[0\] \(u\) must have shape \[B, T, H, K\] = \[2, 5, 3, 4\], got \(2, 5, 3, 2\)"),
    ((_q, _k, _w, _s), {"erase": (_q, _k[:, :1])},
     r"erase\[1\] \(e\) must have shape \[B, T, H, K\] = \[2, 5, 3, 4\], got \(2, 1, 3, 4\)"),
    ((_q, _k, _w, _s), {"erase": (_q, 0.5)}, r"erase\[1\] \(e\) must be a torch.Tensor, got float"),
    ((_q, _k, _w, _a4 - 1.0), {"mode": "chunk"}, r"needs a >= 0"),
]


@pytest.mark.parametrize("args, kwargs, message", BAD, ids=[m[:24] for *_, m in BAD])
def test_dplr_bad_arguments_raise_value_error(args, kwargs, message):
    with pytest.raises(ValueError, match=rf"^generalized_delta: .*{message}"):
        ops.generalized_delta(*args, **kwargs)

"""The torch backend's functional ops: chunk == recurrent == the equations, outputs and gradients.

Every comparison is float64 on fresh random inputs from a seeded generator (never zeros), checked
by name with a relative max error: ``max|x - y| / max(max|y|, 1)``.
"""
from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F

from .numerics import assert_rel as _assert_rel

from nlc.backends.torch import ops

DT = torch.float64
TOL = 1e-10                   # float64, chunk vs recurrent (outputs and gradients)
K_DIM, V_DIM = 8, 6           # K != V so a transposed state cannot pass

# op name -> names of its per-op arguments, in call order after (q, k)
ARGS = {
    "linear_attn": ("v",),
    "delta_rule": ("v", "beta"),
    "gated_delta_rule": ("v", "beta", "g"),
    "generalized_delta": ("w", "a", "b"),
}


def _generator(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def make_inputs(op, B=2, T=13, H=2, K=K_DIM, V=V_DIM, h0=True, seed=0, dtype=DT):
    """Leaf tensors (requires_grad) for ``op``: L2-normalised keys, beta and b in (0, 1),
    g a negative log-decay, a in (0.5, 1]."""
    gen = _generator(op, B, T, H, K, V, h0, seed)

    def rand(*shape, lo=0.0, hi=1.0):
        return lo + (hi - lo) * torch.rand(*shape, generator=gen, dtype=dtype)

    x = {
        "q": torch.randn(B, T, H, K, generator=gen, dtype=dtype),
        "k": F.normalize(torch.randn(B, T, H, K, generator=gen, dtype=dtype), dim=-1),
    }
    for name in ARGS[op]:
        if name in ("v", "w"):
            x[name] = torch.randn(B, T, H, V, generator=gen, dtype=dtype)
        elif name in ("beta", "b"):
            x[name] = rand(B, T, H, lo=0.05, hi=0.95)
        elif name == "g":
            x[name] = rand(B, T, H, lo=-0.7, hi=-0.01)
        elif name == "a":
            x[name] = rand(B, T, H, lo=0.5, hi=1.0)
    if h0:
        x["initial_state"] = torch.randn(B, H, K, V, generator=gen, dtype=dtype)
    return {name: t.requires_grad_() for name, t in x.items()}


def call(op, x, **kwargs):
    args = [x["q"], x["k"], *(x[name] for name in ARGS[op])]
    return getattr(ops, op)(*args, initial_state=x.get("initial_state"), **kwargs)


def run_with_grads(op, x, **kwargs):
    """(o, S, {input name: gradient}) of a random linear functional of o and S."""
    o, S = call(op, x, **kwargs)
    gen = _generator("cotangent", op, tuple(o.shape))
    do = torch.randn(o.shape, generator=gen, dtype=o.dtype).to(o.device)
    dS = torch.randn(S.shape, generator=gen, dtype=S.dtype).to(S.device)
    loss = (o * do).sum() + (S * dS).sum()
    names = list(x)
    grads = torch.autograd.grad(loss, [x[n] for n in names])
    return o.detach().cpu(), S.detach().cpu(), {n: g.cpu() for n, g in zip(names, grads)}


def assert_rel(name, x, y, tol=TOL):
    _assert_rel(name, x, y, tol)


# ---------------------------------------------------------------------------------------------
# chunk == recurrent


@pytest.mark.parametrize("h0", [False, True], ids=["no_h0", "h0"])
@pytest.mark.parametrize("H", [1, 3])
@pytest.mark.parametrize("chunk_size", [1, 4, 16, 64])
@pytest.mark.parametrize("T", [1, 7, 33, 50])
@pytest.mark.parametrize("op", list(ARGS))
def test_chunk_equals_recurrent(op, T, chunk_size, H, h0):
    x = make_inputs(op, T=T, H=H, h0=h0)
    o_r, S_r, g_r = run_with_grads(op, x, mode="recurrent")
    o_c, S_c, g_c = run_with_grads(op, x, mode="chunk", chunk_size=chunk_size)
    assert_rel("o", o_c, o_r)
    assert_rel("final_state", S_c, S_r)
    for name in x:
        assert_rel(f"d{name}", g_c[name], g_r[name])


def test_chunk_retention_above_one():
    """a > 1 (growing memory) is outside the stable range but must still be exact."""
    x = make_inputs("generalized_delta", T=33, H=2)
    with torch.no_grad():
        x["a"].copy_(1.0 + 0.05 * x["a"])
    o_r, S_r, g_r = run_with_grads("generalized_delta", x, mode="recurrent")
    o_c, S_c, g_c = run_with_grads("generalized_delta", x, mode="chunk", chunk_size=16)
    assert_rel("o", o_c, o_r, 1e-9)
    assert_rel("final_state", S_c, S_r, 1e-9)
    for name in x:
        assert_rel(f"d{name}", g_c[name], g_r[name], 1e-9)


@pytest.mark.parametrize("op", list(ARGS))
def test_float32_chunk_close_to_recurrent(op):
    x = make_inputs(op, T=50, H=2, dtype=torch.float32)
    o_r, S_r = call(op, x, mode="recurrent")
    o_c, S_c = call(op, x, mode="chunk", chunk_size=16)
    assert o_c.dtype == S_c.dtype == torch.float32
    assert_rel("o", o_c.detach(), o_r.detach(), 1e-5)
    assert_rel("final_state", S_c.detach(), S_r.detach(), 1e-5)


@pytest.mark.parametrize("mode", ops.MODES)
def test_half_inputs_are_computed_in_float32(mode):
    x = make_inputs("gated_delta_rule", T=9, dtype=torch.bfloat16)
    o, S = call("gated_delta_rule", x, mode=mode, chunk_size=4)
    assert o.dtype == torch.bfloat16 and S.dtype == torch.float32
    ref, _ = call("gated_delta_rule", {n: t.detach().double() for n, t in x.items()}, mode=mode)
    assert_rel("o", o.double(), ref, 2e-2)


# ---------------------------------------------------------------------------------------------
# the wrappers are generalized_delta with the documented (a, b, w)


def derived_abw(op, x):
    v = x["v"]
    one = torch.ones(v.shape[:3], dtype=v.dtype)
    if op == "linear_attn":
        return one, torch.zeros_like(one), v
    if op == "delta_rule":
        return one, x["beta"], x["beta"][..., None] * v
    decay = x["g"].exp()
    return decay, decay * x["beta"], x["beta"][..., None] * v


@pytest.mark.parametrize("mode", ops.MODES)
@pytest.mark.parametrize("op", ["linear_attn", "delta_rule", "gated_delta_rule"])
def test_wrappers_are_generalized_delta(op, mode):
    x = make_inputs(op, T=21, H=3)
    o, S = call(op, x, mode=mode, chunk_size=8)
    a, b, w = derived_abw(op, x)
    o_g, S_g = ops.generalized_delta(x["q"], x["k"], w, a, b, initial_state=x["initial_state"],
                                     mode=mode, chunk_size=8)
    assert_rel("o", o.detach(), o_g.detach(), 1e-12)
    assert_rel("final_state", S.detach(), S_g.detach(), 1e-12)


# ---------------------------------------------------------------------------------------------
# carried state: [0:T1] then [T1:T] with the state carried == [0:T] at once


@pytest.mark.parametrize("mode", ops.MODES)
@pytest.mark.parametrize("op", list(ARGS))
@pytest.mark.parametrize("T1", [1, 21])
def test_carried_state(op, mode, T1):
    x = {n: t.detach() for n, t in make_inputs(op, T=50, H=2).items()}
    whole_o, whole_S = call(op, x, mode=mode, chunk_size=16)
    first = {n: (t if n == "initial_state" else t[:, :T1]) for n, t in x.items()}
    o1, S1 = call(op, first, mode=mode, chunk_size=16)
    second = {n: t[:, T1:] for n, t in x.items() if n != "initial_state"}
    o2, S2 = call(op, {**second, "initial_state": S1}, mode=mode, chunk_size=16)
    assert_rel("o", torch.cat([o1, o2], dim=1), whole_o, 1e-12)
    assert_rel("final_state", S2, whole_S, 1e-12)


# ---------------------------------------------------------------------------------------------
# recurrent == the rules as written in the papers (memory M is V x K; h = M^T)


def naive_memory(op, x, scale):
    q, k = x["q"], x["k"]
    B, T, H, K = q.shape
    V = x["w" if op == "generalized_delta" else "v"].shape[-1]
    o = torch.zeros(B, T, H, V, dtype=q.dtype)
    S = torch.zeros(B, H, K, V, dtype=q.dtype)
    eye = torch.eye(K, dtype=q.dtype)
    for bi in range(B):
        for hi in range(H):
            M = x["initial_state"][bi, hi].T.clone()
            for t in range(T):
                kt = k[bi, t, hi][:, None]                      # column vectors
                s = {n: x[n][bi, t, hi] for n in ARGS[op]}
                if op == "linear_attn":                         # M += v k^T
                    M = M + s["v"][:, None] @ kt.T
                elif op == "delta_rule":                        # M (I - beta k k^T) + beta v k^T
                    M = M @ (eye - s["beta"] * kt @ kt.T) + s["beta"] * s["v"][:, None] @ kt.T
                elif op == "gated_delta_rule":                  # alpha M (I - beta k k^T) + beta v k^T
                    M = (s["g"].exp() * M @ (eye - s["beta"] * kt @ kt.T)
                         + s["beta"] * s["v"][:, None] @ kt.T)
                else:                                           # M (a I - b k k^T) + w k^T
                    M = M @ (s["a"] * eye - s["b"] * kt @ kt.T) + s["w"][:, None] @ kt.T
                o[bi, t, hi] = M @ (scale * q[bi, t, hi])
            S[bi, hi] = M.T
    return o, S


@pytest.mark.parametrize("op", list(ARGS))
def test_recurrent_matches_the_equations(op):
    x = {n: t.detach() for n, t in make_inputs(op, B=2, T=11, H=2).items()}
    o, S = call(op, x, mode="recurrent", scale=0.7)
    o_ref, S_ref = naive_memory(op, x, 0.7)
    assert_rel("o", o, o_ref, 1e-12)
    assert_rel("final_state", S, S_ref, 1e-12)


def test_default_scale_and_no_final_state():
    x = {n: t.detach() for n, t in make_inputs("delta_rule").items()}
    o, S = call("delta_rule", x, output_final_state=False)
    assert S is None
    o_ref, _ = naive_memory("delta_rule", x, K_DIM ** -0.5)
    assert_rel("o", o, o_ref, 1e-12)


@pytest.mark.parametrize("mode", ops.MODES)
def test_empty_sequence_returns_the_initial_state(mode):
    x = {n: t.detach() for n, t in make_inputs("gated_delta_rule", T=0).items()}
    o, S = call("gated_delta_rule", x, mode=mode)
    assert o.shape == (2, 0, 2, V_DIM)
    assert torch.equal(S, x["initial_state"])


# ---------------------------------------------------------------------------------------------
# flash-linear-attention's own naive references (float32 inside fla, hence the tolerance)


def test_matches_flash_linear_attention_naive():
    pytest.importorskip("fla", reason="flash-linear-attention (fla) is not installed: "
                                      "cross-check against its naive references skipped")
    from fla.ops.delta_rule.naive import delta_rule_recurrence
    from fla.ops.gated_delta_rule.naive import (naive_chunk_gated_delta_rule,
                                                naive_recurrent_gated_delta_rule)
    from fla.ops.linear_attn.naive import naive_recurrent_linear_attn

    def f32(x):
        return {n: t.detach().float() for n, t in x.items()}

    tol = 1e-4
    x = {n: t.detach() for n, t in make_inputs("linear_attn", T=37, H=2).items()}
    o, S = call("linear_attn", x, mode="chunk", chunk_size=16)
    y = f32(x)
    o_f, S_f = naive_recurrent_linear_attn(y["q"], y["k"], y["v"], initial_state=y["initial_state"],
                                           output_final_state=True)
    assert_rel("linear_attn o", o_f.double(), o, tol)
    assert_rel("linear_attn S", S_f.double(), S, tol)

    x = {n: t.detach() for n, t in make_inputs("delta_rule", T=37, H=2).items()}
    o, S = call("delta_rule", x, mode="chunk", chunk_size=16)
    y = {n: (t if n == "initial_state" else t.transpose(1, 2).contiguous()) for n, t in f32(x).items()}
    o_f, S_f = delta_rule_recurrence(y["q"], y["k"], y["v"], y["beta"],
                                     initial_state=y["initial_state"], output_final_state=True)
    assert_rel("delta_rule o", o_f.transpose(1, 2).double(), o, tol)
    assert_rel("delta_rule S", S_f.double(), S, tol)

    x = {n: t.detach() for n, t in make_inputs("gated_delta_rule", T=37, H=2).items()}
    o, S = call("gated_delta_rule", x, mode="chunk", chunk_size=16)
    y = f32(x)
    o_f, S_f = naive_recurrent_gated_delta_rule(y["q"], y["k"], y["v"], y["beta"], y["g"],
                                                initial_state=y["initial_state"],
                                                output_final_state=True)
    assert_rel("gated_delta_rule o (fla recurrent)", o_f.double(), o, tol)
    assert_rel("gated_delta_rule S (fla recurrent)", S_f.double(), S, tol)
    o_f, S_f = naive_chunk_gated_delta_rule(y["q"], y["k"], y["v"], y["g"], y["beta"],
                                            chunk_size=16, initial_state=y["initial_state"],
                                            output_final_state=True)
    assert_rel("gated_delta_rule o (fla chunk)", o_f.double(), o, tol)
    assert_rel("gated_delta_rule S (fla chunk)", S_f.double(), S, tol)


# ---------------------------------------------------------------------------------------------
# bad arguments: ValueError naming the argument and the expected shape

B_, T_, H_, K_, V_ = 2, 5, 3, 4, 6
_gen = _generator("bad arguments")
_q, _k = torch.randn(B_, T_, H_, K_, generator=_gen), torch.randn(B_, T_, H_, K_, generator=_gen)
_v, _s = torch.randn(B_, T_, H_, V_, generator=_gen), torch.rand(B_, T_, H_, generator=_gen)

BAD = [
    ("linear_attn", (_q[0], _k, _v), {}, r"q must be 4-D \[B, T, H, K\], got shape \(5, 3, 4\)"),
    ("linear_attn", (_q, _k[..., :3], _v), {}, r"k must have shape \[B, T, H, K\] = \[2, 5, 3, 4\]"),
    ("delta_rule", (_q, _k, _v[:, :4], _s), {}, r"v must have shape \[B, T, H, V\] = \[2, 5, 3, V\]"),
    ("delta_rule", (_q, _k, _v, _s[..., 0]), {}, r"beta must have shape \[B, T, H\] = \[2, 5, 3\]"),
    ("gated_delta_rule", (_q, _k, _v, _s, _s[..., None]), {}, r"g must have shape \[B, T, H\]"),
    ("generalized_delta", (_q, _k, _v[:, :, :2], _s, _s), {}, r"w must have shape \[B, T, H, V\]"),
    ("generalized_delta", (_q, _k, _v, _s, _s[:1]), {}, r"b must have shape \[B, T, H\]"),
    ("linear_attn", (_q, _k, _v), {"initial_state": torch.zeros(B_, H_, V_, K_)},
     r"initial_state must have shape \[B, H, K, V\] = \[2, 3, 4, 6\], got \(2, 3, 6, 4\)"),
    ("linear_attn", (_q, _k, _v), {"mode": "fused"}, r"mode must be one of \('chunk', 'recurrent'\)"),
    ("linear_attn", (_q, _k, _v), {"chunk_size": 0}, r"chunk_size must be an int >= 1, got 0"),
    ("linear_attn", (_q, _k, _v), {"scale": "big"}, r"scale must be a finite number"),
    ("linear_attn", (_q.long(), _k, _v), {}, r"q must be a floating-point tensor"),
    ("delta_rule", (_q, _k, _v, 0.5), {}, r"beta must be a torch.Tensor, got float"),
    ("generalized_delta", (_q, _k, _v, _s - 1.0, _s), {"mode": "chunk"}, r"needs a >= 0"),
]


@pytest.mark.parametrize("op, args, kwargs, message", BAD, ids=[m[:24] for *_, m in BAD])
def test_bad_arguments_raise_value_error(op, args, kwargs, message):
    with pytest.raises(ValueError, match=rf"^{op}: .*{message}"):
        getattr(ops, op)(*args, **kwargs)


def test_chunk_zero_retention_is_floored_not_refused():
    """a = 0 (an underflowed decay) is floored at A_MIN in both modes; only a < 0 is refused."""
    x = make_inputs("generalized_delta", T=13, H=2)
    with torch.no_grad():
        x["a"][:, ::3] = 0.0
    o_r, S_r, g_r = run_with_grads("generalized_delta", x, mode="recurrent")
    o_c, S_c, g_c = run_with_grads("generalized_delta", x, mode="chunk", chunk_size=4)
    assert_rel("o", o_c, o_r)
    assert_rel("final_state", S_c, S_r)
    for name in x:
        assert_rel(f"d{name}", g_c[name], g_r[name])

"""Skeleton 1 on Triton (the generalized delta rule, chunked) against the torch backend.

On this CPU the kernels run under Triton's interpreter (conftest sets TRITON_INTERPRET=1), so
shapes are tiny and odd: T not a multiple of the chunk, several heads, an initial state. float64
(the interpreter computes it exactly as written) holds Triton to the torch chunked form at 1e-10;
float32 holds it to the float64 recurrent oracle at the issue's 1e-4 (outputs, states) and 1e-3
(gradients). Each call runs every forward and backward kernel of its variant.

``NLC_TEST_DEVICE=cuda`` runs the same tests on a GPU, compiled (benchmarks/gpu_check.sh).
"""
from __future__ import annotations

import ast
import os
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from .test_ops import ARGS, _generator, make_inputs, run_with_grads
from .numerics import assert_rel, rel_err

from nlc.backends.torch import ops
from nlc.backends.triton import diag, template
from nlc.backends.triton.delta import variant

# each op is one variant of the skeleton: (DECAY, ERASE)
DEVICE = os.environ.get("NLC_TEST_DEVICE", "cpu")


def dev(x: dict) -> dict:
    """The leaves of ``x`` on the test device (still leaves)."""
    return {n: t.detach().to(DEVICE).requires_grad_() for n, t in x.items()}


VARIANTS = {"linear_attn": (False, False), "delta_rule": (False, True),
            "gated_delta_rule": (True, True), "generalized_delta": (True, True)}


@pytest.mark.parametrize("op", list(ARGS))
def test_triton_equals_torch_float64(op):
    assert_triton_equals_torch(op, dev(make_inputs(op, B=2, T=37, H=3, K=16, V=20, seed=1)), 16)


def assert_triton_equals_torch(op, x, chunk_size, tol=1e-10):
    """Output, final state and every input's gradient of `op` on Triton and on torch."""
    o_t, S_t, g_t = run_with_grads(op, x, chunk_size=chunk_size, backend="triton")
    o_r, S_r, g_r = run_with_grads(op, x, chunk_size=chunk_size, backend="torch")
    assert_rel("o", o_t, o_r, tol)
    assert_rel("final_state", S_t, S_r, tol)
    for name in x:
        assert_rel(f"d{name}", g_t[name], g_r[name], tol)


@pytest.mark.parametrize("op", ["linear_attn", "delta_rule", "gated_delta_rule"])
def test_wide_keys_and_values_at_chunk_64_float64(op):
    """K = 72, V = 40 (with a 128-wide K the kernels take both in blocks of 32: three key blocks
    and two value blocks, the last ones ragged) at chunk 64 (the blocked inverse merges 16 -> 32
    -> 64), two chunks: every block loop and mask of the kernels against torch at 1e-10."""
    assert_triton_equals_torch(op, dev(make_inputs(op, B=1, T=70, H=2, K=72, V=40, seed=11)), 64)


def test_generalized_delta_without_erase_or_state():
    """a present, b absent (RetNet's form), no initial state; chunk 32 with T < one chunk."""
    gen = _generator("no-erase")
    B, T, H, K, V = 1, 29, 2, 16, 16
    q, k = (torch.randn(B, T, H, K, generator=gen, dtype=torch.float64) for _ in range(2))
    w = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    a = 0.5 + 0.5 * torch.rand(B, T, H, generator=gen, dtype=torch.float64)
    leaves = [t.to(DEVICE).requires_grad_() for t in (q, k, w, a)]
    q, k, w, a = leaves
    outs = {}
    for backend in ("triton", "torch"):
        o, S = ops.generalized_delta(q, k, w, a, None, chunk_size=32, backend=backend)
        loss = (o * o.detach().cos()).sum() + S.square().sum()
        outs[backend] = (o, S, torch.autograd.grad(loss, leaves))
    (o_t, S_t, g_t), (o_r, S_r, g_r) = outs["triton"], outs["torch"]
    assert_rel("o", o_t, o_r, 1e-10)
    assert_rel("S", S_t, S_r, 1e-10)
    for name, gt, gr in zip("qkwa", g_t, g_r):
        assert_rel(f"d{name}", gt, gr, 1e-10)


@pytest.mark.parametrize("op", ["delta_rule", "gated_delta_rule"])
def test_triton_float32_against_float64_oracle(op):
    """The issue's tolerances: forward 1e-4, gradients 1e-3, float32 against the float64 loop."""
    x64 = make_inputs(op, B=2, T=45, H=2, K=32, V=16, seed=2)
    x32 = dev({n: t.detach().float() for n, t in x64.items()})
    gen = _generator("cotangents", op)
    do = torch.randn(2, 45, 2, 16, generator=gen, dtype=torch.float64)
    dS = torch.randn(2, 2, 32, 16, generator=gen, dtype=torch.float64)
    res = {}
    for name, x, kw in (("triton", x32, dict(chunk_size=16, backend="triton")),
                        ("oracle", x64, dict(mode="recurrent"))):
        args = [x["q"], x["k"], *(x[n] for n in ARGS[op])]
        o, S = getattr(ops, op)(*args, initial_state=x["initial_state"], **kw)
        loss = (o * do.to(o)).sum() + (S * dS.to(S)).sum()
        res[name] = (o.cpu(), S.cpu(), {n: g.cpu() for n, g in zip(x, torch.autograd.grad(loss, list(x.values())))})
    (o_t, S_t, g_t), (o_r, S_r, g_r) = res["triton"], res["oracle"]
    assert o_t.dtype == torch.float32
    assert_rel("o", o_t.double(), o_r, 1e-4)
    assert_rel("final_state", S_t.double(), S_r, 1e-4)
    for name in x64:
        assert_rel(f"d{name}", g_t[name].double(), g_r[name], 1e-3)


def test_unnormalised_keys_at_the_largest_chunk():
    """The triangular solve grows with the chunk when b ||k||^2 is large. Keys of norm up to 1.35
    and b up to 0.95 (b ||k||^2 < 1.75 < 2: the recurrence itself stays bounded) at chunk 64,
    float32: the kernel's blocked inverse keeps the issue's tolerances."""
    gen = _generator("unnormalised")
    B, T, H, K, V = 1, 70, 2, 16, 16
    q = torch.randn(B, T, H, K, generator=gen, dtype=torch.float64)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen, dtype=torch.float64), dim=-1)
    k = k * (0.6 + 0.75 * torch.rand(B, T, H, 1, generator=gen, dtype=torch.float64))
    v = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    beta = 0.05 + 0.9 * torch.rand(B, T, H, generator=gen, dtype=torch.float64)
    g = -0.3 * torch.rand(B, T, H, generator=gen, dtype=torch.float64)
    x64 = [t.requires_grad_() for t in (q, k, v, beta, g)]
    x32 = [t.detach().float().to(DEVICE).requires_grad_() for t in x64]
    o_r, S_r = ops.gated_delta_rule(*x64, mode="recurrent")
    o_t, S_t = ops.gated_delta_rule(*x32, chunk_size=64, backend="triton")
    assert_rel("o", o_t.double().cpu(), o_r, 1e-4)
    assert_rel("final_state", S_t.double().cpu(), S_r, 1e-4)
    g_r = torch.autograd.grad(o_r.sum() + S_r.sum(), x64)
    g_t = torch.autograd.grad(o_t.sum() + S_t.sum(), x32)
    for name, gt, gr in zip(("q", "k", "v", "beta", "g"), g_t, g_r):
        assert_rel(f"d{name}", gt.double().cpu(), gr, 1e-3)


def test_bfloat16_inputs_stay_close_to_the_float32_reference():
    x32 = dev(make_inputs("gated_delta_rule", B=1, T=33, H=2, K=16, V=16, seed=3, dtype=torch.float32))
    xb = {n: t.detach().bfloat16().requires_grad_() for n, t in x32.items()}
    o_b, _ = ops.gated_delta_rule(xb["q"], xb["k"], xb["v"], xb["beta"], xb["g"],
                                  initial_state=xb["initial_state"], backend="triton")
    o_r, _ = ops.gated_delta_rule(x32["q"], x32["k"], x32["v"], x32["beta"], x32["g"],
                                  initial_state=x32["initial_state"], backend="torch")
    assert o_b.dtype == torch.bfloat16
    rmse = ((o_b.float() - o_r).square().mean().sqrt() / o_r.square().mean().sqrt()).item()
    assert rmse < 5e-3, f"bfloat16 relative RMSE {rmse:.2e}"


@pytest.mark.parametrize("decay,erase", [(False, False), (True, True)])
def test_bfloat16_core_stays_close_to_the_float32_core(decay, erase):
    """The Triton core called with bfloat16 tensors (its 16-bit path: bfloat16 loads; on a GPU
    the products of the inputs take bfloat16 operands and the rest TF32, under the interpreter
    they run in float32, see delta.launch) against the torch core in float32 on the same values:
    relative RMSE under 5e-3 for the output, the final state and every gradient."""
    from nlc.backends.torch.chunk import chunk_generalized_delta as torch_core
    from nlc.backends.triton.delta import chunk_generalized_delta as triton_core
    gen = _generator("bf16-core", decay, erase)
    B, T, H, K, V = 1, 50, 2, 40, 24
    x = dict(q=torch.randn(B, T, H, K, generator=gen) * K ** -0.5,
             k=F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1),
             w=torch.randn(B, T, H, V, generator=gen),
             h0=torch.randn(B, H, K, V, generator=gen))
    if decay:
        x["log_a"] = -0.2 * torch.rand(B, T, H, generator=gen)
    if erase:
        x["b"] = torch.rand(B, T, H, generator=gen)
    xb = {n: t.bfloat16().float() for n, t in x.items()}          # the same values in both runs
    do = torch.randn(B, T, H, V, generator=gen)
    dS = torch.randn(B, H, K, V, generator=gen)
    res = {}
    for name, core, dtype in (("triton", triton_core, torch.bfloat16), ("torch", torch_core, torch.float32)):
        leaves = {n: t.to(DEVICE, dtype).requires_grad_() for n, t in xb.items()}
        o, S = core(leaves["q"], leaves["k"], leaves["w"], leaves.get("log_a"), leaves.get("b"), leaves["h0"], 32)
        loss = (o.float() * do.to(DEVICE)).sum() + (S.float() * dS.to(DEVICE)).sum()
        grads = torch.autograd.grad(loss, list(leaves.values()))
        res[name] = [o, S, *grads]
    names = ["o", "final_state", *(f"d{n}" for n in xb)]
    for n, a, r in zip(names, res["triton"], res["torch"]):
        a, r = a.float().cpu(), r.float().cpu()
        rmse = ((a - r).square().mean().sqrt() / r.square().mean().sqrt()).item()
        assert rmse < 5e-3, f"{n}: bfloat16 relative RMSE {rmse:.2e}"


def test_ops_pass_16bit_inputs_to_the_kernels(monkeypatch):
    """The ops hand bfloat16 q, k and the write (q scaled and beta v formed in float32, each rounded
    once) to the Triton core in bfloat16, the rest in float32; the output and every gradient stay
    within the bfloat16 bound of the float32 torch op on the same values (under the interpreter
    the products run in float32; on a GPU in bfloat16 with float32 accumulation)."""
    from nlc.backends.triton import delta
    seen = []
    core = delta.chunk_generalized_delta
    monkeypatch.setattr(delta, "chunk_generalized_delta",
                        lambda *a: seen.append([None if t is None else t.dtype for t in a[:6]]) or core(*a))
    x = make_inputs("gated_delta_rule", B=1, T=37, H=2, K=32, V=16, seed=8)
    names = ("q", "k", "v", "beta", "g", "initial_state")
    x = {n: x[n].float().bfloat16().float() for n in names}        # values a bfloat16 holds exactly
    do = torch.randn(1, 37, 2, 16, generator=torch.Generator().manual_seed(9))
    res = {}
    for label, dtype, backend in (("triton", torch.bfloat16, "triton"), ("torch", torch.float32, "torch")):
        leaves = {n: x[n].to(DEVICE, dtype if n in ("q", "k", "v") else torch.float32).requires_grad_() for n in names}
        o, S = ops.gated_delta_rule(*(leaves[n] for n in names[:5]), initial_state=leaves["initial_state"],
                                    output_final_state=True, backend=backend)
        loss = (o.float() * do.to(DEVICE)).sum() + S.float().sum()
        res[label] = [o, S, *torch.autograd.grad(loss, list(leaves.values()))]
    assert seen and seen[0][:3] == [torch.bfloat16] * 3 and torch.bfloat16 not in seen[0][3:], seen
    assert res["triton"][0].dtype == torch.bfloat16
    for n, a, r in zip(["o", "S", *names], res["triton"], res["torch"]):
        a, r = a.float().cpu(), r.float().cpu()
        rmse = ((a - r).square().mean().sqrt() / r.square().mean().sqrt()).item()
        assert rmse < 5e-3, f"{n}: relative RMSE {rmse:.2e}"


def test_only_the_final_state_or_only_the_output_carries_gradient():
    """A None cotangent (an output that the loss does not use) is a zero, not an error."""
    x = dev(make_inputs("gated_delta_rule", B=1, T=20, H=1, K=16, V=16, seed=4))
    args = [x[n] for n in ("q", "k", "v", "beta", "g")]
    for pick in (0, 1):
        outs = {b: ops.gated_delta_rule(*args, initial_state=x["initial_state"], backend=b)
                for b in ("triton", "torch")}
        grads = {b: torch.autograd.grad(outs[b][pick].sum(), args + [x["initial_state"]],
                                        allow_unused=True, materialize_grads=True) for b in outs}
        for gt, gr in zip(grads["triton"], grads["torch"]):
            assert rel_err(gt, gr) < 1e-10


# ---------------------------------------------------------------------------------------------
# skeleton 1b: a per-channel retention without an erase (GLA)


def _diag_inputs(B, T, H, K, V, seed, dtype=torch.float64, h0=True):
    gen = _generator("diag", B, T, H, K, V, seed)
    x = dict(q=torch.randn(B, T, H, K, generator=gen, dtype=dtype), k=torch.randn(B, T, H, K, generator=gen, dtype=dtype),
             w=torch.randn(B, T, H, V, generator=gen, dtype=dtype),
             a=torch.exp(-2 * torch.rand(B, T, H, K, generator=gen, dtype=dtype)))
    if h0:
        x["initial_state"] = torch.randn(B, H, K, V, generator=gen, dtype=dtype)
    return x


def _diag_run(x, **kw):
    o, S = ops.generalized_delta(x["q"], x["k"], x["w"], x["a"], None, initial_state=x.get("initial_state"), **kw)
    gen = _generator("diag-cotangent", tuple(o.shape))
    do, dS = (torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t) for t in (o, S))
    grads = torch.autograd.grad((o * do).sum() + (S * dS).sum(), list(x.values()))
    return o.detach().cpu(), S.detach().cpu(), {n: g.cpu() for n, g in zip(x, grads)}


@pytest.mark.parametrize("shape", [(2, 37, 2, 16, 20, True), (1, 21, 1, 40, 16, False)],
                         ids=["odd-T-h0", "K40-no-h0"])
def test_per_channel_retention_on_triton_equals_torch(shape):
    *dims, h0 = shape
    x = dev(_diag_inputs(*dims, seed=8, h0=h0))
    o_t, S_t, g_t = _diag_run(x, backend="triton")
    o_r, S_r, g_r = _diag_run(x, backend="torch", chunk_size=8)
    assert_rel("o", o_t, o_r, 1e-10)
    assert_rel("final_state", S_t, S_r, 1e-10)
    for name in x:
        assert_rel(f"d{name}", g_t[name], g_r[name], 1e-10)


def test_per_channel_retention_float32_against_the_oracle():
    x64 = {n: t.requires_grad_() for n, t in _diag_inputs(2, 45, 2, 32, 16, seed=9).items()}
    x32 = dev({n: t.detach().float() for n, t in x64.items()})
    o_t, S_t, g_t = _diag_run(x32, backend="triton")
    o_r, S_r, g_r = _diag_run(x64, mode="recurrent")
    assert_rel("o", o_t.double(), o_r, 1e-4)
    assert_rel("final_state", S_t.double(), S_r, 1e-4)
    for name in x64:
        assert_rel(f"d{name}", g_t[name].double(), g_r[name], 1e-3)


# ---------------------------------------------------------------------------------------------
# dispatch and bad input


def test_auto_keeps_cpu_tensors_on_torch(monkeypatch):
    import nlc.backends.triton.delta as delta

    def boom(*a, **k):
        raise AssertionError("auto must not run Triton on CPU tensors")
    monkeypatch.setattr(delta, "chunk_generalized_delta", boom)
    x = make_inputs("delta_rule", T=9, seed=5)
    ops.delta_rule(x["q"], x["k"], x["v"], x["beta"])           # backend="auto" by default


def test_backend_errors_name_the_way_out():
    x = make_inputs("generalized_delta", T=5, seed=6)
    q, k, w, b = x["q"], x["k"], x["w"], x["b"]
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.generalized_delta(q, k, w, x["a"], b, backend="cuda")
    with pytest.raises(ValueError, match="int64.*backend='torch'|must be a floating-point"):
        ops.linear_attn(q.long(), k.long(), w.long(), backend="triton")
    with pytest.raises(ValueError, match="k must have shape"):
        ops.linear_attn(q, k[:, :3], w, backend="triton")


def test_heads_wider_than_the_kernels_take():
    """Over K = 128 the delta kernels' state passes would not fit an H100's shared memory
    (plan.DELTA_MAX_K): backend='triton' says so and names the way out, 'auto' runs torch, and a
    per-channel retention (skeleton 1b, which tiles K) is not bounded."""
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, 5, 1, 136, generator=g, dtype=torch.float64) for _ in range(3))
    beta = torch.rand(1, 5, 1, generator=g, dtype=torch.float64)
    for call in (lambda be: ops.delta_rule(q, k, v, beta, backend=be),
                 lambda be: ops.linear_attn(q, k, v, backend=be),
                 lambda be: ops.gated_delta_rule(q, k, v, beta, -beta, backend=be),
                 lambda be: ops.generalized_delta(q, k, v, beta, beta, backend=be)):
        with pytest.raises(ValueError, match="delta kernels take K up to 128.*got 136.*backend='torch'"):
            call("triton")
        o, _ = call("auto")
        assert torch.allclose(o, call("torch")[0])
    a = torch.rand(1, 5, 1, 136, generator=g, dtype=torch.float64)
    with mock.patch.object(diag, "chunk_diag_delta", wraps=diag.chunk_diag_delta) as kernel:
        ops.generalized_delta(q, k, v, a, backend="triton")
    assert kernel.called


def test_triton_missing_says_so(monkeypatch):
    from nlc.backends import dispatch
    monkeypatch.setattr(dispatch, "_triton_error", ["ImportError: No module named 'triton'"])
    x = make_inputs("linear_attn", T=5, seed=7)
    with pytest.raises(ValueError, match="Triton is not usable here.*backend='torch'"):
        ops.linear_attn(x["q"], x["k"], x["v"], backend="triton")


# ---------------------------------------------------------------------------------------------
# the template


@pytest.mark.parametrize("decay,erase", [(False, False), (False, True), (True, False), (True, True)])
def test_each_variant_holds_only_its_terms(decay, erase):
    text = template.body("delta_chunk", variant(decay, erase))
    ast.parse(text)
    assert "tl.constexpr = True" not in text and "if DECAY" not in text and "if ERASE" not in text
    assert ("tl.exp(g_end)" in text) == decay
    assert ("def delta_prep" in text) == erase and ("Wk = " in text) == erase
    assert template.body("delta_chunk", variant(decay, erase)) == text   # deterministic


def test_template_takes_exactly_the_skeletons_flags():
    with pytest.raises(ValueError, match="takes flags"):
        template.body("delta_chunk", {"DECAY": True})

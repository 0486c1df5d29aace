"""Functional memories: chunk == recurrent == the paper's equations, outputs and gradients.

Float64 on fresh random inputs from seeded generators (never zeros, keys L2-normalised), checked
by name with a relative max error ``max|x - y| / max(max|y|, 1)``. The transcriptions below are
written in the paper's notation (memory ``M`` is ``V x K``; Titans' signs), independent of the
code under test: gradients of the inner loss come from ``torch.autograd.grad``. Carried state,
float32, empty sequences and argument errors: ``test_memories_edges``.
"""
from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F

from .numerics import assert_rel as _assert_rel

from nlc.backends.torch import memories as mem
from nlc.backends.torch import ops

DT = torch.float64
TOL = 1e-10
K_DIM, V_DIM = 6, 5            # K != V so a transposed state cannot pass
HID = 7


def _gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def assert_rel(name, x, y, tol=TOL):
    _assert_rel(name, x, y, tol)


def _rand(gen, *shape, lo=0.0, hi=1.0, dtype=DT):
    return lo + (hi - lo) * torch.rand(*shape, generator=gen, dtype=dtype)


def token_inputs(key, B, T, H, Dq, Dv, dtype=DT):
    """q, k (L2-normalised), v, eta, beta, alpha, erase: leaf tensors."""
    g = _gen(*key)
    x = {"q": torch.randn(B, T, H, Dq, generator=g, dtype=dtype),
         "k": F.normalize(torch.randn(B, T, H, Dq, generator=g, dtype=dtype), dim=-1),
         "v": torch.randn(B, T, H, Dv, generator=g, dtype=dtype),
         "eta": _rand(g, B, T, H, lo=0.05, hi=0.6, dtype=dtype),
         "beta": _rand(g, B, T, H, lo=0.1, hi=0.95, dtype=dtype),
         "alpha": _rand(g, B, T, H, lo=0.6, hi=1.0, dtype=dtype),
         "erase": _rand(g, B, T, H, lo=0.05, hi=0.5, dtype=dtype)}
    return {n: t.requires_grad_() for n, t in x.items()}


def grads_of(outputs, leaves, key):
    """Gradients of a random linear functional of ``outputs`` w.r.t. the named ``leaves``."""
    g = _gen("cotangent", key)
    loss = sum((t * torch.randn(t.shape, generator=g, dtype=t.dtype)).sum() for t in outputs)
    names = [n for n, t in leaves.items() if t is not None and t.requires_grad]
    return dict(zip(names, torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)))


def assert_all(prefix, got, want, tol=TOL):
    for name in want:
        if want[name] is None:
            assert got[name] is None or got[name].abs().max() == 0, f"{prefix}{name}"
            continue
        assert_rel(f"{prefix}{name}", got[name], want[name], tol)


# ---------------------------------------------------------------------------------------------
# momentum memory

MOMENTUM_CASES = {"l2": ("l2", False), "l2_erase": ("l2", True), "dot_erase": ("dot", True)}


def momentum_leaves(T, H, erase, seed=0, B=2, dtype=DT):
    x = token_inputs(("momentum", T, H, seed), B, T, H, K_DIM, V_DIM, dtype)
    if not erase:
        x["erase"] = None
    g = _gen("momentum_state", T, H, seed)
    x["M0"] = torch.randn(B, H, K_DIM, V_DIM, generator=g, dtype=dtype).requires_grad_()
    x["S0"] = (0.3 * torch.randn(B, H, K_DIM, V_DIM, generator=g, dtype=dtype)).requires_grad_()
    return x


def run_momentum(x, **kw):
    return mem.momentum_memory(x["q"], x["k"], x["v"], x["eta"], x["beta"], x["alpha"], x["erase"],
                               initial_state=(x["M0"], x["S0"]), **kw)


@pytest.mark.parametrize("case", list(MOMENTUM_CASES))
@pytest.mark.parametrize("H", [1, 3])
@pytest.mark.parametrize("chunk_size", [1, 4, 16])
@pytest.mark.parametrize("T", [1, 7, 33])
def test_momentum_chunk_equals_recurrent(T, chunk_size, H, case):
    objective, erase = MOMENTUM_CASES[case]
    x = momentum_leaves(T, H, erase)
    out = {}
    for mode in mem.MODES:
        o, (M, S) = run_momentum(x, objective=objective, mode=mode, chunk_size=chunk_size)
        out[mode] = ({"o": o, "M": M, "S": S}, grads_of((o, M, S), x, (T, H)))
    (v_c, g_c), (v_r, g_r) = out["chunk"], out["recurrent"]
    assert_all("", {n: t.detach() for n, t in v_c.items()}, {n: t.detach() for n, t in v_r.items()})
    assert_all("d", g_c, g_r)


def test_momentum_titans_transcription():
    """Titans §3 with chunk 1, in its own signs: S_t = beta S - eta grad l(M_{t-1}; k, v),
    M_t = alpha M_{t-1} + S_t, y_t = M_t q_t (matrix memories read after the write); the DGD erase
    of Eq. 96 on the running state."""
    B, T, H = 2, 9, 2
    x = momentum_leaves(T, H, erase=True, seed=1)
    scale = 0.7
    o, (M_nlc, S_nlc) = run_momentum(x, objective="l2", scale=scale, mode="chunk", chunk_size=1)
    ys = torch.zeros(B, T, H, V_DIM, dtype=DT)
    M_end, S_end = torch.zeros(B, H, V_DIM, K_DIM, dtype=DT), torch.zeros(B, H, V_DIM, K_DIM, dtype=DT)
    eye = torch.eye(K_DIM, dtype=DT)
    for b in range(B):
        for h in range(H):
            M = x["M0"][b, h].detach().T.clone()          # paper: V x K
            S = -x["S0"][b, h].detach().T.clone()         # Titans' S is nlc's -S
            for t in range(T):
                k, v, q = (x[n][b, t, h].detach() for n in ("k", "v", "q"))
                eta, beta, alpha, eps = (x[n][b, t, h].detach() for n in ("eta", "beta", "alpha", "erase"))
                Mg = M.clone().requires_grad_()
                loss = 0.5 * ((Mg @ k - v) ** 2).sum()
                (grad,) = torch.autograd.grad(loss, Mg)
                S = beta * S - eta * grad
                M = M @ (alpha * eye - eps * torch.outer(k, k)) + S
                ys[b, t, h] = M @ (scale * q)
            M_end[b, h], S_end[b, h] = M, S
    assert_rel("o", o.detach(), ys, 1e-12)
    assert_rel("M", M_nlc.detach().mT, M_end, 1e-12)
    assert_rel("S", -S_nlc.detach().mT, S_end, 1e-12)


@pytest.mark.parametrize("objective,with_erase", [("l2", False), ("l2", True), ("dot", False), ("dot", True)])
@pytest.mark.parametrize("mode", mem.MODES)
def test_momentum_without_momentum_is_generalized_delta(objective, with_erase, mode):
    """beta = 0, chunk 1: M_t = (alpha I - eps k k^T) M_{t-1} - eta k (M_{t-1}^T k - v)^T, i.e.
    generalized_delta with a = alpha, b = eps + eta (l2) or eps (dot), w = eta v."""
    x = momentum_leaves(17, 3, erase=with_erase, seed=2)
    zero = torch.zeros_like(x["beta"]).requires_grad_()
    o, (M, S) = mem.momentum_memory(x["q"], x["k"], x["v"], x["eta"], zero, x["alpha"], x["erase"],
                                    objective=objective, initial_state=(x["M0"], None), mode=mode,
                                    chunk_size=1)
    eps = torch.zeros_like(x["eta"]) if x["erase"] is None else x["erase"]
    b = eps + x["eta"] if objective == "l2" else eps
    o_g, M_g = ops.generalized_delta(x["q"], x["k"], x["eta"][..., None] * x["v"], x["alpha"], b,
                                     initial_state=x["M0"], mode="recurrent")
    assert_rel("o", o.detach(), o_g.detach(), 1e-12)
    assert_rel("M", M.detach(), M_g.detach(), 1e-12)
    leaves = {n: x[n] for n in ("q", "k", "v", "eta", "alpha", "M0")}
    assert_all("d", grads_of((o, M), leaves, "gd"), grads_of((o_g, M_g), leaves, "gd"), 1e-11)


def test_momentum_zero_decays_are_exact():
    """beta = 0 and some alpha = 0 (a hard reset) in the chunked form: no log is taken."""
    x = momentum_leaves(21, 2, erase=True, seed=3)
    with torch.no_grad():
        x["beta"][:, ::3] = 0.0
        x["alpha"][:, 5] = 0.0
    res = [(lambda r: (r, grads_of((r[0], *r[1]), x, "zero")))(run_momentum(x, mode=m, chunk_size=8))
           for m in ("chunk", "recurrent")]
    (o_c, st_c), g_c = res[0]
    (o_r, st_r), g_r = res[1]
    assert_rel("o", o_c.detach(), o_r.detach())
    assert_rel("M", st_c.M.detach(), st_r.M.detach())
    assert_all("d", g_c, g_r)


def test_momentum_without_retention_is_alpha_one():
    """alpha=None (a rule without `retain`, as codegen passes it) is no retention: alpha = 1."""
    x = momentum_leaves(13, 2, erase=True, seed=4)
    for mode in mem.MODES:
        o, st = mem.momentum_memory(x["q"], x["k"], x["v"], x["eta"], x["beta"], None, x["erase"],
                                    initial_state=(x["M0"], x["S0"]), mode=mode, chunk_size=4)
        o1, st1 = mem.momentum_memory(x["q"], x["k"], x["v"], x["eta"], x["beta"], 1.0, x["erase"],
                                      initial_state=(x["M0"], x["S0"]), mode=mode, chunk_size=4)
        assert torch.equal(o, o1) and torch.equal(st.M, st1.M) and torch.equal(st.S, st1.S)


# ---------------------------------------------------------------------------------------------
# MLP memory

# name -> (depth, d_out, residual, activation, objective, self_target, momentum, erase, batched W0)
MLP_CASES = {
    "hope": (2, None, True, "silu", "l2", True, True, True, False),        # Eq. 96 + momentum
    "titans": (2, None, True, "silu", "l2", False, True, False, False),    # Titans §3
    "scalar": (2, 1, False, "silu", "l2", True, False, True, True),       # M_eta: out = 1 per head
    "deep": (3, V_DIM, False, "gelu", "dot", False, False, True, True),   # depth 3, no residual
    "shallow": (1, None, True, "silu", "dot", False, True, True, False),  # depth 1: a matrix + residual
}


def mlp_leaves(case, T, H, seed=0, B=2, dtype=DT):
    depth, d_out, residual, act, objective, self_target, momentum, erase, batched = MLP_CASES[case]
    D = K_DIM
    d_out = D if d_out is None else d_out
    x = token_inputs(("mlp", case, T, H, seed), B, T, H, D, D if self_target else d_out, dtype)
    g = _gen("mlp_weights", case, T, H, seed)
    dims = [d_out] + [HID] * (depth - 1) + [D]
    lead = (B, H) if batched else (H,)
    x.update({f"W{i + 1}": (0.6 * torch.randn(*lead, dims[i], dims[i + 1], generator=g, dtype=dtype)
                            / dims[i + 1] ** 0.5).requires_grad_() for i in range(depth)})
    if momentum:
        x.update({f"S{i + 1}": (0.1 * torch.randn(*lead, dims[i], dims[i + 1], generator=g, dtype=dtype)
                                ).requires_grad_() for i in range(depth)})
    else:
        x["beta"] = None
    if not erase:
        x["erase"] = None
    kw = dict(objective=objective, self_target=self_target, activation=act, residual=residual)
    return x, depth, kw


def run_mlp(x, depth, **kw):
    W = tuple(x[f"W{i + 1}"] for i in range(depth))
    S = tuple(x[f"S{i + 1}"] for i in range(depth)) if "S1" in x else None
    return mem.mlp_memory(x["q"], x["k"], x["v"], x["eta"], x["beta"], x["alpha"], x["erase"],
                          initial_state=mem.MLPState(W, S), **kw)


def flat_state(state):
    return [*state.weights, *(state.momenta or ())]


@pytest.mark.parametrize("case", list(MLP_CASES))
@pytest.mark.parametrize("H", [1, 3])
@pytest.mark.parametrize("chunk_size", [1, 4, 16])
@pytest.mark.parametrize("T", [1, 7, 33])
def test_mlp_chunk_equals_recurrent(T, chunk_size, H, case):
    x, depth, kw = mlp_leaves(case, T, H)
    res = {}
    for mode in mem.MODES:
        o, st = run_mlp(x, depth, mode=mode, chunk_size=chunk_size, **kw)
        res[mode] = (o, flat_state(st), grads_of((o, *flat_state(st)), x, (case, T, H)))
    (o_c, s_c, g_c), (o_r, s_r, g_r) = res["chunk"], res["recurrent"]
    assert_rel("o", o_c.detach(), o_r.detach())
    for i, (a, b) in enumerate(zip(s_c, s_r)):
        assert_rel(f"state[{i}]", a.detach(), b.detach())
    assert_all("d", g_c, g_r)


def mlp_apply(z, W1, W2, residual=True):
    """The paper's 2-layer memory M(z) = z + W1 silu(W2 z); z [..., D], W [..., out, in]."""
    y = (W1 @ F.silu(W2 @ z[..., None]))[..., 0]
    return z + y if residual else y


def transcribe_mlp(x, *, self_target, momentum, erase, detach_target=False, chunk=1, read="anchor"):
    """The rule token by token, weights [B, H, out, in]. Every `chunk` tokens the anchor (A1, A2)
    becomes the running weights; the target and the inner gradient are taken at the anchor, the
    read o_t is M_A(q_t) (Eq. 90) or M_{t-1}(q_t) with read="current" (the same at chunk 1). The
    inner gradient comes from autograd on clones of the anchor that the target does not see (the
    target is data of the inner loss, not a function of it)."""
    B, T, H, _ = x["q"].shape
    W1, W2 = (x[n].expand(B, *x[n].shape[-3:]) for n in ("W1", "W2"))
    S1, S2 = (torch.zeros_like(W1), torch.zeros_like(W2)) if not momentum else \
        (-x["S1"].expand_as(W1), -x["S2"].expand_as(W2))                   # Titans' sign
    eye = torch.eye(W2.shape[-1], dtype=DT)
    ys = []
    for t in range(T):
        q, k, v = (x[n][:, t] for n in ("q", "k", "v"))
        eta, alpha = x["eta"][:, t, :, None, None], x["alpha"][:, t, :, None, None]
        if t % chunk == 0:
            A1, A2 = W1, W2
        ys.append(mlp_apply(q, W1, W2) if read == "current" else mlp_apply(q, A1, A2))
        target = mlp_apply(v, A1, A2) if self_target else v
        if detach_target:
            target = target.detach()
        P1, P2 = A1.clone(), A2.clone()
        loss = 0.5 * ((mlp_apply(k, P1, P2) - target) ** 2).sum()
        g1, g2 = torch.autograd.grad(loss, (P1, P2), create_graph=True)
        if momentum:                                  # Titans: S = beta S - eta grad, W = alpha W + S
            beta = x["beta"][:, t, :, None, None]
            S1, S2 = beta * S1 - eta * g1, beta * S2 - eta * g2
        else:
            S1, S2 = -eta * g1, -eta * g2
        keep2 = alpha * eye
        if erase:                                     # Eq. 96: W2 (alpha I - eps k k^T)
            keep2 = keep2 - x["erase"][:, t, :, None, None] * (k[..., :, None] * k[..., None, :])
        W1, W2 = alpha * W1 + S1, W2 @ keep2 + S2
    return torch.stack(ys, 1), (W1, W2), (-S1, -S2)


@pytest.mark.parametrize("variant", ["eq96", "eq96_detach", "titans", "hope"])
def test_mlp_transcription(variant):
    """Eq. 96 (self-modifying: W2 (alpha I - eta k k^T) - eta grad L(M_{t-1}; k, M_{t-1}(v)), W1
    plain retention), Titans' momentum rule on the deep memory, and both together (Hope)."""
    self_target, momentum, erase = {"eq96": (True, False, True), "eq96_detach": (True, False, True),
                                    "titans": (False, True, False), "hope": (True, True, True)}[variant]
    detach = variant == "eq96_detach"
    x, depth, kw = mlp_leaves("hope", 11, 2, seed=4)
    if not momentum:
        x = {n: t for n, t in x.items() if n not in ("S1", "S2")}
        x["beta"] = None
    if variant == "eq96":
        x["erase"] = x["eta"]                          # Eq. 96 erases with the learning rate itself
    if not erase:
        x["erase"] = None
    if not self_target:
        kw["self_target"] = False
    o, st = run_mlp(x, depth, mode="chunk", chunk_size=1, detach_target=detach, **kw)
    o_ref, W_ref, S_ref = transcribe_mlp(x, self_target=self_target, momentum=momentum,
                                         erase=erase, detach_target=detach)
    assert_rel("o", o.detach(), o_ref.detach(), 1e-12)
    for i in range(2):
        assert_rel(f"W{i + 1}", st.weights[i].detach(), W_ref[i].detach(), 1e-12)
        if momentum:
            assert_rel(f"S{i + 1}", st.momenta[i].detach(), S_ref[i].detach(), 1e-12)
    outs = (o, *st.weights)
    assert_all("d", grads_of(outs, x, variant), grads_of((o_ref, *W_ref), x, variant), 1e-11)


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("activation", list(mem.ACTIVATIONS))
def test_closed_form_gradient_is_autograd(activation, depth, residual):
    """Per-token outer products delta_t a_t^T == autograd of each token's loss, every weight."""
    g = _gen("cf", activation, depth, residual)
    D, C = 4, 5
    dims = [D] + [HID] * (depth - 1) + [D]
    W = [torch.randn(2, dims[i], dims[i + 1], generator=g, dtype=DT) for i in range(depth)]
    z, tau = torch.randn(2, C, D, generator=g, dtype=DT), torch.randn(2, C, D, generator=g, dtype=DT)
    y, inputs, pre = mem.mlp_forward(z, W, activation, residual)
    deltas = mem.mlp_token_grads(y - tau, W, inputs, pre, activation)
    for t in range(C):
        Wl = [w.clone().requires_grad_() for w in W]
        yt = mem.mlp_forward(z[:, t:t + 1], Wl, activation, residual)[0]
        auto = torch.autograd.grad(0.5 * ((yt - tau[:, t:t + 1]) ** 2).sum(), Wl)
        for l in range(depth):
            closed = deltas[l][:, t, :, None] * inputs[l][:, t, None, :]
            assert_rel(f"W{l + 1}[t={t}]", closed, auto[l], 1e-12)

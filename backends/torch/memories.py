"""Functional memories beyond the plain delta family: Titans momentum, deep (MLP) memories, CMS.

Three pieces, each a pure function (NESTED_LEARNING.md §3-5; the maths is in ``README.md`` next
to this file, section "Memories"):

- :func:`momentum_memory`: a matrix memory per head with Titans momentum, a forget gate and an
  optional DGD erase, gradients taken at the chunk's anchor state.
- :func:`mlp_memory`: the deep memory of Titans / Hope, ``M(z) = z + W1 act(W2 z)`` (or any depth,
  with or without the residual), fast weights per batch element and head, read and trained at
  the chunk's anchor (Eq. 90), targets given or self-generated (Eq. 95), per-token gradients in
  closed form (a hand-written backward of the MLP), the rule applied per weight matrix.
- :func:`cms_init`, :func:`cms_fast_weights`, :func:`cms_step`: the Continuum Memory System's
  runtime pieces over an explicit state dict (accumulators, fast deltas, token counters).

Conventions follow ``ops.py`` (flash-linear-attention's functional API)::

    q, k: [B, T, H, K]   v: [B, T, H, V]   eta, beta, alpha, erase: [B, T, H]

``mode="recurrent"`` is the literal token loop (the oracle), ``mode="chunk"`` the chunkwise-parallel
form; both use the same anchor semantics (the anchor is the state at the end of the previous
chunk, chunks counted from the first token of the call), so they agree up to rounding for any
``chunk_size >= 1`` and any T; ``chunk_size=1`` is the exact sequential rule. A state carried
between calls continues the same computation when the first call's length is a multiple of
``chunk_size``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real
from typing import NamedTuple

import torch
import torch.nn.functional as F

from nlc.backends.torch.ops import check_tensor

__all__ = ["momentum_memory", "mlp_memory", "MomentumState", "MLPState", "ACTIVATIONS",
           "mlp_forward", "mlp_token_grads", "cms_chain", "cms_init", "cms_fast_weights", "cms_step", "MODES"]

MODES = ("chunk", "recurrent")
OBJECTIVES = ("l2", "dot")


class MomentumState(NamedTuple):
    """State of :func:`momentum_memory`: the memory ``M`` and its momentum ``S``, each
    ``[B, H, K, V]`` (fla's orientation: the transpose of the paper's ``V x K`` memory)."""
    M: torch.Tensor
    S: torch.Tensor


class MLPState(NamedTuple):
    """State of :func:`mlp_memory`.

    ``weights[0]`` is the output-side matrix ``W1``, ``weights[-1]`` the input-side one (the one
    that consumes the key; ``W2`` at depth 2). Each is ``[B, H, d_out, d_in]`` (the paper's
    orientation) or, as an initial state, ``[H, d_out, d_in]`` shared by the batch (a meta-learned
    initial state). ``momenta`` is None (no momentum) or one tensor per weight, same shapes.
    """
    weights: tuple[torch.Tensor, ...]
    momenta: tuple[torch.Tensor, ...] | None = None


# ---------------------------------------------------------------------------------------------
# activations with hand-written derivatives (the closed-form backward of the MLP)


def _silu_d(x):
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


def _gelu_d(x):
    cdf = 0.5 * (1 + torch.erf(x * 0.5 ** 0.5))
    return cdf + x * torch.exp(-0.5 * x * x) * (2 * math.pi) ** -0.5


ACTIVATIONS = {
    "silu": (F.silu, _silu_d),
    "gelu": (F.gelu, _gelu_d),                       # exact (erf) GELU
    "relu": (F.relu, lambda x: (x > 0).to(x.dtype)),
    "tanh": (torch.tanh, lambda x: 1 - torch.tanh(x) ** 2),
    "sigmoid": (torch.sigmoid, lambda x: torch.sigmoid(x) * (1 - torch.sigmoid(x))),
    "identity": (lambda x: x, torch.ones_like),
}


# ---------------------------------------------------------------------------------------------
# the in-chunk algebra shared by both memories (README "Memories": decay matrices, UT transform)


def _blocks(x, C, N, pad_value=0.0):
    """``[B, T, H, *d] -> [N, B, H, C, *d]``; the ragged tail padded with ``pad_value``."""
    B, T = x.shape[:2]
    pad = N * C - T
    if pad:
        x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad), value=pad_value)
    x = x.reshape(B, N, C, *x.shape[2:])
    return x.permute(1, 0, 3, 2, *range(4, x.dim())).contiguous()


def _unblock(x, T):
    """``[N, B, H, C, d] -> [B, T, H, d]``."""
    N, B, H, C, d = x.shape
    return x.permute(1, 0, 3, 2, 4).reshape(B, N * C, H, d)[:, :T]


def _segprod(x):
    """``D[..., r, j] = prod_{j < m <= r} x_m`` for ``0 <= j <= r <= C``, else 0.

    x: ``[..., C]`` (tokens 1..C; index 0 is the chunk start). A cumulative product down each
    column, so zeros and negative values are exact (no ``log``)."""
    C = x.shape[-1]
    xp = F.pad(x, (1, 0), value=1.0)
    idx = torch.arange(C + 1, device=x.device)
    below = idx[:, None] > idx[None, :]
    X = torch.where(below, xp[..., :, None], torch.ones((), dtype=x.dtype, device=x.device))
    return X.cumprod(dim=-2).masked_fill(~(idx[:, None] >= idx[None, :]), 0.0)


class _Coef(NamedTuple):
    """Per-chunk decay coefficients, rows ``r = 0..C`` (0 = chunk start), columns tokens 1..C."""
    A: torch.Tensor                 # [..., C+1]     prod_{m<=r} alpha_m
    Da: torch.Tensor                # [..., C+1, C]  prod_{i<m<=r} alpha_m
    Phi: torch.Tensor               # [..., C+1, C]  weight of token i's scaled gradient in M_r
    c: torch.Tensor | None          # [..., C+1]     weight of S_0 in M_r
    Bc: torch.Tensor | None         # [..., C+1]     prod_{m<=r} beta_m
    Db: torch.Tensor | None         # [..., C+1, C]  prod_{i<m<=r} beta_m


def _coefficients(alpha, beta):
    Da_full = _segprod(alpha)
    A, Da = Da_full[..., 0], Da_full[..., 1:]
    if beta is None:                # u_t = eta_t g_t directly: S_j = u_j, Phi = Da
        return _Coef(A, Da, Da, None, None, None)
    Db_full = _segprod(beta)
    Bc, Db = Db_full[..., 0], Db_full[..., 1:]
    Phi = Da @ Db[..., 1:, :]
    c = (Da @ Bc[..., 1:, None]).squeeze(-1)
    return _Coef(A, Da, Phi, c, Bc, Db)


def _erase_solve(co, keys, erase):
    """``(K K^T, (I + L)^{-1})`` with ``L[r, m] = Da[r-1, m] erase_m (k_r . k_m)`` for ``m < r``."""
    C = keys.shape[-2]
    KK = keys @ keys.mT
    L = co.Da[..., :-1, :] * erase[..., None, :] * KK
    eye = torch.eye(C, dtype=keys.dtype, device=keys.device)
    Tinv = torch.linalg.solve_triangular(eye + L, eye.expand_as(L).contiguous(), upper=False,
                                         unitriangular=True)
    return KK, Tinv


def _advance(co, end, keys, G, h0, S0, erase=None, KK=None, Tinv=None):
    """One chunk of ``S_r = beta_r S_{r-1} + k_r G_r^T``,
    ``h_r = (alpha_r I - erase_r k_r k_r^T) h_{r-1} - S_r`` (h and S ``[B, H, K, V]``).

    ``co`` holds this chunk's coefficients, ``G`` the scaled gradient errors ``[B, H, C, V]``
    (computed from the anchor), ``end`` the row of the state returned (C, or fewer in a ragged
    last chunk). Returns ``(h_end, S_end, erase * Z)`` where ``Z_r = k_r^T h_{r-1}``."""
    coef = co.Phi[..., end, :, None] * G
    bZ = None
    if erase is not None:
        rhs = co.A[..., :-1, None] * (keys @ h0) - (KK * co.Phi[..., :-1, :]) @ G
        if co.c is not None:
            rhs = rhs - co.c[..., :-1, None] * (keys @ S0)
        bZ = erase[..., None] * (Tinv @ rhs)
        coef = coef + co.Da[..., end, :, None] * bZ
    h = co.A[..., end, None, None] * h0 - keys.mT @ coef
    S = None
    if co.c is not None:
        h = h - co.c[..., end, None, None] * S0
        S = co.Bc[..., end, None, None] * S0 + keys.mT @ (co.Db[..., end, :, None] * G)
    return h, S, bZ


def _chunk_slice(co, n):
    return _Coef(*(None if x is None else x[n] for x in co))


# ---------------------------------------------------------------------------------------------
# momentum memory


def momentum_memory(q, k, v, eta, beta, alpha, erase=None, *, objective="l2", scale=None,
                    initial_state=None, output_final_state=True, mode="chunk", chunk_size=64):
    r"""A matrix memory per head with Titans momentum, a forget gate and an optional DGD erase.

    In fla's orientation (``M`` is ``[K, V]``, the paper's memory transposed), per token t of the
    chunk whose anchor state is :math:`M_\xi` (the state at the end of the previous chunk):

    .. math::
        g_t = \nabla_M \mathcal{L}(M_\xi; k_t, v_t), \quad
        S_t = \beta_t S_{t-1} + \eta_t g_t, \quad
        M_t = (\alpha_t I - \epsilon_t k_t k_t^\top) M_{t-1} - S_t, \quad
        o_t = M_t^\top (\mathrm{scale}\; q_t)

    with :math:`\mathcal{L} = \tfrac12 \|M^\top k - v\|^2` (``"l2"``, :math:`g = k (M_\xi^\top k - v)^\top`)
    or :math:`-\langle M^\top k, v\rangle` (``"dot"``, :math:`g = -k v^\top`); :math:`\epsilon` is
    ``erase`` (the DGD erase of Eq. 96, acting on the running state). Titans writes
    :math:`S_t = \beta S - \eta g,\ M_t = \alpha M + S`: the same rule with ``S`` negated.

    Args:
        q, k: ``[B, T, H, K]`` (keys L2-normalised where an erase is used). v: ``[B, T, H, V]``.
        eta, beta, alpha: ``[B, T, H]`` learning rate, momentum decay, retention (or numbers).
        erase: ``[B, T, H]``, a number, or None (no erase).
        objective: ``"l2"`` or ``"dot"``. scale: multiplies q; defaults to ``K ** -0.5``.
        initial_state: None or ``(M0, S0)``, each ``[B, H, K, V]`` or None (zeros).
        output_final_state: return the final state, else None.
        mode: ``"chunk"`` or ``"recurrent"``. chunk_size: tokens per anchor (both modes).

    Returns:
        ``(o, MomentumState(M, S))``: o ``[B, T, H, V]`` in q's dtype; ``M, S`` ``[B, H, K, V]``.
        Any alpha and beta (zero and negative included) are exact in both modes.
    """
    op = "momentum_memory"
    _check_common(op, q, k, v, objective, mode, chunk_size)
    _require(op, eta=eta, beta=beta, alpha=alpha)
    B, T, H, K = q.shape
    V = v.shape[-1]
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, Real)
                              or not math.isfinite(scale)):
        raise ValueError(f"{op}: scale must be a finite number or None, got {scale!r}")
    M0, S0 = (None, None) if initial_state is None else tuple(initial_state)
    for name, t in (("initial_state[0] (M)", M0), ("initial_state[1] (S)", S0)):
        if t is not None:
            check_tensor(op, name, t, q)
            if tuple(t.shape) != (B, H, K, V):
                raise ValueError(f"{op}: {name} must have shape [B, H, K, V] = [{B}, {H}, {K}, {V}], "
                                 f"got {tuple(t.shape)}")
    dtype, out_dtype = _dtype(q, k, v, eta, beta, alpha, erase, M0, S0), q.dtype
    eta, beta, alpha, erase = (_per_token(op, n, x, q, dtype) for n, x in
                               (("eta", eta), ("beta", beta), ("alpha", alpha), ("erase", erase)))
    q, k, v = (x.to(dtype) for x in (q, k, v))
    M = q.new_zeros(B, H, K, V) if M0 is None else M0.to(dtype)
    S = q.new_zeros(B, H, K, V) if S0 is None else S0.to(dtype)
    q = q * (K ** -0.5 if scale is None else scale)
    run = _momentum_recurrent if mode == "recurrent" else _momentum_chunk
    o, M, S = run(q, k, v, eta, beta, alpha, erase, objective, M, S, chunk_size)
    return o.to(out_dtype), (MomentumState(M, S) if output_final_state else None)


def _momentum_recurrent(q, k, v, eta, beta, alpha, erase, objective, M, S, C):
    outs = []
    anchor = M
    for t in range(q.shape[1]):
        if t % C == 0:
            anchor = M
        k_t = k[:, t]
        err = -v[:, t] if objective == "dot" else torch.einsum("bhk,bhkv->bhv", k_t, anchor) - v[:, t]
        S = beta[:, t, :, None, None] * S + eta[:, t, :, None, None] * (k_t[..., :, None] * err[..., None, :])
        new = alpha[:, t, :, None, None] * M
        if erase is not None:
            kM = torch.einsum("bhk,bhkv->bhv", k_t, M)
            new = new - erase[:, t, :, None, None] * (k_t[..., :, None] * kM[..., None, :])
        M = new - S
        outs.append(torch.einsum("bhkv,bhk->bhv", M, q[:, t]))
    B, T, H, _ = q.shape
    o = torch.stack(outs, 1) if outs else q.new_zeros(B, 0, H, v.shape[-1])
    return o, M, S


def _momentum_chunk(q, k, v, eta, beta, alpha, erase, objective, M, S, C):
    B, T, H, K = q.shape
    V = v.shape[-1]
    if T == 0:
        return q.new_zeros(B, 0, H, V), M, S
    N = -(-T // C)
    qb, kb, vb = _blocks(q, C, N), _blocks(k, C, N), _blocks(v, C, N)
    etab = _blocks(eta, C, N)
    co = _coefficients(_blocks(alpha, C, N, 1.0), _blocks(beta, C, N, 1.0))
    eb = KK = Tinv = None
    if erase is not None:
        eb = _blocks(erase, C, N)
        KK, Tinv = _erase_solve(co, kb, eb)
    starts_M, starts_S, Gs, bZs = [], [], [], []
    for n in range(N):
        end = C if n < N - 1 else T - (N - 1) * C
        starts_M.append(M)
        starts_S.append(S)
        err = -vb[n] if objective == "dot" else kb[n] @ M - vb[n]
        G = etab[n][..., None] * err
        M, S, bZ = _advance(_chunk_slice(co, n), end, kb[n], G, M, S,
                            None if eb is None else eb[n], None if KK is None else KK[n],
                            None if Tinv is None else Tinv[n])
        Gs.append(G)
        bZs.append(bZ)
    M0s, S0s, G = torch.stack(starts_M), torch.stack(starts_S), torch.stack(Gs)
    QK = qb @ kb.mT
    o = (co.A[..., 1:, None] * (qb @ M0s) - co.c[..., 1:, None] * (qb @ S0s)
         - (QK * co.Phi[..., 1:, :]) @ G)
    if erase is not None:
        o = o - (QK * co.Da[..., 1:, :]) @ torch.stack(bZs)
    return _unblock(o, T), M, S


# ---------------------------------------------------------------------------------------------
# MLP memory


def mlp_forward(z, weights, activation="silu", residual=True):
    """``M(z)`` with ``weights = (W1, ..., WL)`` (``W1`` output side), each ``[..., d_out, d_in]``,
    z ``[..., C, d_in]``. Returns ``(y, inputs, pre)``: ``inputs[l]`` is the input of
    ``weights[l]`` ``[..., C, d_in_l]``, ``pre[l]`` its pre-activation (None for ``W1``)."""
    act = ACTIVATIONS[activation][0]
    L = len(weights)
    inputs, pre = [None] * L, [None] * L
    a = z
    for l in range(L - 1, 0, -1):
        inputs[l] = a
        pre[l] = a @ weights[l].mT
        a = act(pre[l])
    inputs[0] = a
    y = a @ weights[0].mT
    return (y + z if residual else y), inputs, pre


def mlp_token_grads(err, weights, inputs, pre, activation="silu"):
    """Per-token gradients of the inner loss in closed form (README "Memories"): with
    ``err = dL/dy`` ``[..., C, d_out]``, returns the backprop signals ``delta[l]`` ``[..., C, d_out_l]``
    such that token t's gradient w.r.t. ``weights[l]`` is ``outer(delta[l]_t, inputs[l]_t)``."""
    dact = ACTIVATIONS[activation][1]
    deltas = [err]
    for l in range(1, len(weights)):
        deltas.append((deltas[-1] @ weights[l - 1]) * dact(pre[l]))
    return deltas


def mlp_memory(q, k, v, eta, beta=None, alpha=None, erase=None, *, initial_state, objective="l2",
               self_target=False, detach_target=False, activation="silu", residual=True,
               output_final_state=True, mode="chunk", chunk_size=64):
    r"""The deep memory of Titans / Hope: per head an MLP with fast weights, read and trained at
    the chunk's anchor weights (NESTED_LEARNING.md §4, Eq. 90).

    ``M(z) = z + W1 act(W2 z)`` at depth 2 with the residual; in general
    ``M(z) = [z +] W1 act(W2 act(... act(WL z)))``. For token t of a chunk with anchor weights
    :math:`W^\xi` (the weights at the end of the previous chunk):

    .. math::
        o_t = M_{W^\xi}(q_t), \quad \tau_t = v_t \text{ or } M_{W^\xi}(v_t)\ (\text{self\_target}), \quad
        g^l_t = \nabla_{W_l} \mathcal{L}(M_{W^\xi}(k_t); \tau_t)

    then for every matrix :math:`S^l_t = \beta_t S^l_{t-1} + \eta_t g^l_t` (or :math:`\eta_t g^l_t`
    without momentum) and :math:`W_{l,t} = \alpha_t W_{l,t-1} - S^l_t`, except the input-side
    matrix: :math:`W_{L,t} = W_{L,t-1}(\alpha_t I - \epsilon_t k_t k_t^\top) - S^L_t` (DGD erase).
    The target is held fixed in the inner gradient (it is data of the inner objective); it carries
    the outer gradient unless ``detach_target``. The per-token gradients are outer products
    ``delta^l_t (a^l_t)^T`` from a hand-written backward (:func:`mlp_token_grads`).

    Args:
        q, k: ``[B, T, H, D]`` with D the MLP's input size. v: ``[B, T, H, D_out]`` (the target),
            or ``[B, T, H, D]`` with ``self_target=True``.
        eta: ``[B, T, H]`` (or a number). beta: momentum decay or None (no momentum).
        alpha: retention or None (1). erase: DGD erase on the input-side matrix or None.
        initial_state: :class:`MLPState` or a sequence of weights ``(W1, ..., WL)``, each
            ``[H, d_out, d_in]`` or ``[B, H, d_out, d_in]``; momenta None = zeros.
        objective: ``"l2"`` (``1/2 ||M(k) - tau||^2``) or ``"dot"`` (``-<M(k), tau>``).
        activation: one of :data:`ACTIVATIONS`. residual: add the input to the output (needs
            ``d_out = D``).
        mode, chunk_size: as :func:`momentum_memory`.

    Returns:
        ``(o, MLPState)``: o ``[B, T, H, D_out]`` in q's dtype; weights ``[B, H, d_out, d_in]``;
        momenta the same shapes, or None without momentum.
    """
    op = "mlp_memory"
    _check_common(op, q, k, v, objective, mode, chunk_size)
    _require(op, eta=eta)
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
    B, T, H, D = q.shape
    if isinstance(initial_state, MLPState):
        W0, S0 = tuple(initial_state.weights), initial_state.momenta
    elif isinstance(initial_state, Sequence) and all(isinstance(w, torch.Tensor) for w in initial_state):
        W0, S0 = tuple(initial_state), None
    else:
        raise ValueError(f"{op}: initial_state must be an MLPState or a sequence of weight tensors "
                         f"(W1, ..., WL), got {type(initial_state).__name__}")
    W0 = _check_weights(op, W0, q, B, H, D, residual)
    d_out = W0[0].shape[-2]
    want_v = D if self_target else d_out
    if v.shape[-1] != want_v:
        raise ValueError(f"{op}: v must have last dimension {want_v} "
                         f"({'the input size D, self_target' if self_target else 'the output size of W1'}), "
                         f"got {tuple(v.shape)}")
    if S0 is not None:
        if beta is None:
            raise ValueError(f"{op}: initial momenta given but beta is None (no momentum)")
        S0 = _check_weights(op, tuple(S0), q, B, H, D, residual, name="momenta")
        if [tuple(s.shape[-2:]) for s in S0] != [tuple(w.shape[-2:]) for w in W0]:
            raise ValueError(f"{op}: momenta must have the weights' shapes "
                             f"{[tuple(w.shape[-2:]) for w in W0]}, got {[tuple(s.shape[-2:]) for s in S0]}")
    dtype, out_dtype = _dtype(q, k, v, eta, beta, alpha, erase, *W0, *(S0 or ())), q.dtype
    eta = _per_token(op, "eta", eta, q, dtype)
    beta = _per_token(op, "beta", beta, q, dtype)
    alpha = _per_token(op, "alpha", 1.0 if alpha is None else alpha, q, dtype)
    erase = _per_token(op, "erase", erase, q, dtype)
    q, k, v = (x.to(dtype) for x in (q, k, v))
    W = [w.to(dtype).expand(B, *w.shape[-3:]) for w in W0]
    S = None
    if beta is not None:
        S = ([torch.zeros_like(w) for w in W] if S0 is None
             else [s.to(dtype).expand(B, *s.shape[-3:]) for s in S0])
    cfg = (objective, self_target, detach_target, activation, residual)
    run = _mlp_recurrent if mode == "recurrent" else _mlp_chunk
    o, W, S = run(q, k, v, eta, beta, alpha, erase, cfg, W, S, chunk_size)
    state = MLPState(tuple(W), None if S is None else tuple(S))
    return o.to(out_dtype), (state if output_final_state else None)


def _mlp_errors(k, v, anchor, cfg):
    """Forward at the anchor for the keys; returns (deltas, inputs) of the closed-form gradient."""
    objective, self_target, detach_target, activation, residual = cfg
    y, inputs, pre = mlp_forward(k, anchor, activation, residual)
    tau = v
    if self_target:
        tau = mlp_forward(v, anchor, activation, residual)[0]
        if detach_target:
            tau = tau.detach()
    err = -tau if objective == "dot" else y - tau
    return mlp_token_grads(err, anchor, inputs, pre, activation), inputs


def _mlp_recurrent(q, k, v, eta, beta, alpha, erase, cfg, W, S, C):
    activation, residual = cfg[3], cfg[4]
    outs = []
    anchor = W
    for t in range(q.shape[1]):
        if t % C == 0:
            anchor = W
        sl = slice(t, t + 1)
        tok = lambda x: x[:, sl].transpose(1, 2)          # noqa: E731  [B, H, 1, d]
        outs.append(mlp_forward(tok(q), anchor, activation, residual)[0])
        deltas, inputs = _mlp_errors(tok(k), tok(v), anchor, cfg)
        e, a = eta[:, t, :, None, None], alpha[:, t, :, None, None]
        new_W, new_S = [], []
        for l, w in enumerate(W):
            u = e * (deltas[l].mT @ inputs[l])               # eta_t outer(delta_t, a_t)
            if S is not None:
                u = beta[:, t, :, None, None] * S[l] + u
                new_S.append(u)
            w_new = a * w
            if erase is not None and l == len(W) - 1:
                k_t = tok(k)                                  # [B, H, 1, D]
                w_new = w_new - erase[:, t, :, None, None] * ((w @ k_t.mT) @ k_t)
            new_W.append(w_new - u)
        W, S = new_W, (new_S if S is not None else None)
    o = torch.cat(outs, 2).transpose(1, 2) if outs else q.new_zeros(*q.shape[:3], W[0].shape[-2])
    return o, W, S


def _mlp_chunk(q, k, v, eta, beta, alpha, erase, cfg, W, S, C):
    activation, residual = cfg[3], cfg[4]
    B, T, H, D = q.shape
    if T == 0:
        return q.new_zeros(B, 0, H, W[0].shape[-2]), W, S
    N = -(-T // C)
    qb, kb, vb, etab = _blocks(q, C, N), _blocks(k, C, N), _blocks(v, C, N), _blocks(eta, C, N)
    co = _coefficients(_blocks(alpha, C, N, 1.0), None if beta is None else _blocks(beta, C, N, 1.0))
    eb = KK = Tinv = None
    if erase is not None:
        eb = _blocks(erase, C, N)
        KK, Tinv = _erase_solve(co, kb, eb)
    L = len(W)
    anchors = []
    for n in range(N):
        end = C if n < N - 1 else T - (N - 1) * C
        anchors.append(W)
        deltas, inputs = _mlp_errors(kb[n], vb[n], W, cfg)
        cn = _chunk_slice(co, n)
        new_W, new_S = [], []
        for l in range(L):
            # in fla's orientation h = W^T: keys = the layer's inputs, G = eta * delta
            G = etab[n][..., None] * deltas[l]
            inner = l == L - 1 and eb is not None
            h, s, _ = _advance(cn, end, inputs[l], G, W[l].mT, None if S is None else S[l].mT,
                               eb[n] if inner else None, KK[n] if inner else None,
                               Tinv[n] if inner else None)
            new_W.append(h.mT)
            new_S.append(None if s is None else s.mT)
        W, S = new_W, (new_S if S is not None else None)
    stacked = [torch.stack([a[l] for a in anchors]) for l in range(L)]   # [N, B, H, o, i]
    o = mlp_forward(qb, stacked, activation, residual)[0]
    return _unblock(o, T), W, S


# ---------------------------------------------------------------------------------------------
# Continuum Memory System


def cms_chain(x, weights, activation="gelu", residual=False):
    """The CMS chain ``MLP_fk(... MLP_f1(x))``: ``weights`` is one mapping per block with
    ``"W1", ..., "WL"`` (``W1`` output side, each ``[d_out, d_in]``), x ``[..., T, d]``. Every
    block runs on every token."""
    for lv in weights:
        x = mlp_forward(x, [lv[f"W{i + 1}"] for i in range(len(lv))], activation, residual)[0]
    return x


def cms_init(params):
    """CMS state for a chain of blocks.

    Args:
        params: one mapping per level (block), name -> its slow (meta-learned) weight tensor.

    Returns:
        ``{"acc": [...], "delta": [...], "count": [...]}``: per level the accumulated gradients
        and the in-context fast deltas (name -> zeros like the weight, no grad) and the number of
        tokens since the level's last update.
    """
    zeros = [{n: torch.zeros_like(p, requires_grad=False).detach() for n, p in lv.items()} for lv in params]
    return {"acc": zeros, "delta": [dict(d) for d in zeros], "count": [0] * len(zeros)}


def cms_fast_weights(slow, state):
    """Fast weights = slow weights + in-context delta, per level (name -> tensor); the slow weights
    get the outer gradient through the sum."""
    return [{n: p + state["delta"][l][n] for n, p in lv.items()} for l, lv in enumerate(slow)]


def cms_step(state, grads, n_tokens, *, chunk_sizes, lrs):
    r"""Accumulate a window's gradients and apply the update of every level whose chunk ends.

    For level l with chunk :math:`C_l` and learning rate :math:`\eta_l`:
    :math:`A_l \leftarrow A_l + \nabla_l`, and when :math:`C_l` tokens have been accumulated,
    :math:`\Delta_l \leftarrow \Delta_l - \eta_l A_l`, :math:`A_l \leftarrow 0` (NL Eq. 71).
    With the window loss the *sum* of the per-token losses, this is
    :math:`\theta_l \leftarrow \theta_l - \eta_l \sum_{t \in \text{chunk}} \nabla f(\theta_l; x_t)`.

    Args:
        state: from :func:`cms_init` or a previous call (not modified).
        grads: one mapping per level, name -> gradient of the window loss w.r.t. that level's fast
            weight (``torch.autograd.grad``; first-order: computed without ``create_graph``).
        n_tokens: tokens in the window. chunk_sizes: per level an int, or None (frequency 0:
            never updated in context). lrs: per level a number.

    Returns:
        ``(new_state, fired)``: fired[l] is True where level l applied its update in this window.

    Raises:
        ValueError: a window crosses a level's chunk end (the window must divide every chunk).
    """
    acc, delta, count, fired = [], [], [], []
    for l, C in enumerate(chunk_sizes):
        a, d, n = state["acc"][l], state["delta"][l], state["count"][l]
        if C is None:
            acc.append(a), delta.append(d), count.append(n), fired.append(False)
            continue
        a = {name: a[name] + grads[l][name] for name in a}
        n = n + n_tokens
        if n > C:
            raise ValueError(f"cms_step: level {l} has chunk {C} but its counter reached {n}: "
                             f"windows of {n_tokens} tokens must divide every chunk size")
        hit = n == C
        if hit:
            d = {name: d[name] - lrs[l] * a[name] for name in d}
            a = {name: torch.zeros_like(t) for name, t in a.items()}
            n = 0
        acc.append(a), delta.append(d), count.append(n), fired.append(hit)
    return {"acc": acc, "delta": delta, "count": count}, fired


# ---------------------------------------------------------------------------------------------
# argument checks


def _require(op, **named):
    for name, x in named.items():
        if x is None:
            raise ValueError(f"{op}: {name} is required (a [B, T, H] tensor or a number), got None")


def _check_common(op, q, k, v, objective, mode, chunk_size):
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(op, name, t, q)
    if q.dim() != 4:
        raise ValueError(f"{op}: q must be 4-D [B, T, H, K], got shape {tuple(q.shape)}")
    B, T, H, K = q.shape
    if tuple(k.shape) != (B, T, H, K):
        raise ValueError(f"{op}: k must have shape [B, T, H, K] = [{B}, {T}, {H}, {K}], got {tuple(k.shape)}")
    if v.dim() != 4 or tuple(v.shape[:3]) != (B, T, H):
        raise ValueError(f"{op}: v must have shape [B, T, H, V] = [{B}, {T}, {H}, V], got {tuple(v.shape)}")
    if objective not in OBJECTIVES:
        raise ValueError(f"{op}: objective must be one of {OBJECTIVES}, got {objective!r}")
    if mode not in MODES:
        raise ValueError(f"{op}: mode must be one of {MODES}, got {mode!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{op}: chunk_size must be an int >= 1, got {chunk_size!r}")


def _check_weights(op, W, q, B, H, D, residual, name="weights"):
    if len(W) < 1:
        raise ValueError(f"{op}: {name} must hold at least one matrix")
    for i, w in enumerate(W):
        check_tensor(op, f"{name}[{i}]", w, q)
        if w.dim() not in (3, 4) or w.shape[-3] != H or (w.dim() == 4 and w.shape[0] != B):
            raise ValueError(f"{op}: {name}[{i}] must be [H, d_out, d_in] or [B, H, d_out, d_in] with "
                             f"B={B}, H={H}, got {tuple(w.shape)}")
    if W[-1].shape[-1] != D:
        raise ValueError(f"{op}: the input-side matrix {name}[-1] must have d_in = {D} (q's last "
                         f"dimension), got {tuple(W[-1].shape)}")
    for i in range(len(W) - 1):
        if W[i].shape[-1] != W[i + 1].shape[-2]:
            raise ValueError(f"{op}: {name}[{i}] takes {W[i].shape[-1]} inputs but {name}[{i + 1}] "
                             f"gives {W[i + 1].shape[-2]}")
    if residual and W[0].shape[-2] != D:
        raise ValueError(f"{op}: residual=True needs d_out = d_in = {D}, got {name}[0] of shape "
                         f"{tuple(W[0].shape)}; pass residual=False")
    return W


def _per_token(op, name, x, q, dtype):
    """None, a number (broadcast) or a ``[B, T, H]`` tensor, cast to ``dtype``."""
    if x is None:
        return None
    B, T, H = q.shape[:3]
    if isinstance(x, Real) and not isinstance(x, bool):
        return torch.full((B, T, H), float(x), dtype=dtype, device=q.device)
    check_tensor(op, name, x, q)
    if tuple(x.shape) != (B, T, H):
        raise ValueError(f"{op}: {name} must have shape [B, T, H] = [{B}, {T}, {H}] (one scalar per "
                         f"token and head), got {tuple(x.shape)}")
    return x.to(dtype)


def _dtype(*tensors):
    dtype = torch.float32
    for t in tensors:
        if isinstance(t, torch.Tensor):
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


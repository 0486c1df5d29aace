"""The deep memory of Titans / Hope: an MLP with fast weights per batch element and head.

``M(z) = z + W1 act(W2 z)`` (or any depth, with or without the residual), trained at the chunk's
anchor weights (Eq. 90), targets given or self-generated (Eq. 95), per-token gradients in closed
form (a hand-written backward of the MLP, :func:`mlp_token_grads`), the momentum rule applied per
weight matrix with the DGD erase on the input-side one. Tokens read either the anchor
(``read="anchor"``, Eq. 90 as printed) or the current weights (``read="current"``: the state after
the previous token, the TTT / Titans dual form). The chunked form reuses the momentum memory's
in-chunk algebra (``memory_core.py``); maths in ``README.md``, section "Memories". Re-exported by
:mod:`nlc.backends.torch.memories`.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from nlc.backends.torch.memory_core import (
    BEFORE_WRITE, _advance, _anchored, _blocks, _check_common, _check_offset, _chunk_slice, _coefficients,
    _dtype, _erase_solve, _inputs, _per_token, _read, _require, _unblock)
from nlc.backends.torch.ops import check_tensor
from nlc.backends.dispatch import pick
from nlc.backends.torch.precision import full_precision

__all__ = ["mlp_memory", "MLPState", "ACTIVATIONS", "READS", "mlp_forward", "mlp_token_grads"]

READS = ("anchor", "current")


class MLPState(NamedTuple):
    """State of :func:`mlp_memory`.

    ``weights[0]`` is the output-side matrix ``W1``, ``weights[-1]`` the input-side one (the one
    that consumes the key; ``W2`` at depth 2). Each is ``[B, H, d_out, d_in]`` (the paper's
    orientation) or, as an initial state, ``[H, d_out, d_in]`` shared by the batch (a meta-learned
    initial state). ``momenta`` is None (no momentum) or one tensor per weight, same shapes.

    Chunks start at absolute positions (multiples of ``chunk_size`` from the sequence start).
    ``offset`` is the number of tokens of the open chunk already consumed (``t mod chunk_size``),
    ``anchor`` that chunk's anchor weights (the weights at its start, same shapes as ``weights``;
    None, and ignored, at offset 0, where the next token starts a chunk). The defaults are a state
    at a chunk boundary: ``MLPState(weights, momenta)`` as before.
    """
    weights: tuple[torch.Tensor, ...]
    momenta: tuple[torch.Tensor, ...] | None = None
    anchor: tuple[torch.Tensor, ...] | None = None
    offset: int = 0


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


@full_precision
def mlp_memory(q, k, v, eta, beta=None, alpha=None, erase=None, *, initial_state, objective="l2",
               self_target=False, detach_target=False, activation="silu", residual=True,
               read="anchor", output_final_state=True, mode="chunk", chunk_size=64, backend="auto"):
    r"""The deep memory of Titans / Hope: per head an MLP with fast weights, trained at the
    chunk's anchor weights (Nested Learning Eq. 90) and read there or at the current ones.

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

    ``read="current"`` replaces the read by :math:`o_t = M_{W_{t-1}}(q_t)`: token t reads the
    weights after every earlier token of its chunk (not its own) has been applied through
    momentum, retention and erase, gradients still taken at :math:`W^\xi` (the dual form of TTT /
    Titans). ``chunk_size=1`` makes both reads the same. Only the outputs differ: the weights and
    momenta returned are the same for both reads.

    Chunks start at absolute positions, multiples of ``chunk_size`` from the sequence start: a
    state carried with an ``offset`` (:class:`MLPState`) first finishes its open chunk (gradients at
    the carried anchor), so feeding a sequence in pieces cut anywhere (token by token included)
    equals feeding it whole, in both modes.

    Args:
        q, k: ``[B, T, H, D]`` with D the MLP's input size. v: ``[B, T, H, D_out]`` (the target),
            or ``[B, T, H, D]`` with ``self_target=True``.
        eta: ``[B, T, H]`` (or a number). beta: momentum decay or None (no momentum).
        alpha: retention or None (1). erase: DGD erase on the input-side matrix or None.
        initial_state: :class:`MLPState` or a sequence of weights ``(W1, ..., WL)``, each
            ``[H, d_out, d_in]`` or ``[B, H, d_out, d_in]``; momenta None = zeros; a state with an
            offset > 0 carries the open chunk's anchor weights (same shapes).
        objective: ``"l2"`` (``1/2 ||M(k) - tau||^2``) or ``"dot"`` (``-<M(k), tau>``).
        activation: one of :data:`ACTIVATIONS`. residual: add the input to the output (needs
            ``d_out = D``).
        read: ``"anchor"`` (Eq. 90 as printed) or ``"current"`` (the weights before the token).
        mode, chunk_size: as :func:`momentum_memory`; ``"chunk"`` computes the current read with
            masked matmuls over each chunk (README "Memories"), no loop over tokens.
        backend: who runs ``mode="chunk"``: ``"torch"``, ``"triton"`` (skeleton 2,
            ``nlc.backends.triton.deep``: depth 2, silu or gelu, chunk 16, 32 or 64, sizes up to
            256) or ``"auto"`` (Triton for CUDA tensors that it takes, torch otherwise: on an H100
            Titans' level ran forward + backward 4.1x faster on the kernels than on the torch
            form). A state
            with an offset > 0 runs the rest of its open chunk on torch, the chunks after it on
            the kernel.

    Returns:
        ``(o, MLPState)``: o ``[B, T, H, D_out]`` in q's dtype; weights ``[B, H, d_out, d_in]``;
        momenta the same shapes, or None without momentum; ``offset`` the open chunk's tokens
        (``(initial offset + T) mod chunk_size``) and ``anchor`` its anchor weights (None at 0).
    """
    op = "mlp_memory"
    _check_common(op, q, k, v, objective, mode, chunk_size)
    _require(op, eta=eta)
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
    if read not in READS:
        raise ValueError(f"{op}: read must be one of {READS}, got {read!r}")
    B, T, H, D = q.shape
    A0, offset = None, 0
    if isinstance(initial_state, MLPState):
        W0, S0 = tuple(initial_state.weights), initial_state.momenta
        A0, offset = initial_state.anchor, initial_state.offset
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
    _check_offset(op, offset, chunk_size, A0)
    if not offset:
        A0 = None                                   # at a chunk boundary the anchor is the weights
    if A0 is not None:
        A0 = _check_weights(op, tuple(A0), q, B, H, D, residual, name="anchor")
        if [tuple(a.shape[-2:]) for a in A0] != [tuple(w.shape[-2:]) for w in W0]:
            raise ValueError(f"{op}: the anchor must have the weights' shapes "
                             f"{[tuple(w.shape[-2:]) for w in W0]}, got {[tuple(a.shape[-2:]) for a in A0]}")
    dtype, out_dtype = _dtype(q, k, v, eta, beta, alpha, erase, *W0, *(S0 or ()), *(A0 or ())), q.dtype
    inputs = _inputs(q, k, v, dtype)
    eta = _per_token(op, "eta", eta, q, dtype)
    beta = _per_token(op, "beta", beta, q, dtype)
    retain = alpha is not None
    alpha = _per_token(op, "alpha", 1.0 if alpha is None else alpha, q, dtype)
    erase = _per_token(op, "erase", erase, q, dtype)
    q, k, v = (x.to(dtype) for x in (q, k, v))
    W = [w.to(dtype).expand(B, *w.shape[-3:]) for w in W0]
    A = None if A0 is None else [a.to(dtype).expand(B, *a.shape[-3:]) for a in A0]
    S = None
    if beta is not None:
        S = ([torch.zeros_like(w) for w in W] if S0 is None
             else [s.to(dtype).expand(B, *s.shape[-3:]) for s in S0])
    cfg, current = (objective, self_target, detach_target, activation, residual), read == "current"
    if mode == "recurrent":
        o, W, S, A = _mlp_recurrent(q, k, v, eta, beta, alpha, erase, cfg, W, S, chunk_size, current, A, offset)
        offset = (offset + T) % chunk_size
    else:
        kernel = None
        if backend != "torch":
            from nlc.backends.triton import deep
            if pick(op, backend, q, why_not=deep.supports(cfg, W, chunk_size)) == "triton":
                kernel = deep.chunk_mlp_memory
        toks = (q, k, v, eta, beta, alpha, erase)

        def piece(a, b, st, anchor):
            xs = [None if x is None else x[:, a:b] for x in toks]
            if anchor is not None:   # the rest of an open chunk, at its carried anchor: the torch core
                o, W_, S_ = _mlp_chunk(*xs, cfg, st[0], st[1], chunk_size, current, anchor=anchor)
            elif kernel is not None:  # whole chunks, and a new open chunk: the kernel (alpha None: no retention)
                o, W_, S_ = kernel(*xs[:5], xs[5] if retain else None, xs[6], cfg, st[0], st[1], chunk_size, current,
                                   inputs=inputs)
            else:
                o, W_, S_ = _mlp_chunk(*xs, cfg, st[0], st[1], chunk_size, current)
            return o, (W_, S_)

        o, (W, S), A, offset = _anchored(piece, T, chunk_size, offset, A, (W, S))
    state = MLPState(tuple(W), None if S is None else tuple(S), None if A is None else tuple(A), offset)
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


def _mlp_recurrent(q, k, v, eta, beta, alpha, erase, cfg, W, S, C, current, anchor=None, offset=0):
    """The token loop (the reference): the anchor becomes the running weights at every absolute
    position ``offset + t`` that is a multiple of C. Returns ``(o, W, S, anchor)``: the last
    anchor (the open chunk's where ``(offset + T) % C`` is not 0, else None)."""
    activation, residual = cfg[3], cfg[4]
    outs = []
    anchor = W if anchor is None else anchor
    for t in range(q.shape[1]):
        if (offset + t) % C == 0:
            anchor = W
        sl = slice(t, t + 1)
        tok = lambda x: x[:, sl].transpose(1, 2)          # noqa: E731  [B, H, 1, d]
        outs.append(mlp_forward(tok(q), W if current else anchor, activation, residual)[0])
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
    return o, W, S, (anchor if (offset + q.shape[1]) % C else None)


def _mlp_chunk(q, k, v, eta, beta, alpha, erase, cfg, W, S, C, current, anchor=None):
    """Chunks of C from the first token, the first one's gradients (and anchor reads) at ``anchor``
    (None: at W; otherwise T <= C, the rest of a carried open chunk). Returns ``(o, W, S)``."""
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
    anchors, starts, moms, keys, Gs, bZs = [], [], [], [], [], []  # per chunk (from starts: current read)
    for n in range(N):
        end = C if n < N - 1 else T - (N - 1) * C
        A = anchor if n == 0 and anchor is not None else W
        anchors.append(A)
        starts.append(W)
        moms.append(S)
        deltas, inputs = _mlp_errors(kb[n], vb[n], A, cfg)
        cn = _chunk_slice(co, n)
        new_W, new_S, G_n = [], [], []
        for l in range(L):
            # in fla's orientation h = W^T: keys = the layer's inputs, G = eta * delta
            G = etab[n][..., None] * deltas[l]
            inner = l == L - 1 and eb is not None
            h, s, bZ = _advance(cn, end, inputs[l], G, W[l].mT, None if S is None else S[l].mT,
                                eb[n] if inner else None, KK[n] if inner else None,
                                Tinv[n] if inner else None)
            new_W.append(h.mT)
            new_S.append(None if s is None else s.mT)
            G_n.append(G)
        keys.append(inputs)
        Gs.append(G_n)
        bZs.append(bZ)                                      # the input-side matrix's (l = L - 1)
        W, S = new_W, (new_S if S is not None else None)
    per_layer = lambda xs: [torch.stack([x[l] for x in xs]) for l in range(L)]  # noqa: E731  [N, B, H, ..]
    if not current:
        o = mlp_forward(qb, per_layer(anchors), activation, residual)[0]
    else:
        o = _mlp_read_current(qb, co, per_layer(starts), None if S is None else per_layer(moms),
                              per_layer(keys), per_layer(Gs), None if eb is None else torch.stack(bZs),
                              activation, residual)
    return _unblock(o, T), W, S


def _mlp_read_current(qb, co, W0, S0, keys, G, bZ, activation, residual):
    """``M_{W_{r-1}}(q_r)`` for every token r of every chunk, ``[N, B, H, C, d_out]``: layer by
    layer from the input side, the layer's input ``x`` (q, then the activations of this read)
    reads its matrix before token r's write, with the chunk's start weights ``W0`` (its anchor,
    except in the rest of a carried open chunk) and momenta ``S0``, the layer's anchor inputs
    ``keys`` (its gradients' right factors) and ``G = eta * delta``; the input-side matrix adds the
    erase terms ``bZ``. All ``[N, B, H, ...]`` (lists per layer)."""
    act = ACTIVATIONS[activation][0]
    x = qb
    for l in range(len(W0) - 1, -1, -1):
        x = _read(co, BEFORE_WRITE, x, x @ keys[l].mT, G[l], W0[l].mT,
                  None if S0 is None else S0[l].mT, bZ if l == len(W0) - 1 else None)
        if l > 0:
            x = act(x)
    return x + qb if residual else x


# ---------------------------------------------------------------------------------------------
# argument checks

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

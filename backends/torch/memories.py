"""Functional memories beyond the plain delta family: Titans momentum, deep (MLP) memories, CMS.

Three pieces, each a pure function (Titans §3, Nested Learning §7-8; the maths is in ``README.md`` next
to this file, section "Memories"):

- :func:`momentum_memory`: a matrix memory per head with Titans momentum, a forget gate and an
  optional DGD erase, gradients taken at the chunk's anchor state.
- :func:`mlp_memory` (in ``deep_memory.py``, re-exported here): the deep memory of Titans / Hope,
  ``M(z) = z + W1 act(W2 z)`` (or any depth, with or without the residual), fast weights per batch
  element and head, trained at the chunk's anchor (Eq. 90) and read at the anchor or at the
  current weights, targets given or self-generated (Eq. 95), per-token gradients in closed form
  (a hand-written backward of the MLP), the rule applied per weight matrix.
- :func:`cms_init`, :func:`cms_fast_weights`, :func:`cms_step`: the Continuum Memory System's
  runtime pieces over an explicit state dict (accumulators, fast deltas, token counters).

The in-chunk algebra both memories share (decay matrices, the erase's UT transform, end states
and reads) and the argument checks are in ``memory_core.py``.

Conventions follow ``ops.py`` (flash-linear-attention's functional API)::

    q, k: [B, T, H, K]   v: [B, T, H, V]   eta, beta, alpha, erase: [B, T, H]

``mode="recurrent"`` is the literal token loop (the oracle), ``mode="chunk"`` the chunkwise-parallel
form; both use the same anchor semantics (the anchor is the state at the end of the previous
chunk, chunks starting at absolute positions, multiples of ``chunk_size`` from the sequence
start), so they agree up to rounding for any ``chunk_size >= 1`` and any T; ``chunk_size=1`` is
the exact sequential rule. The states carry the open chunk's anchor and offset, so a sequence fed
in pieces cut anywhere (token by token included) gives what it gives whole.
"""
from __future__ import annotations

import math
from numbers import Real
from typing import NamedTuple

import torch

from nlc.backends.torch.memory_core import (
    AFTER_WRITE, MODES, OBJECTIVES, _advance, _anchored, _blocks, _check_common, _check_offset,
    _chunk_slice, _coefficients, _dtype, _erase_solve, _inputs, _per_token, _read, _require, _unblock)
from nlc.backends.torch.deep_memory import (
    ACTIVATIONS, READS, MLPState, mlp_forward, mlp_memory, mlp_token_grads)
from nlc.backends.torch.ops import check_tensor
from nlc.backends.dispatch import pick
from nlc.backends.torch.precision import full_precision

__all__ = ["momentum_memory", "mlp_memory", "MomentumState", "MLPState", "ACTIVATIONS", "READS",
           "mlp_forward", "mlp_token_grads", "cms_chain", "cms_init", "cms_fast_weights", "cms_step",
           "MODES", "OBJECTIVES"]      # the MLP memory's names re-exported from deep_memory.py


class _Pair(NamedTuple):
    M: torch.Tensor
    S: torch.Tensor


class MomentumState(_Pair):
    """State of :func:`momentum_memory`: the memory ``M`` and its momentum ``S``, each
    ``[B, H, K, V]`` (fla's orientation: the transpose of the paper's ``V x K`` memory), and the
    open chunk: ``offset`` tokens of it consumed (``t mod chunk_size``; chunks start at multiples
    of ``chunk_size`` from the sequence start) and its ``anchor`` memory ``[B, H, K, V]`` (None,
    and ignored, at offset 0).

    It unpacks as the pair ``(M, S)`` (``M, S = state``, as generated code and callers do);
    ``anchor`` and ``offset`` are attributes, ``MomentumState(M, S)`` a state at a chunk boundary.
    """

    def __new__(cls, M, S, anchor=None, offset=0):
        self = super().__new__(cls, M, S)
        self.anchor, self.offset = anchor, offset
        return self

    def __getnewargs__(self):                       # pickle, copy
        return (self.M, self.S, self.anchor, self.offset)

    def _replace(self, **fields):
        return MomentumState(**{**dict(M=self.M, S=self.S, anchor=self.anchor, offset=self.offset), **fields})

    def __repr__(self):
        return f"MomentumState(M={self.M!r}, S={self.S!r}, anchor={self.anchor!r}, offset={self.offset!r})"


# ---------------------------------------------------------------------------------------------
# momentum memory


@full_precision
def momentum_memory(q, k, v, eta, beta, alpha=None, erase=None, *, objective="l2", scale=None,
                    initial_state=None, output_final_state=True, mode="chunk", chunk_size=64, backend="auto"):
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
    Chunks start at multiples of ``chunk_size`` from the sequence start: a carried
    :class:`MomentumState` with an offset first finishes its open chunk at the carried anchor.

    Args:
        q, k: ``[B, T, H, K]`` (keys L2-normalised where an erase is used). v: ``[B, T, H, V]``.
        eta, beta: ``[B, T, H]`` learning rate and momentum decay (or numbers). alpha: retention
            (the same), or None: 1, no retention.
        erase: ``[B, T, H]``, a number, or None (no erase).
        objective: ``"l2"`` or ``"dot"``. scale: multiplies q; defaults to ``K ** -0.5``.
        initial_state: None, ``(M0, S0)`` (each ``[B, H, K, V]`` or None: zeros) or a
            :class:`MomentumState` (with its anchor and offset).
        output_final_state: return the final state, else None.
        mode: ``"chunk"`` or ``"recurrent"``. chunk_size: tokens per anchor (both modes).
        backend: who runs ``mode="chunk"``: ``"torch"``, ``"triton"`` (skeleton 1c,
            ``nlc.backends.triton.momentum``: chunk 16, 32 or 64, K and V up to 256, forward and
            backward kernels) or ``"auto"`` (Triton for CUDA tensors it takes, torch otherwise). A
            state with an offset > 0 runs the rest of its open chunk on torch, the chunks after
            it on the kernel.

    Returns:
        ``(o, MomentumState(M, S, anchor, offset))``: o ``[B, T, H, V]`` in q's dtype; ``M, S``
        ``[B, H, K, V]``; ``offset = (initial offset + T) mod chunk_size``, ``anchor`` the open
        chunk's anchor (None at offset 0).
        Any alpha and beta (zero and negative included) are exact in both modes.
    """
    op = "momentum_memory"
    _check_common(op, q, k, v, objective, mode, chunk_size)
    _require(op, eta=eta, beta=beta)
    B, T, H, K = q.shape
    V = v.shape[-1]
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, Real)
                              or not math.isfinite(scale)):
        raise ValueError(f"{op}: scale must be a finite number or None, got {scale!r}")
    A0, offset = ((initial_state.anchor, initial_state.offset) if isinstance(initial_state, MomentumState)
                  else (None, 0))
    _check_offset(op, offset, chunk_size, A0)
    A0 = A0 if offset else None                     # at a chunk boundary the anchor is M
    M0, S0 = (None, None) if initial_state is None else tuple(initial_state)
    for name, t in (("initial_state[0] (M)", M0), ("initial_state[1] (S)", S0), ("the anchor", A0)):
        if t is not None:
            check_tensor(op, name, t, q)
            if tuple(t.shape) != (B, H, K, V):
                raise ValueError(f"{op}: {name} must have shape [B, H, K, V] = [{B}, {H}, {K}, {V}], "
                                 f"got {tuple(t.shape)}")
    dtype, out_dtype = _dtype(q, k, v, eta, beta, alpha, erase, M0, S0, A0), q.dtype
    inputs = _inputs(q, k, v, dtype)
    eta, beta, alpha, erase = (_per_token(op, n, x, q, dtype) for n, x in
                               (("eta", eta), ("beta", beta), ("alpha", 1.0 if alpha is None else alpha),
                                ("erase", erase)))
    q, k, v = (x.to(dtype) for x in (q, k, v))
    M = q.new_zeros(B, H, K, V) if M0 is None else M0.to(dtype)
    S = q.new_zeros(B, H, K, V) if S0 is None else S0.to(dtype)
    A = None if A0 is None else A0.to(dtype)
    q = q * (K ** -0.5 if scale is None else scale)
    if mode == "recurrent":
        o, M, S, A = _momentum_recurrent(q, k, v, eta, beta, alpha, erase, objective, M, S, chunk_size,
                                         A, offset)
        offset = (offset + T) % chunk_size
    else:
        kernel = None
        if backend != "torch":
            from nlc.backends.triton import momentum
            if pick(op, backend, q, why_not=momentum.supports(K, V, chunk_size)) == "triton":
                kernel = momentum.chunk_momentum_memory
        toks = (q, k, v, eta, beta, alpha, erase)

        def piece(a, b, st, anchor):
            xs = [None if x is None else x[:, a:b] for x in toks]
            if kernel is not None and anchor is None:   # whole chunks, and a new open chunk
                o, M_, S_ = kernel(*xs, objective, *st, chunk_size, inputs=inputs)
            else:                                       # (or the rest of an open chunk) on torch
                o, M_, S_ = _momentum_chunk(*xs, objective, *st, chunk_size, anchor)
            return o, (M_, S_)

        o, (M, S), A, offset = _anchored(piece, T, chunk_size, offset, A, (M, S))
    return o.to(out_dtype), (MomentumState(M, S, A, offset) if output_final_state else None)


def _momentum_recurrent(q, k, v, eta, beta, alpha, erase, objective, M, S, C, anchor=None, offset=0):
    """The token loop (the reference): the anchor becomes the running memory at every absolute
    position ``offset + t`` that is a multiple of C. Returns ``(o, M, S, anchor)``, the anchor
    the open chunk's (None where ``(offset + T) % C`` is 0)."""
    outs = []
    anchor = M if anchor is None else anchor
    for t in range(q.shape[1]):
        if (offset + t) % C == 0:
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
    return o, M, S, (anchor if (offset + T) % C else None)


def _momentum_chunk(q, k, v, eta, beta, alpha, erase, objective, M, S, C, anchor=None):
    """Chunks of C from the first token, the first one's gradients at ``anchor`` (None: at M;
    otherwise T <= C, the rest of a carried open chunk). Returns ``(o, M, S)``."""
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
        A = anchor if n == 0 and anchor is not None else M
        err = -vb[n] if objective == "dot" else kb[n] @ A - vb[n]
        G = etab[n][..., None] * err
        M, S, bZ = _advance(_chunk_slice(co, n), end, kb[n], G, M, S,
                            None if eb is None else eb[n], None if KK is None else KK[n],
                            None if Tinv is None else Tinv[n])
        Gs.append(G)
        bZs.append(bZ)
    M0s, S0s, G = torch.stack(starts_M), torch.stack(starts_S), torch.stack(Gs)
    o = _read(co, AFTER_WRITE, qb, qb @ kb.mT, G, M0s, S0s, None if erase is None else torch.stack(bZs))
    return _unblock(o, T), M, S


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


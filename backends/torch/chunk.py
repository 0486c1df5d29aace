"""Chunkwise-parallel (WY/UT) form of the generalized delta recurrence.

    h_t = a_t h_{t-1} - b_t k_t (k_t^T h_{t-1}) + k_t w_t^T,     o_t = h_t^T q_t

Inside a chunk every token's contribution is expressed through the chunk-start state with one
unit-lower-triangular solve and matmuls; across chunks only a ``[K, K] @ [K, V]`` product per
chunk is sequential. The derivation and the names used here (G, A, U, W, Gamma, M_n) are in
``README.md`` next to this file. Called through ``nlc.backends.torch.ops``, which validates and
casts the arguments.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["chunk_generalized_delta"]


def chunk_generalized_delta(q, k, w, log_a, b, h0, chunk_size):
    """Chunked generalized delta rule.

    Args:
        q: ``[B, T, H, K]``, already multiplied by the scale. k: ``[B, T, H, K]``.
        w: ``[B, T, H, V]``.
        log_a: ``[B, T, H]`` log-retention, or None for ``a = 1``.
        b: ``[B, T, H]`` erase strength, or None for ``b = 0`` (no solve is needed then).
        h0: ``[B, H, K, V]`` or None (zeros). chunk_size: ``C >= 1``.

    Returns:
        ``(o, h_T)``: o ``[B, T, H, V]``, h_T ``[B, H, K, V]``.
    """
    B, T, H, K = q.shape
    V = w.shape[-1]
    h = h0 if h0 is not None else q.new_zeros(B, H, K, V)
    if T == 0:
        return q.new_zeros(B, 0, H, V), h
    C = chunk_size
    N = -(-T // C)
    pad = N * C - T

    def blocks(x):
        # [B, T, H, *d] -> [B, H, N, C, *d]. Padded tokens have k = w = 0, log a = b = 0: the
        # identity step, so they change no state and their outputs are dropped.
        x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))
        return x.reshape(B, N, C, *x.shape[2:]).movedim(3, 1)

    qb, kb, wb = blocks(q), blocks(k), blocks(w)
    la = blocks(log_a) if log_a is not None else q.new_zeros(B, H, N, C)
    G = la.cumsum(-1)                   # G_r = sum_{i <= r} log a_i, per chunk
    G_prev = G - la                     # G_{r-1}

    ones = torch.ones(C, C, dtype=torch.bool, device=q.device)
    incl, strict = ones.tril(), ones.tril(-1)
    Gamma = _decay(G, G, incl)          # exp(G_r - G_i) for i <= r
    P = (qb @ kb.mT) * Gamma            # intra-chunk read weights

    if b is None:
        U, W = wb, None
    else:
        bb = blocks(b)
        A = bb[..., None] * _decay(G_prev, G, strict) * (kb @ kb.mT)
        rhs = torch.cat([wb, (bb * G_prev.exp())[..., None] * kb], dim=-1)
        eye = torch.eye(C, dtype=q.dtype, device=q.device)
        U, W = torch.linalg.solve_triangular(A + eye, rhs, upper=False,
                                             unitriangular=True).split([V, K], dim=-1)

    g_end = G[..., -1]                                  # log decay over the whole chunk
    kd = kb * (g_end[..., None] - G).exp()[..., None]   # k_i decayed to the chunk end
    qd = qb * G.exp()[..., None]                        # q_r reading the chunk-start state
    o_intra = P @ U
    q_state = qd if W is None else qd - P @ W           # o_n = o_intra + q_state @ h_n
    write = kd.mT @ U                                   # h_{n+1} = M_n h_n + write_n
    if W is None:
        M = None
        decay_end = g_end.exp()[..., None, None]
    else:
        M = g_end.exp()[..., None, None] * torch.eye(K, dtype=q.dtype, device=q.device) - kd.mT @ W

    starts = []
    for n in range(N):
        starts.append(h)
        if M is None:
            h = decay_end[:, :, n] * h + write[:, :, n]
        else:
            h = M[:, :, n] @ h + write[:, :, n]
    o = o_intra + q_state @ torch.stack(starts, dim=2)
    o = o.movedim(1, 3).reshape(B, N * C, H, V)[:, :T]
    return o, h


def _decay(rows, cols, mask):
    """``exp(rows_r - cols_i)`` where ``mask[r, i]``, else 0; masked before exp (no inf * 0)."""
    diff = rows[..., :, None] - cols[..., None, :]
    return diff.masked_fill(~mask, float("-inf")).exp()

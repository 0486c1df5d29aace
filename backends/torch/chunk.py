"""Chunkwise-parallel (WY/UT) form of the generalized delta recurrence.

    h_t = a_t h_{t-1} - b_t k_t (k_t^T h_{t-1}) + k_t w_t^T,     o_t = h_t^T q_t

Inside a chunk every token's contribution is expressed through the chunk-start state with one
unit-lower-triangular solve and matmuls; across chunks only a ``[K, K] @ [K, V]`` product per
chunk is sequential. The derivation and the names used here (G, A, U, W, Gamma, M_n) are in
``README.md`` next to this file. Called through ``nlc.backends.torch.ops``, which validates,
casts and floors the arguments (``log_a >= LOG_A_MIN``). Per-channel retention and a general
rank-one erase (the DPLR widening) are ``chunk_dplr.py``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["chunk_generalized_delta", "to_chunks", "from_chunks", "carry"]


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
    # padded tokens have k = w = 0, log a = b = 0: the identity step (no state change, outputs dropped)
    blocks = lambda x: to_chunks(x, C)  # noqa: E731
    qb, kb, wb = blocks(q), blocks(k), blocks(w)
    incl = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    if log_a is None:                   # a = 1: every decay factor is 1
        G = None
        Gamma = incl.to(q.dtype)
    else:
        G = blocks(log_a).cumsum(-1)    # G_r = sum_{i <= r} log a_i, per chunk
        Gamma = _decay(G, incl)         # exp(G_r - G_i) for i <= r, else 0
    P = (qb @ kb.mT) * Gamma            # intra-chunk read weights

    if b is None:
        UW = wb                         # U = w, no W: nothing to solve
    else:
        bb = blocks(b)
        # exp(G_{r-1} - G_i) for i < r is row r-1 of Gamma: shift Gamma down by one row
        A = bb[..., None] * _shift_rows(Gamma) * (kb @ kb.mT)
        d = bb if G is None else bb * _shift_rows(G.exp()[..., None], fill=1.0)[..., 0]
        rhs = torch.cat([wb, d[..., None] * kb], dim=-1)
        eye = torch.eye(C, dtype=q.dtype, device=q.device)
        UW = torch.linalg.solve_triangular(A + eye, rhs, upper=False, unitriangular=True)

    if G is None:
        kd, qd, decay_end = kb, qb, None
    else:
        g_end = G[..., -1:]                             # log decay over the whole chunk
        kd = kb * (g_end - G).exp()[..., None]          # k_i decayed to the chunk end
        qd = qb * G.exp()[..., None]                    # q_r reading the chunk-start state
        decay_end = g_end.exp()[..., None]              # [N, B, H, 1, 1]
    # one matmul each for [U | W]: P U, P W and kd^T U, kd^T W
    o_intra, PW = (P @ UW).split([V, UW.shape[-1] - V], dim=-1)
    write, KW = (kd.mT @ UW).split([V, UW.shape[-1] - V], dim=-1)
    write = write.contiguous()
    q_state = qd if b is None else qd - PW  # o_n = o_intra_n + q_state_n h_n
    if b is None:
        M = None
    else:                               # h_{n+1} = M_n h_n + write_n
        eye_k = torch.eye(K, dtype=q.dtype, device=q.device)
        M = (eye_k if decay_end is None else decay_end * eye_k) - KW

    starts, h = carry(h, write, M, decay_end)
    return from_chunks(o_intra + q_state @ starts, T), h


def carry(h, write, M=None, decay=None):
    """The sequential pass over chunks: ``h_{n+1} = M_n h_n + write_n`` (or ``decay_n * h_n +
    write_n``, or ``h_n + write_n``). Returns the chunk-start states stacked ``[N, B, H, K, V]`` and
    the final state. write ``[N, B, H, K, V]``, M ``[N, B, H, K, K]``, decay broadcast against h."""
    B, H, K, V = h.shape
    starts = []
    for n in range(write.shape[0]):
        starts.append(h)
        if M is not None:
            h = torch.baddbmm(write[n].flatten(0, 1), M[n].flatten(0, 1), h.flatten(0, 1)).view(B, H, K, V)
        elif decay is not None:
            h = decay[n] * h + write[n]
        else:
            h = h + write[n]
    return torch.stack(starts), h


def from_chunks(o, T):
    """``[N, B, H, C, V] -> [B, T, H, V]``, the inverse of :func:`to_chunks` (padding dropped)."""
    N, B, H, C, V = o.shape
    return o.permute(1, 0, 3, 2, 4).reshape(B, N * C, H, V)[:, :T]


def to_chunks(x, C):
    """``[B, T, H, *d] -> [N, B, H, C, *d]``, zero-padded to ``N = ceil(T / C)`` chunks: chunk index
    first, so a sequential pass over chunks reads contiguous slices."""
    B, T = x.shape[:2]
    N = -(-T // C)
    if N * C > T:
        x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, N * C - T))
    x = x.reshape(B, N, C, *x.shape[2:])
    return x.permute(1, 0, 3, 2, *range(4, x.dim())).contiguous()


def _decay(G, mask):
    """``exp(G_r - G_i)`` where ``mask[r, i]``, else 0; masked before exp (no inf * 0)."""
    diff = G[..., :, None] - G[..., None, :]
    return diff.masked_fill(~mask, float("-inf")).exp()


def _shift_rows(x, fill=0.0):
    """Row r of the result is row r-1 of x; row 0 is ``fill``."""
    return F.pad(x[..., :-1, :], (0, 0, 1, 0), value=fill)

"""Chunkwise-parallel (WY/UT) form of the diagonal-plus-low-rank (DPLR) delta recurrence.

    h_t = diag(a_t) h_{t-1} - u_t (e_t^T h_{t-1}) + k_t w_t^T,     o_t = h_t^T q_t

with one retention per key channel (``a_t`` in R^K) and a general rank-one erase (``u_t``,
``e_t`` in R^K). It is the general path of ``nlc.backends.torch.ops.generalized_delta``, used when
``a`` is per-channel or ``erase=(u, e)`` is given; the scalar-retention, erase-along-k case keeps
the faster form in ``chunk.py``. A reference, readable first: every per-channel decay between two
tokens of a chunk is held explicitly (``[C, C, K]`` per chunk), never factored as
``exp(G_r) * exp(-G_i)``, so no exponent is positive for ``a <= 1`` and nothing overflows. The
derivation and the names (G, Gamma, Gamma_s, A_ek, A_eu, U_z, W_z, M_n) are in ``README.md`` next
to this file. Called through ``ops``, which validates, casts and floors the arguments.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from nlc.backends.torch.chunk import carry, from_chunks, to_chunks

__all__ = ["chunk_dplr_delta"]


def chunk_dplr_delta(q, k, w, log_a, u, e, h0, chunk_size):
    """Chunked DPLR delta rule.

    Args:
        q: ``[B, T, H, K]``, already multiplied by the scale. k: ``[B, T, H, K]``.
        w: ``[B, T, H, V]``.
        log_a: ``[B, T, H, K]`` per-channel log-retention (finite: ``ops`` floors it).
        u, e: ``[B, T, H, K]`` the erase ``u_t (e_t^T h_{t-1})``, or both None (no erase, no solve).
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
    # padded tokens have k = w = u = e = 0, log a = 0: the identity step (no state change, outputs dropped)
    blocks = lambda x: to_chunks(x, C)  # noqa: E731

    qb, kb, wb = blocks(q), blocks(k), blocks(w)
    G = blocks(log_a).cumsum(-2)                      # G_r = sum_{i <= r} log a_i   [N, B, H, C, K]
    G_prev = F.pad(G[..., :-1, :], (0, 0, 1, 0))      # G_{r-1}, with G_0 = 0
    g_end = G[..., -1:, :]                            # log decay over the whole chunk
    ones = torch.ones(C, C, dtype=torch.bool, device=q.device)
    Gamma = _decay(G, G, ones.tril())                 # exp(G_r - G_i), i <= r   [..., C, C, K]

    qt = qb * G.exp()                                 # q_r reading the chunk-start state
    kt = kb * (g_end - G).exp()                       # k_i decayed to the chunk end
    o_intra = _weighted(qb, Gamma, kb) @ wb           # P_k W
    write = kt.mT @ wb                                # K~^T W
    if u is None:                                     # h_{n+1} = diag(exp(G_C)) h_n + write_n
        q_state, M = qt, None
    else:
        ub, eb = blocks(u), blocks(e)
        Gamma_s = _decay(G_prev, G, ones.tril(-1))    # exp(G_{r-1} - G_i), i < r
        A_eu = _weighted(eb, Gamma_s, ub)             # strictly lower triangular
        A_ek = _weighted(eb, Gamma_s, kb)
        # z_r = h_{r-1}^T e_r solves (I + A_eu) Z = A_ek W + E~ h_0 with E~_r = e_r * exp(G_{r-1}):
        # one solve with both right-hand sides gives Z = U_z + W_z h_0
        rhs = torch.cat([A_ek @ wb, eb * G_prev.exp()], dim=-1)
        eye = torch.eye(C, dtype=q.dtype, device=q.device)
        U_z, W_z = torch.linalg.solve_triangular(A_eu + eye, rhs, upper=False,
                                                 unitriangular=True).split([V, K], dim=-1)
        P_u = _weighted(qb, Gamma, ub)
        o_intra = o_intra - P_u @ U_z
        q_state = qt - P_u @ W_z                      # o_n = o_intra_n + q_state_n h_n
        ut = ub * (g_end - G).exp()                   # u_i decayed to the chunk end
        write = write - ut.mT @ U_z
        M = torch.diag_embed(g_end[..., 0, :].exp()) - ut.mT @ W_z   # h_{n+1} = M_n h_n + write_n

    starts, h = carry(h, write, M, decay=g_end[..., 0, :, None].exp())   # decay [N, B, H, K, 1]
    return from_chunks(o_intra + q_state @ starts, T), h


def _decay(G_row, G_col, mask):
    """``exp(G_row[r] - G_col[i])`` per channel where ``mask[r, i]``, else 0: ``[..., C, C, K]``.

    Masked to -inf *before* exp: the entries above the mask (positive exponents) are never
    exponentiated, and their gradient is exactly 0 (no inf * 0)."""
    diff = G_row[..., :, None, :] - G_col[..., None, :, :]
    return diff.masked_fill(~mask[..., None], float("-inf")).exp()


def _weighted(x, Gam, y):
    """``sum_c x[r, c] Gam[r, i, c] y[i, c]``: the decay-weighted products ``[..., C, C]``."""
    return torch.einsum("...rc,...ric,...ic->...ri", x, Gam, y)

"""The in-chunk algebra and the argument checks shared by :mod:`memories` and :mod:`deep_memory`.

Every memory here keeps, per matrix, ``S_r = beta_r S_{r-1} + k_r G_r^T`` and
``h_r = (alpha_r I - erase_r k_r k_r^T) h_{r-1} - S_r`` over the tokens ``r = 1..C`` of a chunk,
with the ``G_r`` computed from the chunk's anchor (fla orientation, ``h`` ``[K, V]``). Inside the
chunk every ``h_r`` is an affine function of ``h_0``, ``S_0`` and the rank-1 terms ``k_i G_i^T``,
with coefficients from segment products of alpha and beta (README "Memories": decay matrices, the
UT transform of the erase). :func:`_advance` gives the chunk's end state, :func:`_read` the reads
``x_r^T h_r`` (after token r's write) or ``x_r^T h_{r-1}`` (before it) for all rows at once.
Chunks start at absolute multiples of the chunk size: :func:`_anchored` cuts a call that starts
inside a chunk (a carried state with an offset) into the rest of that chunk, whole chunks and the
new open chunk.
"""
from __future__ import annotations

from numbers import Real
from typing import NamedTuple

import torch
import torch.nn.functional as F

from nlc.backends.torch.ops import HALF, check_tensor

MODES = ("chunk", "recurrent")
OBJECTIVES = ("l2", "dot")

AFTER_WRITE, BEFORE_WRITE = slice(1, None), slice(None, -1)     # rows of h_r read by token r


# ---------------------------------------------------------------------------------------------
# decay matrices, the UT transform of the erase, end states and reads


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


def _kernel_coefficients(eta, beta, alpha, C, T):
    """What the Triton memories' wrappers build their per-chunk coefficients from: the chunks'
    ``_Coef`` (alpha None: 1; beta None: no momentum), eta blocked ``[N, B, H, C]``, and ``at(x)`` /
    ``row(X)``, a ``[N, B, H, C + 1]`` vector's / ``[N, B, H, C + 1, C]`` matrix's entry or row at
    each chunk's end (C, or the last real token's row in a ragged last chunk)."""
    B, _, H = eta.shape
    N = -(-T // C)
    co = _coefficients(_blocks(torch.ones_like(eta) if alpha is None else alpha, C, N, 1.0),
                       None if beta is None else _blocks(beta, C, N, 1.0))
    ends = torch.full((N,), C, device=eta.device)
    ends[-1] = T - (N - 1) * C
    at = lambda x: x.gather(-1, ends.view(N, 1, 1, 1).expand(N, B, H, 1)).squeeze(-1)  # noqa: E731
    row = lambda X: X.gather(-2, ends.view(N, 1, 1, 1, 1).expand(N, B, H, 1, C)).squeeze(-2)  # noqa: E731
    return co, _blocks(eta, C, N), at, row


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
        rhs = _read(co, BEFORE_WRITE, keys, KK, G, h0, S0)      # K h_{r-1} without the erase terms
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


def _read(co, rows, X, XK, G, h0, S0=None, bZ=None):
    """``x_r^T h_j`` for every token r of the chunk, ``j = r`` (``rows=AFTER_WRITE``) or ``r - 1``
    (``BEFORE_WRITE``): ``A_j X h0 - ((X K^T) * Phi_j) G - c_j X S0 - ((X K^T) * Da_j) (erase Z)``.

    X ``[..., C, K]`` (one input per token), ``XK = X @ keys^T`` ``[..., C, C]``, ``G`` ``[..., C, V]``;
    ``bZ`` is :func:`_advance`'s ``erase * Z`` (None: no erase). The masks are the coefficients'
    triangles: lower (diagonal included) after the write, strictly lower before it."""
    o = co.A[..., rows, None] * (X @ h0) - (XK * co.Phi[..., rows, :]) @ G
    if co.c is not None:
        o = o - co.c[..., rows, None] * (X @ S0)
    if bZ is not None:
        o = o - (XK * co.Da[..., rows, :]) @ bZ
    return o


# ---------------------------------------------------------------------------------------------
# chunks anchored at absolute positions


def _check_offset(op, offset, C, anchor):
    """A carried state's offset (tokens of its open chunk already consumed) and anchor."""
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < C:
        raise ValueError(f"{op}: the state's offset must be an int in [0, chunk_size) = [0, {C}) (tokens "
                         f"of the open chunk already consumed), got {offset!r}")
    if offset and anchor is None:
        raise ValueError(f"{op}: a state with offset {offset} > 0 (inside a chunk) must carry that "
                         f"chunk's anchor")


def _anchored(run, T, C, offset, anchor, state):
    """Run a chunk core over T tokens so that chunks start at absolute multiples of ``C``, the call
    starting ``offset`` tokens into an open chunk whose anchor is ``anchor``.

    ``run(a, b, state, anchor)`` runs tokens ``[a, b)`` from ``state`` (a tuple, weights first) in
    chunks of C counted from ``a``, the first chunk's gradients at ``anchor`` (None: at the state
    itself), and returns ``(o, state)``. The pieces: the rest of the open chunk (gradients at the
    carried anchor), the whole chunks, the new open chunk (anchored at the state before it).
    Returns ``(outputs, state, anchor, offset)`` with the open chunk's anchor (None at offset 0)."""
    head = min((C - offset) % C, T)
    tail = (T - head) % C
    outs = []
    if head:
        o, state = run(0, head, state, anchor)
        outs.append(o)
    if T - tail > head:
        o, state = run(head, T - tail, state, None)
        outs.append(o)
    if tail:
        anchor = state[0]
        o, state = run(T - tail, T, state, None)
        outs.append(o)
    if not outs:                                        # T = 0: the core's empty output
        outs.append(run(0, 0, state, None)[0])
    end = (offset + T) % C
    return (outs[0] if len(outs) == 1 else torch.cat(outs, 1)), state, (anchor if end else None), end


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


def _inputs(q, k, v, dtype):
    """The 16-bit dtype that q, k and v share, where the memory computes in float32 (None
    otherwise): a Triton kernel takes its products in TF32 for such inputs (``plan.products``)."""
    return q.dtype if dtype == torch.float32 and q.dtype in HALF and k.dtype == v.dtype == q.dtype else None


def _dtype(*tensors):
    dtype = torch.float32
    for t in tensors:
        if isinstance(t, torch.Tensor):
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


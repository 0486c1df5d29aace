"""The DPLR delta rule on Triton (RWKV-7's form): skeleton 1d, ``skeletons/dplr_chunk.py``,
forward and backward.

:func:`chunk_dplr_delta` takes what the torch backend's DPLR core takes
(``nlc.backends.torch.chunk_dplr.chunk_dplr_delta``) with an erase: q already scaled, ``log_a``
``[B, T, H, K]`` floored at ``LOG_A_MIN``, the erase ``u_t (e_t^T h_{t-1})``. The chunk is 16 tokens
whatever the caller's chunk size (the form is exact for any chunk; the intra-chunk products are
``[16, 16, 16]`` per block of key channels, as skeleton 1b's). K is at most 128: the per-chunk state
transition ``Mn`` is one ``[K, K]`` tile.
"""
from __future__ import annotations

import torch

from nlc.backends.torch.ops import HALF
from nlc.backends.triton import template
from nlc.backends.triton.plan import DPLR_MAX_K as MAX_K, pow2 as _pow2, products

__all__ = ["chunk_dplr_delta", "launch", "supports", "MAX_K"]

BC = 16


def supports(K: int) -> str | None:
    """Why the kernels cannot take this key size (None: they can)."""
    if K > MAX_K:
        return f"the DPLR kernels take K up to {MAX_K} (the state transition is one [K, K] tile), got {K}"
    return None


def launch(K: int, V: int, dtype, prec: str | None = None) -> dict:
    """Tile constants: chunks of BC = 16, the per-channel products BKS = 16 channels at a time,
    the key dimension whole (BK), BV value columns, 4 warps. {kernel name: (constexpr dict,
    num_stages, num_warps)}, as ``delta.launch``. Products (``prec``, default
    ``plan.products(dtype)``): float64 exact ("ieee"); float32 as three TF32 products ("tf32x3",
    float32's order of error), as the deep and momentum memories; 16-bit inputs "tf32".
    ptxas for sm_90 gave the state passes with "ieee" 32 registers and 6 KB of spills at K = 64
    (20 KB at 128), with "tf32x3" 255 registers and under 0.1 KB (2.7 KB). Untimed on a card."""
    import triton.language as tl
    f64 = dtype == torch.float64
    meta = dict(BC=BC, BK=_pow2(K), BV=min(_pow2(V), 32), ACC=tl.float64 if f64 else tl.float32,
                PREC=prec or products(dtype))
    chunk = dict(meta, BKS=16)
    state = {k: v for k, v in meta.items() if k != "BC"}
    return {"dplr_prep": (chunk, 1, 4), "dplr_state_fwd": (state, 1, 4), "dplr_out": (meta, 1, 4),
            "dplr_state_bwd": (meta, 1, 4), "dplr_chunk_bwd": (chunk, 1, 4)}


def kernels(interpret: bool):
    return template.load("dplr_chunk", {}, interpret)


def chunk_dplr_delta(q, k, w, log_a, u, e, h0):
    """``(o [B, T, H, V], h_T [B, H, K, V])`` of ``h_t = diag(a_t) h_{t-1} - u_t (e_t^T h_{t-1}) +
    k_t w_t^T``, ``o_t = h_t^T q_t``."""
    B, T, H, K = q.shape
    why = supports(K)
    if why is not None:
        raise ValueError(f"generalized_delta on Triton: {why}; use backend='torch'")
    if T == 0:
        h = h0 if h0 is not None else q.new_zeros(B, H, K, w.shape[-1])
        return q.new_zeros(B, 0, H, w.shape[-1]), h
    prec = products(q.dtype)
    if q.dtype in HALF:                              # 16-bit inputs: float32 tiles, TF32 products
        q, k, w, log_a, u, e = (x.float() for x in (q, k, w, log_a, u, e))
        h0 = None if h0 is None else h0.float()
    return _DPLRChunk.apply(prec, q, k, w, log_a, u, e, h0)


def _sizes(q, w, prec):
    """(B, T, H, K, V, N, NT, launch table, BV, kernels) of a call."""
    B, T, H, K = q.shape
    V = w.shape[-1]
    N = -(-T // BC)
    cfg = launch(K, V, q.dtype, prec)
    return B, T, H, K, V, N, N * BC, cfg, cfg["dplr_out"][0]["BV"], kernels(not q.is_cuda)


def _go(mod, cfg, name, grid, *args, **flags):
    meta, stages, warps = cfg[name]
    getattr(mod, name)[grid](*args, **flags, **meta, num_stages=stages, num_warps=warps)


class _DPLRChunk(torch.autograd.Function):
    @staticmethod
    def forward(ctx, prec, q, k, w, log_a, u, e, h0):
        q, k, w, log_a, u, e = (x.contiguous() for x in (q, k, w, log_a, u, e))
        h0 = None if h0 is None else h0.contiguous()
        B, T, H, K, V, N, NT, cfg, BV, mod = _sizes(q, w, prec)
        ws = lambda *shape: q.new_empty(B * H, *shape)  # noqa: E731
        mats, uz, wz, qs = ws(N, 4, BC, BC), ws(NT, V), ws(NT, K), ws(NT, K)
        mn, wr, hs = ws(N, K, K), ws(N, K, V), ws(N, K, V)
        hT, o = q.new_empty(B, H, K, V), q.new_empty(B, T, H, V)
        _go(mod, cfg, "dplr_prep", (N, B * H), q, k, u, e, w, log_a, mats, uz, wz, qs, mn, wr, T, H, K, V, N, NT)
        _go(mod, cfg, "dplr_state_fwd", (B * H, -(-V // BV)), mn, wr, q.new_zeros(1) if h0 is None else h0, hs, hT,
            K, V, N, HAS_H0=h0 is not None)
        _go(mod, cfg, "dplr_out", (N, B * H, -(-V // BV)), w, mats, uz, qs, hs, o, T, H, K, V, N, NT)
        ctx.save_for_backward(q, k, w, log_a, u, e, mats, uz, wz, qs, mn, hs)
        ctx.has_h0, ctx.prec = h0 is not None, prec
        return o, hT

    @staticmethod
    def backward(ctx, do, dhT):
        q, k, w, log_a, u, e, mats, uz, wz, qs, mn, hs = ctx.saved_tensors
        B, T, H, K, V, N, NT, cfg, BV, mod = _sizes(q, w, ctx.prec)
        do = (torch.zeros_like(w) if do is None else do).contiguous()
        dhs, dh0 = torch.empty_like(hs), q.new_empty(B, H, K, V)
        _go(mod, cfg, "dplr_state_bwd", (B * H, -(-V // BV)), mn, qs, do,
            q.new_zeros(1) if dhT is None else dhT.contiguous(), dhs, dh0, T, H, K, V, N, NT, HAS_DHT=dhT is not None)
        y, d, g = q.new_empty(B * H, NT, V), q.new_empty(B * H, NT, V), q.new_empty(B * H, 4 * NT, K)
        dq, dk, du, de, dla = (torch.empty_like(q) for _ in range(5))
        dw = torch.empty_like(w)
        _go(mod, cfg, "dplr_chunk_bwd", (N, B * H), q, k, u, e, w, log_a, do, mats, uz, wz, hs, dhs, y, d, g,
            dq, dk, du, de, dw, dla, T, H, K, V, N, NT)
        return None, dq, dk, dw, dla, du, de, (dh0 if ctx.has_h0 else None)

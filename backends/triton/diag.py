"""A per-channel (diagonal) retention without an erase on Triton (GLA's form): skeleton 1b,
``skeletons/diag_chunk.py``, forward and backward.

:func:`chunk_diag_delta` takes what the torch backend's DPLR core takes when there is no erase
(``nlc.backends.torch.chunk_dplr.chunk_dplr_delta`` with ``u = e = None``): q already scaled,
``log_a`` ``[B, T, H, K]`` floored at ``LOG_A_MIN``. The chunk is 16 tokens whatever the caller's
chunk size (the form is exact for any chunk; the intra-chunk term is a ``[16, 16, BKS]`` product).
"""
from __future__ import annotations

import torch

from nlc.backends.triton import template
from nlc.backends.triton.plan import pow2 as _pow2, products

__all__ = ["chunk_diag_delta", "launch"]

BC = 16


def launch(K: int, V: int, dtype) -> dict:
    """Tile constants: the state passes split K and V (each key channel decays on its own), the
    per-chunk kernels take the key channels BKS = 16 at a time (the 3-D intra-chunk product).
    {kernel name: (constexpr dict, num_stages, num_warps)}, as ``delta.launch``."""
    import triton.language as tl
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    prec = products(dtype, float32="ieee")
    BK, BV = min(_pow2(K), 64), min(_pow2(V), 64)
    state = dict(BC=BC, BK=BK, BV=BV, ACC=acc, PREC=prec)
    chunk = dict(BC=BC, BKS=16, BV=BV, ACC=acc, PREC=prec)
    return {"diag_state_fwd": (state, 2, 4), "diag_state_bwd": (state, 2, 4), "diag_out": (chunk, 1, 4),
            "diag_dw": (chunk, 1, 4), "diag_dqk": (chunk, 1, 4)}


def kernels(interpret: bool):
    return template.load("diag_chunk", {}, interpret)


def chunk_diag_delta(q, k, w, log_a, h0):
    """``(o [B, T, H, V], h_T [B, H, K, V])`` of ``h_t = diag(a_t) h_{t-1} + k_t w_t^T``, ``o_t = h_t^T q_t``."""
    if q.shape[1] == 0:
        B, _, H, K = q.shape
        h = h0 if h0 is not None else q.new_zeros(B, H, K, w.shape[-1])
        return q.new_zeros(B, 0, H, w.shape[-1]), h
    return _DiagChunk.apply(q, k, w, log_a, h0)


def _go(mod, cfg, name, grid, *args, num_warps=None, **flags):
    meta, stages, warps = cfg[name]
    getattr(mod, name)[grid](*args, **flags, **meta, num_stages=stages, num_warps=num_warps or warps)


class _DiagChunk(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, w, log_a, h0):
        q, k, w, log_a = (x.contiguous() for x in (q, k, w, log_a))
        h0 = None if h0 is None else h0.contiguous()
        B, T, H, K = q.shape
        V = w.shape[-1]
        N = -(-T // BC)
        cfg = launch(K, V, q.dtype)
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        mod = kernels(not q.is_cuda)
        st = cfg["diag_state_fwd"][0]
        hs = q.new_empty(B * H, N, K, V, dtype=acc)
        hT = q.new_empty(B, H, K, V, dtype=acc)
        o = q.new_empty(B, T, H, V, dtype=acc)
        dummy = q.new_zeros(1)
        _go(mod, cfg, "diag_state_fwd", (B * H, -(-K // st["BK"]), -(-V // st["BV"])), k, w, log_a,
            dummy if h0 is None else h0, hs, hT, T, H, K, V, N, HAS_H0=h0 is not None)
        _go(mod, cfg, "diag_out", (N, B * H, -(-V // cfg["diag_out"][0]["BV"])), q, k, w, log_a, hs, o,
            T, H, K, V, N)
        ctx.save_for_backward(q, k, w, log_a, hs)
        ctx.meta = (h0 is not None, None if h0 is None else h0.dtype)
        return o, hT

    @staticmethod
    def backward(ctx, do, dhT):
        q, k, w, log_a, hs = ctx.saved_tensors
        has_h0, h0_dtype = ctx.meta
        B, T, H, K = q.shape
        V = w.shape[-1]
        N = -(-T // BC)
        cfg = launch(K, V, q.dtype)
        acc = hs.dtype
        mod = kernels(not q.is_cuda)
        st = cfg["diag_state_bwd"][0]
        do = (torch.zeros(B, T, H, V, dtype=acc, device=q.device) if do is None else do).contiguous()
        dummy = q.new_zeros(1)
        dhs = q.new_empty(B * H, N, K, V, dtype=acc)
        dh0 = q.new_empty(B, H, K, V, dtype=acc)
        _go(mod, cfg, "diag_state_bwd", (B * H, -(-K // st["BK"]), -(-V // st["BV"])), q, log_a, do,
            dummy if dhT is None else dhT.contiguous(), dhs, dh0, T, H, K, V, N, HAS_DHT=dhT is not None)
        dA = q.new_empty(B * H, N, BC, BC, dtype=acc)
        dw = q.new_empty(B, T, H, V, dtype=acc)
        _go(mod, cfg, "diag_dw", (N, B * H), q, k, log_a, dhs, do, dw, dA, w, T, H, K, V, N)
        dq, dk, dla = (q.new_empty(B, T, H, K, dtype=acc) for _ in range(3))
        _go(mod, cfg, "diag_dqk", (N, B * H, -(-K // 16)), q, k, w, log_a, hs, dhs, do, dA, dq, dk, dla,
            T, H, K, V, N)
        return (dq.to(q.dtype), dk.to(k.dtype), dw.to(w.dtype), dla.to(log_a.dtype),
                dh0.to(h0_dtype) if has_h0 else None)

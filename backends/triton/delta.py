"""The chunked generalized delta rule on Triton: skeleton 1 (``skeletons/delta_chunk.py``).

:func:`chunk_generalized_delta` has the signature of the torch backend's chunk core
(``nlc.backends.torch.chunk``), and ``nlc.backends.torch.ops`` calls one or the other: the
validation, casting, scaling and flooring in front of it are shared, so both backends compute
the same function of the same arguments. An ``autograd.Function`` pairs the forward kernels
(prep, sequential state pass, output) with the backward ones (reverse state pass, per-chunk
gradients).

The chunk size is the kernel's tile: the chunked form is exact for any chunk, so the kernel
takes ``chunk_size`` rounded to a power of two in [16, 64] (tl.dot needs tiles of at least 16).
"""
from __future__ import annotations

import torch

from nlc.backends.triton import template
from nlc.backends.triton.plan import pow2 as _pow2, products

__all__ = ["chunk_generalized_delta", "DTYPES", "variant", "kernels", "launch"]

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def variant(decay: bool, erase: bool) -> dict:
    """The skeleton flags of a level: a per-token scalar retention, an erase along k."""
    return {"DECAY": bool(decay), "ERASE": bool(erase)}


def kernels(decay: bool, erase: bool, interpret: bool):
    return template.load("delta_chunk", variant(decay, erase), interpret)


def chunk_generalized_delta(q, k, w, log_a, b, h0, chunk_size):
    """As ``nlc.backends.torch.chunk.chunk_generalized_delta``: q already scaled, log_a floored."""
    if q.shape[1] == 0:       # nothing to launch: the torch core's empty case
        from nlc.backends.torch.chunk import chunk_generalized_delta as torch_core
        return torch_core(q, k, w, log_a, b, h0, chunk_size)
    return _DeltaChunk.apply(q, k, w, log_a, b, h0, int(chunk_size))


def launch(K: int, V: int, chunk_size: int, dtype, interpret: bool = False) -> dict:
    """Per kernel, its tile constants, num_stages and num_warps: {kernel name: (constexpr dict,
    stages, warps)}. Warps as measured on an H100 (T = 8192, K = V = 128): 8 for every kernel but
    the sequential forward state pass, which was faster at 4.

    The value dimension is split into blocks of BVS columns (the state passes' and the output's
    grid, the per-chunk backward's loop): at K = V = 128 in float32 tiles the full tiles would
    need about 420 KB of shared memory, an H100 has 227 KB. The sizes here keep every kernel
    under that at K, V <= 128 (tests/backends/test_triton_sm90.py compiles them for sm_90).

    DT is the operand type of the products of the inputs themselves (q k^T, k k^T, P^T do, ...):
    the inputs' own type, 16-bit when they are, with float32 accumulation. Under Triton's
    interpreter it is the accumulation type: the interpreter's tl.dot multiplies bfloat16 as the
    raw bits (triton 3.7), so there the 16-bit path's products run in float32."""
    import triton.language as tl
    BK, BV = _pow2(K), _pow2(V)
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    base = dict(BC=min(64, _pow2(chunk_size)), BK=BK, BV=BV, ACC=acc,
                PREC=products(dtype, float32="ieee"),
                DT=acc if interpret else {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}.get(dtype, acc))
    bvs = min(BV, 32 if BK >= 128 else 64)
    split = dict(base, BV=bvs)
    state = dict(split, BKS=BK // 2 if BK >= 128 else BK)     # the state passes hold h in two halves
    # the forward pass at 16 columns: half the spills of 32 (ptxas, sm_90), twice the programs
    fwd = dict(state, BV=min(BV, 16 if BK >= 128 else 64))
    return {"delta_prep": (split, 1, 8), "delta_state_fwd": (fwd, 2, 4), "delta_out": (split, 1, 8),
            "delta_state_bwd": (state, 2, 8), "delta_chunk_bwd": (split, 1, 8)}


def _config(q, w, chunk_size):
    B, T, H, K = q.shape
    V = w.shape[-1]
    cfg = launch(K, V, chunk_size, q.dtype, interpret=not q.is_cuda)
    N = -(-T // cfg["delta_prep"][0]["BC"])
    return B, T, H, K, V, N, cfg


def _go(mod, cfg, name, grid, *args, num_warps=None, **flags):
    """Launch kernel ``name`` with its configuration (``num_warps`` overrides its warps)."""
    meta, stages, warps = cfg[name]
    getattr(mod, name)[grid](*args, **flags, **meta, num_stages=stages, num_warps=num_warps or warps)


class _DeltaChunk(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, w, log_a, b, h0, chunk_size):
        q, k, w = q.contiguous(), k.contiguous(), w.contiguous()
        log_a = None if log_a is None else log_a.contiguous()
        b = None if b is None else b.contiguous()
        h0 = None if h0 is None else h0.contiguous()
        B, T, H, K, V, N, cfg = _config(q, w, chunk_size)
        BC = cfg["delta_prep"][0]["BC"]
        NT = N * BC
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        mod = kernels(log_a is not None, b is not None, not q.is_cuda)
        dummy = q.new_zeros(1)
        la_, b_ = (dummy if x is None else x for x in (log_a, b))
        z = q.new_empty(B * H, NT, V, dtype=acc)
        hs = q.new_empty(B * H, N, K, V, dtype=acc)
        hT = q.new_empty(B, H, K, V, dtype=acc)
        o = q.new_empty(B, T, H, V, dtype=acc)
        if b is not None:
            u = q.new_empty(B * H, NT, V, dtype=acc)
            wk = q.new_empty(B * H, NT, K, dtype=acc)
            tm = q.new_empty(B * H, NT, BC, dtype=acc)
            _go(mod, cfg, "delta_prep", (N, B * H), k, w, la_, b_, u, wk, tm, T, H, K, V, NT)
        else:
            u = wk = tm = dummy
        nv = {name: -(-V // cfg[name][0]["BV"]) for name in ("delta_state_fwd", "delta_out")}
        _go(mod, cfg, "delta_state_fwd", (B * H, nv["delta_state_fwd"]), k, w, la_, u, wk, z,
            dummy if h0 is None else h0, hs, hT, T, H, K, V, N, NT, HAS_H0=h0 is not None)
        _go(mod, cfg, "delta_out", (N, B * H, nv["delta_out"]), q, k, la_, z, hs, o, T, H, K, V, N, NT)
        ctx.save_for_backward(q, k, log_a, b, u, wk, tm, z, hs)
        ctx.meta = (chunk_size, h0 is not None, w.dtype, None if h0 is None else h0.dtype,
                    None if log_a is None else log_a.dtype, None if b is None else b.dtype)
        return o, hT

    @staticmethod
    def backward(ctx, do, dhT):
        q, k, log_a, b, u, wk, tm, z, hs = ctx.saved_tensors
        chunk_size, has_h0, w_dtype, h0_dtype, la_dtype, b_dtype = ctx.meta
        B, T, H, K, V, N, cfg = _config(q, z, chunk_size)
        NT = N * cfg["delta_prep"][0]["BC"]
        nv = -(-V // cfg["delta_state_bwd"][0]["BV"])
        acc = z.dtype
        mod = kernels(log_a is not None, b is not None, not q.is_cuda)
        dummy = q.new_zeros(1)
        la_, b_ = (dummy if x is None else x for x in (log_a, b))
        do = (torch.zeros(B, T, H, V, dtype=acc, device=q.device) if do is None else do).contiguous()
        dhs = q.new_empty(B * H, N, K, V, dtype=acc)
        dh0 = q.new_empty(B, H, K, V, dtype=acc)
        _go(mod, cfg, "delta_state_bwd", (B * H, nv), q, k, la_, wk, do,
            dummy if dhT is None else dhT.contiguous(), dhs, dh0, T, H, K, V, N, NT, HAS_DHT=dhT is not None)
        dq = q.new_empty(B, T, H, K, dtype=acc)
        dk = q.new_empty(B, T, H, K, dtype=acc)
        dw = q.new_empty(B, T, H, V, dtype=acc)
        dla = q.new_empty(B, T, H, dtype=acc) if log_a is not None else dummy
        db = q.new_empty(B, T, H, dtype=acc) if b is not None else dummy
        dz = q.new_empty(B * H, NT, V, dtype=acc) if b is not None else dummy
        _go(mod, cfg, "delta_chunk_bwd", (N, B * H), q, k, la_, b_, u, wk, tm, z, hs, dhs, do, dz,
            dq, dk, dw, dla, db, T, H, K, V, N, NT)
        return (dq.to(q.dtype), dk.to(k.dtype), dw.to(w_dtype),
                None if log_a is None else dla.to(la_dtype), None if b is None else db.to(b_dtype),
                dh0.to(h0_dtype) if has_h0 else None, None)

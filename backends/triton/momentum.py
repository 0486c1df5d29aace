"""The matrix memory with Titans momentum on Triton: skeleton 1c (``skeletons/momentum_chunk.py``).

:func:`chunk_momentum_memory` has the signature and the result of the torch backend's chunk core
``nlc.backends.torch.memories._momentum_chunk`` (after ``momentum_memory``'s validation, casting
and scaling of q), so ``momentum_memory`` picks either with one line.

Forward: one kernel, one program per (batch, head, block of value columns) walking the chunks with
its columns of the memory and the momentum in registers; it saves every chunk's anchor (M, S).
Backward: one kernel walking the chunks in reverse, each recomputed from its anchor, its VJP by
hand. The decay coefficients both kernels read are built here from eta, beta and alpha with torch
(:func:`_coefficients`); the kernels return their cotangents and autograd takes them the rest of
the way, so eta, beta and alpha get their gradients from the same small graph that built them.

The chunk size is the kernel's tile and part of the semantics (gradients at each chunk's anchor):
the kernel takes exactly 16, 32 or 64 and raises otherwise.
"""
from __future__ import annotations

import torch

from nlc.backends.triton import template
from nlc.backends.triton.plan import MOMENTUM_CHUNKS as CHUNKS, MOMENTUM_MAX_DIM as MAX_DIM, MOMENTUM_TILE
from nlc.backends.triton.plan import momentum_fits, pow2 as _pow2, products

__all__ = ["chunk_momentum_memory", "supports", "variant", "kernels", "launch", "CHUNKS", "MAX_DIM"]


def variant(objective: str, erase: bool) -> dict:
    """The skeleton flags of a level: the DGD erase, the L2 objective (else the dot one)."""
    return {"ERASE": bool(erase), "L2": objective == "l2"}


def kernels(flags: dict, interpret: bool):
    return template.load("momentum_chunk", flags, interpret)


def supports(K: int, V: int, chunk_size: int) -> str | None:
    """Why the kernel cannot run this call (None: it can)."""
    if chunk_size not in CHUNKS:
        return f"chunk_size must be one of {CHUNKS} (the kernel's tile), got {chunk_size}"
    if max(K, V) > MAX_DIM:
        return f"K and V must be at most {MAX_DIM}, got K = {K}, V = {V}"
    if not momentum_fits(chunk_size, K):
        return f"chunk_size x K must be at most {MOMENTUM_TILE} (the kernel's tiles), got {chunk_size} x {K}"
    return None


def precision(inputs, K: int) -> str:
    """The products for inputs of this dtype at head size K: ``plan.products``, except that 16-bit
    inputs take ``tf32x3`` over K = 64, where TF32's operands would not fit an H100's shared memory
    (ptxas for sm_90, the backward with the erase: 246 KB at chunk x K 64 x 128, 262 KB at 32 x 256,
    against 205 and 68 KB with tf32x3; ``plan.MOMENTUM_TILE``)."""
    prec = products(inputs)
    return "tf32x3" if prec == "tf32" and _pow2(K) > 64 else prec


def launch(K: int, V: int, dtype, prec: str | None = None) -> tuple[dict, int]:
    """The kernels' tile constants and warps: the whole key dimension (BK) and BV value columns per
    program, 4 warps. Products (``prec``, default ``plan.products(dtype)``): float64 exact ("ieee",
    FMA loops); float32 as three TF32 tensor-core products ("tf32x3", error of float32's order), as
    the deep memory's kernels (an H100 ran those 4.6x faster than with "ieee"); 16-bit inputs
    "tf32". ptxas for sm_90 (titans_linear's K = V = 64, chunk 64): with
    "ieee" the backward spills 65 KB (forward 22 KB), with "tf32x3" 5.7 KB (1.4 KB). Untimed on a
    card: ``benchmarks/tune.py --kernel momentum`` sweeps the choices there."""
    import triton.language as tl
    BK = _pow2(K)
    f64 = dtype == torch.float64
    return dict(BK=BK, BV=min(_pow2(V), 32 if BK <= 64 else 16), ACC=tl.float64 if f64 else tl.float32,
                PREC=prec or products(dtype)), 4


def chunk_momentum_memory(q, k, v, eta, beta, alpha, erase, objective, M, S, C, *, inputs=None):
    """As ``memories._momentum_chunk`` without an anchor: tensors in one float dtype, per-token
    scalars ``[B, T, H]`` (alpha None: no retention), M and S ``[B, H, K, V]``. ``inputs``: the
    dtype the caller's q, k, v came in before it cast them (default: q's), which sets the products'
    precision (``plan.products``: 16-bit inputs take TF32 products, at K over 64 three of them,
    ``tf32x3``: TF32's operands would not fit an H100's shared memory there, ``plan.MOMENTUM_TILE``).
    Returns ``(o [B, T, H, V], M, S)``."""
    B, T, H, K = q.shape
    why = supports(K, v.shape[-1], C)
    if why is not None:
        raise ValueError(f"momentum_memory on Triton: {why}; use backend='torch'")
    if T == 0:
        return q.new_zeros(B, 0, H, v.shape[-1]), M, S
    cv, cs, cm = _coefficients(eta, beta, alpha, erase is not None, C, T)
    prec = precision(q.dtype if inputs is None or q.dtype == torch.float64 else inputs, K)
    return _MomentumChunk.apply(objective == "l2", C, prec, q, k, v, erase, cv, cs, cm, M, S)


def _coefficients(eta, beta, alpha, erase: bool, C: int, T: int):
    """The kernels' per-chunk decay coefficients (``memory_core._Coef``), ``[B*H, N, ...]``: the
    vectors ``(A, c, Ab, cb, phiE, dbE, daE, 0)`` ``[8, C]`` (rows after each token's write, before
    it, and the chunk-end row: the last real token's in a ragged last chunk), the scalars
    ``(aE, cE, bcE, 0)`` ``[4]`` and the matrices ``(PhiA, DaA, PhiB, DaB)`` ``[NM, C, C]`` (PhiA
    alone without the erase); Phi and the end rows of Phi and Db scaled by eta by column."""
    from nlc.backends.torch.memory_core import _kernel_coefficients
    B, _, H = eta.shape
    co, e, at, row = _kernel_coefficients(eta, beta, alpha, C, T)          # e: eta [N, B, H, C]
    N = e.shape[0]
    zero = torch.zeros_like(e)
    vecs = [co.A[..., 1:], co.c[..., 1:], co.A[..., :-1], co.c[..., :-1], row(co.Phi) * e, row(co.Db) * e,
            row(co.Da), zero]
    scal = [at(co.A), at(co.c), at(co.Bc), zero[..., 0]]
    mats = [co.Phi[..., 1:, :] * e[..., None, :]]
    if erase:
        mats += [co.Da[..., 1:, :], co.Phi[..., :-1, :] * e[..., None, :], co.Da[..., :-1, :]]
    # [N, B, H, ..] -> [B*H, N, ..]
    flat = lambda x: x.movedim(0, 2).reshape(B * H, N, *x.shape[3:]).contiguous()  # noqa: E731
    return flat(torch.stack(vecs, 3)), flat(torch.stack(scal, 3)), flat(torch.stack(mats, 3))


class _MomentumChunk(torch.autograd.Function):
    @staticmethod
    def forward(ctx, l2, C, prec, q, k, v, erase, cv, cs, cm, M0, S0):
        B, T, H, K = q.shape
        V, N = v.shape[-1], cv.shape[1]
        kc, warps = launch(K, V, q.dtype, prec)
        mod = kernels(variant("l2" if l2 else "dot", erase is not None), interpret=not q.is_cuda)
        c = lambda x: x.contiguous()  # noqa: E731
        q, k, v, cv, cs, cm = map(c, (q, k, v, cv, cs, cm))
        m0, s0 = c(M0).reshape(B * H, K, V), c(S0).reshape(B * H, K, V)
        erase = None if erase is None else c(erase)
        e = q.new_zeros(1) if erase is None else erase
        o = q.new_empty(B, T, H, V)
        mT, sT = torch.empty_like(m0), torch.empty_like(s0)
        ms, ss = q.new_empty(B * H, N, K, V), q.new_empty(B * H, N, K, V)
        grid = (B * H, -(-V // kc["BV"]))
        mod.momentum_fwd[grid](q, k, v, e, cv, cs, cm, m0, s0, o, mT, sT, ms, ss, T, H, K, V, N,
                               BC=C, NM=cm.shape[2], num_warps=warps, num_stages=1, **kc)
        ctx.save_for_backward(q, k, v, erase, cv, cs, cm, ms, ss)
        ctx.meta = (l2, C, prec)
        return o, mT.reshape(B, H, K, V), sT.reshape(B, H, K, V)

    @staticmethod
    def backward(ctx, do, dMT, dST):
        q, k, v, erase, cv, cs, cm, ms, ss = ctx.saved_tensors
        l2, C, prec = ctx.meta
        B, T, H, K = q.shape
        V, N, BH = v.shape[-1], cv.shape[1], ms.shape[0]
        kc, warps = launch(K, V, q.dtype, prec)
        NV = -(-V // kc["BV"])
        mod = kernels(variant("l2" if l2 else "dot", erase is not None), interpret=not q.is_cuda)
        z = lambda g, like: torch.zeros_like(like) if g is None else g.contiguous()  # noqa: E731
        do = z(do, v)
        dmT, dsT = z(dMT, ms[:, 0]).reshape(BH, K, V), z(dST, ss[:, 0]).reshape(BH, K, V)
        dq, dk = q.new_empty(NV, B, T, H, K), q.new_empty(NV, B, T, H, K)
        dv = torch.empty_like(v)
        de = q.new_empty(NV, B, T, H) if erase is not None else q.new_zeros(1)
        dcv, dcs, dcm = (q.new_empty(NV, *x.shape) for x in (cv, cs, cm))
        dm0, ds0 = q.new_empty(BH, K, V), q.new_empty(BH, K, V)
        mod.momentum_bwd[(BH, NV)](q, k, v, q.new_zeros(1) if erase is None else erase, do, cv, cs, cm, ms, ss,
                                   dmT, dsT, dq, dk, dv, de, dcv, dcs, dcm, dm0, ds0, T, H, K, V, N, BH,
                                   BC=C, NM=cm.shape[2], num_warps=warps, num_stages=1, **kc)
        return (None, None, None, dq.sum(0), dk.sum(0), dv, None if erase is None else de.sum(0),
                dcv.sum(0), dcs.sum(0), dcm.sum(0), dm0.reshape(B, H, K, V), ds0.reshape(B, H, K, V))

"""The deep (MLP) memory on Triton: skeleton 2 (``skeletons/mlp_chunk.py``).

:func:`chunk_mlp_memory` has the signature and the result of the torch backend's chunk core
``nlc.backends.torch.deep_memory._mlp_chunk`` (after ``mlp_memory``'s validation and casting), so
``mlp_memory`` can pick either with one line where it picks ``_mlp_recurrent`` or ``_mlp_chunk``.

Forward: one Triton kernel, one program per (batch, head) walking the chunks; it writes every
chunk's anchor weights (and momenta), which are also its working state (chunk n reads stack n and
writes stack n + 1), and takes the hidden layer 16 units at a time; it also keeps each chunk's
error and (current read) ``XK`` for the backward. Backward: one Triton kernel
(``parts/mlp_chunk_bwd.py``) walking the chunks in reverse, each recomputed from its saved anchor,
its vector-Jacobian product by hand (the erase's triangular solve and a self-generated target's
own path included); the decay coefficients it needs are built here with torch from eta, beta and
alpha, and their cotangents go back through that small graph (:func:`_backward`). Its tiles are
[chunk, slice]: it takes D, d_out and v's columns a slice at a time (``plan.mlp_slice``: chunk x
slice within ``plan.MLP_BWD_TILE``, an H100's shared memory), so it serves every level the
forward serves.

The chunk size is the kernel's tile and, for the MLP memory, part of the semantics (gradients at
each chunk's anchor): the kernel takes exactly 16, 32 or 64 and raises otherwise.
"""
from __future__ import annotations

import torch

from nlc.backends.triton import template
from nlc.backends.triton.plan import MLP_ACTIVATIONS as ACTIVATIONS, MLP_CHUNKS as CHUNKS, MLP_MAX_DIM as MAX_DIM
from nlc.backends.triton.plan import mlp_slice, pow2 as _pow2, products

__all__ = ["chunk_mlp_memory", "supports", "variant", "kernels", "CHUNKS", "ACTIVATIONS", "MAX_DIM"]


def variant(cfg, momentum: bool, retain: bool, erase: bool, current: bool) -> dict:
    """The skeleton flags of a level; ``cfg = (objective, self_target, detach_target, activation,
    residual)`` as ``deep_memory`` builds it (detach_target changes the backward only)."""
    objective, self_target, _, activation, residual = cfg
    return {"MOMENTUM": bool(momentum), "RETAIN": bool(retain), "ERASE": bool(erase),
            "SELF_TARGET": bool(self_target), "RESIDUAL": bool(residual), "CURRENT": bool(current),
            "L2": objective == "l2", "GELU": activation == "gelu"}


def kernels(flags: dict, interpret: bool):
    return template.load("mlp_chunk", flags, interpret)


def supports(cfg, W, chunk_size) -> str | None:
    """Why the kernel cannot run this call (None: it can)."""
    if chunk_size not in CHUNKS:
        return f"chunk_size must be one of {CHUNKS} (the kernel's tile), got {chunk_size}"
    if len(W) != 2:
        return f"depth must be 2 (two weight matrices), got {len(W)}"
    if cfg[3] not in ACTIVATIONS:
        return f"activation must be one of {ACTIVATIONS}, got {cfg[3]!r}"
    dims = (W[0].shape[-2], W[0].shape[-1], W[1].shape[-1])
    if max(dims) > MAX_DIM:
        return f"d_out, hidden and D must be at most {MAX_DIM}, got {dims}"
    return None


def chunk_mlp_memory(q, k, v, eta, beta, alpha, erase, cfg, W, S, C, current, *, inputs=None):
    """As ``deep_memory._mlp_chunk``: tensors in one float dtype, per-token scalars ``[B, T, H]``
    (alpha may be None: no retention), W (and S) ``[W1, W2]`` each ``[B, H, d_out, d_in]``.
    ``inputs``: the dtype the caller's q, k, v came in before it cast them (default: q's), which
    sets the products' precision (``plan.products``: 16-bit inputs take TF32 products).
    Returns ``(o [B, T, H, d_out], [W1, W2], [S1, S2] or None)``."""
    why = supports(cfg, W, C)
    if why is not None:
        raise ValueError(f"mlp_memory on Triton: {why}; use backend='torch'")
    if (S is None) != (beta is None):
        raise ValueError("mlp_memory on Triton: momenta S must be given exactly when beta is")
    B, T, H, _ = q.shape
    if T == 0:
        return q.new_zeros(B, 0, H, W[0].shape[-2]), list(W), S
    prec = products(q.dtype if inputs is None or q.dtype == torch.float64 else inputs)
    out = _MLPChunk.apply(cfg, int(C), bool(current), prec, q, k, v, eta, beta, alpha, erase,
                          W[0], W[1], *(S if S is not None else (None, None)))
    return out[0], list(out[1:3]), (list(out[3:5]) if S is not None else None)


def _config(q, W, C, prec=None):
    """(D, hidden, d_out, the kernels' constants, warps); ``prec`` default: ``products(q.dtype)``."""
    import triton.language as tl
    d_out, hid, D = W[0].shape[-2], W[0].shape[-1], W[1].shape[-1]
    f64 = q.dtype == torch.float64
    prec = prec or products(q.dtype)
    # BJ: the hidden block the kernel walks h in. Products (prec, plan.products): float64 exact
    # ("ieee", FMA loops); float32 as three TF32 tensor-core products ("tf32x3": error ~1e-6,
    # float32's order); 16-bit inputs TF32 ("tf32"); 4 warps, BJ 16. Measured on an H100
    # (benchmarks/tune.py --kernel mlp, Titans' level at T 2048, float32 inputs): forward + backward
    # 29.7 ms with tf32x3 (BJ 16), 15.3 ms with tf32 at BJ 32, against 138 ms with ieee at 16 warps
    # (the best ieee choice) and 121 ms for the torch form; tf32x3 at 8 or 16 warps and tf32 at 8
    # with BJ 16 made an illegal memory access there (Triton 3.6), 4 warps did not. BJ 32 is not
    # taken until a card times it against 16 with the same products (tune.py --kernel mlp): with
    # [chunk, width] tiles the backward needed 256 KB of shared memory with it at Hope's flags 64 x
    # 64 (an H100 has 227 KB); in slices it needs 131,072 B with tf32 (ptxas for sm_90).
    cfg = dict(BC=C, BD=_pow2(D), BH=_pow2(hid), BO=_pow2(d_out), BJ=16,
               ACC=tl.float64 if f64 else tl.float32, PREC=prec)
    return D, hid, d_out, cfg, ((16 if C == 64 else 8) if f64 else 4)


class _MLPChunk(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cfg, C, current, prec, q, k, v, eta, beta, alpha, erase, W1, W2, S1, S2):
        B, T, H, _ = q.shape
        N = -(-T // C)
        D, hid, d_out, kc, warps = _config(q, (W1, W2), C, prec)
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        flags = variant(cfg, beta is not None, alpha is not None, erase is not None, current)
        mod = kernels(flags, interpret=not q.is_cuda)
        c = lambda x: None if x is None else x.to(acc).contiguous()  # noqa: E731
        q_, k_, v_, eta_, beta_, alpha_, erase_ = map(c, (q, k, v, eta, beta, alpha, erase))
        mats = [c(w).reshape(B * H, *w.shape[-2:]) for w in (W1, W2)]
        mom = beta is not None
        if mom:
            mats += [c(s).reshape(B * H, *s.shape[-2:]) for s in (S1, S2)]
        dummy = q_.new_zeros(1)
        o = q_.new_empty(B, T, H, d_out)
        finals = [torch.empty_like(m) for m in mats]
        anchors = [q_.new_empty(B * H, N, *m.shape[-2:]) for m in mats]
        errs = q_.new_empty(B * H, N, C, kc["BO"])          # every chunk's err, and XK: for the backward
        xk = q_.new_empty(B * H, N, C, C) if current else dummy
        m_ws = q_.new_empty(B * H, 4, C, C)                 # the kernel's per-program workspace
        pad = lambda xs: xs + [dummy] * (4 - len(xs))  # noqa: E731
        or_d = lambda x: dummy if x is None else x  # noqa: E731
        mod.mlp_chunk_fwd[(B * H,)](
            q_, k_, v_, eta_, or_d(beta_), or_d(alpha_), or_d(erase_), *pad(mats), o, *pad(finals),
            *pad(anchors), errs, xk, m_ws, T, H, D, hid, d_out, v.shape[-1], N,
            BV=_pow2(v.shape[-1]), num_warps=warps, num_stages=1, **kc)
        ctx.save_for_backward(q, k, v, eta, beta, alpha, erase, errs, xk, *anchors)
        ctx.meta = (cfg, C, current, B, H, prec)
        outs = [o] + [f.reshape(B, H, *f.shape[-2:]) for f in finals]
        return tuple(x.to(q.dtype) for x in outs)

    @staticmethod
    def backward(ctx, do, *dstate):
        return (None, None, None, None, *_backward(ctx, do, dstate))


def _backward(ctx, do, dstate):
    """The backward kernel (``parts/mlp_chunk_bwd.py``): the decay coefficients built here with
    torch from eta, beta and alpha (under autograd), the kernel's reverse pass over the chunks,
    and the coefficients' cotangents sent back through their graph to eta, beta and alpha.
    Returns the gradients of (q, k, v, eta, beta, alpha, erase, W1, W2, S1, S2)."""
    q, k, v, eta, beta, alpha, erase, errs, xk, *anchors = ctx.saved_tensors
    cfg, C, current, B, H, prec = ctx.meta
    need = ctx.needs_input_grad[4:11]                   # q, k, v, eta, beta, alpha, erase
    T, N = q.shape[1], anchors[0].shape[1]
    W = [a[:, 0].reshape(B, H, *a.shape[-2:]) for a in anchors[:2]]
    D, hid, d_out, kc, warps = _config(q, W, C, prec)
    kc = {k: kc[k] for k in ("BC", "BO", "BJ", "ACC", "PREC")}
    acc = anchors[0].dtype
    flags = variant(cfg, beta is not None, alpha is not None, erase is not None, current)
    mod = kernels(flags, interpret=not q.is_cuda)
    leaf = lambda x, nd: None if x is None else x.detach().to(acc).requires_grad_(bool(nd))  # noqa: E731
    with torch.enable_grad():
        scal = [leaf(eta, need[3]), leaf(beta, need[4]), leaf(alpha, need[5])]
        cv, cs, cm = _coefficients(*scal, C, N, T)
    c = lambda x: None if x is None else x.detach().to(acc).contiguous()  # noqa: E731
    q_, k_, v_, erase_ = c(q), c(k), c(v), c(erase)
    do_ = q_.new_zeros(B, T, H, d_out) if do is None else c(do)
    dmats = [torch.zeros_like(a[:, 0]) if g is None else c(g).reshape(B * H, *g.shape[-2:])
             for a, g in zip(anchors, dstate)]
    dummy = q_.new_zeros(1)
    dq, dk, dv = torch.empty_like(q_), torch.empty_like(k_), torch.empty_like(v_)
    derase = dummy if erase is None else torch.empty_like(erase_)
    dcv, dcs, dcm = torch.zeros_like(cv), torch.zeros_like(cs), torch.zeros_like(cm)
    e_ws = q_.new_empty(B * H, 3, C, kc["BO"])        # err's cotangent, ak^T dH1e, ak^T dS1e
    m_ws = q_.new_empty(B * H, 6, C, C)
    pad = lambda xs: list(xs) + [dummy] * (4 - len(xs))  # noqa: E731
    mod.mlp_chunk_bwd[(B * H,)](
        q_, k_, v_, dummy if erase is None else erase_, do_, c(cv), c(cs), c(cm), *pad(anchors), *pad(dmats),
        dq, dk, dv, derase, dcv, dcs, dcm, errs, xk, e_ws, m_ws, T, H, D, hid, d_out, v.shape[-1], N,
        BK=mlp_slice(C, D, d_out, v.shape[-1]), DETACH=bool(cfg[2]), num_warps=warps, num_stages=1, **kc)
    wrt = [(x, i) for i, x in enumerate(scal) if x is not None and x.requires_grad]
    dscal = [None, None, None]
    if wrt:
        outs = [(o, g) for o, g in ((cv, dcv), (cs, dcs), (cm, dcm)) if o.requires_grad]
        got = torch.autograd.grad([o for o, _ in outs], [x for x, _ in wrt], [g for _, g in outs],
                                  allow_unused=True)
        for (x, i), g in zip(wrt, got):
            dscal[i] = torch.zeros_like(x) if g is None else g
    ins = (q, k, v, eta, beta, alpha, erase)
    grads = [g.to(x.dtype) if nd and g is not None else None
             for x, g, nd in zip(ins, [dq, dk, dv, *dscal, None if erase is None else derase], need)]
    mats = [m.reshape(B, H, *m.shape[-2:]).to(q.dtype) for m in dmats]
    return (*grads, *(mats + [None] * (4 - len(mats))))


def _coefficients(eta, beta, alpha, C, N, T):
    """The backward kernel's per-chunk decay coefficients, ``[B*H, N, ...]``: the vectors
    ``(Ab, cb, phiE, dbE, pa_e)`` ``[5, C]``, the scalars ``(a_e, c_e, bc_e, 0)`` ``[4]`` and the
    matrices ``(PhiE, Pab)`` ``[2, C, C]`` (``memory_core._Coef``: rows before each token's write,
    and the chunk-end row, the last real token's in a ragged last chunk; the columns of Phi and Db
    scaled by eta)."""
    from nlc.backends.torch.memory_core import _kernel_coefficients
    B, _, H = eta.shape
    co, e, at, row = _kernel_coefficients(eta, beta, alpha, C, T)          # e: eta [N, B, H, C]
    zero = torch.zeros_like(e)
    vecs = [co.A[..., :-1], zero if beta is None else co.c[..., :-1], row(co.Phi) * e,
            zero if beta is None else row(co.Db) * e, row(co.Da)]
    scal = [at(co.A), zero[..., 0] if beta is None else at(co.c), zero[..., 0] if beta is None else at(co.Bc),
            zero[..., 0]]
    flat = lambda x: x.movedim(0, 2).reshape(B * H, N, *x.shape[3:]).contiguous()  # noqa: E731  [N, B, H, ..] -> [BH, N, ..]
    return (flat(torch.stack(vecs, 3)), flat(torch.stack(scal, 3)),
            flat(torch.stack([co.Phi[..., :-1, :] * e[..., None, :], co.Da[..., :-1, :]], 3)))

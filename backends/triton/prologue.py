"""Skeleton 3 on Triton: a level's flow fused into one kernel, generated from its expression.

A flow such as ``l2norm(silu(conv(proj(x))))`` is the projection (a torch matmul, left to cuBLAS)
followed by a chain: an optional short causal convolution, then element-wise functions and per-head
L2 normalisations. :func:`chain_of` reads that chain off the flow's expression; :func:`code`
writes its forward and backward as Triton statements, which fill the code holes of
``skeletons/flow_prologue.py``; :func:`flow` runs it (forward and backward kernels in an
``autograd.Function``). A new flow made of these functions needs no new kernel.
"""
from __future__ import annotations

import torch

from nlc.backends.triton import template

__all__ = ["OPS", "chain_of", "fuses", "code", "flow", "flow_torch", "halo"]

# name -> (forward statement of y from x, backward statements taking g at y to g at x); `x`, `y`
# are the op's input and output, `g` the running gradient.
OPS = {
    "silu": ("{y} = {x} * tl.sigmoid({x})", ["s = tl.sigmoid({x})", "g = g * s * (1 + {x} * (1 - s))"]),
    "sigmoid": ("{y} = tl.sigmoid({x})", ["g = g * {y} * (1 - {y})"]),
    "tanh": ("{y} = 2 * tl.sigmoid(2 * {x}) - 1", ["g = g * (1 - {y} * {y})"]),
    "relu": ("{y} = tl.maximum({x}, 0.0)", ["g = tl.where({x} > 0, g, 0.0)"]),
    "gelu": ("{y} = 0.5 * {x} * (1 + tl.erf({x} * 0.7071067811865476))",
             ["g = g * (0.5 * (1 + tl.erf({x} * 0.7071067811865476)) + {x} * tl.exp(-0.5 * {x} * {x}) * 0.3989422804014327)"]),
    "softplus": ("{y} = tl.where({x} > 20.0, {x}, tl.log(1 + tl.exp(tl.minimum({x}, 20.0))))",
                 ["g = g * tl.where({x} > 20.0, 1.0, tl.sigmoid({x}))"]),
    "exp": ("{y} = tl.exp({x})", ["g = g * {y}"]),
    "l2norm": ("{y} = {x} * tl.rsqrt(tl.sum({x} * {x}, 1) + 1e-6)[:, None]",
               ["r = tl.rsqrt(tl.sum({x} * {x}, 1) + 1e-6)[:, None]",
                "g = g * r - {x} * (r * r * r) * tl.sum(g * {x}, 1)[:, None]"]),
}


def chain_of(e) -> tuple[int, tuple[str, ...], object] | None:
    """``(conv width or 0, ops innermost first, the projection call)`` of a flow
    ``f_n(...f_1([conv](proj(...), W)))``, or None when the flow has another form."""
    from nlc.expr import Call, Num
    ops = []
    while isinstance(e, Call) and e.fn in OPS and len(e.args) == 1 and not e.kwargs:
        ops.append(e.fn)
        e = e.args[0]
    width = 0
    if isinstance(e, Call) and e.fn == "conv":
        if len(e.args) != 2 or not isinstance(e.args[1], Num):
            return None
        width, e = int(e.args[1].value), e.args[0]
    if not (isinstance(e, Call) and e.fn == "proj"):
        return None
    return width, tuple(reversed(ops)), e


def fuses(e):
    """The chain of a flow that the generated model runs as one ``L.flow`` call (fused on Triton),
    else None: only where fusing saves kernels (a convolution, an l2norm, or two functions or more)."""
    chain = chain_of(e)
    if chain is None or not (chain[0] or "l2norm" in chain[1] or len(chain[1]) > 1):
        return None
    return chain


def code(ops) -> dict:
    """The code holes of the skeleton for a chain of ``ops`` (innermost first)."""
    fwd = ["z0 = z"]
    for i, op in enumerate(ops):
        fwd.append(OPS[op][0].format(x=f"z{i}", y=f"z{i + 1}"))
    bwd = fwd[1:] + [ln for i, op in reversed(list(enumerate(ops)))
                     for ln in (b.format(x=f"z{i}", y=f"z{i + 1}") for b in OPS[op][1])]
    return {"FORWARD": fwd + [f"z = z{len(ops)}"], "BACKWARD": bwd}


def kernels(conv: bool, ops, interpret: bool):
    return template.load("flow_prologue", {"CONV": conv}, interpret, code(ops))


def flow_torch(p, ops, weight=None, past=None):
    """The reference: the same chain in torch (``weight`` [H*K, W], ``past`` [B, W-1, H*K])."""
    import torch.nn.functional as F
    B, T, H, K = p.shape
    z = p
    if weight is not None:
        W = weight.shape[1]
        flat = p.reshape(B, T, H * K)
        past = flat.new_zeros(B, W - 1, H * K) if past is None else past.to(flat.dtype)
        full = torch.cat([past, flat], dim=1)
        z = sum(full[:, j:j + T] * weight[:, j].to(flat.dtype) for j in range(W)).reshape(B, T, H, K)
    fns = {"silu": F.silu, "sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": F.relu, "gelu": F.gelu,
           "softplus": F.softplus, "exp": torch.exp,
           "l2norm": lambda x: x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6)}
    for op in ops:
        z = fns[op](z)
    return z


def flow(p, ops, weight=None, past=None):
    """``chain(conv(p))`` on Triton: p ``[B, T, H, K]``, ``weight`` ``[H*K, W]`` or None (no
    convolution), ``past`` ``[B, W-1, H*K]`` (the convolution's carried inputs) or None (zeros)."""
    ops = tuple(ops)
    for op in ops:
        if op not in OPS:
            raise ValueError(f"flow prologue: no Triton code for `{op}`; use backend='torch'")
    if weight is None and past is not None:
        raise ValueError("flow prologue: `past` is the convolution's state; there is no convolution")
    return _Flow.apply(p, weight, past, ops)


def _acc(p):
    """The accumulation dtype: float64 for float64 inputs (the oracle tests), else float32."""
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def halo(width: int) -> int:
    """The backward's halo: the rows after a block whose g0 it needs, a power of two >= width - 1."""
    return 1 << max(width - 2, 0).bit_length()


def _meta(p, weight):
    import triton.language as tl
    K = p.shape[-1]
    BK = 16
    while BK < K:
        BK *= 2
    acc = tl.float64 if _acc(p) == torch.float64 else tl.float32
    return dict(W=1 if weight is None else weight.shape[1], BT=16, BK=BK, ACC=acc)


class _Flow(torch.autograd.Function):
    @staticmethod
    def forward(ctx, p, weight, past, ops):
        p = p.contiguous()
        B, T, H, K = p.shape
        meta = _meta(p, weight)
        mod = kernels(weight is not None, ops, not p.is_cuda)
        dummy = p.new_zeros(1)
        w_ = dummy if weight is None else weight.contiguous()
        past_ = dummy if weight is None else (p.new_zeros(B, meta["W"] - 1, H * K) if past is None else past.contiguous())
        y = torch.empty_like(p)
        if T:
            mod.flow_fwd[(-(-T // meta["BT"]), B * H)](p, past_, w_, y, T, H, K, **meta)
        ctx.save_for_backward(p, weight, past)
        ctx.ops = ops
        return y

    @staticmethod
    def backward(ctx, dy):
        p, weight, past = ctx.saved_tensors
        B, T, H, K = p.shape
        meta = _meta(p, weight)
        mod = kernels(weight is not None, ctx.ops, not p.is_cuda)
        dummy = p.new_zeros(1)
        nb = 1 + -(-T // meta["BT"])
        dp = torch.empty_like(p)
        W = meta["W"]
        dpast = p.new_zeros(B, max(W - 1, 1), H * K) if weight is not None else dummy
        dw = p.new_zeros(nb, B * H, K, W) if weight is not None else dummy
        HB = halo(W)
        g0_ws = p.new_empty(nb, B * H, meta["BT"] + HB, meta["BK"], dtype=_acc(p)) if weight is not None else dummy
        past_ = dummy if weight is None else (p.new_zeros(B, W - 1, H * K) if past is None else past.contiguous())
        if T:
            mod.flow_bwd[(nb, B * H)](p, past_,
                                      dummy if weight is None else weight.contiguous(), dy.contiguous(),
                                      dp, dpast, dw, g0_ws, T, H, K, HB=HB, **meta)
        dweight = None
        if weight is not None:   # [blocks, B*H, K, W] -> [H*K, W]
            dweight = dw.view(nb, B, H, K, W).sum((0, 1)).reshape(H * K, W).to(weight.dtype)
        dpast_out = None if past is None else dpast[:, :W - 1].to(past.dtype)
        return dp, dweight, dpast_out, None

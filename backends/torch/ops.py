"""Functional ops of the torch backend: the numerical reference of nlc.

One recurrence carries every matrix-memory rule (Nested Learning §8). Per head, with the
state ``h`` of shape ``[K, V]`` (the transpose of the paper's memory ``M``, which is ``V x K``):

    h_t = a_t h_{t-1} - b_t k_t (k_t^T h_{t-1}) + k_t w_t^T        o_t = h_t^T (scale q_t)

The read ``o_t`` sees the state *after* token t's write. ``generalized_delta`` is that recurrence;
``linear_attn``, ``delta_rule`` and ``gated_delta_rule`` only derive ``a, b, w`` and call the same
core, so every rule shares one recurrent oracle and one chunked form (``chunk.py``, maths in
``README.md``).

Shapes follow flash-linear-attention's functional API::

    q, k: [B, T, H, K]   v, w: [B, T, H, V]   beta, g, a, b: [B, T, H]   state: [B, H, K, V]

``mode="recurrent"`` is the token-by-token loop (the oracle); ``mode="chunk"`` is the
chunkwise-parallel WY/UT form, equal to it up to rounding for any ``chunk_size >= 1`` and any T.
Half-precision inputs are computed in float32; float32 and float64 are computed as given.
"""
from __future__ import annotations

import math
from numbers import Real

import torch

from nlc.backends.torch.chunk import chunk_generalized_delta

__all__ = ["linear_attn", "delta_rule", "gated_delta_rule", "generalized_delta", "MODES"]

MODES = ("chunk", "recurrent")


def linear_attn(q, k, v, scale=None, initial_state=None, output_final_state=True,
                mode="chunk", chunk_size=64):
    r"""Linear attention: :math:`h_t = h_{t-1} + k_t v_t^\top` (``a = 1, b = 0, w = v``).

    Args:
        q, k: ``[B, T, H, K]``. v: ``[B, T, H, V]``.
        scale: multiplies q; defaults to ``K ** -0.5``.
        initial_state: ``[B, H, K, V]`` or None (zeros).
        output_final_state: return the state after the last token, else None.
        mode: ``"chunk"`` or ``"recurrent"``. chunk_size: tokens per chunk (``mode="chunk"``).

    Returns:
        ``(o, final_state)``: o ``[B, T, H, V]`` in q's dtype; final_state ``[B, H, K, V]`` or None.
    """
    _validate("linear_attn", q, k, ("v", v), {}, initial_state, scale, mode, chunk_size)
    return _run(q, k, v, None, None, None, scale, initial_state, output_final_state, mode, chunk_size)


def delta_rule(q, k, v, beta, scale=None, initial_state=None, output_final_state=True,
               mode="chunk", chunk_size=64):
    r"""DeltaNet: :math:`h_t = (I - \beta_t k_t k_t^\top) h_{t-1} + \beta_t k_t v_t^\top`.

    ``a = 1, b = beta, w = beta v``. beta: ``[B, T, H]``; keys are usually L2-normalised and
    ``0 < beta < 2`` keeps the recurrence stable. Other arguments as :func:`linear_attn`.
    """
    _validate("delta_rule", q, k, ("v", v), {"beta": beta}, initial_state, scale, mode, chunk_size)
    w = beta.unsqueeze(-1) * v
    return _run(q, k, w, None, None, beta, scale, initial_state, output_final_state, mode, chunk_size)


def gated_delta_rule(q, k, v, beta, g, scale=None, initial_state=None, output_final_state=True,
                     mode="chunk", chunk_size=64):
    r"""Gated DeltaNet (fla convention):
    :math:`h_t = e^{g_t} (I - \beta_t k_t k_t^\top) h_{t-1} + \beta_t k_t v_t^\top`.

    ``a = e^g, b = e^g beta, w = beta v``; g is a log-decay ``[B, T, H]`` (usually <= 0), passed
    to the chunked form as is (no round trip through ``exp``/``log``). Other arguments as
    :func:`delta_rule`.
    """
    _validate("gated_delta_rule", q, k, ("v", v), {"beta": beta, "g": g}, initial_state, scale,
              mode, chunk_size)
    w = beta.unsqueeze(-1) * v
    b = g.exp() * beta
    return _run(q, k, w, None, g, b, scale, initial_state, output_final_state, mode, chunk_size)


def generalized_delta(q, k, w, a, b, scale=None, initial_state=None, output_final_state=True,
                      mode="chunk", chunk_size=64):
    r"""The family: :math:`h_t = a_t h_{t-1} - b_t k_t (k_t^\top h_{t-1}) + k_t w_t^\top`,
    :math:`o_t = h_t^\top (\mathrm{scale}\, q_t)`.

    Args:
        q, k: ``[B, T, H, K]``. w: write vector ``[B, T, H, V]``.
        a: retention ``[B, T, H]``; ``mode="chunk"`` needs ``a > 0`` (it works with ``log a``;
           ``a <= 1`` keeps every exponent it takes non-positive). ``mode="recurrent"`` takes any a.
        b: erase strength ``[B, T, H]``.
        Other arguments as :func:`linear_attn`.

    Returns:
        ``(o, final_state)`` as :func:`linear_attn`.
    """
    _validate("generalized_delta", q, k, ("w", w), {"a": a, "b": b}, initial_state, scale, mode,
              chunk_size)
    if mode == "chunk" and bool((a <= 0).any()):
        raise ValueError("generalized_delta: mode='chunk' needs a > 0 everywhere (it takes log a); "
                         "use mode='recurrent' for a <= 0")
    return _run(q, k, w, a, None, b, scale, initial_state, output_final_state, mode, chunk_size)


# ---------------------------------------------------------------------------------------------
# the shared core


def _run(q, k, w, a, log_a, b, scale, initial_state, output_final_state, mode, chunk_size):
    """Run the family. ``a`` or ``log_a`` (or neither: a = 1) gives retention; ``b=None``: no erase."""
    out_dtype = q.dtype
    tensors = [t for t in (q, k, w, a, log_a, b, initial_state) if t is not None]
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    dtype = torch.promote_types(dtype, torch.float32)
    q, k, w, a, log_a, b, h0 = (None if t is None else t.to(dtype)
                                for t in (q, k, w, a, log_a, b, initial_state))
    if scale is None:
        scale = q.shape[-1] ** -0.5
    q = q * scale
    if mode == "recurrent":
        if a is None and log_a is not None:
            a = log_a.exp()
        o, h = _recurrent(q, k, w, a, b, h0)
    else:
        if log_a is None and a is not None:
            log_a = a.log()
        o, h = chunk_generalized_delta(q, k, w, log_a, b, h0, chunk_size)
    return o.to(out_dtype), (h if output_final_state else None)


def _recurrent(q, k, w, a, b, h0):
    """Token-by-token loop; q is already scaled. Shapes as the public ops; returns (o, h_T)."""
    B, T, H, K = q.shape
    V = w.shape[-1]
    h = h0 if h0 is not None else q.new_zeros(B, H, K, V)
    outs = []
    for t in range(T):
        k_t = k[:, t]                                          # [B, H, K]
        write = k_t.unsqueeze(-1) * w[:, t].unsqueeze(-2)      # k_t w_t^T   [B, H, K, V]
        new = h if a is None else a[:, t, :, None, None] * h
        if b is not None:
            kh = torch.einsum("bhk,bhkv->bhv", k_t, h)         # k_t^T h_{t-1}
            new = new - b[:, t, :, None, None] * (k_t.unsqueeze(-1) * kh.unsqueeze(-2))
        h = new + write
        outs.append(torch.einsum("bhkv,bhk->bhv", h, q[:, t]))
    o = torch.stack(outs, dim=1) if outs else q.new_zeros(B, 0, H, V)
    return o, h


# ---------------------------------------------------------------------------------------------
# argument checks: every message names the op, the argument, the expected and the actual shape


def check_tensor(op, name, t, q):
    """`t` is a floating-point tensor on q's device (shared with memories.py)."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
    if t.device != q.device:
        raise ValueError(f"{op}: {name} is on {t.device} but q is on {q.device}")


def _validate(op, q, k, value, scalars, initial_state, scale, mode, chunk_size):
    vname, v = value
    named = [("q", q), ("k", k), (vname, v), *scalars.items(), ("initial_state", initial_state)]
    for name, t in named:
        if t is None and name == "initial_state":
            continue
        check_tensor(op, name, t, q)
    if q.dim() != 4:
        raise ValueError(f"{op}: q must be 4-D [B, T, H, K], got shape {tuple(q.shape)}")
    B, T, H, K = q.shape
    dims = f"B={B}, T={T}, H={H}, K={K} (from q)"
    if tuple(k.shape) != (B, T, H, K):
        raise ValueError(f"{op}: k must have shape [B, T, H, K] = [{B}, {T}, {H}, {K}], "
                         f"got {tuple(k.shape)}; {dims}")
    if v.dim() != 4 or tuple(v.shape[:3]) != (B, T, H):
        raise ValueError(f"{op}: {vname} must have shape [B, T, H, V] = [{B}, {T}, {H}, V], "
                         f"got {tuple(v.shape)}; {dims}")
    V = v.shape[-1]
    for name, t in scalars.items():
        if tuple(t.shape) != (B, T, H):
            raise ValueError(f"{op}: {name} must have shape [B, T, H] = [{B}, {T}, {H}] "
                             f"(one scalar per token and head), got {tuple(t.shape)}; {dims}")
    if initial_state is not None and tuple(initial_state.shape) != (B, H, K, V):
        raise ValueError(f"{op}: initial_state must have shape [B, H, K, V] = [{B}, {H}, {K}, {V}],"
                         f" got {tuple(initial_state.shape)}; {dims}, V={V} (from {vname})")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, Real)
                              or not math.isfinite(scale)):
        raise ValueError(f"{op}: scale must be a finite number or None, got {scale!r}")
    if mode not in MODES:
        raise ValueError(f"{op}: mode must be one of {MODES}, got {mode!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{op}: chunk_size must be an int >= 1, got {chunk_size!r}")

"""Functional ops of the torch backend: the numerical reference of nlc.

One recurrence carries every matrix-memory rule (Nested Learning §8). Per head, with the
state ``h`` of shape ``[K, V]`` (the transpose of the paper's memory ``M``, which is ``V x K``):

    h_t = a_t h_{t-1} - b_t k_t (k_t^T h_{t-1}) + k_t w_t^T        o_t = h_t^T (scale q_t)

The read ``o_t`` sees the state *after* token t's write. ``generalized_delta`` is that recurrence;
``linear_attn``, ``delta_rule`` and ``gated_delta_rule`` only derive ``a, b, w`` and call the same
core, so every rule shares one recurrent oracle and one chunked form (``chunk.py``, maths in
``README.md``). ``generalized_delta`` also takes the diagonal-plus-low-rank (DPLR) widening

    h_t = diag(a_t) h_{t-1} - u_t (e_t^T h_{t-1}) + k_t w_t^T

(``a`` per key channel, as GLA / RWKV-7 / KDA; ``erase=(u, e)`` a general rank-one erase), whose
chunked form is ``chunk_dplr.py``; the scalar-``a``, erase-along-k case keeps ``chunk.py``.

Shapes follow flash-linear-attention's functional API::

    q, k: [B, T, H, K]   v, w: [B, T, H, V]   beta, g, b: [B, T, H]   state: [B, H, K, V]
    a: [B, T, H] or [B, T, H, K]   u, e: [B, T, H, K]

``mode="recurrent"`` is the token-by-token loop (the oracle); ``mode="chunk"`` is the
chunkwise-parallel WY/UT form, equal to it up to rounding for any ``chunk_size >= 1`` and any T.
Half-precision inputs are computed in float32; float32 and float64 are computed as given.

Retentions are floored at ``A_MIN = exp(LOG_A_MIN)`` (``LOG_A_MIN = -30``) in both modes, so a
decay that underflows to 0 (``exp(-softplus(z))`` for large z) keeps the chunked form (which takes
``log a``) defined, with a gradient of 0 there instead of NaN; below e^-30 ~ 9e-14 the state is
wiped to that fraction of itself either way. Chunk mode: ``log a = log(max(a, A_MIN))`` and
``g = max(g, LOG_A_MIN)``; recurrent mode floors ``a`` in ``[0, A_MIN)`` to ``A_MIN`` (negative a,
which only the recurrent mode accepts, is left as given).
"""
from __future__ import annotations

import math
from numbers import Real

import torch

from nlc.backends.torch.chunk import chunk_generalized_delta
from nlc.backends.torch.chunk_dplr import chunk_dplr_delta
from nlc.backends.dispatch import pick
from nlc.backends.torch.precision import full_precision

__all__ = ["linear_attn", "delta_rule", "gated_delta_rule", "generalized_delta", "MODES",
           "LOG_A_MIN", "A_MIN"]

MODES = ("chunk", "recurrent")
LOG_A_MIN = -30.0                 # floor of every log-retention (see the module docstring)
A_MIN = math.exp(LOG_A_MIN)       # ~ 9.4e-14: floor of every retention


@full_precision
def linear_attn(q, k, v, scale=None, initial_state=None, output_final_state=True,
                mode="chunk", chunk_size=64, backend="auto"):
    r"""Linear attention: :math:`h_t = h_{t-1} + k_t v_t^\top` (``a = 1, b = 0, w = v``).

    Args:
        q, k: ``[B, T, H, K]``. v: ``[B, T, H, V]``.
        scale: multiplies q; defaults to ``K ** -0.5``.
        initial_state: ``[B, H, K, V]`` or None (zeros).
        output_final_state: return the state after the last token, else None.
        mode: ``"chunk"`` or ``"recurrent"``. chunk_size: tokens per chunk (``mode="chunk"``).
        backend: who runs the chunked form: ``"torch"``, ``"triton"`` (CUDA tensors compiled,
            CPU tensors under Triton's interpreter) or ``"auto"`` (Triton for CUDA tensors, torch
            otherwise). ``mode="recurrent"`` is always the torch token loop (the oracle).

    Returns:
        ``(o, final_state)``: o ``[B, T, H, V]`` in q's dtype; final_state ``[B, H, K, V]`` or None.
    """
    _validate("linear_attn", q, k, ("v", v), {}, initial_state, scale, mode, chunk_size)
    return _run(q, k, v, None, None, None, scale, initial_state, output_final_state, mode, chunk_size,
                backend=pick("linear_attn", backend, q, why_not=_delta_why(q, backend)))


@full_precision
def delta_rule(q, k, v, beta, scale=None, initial_state=None, output_final_state=True,
               mode="chunk", chunk_size=64, backend="auto"):
    r"""DeltaNet: :math:`h_t = (I - \beta_t k_t k_t^\top) h_{t-1} + \beta_t k_t v_t^\top`.

    ``a = 1, b = beta, w = beta v``. beta: ``[B, T, H]``; keys are usually L2-normalised and
    ``0 < beta < 2`` keeps the recurrence stable. Other arguments as :func:`linear_attn`.
    """
    _validate("delta_rule", q, k, ("v", v), {"beta": beta}, initial_state, scale, mode, chunk_size)
    w = beta.unsqueeze(-1) * v
    return _run(q, k, w, None, None, beta, scale, initial_state, output_final_state, mode, chunk_size,
                backend=pick("delta_rule", backend, q, why_not=_delta_why(q, backend)))


@full_precision
def gated_delta_rule(q, k, v, beta, g, scale=None, initial_state=None, output_final_state=True,
                     mode="chunk", chunk_size=64, backend="auto"):
    r"""Gated DeltaNet (fla convention):
    :math:`h_t = e^{g_t} (I - \beta_t k_t k_t^\top) h_{t-1} + \beta_t k_t v_t^\top`.

    ``a = e^g, b = e^g beta, w = beta v``; g is a log-decay ``[B, T, H]`` (usually <= 0), passed
    to the chunked form as is (no round trip through ``exp``/``log``), floored at ``LOG_A_MIN``
    in both modes (``g = max(g, -30)``, a and b alike). Other arguments as :func:`delta_rule`.
    """
    _validate("gated_delta_rule", q, k, ("v", v), {"beta": beta, "g": g}, initial_state, scale,
              mode, chunk_size)
    g = g.clamp_min(LOG_A_MIN)
    w = beta.unsqueeze(-1) * v
    b = g.exp() * beta
    return _run(q, k, w, None, g, b, scale, initial_state, output_final_state, mode, chunk_size,
                backend=pick("gated_delta_rule", backend, q, why_not=_delta_why(q, backend)))


@full_precision
def generalized_delta(q, k, w, a, b=None, scale=None, initial_state=None, output_final_state=True,
                      mode="chunk", chunk_size=64, *, erase=None, backend="auto", check=True):
    r"""The family: :math:`h_t = a_t h_{t-1} - b_t k_t (k_t^\top h_{t-1}) + k_t w_t^\top`,
    :math:`o_t = h_t^\top (\mathrm{scale}\, q_t)`, and its diagonal-plus-low-rank (DPLR) widening
    :math:`h_t = \mathrm{diag}(a_t) h_{t-1} - u_t (e_t^\top h_{t-1}) + k_t w_t^\top`.

    Args:
        q, k: ``[B, T, H, K]``. w: write vector ``[B, T, H, V]``.
        a: retention, ``[B, T, H]`` (one per head) or ``[B, T, H, K]`` (one per key channel: a
           diagonal decay, as GLA / RWKV-7 / KDA), or None: no retention (a = 1). Floored at ``A_MIN = e^-30`` in both modes
           (module docstring). ``mode="chunk"`` needs ``a >= 0`` (it takes ``log max(a, A_MIN)``;
           ``a <= 1`` keeps every exponent it takes non-positive); ``mode="recurrent"`` takes any a.
        b: erase strength ``[B, T, H]``: the erase ``u = b k, e = k``. None: no erase, unless
           ``erase`` is given; ``b`` and ``erase`` are exclusive.
        erase: keyword only, a pair ``(u, e)`` of ``[B, T, H, K]`` tensors: the general rank-one
           erase ``u_t (e_t^T h_{t-1})`` (RWKV-7: ``u = iclr * kappa``, ``e = kappa``).
        check: keyword only: with ``mode="chunk"``, check ``a >= 0`` on the host (a device sync
           per call on a GPU; skipped while a CUDA graph is captured). The compiled models pass
           False where the compiler proved ``a >= 0`` from the spec (``nlc.bounds``).
        Other arguments as :func:`linear_attn`.

    Scalar ``a`` with ``b`` (or no erase) runs the WY/UT form of ``chunk.py``; per-channel ``a`` or
    ``erase`` runs the DPLR form of ``chunk_dplr.py`` (same result, more work and memory:
    ``[C, C, K]`` decays per chunk). On Triton (``backend``) the scalar form runs the kernels of
    ``nlc.backends.triton.delta``, a per-channel ``a`` without an erase those of
    ``nlc.backends.triton.diag``, an erase in the DPLR form those of ``nlc.backends.triton.dplr``
    (K up to 128; the kernels' chunk is 16 tokens, whatever ``chunk_size``: the form is exact).

    Returns:
        ``(o, final_state)`` as :func:`linear_attn`.
    """
    op = "generalized_delta"
    if b is not None and erase is not None:
        raise ValueError(f"{op}: b and erase are exclusive (b is the erase u = b k, e = k); "
                         "pass b=None with erase=(u, e), or b alone")
    if erase is not None and (not isinstance(erase, (tuple, list)) or len(erase) != 2):
        raise ValueError(f"{op}: erase must be a pair (u, e) of [B, T, H, K] tensors or None, "
                         f"got {type(erase).__name__}"
                         + (f" of length {len(erase)}" if isinstance(erase, (tuple, list)) else ""))
    u, e = (None, None) if erase is None else erase
    keyed = {} if erase is None else {"erase[0] (u)": u, "erase[1] (e)": e}
    _validate(op, q, k, ("w", w), {} if b is None else {"b": b}, initial_state, scale, mode,
              chunk_size, keyed=keyed, retention=a)
    if check and mode == "chunk" and a is not None and not capturing(a) and bool((a < 0).any()):
        raise ValueError(f"{op}: mode='chunk' needs a >= 0 everywhere (it takes log max(a, A_MIN), "
                         f"A_MIN = exp({LOG_A_MIN})); use mode='recurrent' for negative a")
    dplr = erase is not None or (b is not None and a is not None and a.dim() == 4)  # an erase in the DPLR form
    why = None
    if dplr and backend != "torch":
        from nlc.backends.triton.dplr import supports
        why = supports(q.shape[-1])
    elif a is None or a.dim() == 3:          # a scalar retention: the delta kernels
        why = _delta_why(q, backend)
    return _run(q, k, w, a, None, b, scale, initial_state, output_final_state, mode, chunk_size,
                u, e, backend=pick(op, backend, q, why_not=why))


# ---------------------------------------------------------------------------------------------
# the shared core


HALF = (torch.bfloat16, torch.float16)


def _run(q, k, w, a, log_a, b, scale, initial_state, output_final_state, mode, chunk_size,
         u=None, e=None, backend="torch"):
    """Run the family. ``a`` or ``log_a`` (or neither: a = 1) gives retention, ``a`` ``[B, T, H]``
    or ``[B, T, H, K]``, ``log_a`` already floored; ``b`` or ``(u, e)`` (or neither) the erase."""
    out_dtype = q.dtype
    tensors = [t for t in (q, k, w, a, log_a, b, u, e, initial_state) if t is not None]
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    dtype = torch.promote_types(dtype, torch.float32)
    dplr = u is not None or (a is not None and a.dim() == 4)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    # 16-bit q, k, w reach the Triton kernels as they are (their products take 16-bit operands or
    # TF32, with float32 accumulation); everything else, and every torch path, computes in float32
    # or wider
    half = q.dtype if (backend == "triton" and mode == "chunk" and q.dtype in HALF
                       and k.dtype == q.dtype and dtype == torch.float32) else None
    k16, w16 = k, w
    q, k, w, a, log_a, b, u, e, h0 = (None if t is None else t.to(dtype)
                                      for t in (q, k, w, a, log_a, b, u, e, initial_state))
    q = q * scale
    if half is not None:                  # q scaled (and a write such as beta v formed) in float32, rounded once
        q, k, w = q.to(half), k16, w16.to(half)
    if mode == "recurrent":
        if a is None and log_a is not None:
            a = log_a.exp()
        elif a is not None:             # floor [0, A_MIN) to A_MIN, as chunk mode's log does
            a = torch.where(a < 0, a, a.clamp_min(A_MIN))
        o, h = _recurrent(q, k, w, a, b, h0, u, e)
    else:
        if log_a is None and a is not None:
            log_a = a.clamp_min(A_MIN).log()    # clamp before log: gradient 0 (not NaN) at a = 0
        if dplr:
            if b is not None:
                u, e = b.unsqueeze(-1) * k, k
            if log_a.dim() == 3:
                log_a = log_a.unsqueeze(-1).expand_as(k)
            if backend == "triton" and u is None:     # a per-channel retention without an erase
                from nlc.backends.triton.diag import chunk_diag_delta
                o, h = chunk_diag_delta(q, k, w, log_a, h0)
            elif backend == "triton":                 # with an erase: the DPLR kernels
                from nlc.backends.triton.dplr import chunk_dplr_delta as dplr_core
                o, h = dplr_core(q, k, w, log_a, u, e, h0)
            else:
                o, h = chunk_dplr_delta(q, k, w, log_a, u, e, h0, chunk_size)
        else:
            core = chunk_generalized_delta
            if backend == "triton":
                from nlc.backends.triton.delta import chunk_generalized_delta as core
            o, h = core(q, k, w, log_a, b, h0, chunk_size)
    return o.to(out_dtype), (h if output_final_state else None)


def _recurrent(q, k, w, a, b, h0, u=None, e=None):
    """Token-by-token loop; q is already scaled. Shapes as the public ops; returns (o, h_T).

    ``a``: None (1), ``[B, T, H]`` or ``[B, T, H, K]``; erase: ``b`` (along k) or ``(u, e)``."""
    B, T, H, K = q.shape
    V = w.shape[-1]
    h = h0 if h0 is not None else q.new_zeros(B, H, K, V)
    outs = []
    for t in range(T):
        k_t = k[:, t]                                          # [B, H, K]
        write = k_t.unsqueeze(-1) * w[:, t].unsqueeze(-2)      # k_t w_t^T   [B, H, K, V]
        if a is None:
            new = h
        elif a.dim() == 3:
            new = a[:, t, :, None, None] * h                   # a_t h_{t-1}
        else:
            new = a[:, t, :, :, None] * h                      # diag(a_t) h_{t-1}
        if b is not None:
            kh = torch.einsum("bhk,bhkv->bhv", k_t, h)         # k_t^T h_{t-1}
            new = new - b[:, t, :, None, None] * (k_t.unsqueeze(-1) * kh.unsqueeze(-2))
        if u is not None:
            eh = torch.einsum("bhk,bhkv->bhv", e[:, t], h)     # e_t^T h_{t-1}
            new = new - u[:, t].unsqueeze(-1) * eh.unsqueeze(-2)
        h = new + write
        outs.append(torch.einsum("bhkv,bhk->bhv", h, q[:, t]))
    o = torch.stack(outs, dim=1) if outs else q.new_zeros(B, 0, H, V)
    return o, h


# ---------------------------------------------------------------------------------------------
# argument checks: every message names the op, the argument, the expected and the actual shape


def _delta_why(q, backend: str) -> str | None:
    """Why the delta kernels (skeleton 1) cannot take q's heads, or None."""
    if backend == "torch":
        return None
    from nlc.backends.triton.plan import delta_why
    return delta_why(q.shape[-1])


def capturing(t) -> bool:
    """Whether a CUDA graph is being captured on ``t``'s stream: a check that reads a tensor's values
    on the host cannot run then (and could not check the data a replay brings). Shared with
    ``lib.inputs``."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def check_tensor(op, name, t, q):
    """`t` is a floating-point tensor on q's device (shared with memories.py)."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
    if t.device != q.device:
        raise ValueError(f"{op}: {name} is on {t.device} but q is on {q.device}")


def _validate(op, q, k, value, scalars, initial_state, scale, mode, chunk_size, keyed=None,
              retention=None):
    """``scalars``: ``[B, T, H]``; ``keyed``: ``[B, T, H, K]``; ``retention`` (named ``a``): either."""
    vname, v = value
    keyed = keyed or {}
    named = [("q", q), ("k", k), (vname, v), *([] if retention is None else [("a", retention)]),
             *scalars.items(), *keyed.items(), ("initial_state", initial_state)]
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
    if retention is not None and tuple(retention.shape) not in ((B, T, H), (B, T, H, K)):
        raise ValueError(f"{op}: a must have shape [B, T, H] = [{B}, {T}, {H}] (one retention per "
                         f"head) or [B, T, H, K] = [{B}, {T}, {H}, {K}] (one per key channel), "
                         f"got {tuple(retention.shape)}; {dims}")
    for name, t in keyed.items():
        if tuple(t.shape) != (B, T, H, K):
            raise ValueError(f"{op}: {name} must have shape [B, T, H, K] = [{B}, {T}, {H}, {K}], "
                             f"got {tuple(t.shape)}; {dims}")
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

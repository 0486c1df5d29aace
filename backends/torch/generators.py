"""Generators stacked: the in-context MLP memories a level reads (Hope's M_k, M_v, M_eta, M_alpha)
as one state, read in one call and updated over a chunk in one call.

A level's generators run in a scan over their chunk (``scan.py``, generated code): each chunk
reads every generator at its anchor, computes the flows, then updates every generator over the
chunk. Run one by one, that is four ``mlp_memory`` calls of some 300 small ops each per chunk.
Here the generators that share a form (depth, hidden size, activation, momentum) are stacked on a
generator axis ``G`` next to the heads: weights ``[B, G, H, d_out, d_in]``, the output-side matrix
padded with zero rows to the largest output size (``out: scalar`` generators have one output), and
the residual path kept per generator. The padding is exact: its rows read 0, so their error is 0,
their gradient is 0 and they stay 0, and a generator without the residual adds ``0 * z``.

Arguments shared by every generator (Hope's key, value, rates) broadcast over ``G``; a tuple gives
one per generator (stacked). Nothing is read that nobody uses: the update computes no output.
``mode="recurrent"``, a Triton backend that serves the generators, or :func:`reference` run each
generator through :func:`mlp_memory` instead (the slow reference; tests hold the two together).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn.functional as F

from nlc.backends.torch.compile import hot
from nlc.backends.torch.deep_memory import MLPState, mlp_forward, mlp_memory, mlp_token_grads
from nlc.backends.torch.memory_core import _anchored, _check_offset, _coefficients, _erase_solve
from nlc.backends.torch.precision import full_precision

__all__ = ["Generators", "generators", "read_generators", "read_generator", "update_generators", "save_generators",
           "spans", "reference"]

_REFERENCE = [False]


@contextmanager
def reference(on: bool = True):
    """Within this block, stacked generators run one by one through ``mlp_memory`` (and a CMS
    model runs each window twice, ``cms.cms_forward_two_pass``): the slow references."""
    old = _REFERENCE[0]
    _REFERENCE[0] = on
    try:
        yield
    finally:
        _REFERENCE[0] = old


class Generators(NamedTuple):
    """Stacked generator state. ``weights[l]`` ``[B, G, H, d_out_l, d_in_l]``, output side first
    (``weights[0]`` padded to ``max(d_out)`` rows); ``momenta`` the same shapes, or None. The open
    chunk, shared by the group (one chunk size): ``offset`` tokens of it consumed and its
    ``anchor`` weights (the weights' shapes; None at offset 0), as in ``MLPState``."""
    names: tuple[str, ...]
    d_out: tuple[int, ...]
    residual: tuple[bool, ...]
    activation: str
    weights: tuple[torch.Tensor, ...]
    momenta: tuple[torch.Tensor, ...] | None
    anchor: tuple[torch.Tensor, ...] | None = None
    offset: int = 0


def generators(state: dict, p: str, params: dict, *, residual, activation: str, momentum: bool,
               like: torch.Tensor) -> Generators:
    """The generators' carried state (each under its own keys, ``lib.mlp_state``: ``p + NAME +
    '.W0'``, ..., ``.offset``, ``.A0`` ...), else their meta-learned initial weights (``params[NAME]``,
    momenta zero), stacked. ``like``: a ``[B, ...]`` tensor."""
    from nlc.backends.torch.lib import mlp_state
    B = like.shape[0]
    ws, ms, anchors, offsets, d_out = [], [], [], set(), []
    for name, ps in params.items():
        st = mlp_state(state, p + name, ps, momentum)
        w = list(st.weights)
        d_out.append(w[0].shape[-2])
        ws.append(w)
        if momentum:
            ms.append(list(st.momenta) if st.momenta is not None else [torch.zeros_like(x) for x in w])
        anchors.append(st.anchor)
        offsets.add(st.offset)
    if len(offsets) != 1:
        raise ValueError(f"generators: the stacked generators {tuple(params)} carry different offsets "
                         f"{sorted(offsets)}: they share one chunk, so a state holds one offset")
    offset, top = offsets.pop(), max(d_out)
    return Generators(tuple(params), tuple(d_out), tuple(residual), activation, _stack(ws, top, B),
                      _stack(ms, top, B) if momentum else None, _stack(anchors, top, B) if offset else None, offset)


def _stack(per_gen, top, B):
    """[[W1, W2, ..] per generator] -> (W1, W2, ..) stacked ``[B, G, H, o, i]``, W1 padded to ``top`` rows."""
    out = []
    for l in range(len(per_gen[0])):
        mats = [w[l] for w in per_gen]
        dtype = mats[0].dtype
        for m in mats[1:]:
            dtype = torch.promote_types(dtype, m.dtype)
        if l == 0:
            mats = [F.pad(m, (0, 0, 0, top - m.shape[-2])) if m.shape[-2] < top else m for m in mats]
        out.append(torch.stack([m.to(dtype).expand(B, *m.shape[-3:]) for m in mats], 1))
    return tuple(out)


def save_generators(new: dict, p: str, gens: Generators) -> None:
    """Each generator's state into ``new`` under its own keys (``lib.mlp_save``: weights, momenta,
    offset, the open chunk's anchor), ``[B, H, d_out, d_in]``."""
    from nlc.backends.torch.lib import mlp_save
    for name, st in zip(gens.names, _split(gens)):
        mlp_save(new, p + name, st)


def spans(T: int, C: int, offset: int = 0) -> list[tuple[int, int]]:
    """The scan's pieces of a call of T tokens that starts ``offset`` tokens into a chunk of C:
    the rest of the open chunk, then chunks of C (the last one ragged), so that every piece lies
    in one chunk counted from the sequence start."""
    head = min((C - offset) % C, T)
    return ([(0, head)] if head else []) + [(a, min(a + C, T)) for a in range(head, T, C)]


def _forward(z, weights, activation, residual):
    """``M(z)`` for every generator at once: z ``[B, 1 or G, H, C, d_in]``; ``residual`` per
    generator. Returns ``(y, inputs, pre)`` as ``deep_memory.mlp_forward``."""
    y, inputs, pre = mlp_forward(z, weights, activation, residual=False)
    if all(residual):
        y = y + z
    elif any(residual):   # 0 * z where a generator has no residual path: exact
        y = y + z * torch.tensor(residual, dtype=y.dtype, device=y.device)[:, None, None, None]
    return y, inputs, pre


def read_generators(gens: Generators, x) -> tuple[torch.Tensor, ...]:
    """Every generator applied to its input at the current (anchor) weights, one call: ``x``
    ``[B, T, H, D]`` read by all, or a tuple with one input per generator. Returns one
    ``[B, T, H, d_out]`` per generator."""
    if _REFERENCE[0]:
        xs = x if isinstance(x, tuple) else (x,) * len(gens.names)
        return tuple(mlp_forward(xi.transpose(1, 2), [w.to(xi.dtype) for w in _at_anchor(st)], gens.activation, r)[0]
                     .transpose(1, 2) for xi, st, r in zip(xs, _split(gens), gens.residual))
    z = _grouped(x, lambda t: t.transpose(1, 2))
    y = _read(z, [w.to(z.dtype) for w in _at_anchor(gens)], gens.activation, gens.residual)
    return tuple(y_g[..., :d].transpose(1, 2) for y_g, d in zip(y.unbind(1), gens.d_out))


def _at_anchor(st):
    """The weights a read uses: the open chunk's anchor, or at a chunk boundary the weights."""
    return st.anchor if st.offset else st.weights


@hot
def _read(z, weights, activation, residual):
    return _forward(z, weights, activation, residual)[0]


def read_generator(gens: Generators, name: str, x: torch.Tensor) -> torch.Tensor:
    """One generator applied to ``x`` ``[B, T, H, D]`` (a generator read at several inputs, or at an
    input that needs another generator's read): ``[B, T, H, d_out]``."""
    from nlc.backends.torch.deep_memory import mlp_forward
    g = gens.names.index(name)
    st = _split(gens)[g]
    y = mlp_forward(x.transpose(1, 2), [w.to(x.dtype) for w in _at_anchor(st)], gens.activation, gens.residual[g])[0]
    return y.transpose(1, 2)


def _grouped(x, f):
    """A shared argument with a generator axis of 1 (it broadcasts), or a tuple stacked on it."""
    if isinstance(x, tuple):
        return torch.stack([f(t) for t in x], 1)
    return f(x).unsqueeze(1)


def _split(gens: Generators) -> list[MLPState]:
    """Each generator's own state (unpadded), ``[B, H, d_out, d_in]``."""
    def per_gen(mats):   # unbind: its backward is one stack, not a zero-filled copy per generator
        return [[m[..., :d, :] if i == 0 and d < m.shape[-2] else m for i, m in enumerate(ms)]
                for ms, d in zip(zip(*(m.unbind(1) for m in mats)), gens.d_out)]
    ws = per_gen(gens.weights)
    ms = per_gen(gens.momenta) if gens.momenta is not None else [None] * len(ws)
    As = per_gen(gens.anchor) if gens.offset else [None] * len(ws)
    return [MLPState(tuple(w), None if m is None else tuple(m), None if a is None else tuple(a), gens.offset)
            for w, m, a in zip(ws, ms, As)]


@full_precision
def update_generators(gens: Generators, k, v, eta, beta=None, alpha=None, erase=None, *, objective="l2",
                      self_target=False, detach_target=False, chunk_size=64, mode="chunk",
                      backend="auto") -> Generators:
    """The update of ``mlp_memory`` (gradients at each chunk's anchor) for every generator at once;
    no output is read. ``k`` ``[B, T, H, D]``, ``v`` the target (``[B, T, H, d_out]``, or ``D``
    with ``self_target``), ``eta, beta, alpha, erase`` ``[B, T, H]``, numbers or None, each shared
    or a tuple with one per generator. T may exceed ``chunk_size``; chunks start at absolute
    multiples of it (a state with an offset first finishes its open chunk at its anchor,
    ``memory_core._anchored``), as in ``mlp_memory``."""
    if backend == "auto":
        backend = "torch"    # AUTO_GENERATORS (plan.py): the stacked scan costs fewer launches per chunk
    if _REFERENCE[0] or mode != "chunk" or _triton_serves(gens, k, chunk_size, backend, objective, self_target):
        return _one_by_one(gens, k, v, eta, beta, alpha, erase, objective=objective, self_target=self_target,
                           detach_target=detach_target, chunk_size=chunk_size, mode=mode, backend=backend)
    _check_offset("update_generators", gens.offset, chunk_size, gens.anchor)
    if (beta is None) != (gens.momenta is None):
        raise ValueError("update_generators: momenta must be given exactly when beta is")
    if objective not in ("l2", "dot"):
        raise ValueError(f"update_generators: objective must be 'l2' or 'dot', got {objective!r}")
    first = k[0] if isinstance(k, tuple) else k
    dtype = torch.promote_types(torch.promote_types(torch.float32, first.dtype), gens.weights[0].dtype)
    W = [w.to(dtype) for w in gens.weights]
    S = None if gens.momenta is None else [s.to(dtype) for s in gens.momenta]
    A = [a.to(dtype) for a in gens.anchor] if gens.offset else None
    top, T = W[0].shape[-2], first.shape[1]
    pad = (lambda t: t) if self_target else (lambda t: F.pad(t, (0, top - t.shape[-1])) if t.shape[-1] < top else t)
    kb = _grouped(k, lambda t: t.to(dtype).transpose(1, 2))                      # [B, 1|G, H, T, D]
    vb = _grouped(v, lambda t: pad(t.to(dtype)).transpose(1, 2))
    sc = lambda x, fill=None: _scalars(x, kb, fill, dtype)  # noqa: E731
    eta, beta, alpha, erase = sc(eta), sc(beta), sc(alpha, 1.0), sc(erase)
    cfg = (objective, self_target, detach_target, gens.activation, gens.residual)

    def run(a, b, st, anchor):   # tokens [a, b) in chunks from a, the first one's gradients at `anchor`
        W, S = st
        for c0 in range(a, b, chunk_size):
            c1 = min(c0 + chunk_size, b)
            cut = lambda x: None if x is None else x[..., c0:c1]        # noqa: E731  per-token scalars
            rows = lambda x: x[..., c0:c1, :]                          # noqa: E731
            W, S = _chunk(W, S, rows(kb), rows(vb), cut(eta), cut(beta), cut(alpha), cut(erase), cfg,
                          anchor if c0 == a else None)
        return kb.new_zeros(1, 0), (W, S)

    _, (W, S), A, offset = _anchored(run, T, chunk_size, gens.offset, A, (W, S))
    return gens._replace(weights=tuple(W), momenta=None if S is None else tuple(S),
                         anchor=None if A is None else tuple(A), offset=offset)


def _scalars(x, kb, fill, dtype):
    """Per-token scalars ``[B, T, H]`` (shared, a number, or a tuple per generator) -> ``[B, 1|G, H, T]``."""
    if x is None:
        if fill is None:
            return None
        x = fill
    if isinstance(x, tuple):
        return torch.stack([_scalars(t, kb, None, dtype)[:, 0] for t in x], 1)
    B, _, H, T = kb.shape[:4]
    if not isinstance(x, torch.Tensor):
        return torch.full((B, 1, H, T), float(x), dtype=dtype, device=kb.device)
    return x.to(dtype).expand(B, T, H).transpose(1, 2).unsqueeze(1)


@hot
def _chunk(W, S, k, v, eta, beta, alpha, erase, cfg, anchor=None):
    """One chunk of every generator's update, the algebra of ``deep_memory._mlp_chunk`` (README
    "Memories") on the stacked weights: errors and per-token gradients at the anchor (``W``, or
    ``anchor`` in the rest of a carried open chunk), then each matrix's end state from ``W``, ``S``.
    With a self-generated target, keys and values go through the MLP together; the erase reuses
    the keys' pre-activation ``k W_L^T`` (its ``K h0``) where the anchor is ``W``."""
    objective, self_target, detach_target, activation, residual = cfg
    C = k.shape[-2]
    co = _coefficients(alpha, beta)
    Wa = W if anchor is None else anchor
    if self_target:
        kv = torch.cat(torch.broadcast_tensors(k, v), -2) if k.shape != v.shape else torch.cat([k, v], -2)
        y, inputs, pre = _forward(kv, Wa, activation, residual)
        y, tau = y[..., :C, :], y[..., C:, :]
        inputs = [a[..., :C, :] for a in inputs]
        pre = [None if x is None else x[..., :C, :] for x in pre]
        if detach_target:
            tau = tau.detach()
    else:
        (y, inputs, pre), tau = _forward(k, Wa, activation, residual), v
    deltas = mlp_token_grads(-tau if objective == "dot" else y - tau, Wa, inputs, pre, activation)
    L = len(W)
    new_W, new_S = [], []
    for l in range(L):
        keys, G = inputs[l], eta[..., None] * deltas[l]          # [.., C, d_in], [.., C, d_out]
        coef = co.Phi[..., C, :, None] * G
        if l == L - 1 and erase is not None:   # the DGD erase's UT transform (memory_core._erase_solve)
            KK, Tinv = _erase_solve(co, keys, erase)
            kh = (keys @ W[l].mT) if pre[l] is None or anchor is not None else pre[l]  # K h0: reads before the chunk
            rhs = co.A[..., :-1, None] * kh - (KK * co.Phi[..., :-1, :]) @ G
            if S is not None:
                rhs = rhs - co.c[..., :-1, None] * (keys @ S[l].mT)
            coef = coef + co.Da[..., C, :, None] * (erase[..., None] * (Tinv @ rhs))
        w = co.A[..., C, None, None] * W[l] - coef.mT @ keys
        if S is not None:
            w = w - co.c[..., C, None, None] * S[l]
            new_S.append(co.Bc[..., C, None, None] * S[l] + (co.Db[..., C, :, None] * G).mT @ keys)
        new_W.append(w)
    return new_W, (new_S if S is not None else None)


def _triton_serves(gens, k, chunk_size, backend, objective, self_target) -> bool:
    """Whether ``mlp_memory`` would send any of these generators to a Triton kernel."""
    if backend == "torch":
        return False
    from nlc.backends.dispatch import pick
    from nlc.backends.triton import deep
    cfg = (objective, self_target, False, gens.activation)
    return any(pick("mlp_memory", backend, k, why_not=deep.supports(cfg + (r,), st.weights, chunk_size)) == "triton"
               for st, r in zip(_split(gens), gens.residual))


def _one_by_one(gens, k, v, eta, beta, alpha, erase, *, objective, self_target, detach_target, chunk_size,
                mode, backend):
    """The reference: each generator through ``mlp_memory`` (its output unused), then restacked."""
    each = lambda x, g: x[g] if isinstance(x, tuple) else x  # noqa: E731
    states = []
    for g, (st, r) in enumerate(zip(_split(gens), gens.residual)):
        kg = each(k, g)
        _, st = mlp_memory(kg, kg, each(v, g), each(eta, g), each(beta, g), each(alpha, g), each(erase, g),
                           initial_state=st, objective=objective, self_target=self_target,
                           detach_target=detach_target, activation=gens.activation, residual=r, mode=mode,
                           chunk_size=chunk_size, backend=backend)
        states.append(st)
    top, B = max(gens.d_out), (k[0] if isinstance(k, tuple) else k).shape[0]
    offset = states[0].offset
    return gens._replace(weights=_stack([s.weights for s in states], top, B),
                         momenta=None if gens.momenta is None else _stack([s.momenta for s in states], top, B),
                         anchor=_stack([s.anchor for s in states], top, B) if offset else None, offset=offset)

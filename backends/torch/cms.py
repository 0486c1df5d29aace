"""The Continuum Memory System's window loop: a CMS model runs window by window (its fastest
period); after each window the in-context gradient of the next-token loss updates the CMS fast
weights (first order), and the outer gradient flows through every window (backprop through time).

One pass per window. The window runs on a window-local graph: the state carried into it enters
as leaves (detached copies), so the in-context gradient (``cms_step``) walks that window only.
The windows are then joined for the outer gradient by one autograd node each (``_Window``),
whose backward backpropagates the window's kept graph to its carried state and the parameters.
``cms_forward_two_pass`` is the reference (a constants-only pass for the in-context gradient,
then a second pass with the full graph); tests hold the two equal in float64.

A call that ends inside a window leaves that window open: the state keeps its tokens and the state
at its start (``state['cms.open']``), and the next call runs the window again from its start with
the new tokens appended, returning the new tokens' logits only. So a sequence fed in pieces cut
anywhere, token by token included, equals the whole: the window's in-context gradient walks the
whole window, as it does in one pass. The price is recomputing the open window's tokens at each
call (up to a window per token when streaming).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["Pending", "cms_fast", "cms_step", "cms_forward", "cms_forward_two_pass", "reopen"]


class Pending(NamedTuple):
    """The last token's logits of a window, with the fast weights that computed them: its
    next-token pair is counted when the target arrives (the next window's, or the next call's,
    first token)."""
    logits: torch.Tensor          # [B, vocab], with its graph to `fast`
    fast: dict                    # level key -> the window's delta leaves


def cms_fast(model, state: dict, levels, batch: int) -> dict:
    """Per layer and CMS level, leaf tensors [B, out, in] for the in-context deltas of the level's
    weights (carried in `state`, zero at first): the window's gradients are taken with respect to
    them."""
    fast = {}
    for i, block in enumerate(model.blocks):
        for name, _, _ in levels:
            mlp = getattr(block, f"{name}_mlp")
            fast[f"{i}.{name}"] = [
                (state[f"{i}.{name}.delta{j}"] if f"{i}.{name}.delta{j}" in state
                 else layer.weight.new_zeros(batch, *layer.weight.shape)).detach().to(layer.weight.dtype).requires_grad_()
                for j, layer in enumerate(mlp.layers)]
    return fast


def _next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of logits [..., V] against targets [...] (computed in float32 at least)."""
    flat = logits.reshape(-1, logits.shape[-1])
    return F.cross_entropy(flat if flat.dtype in (torch.float32, torch.float64) else flat.float(),
                           targets.reshape(-1), reduction="sum")


def cms_step(ids, logits, fast: dict, pending: Pending | None, state: dict, new: dict, levels, end: int) -> Pending:
    """After one window (tokens up to absolute position `end`), first order: add to each CMS
    level's accumulator the gradient of every next-token pair whose target arrived in the window,
    each taken at the fast weights that made its prediction: the pair from the previous window's
    last token (`pending`) and the pairs inside the window. A level whose chunk ends at `end`
    applies `delta -= lr * accumulated` and starts a new accumulation. The loss is summed over
    the batch, and each sequence has its own deltas, so each gets its own gradient. Returns the
    window's last token as the next pending pair."""
    losses, inputs = [], []
    if ids.shape[1] > 1:
        losses.append(_next_token_loss(logits[:, :-1], ids[:, 1:]))
        inputs.append(fast)
    if pending is not None:
        losses.append(_next_token_loss(pending.logits, ids[:, 0]))
        inputs.append(pending.fast)
    leaves = [d for f in inputs for ds in f.values() for d in ds]
    grads = torch.autograd.grad(sum(losses), leaves, retain_graph=True, allow_unused=True) if losses else []
    total: dict = {}
    it = iter(grads)
    for f in inputs:
        for key, ds in f.items():
            sums = total.setdefault(key, [None] * len(ds))
            for j in range(len(ds)):
                g = next(it)
                if g is not None:
                    sums[j] = g if sums[j] is None else sums[j] + g
    periods = {name: (period, lr) for name, period, lr in levels}
    for key, deltas in fast.items():
        period, lr = periods[key.split(".", 1)[1]]
        for j, d in enumerate(deltas):
            acc = state[f"{key}.acc{j}"].detach() if f"{key}.acc{j}" in state else torch.zeros_like(d)
            g = total.get(key, [None] * len(deltas))[j]
            if g is not None:
                acc = acc + g.detach()
            delta = d.detach()
            if end % period == 0:
                delta, acc = delta - lr * acc, torch.zeros_like(acc)
            new[f"{key}.delta{j}"], new[f"{key}.acc{j}"] = delta, acc
    return Pending(logits[:, -1], fast)


def reopen(input_ids, state: dict | None):
    """The tokens to run and the state to start from: a window left open by the previous call
    (``state['cms.open']``: its tokens so far and the state at its start) runs again from its
    start with `input_ids` appended. Returns (tokens, state, how many leading positions are the
    open window's, to drop from the logits)."""
    state = dict(state or {})
    opened = state.pop("cms.open", None)
    if opened is None:
        return input_ids, state, 0
    prefix, start = opened
    return torch.cat([prefix.to(input_ids.device), input_ids], 1), dict(start), prefix.shape[1]


def _opened(ids, state: dict, pos: int, pending):
    """A window this call ends inside (its tokens `ids`, from absolute position `pos`): its tokens
    and the state at its start, as a call starting there would receive it (:func:`reopen`)."""
    return ids, {**state, "t": torch.tensor(pos), "cms.pending": pending}


def cms_forward(model, input_ids, state, levels, window: int):
    """The forward pass of a model with CMS levels, window by window (the fastest period).

    Each window runs once, then takes the gradient of the next-token loss of every pair whose
    target arrived in it (the previous window's last token included) with respect to the CMS fast
    weights that made the prediction (first order), and updates the levels whose chunk ends. The
    window sees the carried state as leaves, so that gradient walks this window's graph only (and
    the pending pair's); when the outer gradient is wanted, the window's outputs are joined to the
    carried state and the parameters by one autograd node. Windows are anchored at absolute
    positions (`state['t']`), and a window left open by the previous call runs again from its
    start (:func:`reopen`). Inside ``generators.reference()``: :func:`cms_forward_two_pass`.
    """
    from nlc.backends.torch.generators import _REFERENCE
    if _REFERENCE[0]:
        return cms_forward_two_pass(model, input_ids, state, levels, window)
    input_ids, state, drop = reopen(input_ids, state)
    keep_graph = torch.is_grad_enabled()
    params = tuple(p for p in model.parameters() if p.requires_grad) if keep_graph else ()
    pos = int(state.pop("t", torch.zeros((), dtype=torch.long)))
    pending = state.pop("cms.pending", None)  # the last token's logits: its target comes next
    outs, s, (B, T), opened = [], 0, input_ids.shape, None
    while s < T:
        e = min(T, s + window - (pos + s) % window)
        ids = input_ids[:, s:e]
        if (pos + e) % window:              # the last window, left open
            opened = _opened(ids, state, pos + s, pending)
        with torch.enable_grad():
            fast = cms_fast(model, state, levels, B)
            local = {k: v.detach().requires_grad_() if _graph(v) else v for k, v in state.items()}
            logits, new = model.run(ids, local, fast)
            pending = cms_step(ids, logits, fast, pending, state, new, levels, pos + e)
        if keep_graph:
            logits, new = _join(logits, new, local, state, params)
        else:
            logits, new = logits.detach(), {k: v.detach() for k, v in new.items()}
        state.update(new)
        outs.append(logits)
        s = e
    state["t"] = torch.tensor(pos + T)
    state["cms.pending"] = pending
    if opened is not None:
        state["cms.open"] = opened
    return torch.cat(outs, 1)[:, drop:], state


def _graph(v) -> bool:
    return isinstance(v, torch.Tensor) and v.requires_grad


class _Graph(NamedTuple):
    outputs: list        # the window's outputs that carry a graph (logits first)
    leaves: list         # the leaves the carried state entered as
    params: tuple        # the model's parameters


def _join(logits, new, local, state, params):
    """The window's logits and new state as outputs of one autograd node whose inputs are the
    carried state (where it has a graph) and the parameters."""
    cut = [k for k, v in local.items() if v is not state[k]]
    keys = [k for k, v in new.items() if _graph(v)]
    if not cut and not params:
        return logits.detach(), {k: v.detach() for k, v in new.items()}
    graph = _Graph([logits] + [new[k] for k in keys], [local[k] for k in cut], params)
    joined = _Window.apply(graph, *[state[k] for k in cut], *params)
    return joined[0], {**new, **dict(zip(keys, joined[1:]))}


class _Window(torch.autograd.Function):
    """One window in the outer graph: backward runs the window's kept graph from the gradients of
    its outputs to its carried state's leaves and the parameters (first order)."""

    @staticmethod
    def forward(ctx, graph, *inputs):
        ctx.graph = graph
        ctx.set_materialize_grads(False)
        return tuple(o.detach() for o in graph.outputs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        graph = ctx.graph
        if graph is None:
            raise RuntimeError("backward through a CMS model's windows a second time: the first backward "
                               "freed them (pass retain_graph=True to it)")
        pairs = [(o, g) for o, g in zip(graph.outputs, grads) if g is not None]
        inputs = [*graph.leaves, *graph.params]
        if not pairs:
            return (None,) * (1 + len(inputs))
        # the window's graph is kept: the pending pair of its last token may still need it
        got = torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs], allow_unused=True,
                                  retain_graph=True)
        if not torch._C._autograd._get_current_graph_task_keep_graph():
            ctx.graph = None
        return (None, *got)


def cms_forward_two_pass(model, input_ids, state, levels, window: int):
    """The reference for :func:`cms_forward`: each window run twice when the outer gradient is wanted.

    Each window runs, then takes the gradient of the next-token loss of every pair whose target
    arrived in it (the previous window's last token included) with respect to the CMS fast
    weights that made the prediction (first order), and updates the levels whose chunk ends. The
    inner gradient is taken on a pass that sees the carried state as constants (it needs nothing
    else, and so never walks the graph of earlier windows); when the outer gradient is wanted, a
    second pass keeps the full graph. Windows are anchored at absolute positions (`state['t']`),
    and a window left open by the previous call runs again from its start (:func:`reopen`).
    """
    input_ids, state, drop = reopen(input_ids, state)
    keep_graph = torch.is_grad_enabled()
    pos = int(state.pop("t", torch.zeros((), dtype=torch.long)))
    pending = state.pop("cms.pending", None)  # the last token's logits: its target comes next
    outs, s, (B, T), opened = [], 0, input_ids.shape, None
    while s < T:
        e = min(T, s + window - (pos + s) % window)
        ids = input_ids[:, s:e]
        if (pos + e) % window:              # the last window, left open
            opened = _opened(ids, state, pos + s, pending)
        with torch.enable_grad():
            fast = cms_fast(model, state, levels, B)
            logits, new = model.run(ids, {k: v.detach() for k, v in state.items()}, fast)
            pending = cms_step(ids, logits, fast, pending, state, new, levels, pos + e)
        if keep_graph:
            logits, outer = model.run(ids, state, {k: [d.detach() for d in v] for k, v in fast.items()})
            new.update({k: v for k, v in outer.items() if ".delta" not in k and ".acc" not in k})
        else:
            logits, new = logits.detach(), {k: v.detach() for k, v in new.items()}
        state.update(new)
        outs.append(logits)
        s = e
    state["t"] = torch.tensor(pos + T)
    state["cms.pending"] = pending
    if opened is not None:
        state["cms.open"] = opened
    return torch.cat(outs, 1)[:, drop:], state

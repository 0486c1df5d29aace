"""Building blocks the generated model code calls: norms, per-head projections, causal
convolutions with carried state, attention with a KV cache, MLPs. Small and plain on purpose:
the generated `model.py` reads as the spec, and these are its vocabulary."""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

ACT = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu, "tanh": torch.tanh, "identity": lambda z: z}


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Divide by the L2 norm over the last dim (head_dim)."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def silu(x): return F.silu(x)
def gelu(x): return F.gelu(x)
def relu(x): return F.relu(x)
def tanh(x): return torch.tanh(x)
def sigmoid(x): return torch.sigmoid(x)
def softplus(x): return F.softplus(x)
def exp(x): return torch.exp(x)
def detach(x): return x.detach()
def log(x): return torch.log(x) if isinstance(x, torch.Tensor) else torch.log(torch.as_tensor(x))
def norm(x): return x.norm(dim=-1)
def sum_(x): return x.sum(dim=-1)   # the spec language's `sum` (not shadowing the builtin)
def dot(a, b): return (a * b).sum(dim=-1)


def heads(x: torch.Tensor) -> torch.Tensor:
    """The head index as a per-head constant [H] (x: [B, T, H, K])."""
    return torch.arange(x.shape[2], dtype=x.dtype, device=x.device)


def per_head_init(heads: int, init) -> torch.Tensor:
    """A learned per-head scalar's initial value [H]: `init(head)` with head = 0 .. heads - 1."""
    value = init(torch.arange(heads, dtype=torch.float64))
    return torch.as_tensor(value, dtype=torch.float64).expand(heads).to(torch.get_default_dtype()).clone()


def per_head(value, like: torch.Tensor) -> torch.Tensor:
    """A per-token, per-head scalar [B, T, H] from a constant or a tensor that broadcasts to it
    ([B, T, H], or [H]: a per-head constant such as a `param`)."""
    if isinstance(value, torch.Tensor):
        return value.to(like.dtype).expand(like.shape[:3])
    return torch.full(like.shape[:3], float(value), dtype=like.dtype, device=like.device)


def vec(x: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-head scalar [B, T, H] against vectors [B, T, H, K]."""
    return x.unsqueeze(-1) if isinstance(x, torch.Tensor) else x


class Proj(nn.Module):
    """A static linear map [B, T, H, K] -> [B, T, H, K'] (frequency 0)."""

    def __init__(self, d_in: int, heads: int, d_head: int):
        super().__init__()
        self.heads, self.d_head = heads, d_head
        self.linear = nn.Linear(d_in, heads * d_head, bias=False)

    def forward(self, x):
        B, T = x.shape[:2]
        return self.linear(x.reshape(B, T, -1)).view(B, T, self.heads, self.d_head)


class HeadScalar(nn.Module):
    """A static linear map to one scalar per head [B, T, H]; `gate` squashes it with a sigmoid."""

    def __init__(self, d_in: int, heads: int, squash: bool):
        super().__init__()
        self.linear, self.squash = nn.Linear(d_in, heads), squash

    def forward(self, x):
        B, T = x.shape[:2]
        y = self.linear(x.reshape(B, T, -1))
        return torch.sigmoid(y) if self.squash else y


class CausalConv(nn.Module):
    """Depthwise causal convolution over time. The last `width - 1` inputs are carried in `state`
    so that a sequence fed in pieces gives what it gives whole."""

    def __init__(self, channels: int, width: int):
        super().__init__()
        self.width = width
        self.weight = nn.Parameter(torch.zeros(channels, width))
        with torch.no_grad():  # start near identity (the newest tap), with a little mixing
            self.weight.uniform_(-0.5 / width, 0.5 / width)
            self.weight[:, -1] += 1.0

    def forward(self, x, state: dict, new: dict, key: str):
        B, T = x.shape[:2]
        flat = x.reshape(B, T, -1)
        past = state.get(key)
        if past is None:
            past = flat.new_zeros(B, self.width - 1, flat.shape[-1])
        full = torch.cat([past.to(flat.dtype), flat], dim=1)
        new[key] = full[:, full.shape[1] - (self.width - 1):]
        w = self.weight.to(flat.dtype)
        # a sum of shifted copies: exact, and far faster on CPU than a grouped conv1d
        y = sum(full[:, j:j + T] * w[:, j] for j in range(self.width))
        return y.reshape(x.shape)


class MLP(nn.Module):
    """`depth` linear layers with an activation between them."""

    def __init__(self, d_in: int, hidden: int, d_out: int, depth: int, act: str):
        super().__init__()
        dims = [d_in] + [hidden] * (depth - 1) + [d_out]
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=False) for a, b in zip(dims, dims[1:]))
        self.act = ACT[act]

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = self.act(x)
        return x


def rope(x: torch.Tensor, start: int, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding of [B, T, H, K] for absolute positions start, start + 1, ...:
    pairs (x_i, x_{i + K/2}) rotate by angle position * base^(-2i/K)."""
    T, K = x.shape[1], x.shape[-1]
    half = K // 2
    freq = base ** (-torch.arange(half, dtype=torch.float64, device=x.device) * 2 / K)
    angle = (torch.arange(start, start + T, dtype=torch.float64, device=x.device)[:, None] * freq).to(x.dtype)
    cos, sin = angle.cos()[None, :, None, :], angle.sin()[None, :, None, :]
    a, b = x[..., :half], x[..., half:2 * half]
    return torch.cat([a * cos - b * sin, a * sin + b * cos, x[..., 2 * half:]], dim=-1)


def attention(q, k, v, window: int | None, state: dict, new: dict, key: str, use_rope: bool = False):
    """Causal softmax attention over [B, T, H, K], with the past keys and values carried in
    `state` (all of them, or the last `window - 1` with a sliding window); with `use_rope`, queries
    and keys are rotated by their absolute positions (the count of tokens seen is carried too)."""
    B, T, H, K = q.shape
    if use_rope:
        start = int(state.get(key + ".n", 0))
        q, k = rope(q, start), rope(k, start)
        new[key + ".n"] = torch.tensor(start + T)
    past_k, past_v = state.get(key + ".k"), state.get(key + ".v")
    if past_k is not None:
        k, v = torch.cat([past_k.to(k.dtype), k], 1), torch.cat([past_v.to(v.dtype), v], 1)
    P = k.shape[1] - T
    keep = k.shape[1] if window is None else min(k.shape[1], window - 1)
    new[key + ".k"], new[key + ".v"] = k[:, k.shape[1] - keep:], v[:, v.shape[1] - keep:]
    i = torch.arange(T, device=q.device)[:, None] + P
    j = torch.arange(k.shape[1], device=q.device)[None, :]
    mask = j <= i
    if window is not None:
        mask = mask & (j > i - window)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return o.transpose(1, 2)


def initial(state: dict, key: str, param: torch.Tensor | None, like: torch.Tensor, shape: tuple) -> torch.Tensor:
    """The carried state, else the meta-learned initial state (expanded over the batch), else zeros."""
    s = state.get(key)
    if s is not None:
        return s
    B = like.shape[0]
    if param is not None:
        return param.to(like.dtype).unsqueeze(0).expand(B, *param.shape)
    return like.new_zeros(B, *shape)


# ---------------------------------------------------------------- the Continuum Memory System

def mlp_with(mlp: MLP, x: torch.Tensor, deltas: list | None) -> torch.Tensor:
    """An MLP run with fast weights: each layer's weight plus the sequence's own in-context delta
    (`deltas[j]` is [B, out, in]: in-context weights belong to one sequence)."""
    if deltas is None:
        return mlp(x)
    for i, (layer, d) in enumerate(zip(mlp.layers, deltas)):
        x = x @ (layer.weight + d.to(layer.weight.dtype)).mT
        if i < len(mlp.layers) - 1:
            x = mlp.act(x)
    return x


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


# ---------------------------------------------------------------- deep (MLP) memories

def mlp_params(heads: int, d_in: int, hidden: int, d_out: int, depth: int, residual: bool) -> nn.ParameterList:
    """Meta-learned initial weights of a per-head MLP memory, output side first: (W1, ..., WL),
    each [H, d_out_l, d_in_l]. The output-side matrix of a residual memory starts at zero (the
    memory starts as the identity)."""
    dims = [d_in] + [hidden] * (depth - 1) + [d_out]
    ws = []
    for l in range(depth):  # l = 0 is the output side
        fan_in, fan_out = dims[depth - 1 - l], dims[depth - l]
        w = torch.randn(heads, fan_out, fan_in) * fan_in ** -0.5
        ws.append(nn.Parameter(torch.zeros_like(w) if (l == 0 and residual) else w))
    return nn.ParameterList(ws)


def mlp_state(state: dict, key: str, params, momentum: bool):
    """The carried MLP memory state, else its meta-learned initial weights (momenta zero)."""
    from nlc.backends.torch.memories import MLPState
    ws = tuple(state[f"{key}.W{i}"] if f"{key}.W{i}" in state else p for i, p in enumerate(params))
    ms = tuple(state[f"{key}.S{i}"] for i in range(len(ws))) if momentum and f"{key}.S0" in state else None
    return MLPState(ws, ms)


def mlp_save(new: dict, key: str, st) -> None:
    for i, w in enumerate(st.weights):
        new[f"{key}.W{i}"] = w
    for i, s in enumerate(st.momenta or ()):
        new[f"{key}.S{i}"] = s


def mlp_read(st, x: torch.Tensor, activation: str, residual: bool) -> torch.Tensor:
    """Apply an MLP memory at its current (anchor) weights: x [B, T, H, D] -> [B, T, H, D_out]."""
    from nlc.backends.torch.memories import mlp_forward
    y, _, _ = mlp_forward(x.transpose(1, 2), [w.to(x.dtype) for w in st.weights], activation, residual)
    return y.transpose(1, 2)


def cms_forward(model, input_ids, state, levels, window: int):
    """The forward pass of a model with CMS levels, window by window (the fastest period).

    Each window runs, then takes the gradient of the next-token loss of every pair whose target
    arrived in it (the previous window's last token included) with respect to the CMS fast
    weights that made the prediction (first order), and updates the levels whose chunk ends. The
    inner gradient is taken on a pass that sees the carried state as constants (it needs nothing
    else, and so never walks the graph of earlier windows); when the outer gradient is wanted, a
    second pass keeps the full graph. Windows are anchored at absolute positions (`state['t']`).
    """
    state = dict(state or {})
    keep_graph = torch.is_grad_enabled()
    pos = int(state.pop("t", torch.zeros((), dtype=torch.long)))
    pending = state.pop("cms.pending", None)  # the last token's logits: its target comes next
    outs, s, (B, T) = [], 0, input_ids.shape
    while s < T:
        e = min(T, s + window - (pos + s) % window)
        ids = input_ids[:, s:e]
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
    return torch.cat(outs, 1), state

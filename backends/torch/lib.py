"""Building blocks the generated model code calls: norms, per-head projections, causal
convolutions with carried state, attention with a KV cache, MLPs. Small and plain on purpose:
the generated `model.py` reads as the spec, and these are its vocabulary. The stacked generators
(`generators.py`), the CMS window loop (`cms.py`) and `compiled` (`compile.py`) are re-exported."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nlc.backends.torch.generators import (
    generators, read_generator, read_generators, save_generators, spans, update_generators)
from nlc.backends.torch.cms import Pending, cms_fast, cms_forward, cms_forward_two_pass, cms_step
from nlc.backends.torch.compile import compiled
from nlc.backends.torch.ops import capturing

__all__ = [  # the vocabulary of generated code (`L.name`)
    "l2norm", "silu", "gelu", "relu", "tanh", "sigmoid", "softplus", "exp", "detach", "log", "norm", "sum_", "dot",
    "heads", "per_head_init", "per_head", "vec", "Proj", "HeadScalar", "CausalConv", "flow", "MLP", "rope", "attention",
    "initial", "mlp_with", "mlp_params", "mlp_state", "mlp_save", "mlp_read", "momentum_state", "momentum_save",
    "generators", "read_generator", "read_generators", "save_generators", "spans", "update_generators",
    "Pending", "cms_fast", "cms_forward", "cms_forward_two_pass", "cms_step", "compiled", "inputs"]


def inputs(input_ids, state, vocab: int) -> dict:
    """What a model's forward was given, checked: ``input_ids`` a ``[batch, tokens]`` tensor of
    integer token ids in ``[0, vocab)``; ``state`` None or the dict that a call with the same batch
    size returned (its tensors are batch-first; 0-d ones are counters). Returns the state as a new
    dict. Raises ValueError saying what is wrong, instead of an error from inside the embedding or
    a reshape. The range check reads two numbers on the host (a sync on a GPU), skipped while a
    CUDA graph is captured or torch.compile traces."""
    if not isinstance(input_ids, torch.Tensor):
        raise ValueError(f"input_ids must be a [batch, tokens] tensor of token ids, got {type(input_ids).__name__}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a [batch, tokens] tensor of token ids, got shape {tuple(input_ids.shape)}"
                         + (" (add the batch dimension: input_ids[None])" if input_ids.dim() == 1 else ""))
    if input_ids.dtype not in (torch.long, torch.int32):
        raise ValueError(f"input_ids must hold token ids as torch.long (or torch.int32), got {input_ids.dtype}")
    if input_ids.numel() and not capturing(input_ids) and not torch.compiler.is_compiling():
        lo, hi = (int(x) for x in torch.aminmax(input_ids))
        if lo < 0 or hi >= vocab:
            raise ValueError(f"token ids must be in [0, {vocab}) (the spec's vocab), got ids from {lo} to {hi}")
    if state is None:
        return {}
    if not isinstance(state, dict):
        raise ValueError(f"state must be None or the dict a previous call returned, got {type(state).__name__}")
    B = input_ids.shape[0]
    for key, v in state.items():
        if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] != B:
            raise ValueError(f"state[{key!r}] is for a batch of {v.shape[0]} and input_ids for {B}: carry a "
                             "state only into calls with the batch size that made it")
    return dict(state)


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

    def window(self, x, state: dict, new: dict, key: str):
        """`x` [B, T, ...] flattened to [B, T, C] behind its carried past (zeros at the start):
        [B, W - 1 + T, C]; its last W - 1 rows are carried on in `new[key]`."""
        B, T = x.shape[:2]
        flat = x.reshape(B, T, -1)
        past = state.get(key)
        if past is None:
            past = flat.new_zeros(B, self.width - 1, flat.shape[-1])
        full = torch.cat([past.to(flat.dtype), flat], dim=1)
        new[key] = full[:, full.shape[1] - (self.width - 1):]
        return full

    def forward(self, x, state: dict, new: dict, key: str):
        T = x.shape[1]
        full = self.window(x, state, new, key)
        w = self.weight.to(full.dtype)
        # a sum of shifted copies: exact, and far faster on CPU than a grouped conv1d
        y = sum(full[:, j:j + T] * w[:, j] for j in range(self.width))
        return y.reshape(x.shape)


def flow(p, ops: tuple, conv, state: dict, new: dict, key: str, backend: str):
    """A flow `ops[-1](...ops[0]([conv](p)))` (p = a projection's output [B, T, H, K]), as the spec
    writes it: on torch, the ops one by one (exactly `L.l2norm(L.silu(conv(p, ...)))`); where the
    backend runs Triton for `p` (`pick`: CUDA under "auto", any device under "triton"), one fused
    kernel (skeleton 3, `nlc.backends.triton.prologue`) with the convolution's past carried the same way."""
    from nlc.backends.dispatch import pick
    if pick("flow", backend, p) == "triton":
        from nlc.backends.triton.prologue import flow as fused
        if conv is None:
            return fused(p, ops)
        past = conv.window(p, state, new, key)[:, :conv.width - 1]     # the carried inputs, as on torch
        return fused(p, ops, conv.weight, past)
    z = p if conv is None else conv(p, state, new, key)
    for op in ops:
        z = globals()[op](z)
    return z


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


def offset_of(state: dict, key: str) -> int:
    """The carried offset `state[key + '.offset']` (tokens of the open chunk already consumed) as a
    Python int; 0 where absent. It is stored as a 0-d int64 tensor on the CPU (`offset_save`), so
    reading it never waits for a GPU; a plain int is accepted too."""
    v = state.get(f"{key}.offset")
    return 0 if v is None else int(v)


def offset_save(new: dict, key: str, offset: int) -> None:
    """Carry a memory's offset as `new[key + '.offset']`: a 0-d int64 CPU tensor (a tensor, since
    the runtime and `cms.py` detach every state value; on the CPU, since it decides where the next
    call is cut). Written at offset 0 too, so that a state dict updated in place (`state.update(new)`,
    as `cms.py` does between windows) never keeps an earlier call's offset."""
    new[f"{key}.offset"] = torch.tensor(int(offset), dtype=torch.long, device="cpu")


def mlp_state(state: dict, key: str, params, momentum: bool):
    """The carried MLP memory state, else its meta-learned initial weights (momenta zero). Keys:
    `key.W{i}` the weights, `key.S{i}` the momenta, `key.offset` the open chunk's offset and, where
    it is > 0, `key.A{i}` that chunk's anchor weights (see `mlp_save`)."""
    from nlc.backends.torch.memories import MLPState
    ws = tuple(state[f"{key}.W{i}"] if f"{key}.W{i}" in state else p for i, p in enumerate(params))
    ms = tuple(state[f"{key}.S{i}"] for i in range(len(ws))) if momentum and f"{key}.S0" in state else None
    offset = offset_of(state, key)
    anchor = tuple(state[f"{key}.A{i}"] for i in range(len(ws))) if offset else None
    return MLPState(ws, ms, anchor, offset)


def mlp_save(new: dict, key: str, st) -> None:
    """Carry an MLPState: weights `key.W{i}`, momenta `key.S{i}`, the offset `key.offset` and, inside
    a chunk (offset > 0), its anchor weights `key.A{i}` (a later state at offset 0 ignores them)."""
    for i, w in enumerate(st.weights):
        new[f"{key}.W{i}"] = w
    for i, s in enumerate(st.momenta or ()):
        new[f"{key}.S{i}"] = s
    offset_save(new, key, st.offset)
    if st.offset:
        for i, a in enumerate(st.anchor):
            new[f"{key}.A{i}"] = a


def momentum_state(state: dict, key: str, param: torch.Tensor | None, like: torch.Tensor, shape: tuple):
    """The carried momentum memory state `MomentumState(M, S, anchor, offset)` from `key.M`, `key.S`,
    `key.offset` and (offset > 0) `key.A`, else the meta-learned initial memory (or zeros) at offset 0."""
    from nlc.backends.torch.memories import MomentumState
    offset = offset_of(state, key)
    return MomentumState(initial(state, f"{key}.M", param, like, shape), state.get(f"{key}.S"),
                         state[f"{key}.A"] if offset else None, offset)


def momentum_save(new: dict, key: str, st) -> None:
    """Carry a MomentumState: `key.M`, `key.S`, `key.offset` and, inside a chunk, its anchor `key.A`."""
    new[f"{key}.M"], new[f"{key}.S"] = st
    offset_save(new, key, st.offset)
    if st.offset:
        new[f"{key}.A"] = st.anchor


def mlp_read(st, x: torch.Tensor, activation: str, residual: bool) -> torch.Tensor:
    """Apply an MLP memory at its current weights `st.weights` (the next chunk's anchor where the
    state is at a chunk boundary; inside a chunk its anchor is `st.anchor`): x [B, T, H, D] -> [B, T, H, D_out]."""
    from nlc.backends.torch.memories import mlp_forward
    y, _, _ = mlp_forward(x.transpose(1, 2), [w.to(x.dtype) for w in st.weights], activation, residual)
    return y.transpose(1, 2)

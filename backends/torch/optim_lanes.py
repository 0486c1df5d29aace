"""Optimizer specs, the tensor side: Newton-Schulz, the rule primitives and expressions over lanes.

What one step of a compiled optimizer computes on tensors (the step itself is described in
``optim.py``'s docstring): Muon's quintic Newton-Schulz, batched over parameters of equal shape;
the rule primitives a level's chain is made of (``ema``, ``momentum``, ``debias``, ...), registered
by name in ``_RULE_IMPL``; and ``_Compiler``, which turns an expression of a group (a level's input,
a rule's argument, the update) into a closure over *lanes*, the list of the group's parameters
(their ``_Env``), caching subexpressions that read only slow levels and hyperparameters.
``optim_program.py`` assembles these into programs; nothing here reads spec files.
"""
from __future__ import annotations

import itertools
import math
import operator
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from nlc.expr import Bin, Call, ExprNode, Index, ListE, Name, Neg, Num
from nlc.vocab import OPT_NAMES

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7          # torch.optim.Muon's
NS_DEFAULT_STEPS = 5
# On CPU, stacking pays only for small matrices (benchmarks/BENCHMARKS.md: about 5x at 32x32, 1.7x
# at 64x64, nothing from 128x128 on); on an accelerator every equal shape is batched.
NS_BATCH_MAX_NUMEL_CPU = 96 * 96

Lanes = list            # one value per parameter of the group
Fn = Callable[[list["_Env"]], Lanes]


# ---------------------------------------------------------------- Newton-Schulz

def as_matrix(t: Tensor) -> Tensor:
    """The matrix view of a parameter-shaped tensor: ``[rows, cols]``, a vector as one row."""
    return t.reshape(t.shape[0], -1) if t.ndim >= 2 else t.reshape(1, -1)


def newton_schulz(x: Tensor, steps: int = NS_DEFAULT_STEPS, eps: float = NS_EPS) -> Tensor:
    r"""Quintic Newton-Schulz orthogonalisation (Muon's), batched over a leading dimension.

    For each matrix ``X`` of ``x`` (``[n, rows, cols]``): transpose if tall (rows > cols);
    :math:`X \leftarrow X / \max(\|X\|_F, \varepsilon)`; then ``steps`` times
    :math:`A = X X^\top,\ X \leftarrow a X + (b A + c A^2) X` with
    :math:`(a, b, c) = (3.4445, -4.7750, 2.0315)`; transpose back. ``NS(0) = 0``. Computed in x's
    dtype (torch.optim.Muon computes in bfloat16). The result is close to :math:`U V^\top` of the
    SVD :math:`X = U \Sigma V^\top`: its singular values are near 1, not equal to 1 (the
    coefficients trade convergence for a steep slope at 0).
    """
    a, b, c = NS_COEFFICIENTS
    tall = x.size(-2) > x.size(-1)
    X = x.mT if tall else x
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp_min(eps)
    for _ in range(int(steps)):
        A = torch.bmm(X, X.mT)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a)
    return X.mT if tall else X


def _ns_lanes(xs: Lanes, steps: Lanes, envs: list["_Env"]) -> Lanes:
    """NS of each lane's tensor; lanes of equal shape, dtype and steps share one batched chain."""
    out: Lanes = [None] * len(xs)
    batch = envs[0].batch_ns if envs else True
    buckets: dict[tuple, list[int]] = defaultdict(list)
    for i, (x, s) in enumerate(zip(xs, steps)):
        alone = not batch or (x.device.type == "cpu" and x.numel() > NS_BATCH_MAX_NUMEL_CPU)
        buckets[(x.shape, x.dtype, x.device, int(s), i if alone else -1)].append(i)
    for (shape, _, _, s, _), idx in buckets.items():
        y = newton_schulz(torch.stack([as_matrix(xs[i]) for i in idx]), s)
        for j, i in enumerate(idx):
            out[i] = y[j].reshape(shape)
    return out


# ---------------------------------------------------------------- rule primitives

@dataclass(frozen=True)
class _Ctx:
    param: Tensor      # the parameter before this step
    tick: int          # how many times the level's chain has run, this run included


@dataclass(frozen=True)
class _Rule:
    fn: Callable
    stateful: bool


_RULE_IMPL: dict[str, _Rule] = {}


def _rule(name: str, stateful: bool = False):
    def register(fn):
        _RULE_IMPL[name] = _Rule(fn, stateful)
        return fn
    return register


@_rule("scale")
def rule_scale(u, ctx, c):
    r"""``scale(c)``: :math:`u \leftarrow c\,u`."""
    return c * u


@_rule("accumulate", stateful=True)
def rule_accumulate(u, S):
    r"""``accumulate``: a running sum. :math:`S_t = S_{t-1} + u_t` (:math:`S_0 = 0`); :math:`u \leftarrow S_t`."""
    S = S + u
    return S, S


@_rule("ema", stateful=True)
def rule_ema(u, S, beta):
    r"""``ema(beta)``: exponential moving average.

    :math:`S_t = \beta S_{t-1} + (1 - \beta) u_t` (:math:`S_0 = 0`, no bias correction; see
    ``debias``); :math:`u \leftarrow S_t`. Computed as ``S.lerp(u, 1 - beta)``, as torch's Adam does.
    """
    S = S.lerp(u, 1 - beta)
    return S, S


@_rule("momentum", stateful=True)
def rule_momentum(u, S, beta, nesterov=False):
    r"""``momentum(beta, nesterov=0)``: heavy-ball momentum, torch.optim.SGD's buffer (dampening 0).

    :math:`S_t = \beta S_{t-1} + u_t` (:math:`S_0 = 0`); :math:`u \leftarrow S_t`, or with
    ``nesterov`` true :math:`u \leftarrow u_t + \beta S_t`.
    """
    S = beta * S + u
    return (u + beta * S if nesterov else S), S


@_rule("retain", stateful=True)
def rule_retain(u, S, alpha):
    r"""``retain(alpha)``: the model-level retention, with the level's running value as its memory.

    :math:`S_t = \alpha S_{t-1} + u_t` (:math:`S_0 = 0`); :math:`u \leftarrow S_t`. On an optimizer
    level this equals ``momentum(alpha)``; it exists so that a model's rule chain reads the same here.
    """
    S = alpha * S + u
    return S, S


@_rule("delta_momentum", stateful=True)
def rule_delta_momentum(u, S, alpha):
    r"""``delta_momentum(alpha)``: momentum with a gradient-dependent decay (NL §7).

    The momentum memory trained with an L2 objective instead of a dot product: with ``S`` and
    ``u`` viewed as matrices ``[rows, cols]`` (a vector as one row),

    .. math:: S_t = S_{t-1} \Big(\alpha I - \frac{u_t^\top u_t}{\|u_t\|_F^2}\Big) + u_t
              = \alpha S_{t-1} - \frac{(S_{t-1} u_t^\top)\, u_t}{\|u_t\|_F^2} + u_t

    (:math:`S_0 = 0`; the erase term is 0 when :math:`u_t = 0`); :math:`u \leftarrow S_t`. For a
    rank-one ``u = a b^T`` the erase removes S's component along ``b`` before the write, the delta
    rule with a unit key; ``u^T u / |u|^2`` has eigenvalues in [0, 1], so ``alpha`` in [0, 1]
    keeps the decay's spectral norm at most 1.
    """
    Sm, um = as_matrix(S), as_matrix(u)
    norm2 = (um * um).sum().clamp_min(torch.finfo(um.dtype).tiny)
    S = (alpha * Sm - (Sm @ um.mT) @ um / norm2 + um).reshape(u.shape)
    return S, S


@_rule("debias")
def rule_debias(u, ctx, beta):
    r"""``debias(beta)``: Adam's bias correction, :math:`u \leftarrow u / (1 - \beta^k)`, where ``k``
    counts the level's writes (the step for an every-step level, the block for a slow one)."""
    return u / (1 - beta ** ctx.tick)


@_rule("weight_decay")
def rule_weight_decay(u, ctx, wd):
    r"""``weight_decay(wd)``: coupled L2 decay, :math:`u \leftarrow u + \mathrm{wd}\,\theta`
    (:math:`\theta` the parameter before this step; torch.optim.SGD's ``weight_decay``)."""
    return u + wd * ctx.param


@_rule("precondition")
def rule_precondition(u, ctx, p):
    r"""``precondition(p)``: element-wise :math:`u \leftarrow p \odot u` (``p`` an expression, e.g.
    ``1 / (sqrt(V) + eps)``)."""
    return p * u


@_rule("newton_schulz")
def rule_newton_schulz(u, ctx, steps=NS_DEFAULT_STEPS):
    r"""``newton_schulz(steps=5)``: :math:`u \leftarrow \mathrm{NS}_T(u)`, see :func:`newton_schulz`
    (u viewed as ``[rows, cols]``, a vector as one row). Batched across parameters by the chain."""
    return _ns_lanes([u], [steps], [])[0]


# ---------------------------------------------------------------- expressions over lanes

@dataclass(eq=False)
class _Env:
    """What an expression sees for one parameter during one step."""
    hyper: dict
    grad: Tensor | None = None
    param: Tensor | None = None
    step: int = 0
    state: dict = field(default_factory=dict)   # written values: `L` reads state[L]
    prev: dict = field(default_factory=dict)    # values before this step's writes
    cache: dict = field(default_factory=dict)   # slow-only subexpressions, per parameter
    batch_ns: bool = True

    @property
    def rows(self) -> int:
        return self.param.shape[0] if self.param.ndim else 1

    @property
    def cols(self) -> int:
        return self.param.numel() // max(self.rows, 1)


def _is_t(x) -> bool:
    return isinstance(x, Tensor)


def _unary(tfn, pyfn):
    return lambda x: tfn(x) if _is_t(x) else pyfn(x)


def _binary_minmax(tfn, pyfn, clamp):
    def f(a, b):
        if _is_t(a) and _is_t(b):
            return tfn(a, b)
        if _is_t(a) or _is_t(b):
            t, s = (a, b) if _is_t(a) else (b, a)
            return t.clamp(**{clamp: s})
        return pyfn(a, b)
    return f


_ELEMENTWISE = {
    "sqrt": _unary(torch.sqrt, math.sqrt), "abs": _unary(torch.abs, abs),
    "sign": _unary(torch.sign, lambda v: float((v > 0) - (v < 0))),
    "exp": _unary(torch.exp, math.exp), "log": _unary(torch.log, math.log),
    "max": _binary_minmax(torch.maximum, max, "min"), "min": _binary_minmax(torch.minimum, min, "max"),
}
_BIN = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv, "^": operator.pow}
_STREAM = {"grad", "param", "step"}     # names that change every step


class _Compiler:
    """Compiles the expressions of one group into lane closures.

    ``levels`` maps the group's level names to whether they are slow; None compiles a
    hyperparameter-only expression (the overrides of a ``use:``). Names, calls and arities were
    checked by ``nlc.check`` before; what it lets through that this backend cannot run raises.
    """

    _cache_ids = itertools.count()

    def __init__(self, hypers, levels: dict[str, bool] | None):
        self.hypers, self.levels = set(hypers), levels

    # -- what an expression reads: ("level"|"prev"|"hyper"|"stream"|"shape", name)
    def reads(self, e: ExprNode) -> set[tuple[str, str]]:
        if isinstance(e, Call) and e.fn == "prev" and len(e.args) == 1 and isinstance(e.args[0], Name):
            return {("prev", e.args[0].id)}
        if isinstance(e, Name):
            if self.levels is not None and e.id in self.levels:
                return {("level", e.id)}
            if e.id in self.hypers:
                return {("hyper", e.id)}
            return {("stream" if e.id in _STREAM else "shape", e.id)}
        return set().union(*(self.reads(c) for c in e.children())) if e.children() else set()

    def _slow_only(self, e: ExprNode) -> bool:
        if isinstance(e, (Num, Name)) or (isinstance(e, Call) and e.fn == "prev"):
            return False
        r = self.reads(e)
        lv = [n for k, n in r if k in ("level", "prev")]
        return bool(lv) and all(self.levels.get(n) for n in lv) and not any(k == "stream" for k, _ in r)

    def compile(self, e: ExprNode, cache_ok: bool = True) -> Fn:
        if cache_ok and self.levels is not None and self._slow_only(e):
            return self._cached(e, self._node(e, False))
        return self._node(e, cache_ok)

    def _cached(self, e: ExprNode, inner: Fn) -> Fn:
        """Recompute `e` for a parameter only when a level or hyperparameter it reads changed."""
        key_id = next(self._cache_ids)
        getters = [self._node(Call(fn="prev", args=(Name(id=n),)) if k == "prev" else Name(id=n), False)
                   for k, n in sorted(self.reads(e)) if k in ("level", "prev", "hyper")]

        def same(a, b):
            return a is b if _is_t(a) or _is_t(b) else a == b

        def run(envs):
            keys = list(zip(*[g(envs) for g in getters])) if getters else [()] * len(envs)
            out, miss = [None] * len(envs), []
            for i, (env, key) in enumerate(zip(envs, keys)):
                hit = env.cache.get(key_id)
                if hit is not None and all(same(a, b) for a, b in zip(hit[0], key)):
                    out[i] = hit[1]
                else:
                    miss.append(i)
            if miss:
                vals = inner([envs[i] for i in miss])
                for i, v in zip(miss, vals):
                    envs[i].cache[key_id] = (keys[i], v)
                    out[i] = v
            return out
        return run

    def _node(self, e: ExprNode, cache_ok: bool) -> Fn:
        if isinstance(e, Num):
            v = e.value
            return lambda envs: [v] * len(envs)
        if isinstance(e, Name):
            return self._name(e)
        if isinstance(e, Neg):
            f = self.compile(e.arg, cache_ok)
            return lambda envs: [-a for a in f(envs)]
        if isinstance(e, Bin):
            op, fa, fb = _BIN[e.op], self.compile(e.left, cache_ok), self.compile(e.right, cache_ok)
            return lambda envs: [op(a, b) for a, b in zip(fa(envs), fb(envs))]
        if isinstance(e, Index):
            fb, fi = self.compile(e.base, cache_ok), self.compile(e.index, cache_ok)
            return lambda envs: [b[int(i)] for b, i in zip(fb(envs), fi(envs))]
        if isinstance(e, ListE):
            fs = [self.compile(x, cache_ok) for x in e.items]
            return lambda envs: [list(v) for v in zip(*[f(envs) for f in fs])] if fs else [[] for _ in envs]
        return self._call(e, cache_ok)

    def _name(self, e: Name) -> Fn:
        n = e.id
        if self.levels is not None and n in self.levels:
            return lambda envs: [env.state[n] for env in envs]
        if n in self.hypers:
            return lambda envs: [env.hyper[n] for env in envs]
        if self.levels is not None and n in OPT_NAMES:
            get = {"grad": lambda env: env.grad, "param": lambda env: env.param, "step": lambda env: env.step,
                   "rows": lambda env: env.rows, "cols": lambda env: env.cols,
                   "numel": lambda env: env.param.numel()}[n]
            return lambda envs: [get(env) for env in envs]
        raise ValueError(f"`{n}` is not defined in an optimizer expression")

    def _call(self, e: Call, cache_ok: bool) -> Fn:
        if e.fn == "prev":
            n = e.args[0].id
            return lambda envs: [env.prev[n] for env in envs]
        fs = [self.compile(a, cache_ok) for a in e.args]
        if e.fn == "newton_schulz":
            fx = fs[0]
            fsteps = fs[1] if len(fs) > 1 else (lambda envs: [NS_DEFAULT_STEPS] * len(envs))
            return lambda envs: _ns_lanes(fx(envs), fsteps(envs), envs)
        fn = _ELEMENTWISE[e.fn]
        return lambda envs: [fn(*vals) for vals in zip(*[f(envs) for f in fs])]

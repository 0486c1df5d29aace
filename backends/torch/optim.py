"""Optimizer specs compiled to torch optimizers: a small interpreter of levels on the step clock.

An optimizer spec (``specs/adamw.yaml``, ``specs/m3.yaml``, ...) gives, per parameter group, levels
over the gradient stream and an ``update`` expression. ``compile_optimizer`` turns it into a
:class:`SpecOptimizer`, one generic ``torch.optim.Optimizer``. Each step, for each parameter with a
gradient:

1. ``step`` counts up (1 on the first step); ``prev(L)`` is level L's value before this step;
2. the levels are written in declaration order. An every-step level runs its rule chain on its
   input; a slow level (``every: f steps``) adds its input to a block sum and, at the block's last
   step (``step % f == 0``), runs its chain once on the sum and starts the next block. The chain's
   output is the level's new value, read as ``L``;
3. the update expression is evaluated (``L`` after this step's writes, ``prev(L)`` before) and
   added to the parameter.

So a slow level written at step f is seen by ``L`` at step f and by ``prev(L)`` from step f + 1:
M3 reads ``prev(M2)`` and its slow term lags one block, as Algorithm 1 prints it.

Expressions compile once into closures over *lanes*: a closure maps the list of a group's
parameters (their ``_Env``) to the list of values, so ``newton_schulz`` stacks parameters of equal
shape into one batched matmul chain. A subexpression that reads only slow levels and
hyperparameters is cached per parameter until a level it reads is rewritten (M3's NS(M2) runs once
per block). Level state lives in ``optimizer.state[p]`` under ``step``, ``L`` (the value),
``L.<i>`` (the state of chain step i) and ``L.sum`` (a slow level's block sum); values are never
updated in place, which keeps the cache's identity test sound and ``state_dict`` exact.
"""
from __future__ import annotations

import itertools
import math
import operator
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

import nlc
from nlc.diagnostics import Collector, did_you_mean
from nlc.expr import Bin, Call, ExprNode, Index, ListE, Name, Neg, Num
from nlc.spec import OptimizerSpec, OptLevel, ParamGroup
from nlc.vocab import OPT_NAMES

__all__ = ["compile_optimizer", "optimizer_of", "SpecOptimizer", "newton_schulz", "SPECS_DIR", "NS_COEFFICIENTS", "NS_EPS"]

SPECS_DIR = Path(nlc.__file__).parent.parent / "specs"      # shipped specs, found by nlc.loader.find_spec
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


# ---------------------------------------------------------------- programs: compiled specs

@dataclass(eq=False)
class _Level:
    name: str
    input: Fn
    chain: list[tuple[str, list[Fn]]]
    period: int | str        # steps per write, or the hyperparameter holding it

    def write(self, envs: list[_Env]) -> None:
        xs = [x if _is_t(x) else torch.full_like(env.param, x) for x, env in zip(self.input(envs), envs)]
        period = self.period if isinstance(self.period, int) else int(envs[0].hyper[self.period])
        if period == 1:
            run, us = envs, xs
        else:
            run, us, key = [], [], self.name + ".sum"
            for env, x in zip(envs, xs):
                total = env.state[key] + x
                if env.step % period == 0:
                    run.append(env)
                    us.append(total)
                    total = torch.zeros_like(total)
                env.state[key] = total
            if not run:
                return
        for j, (name, arg_fns) in enumerate(self.chain):
            args = [f(run) for f in arg_fns]
            if name == "newton_schulz":
                us = _ns_lanes(us, args[0] if args else [NS_DEFAULT_STEPS] * len(us), run)
                continue
            rule, key = _RULE_IMPL[name], f"{self.name}.{j}"
            for i, env in enumerate(run):
                a = [arg[i] for arg in args]
                if rule.stateful:
                    state = env.state.get(key)
                    us[i], env.state[key] = rule.fn(us[i], torch.zeros_like(us[i]) if state is None else state, *a)
                else:
                    us[i] = rule.fn(us[i], _Ctx(env.param, env.step // period), *a)
        for env, u in zip(run, us):
            env.state[self.name] = u


@dataclass(eq=False)
class _RuleGroup:
    params: str
    levels: list[_Level]     # in dependency order
    update: Fn
    slow: tuple[str, ...]    # names of slow levels (for the block sums)


@dataclass(eq=False)
class _UseGroup:
    params: str
    program: "_Program"
    hyper: dict[str, Fn]     # overrides of the used spec's hyperparameters, over this spec's

    def child_hyper(self, hyper: dict) -> dict:
        env = [_Env(hyper=hyper)]
        out = dict(self.program.spec.hyper)
        out.update({k: f(env)[0] for k, f in self.hyper.items()})
        return out


@dataclass(eq=False)
class _Program:
    spec: OptimizerSpec
    file: str
    groups: list

    def route(self, p: Tensor) -> tuple | None:
        """The `use:` groups a parameter passes through and the rule group that updates it."""
        for g in self.groups:
            if g.params in ("all", "rest") or (g.params == "matrix") == (p.ndim >= 2):
                if isinstance(g, _UseGroup):
                    inner = g.program.route(p)
                    return None if inner is None else (g, *inner)
                return (g,)
        return None


def _load(spec, errors: Collector | None = None, span=None, base: Path | None = None):
    """(OptimizerSpec, source map or None, file, source text) of a name, a path or a spec, checked."""
    from nlc.check import check
    from nlc.loader import Loaded, find_spec, load_located, shipped_names
    if isinstance(spec, OptimizerSpec):
        loaded = Loaded(spec, None, "", "<spec>")
        errors = Collector("<spec>")
        check(loaded, errors)
        errors.raise_if_any()
    elif isinstance(spec, Loaded):
        loaded = spec
    else:
        path = find_spec(str(spec), base or Path("."))
        if path is None:
            errors = errors or Collector(str(spec))
            shipped = shipped_names("optimizer")
            errors.error("E207", f"no optimizer spec `{spec}`: neither a shipped name nor a file", span,
                         did_you_mean(str(spec), shipped) or f"shipped: {', '.join(shipped)}")
            errors.raise_if_any()
        loaded = load_located(path)
    if not isinstance(loaded.spec, OptimizerSpec):
        errors = errors or Collector(loaded.file, loaded.source)
        errors.error("E207", f"`{loaded.file}` is a model spec, not an optimizer spec", span)
        errors.raise_if_any()
    return loaded.spec, loaded.smap, loaded.file, loaded.source


def _compile(spec: OptimizerSpec, smap, file: str, source: str, defaults: dict, seen: tuple = ()) -> _Program:
    """Compile every group of a checked spec (and the specs its groups `use`)."""
    groups = []
    for gi, g in enumerate(spec.groups):
        if g.use is not None:
            groups.append(_compile_use(g, gi, spec, smap, file, source, defaults, seen))
            continue
        periods = {n: _period(lv) for n, lv in g.levels.items()}
        comp = _Compiler(spec.hyper, {n: p != 1 for n, p in periods.items()})
        levels = [_Level(n, comp.compile(lv.input), [(c.fn, [comp.compile(a) for a in c.args]) for c in lv.rule],
                         periods[n]) for n, lv in g.levels.items()]
        for lv in levels:
            for name, _ in lv.chain:
                if name not in _RULE_IMPL:
                    raise ValueError(f"`{name}` acts on a model memory; an optimizer level cannot run it")
        groups.append(_RuleGroup(g.params, levels, comp.compile(g.update),
                                 tuple(n for n, p in periods.items() if p != 1)))
    return _Program(spec, file, groups)


def _period(lv: OptLevel) -> int | str:
    """Steps per write: 1, a number, or the hyperparameter that holds it."""
    return 1 if lv.every is None else lv.every.period[0]


def _compile_use(g: ParamGroup, gi, spec, smap, file, source, defaults, seen) -> _UseGroup:
    """A delegating group; the used spec's hyperparameters as evaluated now are range-checked."""
    span = smap.get("groups", gi, "use") if smap else None
    errors = Collector(file, source)
    child, csmap, cfile, csource = _load(g.use.use, errors, span, Path(file).parent if smap else None)
    if (cfile, child.name) in seen + ((file, spec.name),):
        errors.error("E401", f"optimizer specs use each other in a cycle through `{g.use.use}`", span)
        errors.raise_if_any()
    comp = _Compiler(spec.hyper, None)
    use = _UseGroup(g.params, _compile(child, csmap, cfile, csource, child.hyper, seen + ((file, spec.name),)),
                    {k: comp.compile(v) for k, v in g.use.hyper.items()})
    from nlc.check_common import check_hyper
    sub = Collector(file)
    check_hyper(child, None, use.child_hyper(defaults), sub)
    for d in sub.diagnostics:
        errors.error(d.code, f"in `use: {g.use}`: {d.message}", span, d.hint)
    errors.raise_if_any()
    return use


# ---------------------------------------------------------------- the optimizer

class SpecOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` that runs an optimizer spec (see the module docstring).

    Hyperparameters live in each param group under their spec names, so LR schedulers and
    per-group settings work as with torch's optimizers. ``batch_ns = False`` runs Newton-Schulz
    parameter by parameter (the batched form stacks parameters of equal shape).
    """

    def __init__(self, params, spec, **hyper):
        spec_, smap, file, source = _load(spec)
        errors = Collector(file, source)
        from nlc.check_common import check_hyper
        check_hyper(spec_, smap, hyper, errors)
        errors.raise_if_any()
        defaults = {**spec_.hyper, **hyper}
        self.spec, self.batch_ns = spec_, True
        self._program = _compile(spec_, smap, file, source, defaults)
        self._where = (smap, file, source)
        self._cache: dict[Tensor, dict] = {}
        self._routes: dict[Tensor, tuple] = {}
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        smap, file, source = self._where
        errors = Collector(file, source)
        from nlc.check_common import check_hyper
        check_hyper(self.spec, smap, {k: v for k, v in param_group.items() if k in self.spec.hyper}, errors)
        errors.raise_if_any()
        super().add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:
            self._routes[p] = self._program.route(p)
            if self._routes[p] is None:
                raise ValueError(f"optimizer `{self.spec.name}`: no group takes a parameter of shape "
                                 f"{tuple(p.shape)} (groups: {', '.join(g.params for g in self._program.groups)})")

    def load_state_dict(self, state_dict) -> None:
        self._cache.clear()
        super().load_state_dict(state_dict)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            hyper = {k: group[k] for k in self.spec.hyper}
            lanes: dict[tuple, list[_Env]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse or p.is_complex():
                    raise RuntimeError(f"optimizer `{self.spec.name}` takes dense real parameters")
                lanes[self._routes[p]].append(self._env(p))
            for route, envs in lanes.items():
                h = hyper
                for use in route[:-1]:
                    h = use.child_hyper(h)
                for env in envs:
                    env.hyper = h
                self._run(route[-1], envs)
        return loss

    def _env(self, p: Tensor) -> _Env:
        state = self.state[p]
        if not state:
            state["step"] = 0
        leaf = self._routes[p][-1]
        for lv in leaf.levels:
            if lv.name not in state:
                state[lv.name] = torch.zeros_like(p)
        for n in leaf.slow:
            state.setdefault(n + ".sum", torch.zeros_like(p))
        state["step"] += 1
        return _Env(hyper={}, grad=p.grad, param=p, step=state["step"], state=state,
                    prev={lv.name: state[lv.name] for lv in leaf.levels},
                    cache=self._cache.setdefault(p, {}), batch_ns=self.batch_ns)

    @staticmethod
    def _run(leaf: _RuleGroup, envs: list[_Env]) -> None:
        for lv in leaf.levels:
            lv.write(envs)
        for env, u in zip(envs, leaf.update(envs)):
            env.param.add_(u)


def optimizer_of(model, base_dir: str | Path = ".") -> OptimizerSpec | None:
    """The optimizer spec a model spec trains with, as the model configures it: the spec written
    inline (``optimizer: {hyper, groups}``), or the one named (``adamw(lr=4e-4)``: a shipped name, or a
    path relative to ``base_dir``, the model file's folder) with the model's overrides as its
    defaults; a group's ``use:`` of a file (not a shipped name) becomes its absolute path, so the
    spec compiles from anywhere. None when the model names no optimizer. A checked model spec's reference resolves;
    otherwise ``nlc.SpecError`` (E207 not found, E208 unknown name, E502 out of range).

    >>> opt = compile_optimizer(optimizer_of(spec, "specs"), model.parameters(), lr=1e-3)
    """
    from nlc.check_common import override_value
    from nlc.spec import OptimizerRef
    ref = model.optimizer
    if ref is None:
        return None
    if not isinstance(ref, OptimizerRef):
        return _uses_resolved(ref, Path(base_dir))
    errors = Collector(f"model `{model.name}`")
    opt, _, file, _ = _load(ref.use, errors, None, Path(base_dir))
    opt = _uses_resolved(opt, Path(file).parent)
    hyper = dict(opt.hyper)
    for name, e in ref.hyper.items():
        if name not in opt.hyper:
            errors.error("E208", f"`{opt.name}` has no hyperparameter `{name}`", None, did_you_mean(name, opt.hyper))
        elif (value := override_value(e, opt.hyper[name])) is None:
            errors.error("E502", f"override `{name}={e}` is not a constant")
        else:
            hyper[name] = value
    errors.raise_if_any()
    from nlc.check_common import check_hyper
    check_hyper(opt, None, {k: v for k, v in hyper.items() if k in ref.hyper}, errors)
    errors.raise_if_any()
    return opt.model_copy(update={"hyper": hyper})


def _uses_resolved(opt: OptimizerSpec, base_dir: Path) -> OptimizerSpec:
    """`opt` with each group's `use:` of a file beside it (not a shipped name) as an absolute path,
    so that the spec compiles wherever it is handed on."""
    from nlc.loader import find_spec
    groups = []
    for g in opt.groups:
        found = find_spec(g.use.use, base_dir) if g.use is not None else None
        if found is not None and found.resolve().parent != SPECS_DIR.resolve():
            g = g.model_copy(update={"use": g.use.model_copy(update={"use": str(found.resolve())})})
        groups.append(g)
    return opt.model_copy(update={"groups": tuple(groups)})


def compile_optimizer(spec, params, **hyper) -> SpecOptimizer:
    """An optimizer from a spec: a shipped name (``"adamw"``, ``"muon"``, ``"m3"``...), a path to a
    ``.yaml``/``.nl`` optimizer spec, or an ``OptimizerSpec`` (a model's inline optimizer,
    ``model_spec.optimizer``, is one; :func:`optimizer_of` gives a model's optimizer in either form). Keyword arguments override the spec's
    hyperparameters by name and are range-checked (``nlc.SpecError``, code E502, located at the
    hyperparameter's declaration).

    >>> opt = compile_optimizer("m3", model.parameters(), lr=0.01, slow_every=8)
    """
    return SpecOptimizer(params, spec, **hyper)

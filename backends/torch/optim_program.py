"""Optimizer specs, the spec side: loading, resolving and compiling them into programs.

``_load`` finds an optimizer spec (a shipped name, a path, or an ``OptimizerSpec``) and checks it;
``_compile`` turns each of its parameter groups into a ``_RuleGroup`` (its levels, with their rule
chains and periods, and the update, compiled by ``optim_lanes._Compiler``) or a ``_UseGroup``
(delegation to another spec, loaded and compiled in turn, cycles refused); a ``_Program`` routes
each parameter to the group that updates it. ``optimizer_of`` resolves the optimizer a model spec
names. ``optim.py``'s ``SpecOptimizer`` runs the programs.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

import nlc
from nlc.diagnostics import Collector, did_you_mean
from nlc.spec import OptimizerSpec, OptLevel, ParamGroup

from .optim_lanes import _RULE_IMPL, NS_DEFAULT_STEPS, Fn, _Compiler, _Ctx, _Env, _is_t, _ns_lanes

SPECS_DIR = Path(nlc.__file__).parent.parent / "specs"      # shipped specs, found by nlc.loader.find_spec


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

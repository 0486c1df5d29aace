"""What the model and optimizer checkers share: source positions, rule chains, the ranges of
optimizer hyperparameters, and resolving a referenced optimizer spec (nlc.check runs them)."""
from __future__ import annotations

import math
import struct
from contextvars import ContextVar
from pathlib import Path

from nlc import spec as S
from nlc import vocab as V
from nlc.diagnostics import Collector, Span, did_you_mean
from nlc.expr import ExprNode, ListE, Name, const_value

# ---------------------------------------------------------------- optimizer hyperparameters

# name (or name prefix `beta`) -> (low, high, low allowed, why)
HYPER_RANGES = {
    "lr": (0.0, None, False, "a learning rate is positive"),
    "eps": (0.0, None, True, "eps is >= 0"),
    "weight_decay": (0.0, None, True, "weight decay is >= 0"),
    "alpha": (0.0, None, True, "alpha (the slow memory's weight) is >= 0"),
    "momentum": (0.0, 1.0, True, "a momentum decay lies in [0, 1)"),
    "beta": (0.0, 1.0, True, "a decay rate lies in [0, 1)"),
}
INT_HYPERS = {"slow_every": "a period in steps is a positive integer",
              "ns_steps": "Newton-Schulz steps are a positive integer"}


def hyper_problem(name: str, value, default=None) -> str | None:
    """Why `value` is no valid value of the hyperparameter called `name`, or None: the one check of a
    hyperparameter's value, for the command line (`--set`), a model's `adamw(...)`, an optimizer
    spec's own `hyper:` and `compile_optimizer`'s keywords alike. Every number is finite; the value
    is shaped like `default`, the value it replaces (when there is one): a list of as many items, or
    one number; names with a range (`HYPER_RANGES`, `INT_HYPERS`) lie in it."""
    items = value if isinstance(value, (list, tuple)) else [value]
    bad = [v for v in items if isinstance(v, (int, float)) and not isinstance(v, bool) and not _finite(v)]
    if bad:
        return f"`{name}` must be finite, not {bad[0]}: a NaN or infinite hyperparameter makes the weights NaN"
    big = [v for v in items if isinstance(v, (int, float)) and not isinstance(v, bool) and not _finite32(v)]
    if big:
        return (f"`{name}` must be finite in float32, not {big[0]:g}, which is infinite there (the largest "
                f"float32 is about 3.4e38): a NaN or infinite hyperparameter makes the weights NaN")
    if isinstance(default, (list, tuple)) and (not isinstance(value, (list, tuple)) or len(value) != len(default)):
        return (f"`{name}` is a list of {len(default)} number{'s' * (len(default) != 1)}, like its default "
                f"`{list(default)}`; " + (f"{len(value)} given" if isinstance(value, (list, tuple)) else "not a list"))
    if default is not None and not isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
        return f"`{name}` is one number, like its default `{default}`, not a list"
    if name in INT_HYPERS:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            return INT_HYPERS[name]
        return None
    key = "beta" if name.startswith("beta") else name
    if key not in HYPER_RANGES:
        return None
    lo, hi, lo_ok, why = HYPER_RANGES[key]
    for v in items:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return why
        if v < lo or (v == lo and not lo_ok) or (hi is not None and v >= hi):
            return why
    return None


def _finite32(v: int | float) -> bool:
    """Whether `v` stays finite as a float32 (the weights' type): 1e39 does not."""
    try:
        struct.pack("<f", float(v))   # rounds to the nearest float32; raises when that is infinite
    except (OverflowError, struct.error):
        return False
    return True


def _finite(v: int | float) -> bool:
    try:
        return math.isfinite(v)
    except OverflowError:     # an integer too large for a float
        return False


def override_value(e: ExprNode, default):
    """The value of a constant hyperparameter override (`lr=4e-4`, `betas=[0.9, 0.95]`), shaped like
    its default (an integer stays an integer); None when it is not a constant."""
    if isinstance(e, ListE):
        items = [const_value(x) for x in e.items]
        return None if None in items else items
    if isinstance(e, Name) and e.id in ("true", "false"):
        return e.id == "true"
    v = const_value(e)
    if v is not None and isinstance(default, int) and not isinstance(default, bool) and v == int(v):
        return int(v)
    if v is not None and isinstance(default, bool) and v in (0, 1):
        return bool(v)
    return v


def check_hyper(spec: S.OptimizerSpec, smap, overrides: dict | None, errors: Collector, at: tuple = ()) -> None:
    """Hyperparameters (the spec's defaults, then overrides) must lie in their valid ranges.

    An override's error points at the hyperparameter's declaration and says where the value came from.
    `at`: where the spec sits in its file (`("optimizer",)` for a model's inline optimizer).
    """
    get = (lambda *p: smap.get(*at, *p)) if smap else (lambda *p: None)
    for name, value in spec.hyper.items():
        why = hyper_problem(name, value)
        if why:
            errors.error("E502", f"hyperparameter `{name}` = {value!r} is out of range", get("hyper", name), why)
    for name, value in (overrides or {}).items():
        if name not in spec.hyper:
            errors.error("E208", f"override `{name}` names no hyperparameter of `{spec.name}`",
                         get("hyper"), did_you_mean(name, spec.hyper))
            continue
        why = hyper_problem(name, value, spec.hyper[name])
        if why:
            errors.error("E502", f"override `{name}={value!r}` is out of range", get("hyper", name), why)


# The files being checked, outermost first: an optimizer reference back into one of them is a
# cycle (checking it again would never end). A context variable, not a shared list: `check`
# sets it for the extent of one check, so threads and nested checks each see their own chain.
CHECKING: ContextVar[tuple[Path, ...]] = ContextVar("nlc_checking", default=())


class _Base:
    derived = False   # typing terms the rule derivation built (FlowTypes), where `+` broadcasts a scalar

    def __init__(self, spec, smap, errors: Collector, base_dir: Path, prefix: tuple = ()):
        self.spec, self.smap, self.errors, self.base_dir = spec, smap, errors, base_dir
        self.prefix = prefix      # where the spec sits in its file: ("optimizer",) for an inline optimizer

    def at(self, *path, node: ExprNode | None = None, key: bool = False) -> Span:
        if node is not None and node.span is not None:
            return node.span
        if self.smap is None:
            return Span("<flow>", 1, 1)
        path = self.prefix + path
        return self.smap.get(*path, key=key) or self.smap.find(path, key=key)

    def err(self, code, msg, span, hint=None):
        self.errors.error(code, msg, span, hint)

    def check_chain(self, chain, path, model: bool, arg_type=None):
        """Primitive names and arities; constants that make the rule diverge."""
        for i, step in enumerate(chain):
            where = self.at(*path, i, node=step)
            prim = V.RULES.get(step.fn)
            if prim is None:
                self.err("E203", f"unknown rule primitive `{step.fn}`", where, did_you_mean(step.fn, V.RULES))
                continue
            if model and step.fn in V.OPTIMIZER_ONLY_RULES:
                self.err("E203", f"`{step.fn}` is an optimizer primitive; model levels cannot use it", where,
                         "move it into an optimizer spec's level")
                continue
            if not model and step.fn in V.MODEL_ONLY_RULES:
                self.err("E203", f"`{step.fn}` needs a model level's objective; optimizer levels cannot use it", where)
                continue
            n = len(step.args) + len(step.kwargs)
            unknown_kw = [k for k in step.kwargs if k not in [p.rstrip("?") for p in prim.params]]
            if unknown_kw or not prim.min_args <= n <= prim.max_args:
                self.err("E302", f"`{step.fn}` takes {_arity(prim)}, got `{step}`", where, f"write `{prim.signature()}`")
                continue
            bound = dict(zip([p.rstrip("?") for p in prim.params], step.args)) | dict(step.kwargs)
            for pname, e in bound.items():
                if arg_type is not None:
                    arg_type(e, step, pname)
                self._diverges(step.fn, pname, e, where)

    def _diverges(self, fn, pname, e, where):
        c = const_value(e)
        if c is None:
            return
        bad = {("retain", "alpha"): (not 0 <= c <= 1, "a retention outside [0, 1] grows the memory without bound"),
               ("momentum", "beta"): (not 0 <= c < 1, "a momentum decay outside [0, 1) never forgets"),
               ("ema", "beta"): (not 0 <= c < 1, "an EMA decay lies in [0, 1)"),
               ("scale", "c"): (c < 0, "a negative step size climbs the objective"),
               ("dgd", "lr"): (not 0 <= c <= 2, "with unit keys the erase (I - lr k k^T) expands unless 0 <= lr <= 2"),
               ("delta_momentum", "alpha"): (not 0 <= c <= 1, "a retention outside [0, 1] grows without bound")}
        bad_now, why = bad.get((fn, pname), (False, ""))
        if bad_now:
            self.err("E501", f"`{fn}` with {pname} = {c:g} diverges", where, why)

    def resolve_optimizer(self, ref: S.OptimizerRef, path, constant: bool = False) -> S.OptimizerSpec | None:
        """The optimizer spec `ref` names, its overrides checked: names always; with `constant` (a
        model's optimizer, where no hyperparameters are in scope) values and ranges too."""
        from nlc.loader import find_spec, load_located
        from nlc.diagnostics import SpecError
        found = find_spec(ref.use, self.base_dir)
        where = self.at(*path)
        if found is None:
            from nlc.loader import shipped_names
            self.err("E207", f"optimizer spec `{ref.use}` not found", where,
                     did_you_mean(ref.use, shipped_names("optimizer")) or "give a shipped name or a path")
            return None
        chain = CHECKING.get()
        if found.resolve() in chain:
            itself = found.resolve() == chain[-1]
            self.err("E401", f"`{ref.use}` names {'this file itself' if itself else f'{found}, which uses this file'}: "
                     "optimizer specs that use each other never end", where,
                     f"a file named `{found.name}` beside the spec hides the shipped `{ref.use}`; rename one"
                     if itself else "break the cycle")
            return None
        try:
            opt = load_located(found).spec
        except SpecError:
            self.err("E207", f"optimizer spec `{ref.use}` ({found}) has errors", where, f"run `nlc check {found}`")
            return None
        if not isinstance(opt, S.OptimizerSpec):
            self.err("E207", f"`{ref.use}` is a model spec, not an optimizer spec", where)
            return None
        for name, e in ref.hyper.items():
            where = self.at(*path, node=e)
            if name not in opt.hyper:
                self.err("E208", f"`{opt.name}` has no hyperparameter `{name}`", where, did_you_mean(name, opt.hyper))
            elif constant:
                value = override_value(e, opt.hyper[name])
                why = "a number (or a list of numbers)" if value is None else hyper_problem(name, value, opt.hyper[name])
                if why:
                    self.err("E502", f"override `{name}={_shown(e, value)}` is out of range" if value is not None
                             else f"override `{name}={e}` is not a constant", where, why)
        return opt


def _shown(e: ExprNode, value) -> str:
    """How an override is shown: as written, or its value where its text cannot be (`1e999`)."""
    try:
        return str(e)
    except (OverflowError, ValueError):
        return repr(value)


def _arity(fn: V.Fn) -> str:
    if fn.min_args == fn.max_args:
        return "no arguments" if fn.max_args == 0 else f"{fn.max_args} argument{'s' * (fn.max_args > 1)}"
    return f"{fn.min_args} to {fn.max_args} arguments"

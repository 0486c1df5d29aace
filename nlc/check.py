"""Semantic checks: everything a spec can get wrong after it parses and validates.

Names (undefined, misspelt, clashing), types and shapes of flows (`vec` per head vs `head`
scalars), objectives a memory cannot take, ill-formed rule chains, cycles with no delayed edge,
clock mismatches, chunk sizes that cannot be scheduled, rules that diverge for certain, and
optimizer hyperparameters out of range. All errors of a file are collected, none raised early.
"""
from __future__ import annotations

from pathlib import Path

from nlc import spec as S
from nlc import vocab as V
from nlc.diagnostics import Collector, Span, did_you_mean
from nlc.expr import Bin, Call, ExprNode, Index, ListE, Name, Neg, Num, const_value

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


def hyper_problem(name: str, value) -> str | None:
    """Why `value` is out of range for a hyperparameter called `name`, or None."""
    if name in INT_HYPERS:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            return INT_HYPERS[name]
        return None
    key = "beta" if name.startswith("beta") else name
    if key not in HYPER_RANGES:
        return None
    lo, hi, lo_ok, why = HYPER_RANGES[key]
    for v in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return why
        if v < lo or (v == lo and not lo_ok) or (hi is not None and v >= hi):
            return why
    return None


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
        why = hyper_problem(name, value)
        if why:
            errors.error("E502", f"override `{name}={value!r}` is out of range", get("hyper", name), why)


# ---------------------------------------------------------------- the checker

_CHECKING: list[Path] = []     # the files being checked, outermost first: an optimizer reference back
                               # into one of them is a cycle (checking it again would never end)


def check(loaded, errors: Collector) -> None:
    spec = loaded.spec
    _CHECKING.append(Path(loaded.file).resolve())
    try:
        if isinstance(spec, S.ModelSpec):
            _ModelChecker(spec, loaded.smap, errors, Path(loaded.file).parent).run()
        elif isinstance(spec, S.OptimizerSpec):
            _OptimizerChecker(spec, loaded.smap, errors, Path(loaded.file).parent).run()
    finally:
        _CHECKING.pop()


class _Base:
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
        if found.resolve() in _CHECKING:
            itself = found.resolve() == _CHECKING[-1]
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
                why = "a number (or a list of numbers)" if value is None else hyper_problem(name, value)
                if why:
                    self.err("E502", f"override `{name}={e}` is out of range" if value is not None
                             else f"override `{name}={e}` is not a constant", where, why)
        return opt


def _arity(fn: V.Fn) -> str:
    if fn.min_args == fn.max_args:
        return "no arguments" if fn.max_args == 0 else f"{fn.max_args} argument{'s' * (fn.max_args > 1)}"
    return f"{fn.min_args} to {fn.max_args} arguments"


class _ModelChecker(_Base):
    spec: S.ModelSpec

    def run(self):
        spec = self.spec
        self.sig_types: dict[str, str | None] = {}
        self.visiting: list[str] = []
        if spec.model.d_model % spec.model.heads:
            self.err("E301", f"d_model {spec.model.d_model} is not divisible by heads {spec.model.heads}",
                     self.at("model", "heads"), "head_dim = d_model / heads must be a whole number")
        for name in spec.signals:
            if name in V.RESERVED or name in spec.levels:
                what = "a level" if name in spec.levels else "a built-in name"
                self.err("E206", f"signal `{name}` has the name of {what}", self.at("signals", name, key=True),
                         "rename the signal")
        for name in spec.levels:
            if name in V.RESERVED:
                self.err("E206", f"level `{name}` has the name of a built-in", self.at("levels", name, key=True))
        for i, name in enumerate(spec.model.block):
            if name not in spec.levels:
                self.err("E204", f"block names level `{name}`, which is not defined",
                         self.at("model", "block", i), did_you_mean(name, spec.levels))
            elif spec.levels[name].out == "scalar":
                self.err("E301", f"block level `{name}` outputs one scalar per head; a block needs a vector",
                         self.at("model", "block", i), "block levels have `out: vector`")
        for name in spec.signals:
            self.signal_type(name)
        for name, level in spec.levels.items():
            self.check_level(name, level)
        if isinstance(spec.optimizer, S.OptimizerSpec):  # written inline: checked as a file would be
            _OptimizerChecker(spec.optimizer, self.smap, self.errors, self.base_dir, prefix=("optimizer",)).run()
        elif spec.optimizer is not None:
            self.resolve_optimizer(spec.optimizer, ("optimizer",), constant=True)
        self.check_schedule()

    # -- types of flows
    def signal_type(self, name: str) -> str | None:
        if name in self.sig_types:
            return self.sig_types[name]
        if name in self.visiting:
            cycle = self.visiting[self.visiting.index(name):] + [name]
            self.err("E401", "signals depend on each other in a cycle: " + " -> ".join(cycle),
                     self.at("signals", name, key=True),
                     "a flow can read a memory's previous state (`M_k(x)`), not a signal computed from itself")
            self.sig_types[name] = None
            return None
        self.visiting.append(name)
        t = self.type_of(self.spec.signals[name], ("signals", name), level=None)
        self.visiting.pop()
        self.sig_types[name] = t
        return t

    def type_of(self, e: ExprNode, path, level: tuple[str, S.Level] | None) -> str | None:
        """`vec`, `head` or `const`; None after an error (already reported)."""
        if isinstance(e, Num):
            return "const"
        if isinstance(e, Name):
            if e.id in V.SIGNAL_NAMES:
                return "vec"
            if level is not None and e.id in V.LEVEL_NAMES:
                field = getattr(level[1], e.id)
                if field is None:
                    self.err("E201", f"level `{level[0]}` has no `{e.id}` flow", self.at(*path, node=e))
                    return None
                return self.type_of(field, ("levels", level[0], e.id), level)
            if e.id in self.spec.signals:
                return self.signal_type(e.id)
            scope = set(self.spec.signals) | set(V.SIGNAL_NAMES) | (set(V.LEVEL_NAMES) if level else set())
            if e.id in self.spec.levels:
                self.err("E301", f"`{e.id}` is a level; read it by applying it, e.g. `{e.id}(x)`", self.at(*path, node=e))
            else:
                self.err("E201", f"`{e.id}` is not defined", self.at(*path, node=e), did_you_mean(e.id, scope))
            return None
        if isinstance(e, Neg):
            return self.type_of(e.arg, path, level)
        if isinstance(e, Bin):
            a, b = self.type_of(e.left, path, level), self.type_of(e.right, path, level)
            if a is None or b is None:
                return None
            if e.op == "^" and b != "const":
                self.err("E301", "an exponent must be a constant", self.at(*path, node=e.right))
                return None
            if e.op in "+-" and "const" not in (a, b) and a != b:
                self.err("E301", f"`{e.op}` of a {_tname(a)} and a {_tname(b)}", self.at(*path, node=e),
                         "both sides need the same shape; a per-head scalar can scale a vector with `*`")
                return None
            return a if b == "const" else b if a == "const" else ("vec" if "vec" in (a, b) else a)
        if isinstance(e, Call):
            return self.call_type(e, path, level)
        self.err("E301", f"`{e}` is not a flow (lists and indexing belong in optimizer specs)", self.at(*path, node=e))
        return None

    def call_type(self, e: Call, path, level) -> str | None:
        where = self.at(*path, node=e)
        if e.fn == "M" or e.fn in self.spec.levels:
            if e.fn == "M" and level is None:
                self.err("E304", "`M` is a level's own memory; it is only defined inside a level", where,
                         "apply a named level instead, e.g. `M_k(x)`")
                return None
            target = level[1] if e.fn == "M" else self.spec.levels[e.fn]
            if e.kwargs or len(e.args) != 1:
                self.err("E302", f"a memory is applied to one flow: `{e.fn}(x)`", where)
                return None
            t = self.type_of(e.args[0], path, level)
            if t not in (None, "vec"):
                self.err("E301", f"memory `{e.fn}` reads a vector per head, got a {_tname(t)}", self.at(*path, node=e.args[0]))
            elif e.fn != "M" and self.spec.model.heads > 1 and self.head_slice(e.args[0]):
                self.err("E301", f"generator `{e.fn}` would read one head's slice of `x`: a head's flows would never "
                         "see the other heads' channels", self.at(*path, node=e.args[0]),
                         f"mix the channels first, `{e.fn}(proj(x))`, or set `heads: 1` so that it reads all of x (Eq. 94)")
            if isinstance(target.memory, S.AttentionMemory) or (target.every and target.every.period is None) \
                    or target.key is None and e.fn != "M":
                self.err("E301", f"level `{e.fn}` is not a memory that can generate a flow", where,
                         "generators are in-context memories (with a `key`), e.g. an `mlp` memory every 1 token")
                return None
            return "head" if target.out == "scalar" else "vec"
        fn = V.SIGNAL_FUNCTIONS.get(e.fn)
        if fn is None:
            if did_you_mean(e.fn, self.spec.levels) and did_you_mean(e.fn, self.spec.levels).startswith("did"):
                self.err("E204", f"flow reads level `{e.fn}`, which is not defined", where, did_you_mean(e.fn, self.spec.levels))
            else:
                self.err("E202", f"unknown function `{e.fn}`", where,
                         did_you_mean(e.fn, set(V.SIGNAL_FUNCTIONS) | set(self.spec.levels)))
            return None
        if e.kwargs or not fn.min_args <= len(e.args) <= fn.max_args:
            self.err("E302", f"`{e.fn}` takes {_arity(fn)}", where, f"write `{fn.signature()}`")
            return None
        types = [self.type_of(a, path, level) for a in e.args]
        if e.fn == "conv":
            w = const_value(e.args[1])
            if w is None or w != int(w) or w < 1:
                self.err("E302", "a convolution's width is a positive whole number", self.at(*path, node=e.args[1]))
                return None
        if None in types:
            return None
        if fn.takes and types[0] not in fn.takes:
            self.err("E301", f"`{e.fn}` takes a {' or '.join(map(_tname, fn.takes))}, got a {_tname(types[0])}",
                     self.at(*path, node=e.args[0]))
            return None
        return types[0] if fn.returns == "same" else fn.returns

    def head_slice(self, e: ExprNode, seen: frozenset = frozenset()) -> bool:
        """Whether `e` reads the block input `x` per head without mixing its channels first (through
        `proj` or a generator)."""
        if isinstance(e, Name):
            if e.id == "x":
                return True
            if e.id in self.spec.signals and e.id not in seen:
                return self.head_slice(self.spec.signals[e.id], seen | {e.id})
            return False
        if isinstance(e, Call):
            return e.fn != "proj" and e.fn not in self.spec.levels and any(self.head_slice(a, seen) for a in e.args)
        return any(self.head_slice(c, seen) for c in e.children())

    def expect(self, e, path, level, want: set[str], what: str):
        t = self.type_of(e, path, level)
        if t is not None and t not in want:
            self.err("E301", f"{what} must be a {' or '.join(map(_tname, sorted(want)))}, got a {_tname(t)}",
                     self.at(*path, node=e))
        return t

    # -- levels
    def check_level(self, name: str, lv: S.Level):
        p = ("levels", name)
        here = (name, lv)
        mem = lv.memory
        static = lv.every is not None and lv.every.period is None
        if isinstance(mem, S.AttentionMemory):
            for f in ("key", "value", "query"):
                if getattr(lv, f) is None:
                    self.err("E101", f"attention level `{name}` needs a `{f}`", self.at(*p, key=True))
            if lv.objective is not None or lv.rule:
                self.err("E303", f"attention level `{name}` is non-parametric: it takes no objective or rule",
                         self.at(*p, "objective" if lv.objective is not None else "rule"),
                         "attention is the closed-form solution of a weighted L2 objective; remove these keys")
            if lv.every is not None or lv.chunk is not None:
                self.err("E305", f"attention level `{name}` keeps its whole context: it takes no `every` or `chunk`",
                         self.at(*p, "every" if lv.every is not None else "chunk"))
        if isinstance(mem, S.MLPMemory) and mem.residual and lv.out == "scalar":
            self.err("E305", f"level `{name}`: a residual memory returns its input's shape, but `out` is scalar",
                     self.at(*p, "out"), "set `residual: false` in its memory")
        if isinstance(mem, S.MLPMemory) and mem.residual and mem.depth < 2:
            self.err("E305", f"level `{name}`: a residual memory of depth 1 is the identity plus a matrix",
                     self.at(*p, "memory"), "use `depth: 2` or `kind: matrix`")
        for f in ("key", "value", "query"):
            e = getattr(lv, f)
            if e is not None:
                self.expect(e, p + (f,), here, {"vec"}, f"a {f}")
        if lv.gate is not None:
            if lv.query is None:
                self.err("E305", f"level `{name}` has no `query`, so no output to gate", self.at(*p, "gate"),
                         "an output gate belongs to a level of the block that is read with a `query`")
            else:
                self.expect(lv.gate, p + ("gate",), here, {"vec", "head"}, "an output gate")
        if lv.read is not None and not isinstance(mem, S.MLPMemory):
            self.err("E305", f"level `{name}`: `read` chooses what an MLP memory's tokens read inside a chunk",
                     self.at(*p, "read"), f"a {mem.kind} memory reads the state after the token's own write; remove `read`")
        if lv.read == "current" and lv.chunk_size() > 1 and name in S.reads(
                self.spec, [x for other in self.spec.levels.values() for x in other.flows()] + list(self.spec.signals.values()))[0]:
            self.err("E403", f"generator `{name}` with `read: current`: the flows it generates feed its own update "
                     "inside the chunk, so the chunk cannot run in parallel", self.at(*p, "read"),
                     "use `read: anchor` (the chunk's start state), or `chunk: 1`")
        if static:
            for f in ("key", "value", "objective", "chunk"):
                if getattr(lv, f) is not None:
                    self.err("E305", f"static level `{name}` (`every: never`) takes no `{f}`", self.at(*p, f))
            if lv.rule:
                self.err("E305", f"static level `{name}` (`every: never`) takes no rule", self.at(*p, "rule"))
            return
        if isinstance(mem, S.AttentionMemory):
            return
        loss = lv.objective.loss if lv.objective else ("l2" if lv.key is not None else None)
        if loss is None:
            self.err("E101", f"level `{name}` updates but has no `key` and no objective", self.at(*p, key=True),
                     "give a `key` and `value` (an in-context memory), `objective: task` (a CMS level), or `every: never`")
            return
        if loss not in V.OBJECTIVES[mem.kind]:
            self.err("E303", f"a {mem.kind} memory cannot take the `{loss}` objective", self.at(*p, "objective"),
                     did_you_mean(loss, V.OBJECTIVES[mem.kind]) or "")
        if loss == "task":
            if lv.key is not None or lv.value is not None:
                self.err("E305", f"level `{name}` learns from the task loss; it takes no `key` or `value`",
                         self.at(*p, "key" if lv.key is not None else "value"))
        else:
            if lv.key is None:
                self.err("E101", f"level `{name}` needs a `key` for its `{loss}` objective", self.at(*p, key=True))
            pred = lv.objective.pred if lv.objective and lv.objective.pred is not None else None
            target = lv.objective.target if lv.objective and lv.objective.target is not None else None
            if target is None and lv.value is None:
                self.err("E101", f"level `{name}` needs a `value` (the target of its objective)", self.at(*p, key=True))
            out = "head" if lv.out == "scalar" else "vec"
            tp = self.type_of(pred, p + ("objective",), here) if pred is not None else out
            tt = self.type_of(target, p + ("objective",), here) if target is not None else (
                self.type_of(lv.value, p + ("value",), here) if lv.value is not None else None)
            if tp is not None and tt is not None and tp != tt:
                self.err("E301", f"level `{name}`: the objective compares a {_tname(tp)} with a {_tname(tt)}",
                         self.at(*p, "objective") if lv.objective else self.at(*p, "value"),
                         "a scalar-output memory needs a scalar target, e.g. `l2(M(k), M(v))`")
        if lv.every is not None and lv.every.unit == "steps" and loss != "task":
            self.err("E402", f"in-context level `{name}` ticks on the optimizer's clock (`steps`)",
                     self.at(*p, "every"), "in-context memories update every N `tokens`; only a task-loss level may tick in steps")
        if lv.every is not None and lv.every.period is not None:
            for i, per in enumerate(lv.every.period):
                if isinstance(per, str):
                    self.err("E201", f"`{per}` is not a period: a model spec has no hyperparameters",
                             self.at(*p, "every"), "write a number of tokens")
        if lv.chunk is not None and lv.every is not None and lv.every.period and len(lv.every.period) > 1:
            self.err("E403", f"CMS level `{name}`: each level's chunk is its period; drop `chunk`", self.at(*p, "chunk"))
        if lv.rule:
            grads = [i for i, r in enumerate(lv.rule) if r.fn == "grad"]
            if len(grads) != 1:
                self.err("E306", f"level `{name}`: a rule chain takes the gradient exactly once, found {len(grads)} `grad`",
                         self.at(*p, "rule"), "start the chain with `grad`, e.g. `grad |> scale(eta)`")

            def arg_type(e, step, pname):
                want = {"key": {"vec"}}.get(pname, {"head", "const"})
                self.expect(e, p + ("rule",), here, want, f"`{step.fn}`'s {pname}")
            self.check_chain(lv.rule, p + ("rule",), model=True, arg_type=arg_type)

    # -- schedule
    def check_schedule(self):
        """CMS periods nest; in-block chunks divide the fastest CMS period; generators' chunks nest."""
        spec = self.spec
        periods: dict[str, list[int]] = {}
        for name, lv in spec.levels.items():
            if lv.every and lv.every.period and all(isinstance(x, int) for x in lv.every.period):
                periods[name] = list(lv.every.period)
                ps = sorted(lv.every.period)
                for a, b in zip(ps, ps[1:]):
                    if b % a:
                        self.err("E403", f"level `{name}`: period {b} is not a multiple of period {a}",
                                 self.at("levels", name, "every"),
                                 "a slower level must fire at the end of a faster one's chunk: use multiples, e.g. 64, 512, 4096")
        cms = [n for n in spec.model.block if n in spec.levels and spec.levels[n].objective is not None
               and spec.levels[n].objective.loss == "task" and n in periods]
        window = min((min(periods[n]) for n in cms), default=None)
        if window is None:
            return
        for name, lv in spec.levels.items():
            # a chunk matters where gradients are taken at its anchor: deep memories and momentum
            anchored = lv.key is not None and (isinstance(lv.memory, S.MLPMemory)
                                               or any(r.fn in ("momentum", "ema") for r in lv.rule))
            chunk = lv.chunk_size() if anchored else lv.chunk
            if chunk is not None and window % chunk:
                self.err("E403", f"level `{name}`'s chunk {chunk}{'' if lv.chunk else ' (the default)'} does not "
                         f"divide the fastest CMS period {window}",
                         self.at("levels", name, "chunk") if lv.chunk else self.at("levels", name, key=True),
                         "the model is run in windows of the fastest CMS period; every chunk must divide it")


def _tname(t: str) -> str:
    return {"vec": "vector per head", "head": "scalar per head", "const": "constant"}.get(t, t)


class _OptimizerChecker(_Base):
    spec: S.OptimizerSpec

    def run(self):
        spec = self.spec
        check_hyper(spec, self.smap, None, self.errors, at=self.prefix)
        for name in spec.hyper:
            if name in V.OPT_NAMES or name in V.OPT_FUNCTIONS:
                self.err("E206", f"hyperparameter `{name}` has the name of a built-in", self.at("hyper", name, key=True))
        for gi, g in enumerate(spec.groups):
            p = ("groups", gi)
            if (g.update is None) == (g.use is None):
                self.err("E103", "a parameter group gives either an `update` or a `use`, exactly one",
                         self.at(*p), "write `update: <expression>` or `use: adamw(lr=lr)`")
            if g.use is not None:
                if g.levels:
                    self.err("E103", "a group that delegates with `use` has no levels of its own", self.at(*p, "levels"))
                for k, e in g.use.hyper.items():
                    self.expr(e, p + ("use",), set(), values_only=True)
                self.resolve_optimizer(g.use, p + ("use",))
            for name, lv in g.levels.items():
                lp = p + ("levels", name)
                if name in V.OPT_NAMES or name in spec.hyper:
                    self.err("E206", f"level `{name}` has the name of a {'built-in' if name in V.OPT_NAMES else 'hyperparameter'}",
                             self.at(*lp, key=True))
                self.expr(lv.input, lp + ("input",), set())
                self.check_chain(lv.rule, lp + ("rule",), model=False,
                                 arg_type=lambda e, step, pname, lp=lp: self.expr(e, lp + ("rule",), set(), values_only=True))
                if lv.every is not None:
                    if lv.every.unit != "steps":
                        self.err("E402", f"optimizer level `{name}` ticks in `tokens`; optimizers run on the step clock",
                                 self.at(*lp, "every"), f"write `every: {lv.every.period[0] if lv.every.period else 1} steps`")
                    for per in lv.every.period or ():
                        if isinstance(per, str):
                            if per not in spec.hyper:
                                self.err("E208", f"period `{per}` names no hyperparameter", self.at(*lp, "every"),
                                         did_you_mean(per, spec.hyper))
                            elif hyper_problem("slow_every", spec.hyper[per]):
                                self.err("E502", f"period `{per}` = {spec.hyper[per]!r} is not a positive integer",
                                         self.at("hyper", per))
                    if lv.every.period is None:
                        self.err("E305", f"optimizer level `{name}` never updates", self.at(*lp, "every"))
            if g.update is not None:
                self.expr(g.update, p + ("update",), set(g.levels))

    def expr(self, e, path, levels: set[str], values_only: bool = False):
        """Names and calls of an optimizer expression. `values_only`: hyperparameters and numbers only."""
        scope = set(self.spec.hyper) | (set() if values_only else set(V.OPT_NAMES) | levels)
        for n in e.walk():
            if isinstance(n, Name) and n.id not in scope:
                hint = did_you_mean(n.id, scope)
                if values_only and n.id in V.OPT_NAMES:
                    hint = "only hyperparameters and numbers can be used here"
                self.err("E201", f"`{n.id}` is not defined here", self.at(*path, node=n), hint)
            elif isinstance(n, Call):
                fn = V.OPT_FUNCTIONS.get(n.fn)
                if fn is None:
                    self.err("E202", f"unknown function `{n.fn}`", self.at(*path, node=n), did_you_mean(n.fn, V.OPT_FUNCTIONS))
                elif n.kwargs or not fn.min_args <= len(n.args) <= fn.max_args:
                    self.err("E302", f"`{n.fn}` takes {_arity(fn)}", self.at(*path, node=n), f"write `{fn.signature()}`")
                elif n.fn == "prev" and not (isinstance(n.args[0], Name) and n.args[0].id in levels):
                    self.err("E204", f"`prev` reads a level of this group, not `{n.args[0]}`", self.at(*path, node=n),
                             did_you_mean(str(n.args[0]), levels))
            elif isinstance(n, Index) and not isinstance(n.index, Num):
                self.err("E302", "an index is a number, e.g. `betas[0]`", self.at(*path, node=n))
            elif isinstance(n, ListE):
                self.err("E301", "a list is not a value here", self.at(*path, node=n))


def flow_type(spec: S.ModelSpec, expr: ExprNode, level: str | None = None) -> str | None:
    """The shape type of a flow of a checked spec: `vec`, `head` or `const` (for code generators)."""
    checker = _ModelChecker(spec, None, Collector("<flow>"), Path("."))
    checker.sig_types, checker.visiting = {}, []
    lv = (level, spec.levels[level]) if level is not None else None
    return checker.type_of(expr, (), lv)

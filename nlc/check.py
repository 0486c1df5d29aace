"""Semantic checks: everything a spec can get wrong after it parses and validates.

Names (undefined, misspelt, clashing), types and shapes of flows (`vec` per head vs `head`
scalars), objectives a memory cannot take, ill-formed rule chains, cycles with no delayed edge,
clock mismatches, chunk sizes that cannot be scheduled, rules that diverge for certain, and
optimizer hyperparameters out of range. All errors of a file are collected, none raised early.
This module checks model specs; `check_common` holds what both checkers share and
`check_optimizer` the optimizer checker.
"""
from __future__ import annotations

import difflib
from pathlib import Path

from nlc import spec as S
from nlc import vocab as V
from nlc.diagnostics import Collector, did_you_mean
from nlc.expr import Bin, Call, ExprNode, Name, Neg, Num, const_value

from nlc.check_common import CHECKING, _arity, _Base
from nlc.check_optimizer import _OptimizerChecker


def check(loaded, errors: Collector) -> None:
    spec = loaded.spec
    token = CHECKING.set(CHECKING.get() + (Path(loaded.file).resolve(),))
    try:
        if isinstance(spec, S.ModelSpec):
            _ModelChecker(spec, loaded.smap, errors, Path(loaded.file).parent).run()
        elif isinstance(spec, S.OptimizerSpec):
            _OptimizerChecker(spec, loaded.smap, errors, Path(loaded.file).parent).run()
    finally:
        CHECKING.reset(token)


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
        for what, names in (("signal", spec.signals), ("level", spec.levels)):
            for name in names:
                if "__" in name:
                    self.err("E206", f"{what} `{name}`: names with `__` are reserved", self.at(f"{what}s", name, key=True),
                             "a level named twice in the block is instanced as `name__2`; rename it")
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
                return "head" if e.id == "head" else "vec"
            if e.id in V.OUTPUT_NAMES:
                if path and path[-1] == "output":
                    return "vec"
                self.err("E201", f"`{e.id}` is the level's read; it is defined only in a level's `output`",
                         self.at(*path, node=e))
                return None
            if level is not None and e.id in V.LEVEL_NAMES:
                field = getattr(level[1], e.id)
                if field is None:
                    self.err("E201", f"level `{level[0]}` has no `{e.id}` flow", self.at(*path, node=e))
                    return None
                return self.type_of(field, ("levels", level[0], e.id), level)
            if e.id in self.spec.signals:
                return self.signal_type(e.id)
            scope = (set(self.spec.signals) - set(self.visiting)) | set(V.SIGNAL_NAMES) | (set(V.LEVEL_NAMES) if level else set())
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
            if e.op == "^" and not (b == "const" or b == "head" and a in ("const", "head")):
                self.err("E301", "an exponent must be a constant (or a scalar per head, over a scalar)",
                         self.at(*path, node=e.right))
                return None
            if e.op in "+-" and "const" not in (a, b) and a != b and not self.derived:
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
            if difflib.get_close_matches(e.fn, list(self.spec.levels), n=1, cutoff=0.6):   # a misspelt level
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
        if e.fn == "param" and any(isinstance(n, Call) and n.fn not in V.ELEMENTWISE or isinstance(n, Name) and n.id != "head"
                                   for n in e.args[0].walk()):
            self.err("E302", "`param`'s initial value is a constant expression of numbers and `head`",
                     self.at(*path, node=e.args[0]), "e.g. `param(log(1 + head))`; a learned flow is `rate(x)`")
            return None
        if e.fn == "dot" and types[1] != "vec":
            self.err("E301", f"`dot` takes two vectors per head, got a {_tname(types[1])}", self.at(*path, node=e.args[1]))
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

    def expect(self, e, path, level, want: set[str], what: str, hint: str | None = None):
        t = self.type_of(e, path, level)
        if t is not None and t not in want:
            self.err("E301", f"{what} must be a {' or '.join(map(_tname, sorted(want)))}, got a {_tname(t)}",
                     self.at(*path, node=e), hint)
        return t

    # -- levels
    def check_level(self, name: str, lv: S.Level):
        """A level: its memory's options and outputs, then (if it updates) its objective, clock and rule."""
        self.check_outputs(name, lv)
        static = lv.every is not None and lv.every.period is None
        if static:
            for f in ("key", "value", "objective", "chunk"):
                if getattr(lv, f) is not None:
                    self.err("E305", f"static level `{name}` (`every: never`) takes no `{f}`", self.at("levels", name, f))
            if lv.rule:
                self.err("E305", f"static level `{name}` (`every: never`) takes no rule", self.at("levels", name, "rule"))
            return
        if isinstance(lv.memory, S.AttentionMemory):
            return
        loss = self.check_objective(name, lv)
        if loss is None:
            return
        self.check_clock(name, lv, loss)
        if lv.rule:
            self.check_rule(name, lv, loss)

    def check_outputs(self, name: str, lv: S.Level):
        """Options of the memory and of what the level reads and outputs."""
        p = ("levels", name)
        here = (name, lv)
        mem = lv.memory
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
        if lv.output is not None:
            if lv.query is None:
                self.err("E305", f"level `{name}` has no `query`, so no read `o` to transform", self.at(*p, "output"),
                         "`output` belongs to a level of the block that is read with a `query`")
            elif lv.gate is not None:
                self.err("E305", f"level `{name}` has both `gate` and `output`", self.at(*p, "gate"),
                         "write the gate into the output: `output: onorm(o) * GATE`")
            else:
                self.expect(lv.output, p + ("output",), here, {"vec"}, "an output")
        if lv.read is not None and not isinstance(mem, S.MLPMemory):
            self.err("E305", f"level `{name}`: `read` chooses what an MLP memory's tokens read inside a chunk",
                     self.at(*p, "read"), f"a {mem.kind} memory reads the state after the token's own write; remove `read`")
        if lv.read == "current" and lv.chunk_size() > 1 and name in S.reads(
                self.spec, [x for other in self.spec.levels.values() for x in other.flows()] + list(self.spec.signals.values()))[0]:
            self.err("E403", f"generator `{name}` with `read: current`: the flows it generates feed its own update "
                     "inside the chunk, so the chunk cannot run in parallel", self.at(*p, "read"),
                     "use `read: anchor` (the chunk's start state), or `chunk: 1`")

    def check_objective(self, name: str, lv: S.Level) -> str | None:
        """The objective the memory takes and the flows it compares; its loss (None after an error)."""
        p = ("levels", name)
        here = (name, lv)
        mem = lv.memory
        loss = lv.objective.loss if lv.objective else ("l2" if lv.key is not None else None)
        if loss is None:
            self.err("E101", f"level `{name}` updates but has no `key` and no objective", self.at(*p, key=True),
                     "give a `key` and `value` (an in-context memory), `objective: task` (a CMS level), or `every: never`")
            return None
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
        return loss

    def check_clock(self, name: str, lv: S.Level, loss: str):
        p = ("levels", name)
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

    def check_rule(self, name: str, lv: S.Level, loss: str):
        """The chain: one `grad`, known primitives, argument shapes, one rank-one erase, contraction."""
        p = ("levels", name)
        here = (name, lv)
        grads = [i for i, r in enumerate(lv.rule) if r.fn == "grad"]
        if len(grads) != 1:
            self.err("E306", f"level `{name}`: a rule chain takes the gradient exactly once, found {len(grads)} `grad`",
                     self.at(*p, "rule"), "add `grad` where the update is taken, e.g. `grad |> scale(eta)`"
                     if not grads else "keep one `grad`; several gradient steps per token are not in the language")

        def arg_type(e, step, pname):
            # retention and the erase rate may be per key channel (a diagonal decay, GLA / RWKV-7)
            want = {("dgd", "key"): {"vec"}, ("retain", "alpha"): {"vec", "head", "const"},
                    ("dgd", "lr"): {"vec", "head", "const"}}.get((step.fn, pname), {"head", "const"})
            self.expect(e, p + ("rule",), here, want, f"`{step.fn}`'s {pname}",
                        hint=None if "vec" in want else "only `retain` and `dgd`'s lr take a vector per key channel; "
                        "a per-channel step would write along a different vector than the key it reads")
        self.check_chain(lv.rule, p + ("rule",), model=True, arg_type=arg_type)
        self.check_erase(name, lv, loss)
        self.check_contraction(name, lv)

    def check_erase(self, name: str, lv: S.Level, loss: str):
        """A matrix rule is one rank-one step: an erase along `dgd(key=K)` and the L2 gradient's own
        erase along the key would make two."""
        dgd = [st for st in lv.rule if st.fn == "dgd"]
        if not dgd or not isinstance(lv.memory, S.MatrixMemory) or loss != "l2" \
                or any(st.fn in ("momentum", "ema") for st in lv.rule):
            return
        keys = {str(st.kwargs.get("key", st.args[0] if st.args else Name(id="key"))) for st in dgd}
        other = keys - {"key", str(lv.key)}
        if other:
            self.err("E305", f"level `{name}`: `dgd` erases along `{sorted(other)[0]}`, and the L2 objective's "
                     "gradient erases along the key: two rank-one erases per token", self.at("levels", name, "rule"),
                     "erase along the key (`dgd(key=key, ...)`), or write without the gradient's erase with "
                     "`objective: dot` (RWKV-7's form: M (diag(w) - K (lr K)^T) + v k^T)")

    def unit_norm(self, e: ExprNode | None, seen: frozenset = frozenset()) -> bool:
        """Whether a flow is L2-normalised (its outermost function is `l2norm`)."""
        if isinstance(e, Name) and e.id in self.spec.signals and e.id not in seen:
            return self.unit_norm(self.spec.signals[e.id], seen | {e.id})
        return isinstance(e, Call) and e.fn == "l2norm"

    def check_contraction(self, name: str, lv: S.Level):
        """With unit keys and constant a, b, the rule's eigenvalue along the key is a - b: warn when
        |a - b| > 1 (the memory grows along every key it sees)."""
        from nlc.rules import derive_level
        if not isinstance(lv.memory, S.MatrixMemory) or not self.unit_norm(lv.key):
            return
        d = derive_level(name, lv)
        if d.family != "generalized_delta" or d.b is None:
            return
        a, b = const_value(d.a), const_value(d.b)
        if a is not None and b is not None and abs(a - b) > 1:
            self.errors.warn("E501", f"level `{name}` expands along its keys: with unit keys the step multiplies "
                             f"the state along k by a - b = {a - b:g}", self.at("levels", name, "rule"),
                             "keep the step's erase b in [a - 1, a + 1], e.g. `scale(c)` with 0 < c <= 2")

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


class FlowTypes:
    """Shape types of the flows of a checked spec, for code generators: `vec`, `head` or `const`.
    One checker per spec, its signal types cached."""

    def __init__(self, spec: S.ModelSpec):
        self.spec = spec
        self._checker = _ModelChecker(spec, None, Collector("<flow>"), Path("."))
        self._checker.sig_types, self._checker.visiting = {}, []
        self._checker.derived = True   # derived terms may add a scalar per head to a vector: broadcast

    def __call__(self, expr: ExprNode | None, level: str | None = None) -> str | None:
        if expr is None:
            return None
        lv = (level, self.spec.levels[level]) if level is not None else None
        return self._checker.type_of(expr, (), lv)

"""Semantic checks: everything a spec can get wrong after it parses and validates.

Names (undefined, misspelt, clashing), types and shapes of flows (`vec` per head vs `head`
scalars), objectives a memory cannot take, ill-formed rule chains, cycles with no delayed edge,
clock mismatches, chunk sizes that cannot be scheduled, rules that diverge for certain, and
optimizer hyperparameters out of range. All errors of a file are collected, none raised early.
This module checks model specs: names, levels, clocks and the schedule; `check_flows` types their
flows (and holds `FlowTypes`, re-exported here), `check_common` holds what both checkers share and
`check_optimizer` the optimizer checker.
"""
from __future__ import annotations

from pathlib import Path

from nlc import spec as S
from nlc import vocab as V
from nlc.diagnostics import Collector, did_you_mean
from nlc.expr import Call, ExprNode, Name, const_value

from nlc.check_common import CHECKING
from nlc.check_flows import FlowTypes, _FlowChecker, _tname
from nlc.check_optimizer import _OptimizerChecker

__all__ = ["check", "FlowTypes"]


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


class _ModelChecker(_FlowChecker):
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

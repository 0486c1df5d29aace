"""Checks of an optimizer spec: hyperparameters, groups, levels on the step clock, update expressions."""
from __future__ import annotations

from nlc import spec as S
from nlc import vocab as V
from nlc.diagnostics import did_you_mean
from nlc.expr import Call, Index, ListE, Name, Num

from nlc.check_common import _arity, _Base, check_hyper, hyper_problem


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

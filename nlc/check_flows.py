"""Types of flows: the shape of every expression of a model spec, `vec` (a vector per head), `head`
(a scalar per head) or `const`, and the errors of flows that do not type (undefined names, shapes
that do not match, functions and memories applied to the wrong flow, signals in a cycle).

`_FlowChecker` is the model checker's base (nlc.check); `FlowTypes` serves the same typing to the
rule derivation and the code generators once a spec has checked.
"""
from __future__ import annotations

import difflib
from pathlib import Path

from nlc import spec as S
from nlc import vocab as V
from nlc.diagnostics import Collector, did_you_mean
from nlc.expr import Bin, Call, ExprNode, Name, Neg, Num, const_value

from nlc.check_common import _arity, _Base


class _FlowChecker(_Base):
    """Typing of a model spec's flows; `run` (in `_ModelChecker`) sets `sig_types` and `visiting`."""
    spec: S.ModelSpec

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


def _tname(t: str) -> str:
    return {"vec": "vector per head", "head": "scalar per head", "const": "constant"}.get(t, t)


class FlowTypes:
    """Shape types of the flows of a checked spec, for code generators: `vec`, `head` or `const`.
    One checker per spec, its signal types cached."""

    def __init__(self, spec: S.ModelSpec):
        self.spec = spec
        self._checker = _FlowChecker(spec, None, Collector("<flow>"), Path("."))
        self._checker.sig_types, self._checker.visiting = {}, []
        self._checker.derived = True   # derived terms may add a scalar per head to a vector: broadcast

    def __call__(self, expr: ExprNode | None, level: str | None = None) -> str | None:
        if expr is None:
            return None
        lv = (level, self.spec.levels[level]) if level is not None else None
        return self._checker.type_of(expr, (), lv)

"""Statements (nl_tree.py) -> the YAML loader's data shape, with a span for every key and value.

Duplicates are reported here (E008), as is a file with no `model` or `optimizer NAME { ... }` (E101).
"""
from __future__ import annotations

import difflib
from typing import Any

from lark import Token

from nlc.diagnostics import Collector, Span
from nlc.syntax.nl_tree import Clause, Head, Stmt, V
from nlc.syntax.source import Located, SourceMap
from nlc.vocab import OBJECTIVES

MEMORY_KINDS = tuple(OBJECTIVES)          # matrix, vector, mlp, attention


class Assembler:
    """Statements -> the YAML loader's data shape, recording spans and reporting duplicates."""

    def __init__(self, smap: SourceMap, errors: Collector):
        self.smap, self.errors = smap, errors
        self.raw: dict = {}
        self.first: dict[tuple, Span] = {}     # path -> span of its first definition
        self.memories: dict[tuple, V] = {}     # memory heads already read (report problems once)

    # spans
    def emit(self, path: tuple, v: V) -> Any:
        self.smap.values[path] = v.span
        if isinstance(v.data, dict):
            out = {}
            for k, (kspan, sub) in v.data.items():
                self.smap.keys[path + (k,)] = kspan
                out[k] = self.emit(path + (k,), sub)
            return out
        if isinstance(v.data, list):
            return [self.emit(path + (i,), sub) for i, sub in enumerate(v.data)]
        return v.data

    def put(self, d: dict, path: tuple, key: str, kspan: Span, v: V, what: str) -> bool:
        """Set d[key], or report E008 when `key` is already there."""
        if key in d:
            first = self.first.get(path + (key,))
            self.errors.error("E008", f"{what} is given twice", kspan,
                              f"the first is on line {first.line}" if first else None)
            return False
        self.first[path + (key,)] = kspan
        self.smap.keys[path + (key,)] = kspan
        d[key] = self.emit(path + (key,), v)
        return True

    def section(self, key: str, kw: Token, span: Span) -> dict:
        if key not in self.raw:
            self.raw[key] = {}
            self.smap.keys[(key,)] = _tok(self.smap.file, kw)
            self.smap.values[(key,)] = span
        return self.raw[key]

    # statements
    def run(self, stmts: list[Stmt]) -> dict:
        heads = [s for s in stmts if s.kind in ("model", "optimizer_spec")]
        if not heads:
            first = stmts[0]
            self.errors.error("E101", "the file has no `model NAME { ... }`", _tok(self.smap.file, first.kw),
                              "a model spec starts `model NAME { vocab 256  d_model 256  layers 4  heads 4  "
                              "block LEVEL, ... }`; an optimizer spec is `optimizer NAME { hyper ...  params ... }`")
            return None
        templates: dict[str, Stmt] = {}
        for s in stmts:
            if s.kind == "template":
                templates.setdefault(str(s.names[0]), s)
        file = self.smap.file
        for s in stmts:
            if s.kind in ("model", "optimizer_spec") and s is not heads[0]:
                self.errors.error("E008", f"a second `{s.kw} {s.names[0]}` in one file", _tok(file, s.kw),
                                  "a file holds one spec: one `model NAME { ... }` or one `optimizer NAME { ... }`")
                continue
            if heads[0].kind == "optimizer_spec" and s.kind != "optimizer_spec":
                self.errors.error("E006", f"`{s.kw}` belongs in a model spec, and this file is the optimizer "
                                  f"`{heads[0].names[0]}`", _tok(file, s.kw),
                                  "an optimizer spec holds `hyper` and `params` inside its `{ ... }`")
                continue
            getattr(self, "do_" + s.kind)(s, templates)
        return self.raw

    def _top(self, s: Stmt):
        kw = _tok(self.smap.file, s.kw)
        self.raw["nlc"] = 1
        self.smap.keys[("nlc",)] = self.smap.values[("nlc",)] = kw
        self.smap.keys[("name",)] = kw
        self.smap.values[("name",)] = _tok(self.smap.file, s.names[0])
        self.raw["name"] = Located(str(s.names[0]), self.smap.values[("name",)])

    def do_model(self, s: Stmt, templates):
        self._top(s)
        shape: dict = {}
        self.raw["model"] = shape
        self.smap.keys[("model",)] = _tok(self.smap.file, s.kw)
        self.smap.values[("model",)] = s.span
        for c in s.clauses:
            self.put(shape, ("model",), c.key, c.kspan, c.value, f"`{c.key}`")

    def do_signal(self, s: Stmt, templates):
        sec = self.section("signals", s.kw, s.span)
        name = str(s.names[0])
        self.put(sec, ("signals",), name, _tok(self.smap.file, s.names[0]), s.value, f"signal `{name}`")

    def _level_data(self, s: Stmt, templates, in_template: bool) -> V:
        data: dict = {}
        seen: dict[str, Span] = {}

        def add(key, kspan, v, what):
            if key in data:
                self.errors.error("E008", f"{what} is given twice", kspan, f"the first is on line {seen[key].line}")
                return
            seen[key] = kspan
            data[key] = (kspan, v)

        h = s.head
        if h is not None:
            name = str(h.name)
            nspan = _tok(self.smap.file, h.name)
            if not in_template and _is_template(name, templates, h.args is not None):
                add("use", nspan, V(Located(name, nspan), nspan), "a template")
                if h.args is not None:  # the template's memory with some options changed
                    base = templates.get(name)
                    mem = dict(self._memory(base.head).data) if base is not None and base.head else {}
                    mem.update(self._memory(h, kind=False).data)
                    add("memory", nspan, V(mem, h.span), "the memory")
            else:
                add("memory", nspan, self._memory(h), "the memory")
        for c in s.clauses:
            add(c.key, c.kspan, c.value, f"`{_SPELLING.get(c.key, c.key)}`")
        return V(data, s.span)

    def _memory(self, h: Head, kind: bool = True) -> V:
        """`mlp(depth=2, residual)` -> V({kind: mlp, depth: 2, residual: true})."""
        if (id(h), kind) in self.memories:
            return self.memories[(id(h), kind)]
        nspan = _tok(self.smap.file, h.name)
        mem: dict = {"kind": (nspan, V(Located(str(h.name), nspan), nspan))} if kind else {}
        for a in h.args or []:
            if a.key in mem:
                self.errors.error("E008", f"memory option `{a.key}` is given twice", a.kspan,
                                  f"the first is on line {mem[a.key][0].line}")
                continue
            mem[a.key] = (a.kspan, a.value)
        self.memories[(id(h), kind)] = V(mem, h.span)
        return self.memories[(id(h), kind)]

    def _named(self, s: Stmt, section: str, what: str, templates):
        sec = self.section(section, s.kw, s.span)
        v = self._level_data(s, templates, in_template=section == "templates")
        for n in s.names:
            self.put(sec, (section,), str(n), _tok(self.smap.file, n), v, f"{what} `{n}`")

    def do_level(self, s: Stmt, templates):
        self._named(s, "levels", "level", templates)

    def do_template(self, s: Stmt, templates):
        self._named(s, "templates", "template", templates)

    def _claim_optimizer(self, s: Stmt) -> bool:
        """Record the model's one `optimizer` statement; a second one is E008."""
        kw = _tok(self.smap.file, s.kw)
        if "optimizer" in self.raw:
            self.errors.error("E008", "the optimizer is given twice", kw,
                              f"the first is on line {self.smap.keys[('optimizer',)].line}")
            return False
        self.smap.keys[("optimizer",)] = kw
        return True

    def do_optimizer_ref(self, s: Stmt, templates):
        if self._claim_optimizer(s):
            self.raw["optimizer"] = self.emit(("optimizer",), s.value)

    def do_optimizer_spec(self, s: Stmt, templates):
        self._top(s)
        self._optimizer_body(s, self.raw, ())

    def do_optimizer_inline(self, s: Stmt, templates):
        """`optimizer { hyper ...  params ... }` in a model file: the YAML `optimizer: {hyper, groups}`."""
        if not self._claim_optimizer(s):
            return
        self.smap.values[("optimizer",)] = s.span
        self.raw["optimizer"] = {}
        self._optimizer_body(s, self.raw["optimizer"], ("optimizer",))

    def _optimizer_body(self, s: Stmt, root: dict, at: tuple):
        """`hyper` and `params` items into `root` (the file's top level, or a model's `optimizer`)."""
        file = self.smap.file
        groups: list = []
        root["groups"] = groups
        self.smap.keys[at + ("groups",)] = self.smap.values[at + ("groups",)] = s.span
        for it in s.items:
            if isinstance(it, Stmt):  # hyper
                if "hyper" not in root:
                    root["hyper"] = {}
                    self.smap.keys[at + ("hyper",)] = _tok(file, it.kw)
                    self.smap.values[at + ("hyper",)] = it.span
                for c in it.clauses:
                    self.put(root["hyper"], at + ("hyper",), c.key, c.kspan, c.value, f"hyperparameter `{c.key}`")
                continue
            if not groups:
                self.smap.keys[at + ("groups",)] = _tok(file, it.kw)
                self.smap.values[at + ("groups",)] = it.span
            gpath = at + ("groups", len(groups))
            g: dict = {}
            groups.append(g)
            self.smap.values[gpath] = it.span
            self.put(g, gpath, "params", _tok(file, it.kw), V(Located(str(it.params), _tok(file, it.params)),
                                                               _tok(file, it.params)), "`params`")
            for c in it.items:
                if isinstance(c, Clause):
                    self.put(g, gpath, c.key, c.kspan, c.value, f"`{c.key}`")
                    continue
                if "levels" not in g:
                    g["levels"] = {}
                    self.smap.keys[gpath + ("levels",)] = _tok(file, c.kw)
                    self.smap.values[gpath + ("levels",)] = c.span
                name = str(c.names[0])
                lv = {cl.key: (cl.kspan, cl.value) for cl in c.clauses}
                self.put(g["levels"], gpath + ("levels",), name, _tok(file, c.names[0]), V(lv, c.span),
                         f"level `{name}`")


_SPELLING = {"objective": "minimize", "rule": "by"}


def _is_template(name: str, templates: dict, has_args: bool) -> bool:
    """A name after `level NAME:` is a template, unless it is (or looks like) a memory kind."""
    if name in templates:
        return True
    if name in MEMORY_KINDS or has_args:
        return False
    near_kind = difflib.get_close_matches(name, MEMORY_KINDS, n=1, cutoff=0.6)
    near_template = difflib.get_close_matches(name, sorted(templates), n=1, cutoff=0.6)
    return not (near_kind and not near_template)


def _tok(file: str, t: Token) -> Span:
    return Span(file, t.line, t.column, t.end_line, t.end_column)


"""Reading `.nl` text: the grammar's parser, and the parse tree turned into statements.

The statements (`Stmt`, `Group`, holding `Clause`s and `V` values with their spans) are the
intermediate form that nl_assemble.py turns into the YAML loader's data shape.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import lark
from lark import Token, v_args

from nlc.diagnostics import Span
from nlc.syntax.expr import EXPR_GRAMMAR, ExprBuilder
from nlc.syntax.source import Located

GRAMMAR = Path(__file__).with_name("nl.lark").read_text() + "\n" + EXPR_GRAMMAR


@lru_cache(maxsize=1)
def parser() -> lark.Lark:
    return lark.Lark(GRAMMAR, start="start", parser="lalr", propagate_positions=True,
                     maybe_placeholders=True)


# ---------------------------------------------------------------- intermediate form

@dataclass
class V:
    """A value and its span. `data` is plain (or an expression node), a list of V, or a dict
    of key -> (key span, V)."""
    data: Any
    span: Span


@dataclass
class Clause:
    key: str
    kspan: Span
    value: V


@dataclass
class Head:
    name: Token
    args: list[Clause] | None      # None: a bare name (a template or a memory kind)
    span: Span


@dataclass
class Body:
    clauses: list[Clause]


@dataclass
class Stmt:
    kind: str                      # model, signal, level, template, optimizer_ref, optimizer_spec
    kw: Token
    names: list[Token]
    span: Span
    head: Head | None = None
    clauses: list[Clause] = field(default_factory=list)
    value: V | None = None
    items: list = field(default_factory=list)


@dataclass
class Group:
    kw: Token
    params: Token
    items: list                    # Clause (use/update) or Stmt (opt_level)
    span: Span


def _number(tok: Token) -> int | float:
    return int(tok) if re.fullmatch(r"\d{1,4000}", tok) else float(tok)


@v_args(meta=True)
class Builder(ExprBuilder):
    """Turns the parse tree into statements; expressions are built by the shared ExprBuilder."""

    def __init__(self, file: str):
        super().__init__(Span(file, 1, 1))
        self.file = file
        self.duplicates: list[tuple[str, Span, Span]] = []   # (what, span, first span): E008

    def tok(self, t: Token) -> Span:
        return self._tok_span(t)

    def meta(self, meta) -> Span:
        return self.span_of(meta)

    def start(self, meta, items):
        return items

    # plain values
    def lit_num(self, meta, items):
        return V(_number(items[0]), self.tok(items[0]))

    def lit_neg(self, meta, items):
        return V(-_number(items[0]), self.meta(meta))

    def lit_name(self, meta, items):
        t = items[0]
        if t in ("true", "false"):
            return V(t == "true", self.tok(t))
        return V(Located(str(t), self.tok(t)), self.tok(t))

    def lit_str(self, meta, items):
        t = items[0]
        s = self.tok(t)
        span = Span(s.file, s.line, s.col + 1, s.end_line, s.end_col - 1)
        return V(Located(str(t)[1:-1], span), span)

    def lit_list(self, meta, items):
        return V([i for i in items if i is not None], self.meta(meta))

    # model
    def shape_item(self, meta, items):
        key, values = items[0], items[1:]
        if str(key) == "block" or len(values) > 1:
            span = values[0].span if len(values) == 1 else join(values[0].span, values[-1].span)
            return Clause(str(key), self.tok(key), V(values, span))
        return Clause(str(key), self.tok(key), values[0])

    def model(self, meta, items):
        return Stmt("model", items[0], [items[1]], self.meta(meta), clauses=items[2:])

    def signal(self, meta, items):
        return Stmt("signal", items[0], [items[1]], self.meta(meta), value=V(items[2], items[2].span))

    # levels and templates
    def _level_like(self, kind, meta, items):
        kw, rest = items[0], items[1:]
        names = [t for t in rest if isinstance(t, Token) and t.type == "NAME"]
        stmt = Stmt(kind, kw, names, self.meta(meta))
        for it in rest:
            if isinstance(it, Head):
                stmt.head = it
            elif isinstance(it, Clause):
                stmt.clauses.append(it)
            elif isinstance(it, Body):
                stmt.clauses.extend(it.clauses)
        return stmt

    def level(self, meta, items):
        return self._level_like("level", meta, items)

    def template(self, meta, items):
        return self._level_like("template", meta, items)

    def head(self, meta, items):
        name = items[0]
        span = self.meta(meta)
        has_parens = meta.end_pos > name.end_pos
        args = [a for a in items[1:] if a is not None] if has_parens else None
        return Head(name, args, span)

    def mem_kwarg(self, meta, items):
        return Clause(str(items[0]), self.tok(items[0]), items[1])

    def mem_flag(self, meta, items):
        return Clause(str(items[0]), self.tok(items[0]), V(True, self.tok(items[0])))

    def body(self, meta, items):
        return Body(list(items))

    # clauses
    def every(self, meta, items):
        kw = items[0]
        if len(items) == 2:  # never
            s = self.tok(items[1])
            data = {"period": (s, V(None, s)), "unit": (s, V("tokens", s))}
        else:
            period, unit = items[1], items[2]
            u = str(unit) if str(unit).endswith("s") else str(unit) + "s"
            data = {"period": (period.span, period), "unit": (self.tok(unit), V(u, self.tok(unit)))}
            s = join(period.span, self.tok(unit))
        return Clause("every", self.tok(kw), V(data, s))

    def period(self, meta, items):
        vals, minus = [], None
        for t in items:
            if t is None:
                continue
            if t.type == "MINUS":
                minus = t
            elif minus is not None:
                vals.append(V(-_number(t), join(self.tok(minus), self.tok(t))))
                minus = None
            else:
                vals.append(V(_number(t) if t.type == "NUMBER" else Located(str(t), self.tok(t)), self.tok(t)))
        return V(vals, self.meta(meta))

    def chunk(self, meta, items):
        return Clause("chunk", self.tok(items[0]), items[1])

    def _word(self, field, items):
        """A clause whose value is one word: `init meta`, `read current`, `out scalar`."""
        return Clause(field, self.tok(items[0]), V(Located(str(items[1]), self.tok(items[1])), self.tok(items[1])))

    def init(self, meta, items):
        return self._word("init", items)

    def read(self, meta, items):
        return self._word("read", items)

    def out(self, meta, items):
        return self._word("out", items)

    def flow(self, meta, items):
        return Clause(str(items[0]), self.tok(items[0]), V(items[1], items[1].span))

    def minimize(self, meta, items):
        return Clause("objective", self.tok(items[0]), V(items[1], items[1].span))

    def by(self, meta, items):
        chain = items[1]
        return Clause("rule", self.tok(items[0]), V(chain, join(chain[0].span, chain[-1].span)))

    def chain(self, meta, items):
        return [V(e, e.span) for e in items if not isinstance(e, Token)]

    # optimizers
    def optimizer_ref(self, meta, items):
        return Stmt("optimizer_ref", items[0], [], self.meta(meta), value=items[1])

    def ref(self, meta, items):
        name = items[0]
        if name.type == "STRING":
            use = self.lit_str(meta, [name])
        else:
            use = V(Located(str(name), self.tok(name)), self.tok(name))
        span = self.meta(meta)
        data = {"use": (use.span, use)}
        if meta.end_pos > name.end_pos:
            hyper = {}
            for k in items[1:]:
                if k is None:
                    continue
                if k.key in hyper:
                    self.duplicates.append((f"setting `{k.key}`", k.kspan, hyper[k.key][0]))
                    continue
                hyper[k.key] = (k.kspan, k.value)
            data["hyper"] = (span, V(hyper, span))
        return V(data, span)

    def ref_kwarg(self, meta, items):
        return Clause(str(items[0]), self.tok(items[0]), V(items[1], items[1].span))

    def optimizer_spec(self, meta, items):
        return Stmt("optimizer_spec", items[0], [items[1]], self.meta(meta), items=items[2:])

    def optimizer_inline(self, meta, items):
        return Stmt("optimizer_inline", items[0], [], self.meta(meta), items=items[1:])

    def hyper(self, meta, items):
        return Stmt("hyper", items[0], [], self.meta(meta), clauses=items[1:])

    def hyper_kv(self, meta, items):
        return Clause(str(items[0]), self.tok(items[0]), items[1])

    def group(self, meta, items):
        return Group(items[0], items[1], list(items[2:]), self.meta(meta))

    def opt_level(self, meta, items):
        kw, name, chain, every = items
        stmt = Stmt("opt_level", kw, [name], self.meta(meta))
        stmt.clauses.append(Clause("input", self.tok(name), chain[0]))
        if len(chain) > 1:
            stmt.clauses.append(Clause("rule", chain[1].span, V(chain[1:], join(chain[1].span, chain[-1].span))))
        if every is not None:
            stmt.clauses.append(every)
        return stmt

    def update(self, meta, items):
        return Clause("update", self.tok(items[0]), V(items[1], items[1].span))

    def use(self, meta, items):
        return Clause("use", self.tok(items[0]), items[1])


def join(a: Span, b: Span) -> Span:
    return Span(a.file, a.line, a.col, b.end_line if b.end_line is not None else b.line,
                b.end_col if b.end_col is not None else b.col)


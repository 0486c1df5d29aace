"""Parse expressions (nlc/syntax/expr.lark) into `nlc.expr` nodes carrying source spans."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import lark
from lark import Token, Transformer, v_args

from nlc.diagnostics import Span
from nlc.expr import Bin, Call, Index, ListE, Name, Neg, Num

EXPR_GRAMMAR = (Path(__file__).with_name("expr.lark")).read_text()


class ExprSyntaxError(ValueError):
    """An expression that does not parse; `line`/`col` are relative to the expression text."""

    def __init__(self, message: str, line: int, col: int, hint: str | None = None):
        super().__init__(message)
        self.message, self.line, self.col, self.hint = message, line, col, hint


@v_args(meta=True)
class ExprBuilder(Transformer):
    """Builds expression nodes; `span_of(meta)` maps lark positions to file spans."""

    def __init__(self, base: Span | None):
        super().__init__()
        self.base = base

    def span_of(self, meta) -> Span | None:
        if self.base is None or getattr(meta, "empty", True):
            return None
        return self.base.shifted(meta.line, meta.column, meta.end_line, meta.end_column)

    def _tok_span(self, tok: Token) -> Span | None:
        if self.base is None:
            return None
        return self.base.shifted(tok.line, tok.column, tok.end_line, tok.end_column)

    def num(self, meta, items):
        return Num(value=float(items[0])).at(self._tok_span(items[0]))

    def name(self, meta, items):
        return Name(id=str(items[0])).at(self._tok_span(items[0]))

    def call(self, meta, items):
        fn, args = items[0], items[1]
        pos, kw = [], {}
        for a in (args or []):
            if isinstance(a, tuple):
                kw[a[0]] = a[1]
            else:
                pos.append(a)
        return Call(fn=str(fn), args=tuple(pos), kwargs=kw).at(self.span_of(meta))

    def args(self, meta, items):
        return items

    def kwarg(self, meta, items):
        return (str(items[0]), items[1])

    def list(self, meta, items):
        return ListE(items=tuple(i for i in items if i is not None)).at(self.span_of(meta))

    def index(self, meta, items):
        return Index(base=items[0], index=items[1]).at(self.span_of(meta))

    def neg(self, meta, items):
        return Neg(arg=items[0]).at(self.span_of(meta))

    def _bin(op):  # noqa: N805
        def f(self, meta, items):
            return Bin(op=op, left=items[0], right=items[1]).at(self.span_of(meta))
        return f

    add, sub, mul, div, pow = _bin("+"), _bin("-"), _bin("*"), _bin("/"), _bin("^")


@lru_cache(maxsize=1)
def _parser() -> lark.Lark:
    return lark.Lark(EXPR_GRAMMAR, start="expr", parser="lalr", propagate_positions=True,
                     maybe_placeholders=True)


def parse_expr(text: str, base: Span | None = None):
    """Parse one expression. Raises ExprSyntaxError with a position relative to `text`."""
    if "\n" in text.strip():
        raise ExprSyntaxError("an expression must fit on one line", 1, 1)
    try:
        tree = _parser().parse(text)
    except lark.exceptions.UnexpectedCharacters as e:
        raise ExprSyntaxError(f"unexpected character `{text[e.pos_in_stream]}`", e.line, e.column) from None
    except lark.exceptions.UnexpectedToken as e:
        if e.token.type == "$END":
            lines = text.split("\n")
            raise ExprSyntaxError("the expression ends too early", len(lines), len(lines[-1].rstrip()) + 1,
                                  "close every `(` and give every operator two operands") from None
        raise ExprSyntaxError(f"unexpected `{e.token}`", e.line, e.column) from None
    except lark.exceptions.UnexpectedEOF:
        raise ExprSyntaxError("the expression ends too early", 1, len(text) + 1) from None
    return ExprBuilder(base).transform(tree)

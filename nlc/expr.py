"""Expressions: the small language of signals, objectives, rule arguments and optimizer updates.

One grammar (nlc/syntax/expr.lark) serves both spellings: in YAML an expression is a string, in
`.nl` it is inline. Nodes are frozen pydantic models; each carries its source span as a private
attribute that equality ignores, so the YAML and `.nl` spellings of a spec compare equal.
"""
from __future__ import annotations

import math
from typing import Annotated, Iterator, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from nlc.diagnostics import Span


class ExprNode(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    _span: Span | None = PrivateAttr(default=None)

    def __eq__(self, other) -> bool:  # positions do not take part in equality
        return type(self) is type(other) and self.__dict__ == other.__dict__

    def __hash__(self) -> int:
        return hash(str(self))

    @property
    def span(self) -> Span | None:
        return self._span

    def at(self, span: Span | None) -> "ExprNode":
        self._span = span
        return self

    def walk(self) -> Iterator["ExprNode"]:
        """This node and every node below it, parents first."""
        yield self
        for child in self.children():
            yield from child.walk()

    def children(self) -> tuple["ExprNode", ...]:
        return ()


class Num(ExprNode):
    op: Literal["num"] = "num"
    value: float = Field(description="a number")

    def __str__(self) -> str:
        v = self.value
        if not math.isfinite(v):   # int(inf) raises; 1e999 reads back as inf (NaN has no literal: `nan`)
            return "nan" if v != v else ("1e999" if v > 0 else "-1e999")
        return str(int(v)) if v == int(v) and abs(v) < 1e15 else repr(v)


class Name(ExprNode):
    op: Literal["name"] = "name"
    id: str = Field(description="a signal, level, hyperparameter or built-in name")

    def __str__(self) -> str:
        return self.id


class Call(ExprNode):
    op: Literal["call"] = "call"
    fn: str = Field(description="function, level or rule primitive called")
    args: tuple["Expr", ...] = Field(default=(), description="positional arguments")
    kwargs: dict[str, "Expr"] = Field(default_factory=dict, description="keyword arguments")

    def children(self):
        return (*self.args, *self.kwargs.values())

    def __str__(self) -> str:
        parts = [str(a) for a in self.args] + [f"{k}={v}" for k, v in self.kwargs.items()]
        return f"{self.fn}({', '.join(parts)})" if parts else self.fn


class ListE(ExprNode):
    op: Literal["list"] = "list"
    items: tuple["Expr", ...] = Field(description="list items")

    def children(self):
        return self.items

    def __str__(self) -> str:
        return "[" + ", ".join(map(str, self.items)) + "]"


class Index(ExprNode):
    op: Literal["index"] = "index"
    base: "Expr"
    index: "Expr"

    def children(self):
        return (self.base, self.index)

    def __str__(self) -> str:
        return f"{self.base}[{self.index}]"


_PREC = {"+": 1, "-": 1, "*": 2, "/": 2, "^": 4}


class Bin(ExprNode):
    op: Literal["+", "-", "*", "/", "^"] = Field(description="binary operator")
    left: "Expr"
    right: "Expr"

    def children(self):
        return (self.left, self.right)

    def __str__(self) -> str:
        p = _PREC[self.op]

        def wrap(e, right_side):
            q = _PREC.get(e.op, 5 if not isinstance(e, Neg) else 3)
            need = q < p or (q == p and (right_side != (self.op == "^")))
            return f"({e})" if need else str(e)
        sep = "^" if self.op == "^" else f" {self.op} "
        return f"{wrap(self.left, False)}{sep}{wrap(self.right, True)}"


class Neg(ExprNode):
    op: Literal["neg"] = "neg"
    arg: "Expr"

    def children(self):
        return (self.arg,)

    def __str__(self) -> str:
        inner = str(self.arg)
        return f"-({inner})" if isinstance(self.arg, Bin) and self.arg.op != "^" else f"-{inner}"


Expr = Annotated[Union[Num, Name, Call, ListE, Index, Bin, Neg], Field(discriminator="op")]
for _cls in (Call, ListE, Index, Bin, Neg):
    _cls.model_rebuild()


def names(e: ExprNode) -> Iterator[Name]:
    return (n for n in e.walk() if isinstance(n, Name))


def calls(e: ExprNode) -> Iterator[Call]:
    return (n for n in e.walk() if isinstance(n, Call))


def const_value(e: ExprNode) -> float | None:
    """The value of a constant expression (numbers and arithmetic), else None."""
    if isinstance(e, Num):
        return e.value
    if isinstance(e, Neg):
        v = const_value(e.arg)
        return None if v is None else -v
    if isinstance(e, Bin):
        a, b = const_value(e.left), const_value(e.right)
        if a is None or b is None:
            return None
        try:
            return {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else None, "^": a ** b}[e.op]
        except (OverflowError, ZeroDivisionError, TypeError):
            return None
    return None


def subst(e: ExprNode, names: dict | None = None, fns: dict | None = None) -> ExprNode:
    """`e` with names replaced (by expressions) and called functions renamed, spans kept."""
    names, fns = names or {}, fns or {}
    if isinstance(e, Name):
        return names[e.id] if names.get(e.id) is not None else e
    if isinstance(e, Call):
        out = Call(fn=fns.get(e.fn, e.fn), args=tuple(subst(a, names, fns) for a in e.args),
                   kwargs={k: subst(v, names, fns) for k, v in e.kwargs.items()})
    elif isinstance(e, Bin):
        out = Bin(op=e.op, left=subst(e.left, names, fns), right=subst(e.right, names, fns))
    elif isinstance(e, Neg):
        out = Neg(arg=subst(e.arg, names, fns))
    elif isinstance(e, ListE):
        out = ListE(items=tuple(subst(i, names, fns) for i in e.items))
    elif isinstance(e, Index):
        out = Index(base=subst(e.base, names, fns), index=subst(e.index, names, fns))
    else:
        return e
    return out.at(e.span)

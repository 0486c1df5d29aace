"""The field types a Spec's models share: the frozen `Node` base, expressions (`ExprField`), rule
primitives and chains (`CallField`, `Chain`), identifiers, and clocks (`Every`, `EveryField`).

Each annotated type turns its YAML shorthand into nodes before pydantic validates it: a string
`l2norm(proj(x))` into an expression, `grad |> scale(eta)` into a chain of calls, `64, 512 tokens`
into an `Every`; its JSON schema says how the shorthand is written. The models are in `nlc.spec`.
"""
from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PositiveInt, WithJsonSchema
from pydantic_core import PydanticCustomError

from nlc.expr import Call, Expr, ExprNode, Name, Num
from nlc.syntax.expr import ExprSyntaxError, parse_expr


class Node(BaseModel):
    """Base of every spec model: frozen, no unknown keys, equality by fields only."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=False)

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and self.__dict__ == other.__dict__

    __hash__ = None  # type: ignore[assignment]


# ---------------------------------------------------------------- expressions as fields

def _to_expr(value: Any) -> Any:
    if isinstance(value, ExprNode):
        return value
    if isinstance(value, bool):
        return Num(value=float(value))
    if isinstance(value, (int, float)):
        return Num(value=float(value))
    if isinstance(value, str):
        try:
            return parse_expr(value, getattr(value, "span", None))
        except ExprSyntaxError as e:
            raise PydanticCustomError("expr_syntax", "{msg}", {"msg": e.message, "line": e.line, "col": e.col})
    return value


def _to_call(value: Any) -> Any:
    value = _to_expr(value)
    if isinstance(value, Name):
        return Call(fn=value.id).at(value.span)
    if isinstance(value, ExprNode) and not isinstance(value, Call):
        raise PydanticCustomError("not_call", "a rule step must be a primitive such as `grad` or "
                                  "`scale(eta)`, not `{text}`", {"text": str(value)})
    return value


def _to_chain(value: Any) -> Any:
    """A rule chain: a list of primitives, or one string `grad |> scale(eta) |> momentum(0.9)`."""
    if not isinstance(value, str):
        return value
    span = getattr(value, "span", None)
    steps, offset = [], 0
    for piece in value.split("|>"):
        lead = len(piece) - len(piece.lstrip())
        text = piece.strip()
        if span is not None:
            from nlc.syntax.source import Located
            text = Located(text, span.shifted(1, offset + lead + 1, None, None))
        steps.append(text)
        offset += len(piece) + 2
    return steps


_EXPR_SCHEMA = {"type": "string", "description": "an expression, e.g. `l2norm(conv(proj(x), 4))`"}
ExprField = Annotated[Expr, BeforeValidator(_to_expr), WithJsonSchema(_EXPR_SCHEMA)]
CallField = Annotated[Call, BeforeValidator(_to_call),
                      WithJsonSchema({"type": "string", "description": "a rule primitive, e.g. `momentum(0.9)`"})]
Chain = Annotated[tuple[CallField, ...], BeforeValidator(_to_chain),
                  WithJsonSchema({"type": "string", "description": "primitives joined by `|>`, e.g. `grad |> scale(eta)`"})]
Identifier = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]


# ---------------------------------------------------------------- clocks

_EVERY = re.compile(r"^\s*(?:(never)|(\[[^\]]*\]|-?[A-Za-z_0-9]+(?:\s*,\s*-?[A-Za-z_0-9]+)*)\s*(tokens?|steps?))\s*$")


def _parse_every(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        raise PydanticCustomError("every_unit", "`every` needs a clock unit",
                                  {"hint": f"write `{value} tokens` (in-context) or `{value} steps` (optimizer clock)"})
    if not isinstance(value, str):
        return value
    m = _EVERY.match(value)
    if not m:
        raise PydanticCustomError("every_form", "`every` must read like `1 token`, `[64, 512] tokens`, "
                                  "`64, 512 tokens`, `16 steps` or `never`, not `{text}`", {"text": str(value)})
    if m.group(1):
        return {"period": None, "unit": "tokens"}
    raw, unit = m.group(2), m.group(3)
    unit = unit if unit.endswith("s") else unit + "s"
    items = [s.strip() for s in raw.strip("[]").split(",")]
    period = [int(s) if re.fullmatch(r"-?\d+", s) else s for s in items if s]
    return {"period": period, "unit": unit}


class Every(Node):
    """How often a level updates: every `period` tokens (in context) or steps (optimizer clock)."""

    period: tuple[Union[PositiveInt, Identifier], ...] | None = Field(
        description="update period(s); several periods make a chain of levels (CMS); "
                    "a name refers to an optimizer hyperparameter; null = never (frequency 0)")
    unit: Literal["tokens", "steps"] = Field(description="the clock: `tokens` in context, `steps` on the optimizer's clock")

    def __str__(self) -> str:
        if self.period is None:
            return "never"
        if len(self.period) == 1 and self.period[0] == 1:
            return f"1 {self.unit[:-1]}"
        return ", ".join(map(str, self.period)) + f" {self.unit}"


EveryField = Annotated[Every, BeforeValidator(_parse_every),
                       WithJsonSchema({"type": "string", "description": "e.g. `1 token`, `64, 512, 4096 tokens`, `16 steps`, `never`"})]

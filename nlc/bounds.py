"""Interval bounds of flow expressions: what the compiler can prove about a signal's values from
the spec alone, whatever the inputs and the weights.

Used where a run-time check would otherwise read a tensor's values on the host (a device sync on
a GPU): the generalized delta rule's chunked form needs its retention ``a >= 0``, and a spec's
retention is usually non-negative by construction (``exp(..)``, ``sigmoid(..)``,
``1 - 2^(-5 - head)``). Interval arithmetic over the expression, each signal replaced by its
definition: projections, level outputs and anything unknown are unbounded, so a bound is only
claimed where every step of the expression guarantees it. Floating-point rounding is monotone and
the bounded functions keep their ranges in floating point (``sigmoid`` in [0, 1], ``exp`` >= 0),
so the bounds hold for the computed values too.
"""
from __future__ import annotations

import math

from nlc.expr import Bin, Call, ExprNode, Name, Neg, Num

__all__ = ["bounds", "nonnegative"]

INF = math.inf
ANY = (-INF, INF)


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return INF


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + _exp(-x)) if x > -INF else 0.0


def _softplus(x: float) -> float:
    return x + math.log1p(_exp(-x)) if x > 0 else math.log1p(_exp(x))


# non-decreasing functions: their bounds are the function at the argument's bounds
MONOTONE = {"exp": _exp, "sigmoid": _sigmoid, "softplus": _softplus, "relu": lambda x: max(x, 0.0),
            "tanh": math.tanh}
RANGES = {"l2norm": (-1.0, 1.0)}      # an element of a unit vector


def bounds(e: ExprNode, signals: dict | None = None, heads: int | None = None) -> tuple[float, float]:
    """(lo, hi) with lo <= every value of ``e`` <= hi; ``signals`` maps a signal's name to its
    expression, ``heads`` bounds the built-in ``head`` (0 .. heads - 1)."""
    return _bounds(e, signals or {}, heads, frozenset())


def nonnegative(e: ExprNode, signals: dict | None = None, heads: int | None = None) -> bool:
    """Whether ``e`` is >= 0 for every input."""
    return bounds(e, signals, heads)[0] >= 0


def _bounds(e, signals, heads, seen) -> tuple[float, float]:
    if isinstance(e, Num):
        return (e.value, e.value) if not math.isnan(e.value) else ANY
    if isinstance(e, Name):
        if e.id == "head":
            return (0.0, INF if heads is None else float(heads - 1))
        if e.id in signals and e.id not in seen:
            return _bounds(signals[e.id], signals, heads, seen | {e.id})
        return ANY
    if isinstance(e, Neg):
        lo, hi = _bounds(e.arg, signals, heads, seen)
        return -hi, -lo
    if isinstance(e, Call):
        if e.kwargs or len(e.args) != 1 or e.fn not in MONOTONE and e.fn not in RANGES:
            return ANY
        if e.fn in RANGES:
            return RANGES[e.fn]
        lo, hi = _bounds(e.args[0], signals, heads, seen)
        return MONOTONE[e.fn](lo), MONOTONE[e.fn](hi)
    if isinstance(e, Bin):
        a, b = _bounds(e.left, signals, heads, seen), _bounds(e.right, signals, heads, seen)
        return _BIN[e.op](a, b)
    return ANY


def _add(a, b):
    lo, hi = a[0] + b[0], a[1] + b[1]           # -inf + inf is nan: unbounded on that side
    return (-INF if math.isnan(lo) else lo), (INF if math.isnan(hi) else hi)


def _mul(a, b):
    ends = [0.0 if 0.0 in (x, y) else x * y for x in a for y in b]   # 0 * inf: 0 (a bound, not a value)
    return min(ends), max(ends)


def _div(a, b):
    if b[0] <= 0.0 <= b[1]:
        return ANY
    return _mul(a, (1.0 / b[1], 1.0 / b[0]))


def _pow(a, b):
    """base ^ exponent: exact for a constant positive base, non-negative for a non-negative base."""
    if a[0] == a[1] and a[0] > 0:             # c^x is monotone in x
        at = [_cpow(a[0], x) for x in b]
        return min(at), max(at)
    if a[0] >= 0:
        return 0.0, INF
    return ANY


def _cpow(c: float, x: float) -> float:
    if math.isinf(x):
        return 1.0 if c == 1 else (INF if (x > 0) == (c > 1) else 0.0)
    try:
        return c ** x
    except OverflowError:
        return INF


_BIN = {"+": _add, "-": lambda a, b: _add(a, (-b[1], -b[0])), "*": _mul, "/": _div, "^": _pow}

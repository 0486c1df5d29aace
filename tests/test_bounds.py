"""nlc.bounds: interval bounds of flow expressions, and the run-time check they let the compiled
models skip (generalized_delta's host-side ``a >= 0``, a device sync per call on a GPU)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import nlc
from nlc.backends.torch import ops
from nlc.backends.torch.codegen import generate
from nlc.bounds import bounds, nonnegative
from nlc.expr import Bin, Call, Name, Neg, Num
from nlc.syntax.expr import parse_expr

ROOT = Path(__file__).resolve().parents[1]
SIGNALS = {"gate": parse_expr("sigmoid(proj(x))"), "z": parse_expr("proj(x)"), "loop": parse_expr("loop + 1")}


@pytest.mark.parametrize("text,lo,hi", [
    ("exp(-softplus(-proj(x)) / 16)", 0.0, 1.0),                  # GLA's alpha
    ("exp(-0.6065 * sigmoid(proj(x)))", math.exp(-0.6065), 1.0),  # RWKV-7's w
    ("1 - 2^(-5 - head)", 1 - 2 ** -5, 1 - 2 ** -8),               # RetNet's gamma, 4 heads
    ("gate * gate", 0.0, 1.0),                                    # a signal, by its definition
    ("1 - gate", 0.0, 1.0),
    ("relu(z) + 0.5", 0.5, math.inf),
    ("tanh(z) / 2", -0.5, 0.5),
    ("l2norm(z)", -1.0, 1.0),
    ("z", -math.inf, math.inf),                                   # a projection is unbounded
    ("gate / tanh(z)", -math.inf, math.inf),                      # a denominator that may be 0
    ("exp(z) - exp(z)", -math.inf, math.inf),                     # inf - inf: unbounded, not nan
    ("z^2", -math.inf, math.inf),                                 # a negative base: no claim
    ("gate^0.5", 0.0, math.inf),                                  # a non-negative base
    ("0.5^(1 + gate)", 0.25, 0.5),
    ("loop", -math.inf, math.inf),                                # a cycle ends unbounded
])
def test_bounds_of_expressions(text, lo, hi):
    got = bounds(parse_expr(text), SIGNALS, heads=4)
    assert got == pytest.approx((lo, hi)), (text, got)


def _eval(e, env):
    """The expression on tensors: names from env, proj() a fresh unbounded draw."""
    if isinstance(e, Num):
        return torch.tensor(e.value, dtype=torch.float64)
    if isinstance(e, Name):
        return env[e.id] if e.id in env else _eval(SIGNALS[e.id], env)
    if isinstance(e, Neg):
        return -_eval(e.arg, env)
    if isinstance(e, Bin):
        a, b = _eval(e.left, env), _eval(e.right, env)
        return {"+": a + b, "-": a - b, "*": a * b, "/": a / b, "^": a ** b}[e.op]
    assert isinstance(e, Call)
    if e.fn == "proj":
        return env["_draw"]()
    x = _eval(e.args[0], env)
    return {"exp": torch.exp, "sigmoid": torch.sigmoid, "softplus": torch.nn.functional.softplus,
            "relu": torch.relu, "tanh": torch.tanh, "l2norm": lambda t: torch.nn.functional.normalize(t, dim=-1)}[e.fn](x)


@pytest.mark.parametrize("text", ["exp(-softplus(-proj(x)) / 16)", "exp(-0.6065 * sigmoid(proj(x)))",
                                  "1 - 2^(-5 - head)", "1 - gate * sigmoid(proj(x))", "softplus(proj(x)) - relu(z)",
                                  "tanh(proj(x)) * gate + 2", "(1 - gate) / (1 + exp(proj(x)))"])
def test_values_lie_within_the_bounds(text):
    """Random inputs, wide (|z| up to 1e3: saturating every function) and in float32 too: every
    value the expression takes lies in its bounds."""
    g = torch.Generator().manual_seed(0)
    e = parse_expr(text)
    lo, hi = bounds(e, SIGNALS, heads=4)
    for dtype in (torch.float64, torch.float32):
        draw = lambda: (torch.randn(4096, generator=g, dtype=torch.float64) *  # noqa: E731
                        10.0 ** torch.randint(-2, 4, (4096,), generator=g)).to(dtype)
        env = {"x": None, "head": torch.arange(4, dtype=dtype).repeat(1024), "_draw": draw}
        v = _eval(e, env)
        v = v[~v.isnan()]
        assert v.numel() > 0 and v.min() >= lo and v.max() <= hi, (text, dtype, float(v.min()), float(v.max()), lo, hi)


def test_nonnegative():
    assert nonnegative(parse_expr("exp(z)"), SIGNALS) and not nonnegative(parse_expr("z - 1"), SIGNALS)


def test_compiled_models_skip_the_check_only_where_the_spec_proves_it(tmp_path):
    """GLA's retention exp(-softplus(-z) / 16) is never negative: its generated call passes
    check=False and says why. The same spec with a retention that can be negative keeps the check;
    and the op's check itself does fire on a negative a, unless told otherwise."""
    src = generate(nlc.load(ROOT / "specs" / "gla.yaml"), "gla.yaml")
    assert "check=False" in src and "a lies in [0, 1] whatever the inputs" in src
    text = (ROOT / "specs" / "gla.yaml").read_text().replace("alpha: exp(-softplus(-proj(x)) / 16)",
                                                              "alpha: tanh(proj(x))")
    assert "tanh(proj(x))" in text
    (tmp_path / "gla_tanh.yaml").write_text(text)
    src = generate(nlc.load(tmp_path / "gla_tanh.yaml"), "gla_tanh.yaml")
    assert "generalized_delta(" in src and "check=False" not in src
    g = torch.Generator().manual_seed(3)
    q, k, w = (torch.randn(1, 5, 2, 4, generator=g, dtype=torch.float64) for _ in range(3))
    a = torch.rand(1, 5, 2, generator=g, dtype=torch.float64) - 0.5
    with pytest.raises(ValueError, match="a >= 0"):
        ops.generalized_delta(q, k, w, a, backend="torch")
    o, _ = ops.generalized_delta(q, k, w, a.abs(), backend="torch", check=False)
    assert torch.isfinite(o).all()

"""The language's vocabulary: built-in functions, rule primitives, objectives per memory kind.

One table per family, each entry with its arity and a one-line meaning. The checker reads these
tables, the docs are written from them, and the backends implement exactly these names.

Types of model flows (checked statically): `vec` is a head_dim vector per head (x, keys, values,
projections), `head` is one scalar per head (gates, rates), `const` a number.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Fn:
    name: str
    params: tuple[str, ...]        # positional parameters (a trailing `?` marks optional)
    doc: str
    returns: str = "same"          # result type: "same" as first argument, or "vec" / "head" / "const"
    takes: tuple[str, ...] = ()    # allowed types of the first argument (empty: any)

    @property
    def min_args(self) -> int:
        return sum(1 for p in self.params if not p.endswith("?"))

    @property
    def max_args(self) -> int:
        return len(self.params)

    def signature(self) -> str:
        return f"{self.name}(" + ", ".join(self.params) + ")" if self.params else self.name


def _table(*fns: Fn) -> dict[str, Fn]:
    return {f.name: f for f in fns}


# Functions usable in model flows (signals, key/value/query, rule arguments, objectives).
SIGNAL_FUNCTIONS = _table(
    Fn("proj", ("x",), "a static linear projection per head (frequency 0, learned by the outer level)", "vec", ("vec",)),
    Fn("gate", ("x",), "sigmoid of a static linear map to one scalar per head", "head", ("vec",)),
    Fn("rate", ("x",), "a static linear map to one scalar per head (no squashing)", "head", ("vec",)),
    Fn("conv", ("e", "width"), "depthwise causal convolution over time of the given width"),
    Fn("l2norm", ("e",), "divide by the L2 norm over head_dim", "same", ("vec",)),
    Fn("silu", ("e",), "SiLU"), Fn("gelu", ("e",), "GELU"), Fn("relu", ("e",), "ReLU"),
    Fn("tanh", ("e",), "tanh"), Fn("sigmoid", ("e",), "logistic sigmoid"), Fn("softplus", ("e",), "softplus"),
    Fn("exp", ("e",), "exponential"),
    Fn("detach", ("e",), "stop the outer gradient through this flow"),
    Fn("norm", ("e",), "the L2 norm over head_dim: one scalar per head", "head", ("vec",)),
    Fn("sum", ("e",), "the sum over head_dim: one scalar per head", "head", ("vec",)),
    Fn("dot", ("a", "b"), "the inner product over head_dim: one scalar per head", "head", ("vec",)),
    Fn("param", ("init",), "a learned scalar per head (frequency 0), initialised to `init`, a constant "
       "expression that may use `head`, e.g. `param(log(1 + head))`", "head", ("const", "head")),
    Fn("onorm", ("e",), "RMS-normalise over head_dim with a learned scale (the per-head output norm)", "same", ("vec",)),
    Fn("log", ("e",), "natural log"),
)

# The element-wise functions among them (what a `param`'s constant initial value may apply).
ELEMENTWISE = {"silu", "gelu", "relu", "tanh", "sigmoid", "softplus", "exp", "log"}

# Names every model flow can use.
SIGNAL_NAMES = {"x": "the block's input at this token (after the pre-norm)",
                "head": "the head's index, 0 to heads - 1 (a constant per head)"}

# In a level's `output`, `o` is what the memory read (per head, before any normalisation).
OUTPUT_NAMES = {"o": "the level's read M(query), per head"}

# Inside a level, `M` is the level's own memory (at the chunk's anchor state) and these name its flows.
LEVEL_NAMES = {"key": "this level's key flow", "value": "this level's value flow", "query": "this level's query flow"}

# Functions usable in optimizer expressions (inputs and updates).
OPT_FUNCTIONS = _table(
    Fn("sqrt", ("e",), "element-wise square root"), Fn("abs", ("e",), "element-wise absolute value"),
    Fn("sign", ("e",), "element-wise sign"), Fn("exp", ("e",), "element-wise exponential"),
    Fn("log", ("e",), "element-wise natural log"),
    Fn("max", ("a", "b"), "element-wise maximum"), Fn("min", ("a", "b"), "element-wise minimum"),
    Fn("newton_schulz", ("e", "steps?"), "quintic Newton-Schulz orthogonalisation (Muon's), default 5 steps"),
    Fn("prev", ("level",), "a level's state before this step's update (a delayed read)"),
)
OPT_NAMES = {
    "grad": "this step's gradient of the parameter", "param": "the parameter before this step",
    "step": "the step count, starting at 1", "rows": "the parameter's first dimension",
    "cols": "the product of its other dimensions", "numel": "its number of elements",
}

# Rule primitives: one vocabulary for model levels and optimizer levels, composed in order.
# A chain transforms an update `u`; stateful primitives keep a state of u's shape;
# `retain` and `dgd` act on the level's memory itself (how the old state is kept). In a model
# level, state primitives before `grad` act on the state the gradient is taken at (gated DeltaNet);
# after `grad`, on the state the update is added to. The new state is (kept state) - u.
RULES = _table(
    Fn("grad", (), "u = the gradient of the level's objective at the chunk's anchor state (model levels)"),
    Fn("scale", ("c",), "u = c u"),
    Fn("momentum", ("beta", "nesterov?"), "S = beta S + u; u = S (nesterov: u = u + beta S)"),
    Fn("ema", ("beta",), "S = beta S + (1 - beta) u; u = S"),
    Fn("accumulate", (), "S = S + u; u = S (a running sum)"),
    Fn("delta_momentum", ("alpha",), "S = S (alpha I - u^T u / |u|_F^2) + u; u = S (S, u as [rows, cols], a vector as one row; "
       "no erase when u = 0): momentum with a gradient-dependent decay (NL §7)"),
    Fn("debias", ("beta",), "u = u / (1 - beta^k), k = the level's write count (the step, or the block of a slow level): Adam's bias correction"),
    Fn("weight_decay", ("wd",), "u = u + wd * param (optimizer levels)"),
    Fn("precondition", ("p",), "u = p * u, element-wise"),
    Fn("newton_schulz", ("steps?",), "u = NS(u), quintic Newton-Schulz"),
    Fn("retain", ("alpha",), "memory = alpha memory (retention; alpha = 1 keeps everything)"),
    Fn("dgd", ("key", "lr"), "memory = memory - lr M_prev key key^T: DGD's erase along the key, taken from the "
       "state before this step (so `retain(a) |> dgd(k, e)` is M (a I - e k k^T), Eq. 96)"),
)
STATE_RULES = {"retain", "dgd"}            # act on the memory, not on u
MODEL_ONLY_RULES = {"grad", "dgd"}
OPTIMIZER_ONLY_RULES = {"debias", "weight_decay"}

# Objectives each memory kind can take.
OBJECTIVES: dict[str, set[str]] = {
    "matrix": {"l2", "dot"},
    "vector": {"l2", "dot"},
    "mlp": {"l2", "dot", "task"},
    "attention": set(),  # non-parametric: the closed form of a weighted L2 (NL §1); no inner objective
}

RESERVED = set(SIGNAL_FUNCTIONS) | set(SIGNAL_NAMES) | set(LEVEL_NAMES) | set(OUTPUT_NAMES) | {"M"}

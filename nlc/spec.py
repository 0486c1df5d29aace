"""The Spec: the validated form of a nested-learning spec, identical for the YAML and .nl spellings.

Two kinds of spec: a `ModelSpec` (levels on the token clock, inside the model) and an
`OptimizerSpec` (levels on the step clock, over the gradient stream). Every model is frozen and
forbids unknown keys; every field has a description, so `nlc schema` documents the YAML form.
Expressions may be written as strings (YAML) or given as nodes (.nl); both validate to nodes.
The field types the models share (the `Node` base, expressions, rule chains, clocks) are in
`nlc.spec_fields`; `to_data` and `dump` turn a Spec back into its canonical YAML.
"""
from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, BeforeValidator, Field, PositiveFloat, PositiveInt, WithJsonSchema, model_validator
from pydantic_core import PydanticCustomError

from nlc.expr import Call, ExprNode, Name
from nlc import spec_fields as _fields
from nlc.spec_fields import Chain, Every, EveryField, ExprField, Identifier, Node, _to_expr

_parse_every = _fields._parse_every   # `every`'s shorthand, here too: tests validate clocks through `nlc.spec`


# ---------------------------------------------------------------- memories

Activation = Literal["silu", "gelu", "relu", "tanh", "identity"]


class MatrixMemory(Node):
    """A matrix memory per head, state [K, V]: linear attention, the delta rule and kin."""
    kind: Literal["matrix"] = Field(description="matrix memory")


class MLPMemory(Node):
    """A deep memory per head: `M(z) = z + W1 act(W2 z)` when residual (Titans, Hope)."""
    kind: Literal["mlp"] = Field(description="MLP memory")
    depth: PositiveInt = Field(2, description="number of linear layers")
    expansion: PositiveFloat = Field(2.0, description="hidden width as a multiple of the input width")
    activation: Activation = Field("silu", description="activation between layers")
    residual: bool = Field(True, description="add the input to the output (requires equal in and out)")


class VectorMemory(Node):
    """An element-wise (diagonal) memory per head, state [K]."""
    kind: Literal["vector"] = Field(description="vector (element-wise) memory")


class AttentionMemory(Node):
    """Softmax attention: a non-parametric level that keeps the raw context (frequency infinity)."""
    kind: Literal["attention"] = Field(description="softmax attention")
    window: PositiveInt | None = Field(None, description="sliding window in tokens; null = full causal context")
    rope: bool = Field(True, description="rotary position embedding of queries and keys (by absolute position)")


Memory = Annotated[Union[MatrixMemory, MLPMemory, VectorMemory, AttentionMemory], Field(discriminator="kind")]


def _memory_shorthand(value: Any) -> Any:
    return {"kind": value} if isinstance(value, str) else value


MemoryField = Annotated[Memory, BeforeValidator(_memory_shorthand)]


# ---------------------------------------------------------------- objectives

def _parse_objective(value: Any) -> Any:
    if isinstance(value, dict):
        return value
    e = _to_expr(value)
    if isinstance(e, Name):
        return {"loss": e.id}
    if isinstance(e, Call):
        if e.kwargs or len(e.args) != 2:
            raise PydanticCustomError("objective_args", "objective `{fn}` takes two arguments: "
                                      "`{fn}(prediction, target)`", {"fn": e.fn})
        return {"loss": e.fn, "pred": e.args[0], "target": e.args[1]}
    raise PydanticCustomError("objective_form", "an objective is `l2`, `dot`, `task`, or `l2(M(k), v)`", {})


class Objective(Node):
    """The inner objective a level minimises on its context flow."""
    loss: Literal["l2", "dot", "task"] = Field(
        description="`l2`: 1/2 ||pred - target||^2; `dot`: -<pred, target>; `task`: the model's own loss")
    pred: ExprField | None = Field(None, description="the prediction; default `M(key)`")
    target: ExprField | None = Field(None, description="the target; default `value`")

    def __str__(self) -> str:
        if self.pred is None and self.target is None:
            return self.loss
        return f"{self.loss}({self.pred or 'M(key)'}, {self.target or 'value'})"


ObjectiveField = Annotated[Objective, BeforeValidator(_parse_objective),
                           WithJsonSchema({"type": "string", "description": "`l2`, `dot`, `task` or `l2(M(k), M(v))`"})]


# ---------------------------------------------------------------- levels

class Level(Node):
    """One level: a memory with its context flow, objective, rule chain and clock."""
    memory: MemoryField = Field(description="what the level's state is")
    out: Literal["vector", "scalar"] = Field(
        "vector", description="`vector`: a head_dim vector per head; `scalar`: one value per head (a generated rate or gate)")
    key: ExprField | None = Field(None, description="the key flow (what the memory is addressed by)")
    value: ExprField | None = Field(None, description="the value flow (what the memory should return)")
    query: ExprField | None = Field(None, description="the read flow; the level's output is M(query)")
    gate: ExprField | None = Field(None, description="output gate: the level's normalised output is multiplied by it "
                                   "before the output projection (Titans §4.4), e.g. `sigmoid(proj(x))`")
    output: ExprField | None = Field(None, description="what the level contributes, from its read `o` (per head, before "
                                     "normalisation), before the output projection; default `onorm(o)` (`o` for attention), "
                                     "e.g. `onorm(o) * silu(proj(x)) + param(1) * x`")
    read: Literal["anchor", "current"] | None = Field(
        None, description="MLP memories: what token t reads inside a chunk: `anchor`, the chunk's start state (Eq. 90 as "
        "printed), or `current`, the state after the chunk's earlier tokens (gradients still at the anchor); "
        "default `anchor`")
    objective: ObjectiveField | None = Field(None, description="the inner objective; default `l2` for memories with a key")
    rule: Chain = Field((), description="the update rule as a chain of primitives, e.g. "
                        "`grad |> scale(eta) |> momentum(0.9) |> retain(alpha)`")
    every: EveryField | None = Field(None, description="update frequency; default `1 token` for in-context memories")
    chunk: PositiveInt | None = Field(None, description="chunk of the parallel form: gradients taken at the chunk's start state")
    init: Literal["meta", "zeros"] = Field("meta", description="`meta`: the initial state is learned by the outer level")


    def chunk_size(self) -> int:
        """The chunk the parallel form runs in: `chunk`, else 64."""
        return self.chunk or 64

    def flows(self) -> list:
        """Every expression of the level: key, value, query, gate, output, objective, rule arguments."""
        exprs = [self.key, self.value, self.query, self.gate, self.output]
        if self.objective is not None:
            exprs += [self.objective.pred, self.objective.target]
        exprs += [a for step in self.rule for a in (*step.args, *step.kwargs.values())]
        return [e for e in exprs if e is not None]


def reads(spec: "ModelSpec", exprs) -> tuple[set[str], set[str], set[str]]:
    """What expressions read, following signals transitively: (levels applied, signals read,
    functions called)."""
    levels, signals, fns = set(), set(), set()
    todo = list(exprs)
    while todo:
        for n in todo.pop().walk():
            if isinstance(n, Call):
                (levels if n.fn in spec.levels else fns).add(n.fn)
            elif isinstance(n, Name) and n.id in spec.signals and n.id not in signals:
                signals.add(n.id)
                todo.append(spec.signals[n.id])
    return levels, signals, fns


def generators_of(spec: "ModelSpec", name: str) -> set[str]:
    """The levels that level `name` applies, through signals and through those levels' own flows."""
    found: set[str] = set()
    frontier = {name}
    while frontier:
        frontier = reads(spec, [e for n in frontier for e in spec.levels[n].flows()])[0] - found - {name}
        found |= frontier
    return found


class Shape(Node):
    """The model's size and the order of levels in each layer's block."""
    vocab: PositiveInt = Field(description="vocabulary size")
    d_model: PositiveInt = Field(description="model width")
    layers: PositiveInt = Field(description="number of blocks")
    heads: PositiveInt = Field(description="number of heads; head_dim = d_model / heads")
    block: tuple[Identifier, ...] = Field(min_length=1, description="levels applied in each block, in order, each with pre-norm and residual")


class OptimizerRef(Node):
    """An optimizer spec used by name or path, with hyperparameter overrides."""
    use: str = Field(description="a shipped optimizer name (`adamw`) or a path to an optimizer spec")
    hyper: dict[Identifier, ExprField] = Field(default_factory=dict, description="hyperparameter overrides")

    def __str__(self) -> str:
        return f"{self.use}(" + ", ".join(f"{k}={v}" for k, v in self.hyper.items()) + ")"


def _parse_ref(value: Any) -> Any:
    if isinstance(value, dict):
        return value
    e = _to_expr(value)
    if isinstance(e, Name):
        return {"use": e.id}
    if isinstance(e, Call) and not e.args:
        return {"use": e.fn, "hyper": dict(e.kwargs)}
    raise PydanticCustomError("ref_form", "an optimizer is written `adamw(lr=4e-4)` or "
                              "`{use: path/to/opt.yaml, hyper: {lr: 4e-4}}`, or written inline as "
                              "`{hyper: {...}, groups: [...]}`", {})


RefField = Annotated[OptimizerRef, BeforeValidator(_parse_ref),
                     WithJsonSchema({"type": "string", "description": "e.g. `adamw(lr=4e-4, weight_decay=0.1)`"})]


# ---------------------------------------------------------------- optimizers

class OptLevel(Node):
    """A level over the gradient stream: its state follows its rule chain on the step clock."""
    input: ExprField = Field(default_factory=lambda: Name(id="grad"), description="what the level memorises; default `grad`")
    rule: Chain = Field(min_length=1, description="chain of primitives, e.g. `ema(beta1)` or `scale(beta1) |> accumulate`")
    every: EveryField | None = Field(None, description="default `1 step`; `f steps` sums the inputs of each block of f steps")


class ParamGroup(Node):
    """The parameters an update applies to, its levels and its update expression."""
    params: Literal["all", "matrix", "vector", "rest"] = Field(
        description="`matrix`: parameters with 2 or more dims; `vector`: fewer; `rest`: not taken by earlier groups")
    levels: dict[Identifier, OptLevel] = Field(default_factory=dict, description="the optimizer's levels for this group")
    update: ExprField | None = Field(None, description="the parameter change per step, e.g. `-lr * m / (sqrt(v) + eps)`")
    use: RefField | None = Field(None, description="delegate this group to another optimizer spec")


Hyper = Union[bool, int, float, list[float]]


class OptimizerSpec(Node):
    """An optimizer: levels over the gradient stream on the step clock."""
    nlc: Literal[1] = Field(description="language version")
    name: Identifier = Field(description="optimizer name")
    hyper: dict[Identifier, Hyper] = Field(default_factory=dict, description="hyperparameters and their defaults")
    groups: tuple[ParamGroup, ...] = Field(min_length=1, description="parameter groups, first match wins")

    def __str__(self) -> str:
        return self.name


class InlineOptimizer(Node):
    """An optimizer written inside a model spec: an optimizer spec without `nlc` and `name`.

    Validation turns it into an `OptimizerSpec` named `<model>_optimizer`."""
    hyper: dict[Identifier, Hyper] = Field(default_factory=dict, description="hyperparameters and their defaults")
    groups: tuple[ParamGroup, ...] = Field(min_length=1, description="parameter groups, first match wins")


def _parse_optimizer(value: Any) -> Any:
    """A model's optimizer: a reference (`adamw(lr=4e-4)`, `{use: ...}`) or a spec written inline.

    Validated here, by its own form, so that errors carry plain paths (`optimizer.hyper.lr`)."""
    if isinstance(value, (OptimizerRef, InlineOptimizer, OptimizerSpec)):
        return value
    if isinstance(value, dict) and "use" not in value:
        return InlineOptimizer.model_validate(value)
    return OptimizerRef.model_validate(_parse_ref(value))


ModelOptimizer = Annotated[
    Union[OptimizerRef, InlineOptimizer, OptimizerSpec], BeforeValidator(_parse_optimizer),
    WithJsonSchema({"anyOf": [
        {"type": "string", "description": "a shipped optimizer or a path, e.g. `adamw(lr=4e-4, weight_decay=0.1)`"},
        {"type": "object", "description": "`{use: path/to/opt.yaml, hyper: {lr: 4e-4}}`, or an inline "
                                          "optimizer: `{hyper: {...}, groups: [...]}` (an optimizer spec without `nlc` and `name`)"}]})]


class ModelSpec(Node):
    """A model: levels on the token clock composed into blocks, plus its optimizer (the outer level)."""
    nlc: Literal[1] = Field(description="language version")
    name: Identifier = Field(description="model name")
    model: Shape = Field(description="sizes and block layout")
    signals: dict[Identifier, ExprField] = Field(default_factory=dict, description="named flows shared by levels")
    levels: dict[Identifier, Level] = Field(min_length=1, description="the levels, by name")
    optimizer: ModelOptimizer | None = Field(
        None, description="the outermost level: the optimizer of the static parameters; a reference "
                          "(`adamw(lr=4e-4)`) or an optimizer spec written inline (named `<model>_optimizer`)")

    @model_validator(mode="after")
    def _name_inline_optimizer(self) -> "ModelSpec":
        if isinstance(self.optimizer, InlineOptimizer):  # frozen: set once, here, before anyone sees it
            self.__dict__["optimizer"] = OptimizerSpec(nlc=1, name=f"{self.name}_optimizer",
                                                       hyper=self.optimizer.hyper, groups=self.optimizer.groups)
        return self


Spec = Union[ModelSpec, OptimizerSpec]


def to_data(node: Any) -> Any:
    """Plain data of a Spec with expressions as canonical strings (the YAML form, defaults omitted)."""
    if isinstance(node, ExprNode):
        return str(node)
    if isinstance(node, OptimizerRef) and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", node.use):  # a path
        return {"use": node.use, **({"hyper": {k: str(v) for k, v in node.hyper.items()}} if node.hyper else {})}
    if isinstance(node, (Every, Objective, OptimizerRef)):
        return str(node)
    if isinstance(node, BaseModel):
        out = {}
        for name, info in type(node).model_fields.items():
            value = getattr(node, name)
            if value is None or (value == info.default and name not in ("nlc", "kind")):
                continue
            out[name] = to_data(value)
        if isinstance(node, Level) and node.rule:
            out["rule"] = " |> ".join(map(str, node.rule))
        if isinstance(node, OptLevel):
            out["rule"] = " |> ".join(map(str, node.rule))
        if isinstance(node, ModelSpec) and isinstance(node.optimizer, OptimizerSpec):
            out["optimizer"] = {k: v for k, v in out["optimizer"].items() if k not in ("nlc", "name")}
        return out
    if isinstance(node, dict):
        return {k: to_data(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [to_data(v) for v in node]
    return node


def dump(spec: Spec) -> str:
    """A readable, canonical YAML dump of a validated Spec."""
    import yaml
    return yaml.safe_dump(to_data(spec), sort_keys=False, width=110)

"""The level graph: levels as nodes, the five kinds of knowledge transfer as typed edges.

Nodes carry a level's kind, clock (`tokens` in context, `steps` on the optimizer's clock, or
`static` for frequency 0), period, chunk and state shape. Edges carry one of `FLOW_KINDS`
(Nested Learning §3) and `delayed=True` where the flow reads the source's previous state
(a generator read at the chunk's anchor, an optimizer's `prev`): only such edges may close a cycle.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import networkx as nx

from nlc import spec as S
from nlc.expr import Call

FLOW_KINDS = ("conditioning", "nonparametric", "backprop", "init", "generation")
NODE_KINDS = ("context", "matrix", "mlp", "vector", "attention", "static", "cms", "optimizer", "projection", "update")
_STATIC_FNS = {"proj", "gate", "rate", "conv"}


class GraphError(AssertionError):
    """An invariant of the level graph does not hold (a compiler bug, not a user mistake)."""


@dataclass
class LevelGraph:
    name: str
    kind: str                 # "model" or "optimizer"
    g: nx.MultiDiGraph

    # -- queries
    def levels(self) -> list[str]:
        return [n for n, d in self.g.nodes(data=True) if d["kind"] not in ("context", "update")]

    def node(self, name: str) -> dict:
        return self.g.nodes[name]

    def edges(self, kind: str | None = None) -> list[tuple[str, str, dict]]:
        return [(u, v, d) for u, v, d in self.g.edges(data=True) if kind is None or d["kind"] == kind]

    # -- invariants
    def verify(self) -> "LevelGraph":
        for n, d in self.g.nodes(data=True):
            for key in ("kind", "clock", "frequency", "label"):
                if key not in d:
                    raise GraphError(f"node `{n}` has no `{key}`")
            if d["kind"] not in NODE_KINDS:
                raise GraphError(f"node `{n}` has unknown kind `{d['kind']}`")
            if d["clock"] not in ("tokens", "steps", "static"):
                raise GraphError(f"node `{n}` has unknown clock `{d['clock']}`")
        for u, v, d in self.g.edges(data=True):
            if d.get("kind") not in FLOW_KINDS:
                raise GraphError(f"edge `{u}` -> `{v}` has unknown kind `{d.get('kind')}`")
        forward = nx.DiGraph([(u, v) for u, v, d in self.g.edges(data=True)
                              if d["kind"] in ("conditioning", "nonparametric", "generation") and not d.get("delayed")])
        try:
            cycle = nx.find_cycle(forward)
        except nx.NetworkXNoCycle:
            return self
        raise GraphError("cycle without a delayed edge: " + " -> ".join(u for u, _ in cycle))

    def dump(self) -> str:
        out = [f"level graph `{self.name}` ({self.kind})", "  levels:"]
        w = max((len(n) for n in self.g.nodes), default=4)
        for n, d in self.g.nodes(data=True):
            extra = f"  chunk {d['chunk']}" if d.get("chunk") else ""
            state = f"  state {d['state']}" if d.get("state") else ""
            out.append(f"    {n:<{w}}  {d['kind']:<10} {d['clock']:<6} freq {d['frequency']:<6}{extra}{state}")
        out.append("  flows:")
        for u, v, d in self.g.edges(data=True):
            tag = " (delayed)" if d.get("delayed") else ""
            via = f"  [{d['via']}]" if d.get("via") else ""
            out.append(f"    {u} -> {v}  {d['kind']}{tag}{via}")
        return "\n".join(out)


def lower(spec: S.Spec | str | Path) -> LevelGraph:
    """The level graph of a validated spec (a path is loaded first)."""
    if isinstance(spec, (str, Path)):
        from nlc.loader import load_located
        loaded = load_located(spec)
        spec, base = loaded.spec, Path(loaded.file).parent
    else:
        base = Path(".")
    if isinstance(spec, S.OptimizerSpec):
        return _lower_optimizer(spec).verify()
    return _lower_model(spec, base).verify()


# ---------------------------------------------------------------- models

def _freq(period: int | str | None, unit: str) -> str:
    if period is None:
        return "0"
    return "1" if period == 1 else f"1/{period}"


def _level_nodes(name: str, lv: S.Level) -> list[str]:
    if lv.every is not None and lv.every.period and len(lv.every.period) > 1:
        return [f"{name}[{i}]" for i in range(len(lv.every.period))]
    return [name]


def _state(lv: S.Level, shape: S.Shape) -> str:
    H, K = shape.heads, shape.d_model // shape.heads
    out = 1 if lv.out == "scalar" else K
    m = lv.memory
    if isinstance(m, S.MatrixMemory):
        return f"[{H}, {K}, {out}]"
    if isinstance(m, S.VectorMemory):
        return f"[{H}, {K}]"
    if isinstance(m, S.AttentionMemory):
        return f"KV cache [T, {H}, {2 * K}]" if m.window is None else f"KV window [{m.window}, {H}, {2 * K}]"
    hidden = int(round(K * m.expansion)) if lv.key is not None else int(round(shape.d_model * m.expansion))
    inner = K if lv.key is not None else shape.d_model
    outer = out if lv.key is not None else shape.d_model
    dims = [inner] + [hidden] * (m.depth - 1) + [outer]
    per = " + ".join(f"{a}x{b}" for a, b in zip(dims, dims[1:]))
    return f"[{H}, {per}]" if lv.key is not None else f"[{per}]"


def _lower_model(spec: S.ModelSpec, base: Path) -> LevelGraph:
    from nlc.instance import instanced
    spec = instanced(spec)   # a level named twice in the block is two levels
    g = nx.MultiDiGraph()
    shape = spec.model
    opt = spec.optimizer
    opt_name = opt.name if isinstance(opt, S.OptimizerSpec) else Path(opt.use).stem if opt else "outer"
    g.add_node("context", kind="context", clock="tokens", frequency="-", label="tokens")
    g.add_node(opt_name, kind="optimizer", clock="steps", frequency="1", label=f"{opt_name}\noptimizer",
               state="", period=1)
    uses_static = False
    for name, lv in spec.levels.items():
        nodes = _level_nodes(name, lv)
        m = lv.memory
        for i, node in enumerate(nodes):
            period = lv.every.period[i] if lv.every and lv.every.period else (None if lv.every else 1)
            if isinstance(m, S.AttentionMemory):
                kind, clock, freq = "attention", "tokens", "inf"
            elif lv.every is not None and lv.every.period is None:
                kind, clock, freq = "static", "static", "0"
            else:
                kind = "cms" if len(nodes) > 1 else m.kind
                clock = "steps" if lv.every is not None and lv.every.unit == "steps" else "tokens"
                freq = _freq(period, clock)
            g.add_node(node, kind=kind, clock=clock, frequency=freq, period=period, chunk=lv.chunk,
                       state=_state(lv, shape), level=name, in_block=name in shape.block,
                       label=node)
        for a, b in zip(nodes, nodes[1:]):
            g.add_edge(a, b, kind="conditioning", via="chain")
            g.add_edge(b, a, kind="backprop", via="chain")
        generators, _, fns = S.reads(spec, lv.flows())
        static = bool(fns & _STATIC_FNS)
        uses_static |= static
        if static:
            g.add_edge("projections", nodes[0], kind="conditioning", via="static projections")
        for gen in sorted(generators):
            g.add_edge(_level_nodes(gen, spec.levels[gen])[-1], nodes[0], kind="generation", delayed=True,
                       via="reads the previous state")
        if isinstance(m, S.AttentionMemory):
            g.add_edge("context", nodes[0], kind="nonparametric", via="raw context")
        parametric = not isinstance(m, S.AttentionMemory)
        for node in nodes:
            if parametric:
                g.add_edge(node, opt_name, kind="backprop")
            if parametric and lv.init == "meta" and g.nodes[node]["kind"] != "static":
                g.add_edge(opt_name, node, kind="init", via="meta-learned initial state")
    if uses_static:
        g.add_node("projections", kind="projection", clock="static", frequency="0", label="projections",
                   state="", period=None)
        g.add_edge("projections", opt_name, kind="backprop")
    prev = "context"
    for name in shape.block:
        if name not in spec.levels:
            continue
        nodes = _level_nodes(name, spec.levels[name])
        if not (prev == "context" and isinstance(spec.levels[name].memory, S.AttentionMemory)):
            g.add_edge(prev, nodes[0], kind="conditioning", via="block")
        prev = nodes[-1]
    if isinstance(opt, S.OptimizerRef):
        from nlc.loader import find_spec
        found = find_spec(opt.use, base)
        opt = None
        if found is not None:
            try:
                from nlc.loader import load_located
                opt = load_located(found).spec
            except Exception:  # reported by `check`; the drawing just omits the optimizer's levels
                opt = None
    if isinstance(opt, S.OptimizerSpec):  # referenced or written inline
        for gi, grp in enumerate(opt.groups):
            for lname, olv in grp.levels.items():
                node = f"{opt_name}.{lname}" if len(opt.groups) == 1 else f"{opt_name}.{grp.params}.{lname}"
                period, hyper = _opt_period(olv, opt)
                g.add_node(node, kind="optimizer", clock="steps", frequency=_freq(period, "steps"),
                           period=period, period_hyper=hyper, label=node, state="like each parameter")
                g.add_edge(node, opt_name, kind="conditioning", via="update")
    return LevelGraph(spec.name, "model", g)


# ---------------------------------------------------------------- optimizers

def _opt_period(lv: S.OptLevel, spec: S.OptimizerSpec) -> tuple[int, str | None]:
    """An optimizer level's period in steps, and the hyperparameter that names it (if one does)."""
    period = lv.every.period[0] if lv.every and lv.every.period else 1
    if isinstance(period, str):
        return spec.hyper.get(period, period), period
    return period, None


def _lower_optimizer(spec: S.OptimizerSpec) -> LevelGraph:
    g = nx.MultiDiGraph()
    g.add_node("grad", kind="context", clock="steps", frequency="1", label="gradients")
    for gi, grp in enumerate(spec.groups):
        upd = f"{grp.params}.update" if len(spec.groups) > 1 else "update"
        if grp.use is not None:
            g.add_node(upd, kind="update", clock="steps", frequency="1",
                       label=f"{grp.params}: {grp.use.use}", period=1)
            g.add_edge("grad", upd, kind="conditioning", via="delegated")
            continue
        g.add_node(upd, kind="update", clock="steps", frequency="1", label=f"{grp.params}: update", period=1)
        for lname, lv in grp.levels.items():
            node = f"{grp.params}.{lname}" if len(spec.groups) > 1 else lname
            period, hyper = _opt_period(lv, spec)
            g.add_node(node, kind="optimizer", clock="steps", frequency=_freq(period, "steps"), period=period,
                       period_hyper=hyper, label=node, state="like each parameter", rule=" |> ".join(map(str, lv.rule)))
            g.add_edge("grad", node, kind="generation", via=str(lv.input))
            delayed = grp.update is not None and any(
                isinstance(c, Call) and c.fn == "prev" and c.args and str(c.args[0]) == lname for c in grp.update.walk())
            g.add_edge(node, upd, kind="conditioning", delayed=delayed, via="prev" if delayed else "")
    return LevelGraph(spec.name, "optimizer", g)

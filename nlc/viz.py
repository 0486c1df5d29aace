"""Draw a level graph: clock domains as clusters, one edge style per flow kind, delayed edges dashed.

`to_dot` is pure text; `render` turns it into SVG or PNG with the `graphviz-pure` program (a
pip-installed, self-contained Graphviz: same bytes on every machine) or a system `dot`.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from nlc.fileio import atomic_write
from nlc.graph import LevelGraph

# flow kind -> (colour, style, arrowhead, legend text)
EDGE_STYLE = {
    "conditioning": ("#333333", "solid", "normal", "conditioning (reads output or parameters)"),
    "nonparametric": ("#1f6fd1", "bold", "normal", "non-parametric conditioning (raw context)"),
    "backprop": ("#c0392b", "solid", "onormal", "backpropagation (gradients flow up)"),
    "init": ("#1e8449", "dotted", "diamond", "initialisation (meta-learned initial state)"),
    "generation": ("#8e44ad", "solid", "vee", "generation (produces another level's flow)"),
}
CLUSTERS = {
    "tokens": ("in context: token clock", "#eef5ff"),
    "static": ("static: frequency 0", "#f4f4f4"),
    "steps": ("outer: optimizer step clock", "#fff4e6"),
}
NODE_SHAPE = {"context": "ellipse", "optimizer": "box3d", "projection": "note", "update": "ellipse",
              "attention": "box", "static": "box", "cms": "box", "mlp": "box", "matrix": "box", "vector": "box"}


def _q(s: str) -> str:
    return '"' + str(s).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _label(name: str, d: dict) -> str:
    kind = d["kind"]
    if kind in ("context", "projection", "update"):
        return d.get("label", name)
    freq = d["frequency"]
    lines = [name]
    if kind == "optimizer" and d.get("rule"):
        lines.append(d["rule"])
    sub = {"attention": "softmax attention", "static": "static MLP", "cms": "CMS MLP"}.get(kind, f"{kind} memory")
    if kind != "optimizer":
        lines.append(sub)
    unit = "step" if d["clock"] == "steps" else "token"
    period = d.get("period")
    if freq == "inf":
        lines.append("frequency: every token, whole context")
    elif freq == "0":
        lines.append("frequency 0 (trained by the outer level)")
    elif period is not None:
        named = f" ({d['period_hyper']})" if d.get("period_hyper") else ""
        lines.append(f"every {period} {unit}{'s' if period != 1 else ''}{named}")
    if d.get("chunk"):
        lines.append(f"chunk {d['chunk']}")
    return "\n".join(lines)


def _generator_group(g) -> list[str]:
    """Levels that all generate each other's flows (self-modification): drawn as one box."""
    gen = {(u, v) for u, v, d in g.edges(data=True) if d["kind"] == "generation"}
    group = sorted(n for n in g.nodes if (n, n) in gen)
    group = [n for n in group if all((n, m) in gen for m in group)]
    return group if len(group) >= 2 else []


def to_dot(graph: LevelGraph) -> str:
    """DOT text of the picture. Fan-outs are drawn once per cluster: backprop and init edges between
    the optimizer and three or more levels of a cluster become one edge to the cluster, and levels
    that all generate each other are boxed together with their mutual edges summarised."""
    g = graph.g
    out = [f"digraph {_q(graph.name)} {{",
           f"  graph [rankdir=TB, compound=true, fontname=Helvetica, fontsize=13, labelloc=t,"
           f" label={_q('level graph: ' + graph.name)}, newrank=true, nodesep=0.3, ranksep=0.45];",
           "  node [fontname=Helvetica, fontsize=10, style=filled, fillcolor=white];",
           "  edge [fontname=Helvetica, fontsize=8];"]
    group = _generator_group(g)
    cluster_of = {n: "cluster_" + d["clock"] for n, d in g.nodes(data=True) if d["kind"] != "context"}
    for clock, (title, colour) in CLUSTERS.items():
        members = [n for n, d in g.nodes(data=True) if d["clock"] == clock and d["kind"] != "context"]
        if not members:
            continue
        out.append(f"  subgraph {_q('cluster_' + clock)} {{")
        out.append(f"    label={_q(title)}; style=filled; fillcolor={_q(colour)}; color=\"#999999\";")
        inner = [n for n in members if n in group]
        if inner:
            out.append('    subgraph cluster_generators { label="self-modifying: each generates the others\' flows\\n'
                       '(reads their previous state)"; style="filled,dashed"; fillcolor="#f5eefa"; color="#8e44ad"; fontsize=10;')
            for n in inner:
                out.append(f"      {_q(n)} [label={_q(_label(n, g.nodes[n]))}, shape={NODE_SHAPE.get(g.nodes[n]['kind'], 'box')}];")
            out.append("    }")
        for n in members:
            if n not in group:
                d = g.nodes[n]
                out.append(f"    {_q(n)} [label={_q(_label(n, d))}, shape={NODE_SHAPE.get(d['kind'], 'box')}];")
        out.append("  }")
    for n, d in g.nodes(data=True):
        if d["kind"] == "context":
            out.append(f"  {_q(n)} [label={_q(d.get('label', n))}, shape=ellipse];")

    # Fan-outs to one cluster from one node (or back) are drawn as a single cluster edge.
    fan: dict[tuple, list] = {}
    for u, v, d in g.edges(data=True):
        if d["kind"] in ("backprop", "init", "conditioning") and u != v:
            if cluster_of.get(v, "") != cluster_of.get(u, "") and v in cluster_of:
                fan.setdefault(("in", u, cluster_of[v], d["kind"]), []).append((u, v))
            if cluster_of.get(u, "") != cluster_of.get(v, "") and u in cluster_of:
                fan.setdefault(("out", v, cluster_of[u], d["kind"]), []).append((u, v))
    collapsed, drawn = set(), set()
    lines = []
    for (direction, other, cluster, kind), pairs in fan.items():
        if len(pairs) < 3 or any(p in collapsed for p in pairs):
            continue
        collapsed.update(pairs)
        ends_in_cluster = [v if direction == "in" else u for u, v in pairs]
        anchor = next((n for n in ends_in_cluster if n not in group), ends_in_cluster[0])
        colour, style, head, _ = EDGE_STYLE[kind]
        ends = (other, anchor) if direction == "in" else (anchor, other)
        port = f"lhead={cluster}" if direction == "in" else f"ltail={cluster}"
        text = f"{len(pairs)} levels"
        lines.append(f"  {_q(ends[0])} -> {_q(ends[1])} [{port}, color={_q(colour)}, arrowhead={head}, "
                     f"style={'solid' if style == 'bold' else style}, penwidth=1.6, label={_q(text)}, fontcolor={_q(colour)}];")
    for u, v, d in g.edges(data=True):
        if (u, v) in collapsed and d["kind"] in ("backprop", "init", "conditioning"):
            continue
        if d["kind"] == "generation" and u in group:
            if v in group:
                continue  # summarised by the generators' box
            key = ("gen-group", v)
            if key in drawn:
                continue
            drawn.add(key)
            lines.append(f"  {_q(u)} -> {_q(v)} [ltail=cluster_generators, color=\"#8e44ad\", arrowhead=vee, "
                         f"style=dashed, penwidth=1.6];")
            continue
        key = (u, v, d["kind"], bool(d.get("delayed")))
        if key in drawn:
            continue
        drawn.add(key)
        colour, style, head, _ = EDGE_STYLE[d["kind"]]
        attrs = [f"color={_q(colour)}", f"arrowhead={head}"]
        if d.get("delayed"):
            attrs.append("style=dashed")
        elif style != "solid":
            attrs.append(f"style={style}")
        if d["kind"] in ("backprop", "init"):
            attrs.append("constraint=false")
        if u == v:
            attrs.append('label="self"')
        lines.append(f"  {_q(u)} -> {_q(v)} [{', '.join(attrs)}];")
    out.extend(lines)
    out.append(_legend(g))
    out.append("}")
    return "\n".join(out) + "\n"


def _legend(g) -> str:
    rows = [(c, t + f" ({s if s != 'bold' else 'bold'})") for k, (c, s, _, t) in EDGE_STYLE.items()
            if any(d["kind"] == k for _, _, d in g.edges(data=True))]
    if any(d.get("delayed") for _, _, d in g.edges(data=True)):
        rows.append(("#555555", "delayed: reads the previous state (dashed)"))
    cells = "".join(f'<tr><td align="left"><font color="{c}">&#8212;&#8212; {t}</font></td></tr>' for c, t in rows)
    return (f'  legend [shape=plaintext, style="", fontsize=9, label=<<table border="1" color="#bbbbbb" '
            f'cellborder="0" cellspacing="1"><tr><td><b>flows</b></td></tr>{cells}</table>>];')


class RenderError(RuntimeError):
    pass


def renderer() -> list[str] | None:
    """The command that renders DOT: graphviz-pure beside this Python, on PATH, or a system dot."""
    here = Path(sys.executable).parent / "graphviz-pure"
    for cand in (str(here) if here.exists() else None, shutil.which("graphviz-pure"), shutil.which("dot")):
        if cand:
            return [cand]
    return None


def render(graph: LevelGraph, out: str | Path) -> Path:
    """Write the graph as .dot, .svg or .png (by suffix), atomically."""
    out = Path(out)
    return atomic_write(out, drawing(graph, out.suffix.lstrip(".").lower(), out.name))


def drawing(graph: LevelGraph, fmt: str, name: str = "the drawing") -> str | bytes:
    """The graph drawn as `dot` (text), `svg` or `png` (bytes); nothing is written."""
    dot = to_dot(graph)
    if fmt in ("dot", "gv"):
        return dot
    if fmt not in ("svg", "png"):
        raise RenderError(f"cannot draw `{name}`: use a .dot, .svg or .png file name")
    cmd = renderer()
    if cmd is None:
        raise RenderError("no Graphviz renderer found: `pip install graphviz-pure` (or install Graphviz), "
                          "or write a .dot file")
    proc = subprocess.run(cmd + [f"-T{fmt}"], input=dot.encode(), capture_output=True, timeout=120)
    if proc.returncode != 0 or not proc.stdout:
        raise RenderError(f"Graphviz failed: {proc.stderr.decode(errors='replace').strip()[:500]}")
    return proc.stdout

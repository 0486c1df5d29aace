"""The front end end to end: shipped specs, the level graph, drawing, rule derivation, the API."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import nlc
from nlc import spec as S
from nlc.graph import FLOW_KINDS, GraphError, LevelGraph
from nlc.rules import derive, explain

SPECS = Path(__file__).parent.parent / "specs"
SHIPPED = sorted(SPECS.glob("*.yaml"))
MODELS = ["linear_attention", "deltanet", "gated_deltanet", "titans", "hope", "hope_attention", "transformer"]
OPTIMIZERS = ["adamw", "muon", "m3", "m3_ema", "m3_muon", "sgd_momentum", "delta_momentum"]


def test_every_required_spec_ships():
    names = {p.stem for p in SHIPPED}
    assert set(MODELS) | set(OPTIMIZERS) <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_spec_loads_lowers_and_verifies(path):
    spec = nlc.load(path)
    assert spec.name == path.stem
    graph = nlc.lower(spec)
    graph.verify()
    assert all(d["kind"] in FLOW_KINDS for _, _, d in graph.edges())
    assert graph.dump().startswith(f"level graph `{spec.name}`")


def test_spec_is_frozen_and_strict():
    spec = nlc.load(SPECS / "titans.yaml")
    with pytest.raises(Exception):
        spec.name = "other"
    with pytest.raises(Exception):
        S.Shape(vocab=1, d_model=1, layers=1, heads=1, block=["a"], extra=1)


def test_hope_graph():
    g = nlc.lower(SPECS / "hope.yaml")
    levels = set(g.levels())
    assert {"M_k", "M_v", "M_eta", "M_alpha", "M_mem", "cms[0]", "cms[1]", "cms[2]", "adamw"} <= levels
    assert [g.node(f"cms[{i}]")["frequency"] for i in range(3)] == ["1/64", "1/512", "1/4096"]
    assert g.node("M_mem")["chunk"] == 64 and g.node("M_k")["chunk"] == 16
    kinds = {d["kind"] for _, _, d in g.edges()}
    assert {"conditioning", "backprop", "init", "generation"} <= kinds
    # self-modification: each generator reads its own previous state, through a delayed edge
    selfloops = [(u, d) for u, v, d in g.edges("generation") if u == v]
    assert {u for u, _ in selfloops} == {"M_k", "M_v", "M_eta", "M_alpha"}
    assert all(d["delayed"] for _, d in selfloops)
    assert g.node("adamw")["clock"] == "steps" and g.node("M_k")["clock"] == "tokens"


def test_attention_is_nonparametric():
    g = nlc.lower(SPECS / "hope_attention.yaml")
    assert [(u, v) for u, v, _ in g.edges("nonparametric")] == [("context", "attn")]
    assert g.node("attn")["frequency"] == "inf"
    assert not [1 for u, v, _ in g.edges("init") if v == "attn"]


def test_m3_graph_marks_the_lagged_read():
    g = nlc.lower(SPECS / "m3.yaml")
    delayed = [(u, v) for u, v, d in g.edges() if d.get("delayed")]
    assert delayed == [("matrix.M2", "matrix.update")]
    assert g.node("matrix.M2")["period"] == 16 and g.node("matrix.M2")["period_hyper"] == "slow_every"
    assert g.node("matrix.M2")["frequency"] == "1/16"


def test_verify_rejects_an_undelayed_cycle():
    g = nlc.lower(SPECS / "titans.yaml")
    g.g.add_edge("mlp", "memory", kind="conditioning")
    with pytest.raises(GraphError, match="cycle"):
        g.verify()
    g2 = LevelGraph("x", "model", g.g.copy())
    g2.g.add_edge("mlp", "memory", kind="teleport")
    with pytest.raises(GraphError, match="unknown kind"):
        g2.verify()


def test_draw_dot_svg_png(tmp_path):
    from nlc.viz import render, to_dot
    g = nlc.lower(SPECS / "hope.yaml")
    dot = to_dot(g)
    for needle in ("cluster_tokens", "cluster_steps", "cluster_static", "style=dashed", "every 4096 tokens",
                   "lhead=cluster_tokens", "cluster_generators"):
        assert needle in dot, needle
    for suffix, magic in ((".dot", b"digraph"), (".svg", b"<svg"), (".png", b"\x89PNG")):
        out = render(g, tmp_path / f"hope{suffix}")
        assert magic in out.read_bytes()[:400]
    assert (tmp_path / "hope.svg").read_bytes() == render(g, tmp_path / "again.svg").read_bytes()  # deterministic


# ---------------------------------------------------------------- derivation against the chain, executed

def _run_chain(chain, M, k, v, c, a1, a2, b2, loss):
    """Execute a matrix level's chain literally on one token (M is V x K, k unit-norm)."""
    P = a1 * M                                   # state primitives before `grad`
    g = np.outer(P @ k - v, k) if loss == "l2" else -np.outer(v, k)
    u = c * g
    Q = a2 * P - b2 * P @ np.outer(k, k)         # retain(a2) |> dgd(k, b2): erase from the state before
    return Q - u


@pytest.mark.parametrize("loss", ["l2", "dot"])
def test_generalized_delta_triple_equals_the_chain(loss, tmp_path):
    rng = np.random.default_rng(0)
    text = (SPECS / "gated_deltanet.yaml").read_text().replace(
        "rule: retain(alpha) |> grad |> scale(beta)", "rule: retain(alpha) |> grad |> scale(beta) |> retain(gamma) |> dgd(key=key, lr=delta)"
    ).replace("  beta:  gate(x)", "  beta:  gate(x)\n  gamma: gate(x)\n  delta: gate(x)").replace("objective: l2", f"objective: {loss}")
    p = tmp_path / "g.yaml"
    p.write_text(text)
    d = derive(nlc.load(p))["memory"]
    assert d.family == "generalized_delta"
    for _ in range(5):
        K, V = 5, 3
        M, v = rng.standard_normal((V, K)), rng.standard_normal(V)
        k = rng.standard_normal(K)
        k /= np.linalg.norm(k)
        env = dict(zip(["alpha", "beta", "gamma", "delta"], rng.uniform(0.1, 0.9, 4)))
        env["value"] = v
        ev = lambda e: eval(str(e).replace("^", "**"), {}, env)  # noqa: E731 (test-only evaluation of a derived expression)
        a, b, w = ev(d.a), ev(d.b), ev(d.w)
        got = M @ (a * np.eye(K) - b * np.outer(k, k)) + np.outer(w, k)
        want = _run_chain(None, M, k, v, env["beta"], env["alpha"], env["gamma"], env["delta"], loss)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_shipped_matrix_rules():
    for name, (a, b, w) in {"linear_attention": ("1", "0", "value"), "deltanet": ("1", "beta", "beta * value"),
                            "gated_deltanet": ("alpha", "alpha * beta", "beta * value")}.items():
        d = derive(nlc.load(SPECS / f"{name}.yaml"))["memory"]
        assert (str(d.a), str(d.b), str(d.w)) == (a, b, w), name


def test_explain_hope_is_eq96():
    text = explain(nlc.load(SPECS / "hope.yaml"))
    assert r"M_t = M_{t-1}\left(\alpha_t\, I - \eta_t\, k_t k_t^\top\right) - \eta_t\, \nabla \mathcal{L}(M_{\xi})" in text
    assert "S_t" not in text
    assert r"\tfrac12 \left\| M(k_t) - M(v_t) \right\|^2" in text
    assert "## `cms`" in text and "once per chunk" in text
    opt = explain(nlc.load(SPECS / "m3.yaml"))
    assert "newton" in opt and "prev" in opt


def test_import_nlc_does_not_import_torch():
    import subprocess
    import sys
    code = ("import sys, nlc; s = nlc.load('specs/hope.yaml'); nlc.lower(s); "
            "from nlc.rules import explain; explain(s); from nlc.viz import to_dot; to_dot(nlc.lower(s)); "
            "import nlc.check, nlc.schema; "
            "assert 'torch' not in sys.modules and 'triton' not in sys.modules, 'core imported torch'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=SPECS.parent)


def test_core_sources_never_import_torch_or_triton():
    import ast
    for path in (SPECS.parent / "nlc").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for n in names:
                assert n.split(".")[0] not in ("torch", "triton"), f"{path} imports {n}"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_canonical_dump_round_trips(path, tmp_path):
    spec = nlc.load(path)
    out = tmp_path / path.name
    out.write_text(S.dump(spec))
    assert nlc.load(out) == spec


def test_the_spec_language_readme_shows_the_shipped_titans():
    """specs/README.md's worked example is specs/titans.yaml and .nl without their header comment,
    so a reader who copies it gets the shipped model (it had drifted from the file once)."""
    readme = (SPECS / "README.md").read_text()
    for ext, fence in (("yaml", "```yaml\n"), ("nl", "```\n")):
        body = "\n".join(ln for ln in (SPECS / f"titans.{ext}").read_text().splitlines() if not ln.startswith("#"))
        assert fence + body.strip("\n") + "\n```" in readme, f"titans.{ext}"

"""What the language says and how it is checked: repeated levels, erase keys, per-channel rates,
warnings, and messages that point the user the right way."""
from __future__ import annotations

import textwrap

import pytest
import torch

import nlc
from nlc.backends.torch.codegen import build, generate
from nlc.diagnostics import SpecError
from nlc.loader import load_located
from nlc.rules import explain

HYBRID = textwrap.dedent("""\
    nlc: 1
    name: hybrid
    model: {vocab: 50, d_model: 32, layers: 1, heads: 2, block: [gdn, mlp, gdn, mlp, swa, mlp]}
    signals:
      alpha: sigmoid(rate(x) + 4)
      beta:  gate(x)
    levels:
      gdn:
        memory: matrix
        key: l2norm(silu(conv(proj(x), 4)))
        value: silu(conv(proj(x), 4))
        query: l2norm(silu(conv(proj(x), 4)))
        rule: retain(alpha) |> grad |> scale(beta)
        chunk: 8
      swa:
        memory: {kind: attention, window: 8}
        key: proj(x)
        value: proj(x)
        query: proj(x)
      mlp:
        memory: {kind: mlp, depth: 2, expansion: 4, activation: gelu, residual: false}
        every: never
""")


def write(tmp_path, text, name="spec.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def errors_of(tmp_path, text) -> SpecError:
    with pytest.raises(SpecError) as info:
        load_located(write(tmp_path, text))
    return info.value


def test_each_occurrence_of_a_repeated_level_is_its_own_instance(tmp_path):
    """`block: [gdn, mlp, gdn, mlp, swa, mlp]`: every occurrence has its own parameters and state,
    so a sequence fed in two pieces equals the sequence fed whole, and the build writes the graph."""
    torch.manual_seed(0)
    model = nlc.compile(nlc.load(write(tmp_path, HYBRID))).double()
    names = {n.split(".")[0] for n, _ in model.blocks[0].named_parameters()}
    assert {"gdn_S0", "gdn__2_S0", "mlp_mlp", "mlp__2_mlp", "mlp__3_mlp"} <= names
    ids = torch.randint(0, 50, (2, 21))
    with torch.no_grad():
        whole, st = model(ids)
        a, s1 = model(ids[:, :8])
        b, s2 = model(ids[:, 8:], s1)
    assert {"0.gdn.S", "0.gdn__2.S"} <= set(st)
    torch.testing.assert_close(torch.cat([a, b], 1), whole, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s2["0.gdn__2.S"], st["0.gdn__2.S"], rtol=1e-10, atol=1e-10)
    assert not torch.allclose(st["0.gdn.S"], st["0.gdn__2.S"])     # two states, not one
    files = build(write(tmp_path, HYBRID), tmp_path / "out")
    assert {f.name for f in files} >= {"model.py", "manifest.json"}


def test_a_failing_build_writes_nothing(tmp_path):
    bad = HYBRID.replace("rule: retain(alpha)", "rule: retain(alhpa)")
    with pytest.raises(SpecError):
        build(write(tmp_path, bad), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    unsupported = HYBRID.replace("memory: matrix", "memory: {kind: mlp, depth: 2}").replace(
        "retain(alpha) |> grad |> scale(beta)", "grad |> scale(beta) |> retain(sigmoid(proj(x)))")
    with pytest.raises(SpecError) as info:
        build(write(tmp_path, unsupported), tmp_path / "out")
    d = info.value.diagnostics[0]
    assert d.code == "E601" and d.span.line == 13 and "per key channel" in d.message
    assert not (tmp_path / "out").exists()


def test_names_with_a_double_underscore_are_reserved(tmp_path):
    err = errors_of(tmp_path, HYBRID.replace("  beta:  gate(x)", "  beta__2:  gate(x)"))
    assert "E206" in err.codes and "reserved" in str(err)


def rwkv_like(rule: str, objective: str = "dot") -> str:
    return HYBRID.replace("block: [gdn, mlp, gdn, mlp, swa, mlp]", "block: [gdn, mlp]").replace(
        "    rule: retain(alpha) |> grad |> scale(beta)\n",
        f"    objective: {objective}\n    rule: {rule}\n").replace(
        "  beta:  gate(x)\n", "  beta:  gate(x)\n  kappa: l2norm(proj(x))\n  w: exp(-softplus(proj(x)))\n"
        "  lr: sigmoid(proj(x))\n")


def test_dgd_erases_along_its_own_key(tmp_path):
    """`dgd(key=K)` erases along K and writes along the level's key: the generated code computes K,
    and a model with K = the key differs from one with another K. With the L2 objective (whose
    gradient erases along the key) a second erase key is refused."""
    p = write(tmp_path, rwkv_like("grad |> retain(w) |> dgd(key=kappa, lr=lr)"))
    src = generate(nlc.load(p))
    assert "sig_kappa" in src and "erase=" in src
    text = explain(nlc.load(p))
    assert r"\bar e_t = \kappa_t" in text and r"\bar u_t = lr_t\,\kappa_t" in text
    err = errors_of(tmp_path, rwkv_like("retain(w) |> grad |> dgd(key=kappa, lr=lr)", "l2"))
    assert err.codes == ["E305"] and "two rank-one erases" in str(err)


def test_vector_arguments_only_where_they_mean_something(tmp_path):
    err = errors_of(tmp_path, rwkv_like("grad |> scale(proj(x))"))
    assert err.codes == ["E301"] and "only `retain` and `dgd`'s lr take a vector" in str(err)


def test_a_step_that_expands_the_memory_is_warned(tmp_path):
    loaded = load_located(write(tmp_path, HYBRID.replace("retain(alpha) |> grad |> scale(beta)", "grad |> scale(5)")))
    assert [w.code for w in loaded.warnings] == ["E501"] and "a - b = -4" in loaded.warnings[0].message
    loaded = load_located(write(tmp_path, HYBRID.replace("retain(alpha) |> grad |> scale(beta)", "grad |> scale(1.5)")))
    assert loaded.warnings == []


def test_a_comma_in_a_flow_mapping_gets_a_quoting_hint(tmp_path):
    swa = "  swa:\n    memory: {kind: attention, window: 8}\n    key: proj(x)\n    value: proj(x)\n    query: proj(x)\n"
    assert swa in HYBRID
    flow = "  swa: {memory: attention, key: conv(proj(x), 4), value: proj(x), query: proj(x)}\n"
    err = errors_of(tmp_path, HYBRID.replace(swa, flow))
    assert err.codes == ["E007"], str(err)       # and no "unknown key `4)`"
    assert "quote it" in err.diagnostics[0].hint


def test_E104_names_the_key_the_user_wrote(tmp_path):
    err = errors_of(tmp_path, HYBRID.replace("    chunk: 8\n", "    chunk: 8\n    every: 0 tokens\n"))
    assert "`levels.gdn.every` must be positive" in str(err) and "period" not in str(err)


def test_E201_does_not_suggest_the_signal_being_defined(tmp_path):
    err = errors_of(tmp_path, HYBRID.replace("  beta:  gate(x)", "  beta:  gate(x) * betta"))
    assert "`betta` is not defined" in str(err)
    assert "`beta`" not in (err.diagnostics[0].hint or "")


def test_explain_uses_names_that_cannot_collide():
    """The derived triple is written with bars (a signal may be called `a` or `w`); an optimizer's
    hyperparameters carry no time index; the MLP memory's residual is shown at every depth."""
    text = explain(nlc.load("specs/gated_deltanet.yaml"))
    assert r"\bar a_t = \alpha_t" in text
    opt = explain(nlc.load("specs/adamw.yaml"))
    assert r"\mathrm{weight\_decay}" in opt and "lr_t" not in opt and "weight_{" not in opt

"""Shipped models on the Triton backend: logits, states and every parameter gradient equal the
torch backend's (float64, under the interpreter on CPU); `nlc build --backend triton` writes each
served level's kernels (golden) and says where every other level runs and why."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import nlc
from nlc.backends.torch.codegen import build
from nlc.backends.triton import template
from nlc.backends.triton.plan import flow_chains, flow_kernel, plan

from .test_compile import COMPILED, GOLDEN, ROOT, small

SERVED = [n for n in COMPILED
          if any(p.skeleton for p in plan(nlc.load(ROOT / "specs" / f"{n}.yaml")).values())]


def test_the_served_specs():
    """Every spec with a level that a skeleton serves; Hope's and TTT-MLP's 256-wide memories (one
    head) included since skeleton 2 keeps its weights in global memory."""
    assert set(SERVED) == {"linear_attention", "deltanet", "gated_deltanet", "retnet", "gdn_swa",
                           "gla", "rwkv7", "titans", "titans_linear", "hope", "hope_heads", "ttt_mlp"}


def small_triton(name, tmp_path):
    """`small`, with chunks of 16: skeleton 2's smallest tile (its chunk is semantics, not rounded)."""
    p = small(name, tmp_path)
    p.write_text(p.read_text().replace("chunk: 8", "chunk: 16").replace("chunk: 4", "chunk: 16")
                 .replace("8, 16, 32 tokens", "16, 32 tokens"))
    return p


@pytest.mark.parametrize("name", SERVED)
def test_triton_model_equals_torch_model(name, tmp_path):
    torch.manual_seed(0)
    spec = small_triton(name, tmp_path)
    assert any(p.skeleton for p in plan(nlc.load(spec)).values())
    ref = nlc.compile(spec, backend="torch").double()
    tri = nlc.compile(spec, backend="triton").double()
    tri.load_state_dict(ref.state_dict())
    # one sequence (the interpreter's time is per program), two for a delta and a diagonal spec:
    # the kernels' batch strides are held by their own tests at B = 2, the model's here
    ids = torch.randint(0, 50, (2 if name in ("deltanet", "gla") else 1, 21))
    out = {}
    for label, model in (("torch", ref), ("triton", tri)):
        logits, state = model(ids)
        state = {k: v for k, v in state.items() if torch.is_tensor(v)}   # not CMS's pending logits
        loss = (logits * logits.detach().sin()).sum() + sum(s.square().sum() for s in state.values())
        grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True, materialize_grads=True)
        out[label] = (logits, state, grads)
    (l_r, s_r, g_r), (l_t, s_t, g_t) = out["torch"], out["triton"]
    assert (l_t - l_r).abs().max() < 1e-10
    assert s_t.keys() == s_r.keys()
    for k in s_r:
        assert (s_t[k] - s_r[k]).abs().max() < 1e-10, k
    for (pname, _), gt, gr in zip(ref.named_parameters(), g_t, g_r):
        assert (gt - gr).abs().max() <= 1e-10 * max(1.0, gr.abs().max().item()), pname


@pytest.mark.parametrize("name", COMPILED)
def test_explain_describes_every_level_on_every_backend(name):
    """plan.describe (the last section of `nlc explain`): a row per level of the placement the
    generated model follows on triton and auto, its skeleton where it has one, one line on torch."""
    from nlc.backends.triton.plan import describe
    spec = nlc.load(ROOT / "specs" / f"{name}.yaml")
    placement = plan(spec)
    for backend in ("triton", "auto"):
        rows = {ln.split("`")[1]: ln for ln in describe(spec, backend).splitlines() if ln.startswith("| `")}
        assert rows.keys() == placement.keys(), backend
        for level, p in placement.items():
            assert (f"skeleton `{p.skeleton}`" in rows[level]) == (p.skeleton is not None), rows[level]
    assert "Every level and flow runs as torch ops" in describe(spec, "torch")


def test_every_level_is_placed_and_served_levels_get_kernels(tmp_path):
    files = build(ROOT / "specs" / "gdn_swa.yaml", tmp_path / "out", backend="triton")
    names = {p.relative_to(tmp_path / "out").as_posix() for p in files}
    assert {"kernels/gdn.py", "kernels/gdn__2.py", "kernels/gdn__3.py"} <= names
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    placement = manifest["placement"]
    assert manifest["backend"] == "triton"
    assert set(placement) == {"gdn", "gdn__2", "gdn__3", "mlp", "mlp__2", "mlp__3", "mlp__4", "swa"}
    assert placement["swa"]["runs_on"] == "torch" and "attention" in placement["swa"]["why"]
    assert placement["gdn"]["flags"] == {"DECAY": True, "ERASE": True}
    text = (tmp_path / "out" / "kernels" / "gdn.py").read_text()
    assert text.startswith("# gdn: Triton kernels of level `gdn` of spec `gdn_swa`")
    assert "a = alpha, b = alpha * beta, w = beta * value" in text.splitlines()[1]
    assert text.endswith(template.body("delta_chunk", placement["gdn"]["flags"]))
    # the torch build writes no kernels and no placement
    files = build(ROOT / "specs" / "gdn_swa.yaml", tmp_path / "plain")
    assert not any("kernels" in str(p) for p in files)
    assert "placement" not in json.loads((tmp_path / "plain" / "manifest.json").read_text())


def test_levels_no_skeleton_serves_say_why(tmp_path):
    """Titans with a depth-3 memory: skeleton 2 takes depth 2, so the level runs on torch and the
    manifest and the generated model say why."""
    text = (ROOT / "specs" / "titans.yaml").read_text()
    old = "memory: {kind: mlp, depth: 2, expansion: 2"
    assert old in text
    spec = tmp_path / "titans_deep.yaml"
    spec.write_text(text.replace(old, "memory: {kind: mlp, depth: 3, expansion: 2"))
    build(spec, tmp_path / "deep", backend="triton")
    placement = json.loads((tmp_path / "deep" / "manifest.json").read_text())["placement"]
    assert placement["memory"]["runs_on"] == "torch" and "depth 3" in placement["memory"]["why"]
    assert "backend='torch'" in (tmp_path / "deep" / "model.py").read_text()


def test_dplr_levels_run_skeleton_1d_up_to_128_wide_heads(tmp_path):
    """RWKV-7's time mix (K = 64) gets the DPLR kernels; with one 256-wide head its [K, K] state
    transition is over the kernels' tile, and the build says so and passes backend='torch'."""
    build(ROOT / "specs" / "rwkv7.yaml", tmp_path / "a", backend="triton")
    placement = json.loads((tmp_path / "a" / "manifest.json").read_text())["placement"]
    assert placement["time_mix"]["skeleton"] == "dplr_chunk"
    text = (ROOT / "specs" / "rwkv7.yaml").read_text().replace("heads: 4", "heads: 1")
    assert "heads: 1" in text
    (tmp_path / "wide.yaml").write_text(text)
    build(tmp_path / "wide.yaml", tmp_path / "b", backend="triton")
    placement = json.loads((tmp_path / "b" / "manifest.json").read_text())["placement"]
    assert placement["time_mix"]["runs_on"] == "torch" and "up to 128" in placement["time_mix"]["why"]
    assert "backend='torch'" in (tmp_path / "b" / "model.py").read_text()


def test_delta_levels_run_skeleton_1_up_to_128_wide_heads(tmp_path):
    """DeltaNet with one 256-wide head: the delta kernels' state passes would not fit an H100
    (plan.DELTA_MAX_K), so the level runs on torch and the build says why; GLA's per-channel
    retention (skeleton 1b tiles K) keeps its kernel at that width."""
    for name, served in (("deltanet", None), ("gla", "diag_chunk")):
        text = (ROOT / "specs" / f"{name}.yaml").read_text().replace("heads: 4", "heads: 1")
        assert "heads: 1" in text
        (tmp_path / f"{name}.yaml").write_text(text)
        build(tmp_path / f"{name}.yaml", tmp_path / name, backend="triton")
        p = json.loads((tmp_path / name / "manifest.json").read_text())["placement"]["memory"]
        assert p.get("skeleton") == served, p
        if served is None:
            assert "skeleton 1 (the delta kernels) takes head sizes up to 128" in p["why"], p


def test_momentum_levels_run_skeleton_1c_up_to_its_tile(tmp_path):
    """titans_linear's memory (K = 64, chunk 64) gets the momentum kernels; with 128-wide heads and
    chunk 64 too (plan.MOMENTUM_TILE); with one 256-wide head the tiles would not fit an H100, and
    the build says so and passes backend='torch'."""
    text = (ROOT / "specs" / "titans_linear.yaml").read_text()
    for heads, served in (("4", True), ("2", True), ("1", False)):
        wide = text.replace("heads: 4", f"heads: {heads}")
        assert f"heads: {heads}" in wide
        (tmp_path / f"h{heads}.yaml").write_text(wide)
        build(tmp_path / f"h{heads}.yaml", tmp_path / heads, backend="triton")
        p = json.loads((tmp_path / heads / "manifest.json").read_text())["placement"]["memory"]
        assert (p["runs_on"] == "triton") == served, p
        if not served:
            assert "chunk x head size up to 8192" in p["why"] and "64 x 256" in p["why"], p


VARIANTS = sorted({(p.skeleton, tuple(sorted(p.flags.items()))) for n in SERVED
                   for p in plan(nlc.load(ROOT / "specs" / f"{n}.yaml")).values() if p.skeleton})


def _tag(flags):
    return "_".join(k for k, v in flags if v) or "plain"


def _assert_golden(text: str, name: str):
    """``text`` equals tests/golden/triton/NAME.py.txt (written instead with NLC_REGEN_GOLDEN=1)."""
    golden = GOLDEN / "triton" / f"{name}.py.txt"
    if os.environ.get("NLC_REGEN_GOLDEN"):
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(text)
    assert golden.exists(), f"no golden file: run NLC_REGEN_GOLDEN=1 pytest {__file__}"
    assert text == golden.read_text(), "generated kernel changed: review the diff, then NLC_REGEN_GOLDEN=1"


@pytest.mark.parametrize("skeleton,flags", VARIANTS, ids=[f"{s}-{_tag(f)}" for s, f in VARIANTS])
def test_generated_kernels_match_golden(skeleton, flags):
    _assert_golden(template.body(skeleton, dict(flags)), f"{skeleton}_{_tag(flags)}")


FLOW_CHAINS = sorted({c for n in COMPILED for c in flow_chains(nlc.load(ROOT / "specs" / f"{n}.yaml"))})


@pytest.mark.parametrize("width,ops", FLOW_CHAINS, ids=[flow_kernel(w, o)[0] for w, o in FLOW_CHAINS])
def test_generated_flow_kernels_match_golden(width, ops):
    name, flags, code = flow_kernel(width, ops)
    _assert_golden(template.body("flow_prologue", flags, code), f"flow_{name}")


def test_build_writes_the_fused_flows_kernels(tmp_path):
    """gated DeltaNet's three fused flows run two kernels (key and query share a chain); the build
    writes each once, its header naming its flows and the hash of the module that runs."""
    from typer.testing import CliRunner

    from nlc.backends.triton.prologue import kernels
    from nlc.runtime.cli import app
    r = CliRunner().invoke(app, ["build", str(ROOT / "specs" / "gated_deltanet.yaml"), "-o", str(tmp_path / "g"),
                                 "--backend", "triton"])
    assert r.exit_code == 0, r.output
    assert ("flow memory.key, memory.query: conv(., 4) |> silu |> l2norm, Triton, skeleton flow_prologue -> "
            "kernels/flows/conv4_silu_l2norm.py") in r.output
    fused = json.loads((tmp_path / "g" / "manifest.json").read_text())["fused_flows"]
    assert sorted(fused) == ["conv4_silu", "conv4_silu_l2norm"]
    assert fused["conv4_silu"]["flows"] == ["memory.value"]
    text = (tmp_path / "g" / "kernels" / "flows" / "conv4_silu_l2norm.py").read_text()
    assert text.startswith("# flows/conv4_silu_l2norm: the Triton kernel of the fused flows `memory.key`, `memory.query`")
    sha = fused["conv4_silu_l2norm"]["sha256_16"]
    assert f"body sha256[:16]: {sha}" in text
    assert kernels(True, ("silu", "l2norm"), True).__file__.endswith(f"flow_prologue_{sha}.py")   # what runs
    assert "z2 = z1 * tl.rsqrt(tl.sum(z1 * z1, 1) + 1e-6)[:, None]" in text
    r = CliRunner().invoke(app, ["build", str(ROOT / "specs" / "titans.yaml"), "-o", str(tmp_path / "t"),
                                 "--backend", "auto"])
    assert r.exit_code == 0 and "(on CUDA tensors)" in r.output, r.output


def test_cli_build_triton_reports_placement(tmp_path):
    from typer.testing import CliRunner

    from nlc.runtime.cli import app
    r = CliRunner().invoke(app, ["build", str(ROOT / "specs" / "retnet.yaml"), "-o", str(tmp_path / "r"),
                                 "--backend", "triton"])
    assert r.exit_code == 0, r.output
    assert "level retention: Triton, skeleton delta_chunk -> kernels/retention.py" in r.output
    assert "level mlp: torch (" in r.output
    r = CliRunner().invoke(app, ["build", str(ROOT / "specs" / "retnet.yaml"), "-o", str(tmp_path / "x"),
                                 "--backend", "cuda"])
    assert r.exit_code == 2 and "--backend must be one of" in r.output
    assert not Path(tmp_path / "x").exists()
    # auto says where the deep-memory kernel runs: training included, at Titans' 64-wide heads and
    # at Hope's one 256-wide head (whose backward kernel takes it in slices)
    for spec, level in (("titans", "memory"), ("hope", "M_mem")):
        r = CliRunner().invoke(app, ["build", str(ROOT / "specs" / f"{spec}.yaml"), "-o", str(tmp_path / spec),
                                     "--backend", "auto"])
        assert r.exit_code == 0, r.output
        line = next(ln for ln in r.output.splitlines() if ln.startswith(f"level {level}:"))
        assert "skeleton mlp_chunk" in line and "training included" in line, line

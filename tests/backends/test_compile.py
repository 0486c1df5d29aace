"""Compiled models: generated source (golden), chunk == recurrent, carried state, build == compile."""
from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import pytest
import torch

import nlc
from nlc.backends.torch.codegen import Unsupported, build, generate

ROOT = Path(__file__).parent.parent.parent
GOLDEN = ROOT / "tests" / "golden"
COMPILED = ["transformer", "linear_attention", "deltanet", "gated_deltanet", "titans", "titans_linear",
            "hope_attention", "hope", "hope_heads", "gla", "retnet", "rwkv7", "ttt_mlp", "gdn_swa"]


def small(name: str, tmp_path: Path) -> Path:
    """The shipped spec shrunk to test size (2 layers, d_model 32, at most 2 heads, vocab 50, chunks 4 and 8)."""
    text = (ROOT / "specs" / f"{name}.yaml").read_text()
    text = re.sub(r"vocab: 256, d_model: 256, layers: (\d+), heads: (\d+)",
                  lambda m: f"vocab: 50, d_model: 32, layers: {min(int(m[1]), 2)}, heads: {min(int(m[2]), 2)}", text)
    text = text.replace("chunk: 64", "chunk: 8").replace("chunk: 16", "chunk: 4")
    text = text.replace("64, 512, 4096 tokens", "8, 16, 32 tokens")
    p = tmp_path / f"{name}.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("name", COMPILED)
def test_generated_source_matches_golden(name):
    source = generate(nlc.load(ROOT / "specs" / f"{name}.yaml"), f"{name}.yaml")
    golden = GOLDEN / f"{name}.py.txt"
    if os.environ.get("NLC_REGEN_GOLDEN"):
        golden.write_text(source)
    assert golden.exists(), f"no golden file: run NLC_REGEN_GOLDEN=1 pytest {__file__}"
    assert source == golden.read_text(), "generated source changed: review the diff, then NLC_REGEN_GOLDEN=1"


@pytest.mark.parametrize("name", COMPILED)
def test_chunk_equals_recurrent_and_state_carries(name, tmp_path):
    check_chunk_recurrent_and_state(small(name, tmp_path))


@pytest.mark.parametrize("old, new", [("read: current", "read: anchor"),
                                      ("    init: meta\n", "    init: meta\n    gate: silu(proj(x))\n"),
                                      ("    init: meta\n", "    init: meta\n    gate: gate(x)\n")])
def test_level_options_compile_exactly(old, new, tmp_path):
    """Titans' memory read at its anchor instead of the current state, or gated: chunk ==
    recurrent, the state carries, and the option changes the output."""
    p = small("titans", tmp_path)
    text = p.read_text()
    assert old in text
    p.write_text(text.replace(old, new, 1))
    model = check_chunk_recurrent_and_state(p)
    plain = nlc.compile(small("titans", tmp_path)).double()    # the shipped spec
    plain.load_state_dict(model.state_dict(), strict=False)
    ids = torch.randint(0, 50, (2, 29))
    assert (plain(ids)[0] - model(ids)[0]).abs().max() > 1e-6


def check_chunk_recurrent_and_state(spec_path):
    torch.manual_seed(0)
    model = nlc.compile(spec_path).double()
    for p in model.parameters():  # learned initial states start at zero: make them count
        if p.dim() == 3:
            torch.nn.init.normal_(p, std=0.1)
    ids = torch.randint(0, 50, (2, 29))
    logits, state = model(ids)
    assert logits.shape == (2, 29, 50) and torch.isfinite(logits).all()
    first, carried = model(ids[:, :16])  # a multiple of every chunk and CMS window
    second, carried = model(ids[:, 16:], carried)
    torch.testing.assert_close(torch.cat([first, second], 1), logits, rtol=1e-10, atol=1e-10)
    for key in state:
        if key == "cms.pending":  # the last token's logits, waiting for their target
            torch.testing.assert_close(carried[key].logits, state[key].logits, rtol=1e-10, atol=1e-10)
        else:
            torch.testing.assert_close(carried[key], state[key], rtol=1e-10, atol=1e-10)
    model.mode = "recurrent"
    rec, rec_state = model(ids)
    torch.testing.assert_close(rec, logits, rtol=1e-10, atol=1e-10)
    # gradients of every parameter agree between the chunked and the recurrent forms
    model.mode = "chunk"
    g_chunk = torch.autograd.grad(model(ids)[0].square().mean(), list(model.parameters()), allow_unused=True)
    model.mode = "recurrent"
    g_rec = torch.autograd.grad(model(ids)[0].square().mean(), list(model.parameters()), allow_unused=True)
    for (n, _), a, b in zip(model.named_parameters(), g_chunk, g_rec):
        assert a is not None, f"{n} gets no gradient"
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=n)
    model.mode = "chunk"
    return model


@pytest.mark.parametrize("name", ["deltanet", "transformer"])
def test_build_is_deterministic_and_agrees_with_compile(name, tmp_path):
    spec = small(name, tmp_path)
    a, b = tmp_path / "a", tmp_path / "b"
    build(spec, a)
    build(spec, b)
    for f in ("model.py", "manifest.json", "graph.svg"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    mod_spec = importlib.util.spec_from_file_location(f"built_{name}", a / "model.py")
    built = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(built)
    torch.manual_seed(1)
    compiled = nlc.compile(spec).double()
    imported = built.Model().double()
    imported.load_state_dict(compiled.state_dict())
    ids = torch.randint(0, 50, (1, 13))
    torch.testing.assert_close(imported(ids)[0], compiled(ids)[0], rtol=0, atol=0)


def test_unsupported_constructs_are_refused_clearly(tmp_path):
    text = (ROOT / "specs" / "titans.yaml").read_text().replace("momentum(beta)", "ema(beta)")
    p = tmp_path / "ema.yaml"
    p.write_text(text)
    with pytest.raises(Unsupported, match="an `ema` momentum is not supported by the torch backend yet"):
        generate(nlc.load(p))


def test_a_momentum_memory_without_retention_trains(tmp_path):
    """A matrix memory whose rule has momentum but no `retain` (alpha absent: 1); it checked,
    generated and then failed at its first call until momentum_memory took alpha=None."""
    p = small("titans_linear", tmp_path)
    p.write_text(p.read_text().replace(" |> retain(alpha)", ""))
    model = nlc.compile(p)
    logits, _ = model(torch.randint(0, 50, (2, 19)))
    logits.square().mean().backward()
    assert torch.isfinite(logits).all() and model.blocks[0].memory_M0.grad.abs().max() > 0


def cms_transcription(model, ids, levels):
    """Eq. 71 written out per sequence and per next-token pair: the model runs window by window (the
    fastest period; the state carried into a window is held constant in the inner gradient); the
    pair (t-1, t) is counted when its target t arrives, with the gradient of its cross-entropy
    taken at the fast weights of the window that predicted it; level l applies -lr * (its sum) when
    a chunk of C_l tokens ends. Returns the logits and, per level key, the deltas."""
    window = min(period for period, _ in levels.values())
    B, T = ids.shape
    outs, finals = [], []
    for b in range(B):
        seq = ids[b:b + 1]
        deltas = {f"{i}.{n}": [torch.zeros(1, *l.weight.shape, dtype=l.weight.dtype) for l in getattr(blk, f"{n}_mlp").layers]
                  for i, blk in enumerate(model.blocks) for n in levels}
        acc = {k: [torch.zeros_like(d) for d in v] for k, v in deltas.items()}
        carried, logits_of, fast_of, seq_out = {}, {}, {}, []
        for s in range(0, T, window):
            fast = {k: [d.clone().requires_grad_() for d in v] for k, v in deltas.items()}
            logits, new = model.run(seq[:, s:s + window], {k: v.detach() for k, v in carried.items()}, fast)
            carried.update(new)
            seq_out.append(logits.detach())
            for t in range(s, min(T, s + window)):
                logits_of[t], fast_of[t] = logits[:, t - s], fast
            for t in range(max(s, 1), min(T, s + window)):      # the pairs whose target arrives here
                loss = torch.nn.functional.cross_entropy(logits_of[t - 1], seq[:, t], reduction="sum")
                for k, v in fast_of[t - 1].items():
                    for j, g in enumerate(torch.autograd.grad(loss, v, retain_graph=True)):
                        acc[k][j] = acc[k][j] + g
            for k in deltas:
                period, lr = levels[k.split(".")[1]]
                if min(T, s + window) % period == 0:
                    deltas[k] = [d - lr * a for d, a in zip(deltas[k], acc[k])]
                    acc[k] = [torch.zeros_like(a) for a in acc[k]]
        outs.append(torch.cat(seq_out, 1))
        finals.append(deltas)
    return torch.cat(outs), {k: [torch.cat([f[k][j] for f in finals]) for j in range(len(finals[0][k]))]
                             for k in finals[0]}


@pytest.mark.parametrize("periods", [(8, 16, 32), (1, 2, 4)])
def test_cms_updates_follow_the_rule(periods, tmp_path):
    """CMS (Eq. 71, first order): each sequence's delta changes only when its level's chunk ends,
    by -lr times the sum over the chunk of the gradients of every next-token pair, those that
    cross a window boundary included; with a fastest period of 1, every token updates."""
    p = small("hope_attention", tmp_path)
    p.write_text(p.read_text().replace("8, 16, 32 tokens", ", ".join(map(str, periods)) + " tokens"))
    torch.manual_seed(3)
    model = nlc.compile(p).double()
    T = 32 if periods[0] > 1 else 9
    ids = torch.randint(0, 50, (2, T))
    logits, state = model(ids)
    levels = {f"cms{i}": (c, 0.01) for i, c in enumerate(periods)}
    ref_logits, ref = cms_transcription(model, ids, levels)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-10, atol=1e-10)
    for k, v in ref.items():
        for j, d in enumerate(v):
            torch.testing.assert_close(state[f"{k}.delta{j}"], d, rtol=1e-10, atol=1e-12, msg=f"{k}.delta{j}")
    assert state["0.cms0.delta0"].abs().sum() > 0 and state["0.cms2.delta0"].abs().sum() > 0


@pytest.mark.parametrize("name", COMPILED)
def test_a_sequence_is_its_own_context(name, tmp_path):
    """In-context state belongs to one sequence: its logits and carried state are the same alone
    and inside a batch of others."""
    torch.manual_seed(4)
    model = nlc.compile(small(name, tmp_path)).double()
    ids = torch.randint(0, 50, (3, 21))
    logits, state = model(ids)
    alone, own = model(ids[1:2])
    torch.testing.assert_close(alone, logits[1:2], rtol=1e-10, atol=1e-10)
    for key, value in own.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            torch.testing.assert_close(value, state[key][1:2], rtol=1e-10, atol=1e-10, msg=key)


@pytest.mark.parametrize("memory", ["attention", "{kind: attention, window: 5}", "{kind: attention, rope: false}"])
def test_attention_state_carries_with_window_and_positions(memory, tmp_path):
    """The KV cache (and RoPE's position count) carried across calls: three pieces equal the whole."""
    p = small("transformer", tmp_path)
    p.write_text(p.read_text().replace("memory: attention", f"memory: {memory}"))
    torch.manual_seed(2)
    model = nlc.compile(p).double()
    ids = torch.randint(0, 50, (2, 23))
    whole, _ = model(ids)
    a, s = model(ids[:, :7])
    b, s = model(ids[:, 7:9], s)
    c, s = model(ids[:, 9:], s)
    torch.testing.assert_close(torch.cat([a, b, c], 1), whole, rtol=1e-10, atol=1e-10)
    if "rope: false" not in memory:  # the rotation matters: without it the same weights give other outputs
        q = tmp_path / "norope.yaml"
        q.write_text(p.read_text().replace(f"memory: {memory}", "memory: {kind: attention, rope: false}"))
        plain = nlc.compile(q).double()
        plain.load_state_dict(model.state_dict())
        assert (plain(ids)[0] - whole).abs().max() > 1e-6

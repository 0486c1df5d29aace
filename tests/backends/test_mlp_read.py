"""`mlp_memory(read="current")`: token t reads the weights after the earlier tokens of its chunk.

Same style as ``test_memories.py`` (float64, seeded random inputs, relative max errors): the
chunked form (masked matmuls) == the token loop == the paper's rule transcribed token by token,
outputs, states and the gradients of every input; the two reads agree at chunk 1 and differ
beyond the first token of a chunk otherwise.
"""
from __future__ import annotations

import pytest
import torch

from nlc.backends.torch import memories as mem

from .numerics import rel_err
from .test_memories import (MLP_CASES, TOL, assert_all, assert_rel, flat_state, grads_of, mlp_leaves,
                            run_mlp, transcribe_mlp)

# every MLP_CASES entry (momentum or not, erase or not, self-target or not, depth 1-3, residual or
# not, l2 and dot) and one without retention (alpha=None)
CURRENT_CASES = [*MLP_CASES, "no_retention"]


def leaves(case, T, H=2, seed=0):
    x, depth, kw = mlp_leaves("hope" if case == "no_retention" else case, T, H, seed)
    if case == "no_retention":
        x["alpha"] = None
    return x, depth, kw


def both_modes(x, depth, key, **kw):
    """mode -> (o, flat state, gradients of every leaf) for a random functional of o and the state."""
    res = {}
    for mode in mem.MODES:
        o, st = run_mlp(x, depth, mode=mode, **kw)
        res[mode] = (o, flat_state(st), grads_of((o, *flat_state(st)), x, key))
    return res


def assert_same(res_a, res_b, tol=TOL):
    (o_a, s_a, g_a), (o_b, s_b, g_b) = res_a, res_b
    assert_rel("o", o_a.detach(), o_b.detach(), tol)
    for i, (a, b) in enumerate(zip(s_a, s_b)):
        assert_rel(f"state[{i}]", a.detach(), b.detach(), tol)
    assert_all("d", g_a, g_b, tol)


@pytest.mark.parametrize("case", CURRENT_CASES)
@pytest.mark.parametrize("chunk_size", [1, 4, 5])
@pytest.mark.parametrize("T", [1, 7, 13])
def test_mlp_current_chunk_equals_recurrent(T, chunk_size, case):
    x, depth, kw = leaves(case, T)
    res = both_modes(x, depth, (case, T), chunk_size=chunk_size, read="current", **kw)
    assert_same(res["chunk"], res["recurrent"])


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("activation", list(mem.ACTIVATIONS))
def test_mlp_current_activations(activation, residual):
    x, depth, kw = leaves("titans", 9)
    kw.update(activation=activation, residual=residual)
    res = both_modes(x, depth, activation, chunk_size=4, read="current", **kw)
    assert_same(res["chunk"], res["recurrent"])


@pytest.mark.parametrize("mode", mem.MODES)
def test_mlp_current_equals_anchor_at_chunk_1(mode):
    """At chunk 1 the anchor is the state after the previous token: both reads are M_{t-1}(q_t)."""
    x, depth, kw = leaves("hope", 7)
    res = {}
    for read in mem.READS:
        o, st = run_mlp(x, depth, mode=mode, chunk_size=1, read=read, **kw)
        res[read] = (o, flat_state(st), grads_of((o, *flat_state(st)), x, "c1"))
    assert_same(res["current"], res["anchor"])


@pytest.mark.parametrize("mode", mem.MODES)
def test_mlp_current_differs_from_anchor(mode):
    """Chunk 4: the first token of each chunk (0, 4, 8) reads the anchor under both reads, every
    other token reads weights the earlier tokens changed; the weights and momenta are the same."""
    x, depth, kw = leaves("hope", 10)
    (o_c, st_c), (o_a, st_a) = (run_mlp(x, depth, mode=mode, chunk_size=4, read=r, **kw)
                                for r in ("current", "anchor"))
    for t in range(10):
        err = rel_err(o_c[:, t].detach(), o_a[:, t].detach())
        if t % 4 == 0:
            assert err <= TOL, f"token {t} (a chunk's first) differs: {err:.3e}"
        else:
            assert err > 1e-3, f"token {t}: read='current' == read='anchor' ({err:.3e})"
    for i, (a, b) in enumerate(zip(flat_state(st_c), flat_state(st_a))):
        assert torch.equal(a, b), f"state[{i}]"


@pytest.mark.parametrize("mode", mem.MODES)
@pytest.mark.parametrize("variant", ["eq96", "titans", "hope"])
@pytest.mark.parametrize("read", mem.READS)
def test_mlp_transcription_chunked(read, variant, mode):
    """The paper's rule token by token (transcribe_mlp, autograd for the inner gradient) with the
    anchor refreshed every 4 tokens, T = 11 (ragged), read at the anchor or the running weights."""
    self_target, momentum, erase = {"eq96": (True, False, True), "titans": (False, True, False),
                                    "hope": (True, True, True)}[variant]
    x, depth, kw = mlp_leaves("hope", 11, 2, seed=5)
    if not momentum:
        x = {n: t for n, t in x.items() if n not in ("S1", "S2")}
        x["beta"] = None
    if not erase:
        x["erase"] = None
    kw["self_target"] = self_target
    o, st = run_mlp(x, depth, mode=mode, chunk_size=4, read=read, **kw)
    o_ref, W_ref, S_ref = transcribe_mlp(x, self_target=self_target, momentum=momentum, erase=erase,
                                         chunk=4, read=read)
    assert_rel("o", o.detach(), o_ref.detach(), 1e-12)
    for i in range(2):
        assert_rel(f"W{i + 1}", st.weights[i].detach(), W_ref[i].detach(), 1e-12)
        if momentum:
            assert_rel(f"S{i + 1}", st.momenta[i].detach(), S_ref[i].detach(), 1e-12)
    assert_all("d", grads_of((o, *st.weights), x, variant), grads_of((o_ref, *W_ref), x, variant), 1e-11)

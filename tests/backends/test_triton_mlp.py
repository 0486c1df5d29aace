"""Skeleton 2 (``nlc.backends.triton.deep``): the deep-memory chunk on Triton == the torch reference.

Run under Triton's interpreter (tests/conftest.py sets ``TRITON_INTERPRET=1``): float64 throughout,
so the kernel is held to the torch chunk code (``mlp_memory(mode="chunk")``) at 1e-9, and to the
token loop (``mode="recurrent"``) for the shipped specs. The Triton core is reached the way the
torch backend will dispatch to it: ``mlp_memory``'s chunk core replaced by ``chunk_mlp_memory``,
so validation and casting are the torch backend's. Compared: outputs, final weights and momenta,
and the gradients of every input (q, k, v, eta, beta, alpha, erase, initial weights and momenta)
for a random linear functional of all of them. Shapes are tiny and odd (T not a multiple of the
chunk, hidden != D, d_out != D without the residual), inputs random, never zeros.

``NLC_TEST_DEVICE=cuda`` runs the same tests on a GPU, compiled, plus one at full tile sizes.
"""
from __future__ import annotations

import os
import zlib
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from nlc.backends.torch import deep_memory as dm
from nlc.backends.triton import deep

from .numerics import assert_rel
from .spy import launches

TOL64 = 1e-9
DEVICE = os.environ.get("NLC_TEST_DEVICE", "cpu")

# name -> mlp_memory keywords and which inputs exist: the shipped specs' calls (codegen), then
# the flags one by one. "mom": beta and initial momenta; "erase": the DGD erase; "shared": the
# initial weights [H, d_out, d_in] shared by the batch; "d_out": W1's output size (None: D).
SPECS = {
    "titans": dict(mom=True, erase=False, self_target=False, activation="silu", residual=True,
                   read="current"),
    "hope_memory": dict(mom=False, erase=True, self_target=True, activation="silu", residual=True,
                        read="current"),
    "hope_generator": dict(mom=False, erase=True, self_target=True, activation="silu", residual=True,
                           read="anchor"),
    "hope_generator_nores": dict(mom=False, erase=True, self_target=True, activation="silu",
                                 residual=False, read="anchor"),
    "ttt_mlp": dict(mom=False, erase=False, self_target=False, activation="gelu", residual=True,
                    read="current", alpha=False),
}
FLAGS = {
    "all_on": dict(mom=True, erase=True, self_target=True, activation="gelu", residual=True,
                   read="current", shared=True),
    "mom_erase_anchor": dict(mom=True, erase=True, self_target=False, activation="silu",
                             residual=True, read="anchor"),
    "plain_anchor": dict(mom=False, erase=False, self_target=False, activation="silu",
                         residual=True, read="anchor", shared=True),
    "nores_dout": dict(mom=True, erase=True, self_target=False, activation="silu", residual=False,
                       read="current", d_out=24),
    "dot_objective": dict(mom=True, erase=True, self_target=True, activation="silu", residual=True,
                          read="current", objective="dot"),
    "detach_target": dict(mom=False, erase=True, self_target=True, activation="gelu",
                          residual=False, read="current", detach_target=True),
    # without the erase and the self-generated target: the rest of the backward's combinations
    "bwd_dot_anchor": dict(mom=True, erase=False, self_target=False, activation="gelu", residual=False,
                           read="anchor", objective="dot", d_out=24),
    "bwd_current_plain": dict(mom=True, erase=False, self_target=False, activation="silu", residual=False,
                              read="current", d_out=24, shared=True, alpha=False),
    "bwd_dot_current": dict(mom=False, erase=False, self_target=False, activation="silu", residual=True,
                            read="current", objective="dot"),
}
CASES = {**SPECS, **FLAGS}


def _gen(*key):
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def leaves(case, B=2, T=21, H=2, D=16, hid=32, seed=0, dtype=torch.float64):
    """Random leaf tensors for one case (None where the case has no such input)."""
    c = CASES[case]
    g = _gen(case, B, T, H, D, hid, seed)
    u = lambda lo, hi: (lo + (hi - lo) * torch.rand(B, T, H, generator=g, dtype=dtype))  # noqa: E731
    d_out = c.get("d_out") or D
    x = {"q": torch.randn(B, T, H, D, generator=g, dtype=dtype),
         "k": F.normalize(torch.randn(B, T, H, D, generator=g, dtype=dtype), dim=-1),
         "v": torch.randn(B, T, H, D if c["self_target"] else d_out, generator=g, dtype=dtype),
         "eta": u(0.05, 0.6), "beta": u(0.1, 0.95) if c["mom"] else None,
         "alpha": u(0.7, 1.0) if c.get("alpha", True) else None,
         "erase": u(0.05, 0.5) if c["erase"] else None}
    lead = (H,) if c.get("shared") else (B, H)
    dims = [d_out, hid, D]
    for i in range(2):
        x[f"W{i + 1}"] = 0.6 * torch.randn(*lead, dims[i], dims[i + 1], generator=g, dtype=dtype) / dims[i + 1] ** 0.5
        if c["mom"]:
            x[f"S{i + 1}"] = 0.1 * torch.randn(*lead, dims[i], dims[i + 1], generator=g, dtype=dtype)
    return {n: None if t is None else t.to(DEVICE).requires_grad_() for n, t in x.items()}


def run(x, case, backend="triton", mode="chunk", chunk_size=16, dispatch=False):
    """``mlp_memory`` on the case's leaves; backend "triton" swaps its chunk core for the kernel's
    (``dispatch``: ``mlp_memory`` picks the kernel itself, as a model's call does)."""
    c = CASES[case]
    S = (x["S1"], x["S2"]) if "S1" in x else None
    kw = dict(objective=c.get("objective", "l2"), self_target=c["self_target"],
              detach_target=c.get("detach_target", False), activation=c["activation"],
              residual=c["residual"], read=c["read"], mode=mode, chunk_size=chunk_size)
    args = (x["q"], x["k"], x["v"], x["eta"], x["beta"], x["alpha"], x["erase"])
    state = dm.MLPState((x["W1"], x["W2"]), S)
    if backend == "triton" and not dispatch:
        with mock.patch.object(dm, "_mlp_chunk", deep.chunk_mlp_memory):
            o, st = dm.mlp_memory(*args, initial_state=state, **kw)
    else:
        o, st = dm.mlp_memory(*args, initial_state=state, backend=backend, **kw)
    return [o, *st.weights, *(st.momenta or ())]


def grads(outs, x, key):
    """Gradients of a random linear functional of ``outs`` w.r.t. every leaf."""
    g = _gen("cotangent", key)
    loss = sum((t * torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.device, t.dtype)).sum()
               for t in outs)
    names = [n for n, t in x.items() if t is not None]
    gs = torch.autograd.grad(loss, [x[n] for n in names], allow_unused=True)
    return {n: torch.zeros_like(x[n]) if g is None else g for n, g in zip(names, gs)}


def compare(got, want, tol_out, tol_grad):
    (outs_g, grads_g), (outs_w, grads_w) = got, want
    assert len(outs_g) == len(outs_w)
    for name, a, b in zip(["o", "W1", "W2", "S1", "S2"], outs_g, outs_w):
        assert_rel(name, a.detach().double(), b.detach().double(), tol_out)
    assert set(grads_g) == set(grads_w)
    for name, want_g in grads_w.items():
        if want_g.abs().max() == 0:       # v under detach_target: no gradient at all (None)
            assert grads_g[name].abs().max() == 0, f"d{name} should be zero"
            continue
        assert_rel(f"d{name}", grads_g[name].double(), want_g.double(), tol_grad)


def test_triton_mlp_reaches_the_kernel(monkeypatch):
    """The helper really runs the Triton cores, forward and backward (the comparisons below are not
    torch vs torch)."""
    mod = deep.kernels(deep.variant(("l2", True, False, "silu", True), False, True, True, True), DEVICE == "cpu")
    calls = launches(monkeypatch, mod, ("mlp_chunk_fwd", "mlp_chunk_bwd"))
    x = leaves("hope_memory", T=3, B=1, H=1)
    grads(run(x, "hope_memory"), x, "reach")
    assert calls == ["mlp_chunk_fwd", "mlp_chunk_bwd"]


def both(case, want_mode="chunk", chunk_size=16, **shape):
    x = leaves(case, **shape)
    res = []
    for backend, mode in (("triton", "chunk"), ("torch", want_mode)):
        outs = run(x, case, backend, mode, chunk_size)
        res.append((outs, grads(outs, x, (case, chunk_size))))
    return res


@pytest.mark.parametrize("case", list(CASES))
def test_triton_mlp_equals_torch_chunk(case):
    got, want = both(case)
    compare(got, want, TOL64, TOL64)


@pytest.mark.parametrize("case", ["titans", "hope_memory", "ttt_mlp"])
def test_triton_mlp_equals_recurrent(case):
    """The token loop (anchor refreshed every chunk): the rule itself, not the chunked algebra."""
    got, want = both(case, want_mode="recurrent")
    compare(got, want, TOL64, TOL64)


@pytest.mark.parametrize("chunk_size,T", [(32, 37), (64, 70)])
def test_triton_mlp_chunk_sizes(chunk_size, T):
    """The shipped chunk 64 (titans, hope memory) and 32; one ragged chunk after a full one."""
    got, want = both("titans" if chunk_size == 64 else "hope_memory", chunk_size=chunk_size, T=T, B=1, H=1)
    compare(got, want, TOL64, TOL64)


def test_unnormalised_keys_with_the_erase_at_chunk_64():
    """The erase's triangular solve at the largest chunk with keys of norm 4, as unnormalised
    random keys in 16 dimensions (eps |k|^2 up to 7.9, past the 2 where the erase stops being a
    contraction): (I + L)^-1 reaches about 3e3, growing with the chunk as the recurrence itself
    does. float64 against the torch chunk form at 1e-9; float32 against the float64 reference at
    the issue's 1e-4 / 1e-3."""
    x = leaves("hope_memory", T=70, B=1, H=1, seed=7)
    with torch.no_grad():
        x["k"].mul_(4.0)
    k, eps, a = x["k"][0, :64, 0].detach(), x["erase"][0, :64, 0].detach(), x["alpha"][0, :64, 0].detach()
    la = torch.cat([a.new_zeros(1), a.log().cumsum(0)])          # Pab[t, m] = prod_{m < j < t} alpha_j
    Pab = torch.tril((la[:-1, None] - la[None, 1:]).exp(), -1)
    Tinv = torch.linalg.inv(torch.eye(64, dtype=k.dtype) + Pab * eps[None, :] * (k @ k.T))
    assert Tinv.abs().max() > 1e3                                 # the solve is stressed, not near I
    got, want = run(x, "hope_memory", chunk_size=64), run(x, "hope_memory", "torch", chunk_size=64)
    want = (want, grads(want, x, "unnormalised"))
    compare((got, grads(got, x, "unnormalised")), want, TOL64, TOL64)
    x32 = {n: None if t is None else t.detach().float().requires_grad_() for n, t in x.items()}
    got32 = run(x32, "hope_memory", chunk_size=64)
    compare((got32, grads(got32, x32, "unnormalised")), want, 1e-4, 1e-3)


def test_triton_mlp_short_and_wide():
    """T shorter than one chunk; D, hidden and d_out not powers of two (masked columns)."""
    got, want = both("nores_dout", T=5, D=20, hid=40, B=1)
    compare(got, want, TOL64, TOL64)


def test_triton_mlp_wider_than_128():
    """D, hidden and d_out over 128 (blocks of 256, as Hope's and TTT-MLP's one 256-wide head)."""
    got, want = both("hope_memory", T=7, D=136, hid=144, B=1, H=1)
    compare(got, want, TOL64, TOL64)


@pytest.mark.parametrize("case", ["all_on", "hope_memory", "nores_dout", "detach_target", "bwd_dot_anchor",
                                  "hope_generator_nores"])
def test_backward_in_slices(case):
    """The backward kernel takes D, d_out and v a slice at a time (plan.mlp_slice; at the shipped
    bound a 256-wide level at chunk 64 runs as four 64-wide slices): with the bound lowered so that
    the slice is 16 columns, widths of 40 (and d_out 24) run as three slices and a ragged one, over
    two chunks and a ragged third, every term of the backward crossing slices."""
    from nlc.backends.triton import plan
    assert plan.mlp_slice(64, 256) == 64 and plan.mlp_slice(16, 256) == 256 and plan.mlp_slice(64, 40) == 64
    with mock.patch.object(plan, "MLP_BWD_TILE", 16 * 16):
        assert plan.mlp_slice(16, 40, 24) == 16
        got, want = both(case, T=37, D=40, hid=24, B=1)
    compare(got, want, TOL64, TOL64)


def test_auto_trains_through_the_kernel():
    """backend='auto' asks the dispatcher for the kernel with and without autograd, at any width
    the kernel takes (the backward kernel serves every level the forward does)."""
    for x in (leaves("titans", T=9), leaves("titans", T=9, D=136, hid=40, B=1, H=1)):
        with mock.patch.object(dm, "pick", return_value="torch") as pick:
            run(x, "titans", "auto", chunk_size=32)
        assert pick.called
        with mock.patch.object(dm, "pick", return_value="torch") as pick, torch.no_grad():
            run(x, "titans", "auto", chunk_size=32)
        assert pick.called


def test_triton_mlp_no_retention_at_the_seam():
    """alpha=None at the core (the kernel drops the retention terms) == alpha of ones."""
    x = leaves("ttt_mlp")
    cfg = ("l2", False, False, "gelu", True)
    W = [x["W1"], x["W2"]]
    args = (x["q"], x["k"], x["v"], x["eta"], None)
    o, Wt, _ = deep.chunk_mlp_memory(*args, None, None, cfg, W, None, 16, True)
    o_r, Wr, _ = dm._mlp_chunk(*args, torch.ones_like(x["eta"]), None, cfg, W, None, 16, True)
    got = grads([o, *Wt], x, "seam")
    want = grads([o_r, *Wr], x, "seam")
    compare(([o, *Wt], got), ([o_r, *Wr], want), TOL64, TOL64)


@pytest.mark.parametrize("case", ["titans", "hope_memory"])
def test_triton_mlp_float32(case):
    """float32 inputs (accumulation in float32) against the float64 reference."""
    x64 = leaves(case)
    x32 = {n: None if t is None else t.detach().float().requires_grad_() for n, t in x64.items()}
    outs32 = run(x32, case)
    outs64 = run(x64, case, "torch")
    assert outs32[0].dtype == torch.float32
    compare((outs32, grads(outs32, x32, case)), (outs64, grads(outs64, x64, case)), 1e-4, 1e-3)


@pytest.mark.parametrize("case", ["titans", "hope_memory", "all_on", "bwd_dot_anchor"])   # every flag, both ways
def test_backward_kernel_over_several_chunks(case):
    """T = 37 at chunk 16: the backward kernel walks two whole chunks (its carry between them,
    and each chunk's decay coefficients, whose cotangents the torch graph maps back to eta, beta
    and alpha), then a ragged open chunk; every gradient equals the torch chunk form's."""
    x = leaves(case, T=37, seed=3)
    got, want = run(x, case), run(x, case, backend="torch")
    compare((got, grads(got, x, case)), (want, grads(want, x, case)), TOL64, TOL64)


def test_triton_mlp_rejects_what_it_cannot_run():
    x = leaves("plain_anchor")
    W = [x["W1"].expand(2, -1, -1, -1), x["W2"].expand(2, -1, -1, -1)]
    args = (x["q"], x["k"], x["v"], x["eta"], None, x["alpha"], None)
    cfg = ("l2", False, False, "silu", True)
    for C in (1, 8, 24, 128):
        with pytest.raises(ValueError, match="chunk_size.*backend='torch'"):
            deep.chunk_mlp_memory(*args, cfg, W, None, C, False)
    with pytest.raises(ValueError, match="depth must be 2"):
        deep.chunk_mlp_memory(*args, cfg, W + [W[1][..., :16]], None, 16, False)
    with pytest.raises(ValueError, match="activation"):
        deep.chunk_mlp_memory(*args, ("l2", False, False, "relu", True), W, None, 16, False)
    wide = [W[0].new_zeros(*W[0].shape[:-1], 257), W[1].new_zeros(*W[1].shape[:-2], 257, W[1].shape[-1])]
    with pytest.raises(ValueError, match="at most 256"):
        deep.chunk_mlp_memory(*args, cfg, wide, None, 16, False)


@pytest.mark.skipif(DEVICE == "cpu", reason="full-size tiles (D 64, hidden 128, chunk 64): too slow "
                    "for the interpreter; run with NLC_TEST_DEVICE=cuda")
@pytest.mark.parametrize("case", ["titans", "hope_memory"])
def test_triton_mlp_full_tiles_float32(case):
    """The shipped chunk and head sizes, compiled: float32 kernel against the float64 reference."""
    shape = dict(B=2, T=200, H=2, D=64, hid=128)
    x64 = leaves(case, **shape)
    x32 = {n: None if t is None else t.detach().float().requires_grad_() for n, t in x64.items()}
    outs32 = run(x32, case, chunk_size=64)
    outs64 = run(x64, case, "torch", chunk_size=64)
    compare((outs32, grads(outs32, x32, case)), (outs64, grads(outs64, x64, case)), 1e-4, 1e-3)


def test_each_variant_holds_only_its_terms():
    """Every one of the 256 variants renders (and parses); a variant without a hole has none of
    its terms."""
    from itertools import product

    from nlc.backends.triton import template
    names = template.flags_of("mlp_chunk")
    assert set(names) == {"MOMENTUM", "RETAIN", "ERASE", "SELF_TARGET", "RESIDUAL", "CURRENT", "L2", "GELU"}
    for bits in product([False, True], repeat=len(names)):
        flags = dict(zip(names, bits))
        text = template.body("mlp_chunk", flags)
        assert ("S1 = " in text) == flags["MOMENTUM"]
        assert ("Tinv = " in text) == flags["ERASE"]
        assert ("tl.erf" in text) == flags["GELU"]
        assert ("QK = " in text) == flags["CURRENT"]
        assert ("_segprod(alpha_ptr" in text) == flags["RETAIN"]

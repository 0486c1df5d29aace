"""Every kernel family at the benchmark's tiles, compiled on a GPU: K = V = 128 at chunk 64 (the
deep memory at Titans' sizes, D 64, hidden 128, and at Hope's M_mem's, one 256-wide head, hidden
256, whose backward runs in 64-wide slices), two chunks and a ragged one, float32 against the
float64 torch form (the issue's 1e-4 on outputs and states, 1e-3 on gradients) and bfloat16 against
the float32 torch form on the same rounded values (relative RMSE under 5e-3).

Why these shapes need their own run: Triton on Hopper has miscompiled kernels of this family at
such tiles while small ones were right (flash-linear-attention #640: wrong gradients from a
transposed product accumulator, Triton 3.4 to 3.7.0; #984 / #988: wrong dk and dbeta, or an
illegal memory access, at chunk 64 with 4 warps), and the benchmark times exactly these tiles.
On a CPU the interpreter takes minutes here, so they are skipped unless ``NLC_TEST_FULL=1``.
"""
from __future__ import annotations

import os
import zlib

import pytest
import torch
import torch.nn.functional as F

from nlc.backends.torch import deep_memory as dm
from nlc.backends.torch import memories as mem
from nlc.backends.torch import ops

from .numerics import assert_rel, assert_rmse

DEVICE = os.environ.get("NLC_TEST_DEVICE", "cpu")
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not os.environ.get("NLC_TEST_FULL"),
                                reason="full-size tiles (K = V = 128, chunk 64): minutes under the interpreter; "
                                       "run with NLC_TEST_DEVICE=cuda (or NLC_TEST_FULL=1 on a CPU)")
B, T, H, K = 1, 150, 2, 128


def _draw(name: str) -> dict:
    """float64 inputs of one family, the memories' rates in range, keys normalised."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    rand = lambda *s, lo=0.0, hi=1.0: lo + (hi - lo) * torch.rand(*s, generator=g, dtype=torch.float64)  # noqa: E731
    randn = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    unit = lambda *s: F.normalize(randn(*s), dim=-1)  # noqa: E731
    x = dict(q=randn(B, T, H, K), k=unit(B, T, H, K))
    if name in ("linear_attn", "delta_rule", "gated_delta_rule"):
        x.update(v=randn(B, T, H, K), initial_state=randn(B, H, K, K))
        if name != "linear_attn":
            x["beta"] = rand(B, T, H, lo=0.05, hi=0.95)
        if name == "gated_delta_rule":
            x["g"] = rand(B, T, H, lo=-0.7, hi=-0.01)
    elif name in ("gla", "dplr"):
        x.update(w=randn(B, T, H, K), a=rand(B, T, H, K, lo=0.5, hi=1.0), initial_state=randn(B, H, K, K))
        if name == "dplr":
            x.update(u=rand(B, T, H, 1, lo=0.1, hi=0.9) * unit(B, T, H, K), e=unit(B, T, H, K))
    elif name.startswith("momentum"):
        x.update(v=randn(B, T, H, K), eta=rand(B, T, H, lo=0.05, hi=0.6), beta=rand(B, T, H, lo=0.1, hi=0.95),
                 alpha=rand(B, T, H, lo=0.7, hi=1.0), M=0.5 * randn(B, H, K, K), S=0.1 * randn(B, H, K, K))
        if name == "momentum_erase":
            x["erase"] = rand(B, T, H, lo=0.05, hi=0.5)
    elif name == "hope_memory":                             # Hope's M_mem: one 256-wide head, hidden 256
        D = 256
        x = dict(q=randn(B, T, 1, D), k=unit(B, T, 1, D), v=randn(B, T, 1, D), eta=rand(B, T, 1, lo=0.05, hi=0.6),
                 alpha=rand(B, T, 1, lo=0.7, hi=1.0), erase=rand(B, T, 1, lo=0.05, hi=0.5),
                 W1=0.6 * randn(B, 1, D, D) / D ** 0.5, W2=0.6 * randn(B, 1, D, D) / D ** 0.5)
    else:                                                   # Titans' memory level: D 64, hidden 128
        D = 64
        x = dict(q=randn(B, T, H, D), k=unit(B, T, H, D), v=randn(B, T, H, D), eta=rand(B, T, H, lo=0.05, hi=0.6),
                 beta=rand(B, T, H, lo=0.1, hi=0.95), alpha=rand(B, T, H, lo=0.7, hi=1.0),
                 W1=0.6 * randn(B, H, D, 2 * D) / (2 * D) ** 0.5, W2=0.6 * randn(B, H, 2 * D, D) / D ** 0.5,
                 S1=0.1 * randn(B, H, D, 2 * D), S2=0.1 * randn(B, H, 2 * D, D))
    return x


def _run(name: str, x: dict, backend: str) -> list:
    """The family's outputs (output and final state(s)) on ``backend`` at chunk 64."""
    if name in ("linear_attn", "delta_rule", "gated_delta_rule"):
        args = [x[n] for n in ("q", "k", "v", "beta", "g") if n in x]
        return list(getattr(ops, name)(*args, initial_state=x["initial_state"], output_final_state=True,
                                       chunk_size=64, backend=backend))
    if name in ("gla", "dplr"):
        erase = (x["u"], x["e"]) if "u" in x else None
        return list(ops.generalized_delta(x["q"], x["k"], x["w"], x["a"], erase=erase, initial_state=x["initial_state"],
                                          output_final_state=True, chunk_size=64, backend=backend))
    if name.startswith("momentum"):
        o, st = mem.momentum_memory(x["q"], x["k"], x["v"], x["eta"], x["beta"], x["alpha"], x.get("erase"),
                                    initial_state=(x["M"], x["S"]), chunk_size=64, backend=backend)
        return [o, st.M, st.S]
    if name == "hope_memory":
        o, st = dm.mlp_memory(x["q"], x["k"], x["v"], x["eta"], None, x["alpha"], x["erase"],
                              initial_state=dm.MLPState((x["W1"], x["W2"])), self_target=True, read="current",
                              chunk_size=64, backend=backend)
        return [o, *st.weights]
    o, st = dm.mlp_memory(x["q"], x["k"], x["v"], x["eta"], x["beta"], x["alpha"], None,
                          initial_state=dm.MLPState((x["W1"], x["W2"]), (x["S1"], x["S2"])), read="current",
                          chunk_size=64, backend=backend)
    return [o, *st.weights, *st.momenta]


def _with_grads(name: str, x: dict, backend: str) -> tuple[list, list]:
    """Outputs and the gradients of one random functional of them w.r.t. every input."""
    outs = _run(name, x, backend)
    g = torch.Generator().manual_seed(7)
    ws = [torch.randn(t.shape, generator=g, dtype=torch.float64).to(DEVICE) for t in outs]
    loss = sum((t.double() * w).sum() for t, w in zip(outs, ws))
    return [t.detach() for t in outs], list(torch.autograd.grad(loss, list(x.values())))


FAMILIES = ["linear_attn", "delta_rule", "gated_delta_rule", "gla", "dplr", "momentum", "momentum_erase", "titans",
            "hope_memory"]
HALF = {"dplr": ("q", "k", "w"), "gla": ("q", "k", "w")}      # what a 16-bit caller hands over


@pytest.mark.parametrize("name", FAMILIES)
def test_float32_against_the_float64_torch_form(name):
    x64 = _draw(name)
    x32 = {n: t.float().to(DEVICE).requires_grad_() for n, t in x64.items()}
    ref = {n: t.to(DEVICE).requires_grad_() for n, t in x64.items()}
    (outs, grads), (outs_r, grads_r) = _with_grads(name, x32, "triton"), _with_grads(name, ref, "torch")
    for i, (a, b) in enumerate(zip(outs, outs_r)):
        assert_rel(f"output {i}", a.double().cpu(), b.cpu(), 1e-4)
    for n, a, b in zip(x64, grads, grads_r):
        assert_rel(f"d{n}", a.double().cpu(), b.cpu(), 1e-3)


@pytest.mark.parametrize("name", FAMILIES)
def test_bfloat16_against_the_float32_torch_form(name):
    half = HALF.get(name, ("q", "k", "v"))
    low = {n: t.to(DEVICE, torch.bfloat16 if n in half else torch.float32).requires_grad_()
           for n, t in _draw(name).items()}
    same = {n: t.detach().float().requires_grad_() for n, t in low.items()}
    (outs, grads), (outs_r, grads_r) = _with_grads(name, low, "triton"), _with_grads(name, same, "torch")
    assert outs[0].dtype == torch.bfloat16
    for i, (a, b) in enumerate(zip(outs, outs_r)):
        assert_rmse(f"output {i}", a.float(), b, 5e-3)
    for n, a, b in zip(low, grads, grads_r):
        assert_rmse(f"d{n}", a.float(), b, 5e-3)

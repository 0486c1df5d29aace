"""The language's newer constructs, compiled: each one's chunked form equals its recurrent oracle in
float64 (outputs, carried state and every parameter's gradient), and it changes what the model
computes. The spec is the shipped gated DeltaNet shrunk to test size, edited in one place."""
from __future__ import annotations

import pytest
import torch

import nlc
from .test_compile import check_chunk_recurrent_and_state, small

EDITS = {
    # an output transform with a learned skip term (Mamba2's D x)
    "output": ("    chunk: 8\n", "    chunk: 8\n    output: onorm(o) * silu(proj(x)) + param(0.5) * x\n"),
    # a fixed decay per head (RetNet) and a learned one initialised from the head index
    "head decay": ("retain(alpha) |> grad", "retain(1 - 2^(-5 - head)) |> grad"),
    "param decay": ("retain(alpha) |> grad", "retain(sigmoid(param(3 + head))) |> grad"),
    # Longhorn's step, beta / (1 + beta k^T k), with a reduction
    "reduction": ("scale(beta)", "scale(beta / (1 + beta * dot(key, key)))"),
    # a vector (per key channel) retention, before and after the gradient
    "vector pre-retain": ("retain(alpha) |> grad", "retain(sigmoid(proj(x) + 3)) |> grad"),
    "vector post-retain": ("retain(alpha) |> grad |> scale(beta)",
                           "grad |> scale(beta) |> retain(sigmoid(proj(x) + 3))"),
    # DGD along the level's key with a vector rate, and along another key under the dot objective
    "vector dgd": ("retain(alpha) |> grad |> scale(beta)",
                   "grad |> scale(beta) |> retain(alpha) |> dgd(key=key, lr=0.5 * sigmoid(proj(x)))"),
    "erase key": ("    objective: l2\n    rule: retain(alpha) |> grad |> scale(beta)\n",
                  "    objective: dot\n    rule: grad |> scale(beta) |> retain(alpha) |> dgd(key=l2norm(proj(x)), lr=gate(x))\n"),
}


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_language_constructs_compile_exactly(edit, tmp_path):
    old, new = EDITS[edit]
    p = small("gated_deltanet", tmp_path)
    text = p.read_text()
    assert old in text, old
    p.write_text(text.replace(old, new, 1))
    model = check_chunk_recurrent_and_state(p)
    plain = nlc.compile(small("gated_deltanet", tmp_path)).double()
    plain.load_state_dict(model.state_dict(), strict=False)
    ids = torch.randint(0, 50, (2, 29))
    assert (plain(ids)[0] - model(ids)[0]).abs().max() > 1e-6, "the edit changed nothing"


def test_a_decay_that_underflows_keeps_training(tmp_path):
    """`exp(-softplus(z))` underflows to exactly 0 at large z. The chunked form works with log a, so
    it used to stop training; the retention is floored at e^-30 instead: outputs and gradients
    stay finite, and chunk still equals recurrent."""
    p = small("gated_deltanet", tmp_path)
    p.write_text(p.read_text().replace("retain(alpha) |> grad", "retain(exp(-softplus(1e4 * rate(x)))) |> grad"))
    torch.manual_seed(0)
    model = nlc.compile(p)
    ids = torch.randint(0, 50, (2, 29))
    loss = model(ids)[0].square().mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(q.grad).all() for q in model.parameters() if q.grad is not None)
    check_chunk_recurrent_and_state(p)

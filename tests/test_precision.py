"""Mixed precision (`nlc train --precision bf16`): autocast around the model, every memory's
recurrence in float32 (`backends/torch/precision.py`), and the models still learn."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nlc.backends.torch import deep_memory as dm
from nlc.backends.torch import generators as gen
from nlc.backends.torch import memories as mem
from nlc.backends.torch import ops

from test_train import nlc_cli, run

BF16 = torch.bfloat16


def _spy(monkeypatch, module, name) -> list:
    """Record whether autocast is on each time ``module.name`` (a memory's core) runs."""
    seen, real = [], getattr(module, name)

    def core(*a, **kw):
        seen.append(torch.is_autocast_enabled("cpu"))
        return real(*a, **kw)
    monkeypatch.setattr(module, name, core)
    return seen


def _draw(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _calls():
    """(name, call, the module and core that the call's recurrence runs in), on bfloat16 q, k, v."""
    B, T, H, K = 2, 21, 2, 16
    q, k, v = (_draw(B, T, H, K, seed=i).to(BF16) for i in range(3))
    k = F.normalize(k.float(), dim=-1).to(BF16)
    rate = torch.sigmoid(_draw(B, T, H, seed=4))
    a = torch.sigmoid(_draw(B, T, H, K, seed=5) + 2)
    W = [0.3 * _draw(H, K, 2 * K, seed=6), 0.3 * _draw(H, 2 * K, K, seed=7)]
    yield "gated_delta_rule", lambda: ops.gated_delta_rule(q, k, v, rate, -rate, chunk_size=8)[0], \
        ops, "chunk_generalized_delta"
    yield "generalized_delta (DPLR)", lambda: ops.generalized_delta(q, k, v, a, rate, chunk_size=8)[0], \
        ops, "chunk_dplr_delta"
    yield "momentum_memory", lambda: mem.momentum_memory(q, k, v, 0.1 * rate, rate, rate, chunk_size=8)[0], \
        mem, "_momentum_chunk"
    yield "mlp_memory", lambda: dm.mlp_memory(q, k, v, 0.1 * rate, rate, rate, initial_state=W, read="current",
                                              chunk_size=8)[0], dm, "_mlp_chunk"


@pytest.mark.parametrize("case", [c[0] for c in _calls()])
def test_memory_recurrences_opt_out_of_autocast(monkeypatch, case):
    """Under bfloat16 autocast each memory's core runs with autocast off, so it gives what the same
    bfloat16 inputs give without autocast, bit for bit (its output in the inputs' dtype)."""
    _, call, module, core = next(c for c in _calls() if c[0] == case)
    seen = _spy(monkeypatch, module, core)
    plain = call()
    calls = len(seen)
    with torch.autocast("cpu", dtype=BF16):
        mixed = call()
    assert calls and seen == [False] * (2 * calls), seen
    assert mixed.dtype == BF16 and torch.equal(mixed, plain)


def test_without_the_opt_out_autocast_reaches_the_core(monkeypatch):
    """The check above can fail: the op's undecorated body runs its core under autocast."""
    seen = _spy(monkeypatch, ops, "chunk_generalized_delta")
    q = _draw(1, 9, 1, 16).to(BF16)
    with torch.autocast("cpu", dtype=BF16):
        ops.gated_delta_rule.__wrapped__(q, q, q, torch.full((1, 9, 1), 0.5), torch.full((1, 9, 1), -0.5),
                                         chunk_size=8)
    assert seen == [True]


def test_the_generators_update_opts_out_too(monkeypatch, tmp_path):
    """Hope's stacked generator update (its chunk step) runs with autocast off in a bf16 run."""
    seen = _spy(monkeypatch, gen, "_chunk")
    s = run(tmp_path, spec="specs/hope.yaml", steps=2, batch=2, context=32, precision="bf16",
            sets=("model.d_model=32", "model.layers=1"))
    assert seen and not any(seen) and math.isfinite(s["last_loss"])


@pytest.mark.parametrize("name", ["titans", "rwkv7"])
def test_models_learn_in_mixed_precision(tmp_path, name):
    """A deep memory with momentum (titans) and the DPLR form (rwkv7) learn the copy task under
    --precision bf16 as the float32 test asks of every shipped spec; and the settings record it."""
    s = run(tmp_path, spec=f"specs/{name}.yaml", steps=40, batch=8, context=64, task="copy", log_every=10,
            precision="bf16", sets=("model.d_model=32", "model.layers=2", "model.heads=2", "lr=3e-3"))
    assert s["last_loss"] < s["first_loss"] - 2.0 and s["last_val"] < s["first_val"] - 2.0, s["log"]
    assert any(ln.startswith("note: --precision bf16 on a CPU") for ln in s["log"])


def test_an_unknown_precision_is_a_located_mistake():
    r = nlc_cli("train", "specs/titans.yaml", "--precision", "fp16")
    assert r.returncode == 2 and "--precision: input should be 'float32' or 'bf16'" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr

"""CMS, the continuum memory system (NL Eq. 71): the runtime's windows == the rule token by token.

A chain of MLP blocks, each updated in context every ``C_l`` tokens (or never, frequency 0): the
runtime (``cms_init`` / ``cms_fast_weights`` / ``cms_step``, run window by window) against the rule
written out token by token, outputs, in-context state and the gradients of the slow weights; and a
window that does not divide every chunk is refused. Float64 with ``test_memories``' seeded
generators and relative max error.
"""
from __future__ import annotations

import pytest
import torch

from nlc.backends.torch import memories as mem

from .test_memories import DT, HID, _gen, assert_rel

CMS_CHUNKS, CMS_LRS, CMS_D = (2, 4, None, 8), (0.3, 0.2, 0.5, 0.1), 4


def cms_setup(T):
    g = _gen("cms", T)
    slow = [{"W1": (0.5 * torch.randn(CMS_D, HID, generator=g, dtype=DT)).requires_grad_(),
             "W2": (0.5 * torch.randn(HID, CMS_D, generator=g, dtype=DT)).requires_grad_()}
            for _ in CMS_CHUNKS]
    x = torch.randn(T, CMS_D, generator=g, dtype=DT)
    target = torch.randn(T, CMS_D, generator=g, dtype=DT)
    return slow, x, target


def test_cms_windows_equal_the_token_rule():
    """theta_l <- theta_l - eta_l sum_{t in chunk} grad f(theta_l; x_t), applied at the end of each
    chunk of C_l tokens; every block runs on every token; f_t = 1/2 ||y_t - target_t||^2."""
    T, window = 14, 2                           # T is not a multiple of the slower chunks
    slow, x, target = cms_setup(T)
    names = ("W1", "W2")

    # the rule as written, token by token; theta = slow + (detached) in-context delta
    delta = [{n: torch.zeros_like(p) for n, p in lv.items()} for lv in slow]
    acc = [{n: torch.zeros_like(p) for n, p in lv.items()} for lv in slow]
    ys, total = [], 0.0
    for t in range(T):
        theta = [{n: lv[n] + delta[l][n] for n in names} for l, lv in enumerate(slow)]
        y = mem.cms_chain(x[t:t + 1], theta, activation="gelu")
        f = 0.5 * ((y - target[t:t + 1]) ** 2).sum()
        flat = [theta[l][n] for l in range(len(slow)) for n in names]
        grads = torch.autograd.grad(f, flat, retain_graph=True)
        for i, gr in enumerate(grads):
            if CMS_CHUNKS[i // 2] is not None:        # frequency 0: no in-context update at all
                acc[i // 2][names[i % 2]] = acc[i // 2][names[i % 2]] + gr
        for l, C in enumerate(CMS_CHUNKS):
            if C is not None and (t + 1) % C == 0:
                delta[l] = {n: delta[l][n] - CMS_LRS[l] * acc[l][n] for n in names}
                acc[l] = {n: torch.zeros_like(acc[l][n]) for n in names}
        ys.append(y)
        total = total + f
    y_ref = torch.cat(ys)
    slow_grads_ref = torch.autograd.grad(total, [lv[n] for lv in slow for n in names])

    # the runtime: windows of the fastest chunk, cms_step after each
    state = mem.cms_init(slow)
    ys, total, fired_log = [], 0.0, []
    for s in range(0, T, window):
        fast = mem.cms_fast_weights(slow, state)
        y = mem.cms_chain(x[s:s + window], fast, activation="gelu")
        loss = 0.5 * ((y - target[s:s + window]) ** 2).sum()
        grads = torch.autograd.grad(loss, [lv[n] for lv in fast for n in names], retain_graph=True)
        per_level = [{n: grads[2 * l + i] for i, n in enumerate(names)} for l in range(len(fast))]
        before = state
        state, fired = mem.cms_step(state, per_level, window, chunk_sizes=CMS_CHUNKS, lrs=CMS_LRS)
        assert before["count"] is not state["count"]          # pure: a new state each window
        fired_log.append(fired)
        ys.append(y)
        total = total + loss
    slow_grads = torch.autograd.grad(total, [lv[n] for lv in slow for n in names])

    assert_rel("y", torch.cat(ys).detach(), y_ref.detach(), 1e-12)
    for l in range(len(slow)):
        for n in names:
            assert_rel(f"delta[{l}].{n}", state["delta"][l][n], delta[l][n], 1e-12)
            assert_rel(f"acc[{l}].{n}", state["acc"][l][n], acc[l][n], 1e-12)
    for i, (a, b) in enumerate(zip(slow_grads, slow_grads_ref)):
        assert_rel(f"dslow[{i}]", a, b, 1e-12)
    assert state["count"] == [0, 2, 0, 6]
    assert [f[0] for f in fired_log] == [True] * 7 and not any(f[2] for f in fired_log)
    assert [f[3] for f in fired_log] == [False, False, False, True, False, False, False]
    assert all(state["delta"][2][n].abs().max() == 0 for n in names)      # frequency 0: never


def test_cms_window_must_divide_chunks():
    slow, x, _ = cms_setup(4)
    state = mem.cms_init(slow)
    grads = [{n: torch.ones_like(p) for n, p in lv.items()} for lv in slow]
    with pytest.raises(ValueError, match="must divide every chunk"):
        mem.cms_step(state, grads, 3, chunk_sizes=CMS_CHUNKS, lrs=CMS_LRS)

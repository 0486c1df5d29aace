"""Compiled M3, M3-EMA, M3-Muon and delta-momentum optimizers against transcriptions of the maths.

Each reference below is the update written out step by step, independent of the compiled code (M3
as Nested Learning's Algorithm 1), and the trajectories must agree to float64 rounding. The
gradient stream and the trajectory helpers are ``test_optim``'s (seeded, float64, gradients that
depend on the parameters); the comparisons against torch's own optimizers are there.
"""
import math

import torch

from nlc.backends.torch.optim import compile_optimizer

from .test_optim import F64, MATRICES, grads_at, loss_at, max_diff, params_of, stream_of, trajectory


# ---------------------------------------------------------------- M3, M3-EMA, delta momentum against transcriptions

def ns_ref(X, steps=5, eps=1e-7):
    """Quintic Newton-Schulz of one matrix, written out (a vector is one row)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    shape = X.shape
    X = X.reshape(X.shape[0], -1) if X.ndim >= 2 else X.reshape(1, -1)
    tall = X.shape[0] > X.shape[1]
    if tall:
        X = X.T
    X = X / max(X.norm().item(), eps)
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return (X.T if tall else X).reshape(shape)


M3_HYPER = dict(lr=0.01, beta1=0.9, beta2=0.999, beta3=0.8, alpha=0.7, eps=1e-8, slow_every=3, ns_steps=5)


def m3_algorithm1(params0, stream, lr, beta1, beta2, beta3, alpha, eps, slow_every, ns_steps):
    """Algorithm 1 of Nested Learning, block by block and step by step."""
    theta = [p.clone() for p in params0]
    M1 = [torch.zeros_like(p) for p in theta]
    V = [torch.zeros_like(p) for p in theta]
    M2 = [torch.zeros_like(p) for p in theta]
    out, previous_block = [], []
    for k in range(math.ceil(len(stream) / slow_every)):
        if previous_block:   # M2 += beta3 * (sum of the previous block's gradients); O2 = NS(M2)
            M2 = [m + beta3 * sum(gs[i] for gs in previous_block) for i, m in enumerate(M2)]
        O2 = [ns_ref(m, ns_steps) for m in M2]
        previous_block = []
        for t in range(k * slow_every, min((k + 1) * slow_every, len(stream))):
            g = grads_at(theta, stream[t])
            previous_block.append(g)
            for i in range(len(theta)):
                M1[i] = M1[i] + beta1 * g[i]
                V[i] = V[i] + beta2 * g[i] ** 2
                O1 = ns_ref(M1[i], ns_steps)
                theta[i] = theta[i] - lr * (O1 + alpha * O2[i]) / (V[i].sqrt() + eps)
            out.append([p.clone() for p in theta])
    return out


def test_m3_equals_algorithm1_over_blocks():
    p0, stream = params_of(MATRICES), stream_of(MATRICES, 11)      # blocks of 3: 3 full + 2 steps
    ours = trajectory(lambda ps: compile_optimizer("m3", ps, **M3_HYPER), p0, stream)
    assert max_diff(ours, m3_algorithm1(p0, stream, **M3_HYPER)) < 1e-12


def test_m3_slow_term_lags_one_block():
    # At step f = slow_every, M2 is written (this block's sum) but the update still reads the
    # previous block's M2 (zero): alpha changes nothing through step f, and everything after it.
    f = M3_HYPER["slow_every"]
    p0, stream = params_of(MATRICES), stream_of(MATRICES, f + 1)
    runs = {}
    for alpha in (0.0, 1.0):
        ps = [p.clone().requires_grad_(True) for p in p0]
        opt = compile_optimizer("m3", ps, **{**M3_HYPER, "alpha": alpha})
        traj = []
        for batch in stream:
            opt.zero_grad()
            loss_at(ps, batch).backward()
            opt.step()
            traj.append([p.detach().clone() for p in ps])
            if len(traj) == f:
                assert all(opt.state[p]["M2"].abs().max() > 0 for p in ps)   # written at step f
        runs[alpha] = traj
    for t in range(f):
        assert all(torch.equal(a, b) for a, b in zip(runs[0.0][t], runs[1.0][t]))
    assert not torch.equal(runs[0.0][f][0], runs[1.0][f][0])


def test_m3_rest_is_adamw():
    p0, stream = params_of([(4,)]), stream_of([(4,)], 5)
    ours = trajectory(lambda ps: compile_optimizer("m3", ps, lr=0.01, eps=1e-7), p0, stream)
    theirs = trajectory(lambda ps: torch.optim.AdamW(ps, lr=0.01, eps=1e-7, foreach=False), p0, stream)
    assert max_diff(ours, theirs) < 1e-13


def m3_ema_reference(params0, stream, lr, beta1, beta2, beta3, alpha, eps, slow_every, ns_steps, divide=True):
    theta = [p.clone() for p in params0]
    M1, V, M2, block = ([torch.zeros_like(p) for p in theta] for _ in range(4))
    O2 = [torch.zeros_like(p) for p in theta]
    out = []
    for t, batch in enumerate(stream, start=1):
        g = grads_at(theta, batch)
        for i in range(len(theta)):
            M1[i] = beta1 * M1[i] + (1 - beta1) * g[i]
            V[i] = beta2 * V[i] + (1 - beta2) * g[i] ** 2
            block[i] = block[i] + g[i] / slow_every
            v_hat = V[i] / (1 - beta2 ** t)
            step = ns_ref(M1[i], ns_steps) + alpha * O2[i]
            theta[i] = theta[i] - lr * (step / (v_hat.sqrt() + eps) if divide else step)
            if t % slow_every == 0:       # the block's mean enters M2 after this step's update
                M2[i] = beta3 * M2[i] + (1 - beta3) * block[i]
                block[i] = torch.zeros_like(block[i])
                O2[i] = ns_ref(M2[i], ns_steps)
        out.append([p.clone() for p in theta])
    return out


def test_m3_ema_equals_reference():
    p0, stream = params_of(MATRICES), stream_of(MATRICES, 10)
    ours = trajectory(lambda ps: compile_optimizer("m3_ema", ps, **M3_HYPER), p0, stream)
    assert max_diff(ours, m3_ema_reference(p0, stream, **M3_HYPER)) < 1e-12


def test_m3_muon_is_m3_ema_without_the_division():
    p0, stream = params_of(MATRICES), stream_of(MATRICES, 10)
    hyper = {k: v for k, v in M3_HYPER.items() if k != "beta2"}
    ours = trajectory(lambda ps: compile_optimizer("m3_muon", ps, **hyper), p0, stream)
    assert max_diff(ours, m3_ema_reference(p0, stream, **M3_HYPER, divide=False)) < 1e-12
    assert max_diff(ours, m3_ema_reference(p0, stream, **M3_HYPER)) > 1e-3     # the division mattered here


def test_delta_momentum_equals_reference():
    shapes = [(5, 3), (3, 6), (4,), (2, 3, 2)]
    lr, mom, wd = 0.05, 0.9, 0.01
    p0, stream = params_of(shapes), stream_of(shapes, 8)
    ours = trajectory(lambda ps: compile_optimizer("delta_momentum", ps, lr=lr, momentum=mom, weight_decay=wd), p0, stream)
    theta = [p.clone() for p in p0]
    m = [torch.zeros(p.shape[0] if p.ndim >= 2 else 1, p.numel() // (p.shape[0] if p.ndim >= 2 else 1), dtype=F64) for p in p0]
    ref = []
    for batch in stream:
        g = grads_at(theta, batch)
        for i, p in enumerate(theta):
            G = g[i].reshape(m[i].shape)            # [rows, cols], a vector as one row
            decay = mom * torch.eye(G.shape[1], dtype=F64) - G.T @ G / (G ** 2).sum()
            m[i] = m[i] @ decay + G
            theta[i] = p - lr * wd * p - lr * m[i].reshape(p.shape)
        ref.append([p.clone() for p in theta])
    assert max_diff(ours, ref) < 1e-13

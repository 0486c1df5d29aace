"""Numerical comparison helpers shared by the backend tests."""
from __future__ import annotations

import torch


def rel_err(x, y) -> float:
    """max|x - y| relative to max|y|, absolute below 1 (an exactly-zero gradient stays checkable)."""
    if y.numel() == 0:
        return 0.0
    return ((x - y).abs().max() / y.abs().max().clamp_min(1.0)).item()


def assert_rel(name, x, y, tol):
    assert x.shape == y.shape, f"{name}: shape {tuple(x.shape)} != {tuple(y.shape)}"
    assert torch.isfinite(x).all(), f"{name}: non-finite values"
    err = rel_err(x, y)
    assert err <= tol, f"{name}: relative max error {err:.3e} > {tol:.0e}"


def rel_rmse(x, y) -> float:
    """Root-mean-square of x - y relative to y's: the issue's measure for 16-bit inputs."""
    x, y = x.detach().double().cpu(), y.detach().double().cpu()
    return ((x - y).square().mean().sqrt() / y.square().mean().sqrt().clamp_min(1e-30)).item()


def assert_rmse(name, x, y, tol):
    assert x.shape == y.shape, f"{name}: shape {tuple(x.shape)} != {tuple(y.shape)}"
    assert torch.isfinite(x).all(), f"{name}: non-finite values"
    err = rel_rmse(x, y)
    assert err < tol, f"{name}: relative RMSE {err:.2e} >= {tol:.0e}"

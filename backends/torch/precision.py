"""Mixed precision: a memory's recurrence runs in float32 (or wider) whatever autocast says.

Under ``torch.autocast`` (``nlc train --precision bf16``) the projections, attention and MLPs
compute in bfloat16; the memories' updates (the chunked recurrences, their inner gradients, the
triangular solves) would too, since autocast casts every matmul's operands, and an in-context
learner that accumulates its state over thousands of tokens in bfloat16 is a different model.
:func:`full_precision` marks those entry points: inside them autocast is off, the op promotes its
inputs to float32 as it always does, and 16-bit q, k, v still reach the Triton kernels as 16-bit
(TF32 products, ``plan.products``). Outputs come back in the caller's dtype.
"""
from __future__ import annotations

import functools

import torch

__all__ = ["full_precision"]


def full_precision(fn):
    """Run ``fn`` with autocast off on every device (a no-op where autocast is not on)."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        if not (torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")):
            return fn(*args, **kwargs)
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return fn(*args, **kwargs)
    return run

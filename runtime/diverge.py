"""When a run diverges: which tensor went bad first, for the message that stops it (exit status 3).

A step's loss or gradient that is NaN or infinite stops the run before the optimizer step, so the
parameters never take it and the last checkpoint (always a finite one: `checkpoint.non_finite`)
stays the newest. The message names the step and the first tensor that is not finite, looked for in
the order the damage spreads: the parameters (an optimizer step before made them so), then the
memory states of the step's forward pass (an in-context update blew up), then the gradients.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Iterator

import torch


def _what(t: torch.Tensor) -> str:
    return "NaN" if torch.isnan(t).any() else "infinite"


def _bad(t) -> bool:
    return isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()) and not torch.isfinite(t).all()


def _tensors(states, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of a forward's memory states (a dict of tensors, maybe nested), with their names."""
    if isinstance(states, torch.Tensor):
        yield prefix, states
    elif isinstance(states, dict):
        for k, v in states.items():
            yield from _tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(states, (list, tuple)):
        for i, v in enumerate(states):
            yield from _tensors(v, f"{prefix}.{i}" if prefix else str(i))


def culprit(model: torch.nn.Module, states=None, rerun: Callable[[], object] | None = None) -> str | None:
    """The first tensor that is not finite, in words (`parameter blocks.0.w is NaN`, `memory state
    0.mem is infinite`, `the output of blocks.0.attn is NaN`, `the gradient of embed.weight is NaN`),
    or None when each one is finite. `rerun` runs the step's forward again, to find the first module
    whose output is not finite when the parameters are."""
    named = list(model.named_parameters())
    for name, p in named:
        if _bad(p):
            return f"parameter {name} is {_what(p)}"
    for name, t in _tensors(states):
        if _bad(t):
            return f"memory state {name} is {_what(t)}"
    if rerun is not None:
        found = _first_bad_output(model, rerun)
        if found:
            return found
    for name, p in named:
        if _bad(p.grad):
            return f"the gradient of {name} is {_what(p.grad)}"
    return None


def _first_bad_output(model: torch.nn.Module, rerun: Callable[[], object]) -> str | None:
    """The first module, in the order the forward calls them, whose output is not finite."""
    found: list[str] = []

    def hook(name):
        def check(module, args, output):
            if not found:
                bad = next((t for _, t in _tensors(output) if _bad(t)), None)
                if bad is not None:
                    found.append(f"the output of {name} ({type(module).__name__}) is {_what(bad)}, the first "
                                 f"module's to be so, with every parameter finite")
        return check
    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        with torch.no_grad():
            rerun()
    except Exception:          # a forward that needs gradients (the CMS windows) or fails on the bad values
        pass
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


def message(step: int, loss: float, norm: float, bad: str | None, kept: Path | None) -> str:
    """Why the run stopped at `step`: the loss or the gradient's norm, the first bad tensor, and the
    checkpoint that is kept."""
    what = (f"the loss is {loss} at step {step}" if not math.isfinite(loss)
            else f"the gradient is {norm} at step {step} (loss {loss:.4g})")
    where = bad or "no parameter, memory state or gradient is itself non-finite, only their norm"
    kept_text = f"the last checkpoint ({kept}) is kept" if kept else "no checkpoint was saved before it"
    return (f"{what}: {where}: training diverged (lower the learning rate, e.g. --set lr=...); "
            f"nothing saved, {kept_text}")

"""Learning-rate schedules: the factor that multiplies the optimizer's learning rate at each step.

`factor(schedule, step, steps, warmup)` is a pure function of the step (0 for the first update),
so a resumed run follows the same schedule as one that went straight through (with the same
`--steps`: cosine and wsd end at `--steps`).

- warmup: the factor rises linearly over the first `warmup` steps, `(step + 1) / warmup`, and is
  1 from step `warmup - 1` on;
- `constant`: 1 after the warmup;
- `cosine`: half a cosine from 1 after the warmup to 0 at `steps`,
  `(1 + cos(pi * (step - warmup) / (steps - warmup))) / 2`;
- `wsd` (warmup, stable, decay): 1 until the last 20% of the steps (`steps // 5` of them), then a
  straight line to 0 at `steps`, `(steps - step) / (steps // 5)`.

The factor is the smaller of the warmup's and the schedule's.
"""
from __future__ import annotations

import math

SCHEDULES = ("constant", "cosine", "wsd")
WSD_DECAY = 0.2         # the share of the steps wsd decays over
HELP = ("constant; cosine (from the peak after the warmup to 0 at --steps); wsd (warmup, stable, then a "
        "linear decay to 0 over the last 20% of the steps)")


def decay_start(steps: int) -> int:
    """The first step of wsd's decay."""
    return steps - int(steps * WSD_DECAY)


def factor(schedule: str, step: int, steps: int, warmup: int = 0) -> float:
    """The learning-rate factor of update `step` (0-based) of a run of `steps` updates."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule `{schedule}`: use one of {', '.join(SCHEDULES)}")
    warm = (step + 1) / warmup if step < warmup else 1.0
    if schedule == "cosine":
        span = steps - warmup
        p = min(max((step - warmup) / span, 0.0), 1.0) if span > 0 else 0.0
        decay = 0.5 * (1.0 + math.cos(math.pi * p))
    elif schedule == "wsd":
        start = decay_start(steps)
        decay = min(1.0, max(steps - step, 0) / (steps - start)) if step >= start and steps > start else 1.0
    else:
        decay = 1.0
    return min(warm, decay)


def apply(optimizer, base_lr: list, schedule: str, step: int, steps: int, warmup: int = 0) -> None:
    """Set each parameter group's `lr` to its base value (None: the group has none) times the factor
    of update `step`."""
    f = factor(schedule, step, steps, warmup)
    for group, base in zip(optimizer.param_groups, base_lr):
        if base is not None:
            group["lr"] = base * f

"""Semantic checks (names, types and shapes, clocks, schedules, numerics). Filled in below."""
from __future__ import annotations

from nlc import spec as S
from nlc.diagnostics import Collector, SpecError, Span

# Valid ranges of optimizer hyperparameters, by name (a prefix match for the beta family).
HYPER_RANGES = {
    "lr": (0.0, None, False, "a learning rate is positive"),
    "eps": (0.0, None, True, "eps is >= 0"),
    "weight_decay": (0.0, None, True, "weight decay is >= 0"),
    "alpha": (0.0, None, True, "alpha (the slow memory's weight) is >= 0"),
    "momentum": (0.0, 1.0, True, "a momentum decay lies in [0, 1)"),
    "beta": (0.0, 1.0, True, "a decay rate lies in [0, 1)"),
}
INT_HYPERS = {"slow_every": "a period in steps is a positive integer", "ns_steps": "Newton-Schulz steps are a positive integer"}


def _hyper_problem(name: str, value) -> str | None:
    if name in INT_HYPERS:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            return INT_HYPERS[name]
        return None
    key = "beta" if name.startswith("beta") else name
    if key not in HYPER_RANGES:
        return None
    lo, hi, lo_ok, why = HYPER_RANGES[key]
    values = value if isinstance(value, (list, tuple)) else [value]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return why
        if v < lo or (v == lo and not lo_ok) or (hi is not None and v >= hi):
            return why
    return None


def check_hyper(spec: S.OptimizerSpec, smap, overrides: dict | None, errors: Collector) -> None:
    """Hyperparameters (the spec's defaults, then overrides) must lie in their valid ranges.

    An override's error points at the hyperparameter's declaration and says where the value came from.
    """
    for name, value in spec.hyper.items():
        why = _hyper_problem(name, value)
        if why:
            errors.error("E502", f"hyperparameter `{name}` = {value!r} is out of range",
                         smap.get("hyper", name) if smap else None, why)
    for name, value in (overrides or {}).items():
        if name not in spec.hyper:
            from nlc.diagnostics import did_you_mean
            errors.error("E208", f"override `{name}` names no hyperparameter of `{spec.name}`",
                         smap.get("hyper") if smap else None, did_you_mean(name, spec.hyper))
            continue
        why = _hyper_problem(name, value)
        if why:
            errors.error("E502", f"override `{name}={value!r}` is out of range",
                         smap.get("hyper", name) if smap else None, why)


def check(loaded, errors: Collector) -> None:
    spec = loaded.spec
    if isinstance(spec, S.OptimizerSpec):
        check_hyper(spec, loaded.smap, None, errors)

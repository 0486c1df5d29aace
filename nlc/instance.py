"""Repeated levels: a block that names a level twice holds two instances of it.

`block: [gdn, mlp, gdn, mlp, swa, mlp]` is how hybrids are written. Each occurrence of a level
is its own instance, with its own parameters and state. `instanced(spec)` makes that explicit
before lowering and code generation: the n-th occurrence (n >= 2) of level `L` becomes a copy
named `L__n`, together with copies `s__n` of every signal and generator it reads (transitively),
so that the levels of one repetition share signals exactly as the first occurrences do, and no
two repetitions share anything. Names containing `__` are reserved for these copies.
"""
from __future__ import annotations

from nlc import spec as S
from nlc.expr import Name, subst

SEP = "__"


def instance_name(name: str, n: int) -> str:
    """The name of the n-th occurrence (1-based) of level `name`."""
    return name if n == 1 else f"{name}{SEP}{n}"


def occurrences(spec: S.ModelSpec) -> list[tuple[str, str, int]]:
    """(instance, level, n) for each entry of the block, n counting occurrences of that level."""
    seen: dict[str, int] = {}
    out = []
    for name in spec.model.block:
        seen[name] = seen.get(name, 0) + 1
        out.append((instance_name(name, seen[name]), name, seen[name]))
    return out


def _rename_level(lv: S.Level, names: dict, fns: dict) -> S.Level:
    def r(e):
        return None if e is None else subst(e, names, fns)
    update = {f: r(getattr(lv, f)) for f in ("key", "value", "query", "gate", "output")}
    if lv.objective is not None:
        update["objective"] = lv.objective.model_copy(update={"pred": r(lv.objective.pred),
                                                               "target": r(lv.objective.target)})
    update["rule"] = tuple(st.model_copy(update={"args": tuple(r(a) for a in st.args),
                                                 "kwargs": {k: r(v) for k, v in st.kwargs.items()}})
                           for st in lv.rule)
    return lv.model_copy(update=update)


def instanced(spec: S.ModelSpec) -> S.ModelSpec:
    """The spec with every repeated block level made its own instance (unchanged if none repeats)."""
    occ = occurrences(spec)
    if all(n == 1 for _, _, n in occ):
        return spec
    levels, signals = dict(spec.levels), dict(spec.signals)
    for inst, name, n in occ:
        if n == 1 or name not in spec.levels:
            continue
        # the level, the generators it applies and the signals it reads, transitively
        own = {name} | S.generators_of(spec, name)
        sigs = S.reads(spec, [e for lv in own for e in spec.levels[lv].flows()])[1]
        fns = {lv: instance_name(lv, n) for lv in own}
        names = {s: Name(id=instance_name(s, n)) for s in sigs}
        for s in sigs:
            signals[instance_name(s, n)] = subst(spec.signals[s], names, fns)
        for lv in own:
            levels[instance_name(lv, n)] = _rename_level(spec.levels[lv], names, fns)
    model = spec.model.model_copy(update={"block": tuple(inst for inst, _, _ in occ)})
    return spec.model_copy(update={"model": model, "levels": levels, "signals": signals})

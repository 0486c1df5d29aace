"""`nlc verify`: the compiler checks its own output. For any model spec, including a new rule,
compile it, draw random inputs, and hold the forms of every level together: the token-by-token
recurrent form (the oracle), the torch chunked form and the Triton kernels, on logits, each
level's final state and the gradients of each level's parameters.

The three models share one set of weights; only `model.mode` ("recurrent" | "chunk") and
`model.backend` ("torch" | "triton") differ, so a disagreement is a disagreement of forms. One
block is enough (every layer runs the same generated code), so the spec is compiled with
`layers: 1` at its own widths, head size and chunk sizes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["Row", "verify", "render"]

TOL = {torch.float64: 1e-8, torch.float32: 1e-3}


@dataclass
class Row:
    level: str
    compare: str          # "chunk vs recurrent" | "triton vs chunk"
    logits: float | None
    state: float | None
    grad: float | None
    tol: float
    note: str = ""

    @property
    def ok(self) -> bool:
        return all(e is None or e <= self.tol for e in (self.logits, self.state, self.grad))


def _err(x, y) -> float:
    if y.numel() == 0:
        return 0.0
    return ((x - y).abs().max() / y.abs().max().clamp_min(1.0)).item()


def _run(model, ids, seed):
    logits, state = model(ids)
    gen = torch.Generator().manual_seed(seed)
    probe = torch.randn(logits.shape, generator=gen, dtype=logits.dtype).to(logits.device)
    loss = (logits * probe).sum() + sum(s.square().sum() for s in state.values() if torch.is_tensor(s))
    names = [n for n, p in model.named_parameters()]
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True, materialize_grads=True)
    return logits.detach(), {k: v.detach() for k, v in state.items() if torch.is_tensor(v)}, dict(zip(names, grads))


def _owner(key: str, levels) -> str | None:
    """The level a state key ('0.memory.S') or parameter name ('blocks.0.memory_key_proj.w') belongs to."""
    part = key.split(".")[2] if key.startswith("blocks.") else key.split(".")[1] if "." in key else key
    for lv in sorted(levels, key=len, reverse=True):
        if part == lv or part.startswith(lv + "_") or part.startswith(lv + "."):
            return lv
    return None


def verify(spec, backend: str = "triton", dtype=torch.float64, tokens: int | None = None, seed: int = 0,
           device: str | None = None) -> tuple[list[Row], dict]:
    """Rows of errors per level and comparison, and facts about the run (sizes, device)."""
    import nlc
    from nlc.backends.triton.plan import fused_flows, plan
    from nlc.instance import instanced

    spec = spec.model_copy(update={"model": spec.model.model_copy(update={"layers": 1})})
    placement = plan(spec)
    inst = instanced(spec).levels
    levels = list(inst)
    chunks = [lv.chunk_size() for lv in inst.values()      # attention and static levels have no chunk
              if lv.memory.kind != "attention" and not (lv.every is not None and lv.every.period is None)]
    T = tokens or 2 * max(chunks or [16]) + 3       # two whole chunks and a part
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    base = nlc.compile(spec, backend="torch").to(device=device, dtype=dtype)
    ids = torch.randint(0, spec.model.vocab, (2, T), generator=torch.Generator().manual_seed(seed)).to(device)
    forms = {"recurrent": ("recurrent", "torch"), "chunk": ("chunk", "torch")}
    served = [n for n, p in placement.items() if p.skeleton]
    fused = [at for at, _ in fused_flows(spec)]      # flows that run as one Triton kernel each
    if backend != "torch" and (served or fused):
        forms["triton"] = ("chunk", "triton")
    results = {}
    for name, (mode, be) in forms.items():
        base.mode, base.backend = mode, be
        results[name] = _run(base, ids, seed)
    tol = TOL[dtype]
    rows = []
    pairs = [("chunk", "recurrent")] + ([("triton", "chunk")] if "triton" in results else [])
    for a, b in pairs:
        (la, sa, ga), (lb, sb, gb) = results[a], results[b]
        logit_err = _err(la, lb)
        for lv in levels:
            keys = [k for k in sb if _owner(k, levels) == lv]
            params = [k for k in gb if _owner(k, levels) == lv]
            state = max((_err(sa[k], sb[k]) for k in keys), default=None)
            grad = max((_err(ga[k], gb[k]) for k in params), default=None)
            note = ""
            if a == "triton":
                p = placement.get(lv)
                note = p.describe() if p else "a generator's copy"
                note += _flows_note([f for f in fused if f.split(".")[0] == lv])
            rows.append(Row(lv, f"{a} vs {b}", None, state, grad, tol, note))
        shared = [k for k in gb if _owner(k, levels) is None]
        signals = [f for f in fused if "." not in f] if a == "triton" else []
        rows.append(Row("(model)", f"{a} vs {b}", logit_err, None,
                        max((_err(ga[k], gb[k]) for k in shared), default=None), tol,
                        "logits; embedding, signals, norms and head" + _flows_note(signals)))
    if backend != "torch" and not (served or fused):
        rows.append(Row("(model)", "triton vs chunk", None, None, None, tol,
                        "no level of this spec has a Triton skeleton and no flow is fused: everything runs on torch"))
    facts = dict(T=T, B=2, device=device, dtype=str(dtype).replace("torch.", ""), d_model=spec.model.d_model,
                 heads=spec.model.heads, tol=tol)
    return rows, facts


def _flows_note(flows) -> str:
    return f"; fused flow{'s' if len(flows) > 1 else ''} {', '.join(f'`{f}`' for f in flows)} on Triton" if flows else ""


def render(rows: list[Row], facts: dict, name: str) -> str:
    fmt = lambda e: "—" if e is None else ("nan" if math.isnan(e) else f"{e:.1e}")  # noqa: E731
    lines = [f"verify `{name}`: 1 block, B={facts['B']}, T={facts['T']}, {facts['dtype']} on {facts['device']}, "
             f"tolerance {facts['tol']:.0e} (max |x - y| / max(max |y|, 1))",
             f"{'level':<14} {'forms':<20} {'logits':>8} {'state':>8} {'grads':>8}  ok  note"]
    for r in rows:
        lines.append(f"{r.level:<14} {r.compare:<20} {fmt(r.logits):>8} {fmt(r.state):>8} {fmt(r.grad):>8}  "
                     f"{'ok' if r.ok else 'NO'}  {r.note}")
    return "\n".join(lines)

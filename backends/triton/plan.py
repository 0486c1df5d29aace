"""Which skeleton serves each level, with which holes, or why none does.

``plan(spec)`` reads the (instanced) spec and its derived rules, never torch: for every level in
the block it returns a :class:`Placement`, either a skeleton and its flags (the level's terms) or
the torch form it runs on and why. ``nlc build --backend triton`` writes it to the manifest and
prints it; the generated model follows it (a level with no skeleton is called with
``backend='torch'``); ``header`` is the comment block on top of a level's kernel file.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from nlc import spec as S
from nlc.expr import Call, Num
from nlc.instance import instanced
from nlc.rules import derive

__all__ = ["Placement", "plan", "pow2", "products", "delta_terms", "mlp_flags", "momentum_flags", "mlp_slice", "header",
           "describe", "fused_flows", "flow_chains", "flow_kernel", "flow_header", "kernel_levels", "AUTO_MLP", "AUTO_GENERATORS", "momentum_fits", "delta_why"]

MLP_CHUNKS = (16, 32, 64)      # skeleton 2's tiles: the MLP memory's chunk is semantics, never rounded
MLP_ACTIVATIONS = ("silu", "gelu")
MLP_MAX_DIM = 256
# The backward kernel's tiles are [chunk, slice]: it takes D, d_out and v's columns a slice at a
# time (mlp_slice), chunk x slice within this bound. ptxas for sm_90 with Hope's flags when the
# tiles were [chunk, width] (an H100 has 227 KB of shared memory): float64 ("ieee" products, 16
# warps) 209 KB at 64 x 64, 152 KB at 32 x 128, 153 KB at 16 x 256, but 319 KB at 64 x 128;
# float32 ("tf32x3", 4 warps) 98, 51, 51 and 164 KB, and 295 KB at 64 x 256 (Hope's M_mem: 98 KB
# in 64-wide slices).
MLP_BWD_TILE = 64 * 64
MOMENTUM_CHUNKS = (16, 32, 64)  # skeleton 1c's tiles: the momentum memory's chunk is semantics too
MOMENTUM_MAX_DIM = 256
# Skeleton 1c keeps [chunk, K] tiles on chip (the whole key dimension per program). ptxas for sm_90,
# backward with the erase (an H100 has 227 KB of shared memory): float32's tf32x3 products 205 KB at
# chunk x K 64 x 128, 68 KB at 32 x 256, 369 KB at 64 x 256; float64 (ieee) 106, 82 and 147 KB.
# TF32 products need more (246 KB at 64 x 128, 262 at 32 x 256), so 16-bit inputs take them only
# at K up to 64 (momentum.precision).
MOMENTUM_TILE = 64 * 128
DPLR_MAX_K = 128                # skeleton 1d's per-chunk state transition is one [K, K] tile
# Skeleton 1 holds the state in two [K / 2, BV] halves: ptxas for sm_90 gives its backward state
# pass 352,512 B of shared memory at K = 256 in float32 (an H100 has 227 KB), ~188 KB at 128.
DELTA_MAX_K = 128
AUTO_MLP = ("with backend auto, forward and backward kernels for CUDA tensors, training included: an H100 "
            "trained Titans 3.7x faster than on the torch form")
# A generator (a level read inside another level's flows) is updated once per chunk of its own
# inside the model's scan; a kernel call per generator per chunk dispatches more than the stacked
# torch scan's one update of all generators (Hope, T = 64, on a CPU: 15.1K aten ops and 128
# launches against 11.3K ops forward, 28.7K and 192 against 19.4K forward + backward), and such
# small calls are launch-bound on a GPU.
AUTO_GENERATORS = ("with backend auto, the stacked torch scan (one update of every generator per chunk); "
                   "backend triton runs this kernel per generator per chunk, which dispatches more ops")


def pow2(n: int, lo: int = 16) -> int:
    """The tile that holds n: the least power of two >= n, at least ``lo`` (tl.dot's minimum 16)."""
    p = lo
    while p < n:
        p *= 2
    return p


PRODUCTS = ("The kernels accumulate in float32 (float64 for float64 inputs) and take their products by the "
            "inputs' dtype: float64 exact (`ieee`); float32 as three TF32 products (`tf32x3`, float32's order "
            "of error; `ieee` in `delta_chunk` and `diag_chunk`); bfloat16 and float16 as TF32 (`tf32`, finer "
            "than bfloat16's own rounding; `delta_chunk` multiplies the inputs themselves as 16-bit operands; "
            "`momentum_chunk` takes `tf32x3` for them too at heads over 64, where TF32's operands would not fit an "
            "H100's shared memory).")


def products(inputs, float32: str = "tf32x3") -> str:
    """The precision of a kernel's ``tl.dot`` products for inputs of this dtype (a torch dtype or
    its name), one rule for every skeleton: float64 exact ("ieee", FMA loops); float32 ``float32``
    ("tf32x3", three TF32 tensor-core products, an error of float32's order, for skeletons 1c, 1d
    and 2; skeletons 1 and 1b still pass "ieee"); 16-bit inputs "tf32", whose 10-bit mantissa is
    as fine as float16's and finer than bfloat16's 7 bits, so the products add less error than
    the inputs' own rounding (accumulation stays float32). The interpreter ignores the choice."""
    name = str(inputs).rsplit(".", 1)[-1]
    if name == "float64":
        return "ieee"
    return float32 if name == "float32" else "tf32"


def delta_why(K: int) -> str | None:
    """Why skeleton 1 (the scalar-retention delta family) cannot take heads of K keys (None: it can)."""
    if K > DELTA_MAX_K:
        return (f"the delta kernels take K up to {DELTA_MAX_K} (their state passes' tiles in an H100's shared "
                f"memory), got {K}")
    return None


def momentum_fits(chunk: int, K: int) -> bool:
    """Whether skeleton 1c's tiles at this chunk and head size fit an H100 (``MOMENTUM_TILE``)."""
    return chunk * pow2(K) <= MOMENTUM_TILE


def mlp_slice(chunk: int, *widths: int) -> int:
    """The deep memory's backward kernel's slice: how many columns of D, d_out and v it takes at a
    time (all of them where chunk x width is within ``MLP_BWD_TILE``)."""
    return min(pow2(max(widths)), max(16, MLP_BWD_TILE // chunk))


@dataclass(frozen=True)
class Placement:
    level: str
    skeleton: str | None            # None: runs on torch
    flags: dict = field(default_factory=dict)
    why: str = ""                   # what runs instead, and why (skeleton None)
    generator: bool = False         # read inside other levels' flows (outside the block), updated per chunk

    def auto(self) -> str:
        """What ``backend="auto"`` does with this level beyond "kernels on CUDA", or ''."""
        if self.skeleton != "mlp_chunk":
            return ""
        return AUTO_GENERATORS if self.generator else AUTO_MLP

    def describe(self) -> str:
        if self.skeleton is None:
            return f"torch: {self.why}"
        on = ", ".join(k for k, v in sorted(self.flags.items()) if v) or "no optional terms"
        return f"Triton skeleton `{self.skeleton}` ({on})"


def _is(e, value: float) -> bool:
    return isinstance(e, Num) and float(e.value) == value


def delta_terms(d) -> tuple[bool, bool]:
    """(retention present, erase present) of a generalized-delta rule: a = 1 and b = 0 are absent."""
    return not _is(d.a, 1.0), d.b is not None and not _is(d.b, 0.0)


def plan(spec: S.ModelSpec) -> dict[str, Placement]:
    spec = instanced(spec)
    derived = derive(spec)
    out = {}
    K = spec.model.d_model // spec.model.heads
    for name, lv in spec.levels.items():
        m, d = lv.memory, derived[name]
        if isinstance(m, S.AttentionMemory):
            p = Placement(name, None, why="softmax attention runs as torch's scaled_dot_product_attention "
                                          "(flash attention on CUDA); no skeleton is needed")
        elif isinstance(m, S.MatrixMemory) and d.family == "generalized_delta":
            if d.diagonal and d.u is None:
                p = Placement(name, "diag_chunk", {})
            elif d.diagonal and K > DPLR_MAX_K:
                p = Placement(name, None, why=f"skeleton 1d (the DPLR form) takes head sizes up to {DPLR_MAX_K} "
                                              f"(its state transition is one [K, K] tile), this level has {K}")
            elif d.diagonal:
                p = Placement(name, "dplr_chunk", {})
            elif delta_why(K):
                p = Placement(name, None, why=f"skeleton 1 (the delta kernels) takes head sizes up to {DELTA_MAX_K} "
                                              f"(its state passes' tiles in an H100's shared memory), this level has {K}")
            else:
                decay, erase = delta_terms(d)
                p = Placement(name, "delta_chunk", {"DECAY": decay, "ERASE": erase})
        elif isinstance(m, S.MatrixMemory):
            why, flags = momentum_flags(spec, name, d)
            p = Placement(name, None, why=why) if why else Placement(name, "momentum_chunk", flags)
        elif isinstance(m, S.MLPMemory) and lv.every is not None and lv.every.period is None:
            p = Placement(name, None, why="a static MLP (frequency 0) is dense layers: torch matmuls")
        elif isinstance(m, S.MLPMemory) and lv.objective is not None and lv.objective.loss == "task":
            p = Placement(name, None, why="a CMS level is dense layers updated by the outer loss's "
                                          "gradient every period: torch matmuls")
        else:
            why, flags = mlp_flags(spec, name, d)
            p = Placement(name, None, why=why) if why else Placement(
                name, "mlp_chunk", flags, generator=name not in spec.model.block)
        out[name] = p
    return out


def mlp_flags(spec, name: str, d) -> tuple[str | None, dict]:
    """(why skeleton 2 cannot serve this MLP memory level, or None; its flags)."""
    lv = spec.levels[name]
    m = lv.memory
    K = spec.model.d_model // spec.model.heads
    hidden, d_out = int(round(K * m.expansion)), (1 if lv.out == "scalar" else K)
    chunk = lv.chunk_size()
    if m.depth != 2:
        return f"skeleton 2 takes depth-2 MLP memories, this one has depth {m.depth}", {}
    if m.activation not in MLP_ACTIVATIONS:
        return f"skeleton 2 takes activations {', '.join(MLP_ACTIVATIONS)}, not {m.activation}", {}
    if chunk not in MLP_CHUNKS:
        return (f"skeleton 2 takes chunks of {', '.join(map(str, MLP_CHUNKS))} tokens (its tile; the MLP "
                f"memory's chunk is part of its semantics, so it is never rounded), not {chunk}"), {}
    if max(K, hidden, d_out) > MLP_MAX_DIM:
        return f"skeleton 2 takes sizes up to {MLP_MAX_DIM}, this memory has {max(K, hidden, d_out)}", {}
    if lv.init != "meta" or d.momentum is not None and d.momentum[0] != "momentum" or d.pre_retain is not None:
        return "this MLP memory runs on torch only (see its explain note)", {}
    target = d.target
    self_target = getattr(target, "fn", None) == "M"
    return None, {"MOMENTUM": d.momentum is not None, "RETAIN": d.retain is not None,
                  "ERASE": d.erase is not None, "SELF_TARGET": self_target, "RESIDUAL": bool(m.residual),
                  "CURRENT": lv.read == "current" and name in spec.model.block, "L2": d.loss == "l2",
                  "GELU": m.activation == "gelu"}


def momentum_flags(spec, name: str, d) -> tuple[str | None, dict]:
    """(why skeleton 1c cannot serve this momentum matrix memory level, or None; its flags)."""
    lv = spec.levels[name]
    K = spec.model.d_model // spec.model.heads
    chunk = lv.chunk_size()
    if chunk not in MOMENTUM_CHUNKS:
        return (f"skeleton 1c takes chunks of {', '.join(map(str, MOMENTUM_CHUNKS))} tokens (its tile; the "
                f"momentum memory's chunk is part of its semantics, so it is never rounded), not {chunk}"), {}
    if K > MOMENTUM_MAX_DIM:
        return f"skeleton 1c takes head sizes up to {MOMENTUM_MAX_DIM}, this memory has {K}", {}
    if not momentum_fits(chunk, K):
        return (f"skeleton 1c takes chunk x head size up to {MOMENTUM_TILE} (64 x 128 or 32 x 256: its tiles in "
                f"an H100's shared memory), this level has {chunk} x {K}"), {}
    if d.momentum[0] != "momentum" or d.pre_retain is not None:
        return "this momentum memory runs on torch only (see its explain note)", {}
    return None, {"ERASE": d.erase is not None, "L2": d.loss == "l2"}


def header(spec_name: str, source: str, level: str, rule: str, p: Placement, sha: str) -> str:
    """The comment block on top of a level's generated kernel file."""
    flags = ", ".join(f"{k}={'on' if v else 'off'}" for k, v in sorted(p.flags.items()))
    return "\n".join([
        f"{level}: Triton kernels of level `{level}` of spec `{spec_name}`" + (f" ({source})" if source else ""),
        f"rule: {rule}",
        f"skeleton: {p.skeleton} (backends/triton/skeletons/{p.skeleton}.py), holes: {flags}",
        f"body sha256[:16]: {sha} (what runs: the cached module triton/{p.skeleton}_{sha}.py under $NLC_CACHE_DIR, default ~/.cache/nlc)",
        "Generated by nlc: do not edit; change the spec and run `nlc build --backend triton` again.",
    ])


def flow_kernel(width: int, ops: tuple) -> tuple[str, dict, dict]:
    """``(name, flags, code)`` of the fused-flow kernel of a chain (``prologue.chain_of``): the
    name ``conv4_silu_l2norm`` (``proj`` for the identity; the build's ``kernels/flows/NAME.py``, a
    folder of its own, so that no level's name can collide with it), skeleton ``flow_prologue``."""
    from nlc.backends.triton.prologue import code
    name = "_".join(([f"conv{width}"] if width else []) + list(ops) or ["proj"])
    return name, {"CONV": bool(width)}, code(ops)


def flow_header(spec_name: str, source: str, name: str, chain: str, flows: list, sha: str) -> str:
    """The comment block on top of a fused flow's generated kernel file."""
    return "\n".join([
        f"flows/{name}: the Triton kernel of the fused flow{'s' if len(flows) > 1 else ''} "
        f"{', '.join(f'`{f}`' for f in flows)} of spec `{spec_name}`" + (f" ({source})" if source else ""),
        f"chain: {chain} (after the projection, a torch matmul), forward and backward",
        "skeleton: flow_prologue (backends/triton/skeletons/flow_prologue.py), holes: CONV, and FORWARD and "
        "BACKWARD written from the chain (nlc.backends.triton.prologue.code)",
        f"body sha256[:16]: {sha} (what runs: the cached module triton/flow_prologue_{sha}.py under $NLC_CACHE_DIR, default ~/.cache/nlc)",
        "Generated by nlc: do not edit; change the spec and run `nlc build --backend triton` again.",
    ])


def kernel_levels(spec: S.ModelSpec, backend: str) -> list[str]:
    """The levels that run a Triton kernel on CUDA tensors with ``backend`` (auto keeps generators,
    the levels outside the block, on the stacked torch scan: AUTO_GENERATORS)."""
    if backend == "torch":
        return []
    return [n for n, p in plan(spec).items() if p.skeleton and (backend == "triton" or not p.generator)]


def fused_flows(spec: S.ModelSpec) -> list[tuple[str, object]]:
    """``(where, expression)`` of every flow of a model spec that the generated model runs as one
    ``L.flow`` call (``prologue.fuses``; fused on Triton): signals by name, levels' key, value and
    query as ``LEVEL.ROLE``; outermost fused call only."""
    from nlc.backends.triton.prologue import fuses
    spec_i = instanced(spec)
    fused = []

    def walk(e, at):
        if isinstance(e, Call):
            if fuses(e):
                fused.append((at, e))
                return
            for a in e.args:
                walk(a, at)
        for child in (getattr(e, "left", None), getattr(e, "right", None), getattr(e, "arg", None)):
            if child is not None:
                walk(child, at)
    for n, e in spec_i.signals.items():
        walk(e, n)
    for name, lv in spec_i.levels.items():
        for role in ("key", "value", "query"):
            if getattr(lv, role, None) is not None:
                walk(getattr(lv, role), f"{name}.{role}")
    return fused


def flow_chains(spec: S.ModelSpec) -> dict[tuple[int, tuple], list[str]]:
    """The distinct chains ``(width, ops)`` (``prologue.chain_of``) of a spec's fused flows, sorted,
    each with the flows that run it: one kernel per chain."""
    from nlc.backends.triton.prologue import chain_of
    chains = {}
    for at, e in fused_flows(spec):
        chains.setdefault(chain_of(e)[:2], []).append(at)
    return dict(sorted(chains.items()))


def describe(spec: S.ModelSpec, backend: str) -> str:
    """Markdown for ``nlc explain``: what runs each level and each flow of a model spec on
    ``backend`` ("torch", "triton" or "auto"), as the generated model dispatches it."""
    if backend == "torch":
        return ("## What runs (`backend=\"torch\"`)\n\nEvery level and flow runs as torch ops: the chunked "
                "forms of `nlc.backends.torch`, the Triton kernels' reference.\n")
    where = ("On CPU tensors every level runs on torch. On CUDA tensors:" if backend == "auto" else
             "CUDA tensors run the kernels compiled; CPU tensors run the same kernels under Triton's interpreter.")
    out = [f"## What runs (`backend=\"{backend}\"`)", "", where, "", "| level | runs on |", "| --- | --- |"]
    for name, p in plan(spec).items():
        if p.skeleton is None:
            out.append(f"| `{name}` | torch: {p.why} |")
            continue
        text = p.describe() + ": forward and backward kernels"
        if backend == "auto" and p.generator:
            text = ("torch: the stacked scan of every generator, one update per chunk (`auto` does not run "
                    f"{p.describe()} per generator per chunk: more launches than the stacked scan)")
        if p.generator:
            text += "; its reads (a generator's output, at each chunk's anchor) are torch matmuls"
        out.append(f"| `{name}` | {text} |")
    fused = [f"`{at}`: `{e}`" for at, e in fused_flows(spec)]
    if fused:
        on = ", on CUDA tensors" if backend == "auto" else ""
        flows = f"Fused flows (one Triton kernel each, skeleton `flow_prologue`{on}): {'; '.join(fused)}."
    else:
        flows = "No flow has the fused form (`f(...(conv(proj(x))))`): flows run as torch ops."
    out += ["", flows, "Every other flow runs as torch ops; projections are torch matmuls.", "", PRODUCTS, ""]
    return "\n".join(out)

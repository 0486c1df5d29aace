"""Derive each level's update rule from (memory kind, objective, rule chain).

For matrix memories the result is the per-token triple of the generalized delta recurrence
(Nested Learning §8, memory M of shape V x K, unit-norm keys where an erase is combined):

    M_t = M_{t-1} (a_t I - b_t k_t k_t^T) + w_t k_t^T

Chain semantics (nlc/vocab.py RULES): state primitives before `grad` give P(M) = a1 M (the state
the gradient is taken at); `grad` gives u = dL/dM at P(M); `scale` multiplies u; `momentum`/`ema`
keep a state S of u; state primitives after `grad` give Q(M) = M (a2 I - b2 k k^T) with `dgd`
erasing from the state before the step; the new state is Q(P(M)) - u. Without momentum, for
L = 1/2 ||M k - tau||^2:  a = a1 a2,  b = a1 (b2 + c),  w = c tau;  for L = -<M k, tau>:
a = a1 a2, b = a1 b2, w = c tau. With momentum the rule is a pair of linear recurrences
(Titans); MLP memories apply the same chain per weight matrix with gradients at the chunk's
anchor, the erase acting on the input-side matrix.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from nlc import spec as S
from nlc.expr import Bin, Call, ExprNode, Index, ListE, Name, Neg, Num

_GREEK = {"alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu", "nu",
          "xi", "rho", "sigma", "tau", "phi", "chi", "psi", "omega"}


_OPT_TEX = {"grad": "g_{t}", "param": r"\theta_{t-1}", "step": "t", "key": "k_{t}", "value": "v_{t}", "query": "q_{t}"}


@dataclass
class Derived:
    """What `derive` found for one level."""
    level: str
    family: str                      # generalized_delta | momentum | mlp | attention | static | task
    objective_tex: str = ""
    equations: list[str] = field(default_factory=list)   # LaTeX, one per display line
    a: ExprNode | None = None        # generalized delta scalars per token (matrix memories)
    b: ExprNode | None = None
    w: ExprNode | None = None
    u: ExprNode | None = None        # the rank-one erase in general: M (diag(a) - e u^T), vectors per key channel
    e: ExprNode | None = None
    diagonal: bool = False           # a, u or e is per key channel (or the erase key is not the key): use (a, u, e)
    momentum: tuple[str, ExprNode] | None = None   # ("momentum" | "ema", decay)
    notes: list[str] = field(default_factory=list)
    # the chain's parts, for backends: u = step * grad (then momentum); M = retain M - erase M key key^T - u
    loss: str = ""
    pred: ExprNode | None = None
    target: ExprNode | None = None
    step: ExprNode | None = None           # None = 1
    retain: ExprNode | None = None         # after grad; None = 1
    pre_retain: ExprNode | None = None     # before grad (the gradient is taken at the retained state)
    erase: ExprNode | None = None          # DGD erase strength; None = 0
    erase_key: ExprNode | None = None
    other_steps: list[str] = field(default_factory=list)   # primitives a backend must also apply


# ---------------------------------------------------------------- expression helpers

def _mul(x: ExprNode | None, y: ExprNode | None) -> ExprNode | None:
    """Product with 1 as None, folding numbers."""
    if x is None:
        return y
    if y is None:
        return x
    if isinstance(x, Num) and isinstance(y, Num):
        return Num(value=x.value * y.value)
    return Bin(op="*", left=x, right=y)


def _add(x: ExprNode | None, y: ExprNode | None) -> ExprNode | None:
    """Sum with 0 as None."""
    if x is None:
        return y
    if y is None:
        return x
    if isinstance(x, Num) and isinstance(y, Num):
        return Num(value=x.value + y.value)
    return Bin(op="+", left=x, right=y)


def _or1(e: ExprNode | None) -> ExprNode:
    return Num(value=1.0) if e is None else e


def _const_tex(name: str) -> str:
    """`beta1` -> \\beta_{1}, `lr` -> \\mathrm{lr}, `weight_decay` -> \\mathrm{weight\\_decay}."""
    import re
    m = re.fullmatch(r"([A-Za-z]+)(\d+)", name)
    head, sub = (m[1], m[2]) if m else (name, "")
    body = "\\" + head if head in _GREEK else (head if len(head) == 1 else r"\mathrm{" + head.replace("_", r"\_") + "}")
    return f"{body}_{{{sub}}}" if sub else body


def tex(e: ExprNode | None, t: str = "t", consts: frozenset = frozenset()) -> str:
    """LaTeX for an expression; flows get the token subscript `t`, names in `consts`
    (hyperparameters) none."""
    if e is None:
        return "1"
    if isinstance(e, Num):
        return str(e)
    if isinstance(e, Name) and e.id in _OPT_TEX:
        return _OPT_TEX[e.id].replace("{t}", t or "t")
    if isinstance(e, Name) and e.id == "head":
        return "h"
    if isinstance(e, Name) and e.id in consts:   # a hyperparameter: no time index
        return _const_tex(e.id)
    if isinstance(e, Name):
        base = "\\" + e.id if e.id in _GREEK else e.id
        if "_" in e.id and e.id.split("_")[0] != "":
            head, sub = e.id.split("_", 1)
            base = ("\\" + head if head in _GREEK else head) + "_{\\mathrm{" + sub + "}}"
            return base
        return f"{base}_{t}" if t else base
    if isinstance(e, Neg):
        return "-" + tex(e.arg, t, consts)
    if isinstance(e, Bin):
        l, r = tex(e.left, t, consts), tex(e.right, t, consts)
        if isinstance(e.left, Bin) and e.left.op in "+-" and e.op in "*/^":
            l = f"({l})"
        if isinstance(e.right, Bin) and e.right.op in "+-" and e.op in "*-/^":
            r = f"({r})"
        return {"+": f"{l} + {r}", "-": f"{l} - {r}", "*": f"{l}\\,{r}", "/": f"\\frac{{{l}}}{{{r}}}",
                "^": f"{{{l}}}^{{{r}}}"}[e.op]
    if isinstance(e, Call):
        args = ", ".join([tex(a, t, consts) for a in e.args] + [f"{k}={tex(v, t, consts)}" for k, v in e.kwargs.items()])
        fn = e.fn.replace("_", "\\_")
        if e.fn == "M":
            return f"M({args})"
        if e.fn.startswith("M_"):
            return f"M_{{\\mathrm{{{e.fn[2:].replace('_', '')}}}}}({args})"
        if e.fn == "sqrt":
            return f"\\sqrt{{{args}}}"
        return f"\\mathrm{{{fn}}}({args})"
    if isinstance(e, Index):
        return f"{tex(e.base, '', consts)}_{{{tex(e.index, '', consts)}}}"
    if isinstance(e, ListE):
        return "[" + ", ".join(tex(i, t, consts) for i in e.items) + "]"
    return str(e)


# ---------------------------------------------------------------- derivation

def derive_level(name: str, lv: S.Level, typeof=None) -> Derived:
    """The update rule of level `name`. `typeof(expr, level)` gives a flow's shape type (`vec`,
    `head`, `const`; nlc.check.FlowTypes): it decides whether a matrix rule is scalar or diagonal."""
    typeof = typeof or (lambda e, level=None: None)
    m = lv.memory
    if isinstance(m, S.AttentionMemory):
        win = f" over the last {m.window} tokens" if m.window else ""
        return Derived(name, "attention", "", [
            r"o_t = \sum_{s \le t} \frac{\exp(q_t^\top k_s / \sqrt{d})}{\sum_{r \le t} \exp(q_t^\top k_r / \sqrt{d})}\, v_s"],
            notes=[f"Non-parametric: the closed-form minimiser of a weighted L2 objective{win}; frequency infinity."]
            + (["Queries and keys are rotated by their absolute positions (RoPE)."] if m.rope else []))
    if lv.every is not None and lv.every.period is None:
        return Derived(name, "static", "", [r"y_t = \mathrm{MLP}_{\theta}(x_t)"],
                       notes=["Frequency 0: its parameters are trained by the outer level (the optimizer) only."])
    loss = lv.objective.loss if lv.objective else "l2"
    if loss == "task":
        periods = ", ".join(map(str, lv.every.period)) if lv.every and lv.every.period else "1"
        c = _chain_scale(lv)
        return Derived(name, "task", r"\mathcal{L}_{\mathrm{task}}(\theta) \text{ (the model's loss on tokens already seen)}", [
            r"\theta^{(\ell)} \leftarrow \theta^{(\ell)} - " + tex(c, "") +
            r" \sum_{t \in \text{chunk}} \nabla_{\theta^{(\ell)}} \mathcal{L}_{\mathrm{task}}(x_t)"
            r" \quad \text{once per chunk of } C_\ell \text{ tokens}"],
            notes=[f"Continuum memory: level ell has chunk C_ell in ({periods}); every block runs on every token, "
                   "only its update is gated.",
                   "The sum counts every next-token pair whose target arrives in the chunk (the pair that crosses a "
                   "window or a call boundary included), each gradient taken at the fast weights that made the "
                   "prediction; first order (the update is not differentiated by the outer level). In-context "
                   "weights belong to one sequence."])
    pred = lv.objective.pred if lv.objective and lv.objective.pred is not None else Call(fn="M", args=(Name(id="key"),))
    target = lv.objective.target if lv.objective and lv.objective.target is not None else Name(id="value")
    key = Name(id="key")
    obj = (rf"\mathcal{{L}}(M) = \tfrac12 \left\| {tex(pred)} - {tex(target)} \right\|^2" if loss == "l2"
           else rf"\mathcal{{L}}(M) = -\left\langle {tex(pred)}, {tex(target)} \right\rangle")
    a1 = a2 = b2 = c = None
    mom = None
    seen_grad = False
    extra_u = []
    for step in lv.rule or (Call(fn="grad"),):
        arg = step.args[0] if step.args else None
        if step.fn == "grad":
            seen_grad = True
        elif step.fn == "retain":
            if seen_grad:
                a2, b2 = _mul(a2, arg), _mul(b2, arg) if b2 is not None else None
            else:
                a1 = _mul(a1, arg)
        elif step.fn == "dgd":
            lr = step.kwargs.get("lr", step.args[1] if len(step.args) > 1 else None)
            key = step.kwargs.get("key", step.args[0] if step.args else key)
            b2 = _add(b2, lr)
        elif step.fn == "scale":
            if mom is None:
                c = _mul(c, arg)
            else:
                extra_u.append(f"u_t \\leftarrow {tex(arg)}\\, u_t")
        elif step.fn in ("momentum", "ema"):
            mom = (step.fn, arg)
        else:
            extra_u.append(f"u_t \\leftarrow \\mathrm{{{step.fn.replace('_', chr(92) + '_')}}}(u_t)")
    kt = tex(key)
    anchor = r"M_{\xi}" if lv.chunk_size() > 1 else r"M_{t-1}"
    grad = (rf"\nabla \mathcal{{L}}({anchor})")
    state_tex = rf"M_{{t-1}}\left({tex(_or1(_mul(a1, a2)))}\, I - {tex(_mul(a1, b2) or Num(value=0))}\, {kt} {kt}^\top\right)"
    if b2 is None:
        state_tex = rf"{tex(_or1(_mul(a1, a2)))}\, M_{{t-1}}" if _mul(a1, a2) is not None else r"M_{t-1}"
    d = Derived(name, "", obj, loss=loss, pred=pred, target=target, step=c, retain=a2, pre_retain=a1,
                erase=b2, erase_key=key if b2 is not None else None,
                other_steps=[str(st) for st in lv.rule if st.fn not in ("grad", "scale", "momentum", "ema", "retain", "dgd")])
    if a1 is not None:
        d.notes.append("Retention before `grad`: the gradient is taken at the retained state.")
    if mom is None and not extra_u and isinstance(m, S.MatrixMemory):
        _generalized_delta(d, name, lv, typeof, a1, a2, b2, c, key, target, loss)
        return d
    d.family = "momentum" if mom is not None else ("mlp" if isinstance(m, S.MLPMemory) else "generalized_delta")
    u0 = rf"{tex(c)}\, {grad}" if c is not None else grad
    eqs = []
    if mom is not None:
        decay = tex(mom[1])
        eqs.append(rf"S_t = {decay}\, S_{{t-1}} + " + (rf"(1 - {decay})\, " if mom[0] == "ema" else "") + u0)
        eqs += extra_u
        eqs.append(rf"M_t = {state_tex} - S_t")
        d.momentum = mom
    else:
        eqs += extra_u
        eqs.append(rf"M_t = {state_tex} - {u0}")
    if isinstance(m, S.MLPMemory):
        body = {1: r"W_1 z", 2: r"W_1 \sigma(W_2 z)"}.get(m.depth, rf"W_1 \sigma(\cdots \sigma(W_{{{m.depth}}} z))")
        eqs.append(rf"{tex(pred)} \text{{ with }} M(z) = " + ("z + " if m.residual else "") + body)
        d.notes.append("Deep memory: the chain is applied to each weight matrix; the erase acts on the input-side "
                       "matrix (the one that reads the key), the others get plain retention.")
    chunk = lv.chunk_size()
    if chunk > 1:
        d.notes.append(f"Chunked form (chunk {chunk}): inside a chunk every gradient is taken at the anchor "
                       r"state M_xi (the state at the end of the previous chunk); the decays and momentum then form a "
                       "linear recurrence inside the chunk, computed in parallel.")
    if lv.query is not None and isinstance(m, S.MLPMemory):
        if lv.read == "current":
            eqs.append(r"o_t = M_{t-1}(q_t)")
            d.notes.append("Read (`read: current`): token t reads the anchor state updated by the anchor-taken "
                           "gradients of the chunk's earlier tokens, through momentum, retention and the erase.")
        else:
            eqs.append(r"o_t = M_{\xi}(q_t)" if chunk > 1 else r"o_t = M_{t-1}(q_t)")
            d.notes.append("Read (`read: anchor`, Eq. 90 as printed): token t reads the chunk's anchor state, so no "
                           "token reads what its own chunk wrote." if chunk > 1 else
                           "Read: token t reads the state after the previous token (chunk 1: both reads agree).")
    elif lv.query is not None:
        eqs.append(r"o_t = M_t\, q_t")
    elif isinstance(m, S.MLPMemory):
        d.notes.append("Read where a flow applies it (a generator): at its chunk's anchor state, the flows it "
                       "generates for a chunk feed its own update over that chunk.")
    d.equations = eqs
    return d


def _generalized_delta(d: Derived, name, lv, typeof, a1, a2, b2, c, key, target, loss) -> None:
    """The matrix rule as one step of M_t = M_{t-1}(diag(a) - e u^T) + w k^T (see the module doc):
    a = a1 a2; with the erase along K (the level's key unless `dgd(key=K)`), e = a1 K and
    u = (dgd's lr, times later retentions) K, plus c k for the L2 gradient, which erases along the
    key (one rank-one erase needs K = the key there: the checker refuses the rest). Scalar a1, a2 and
    lr with K = the key give the scalar triple (a, b, w) with b = a1 (lr + c)."""
    d.family = "generalized_delta"
    d.a = _or1(_mul(a1, a2))
    coef = _add(b2, _or1(c)) if loss == "l2" else b2      # the L2 gradient erases along k too
    d.b = _mul(a1, coef) if coef is not None else Num(value=0.0)
    d.w = _mul(c, target)
    level_key = Name(id="key")
    erase_key = key if str(key) not in ("key", str(lv.key)) else level_key
    if coef is not None:
        d.u, d.e = _mul(coef, erase_key), _mul(a1, erase_key)
    d.diagonal = erase_key is not level_key or "vec" in (typeof(d.a, name), typeof(coef, name), typeof(a1, name))
    if d.diagonal:
        d.b = None
        d.equations = [
            r"M_t = M_{t-1}\left(\mathrm{diag}(\bar a_t) - \bar e_t \bar u_t^\top\right) + \bar w_t\, k_t^\top",
            rf"\bar a_t = {tex(d.a)},\quad \bar e_t = {tex(d.e) if d.e is not None else '0'},\quad "
            rf"\bar u_t = {tex(d.u) if d.u is not None else '0'},\quad \bar w_t = {tex(d.w)}",
            r"o_t = M_t\, q_t"]
        d.notes.append("Products of two vectors here are element-wise (per key channel).")
        d.notes.append("Diagonal plus rank one: a retention per key channel and a rank-one erase; chunkwise-parallel "
                       "form: the WY/UT transform with per-channel decays (`generalized_delta` with `erase=(u, e)`).")
        return
    d.equations = [
        r"M_t = M_{t-1}\left(\bar a_t I - \bar b_t\, k_t k_t^\top\right) + \bar w_t\, k_t^\top",
        rf"\bar a_t = {tex(d.a)},\quad \bar b_t = {tex(d.b)},\quad \bar w_t = {tex(d.w)}",
        r"o_t = M_t\, q_t"]
    d.notes.append("Chunkwise-parallel form: the WY/UT transform of `generalized_delta` (gradients need no anchor: "
                   "the rule is linear in M, so the chunked form is exact for any chunk).")


def _chain_scale(lv: S.Level) -> ExprNode:
    c = None
    for step in lv.rule:
        if step.fn == "scale" and step.args:
            c = _mul(c, step.args[0])
    return _or1(c)


def derive(spec: S.ModelSpec, typeof=None) -> dict[str, Derived]:
    if typeof is None:
        from nlc.check import FlowTypes
        typeof = FlowTypes(spec)
    return {name: derive_level(name, lv, typeof) for name, lv in spec.levels.items()}


# ---------------------------------------------------------------- explain

def explain(spec: S.Spec) -> str:
    """Markdown with LaTeX: each level's objective and derived update rule."""
    if isinstance(spec, S.OptimizerSpec):
        return _explain_optimizer(spec)
    out = [f"# `{spec.name}`: derived update rules", "",
           f"{spec.model.layers} blocks of `{' -> '.join(spec.model.block)}`, d_model {spec.model.d_model}, "
           f"{spec.model.heads} heads (head_dim {spec.model.d_model // spec.model.heads}), vocab {spec.model.vocab}."
           + (f" Outer level: `{spec.optimizer}`." if spec.optimizer else ""), ""]
    if spec.signals:
        out += ["## Flows", ""]
        out += [f"- ${tex(Name(id=n))} = {tex(e)}$" for n, e in spec.signals.items()]
        out.append("")
    for name, d in derive(spec).items():
        lv = spec.levels[name]
        kind = lv.memory.kind
        clock = "" if lv.every is None else f", every {lv.every}"
        chunk = f", chunk {lv.chunk}" if lv.chunk else ""
        out += [f"## `{name}`: {kind}{clock}{chunk}", ""]
        if lv.key is not None:
            out.append(f"Context flow: $k_t = {tex(lv.key)}$" + (f", $v_t = {tex(lv.value)}$" if lv.value is not None else "")
                       + (f", read with $q_t = {tex(lv.query)}$" if lv.query is not None else "") + ".")
            out.append("")
        if d.objective_tex:
            out += [f"Objective: ${d.objective_tex}$", ""]
        if lv.rule:
            out += [f"Rule chain: `{' |> '.join(map(str, lv.rule))}`", ""]
        out += ["$$", " \\\\\n".join(d.equations), "$$", ""]
        if lv.output is not None:
            out += [rf"Output: $y_t = W_o\,\big({tex(lv.output)}\big)$, with $o_t$ the level's read "
                    r"(`onorm`: an RMSNorm per head with a learned scale).", ""]
        if lv.gate is not None:
            norm = "o_t" if isinstance(lv.memory, S.AttentionMemory) else r"\mathrm{RMSNorm}(o_t)"
            out += [rf"Output: $y_t = W_o\,\big({norm} \odot g_t\big)$ with the output gate "
                    rf"$g_t = {tex(lv.gate)}$.", ""]
        out += [f"- {n}" for n in d.notes]
        out.append("")
    return "\n".join(out)


def _explain_optimizer(spec: S.OptimizerSpec) -> str:
    consts = frozenset(spec.hyper)
    out = [f"# `{spec.name}`: an optimizer as levels over the gradient stream", "",
           "Hyperparameters: " + ", ".join(f"`{k}` = {v}" for k, v in spec.hyper.items()), ""]
    for g in spec.groups:
        out += [f"## Parameters: `{g.params}`", ""]
        if g.use is not None:
            out += [f"Delegated to `{g.use}`.", ""]
            continue
        for name, lv in g.levels.items():
            every = f" every {lv.every}" if lv.every else " every step"
            out += [f"- level `{name}`{every}: input ${tex(lv.input, 't', consts)}$, rule `{' |> '.join(map(str, lv.rule))}`"]
        out += ["", "$$", rf"\Delta\theta_t = {tex(g.update, 't', consts)}", "$$", ""]
    return "\n".join(out)

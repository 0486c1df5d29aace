"""How each level of a model spec becomes lines of torch: the flows as expressions, each level as
a commented section of `Block.forward` calling the shared ops (`lib`, `ops`, `memories`).

`_Gen` walks one (instanced) spec. `expr` turns a flow into one line of torch and its shape type;
every parametric call site (`proj`, `gate`, `rate`, `conv`, `onorm`, `param`) becomes a submodule
of its own. `level` emits a level's section by its derived family (attention, generalized delta,
momentum or MLP memory, CMS); `scan` (in `scan.py`) runs the generators a level reads chunk by
chunk, stacked (`generators.py`). A valid
construct this backend cannot compile raises `Unsupported`, which `build` locates (E601).
"""
from __future__ import annotations

from nlc import spec as S
from nlc import vocab as V
from nlc.bounds import bounds
from nlc.check import FlowTypes
from nlc.expr import Bin, Call, ExprNode, Name, Neg, Num, subst
from nlc.rules import derive
from nlc.backends.triton.plan import delta_terms, plan
from nlc.backends.torch.scan import ScanMixin

_UNARY = V.ELEMENTWISE | {"l2norm", "detach", "norm", "sum"}   # one argument, one lib function each


class Unsupported(NotImplementedError):
    """The spec is valid, but the torch backend cannot compile this part of it yet. `level` and
    `field` say where (`located` turns it into a located diagnostic, E601)."""

    def __init__(self, message: str, level: str | None = None, field: str | None = None):
        super().__init__(message)
        self.message, self.level, self.field = message, level, field

    def located(self, loaded):
        """A `SpecError` pointing at the construct in the spec's file."""
        from nlc.diagnostics import Collector
        from nlc.instance import SEP
        errors = Collector(loaded.file, loaded.source)
        span = None
        if self.level is not None and loaded.smap is not None:
            base = ("levels", self.level.split(SEP)[0])
            span = (self.field and loaded.smap.get(*base, self.field)) or loaded.smap.get(*base, key=True)
        errors.error("E601", f"the torch backend cannot compile this: {self.message}", span,
                     "see `nlc explain` for the derived rule; the supported forms are listed in specs/README.md")
        errors.raise_if_any()


class _Gen(ScanMixin):
    def __init__(self, spec: S.ModelSpec):
        self.spec = spec
        self.D, self.H = spec.model.d_model, spec.model.heads
        self.K = self.D // self.H
        self.init: list[str] = []      # lines of Block.__init__
        self.names: dict[str, int] = {}
        self.signals: dict[str, tuple[str, list[str]]] = {}   # name -> (code, signals it reads)
        self.cms_levels: list[tuple[str, int, float]] = []     # (sublevel, period, step size)
        self.types = FlowTypes(spec)                             # vec / head / const of each flow
        self.derived = derive(spec, self.types)                  # each level's update rule
        self.in_init = False                                     # generating a `param`'s initial value
        self.placement = plan(spec)                              # which levels have Triton kernels
        self.gen_var: dict[str, str] = {}                        # generator -> its stacked state's variable
        self.gen_reads: dict[str, str | None] = {}               # generator -> its batched read's input code
        self.hot = False                                         # a loop worth torch.compile (compile.hot)

    def module(self, base: str, ctor: str) -> str:
        n = self.names.get(base, 0)
        self.names[base] = n + 1
        name = base if n == 0 else f"{base}{n}"
        self.init.append(f"self.{name} = {ctor}")
        return name

    def expr(self, e: ExprNode, ctx: str, level: str | None, body: list[str], done: set[str]) -> tuple[str, str]:
        """Code and shape type of a flow; signals it reads are emitted into `body` first."""
        t = self.types(e, level)
        if isinstance(e, Num):
            return repr(float(e.value)), "const"
        if isinstance(e, Name):
            if e.id in ("x", "o"):
                return e.id, "vec"
            if e.id == "head":
                return ("head" if self.in_init else "L.heads(x)"), "head"
            if e.id in ("key", "value", "query"):
                return e.id, t
            self.signal(e.id, body, done)
            return f"sig_{e.id}", t
        if isinstance(e, Neg):
            code, tt = self.expr(e.arg, ctx, level, body, done)
            return f"(-{code})", tt
        if isinstance(e, Bin):
            (lc, lt), (rc, rt) = (self.expr(e.left, ctx, level, body, done), self.expr(e.right, ctx, level, body, done))
            if {lt, rt} == {"vec", "head"}:   # a scalar per head against a vector (a derived sum may mix them)
                lc, rc = (f"L.vec({lc})" if lt == "head" else lc), (f"L.vec({rc})" if rt == "head" else rc)
            op = "**" if e.op == "^" else e.op
            return f"({lc} {op} {rc})", t
        if isinstance(e, Call):
            fused = self.fused_flow(e, ctx, level, body, done)
            if fused is not None:
                return fused, t
            if e.fn in _UNARY:
                code, _ = self.expr(e.args[0], ctx, level, body, done)
                return f"L.{'sum_' if e.fn == 'sum' else e.fn}({code})", t
            if e.fn == "dot":
                (ac, _), (bc, _) = (self.expr(a, ctx, level, body, done) for a in e.args)
                return f"L.dot({ac}, {bc})", "head"
            if e.fn == "onorm":
                code, _ = self.expr(e.args[0], ctx, level, body, done)
                name = self.module(f"{ctx}_onorm", f"nn.RMSNorm({self.K}, eps=1e-6)")
                return f"self.{name}({code})", "vec"
            if e.fn == "param":
                self.in_init = True
                try:
                    init, _ = self.expr(e.args[0], ctx, level, body, done)
                finally:
                    self.in_init = False
                name = self.module(f"{ctx}_param", f"nn.Parameter(L.per_head_init({self.H}, lambda head: {init}))")
                return f"self.{name}", "head"
            if e.fn == "proj":
                code, _ = self.expr(e.args[0], ctx, level, body, done)
                name = self.module(f"{ctx}_proj", f"L.Proj({self.D}, {self.H}, {self.K})")
                return f"self.{name}({code})", "vec"
            if e.fn in ("gate", "rate"):
                code, _ = self.expr(e.args[0], ctx, level, body, done)
                name = self.module(f"{ctx}_{e.fn}", f"L.HeadScalar({self.D}, {self.H}, squash={e.fn == 'gate'})")
                return f"self.{name}({code})", "head"
            if e.fn == "conv":
                code, at = self.expr(e.args[0], ctx, level, body, done)
                channels = self.D if at == "vec" else self.H
                width = int(e.args[1].value)
                name = self.module(f"{ctx}_conv", f"L.CausalConv({channels}, {width})")
                return f"self.{name}({code}, cstate, cnew, p + {name!r})", at
            if e.fn in self.spec.levels:
                gen = self.spec.levels[e.fn]
                if not isinstance(gen.memory, S.MLPMemory):
                    raise Unsupported(f"`{e.fn}(...)`: only MLP memories can generate flows in the torch backend yet")
                code, _ = self.expr(e.args[0], ctx, level, body, done)
                read = self.generator_read(e.fn, code)
                return (read + "[..., 0]" if gen.out == "scalar" else read), t
            raise Unsupported(f"`{e.fn}(...)`: the level's own memory inside a flow is not supported by the torch backend yet")
        raise Unsupported(f"expression `{e}`")

    def fused_flow(self, e: Call, ctx: str, level: str | None, body: list[str], done: set[str]) -> str | None:
        """A flow `f_n(...f_1([conv](proj(...), W)))` as one `L.flow` call: the same modules, made in
        the same order, run op by op on torch or as one fused Triton kernel (skeleton 3). Only where
        fusing saves kernels: a convolution, an l2norm, or two functions or more."""
        from nlc.backends.triton.prologue import fuses
        chain = fuses(e)
        if chain is None:
            return None
        width, ops, proj = chain
        code, _ = self.expr(proj, ctx, level, body, done)
        if not width:
            return f"L.flow({code}, {ops!r}, None, cstate, cnew, None, backend)"
        conv = self.module(f"{ctx}_conv", f"L.CausalConv({self.D}, {width})")
        return f"L.flow({code}, {ops!r}, self.{conv}, cstate, cnew, p + {conv!r}, backend)"

    def signal(self, name: str, body: list[str], done: set[str]) -> None:
        """Emit a signal (after the signals it reads). Its parameters are made once per block and
        shared by every level that reads it; each level evaluates it on its own input `x`."""
        if name in done:
            return
        if name not in self.signals:
            deps: list[str] = []
            code, _ = self.expr(self.spec.signals[name], f"sig_{name}", None, deps, set())
            self.signals[name] = (code, [n.id for n in self.spec.signals[name].walk()
                                         if isinstance(n, Name) and n.id in self.spec.signals])
        code, deps = self.signals[name]
        for dep in deps:
            self.signal(dep, body, done)
        body.append(f"sig_{name} = {code}")
        done.add(name)

    # ---------------------------------------------------------------- levels

    def level(self, name: str, lv: S.Level) -> list[str]:
        D, H, K = self.D, self.H, self.K
        m = lv.memory
        body: list[str] = []
        done: set[str] = set()
        norm = self.module(f"{name}_norm", f"nn.RMSNorm({D}, eps=1e-6)")
        static = lv.every is not None and lv.every.period is None
        if isinstance(m, S.MLPMemory) and static:
            hidden = int(round(D * m.expansion))
            mlp = self.module(f"{name}_mlp", f"L.MLP({D}, {hidden}, {D}, depth={m.depth}, act={m.activation!r})")
            return [f"# level `{name}`: static MLP (frequency 0)",
                    f"h = h + self.{mlp}(self.{norm}(h))"]
        if isinstance(m, S.MLPMemory) and lv.objective is not None and lv.objective.loss == "task":
            return self.cms(name, lv, norm)
        body.append(f"x = self.{norm}(h).view(B, T, {H}, {K})")
        gens = self.generators(name)
        if gens:
            body += self.scan(name, gens, done)
        flows = {}
        for f in ("query", "key", "value"):
            e = getattr(lv, f)
            if e is not None:
                code, _ = self.expr(e, f"{name}_{f}", name, body, done)
                body.append(f"{f} = {code}")
                flows[f] = code
        out = self.module(f"{name}_out", f"nn.Linear({D}, {D}, bias=False)")
        if isinstance(m, S.AttentionMemory):
            gated = self.gated(name, lv, "", body, done)
            return [f"# level `{name}`: softmax attention (non-parametric, frequency infinity)"] + body + [
                f"o = L.attention(query, key, value, {m.window}, state, new, p + {name!r}, use_rope={m.rope})",
                f"h = h + self.{out}({gated}.reshape(B, T, {D}))"]
        d = self.derived[name]
        if isinstance(m, S.MatrixMemory) and d.family == "generalized_delta":
            s0 = "None"
            if lv.init == "meta":
                s0 = "self." + self.module(f"{name}_S0", f"nn.Parameter(torch.zeros({H}, {K}, {K}))")
            a, at = self.expr(d.a, f"{name}_rule", name, body, done)
            w, wt = self.expr(d.w, f"{name}_rule", name, body, done)
            if wt != "vec":
                raise Unsupported(f"level `{name}`: a write that is not a vector per head", field="value")
            a = a if at == "vec" else f"L.per_head({a}, key)"
            if d.diagonal:
                head = [f"# level `{name}`: matrix memory, M_t = M_(t-1) (diag(a) - e u^T) + w k^T",
                        f"#   a = {d.a}, e = {d.e}, u = {d.u}, w = {d.w}"]
                erase = "None"
                if d.u is not None:
                    u, _ = self.expr(d.u, f"{name}_rule", name, body, done)
                    e, _ = self.expr(d.e, f"{name}_rule", name, body, done)
                    erase = f"({u}, {e})"
                rule = [f"a, w = {a}, {w}"]
                call, tail = "a, None", f", erase={erase}"
            else:
                head = [f"# level `{name}`: matrix memory, M_t = M_(t-1) (a I - b k k^T) + w k^T",
                        f"#   a = {d.a}, b = {d.b}, w = {d.w}"]
                decay, erase = delta_terms(d)   # a = 1 or b = 0: the term is absent (None)
                b = f"L.per_head({self.expr(d.b, f'{name}_rule', name, body, done)[0]}, key)" if erase else "None"
                rule = [f"a, b, w = {a if decay else 'None'}, {b}, {w}"]
                call, tail = "a, b", ""
            lo, hi = bounds(d.a, self.spec.signals, self.H)
            if (d.diagonal or delta_terms(d)[0]) and lo >= 0:    # a present, and never negative
                head.append(f"#   a lies in [{lo:.4g}, {hi:.4g}] whatever the inputs (nlc.bounds): not checked at run time")
                tail += ", check=False"
            placed = self.placement[name]
            if placed.skeleton is None:
                head.append(f"#   runs on torch whatever the backend: {placed.why}")
                tail += ", backend='torch'"
            else:
                tail += ", backend=backend"
            chunk = lv.chunk_size()
            gated = self.gated(name, lv, "onorm", body, done)
            return head + body + rule + [
                f"S0 = L.initial(state, p + '{name}.S', {s0}, key, ({H}, {K}, {K}))",
                f"o, new[p + '{name}.S'] = generalized_delta(query, key, w, {call}, initial_state=S0, mode=mode, "
                f"chunk_size={chunk}{tail})",
                f"h = h + self.{out}({gated}.reshape(B, T, {D}))"]
        if isinstance(m, (S.MatrixMemory, S.MLPMemory)):
            call, state_lines = self.memory_update(name, lv, body, done, read="query")
            gated = self.gated(name, lv, "onorm", body, done)
            placed = self.placement[name]
            note = [] if placed.skeleton else [f"#   runs on torch whatever the backend: {placed.why}"]
            return [f"# level `{name}`: {m.kind} memory, {' |> '.join(map(str, lv.rule))} (gradients at each chunk's anchor)"] + \
                note + body + state_lines + [f"o, st = {call}", *self.save_state(name, lv),
                                      f"h = h + self.{out}({gated}.reshape(B, T, {D}))"]
        raise Unsupported(f"level `{name}` ({m.kind} memory, {d.family} rule) is not supported by the torch backend yet")

    def gated(self, name: str, lv: S.Level, norm: str, body: list[str], done: set[str]) -> str:
        """What the level contributes before the output projection: its `output` expression of the
        read `o`, else `o` (normalised per head where `norm` is set) times its output gate, if any."""
        if lv.output is not None:
            code, _ = self.expr(lv.output, f"{name}_output", name, body, done)
            return code
        if norm:   # the default output: the read, normalised per head
            o = f"self.{self.module(f'{name}_onorm', f'nn.RMSNorm({self.K}, eps=1e-6)')}(o)"
        else:
            o = "o"
        if lv.gate is None:
            return o
        code, t = self.expr(lv.gate, f"{name}_gate", name, body, done)
        body.append(f"gate = {code}  # output gate")
        return f"({o} * {'L.vec(gate)' if t == 'head' else 'gate'})"

    def memory_update(self, name: str, lv: S.Level, body: list[str], done: set[str], read: str) -> tuple[str, list[str]]:
        """The call that reads and updates a momentum / MLP memory, with the lines that fetch its state.
        `read`: the code of what the memory is applied to (its query). Generators: `scan.py`."""
        d = self.derived[name]
        m = lv.memory
        c, self_target, _ = self.rule_codes(name, lv, body, done, generator=False)
        args = f"{read}, {c['key']}, {c['target']}, {c['step']}, {c['beta']}, {c['retain']}, {c['erase']}"
        chunk = lv.chunk_size()
        H, K = self.H, self.K
        if isinstance(m, S.MatrixMemory):
            if lv.out == "scalar":
                raise Unsupported(f"level `{name}`: a scalar-output matrix memory")
            m0 = "None"
            if lv.init == "meta":
                m0 = "self." + self.module(f"{name}_M0", f"nn.Parameter(torch.zeros({H}, {K}, {K}))")
            lines = [f"st = L.momentum_state(state, p + '{name}', {m0}, x, ({H}, {K}, {K}))"]
            backend = "backend" if self.placement[name].skeleton else "'torch'"
            return (f"momentum_memory({args}, objective={d.loss!r}, initial_state=st, mode=mode, "
                    f"chunk_size={chunk}, backend={backend})", lines)
        if lv.init != "meta":
            raise Unsupported(f"level `{name}`: an MLP memory starts from meta-learned weights (`init: meta`)")
        hidden = int(round(K * m.expansion))
        d_out = 1 if lv.out == "scalar" else K
        w = self.module(f"{name}_W", f"L.mlp_params({H}, {K}, {hidden}, {d_out}, depth={m.depth}, residual={m.residual})")
        lines = [f"st = L.mlp_state(state, p + '{name}', self.{w}, momentum={d.momentum is not None})"]
        backend = "backend" if self.placement[name].skeleton else "'torch'"
        return (f"mlp_memory({args}, initial_state=st, objective={d.loss!r}, "
                f"self_target={self_target}, activation={m.activation!r}, residual={m.residual}, "
                f"read={lv.read or 'anchor'!r}, mode=mode, chunk_size={chunk}, backend={backend})", lines)

    def rule_codes(self, name: str, lv: S.Level, body: list[str], done: set[str], generator: bool):
        """The code of a memory level's rule arguments (key, target, step, beta, retain, erase:
        "None" where absent), whether its target is self-generated, and its derived rule. A
        generator has no locals `key`, `value`: its flows' expressions are used."""
        d = self.derived[name]
        why = None
        if d.pre_retain is not None:
            why = "retention before `grad`"
        elif d.other_steps:
            why = "primitives " + ", ".join(d.other_steps)
        elif d.momentum is not None and d.momentum[0] != "momentum":
            why = "an `ema` momentum"
        elif d.erase is not None and str(d.erase_key) not in (str(lv.key), "key"):
            why = "a DGD erase along another flow than the level's key"
        elif d.pred is not None and str(d.pred) not in (f"M({lv.key})", "M(key)"):
            why = f"the prediction `{d.pred}` (it must be `M(key)`)"
        elif any(self.types(e, name) == "vec" for e in (d.retain, d.pre_retain, d.erase) if e is not None):
            why = "a retention or erase rate per key channel (a vector) in a momentum or MLP memory"
        if why:
            raise Unsupported(f"level `{name}`: {why} is not supported by the torch backend yet", name, "rule")
        if generator:
            own = {"key": lv.key, "value": lv.value, "query": lv.query}
            sub = lambda e: e if e is None else subst(e, own)  # noqa: E731
        else:
            sub = lambda e: e  # noqa: E731
        code = lambda e: self.expr(sub(e), f"{name}_rule", name, body, done)[0] if e is not None else "None"  # noqa: E731
        self_target = isinstance(d.target, Call) and d.target.fn == "M"
        target = code(d.target.args[0] if self_target else d.target)
        if not self_target and lv.out == "scalar":
            target = f"L.vec({target})"
        beta = code(d.momentum[1]) if d.momentum is not None else "None"
        return (dict(key=code(Name(id="key")), target=target, step=code(d.step) if d.step is not None else "1.0",
                     beta=beta, retain=code(d.retain), erase=code(d.erase)), self_target, d)

    def save_state(self, name: str, lv: S.Level) -> list[str]:
        if isinstance(lv.memory, S.MatrixMemory):
            return [f"L.momentum_save(new, p + '{name}', st)"]
        return [f"L.mlp_save(new, p + '{name}', st)"]

    def generators(self, name: str) -> list[str]:
        """Levels applied (through signals, transitively, and through the generators' own flows)
        by level `name`'s flows."""
        return sorted(S.generators_of(self.spec, name))

    def cms(self, name: str, lv: S.Level, first_norm: str) -> list[str]:
        """A Continuum Memory System level: one pre-norm residual MLP per period, run on every
        token with fast weights (slow weights + in-context delta) that the model updates per chunk."""
        from nlc.expr import const_value
        from nlc.rules import _chain_scale
        m = lv.memory
        lr = const_value(_chain_scale(lv))
        if lr is None:
            raise Unsupported(f"level `{name}`: a CMS step size must be a constant")
        if lv.every is None or lv.every.unit != "tokens" or not lv.every.period:
            raise Unsupported(f"level `{name}`: a CMS level on the optimizer's clock (`steps`)")
        hidden = int(round(self.D * m.expansion))
        lines = [f"# level `{name}`: continuum memory, {len(lv.every.period)} MLPs updated every "
                 f"{', '.join(map(str, lv.every.period))} tokens by -{lr:g} * (sum of the chunk's task-loss gradients)"]
        for i, period in enumerate(lv.every.period):
            sub = f"{name}{i}"
            norm = first_norm if i == 0 else self.module(f"{sub}_norm", f"nn.RMSNorm({self.D}, eps=1e-6)")
            self.module(f"{sub}_mlp", f"L.MLP({self.D}, {hidden}, {self.D}, depth={m.depth}, act={m.activation!r})")
            self.cms_levels.append((sub, int(period), float(lr)))
            lines.append(f"h = h + L.mlp_with(self.{sub}_mlp, self.{norm}(h), fast.get(p + {sub!r}))")
        return lines

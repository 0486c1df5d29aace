"""Generate readable torch source for a model spec: `model.py` defines `Block` and `Model`.

The generated code is the model: `nlc.compile` executes it, `nlc build` writes it. Every flow
expression becomes one line of torch; every parametric call site (`proj`, `gate`, `rate`, `conv`)
becomes a submodule of its own; each level becomes a commented section of `Block.forward` that
calls the shared ops (nlc.backends.torch.ops / lib). Same spec, same bytes.
"""
from __future__ import annotations

from nlc import __version__
from nlc import spec as S
from nlc.check import flow_type
from nlc.expr import Bin, Call, ExprNode, Name, Neg, Num
from nlc.rules import derive

_UNARY = {"l2norm", "silu", "gelu", "relu", "tanh", "sigmoid", "softplus", "exp", "detach"}


class Unsupported(NotImplementedError):
    """The spec is valid, but the torch backend cannot compile this part of it yet."""


def _subst(e: ExprNode, names: dict) -> ExprNode:
    """`e` with the names in `names` replaced by expressions."""
    if isinstance(e, Name) and names.get(e.id) is not None:
        return names[e.id]
    if isinstance(e, Call):
        return Call(fn=e.fn, args=tuple(_subst(a, names) for a in e.args),
                    kwargs={k: _subst(v, names) for k, v in e.kwargs.items()})
    if isinstance(e, Bin):
        return Bin(op=e.op, left=_subst(e.left, names), right=_subst(e.right, names))
    if isinstance(e, Neg):
        return Neg(arg=_subst(e.arg, names))
    return e


class _Gen:
    def __init__(self, spec: S.ModelSpec):
        self.spec = spec
        self.D, self.H = spec.model.d_model, spec.model.heads
        self.K = self.D // self.H
        self.init: list[str] = []      # lines of Block.__init__
        self.names: dict[str, int] = {}
        self.signals: dict[str, tuple[str, list[str]]] = {}   # name -> (code, signals it reads)
        self.cms_levels: list[tuple[str, int, float]] = []     # (sublevel, period, step size)
        self.derived = derive(spec)                              # each level's update rule

    def module(self, base: str, ctor: str) -> str:
        n = self.names.get(base, 0)
        self.names[base] = n + 1
        name = base if n == 0 else f"{base}{n}"
        self.init.append(f"self.{name} = {ctor}")
        return name

    def expr(self, e: ExprNode, ctx: str, level: str | None, body: list[str], done: set[str]) -> tuple[str, str]:
        """Code and shape type of a flow; signals it reads are emitted into `body` first."""
        t = flow_type(self.spec, e, level)
        if isinstance(e, Num):
            return repr(float(e.value)), "const"
        if isinstance(e, Name):
            if e.id == "x":
                return "x", "vec"
            if e.id in ("key", "value", "query"):
                return e.id, t
            self.signal(e.id, body, done)
            return f"sig_{e.id}", t
        if isinstance(e, Neg):
            code, tt = self.expr(e.arg, ctx, level, body, done)
            return f"(-{code})", tt
        if isinstance(e, Bin):
            (lc, lt), (rc, rt) = (self.expr(e.left, ctx, level, body, done), self.expr(e.right, ctx, level, body, done))
            if e.op in "*/" and {lt, rt} == {"vec", "head"}:
                lc, rc = (f"L.vec({lc})" if lt == "head" else lc), (f"L.vec({rc})" if rt == "head" else rc)
            op = "**" if e.op == "^" else e.op
            return f"({lc} {op} {rc})", t
        if isinstance(e, Call):
            if e.fn in _UNARY:
                code, _ = self.expr(e.args[0], ctx, level, body, done)
                return f"L.{e.fn}({code})", t
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
                read = f"L.mlp_read(gst_{e.fn}, {code}, {gen.memory.activation!r}, {gen.memory.residual})"
                return (read + "[..., 0]" if gen.out == "scalar" else read), t
            raise Unsupported(f"`{e.fn}(...)`: the level's own memory inside a flow is not supported by the torch backend yet")
        raise Unsupported(f"expression `{e}`")

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
            gated = self.gated(name, lv, "o", body, done)
            return [f"# level `{name}`: softmax attention (non-parametric, frequency infinity)"] + body + [
                f"o = L.attention(query, key, value, {m.window}, state, new, p + {name!r}, use_rope={m.rope})",
                f"h = h + self.{out}({gated}.reshape(B, T, {D}))"]
        d = self.derived[name]
        if isinstance(m, S.MatrixMemory) and d.family == "generalized_delta":
            onorm = self.module(f"{name}_onorm", f"nn.RMSNorm({K}, eps=1e-6)")
            s0 = "None"
            if lv.init == "meta":
                s0 = "self." + self.module(f"{name}_S0", f"nn.Parameter(torch.zeros({H}, {K}, {K}))")
            a, _ = self.expr(d.a, f"{name}_rule", name, body, done)
            b, _ = self.expr(d.b, f"{name}_rule", name, body, done)
            w, wt = self.expr(d.w, f"{name}_rule", name, body, done)
            if wt != "vec":
                raise Unsupported(f"level `{name}`: a write that is not a vector per head")
            chunk = lv.chunk_size()
            gated = self.gated(name, lv, f"self.{onorm}(o)", body, done)
            return [f"# level `{name}`: matrix memory, M_t = M_(t-1) (a I - b k k^T) + w k^T",
                    f"#   a = {d.a}, b = {d.b}, w = {d.w}"] + body + [
                f"a, b, w = L.per_head({a}, key), L.per_head({b}, key), {w}",
                f"S0 = L.initial(state, p + '{name}.S', {s0}, key, ({H}, {K}, {K}))",
                f"o, new[p + '{name}.S'] = generalized_delta(query, key, w, a, b, initial_state=S0, mode=mode, chunk_size={chunk})",
                f"h = h + self.{out}({gated}.reshape(B, T, {D}))"]
        if isinstance(m, (S.MatrixMemory, S.MLPMemory)):
            onorm = self.module(f"{name}_onorm", f"nn.RMSNorm({K}, eps=1e-6)")
            call, state_lines = self.memory_update(name, lv, body, done, read="query")
            gated = self.gated(name, lv, f"self.{onorm}(o)", body, done)
            return [f"# level `{name}`: {m.kind} memory, {' |> '.join(map(str, lv.rule))} (gradients at each chunk's anchor)"] + \
                body + state_lines + [f"o, st = {call}", *self.save_state(name, lv),
                                      f"h = h + self.{out}({gated}.reshape(B, T, {D}))"]
        raise Unsupported(f"level `{name}` ({m.kind} memory, {d.family} rule) is not supported by the torch backend yet")

    def gated(self, name: str, lv: S.Level, o: str, body: list[str], done: set[str]) -> str:
        """The level's output `o` times its output gate, if it has one (its code is emitted into `body`)."""
        if lv.gate is None:
            return o
        code, t = self.expr(lv.gate, f"{name}_gate", name, body, done)
        body.append(f"gate = {code}  # output gate")
        return f"({o} * {'L.vec(gate)' if t == 'head' else 'gate'})"

    def memory_update(self, name: str, lv: S.Level, body: list[str], done: set[str], read: str) -> tuple[str, list[str]]:
        """The call that reads and updates a momentum / MLP memory, with the lines that fetch its state.
        `read`: the code of what the memory is applied to (its query, or x for a generator)."""
        d = self.derived[name]
        m = lv.memory
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
        if why:
            raise Unsupported(f"level `{name}`: {why} is not supported by the torch backend yet")
        if read == "x":  # a generator: no locals `key`, `value`; use its flows' expressions
            own = {"key": lv.key, "value": lv.value, "query": lv.query}
            sub = lambda e: e if e is None else _subst(e, own)  # noqa: E731
        else:
            sub = lambda e: e  # noqa: E731
        code = lambda e: self.expr(sub(e), f"{name}_rule", name, body, done)[0] if e is not None else "None"  # noqa: E731
        self_target = isinstance(d.target, Call) and d.target.fn == "M"
        target = code(d.target.args[0] if self_target else d.target)
        if not self_target and lv.out == "scalar":
            target = f"L.vec({target})"
        beta = code(d.momentum[1]) if d.momentum is not None else "None"
        args = (f"{read}, {code(Name(id='key'))}, {target}, {code(d.step) if d.step is not None else '1.0'}, "
                f"{beta}, {code(d.retain)}, {code(d.erase)}")
        chunk = lv.chunk_size()
        H, K = self.H, self.K
        if isinstance(m, S.MatrixMemory):
            if lv.out == "scalar":
                raise Unsupported(f"level `{name}`: a scalar-output matrix memory")
            m0 = "None"
            if lv.init == "meta":
                m0 = "self." + self.module(f"{name}_M0", f"nn.Parameter(torch.zeros({H}, {K}, {K}))")
            lines = [f"st = (L.initial(state, p + '{name}.M', {m0}, x, ({H}, {K}, {K})), state.get(p + '{name}.S'))"]
            return (f"momentum_memory({args}, objective={d.loss!r}, initial_state=st, mode=mode, chunk_size={chunk})",
                    lines)
        if lv.init != "meta":
            raise Unsupported(f"level `{name}`: an MLP memory starts from meta-learned weights (`init: meta`)")
        lines = []
        if read != "x":  # a generator's weights are made by `scan`
            hidden = int(round(K * m.expansion))
            d_out = 1 if lv.out == "scalar" else K
            w = self.module(f"{name}_W", f"L.mlp_params({H}, {K}, {hidden}, {d_out}, depth={m.depth}, residual={m.residual})")
            lines = [f"st = L.mlp_state(state, p + '{name}', self.{w}, momentum={d.momentum is not None})"]
        reads = f"read={lv.read or 'anchor'!r}, " if read != "x" else ""   # a generator is read at its anchor
        return (f"mlp_memory({args}, initial_state={'st' if read != 'x' else f'gst_{name}'}, objective={d.loss!r}, "
                f"self_target={self_target}, activation={m.activation!r}, residual={m.residual}, "
                f"{reads}mode=mode, chunk_size={chunk})", lines)

    def save_state(self, name: str, lv: S.Level) -> list[str]:
        if isinstance(lv.memory, S.MatrixMemory):
            return [f"new[p + '{name}.M'], new[p + '{name}.S'] = st"]
        return [f"L.mlp_save(new, p + '{name}', st)"]

    def generators(self, name: str) -> list[str]:
        """Levels applied (through signals, transitively, and through the generators' own flows)
        by level `name`'s flows."""
        found: set[str] = set()
        frontier = {name}
        while frontier:
            applied = S.reads(self.spec, [e for n in frontier for e in self.spec.levels[n].flows()])[0]
            frontier = applied - found - {name}
            found |= frontier
        return sorted(found)

    def scan(self, consumer: str, gens: list[str], done: set[str]) -> list[str]:
        """Generators learn in context and generate the consumer's flows: run chunk by chunk (their
        chunk), every generator read at the chunk's anchor, then all of them updated over the chunk."""
        chunks = {self.spec.levels[g].chunk_size() for g in gens}
        if len(chunks) != 1:
            raise Unsupported(f"generators {', '.join(gens)} with different chunk sizes")
        C = chunks.pop()
        lines = [f"# generators {', '.join(gens)}: memories that learn in context; scanned in chunks of {C},",
                 "# each read at its chunk's anchor state, then all updated over the chunk"]
        for g in gens:
            lv = self.spec.levels[g]
            if lv.key is None or not isinstance(lv.memory, S.MLPMemory):
                raise Unsupported(f"generator `{g}` must be an MLP memory with a key")
            d = self.derived[g]
            K, H = self.K, self.H
            hidden = int(round(K * lv.memory.expansion))
            d_out = 1 if lv.out == "scalar" else K
            w = self.module(f"{g}_W", f"L.mlp_params({H}, {K}, {hidden}, {d_out}, depth={lv.memory.depth}, "
                                      f"residual={lv.memory.residual})")
            lines.append(f"gst_{g} = L.mlp_state(state, p + '{g}', self.{w}, momentum={d.momentum is not None})")
        loop: list[str] = []
        inner_done: set[str] = set()
        sigs = [n for n in self.spec.signals]  # every signal the consumer or the generators read
        needed = S.reads(self.spec, [e for n in (consumer, *gens) for e in self.spec.levels[n].flows()])[1]
        for s in sigs:
            if s in needed:
                self.signal(s, loop, inner_done)
        for g in gens:
            call, _ = self.memory_update(g, self.spec.levels[g], loop, inner_done, read="x")
            loop.append(f"_, gst_{g} = {call}")
        computed = [s for s in sigs if s in inner_done]
        loop += [f"parts.setdefault({s!r}, []).append(sig_{s})" for s in computed]
        lines += ["cstate = cnew = dict(state)  # convolutions carry their past from chunk to chunk",
                  "xfull, parts = x, {}",
                  f"for c0 in range(0, T, {C}):",
                  f"    x = xfull[:, c0:c0 + {C}]"]
        lines += [f"    {ln}" for ln in loop]
        lines += ["new.update({k: v for k, v in cnew.items() if k not in state or state[k] is not v})",
                  "x, cstate, cnew = xfull, state, new"]
        lines += [f"sig_{s} = torch.cat(parts[{s!r}], 1)" for s in computed]
        lines += [f"L.mlp_save(new, p + '{g}', gst_{g})" for g in gens]
        done.update(computed)
        return lines

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


def generate(spec: S.ModelSpec, source: str = "") -> str:
    """The torch source of a model spec."""
    if not isinstance(spec, S.ModelSpec):
        raise TypeError("generate() takes a model spec; optimizer specs compile with nlc.compile_optimizer")
    g = _Gen(spec)
    sections = [g.level(name, spec.levels[name]) for name in spec.model.block]
    shape = spec.model
    lines = [f'"""{spec.name}: generated by nlc {__version__}' + (f" from {source}" if source else "") + ".",
             "",
             "Do not edit: change the spec and run `nlc build` again. Each section of Block.forward is one level;",
             "its comment gives the update rule nlc derived for it (`nlc explain` shows the derivation).",
             '"""',
             "import torch",
             "from torch import nn",
             "",
             "from nlc.backends.torch import lib as L",
             "from nlc.backends.torch.memories import mlp_memory, momentum_memory",
             "from nlc.backends.torch.ops import generalized_delta",
             "",
             f"CONFIG = dict(name={spec.name!r}, vocab={shape.vocab}, d_model={shape.d_model}, layers={shape.layers}, "
             f"heads={shape.heads}, head_dim={g.K}, block={list(shape.block)!r})",
             "",
             "",
             "class Block(nn.Module):",
             f'    """One block: {" -> ".join(shape.block)}, each level with pre-norm and residual."""',
             "",
             "    def __init__(self):",
             "        super().__init__()"]
    lines += [f"        {ln}" for ln in g.init]
    lines += ["",
              "    def forward(self, h, state, new, p, mode, fast):",
              "        B, T = h.shape[:2]",
              "        cstate, cnew = state, new  # where convolutions keep their past"]
    for sec in sections:
        lines += [f"        {ln}" for ln in sec]
    lines += ["        return h", "", ""]
    if g.cms_levels:
        window = min(period for _, period, _ in g.cms_levels)
        lines += [f"CMS = {g.cms_levels!r}  # (level, period in tokens, step size)",
                  f"WINDOW = {window}  # the fastest CMS period: the model runs window by window", "", ""]
    lines += ["class Model(nn.Module):",
              f'    """{spec.name}: embedding, {shape.layers} blocks, norm, output head. forward(input_ids, state) returns',
              '    (logits, state); feeding a sequence in pieces with the state carried equals feeding it whole' +
              (' (pieces cut at multiples of WINDOW tokens);\n'
               "    state['cms.pending'] holds the last token's logits and the CMS fast weights that made them,\n"
               '    so that their pair with the next call\'s first token is counted."""' if g.cms_levels else '."""'),
              "",
              "    def __init__(self):",
              "        super().__init__()",
              '        self.mode = "chunk"  # "recurrent": every memory token by token (the oracle)',
              f"        self.embed = nn.Embedding({shape.vocab}, {shape.d_model})",
              f"        self.blocks = nn.ModuleList(Block() for _ in range({shape.layers}))",
              f"        self.norm = nn.RMSNorm({shape.d_model}, eps=1e-6)",
              f"        self.head = nn.Linear({shape.d_model}, {shape.vocab}, bias=False)",
              "        nn.init.normal_(self.embed.weight, std=0.02)",
              "",
              "    def run(self, input_ids, state, fast):",
              "        new = {}",
              "        h = self.embed(input_ids)",
              "        for i, block in enumerate(self.blocks):",
              '            h = block(h, state, new, f"{i}.", self.mode, fast)',
              "        return self.head(self.norm(h)), new",
              ""]
    if not g.cms_levels:
        lines += ["    def forward(self, input_ids, state=None):",
                  "        return self.run(input_ids, {} if state is None else state, {})",
                  ""]
    else:
        lines += ["    def forward(self, input_ids, state=None):",
                  "        # Window by window: run, then take the gradient of the next-token loss of every pair",
                  "        # whose target arrived in the window (the previous window's last token included) with",
                  "        # respect to the CMS fast weights that made the prediction (first order), and update the",
                  "        # levels whose chunk ends. The inner gradient is taken on a pass that sees the carried",
                  "        # state as constants (it needs nothing else, and so never walks the graph of earlier",
                  "        # windows); when the outer gradient is wanted, a second pass keeps the full graph.",
                  "        state = dict(state or {})",
                  "        keep_graph = torch.is_grad_enabled()",
                  "        pos = int(state.pop('t', torch.zeros((), dtype=torch.long)))",
                  "        pending = state.pop('cms.pending', None)  # the last token's logits: its target comes next",
                  "        outs, s, (B, T) = [], 0, input_ids.shape",
                  "        while s < T:",
                  "            e = min(T, s + WINDOW - (pos + s) % WINDOW)",
                  "            ids = input_ids[:, s:e]",
                  "            with torch.enable_grad():",
                  "                fast = L.cms_fast(self, state, CMS, B)",
                  "                logits, new = self.run(ids, {k: v.detach() for k, v in state.items()}, fast)",
                  "                pending = L.cms_step(ids, logits, fast, pending, state, new, CMS, pos + e)",
                  "            if keep_graph:",
                  "                logits, outer = self.run(ids, state, {k: [d.detach() for d in v] for k, v in fast.items()})",
                  "                new.update({k: v for k, v in outer.items() if '.delta' not in k and '.acc' not in k})",
                  "            else:",
                  "                logits, new = logits.detach(), {k: v.detach() for k, v in new.items()}",
                  "            state.update(new)",
                  "            outs.append(logits)",
                  "            s = e",
                  "        state['t'] = torch.tensor(pos + T)",
                  "        state['cms.pending'] = pending",
                  "        return torch.cat(outs, 1), state",
                  ""]
    return "\n".join(lines)


def load_source(source: str, name: str = "nlc_generated"):
    """Execute generated source as a module (with a filename, so tracebacks show its lines)."""
    import linecache
    import types
    filename = f"<nlc:{name}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    module = types.ModuleType(name)
    module.__file__ = filename
    exec(compile(source, filename, "exec"), module.__dict__)
    return module


def build(path, out_dir) -> list:
    """`nlc build`: write model.py, manifest.json and graph.svg for a model spec into `out_dir`.

    Deterministic: the same spec gives the same bytes. Files are written atomically.
    """
    import hashlib
    import json
    from pathlib import Path

    from nlc.fileio import atomic_write
    from nlc.graph import lower
    from nlc.loader import load_located
    from nlc.viz import RenderError, render, to_dot

    loaded = load_located(path)
    spec = loaded.spec
    out = Path(out_dir)
    source = generate(spec, Path(path).name)
    derived = derive(spec) if isinstance(spec, S.ModelSpec) else {}
    manifest = {
        "nlc": __version__,
        "spec": Path(path).name,
        "spec_sha256": hashlib.sha256(loaded.source.encode()).hexdigest(),
        "name": spec.name,
        "model": spec.model.model_dump(mode="json"),
        "levels": {name: {"memory": lv.memory.kind, "every": str(lv.every) if lv.every else None,
                          "chunk": lv.chunk, "rule": derived[name].family,
                          **({"a": str(derived[name].a), "b": str(derived[name].b), "w": str(derived[name].w)}
                             if derived[name].a is not None else {})}
                   for name, lv in spec.levels.items()},
        "optimizer": str(spec.optimizer) if spec.optimizer else None,
        "files": ["model.py", "manifest.json", "graph.svg"],
    }
    written = [atomic_write(out / "model.py", source),
               atomic_write(out / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True) + "\n")]
    graph = lower(spec)
    try:
        written.append(render(graph, out / "graph.svg"))
    except RenderError:  # no Graphviz renderer on this platform: the DOT text instead
        written.append(atomic_write(out / "graph.dot", to_dot(graph)))
    return written

"""The generator scan of a level's section (a part of `levels._Gen`, split off along its seam).

A level whose flows apply generators (levels used as functions, `M_k(x)`: Hope's self-modifying
memories) runs them chunk by chunk before its own memory: each chunk reads every generator at its
anchor state, computes the flows, then updates every generator over the chunk. The generators
that share a form are stacked (`generators.py`): one `L.read_generators` call reads them all and
one `L.update_generators` call updates them all; the generated loop is

    read_M_k, read_M_v, ... = L.read_generators(gens, x)    # after the flows that need no read
    sig_k = ...read_M_k...                                    # the flows that do
    gens = L.update_generators(gens, sig_k, sig_v, ...)       # one call for all

A generator read at more than one input, or whose input needs another read, is read alone
(`L.read_generator`), in place.
"""
from __future__ import annotations

import re

from nlc import spec as S
from nlc.expr import Call, Name


class ScanMixin:
    """`scan` and its helpers; `_Gen` provides `spec`, `derived`, `placement`, `module`, `expr`,
    `signal`, `rule_codes`."""

    def generator_groups(self, gens: list[str]) -> list[list[str]]:
        """Generators that can share one stacked state: the same MLP form and the same rule terms
        (their output sizes, residual paths and flows may differ)."""
        groups: dict[tuple, list[str]] = {}
        for g in gens:
            lv, d = self.spec.levels[g], self.derived[g]
            m = lv.memory
            key = (m.depth, int(round(self.K * m.expansion)), m.activation, d.momentum is not None,
                   d.retain is not None, d.erase is not None, d.loss,
                   isinstance(d.target, Call) and d.target.fn == "M",
                   self.placement[g].skeleton)
            groups.setdefault(key, []).append(g)
        return list(groups.values())

    def read_sites(self, gens: list[str], needed: set[str]) -> dict[str, set[str]]:
        """Per generator, the distinct inputs it is applied to in the signals the scan computes;
        None for a generator whose input itself needs a generator's read."""
        def reads(s):   # whether signal s reads a generator, transitively (signals are acyclic)
            return any((isinstance(n, Call) and n.fn in gens) or
                       (isinstance(n, Name) and n.id in self.spec.signals and reads(n.id))
                       for n in self.spec.signals[s].walk())
        sites: dict[str, set[str] | None] = {g: set() for g in gens}
        for s in needed:
            for n in self.spec.signals[s].walk():
                if isinstance(n, Call) and n.fn in gens and sites[n.fn] is not None:
                    arg = n.args[0]
                    nested = any((isinstance(a, Call) and a.fn in gens) or
                                 (isinstance(a, Name) and a.id in self.spec.signals and reads(a.id)) for a in arg.walk())
                    sites[n.fn] = None if nested else sites[n.fn] | {str(arg)}
        return sites

    def scan(self, consumer: str, gens: list[str], done: set[str]) -> list[str]:
        """Generators learn in context and generate the consumer's flows: run chunk by chunk (their
        chunk), every generator read at the chunk's anchor, then all of them updated over the chunk.
        Chunks start at multiples of C from the sequence start: a call that starts inside one
        (the generators' carried `offset`) first finishes it (`L.spans`)."""
        chunks = {self.spec.levels[g].chunk_size() for g in gens}
        if len(chunks) != 1:
            raise S_unsupported(f"generators {', '.join(gens)} with different chunk sizes")
        C = chunks.pop()
        groups = self.generator_groups(gens)
        lines = [f"# generators {', '.join(gens)}: memories that learn in context; scanned in chunks of {C},",
                 "# each read at its chunk's anchor state, then all updated over the chunk"
                 + (" (one stacked state: one read, one update)" if len(groups) == 1 else
                    f" ({len(groups)} stacked states, by form)")]
        weights = {}
        for g in gens:
            lv = self.spec.levels[g]
            if lv.key is None or not isinstance(lv.memory, S.MLPMemory):
                raise S_unsupported(f"generator `{g}` must be an MLP memory with a key")
            hidden = int(round(self.K * lv.memory.expansion))
            d_out = 1 if lv.out == "scalar" else self.K
            weights[g] = self.module(f"{g}_W", f"L.mlp_params({self.H}, {self.K}, {hidden}, {d_out}, "
                                               f"depth={lv.memory.depth}, residual={lv.memory.residual})")
        self.gen_var, self.hot = {}, True    # the stacked generators' step is worth compiling
        for i, group in enumerate(groups):
            var = "gens" if len(groups) == 1 else f"gens{i + 1}"
            self.gen_var.update({g: var for g in group})
            m = self.spec.levels[group[0]].memory
            params = ", ".join(f"{g!r}: self.{weights[g]}" for g in group)
            residual = ", ".join(str(self.spec.levels[g].memory.residual) for g in group) + ("," if len(group) == 1 else "")
            lines.append(f"{var} = L.generators(state, p, {{{params}}}, residual=({residual}), "
                         f"activation={m.activation!r}, momentum={self.derived[group[0]].momentum is not None}, like=x)")
        needed = S.reads(self.spec, [e for n in (consumer, *gens) for e in self.spec.levels[n].flows()])[1]
        sites = self.read_sites(gens, needed)
        batched = [grp for grp in groups if all(sites[g] is not None and len(sites[g]) == 1 for g in grp)]
        self.gen_reads = {g: None for grp in batched for g in grp}   # filled with each input's code by `expr`
        loop: list[str] = []
        inner_done: set[str] = set()
        sigs = [n for n in self.spec.signals]  # every signal the consumer or the generators read
        for s in sigs:
            if s in needed:
                self.signal(s, loop, inner_done)
        loop = self.place_reads(loop, batched)
        for group in groups:
            loop.append(self.update_call(group, loop, inner_done, C))
        self.gen_reads = {}
        computed = [s for s in sigs if s in inner_done]
        loop += [f"parts.setdefault({s!r}, []).append(sig_{s})" for s in computed]
        lines += ["cstate = cnew = dict(state)  # convolutions carry their past from chunk to chunk",
                  "xfull, parts = x, {}",
                  f"for c0, c1 in L.spans(T, {C}, {self.gen_var[gens[0]]}.offset):  # chunks from the sequence start",
                  "    x = xfull[:, c0:c1]"]
        lines += [f"    {ln}" for ln in loop]
        lines += ["new.update({k: v for k, v in cnew.items() if k not in state or state[k] is not v})",
                  "x, cstate, cnew = xfull, state, new"]
        lines += [f"sig_{s} = torch.cat(parts[{s!r}], 1)" for s in computed]
        lines += [f"L.save_generators(new, p, {var})" for var in dict.fromkeys(self.gen_var.values())]
        done.update(computed)
        return lines

    def generator_read(self, fn: str, code: str) -> str:
        """The code of generator `fn` applied to `code` (called by `expr`)."""
        if fn in self.gen_reads and self.gen_reads[fn] in (None, code):
            self.gen_reads[fn] = code
            return f"read_{fn}"
        return f"L.read_generator({self.gen_var[fn]}, {fn!r}, {code})"

    def place_reads(self, loop: list[str], batched: list[list[str]]) -> list[str]:
        """The signal lines with each batched group's read call first placed: the lines that need
        no read (transitively), the read calls, then the lines that need one."""
        if not batched:
            return loop
        reads = [f"read_{g}" for grp in batched for g in grp]
        tainted: set[str] = set()
        early, late = [], []
        for ln in loop:
            name, code = ln.split(" = ", 1)
            refs = set(re.findall(r"(?<![\w.])(sig_\w+|read_\w+)\b", code))
            if refs & (tainted | set(reads)):
                tainted.add(name)
                late.append(ln)
            else:
                early.append(ln)
        calls = []
        for grp in batched:
            codes = [self.gen_reads[g] for g in grp]
            arg = codes[0] if len(set(codes)) == 1 else "(" + ", ".join(codes) + ")"
            calls.append(f"{', '.join(f'read_{g}' for g in grp)}{',' if len(grp) == 1 else ''} = "
                         f"L.read_generators({self.gen_var[grp[0]]}, {arg})  # at the chunk's anchor")
        return early + calls + late

    def update_call(self, group: list[str], loop: list[str], done: set[str], chunk: int) -> str:
        """One `L.update_generators` call for a group: each argument shared by the group's
        generators, or a tuple with one per generator."""
        per = [self.rule_codes(g, self.spec.levels[g], loop, done, generator=True) for g in group]
        args = []
        for field in ("key", "target", "step", "beta", "retain", "erase"):
            codes = [c[field] for c, _, _ in per]
            args.append(codes[0] if len(set(codes)) == 1 else "(" + ", ".join(codes) + ")")
        _, self_target, d = per[0]
        backend = "backend" if self.placement[group[0]].skeleton else "'torch'"
        var = self.gen_var[group[0]]
        return (f"{var} = L.update_generators({var}, {', '.join(args)}, objective={d.loss!r}, "
                f"self_target={self_target}, chunk_size={chunk}, mode=mode, backend={backend})")


def S_unsupported(message: str):
    from nlc.backends.torch.levels import Unsupported
    return Unsupported(message)

"""The `.nl` DSL: the second spelling of the spec language (grammar in nlc/syntax/nl.lark).

`parse_nl` returns the same plain data the YAML loader returns for the equivalent YAML file
(dicts, lists, numbers, `Located` strings; expressions as `nlc.expr` nodes built by the shared
`ExprBuilder`), and a SourceMap with a span for every key and value path, so validation and the
checks point into the `.nl` text. Syntax errors are E006 at the offending token, duplicates E008.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import lark
from lark import Token, v_args

from nlc.diagnostics import Collector, Span, did_you_mean
from nlc.syntax.expr import EXPR_GRAMMAR, ExprBuilder
from nlc.syntax.source import Located, SourceMap
from nlc.vocab import OBJECTIVES

GRAMMAR = Path(__file__).with_name("nl.lark").read_text() + "\n" + EXPR_GRAMMAR
MEMORY_KINDS = tuple(OBJECTIVES)          # matrix, vector, mlp, attention
MAX_DEPTH = 100                           # brackets, and parse-tree levels, nested at most this deep
STATEMENTS = ("model", "signal", "level", "template", "optimizer")


@lru_cache(maxsize=1)
def _parser() -> lark.Lark:
    return lark.Lark(GRAMMAR, start="start", parser="lalr", propagate_positions=True,
                     maybe_placeholders=True)


# ---------------------------------------------------------------- intermediate form

@dataclass
class V:
    """A value and its span. `data` is plain (or an expression node), a list of V, or a dict
    of key -> (key span, V)."""
    data: Any
    span: Span


@dataclass
class Clause:
    key: str
    kspan: Span
    value: V


@dataclass
class Head:
    name: Token
    args: list[Clause] | None      # None: a bare name (a template or a memory kind)
    span: Span


@dataclass
class Body:
    clauses: list[Clause]


@dataclass
class Stmt:
    kind: str                      # model, signal, level, template, optimizer_ref, optimizer_spec
    kw: Token
    names: list[Token]
    span: Span
    head: Head | None = None
    clauses: list[Clause] = field(default_factory=list)
    value: V | None = None
    items: list = field(default_factory=list)


@dataclass
class Group:
    kw: Token
    params: Token
    items: list                    # Clause (use/update) or Stmt (opt_level)
    span: Span


def _number(tok: Token) -> int | float:
    return int(tok) if re.fullmatch(r"\d{1,4000}", tok) else float(tok)


@v_args(meta=True)
class _Builder(ExprBuilder):
    """Turns the parse tree into statements; expressions are built by the shared ExprBuilder."""

    def __init__(self, file: str):
        super().__init__(Span(file, 1, 1))
        self.file = file
        self.duplicates: list[tuple[str, Span, Span]] = []   # (what, span, first span): E008

    def tok(self, t: Token) -> Span:
        return self._tok_span(t)

    def meta(self, meta) -> Span:
        return self.span_of(meta)

    def start(self, meta, items):
        return items

    # plain values
    def lit_num(self, meta, items):
        return V(_number(items[0]), self.tok(items[0]))

    def lit_neg(self, meta, items):
        return V(-_number(items[0]), self.meta(meta))

    def lit_name(self, meta, items):
        t = items[0]
        if t in ("true", "false"):
            return V(t == "true", self.tok(t))
        return V(Located(str(t), self.tok(t)), self.tok(t))

    def lit_str(self, meta, items):
        t = items[0]
        s = self.tok(t)
        span = Span(s.file, s.line, s.col + 1, s.end_line, s.end_col - 1)
        return V(Located(str(t)[1:-1], span), span)

    def lit_list(self, meta, items):
        return V([i for i in items if i is not None], self.meta(meta))

    # model
    def shape_item(self, meta, items):
        key, values = items[0], items[1:]
        if str(key) == "block" or len(values) > 1:
            span = values[0].span if len(values) == 1 else _join(values[0].span, values[-1].span)
            return Clause(str(key), self.tok(key), V(values, span))
        return Clause(str(key), self.tok(key), values[0])

    def model(self, meta, items):
        return Stmt("model", items[0], [items[1]], self.meta(meta), clauses=items[2:])

    def signal(self, meta, items):
        return Stmt("signal", items[0], [items[1]], self.meta(meta), value=V(items[2], items[2].span))

    # levels and templates
    def _level_like(self, kind, meta, items):
        kw, rest = items[0], items[1:]
        names = [t for t in rest if isinstance(t, Token) and t.type == "NAME"]
        stmt = Stmt(kind, kw, names, self.meta(meta))
        for it in rest:
            if isinstance(it, Head):
                stmt.head = it
            elif isinstance(it, Clause):
                stmt.clauses.append(it)
            elif isinstance(it, Body):
                stmt.clauses.extend(it.clauses)
        return stmt

    def level(self, meta, items):
        return self._level_like("level", meta, items)

    def template(self, meta, items):
        return self._level_like("template", meta, items)

    def head(self, meta, items):
        name = items[0]
        span = self.meta(meta)
        has_parens = meta.end_pos > name.end_pos
        args = [a for a in items[1:] if a is not None] if has_parens else None
        return Head(name, args, span)

    def mem_kwarg(self, meta, items):
        return Clause(str(items[0]), self.tok(items[0]), items[1])

    def mem_flag(self, meta, items):
        return Clause(str(items[0]), self.tok(items[0]), V(True, self.tok(items[0])))

    def body(self, meta, items):
        return Body(list(items))

    # clauses
    def every(self, meta, items):
        kw = items[0]
        if len(items) == 2:  # never
            s = self.tok(items[1])
            data = {"period": (s, V(None, s)), "unit": (s, V("tokens", s))}
        else:
            period, unit = items[1], items[2]
            u = str(unit) if str(unit).endswith("s") else str(unit) + "s"
            data = {"period": (period.span, period), "unit": (self.tok(unit), V(u, self.tok(unit)))}
            s = _join(period.span, self.tok(unit))
        return Clause("every", self.tok(kw), V(data, s))

    def period(self, meta, items):
        vals, minus = [], None
        for t in items:
            if t is None:
                continue
            if t.type == "MINUS":
                minus = t
            elif minus is not None:
                vals.append(V(-_number(t), _join(self.tok(minus), self.tok(t))))
                minus = None
            else:
                vals.append(V(_number(t) if t.type == "NUMBER" else Located(str(t), self.tok(t)), self.tok(t)))
        return V(vals, self.meta(meta))

    def chunk(self, meta, items):
        return Clause("chunk", self.tok(items[0]), items[1])

    def _word(self, field, items):
        """A clause whose value is one word: `init meta`, `read current`, `out scalar`."""
        return Clause(field, self.tok(items[0]), V(Located(str(items[1]), self.tok(items[1])), self.tok(items[1])))

    def init(self, meta, items):
        return self._word("init", items)

    def read(self, meta, items):
        return self._word("read", items)

    def out(self, meta, items):
        return self._word("out", items)

    def flow(self, meta, items):
        return Clause(str(items[0]), self.tok(items[0]), V(items[1], items[1].span))

    def minimize(self, meta, items):
        return Clause("objective", self.tok(items[0]), V(items[1], items[1].span))

    def by(self, meta, items):
        chain = items[1]
        return Clause("rule", self.tok(items[0]), V(chain, _join(chain[0].span, chain[-1].span)))

    def chain(self, meta, items):
        return [V(e, e.span) for e in items if not isinstance(e, Token)]

    # optimizers
    def optimizer_ref(self, meta, items):
        return Stmt("optimizer_ref", items[0], [], self.meta(meta), value=items[1])

    def ref(self, meta, items):
        name = items[0]
        if name.type == "STRING":
            use = self.lit_str(meta, [name])
        else:
            use = V(Located(str(name), self.tok(name)), self.tok(name))
        span = self.meta(meta)
        data = {"use": (use.span, use)}
        if meta.end_pos > name.end_pos:
            hyper = {}
            for k in items[1:]:
                if k is None:
                    continue
                if k.key in hyper:
                    self.duplicates.append((f"setting `{k.key}`", k.kspan, hyper[k.key][0]))
                    continue
                hyper[k.key] = (k.kspan, k.value)
            data["hyper"] = (span, V(hyper, span))
        return V(data, span)

    def ref_kwarg(self, meta, items):
        return Clause(str(items[0]), self.tok(items[0]), V(items[1], items[1].span))

    def optimizer_spec(self, meta, items):
        return Stmt("optimizer_spec", items[0], [items[1]], self.meta(meta), items=items[2:])

    def optimizer_inline(self, meta, items):
        return Stmt("optimizer_inline", items[0], [], self.meta(meta), items=items[1:])

    def hyper(self, meta, items):
        return Stmt("hyper", items[0], [], self.meta(meta), clauses=items[1:])

    def hyper_kv(self, meta, items):
        return Clause(str(items[0]), self.tok(items[0]), items[1])

    def group(self, meta, items):
        return Group(items[0], items[1], list(items[2:]), self.meta(meta))

    def opt_level(self, meta, items):
        kw, name, chain, every = items
        stmt = Stmt("opt_level", kw, [name], self.meta(meta))
        stmt.clauses.append(Clause("input", self.tok(name), chain[0]))
        if len(chain) > 1:
            stmt.clauses.append(Clause("rule", chain[1].span, V(chain[1:], _join(chain[1].span, chain[-1].span))))
        if every is not None:
            stmt.clauses.append(every)
        return stmt

    def update(self, meta, items):
        return Clause("update", self.tok(items[0]), V(items[1], items[1].span))

    def use(self, meta, items):
        return Clause("use", self.tok(items[0]), items[1])


def _join(a: Span, b: Span) -> Span:
    return Span(a.file, a.line, a.col, b.end_line if b.end_line is not None else b.line,
                b.end_col if b.end_col is not None else b.col)


# ---------------------------------------------------------------- assembly into plain data

class _Assembler:
    """Statements -> the YAML loader's data shape, recording spans and reporting duplicates."""

    def __init__(self, smap: SourceMap, errors: Collector):
        self.smap, self.errors = smap, errors
        self.raw: dict = {}
        self.first: dict[tuple, Span] = {}     # path -> span of its first definition
        self.memories: dict[tuple, V] = {}     # memory heads already read (report problems once)

    # spans
    def emit(self, path: tuple, v: V) -> Any:
        self.smap.values[path] = v.span
        if isinstance(v.data, dict):
            out = {}
            for k, (kspan, sub) in v.data.items():
                self.smap.keys[path + (k,)] = kspan
                out[k] = self.emit(path + (k,), sub)
            return out
        if isinstance(v.data, list):
            return [self.emit(path + (i,), sub) for i, sub in enumerate(v.data)]
        return v.data

    def put(self, d: dict, path: tuple, key: str, kspan: Span, v: V, what: str) -> bool:
        """Set d[key], or report E008 when `key` is already there."""
        if key in d:
            first = self.first.get(path + (key,))
            self.errors.error("E008", f"{what} is given twice", kspan,
                              f"the first is on line {first.line}" if first else None)
            return False
        self.first[path + (key,)] = kspan
        self.smap.keys[path + (key,)] = kspan
        d[key] = self.emit(path + (key,), v)
        return True

    def section(self, key: str, kw: Token, span: Span) -> dict:
        if key not in self.raw:
            self.raw[key] = {}
            self.smap.keys[(key,)] = _tok(self.smap.file, kw)
            self.smap.values[(key,)] = span
        return self.raw[key]

    # statements
    def run(self, stmts: list[Stmt]) -> dict:
        heads = [s for s in stmts if s.kind in ("model", "optimizer_spec")]
        if not heads:
            first = stmts[0]
            self.errors.error("E101", "the file has no `model NAME { ... }`", _tok(self.smap.file, first.kw),
                              "a model spec starts `model NAME { vocab 256  d_model 256  layers 4  heads 4  "
                              "block LEVEL, ... }`; an optimizer spec is `optimizer NAME { hyper ...  params ... }`")
            return None
        templates: dict[str, Stmt] = {}
        for s in stmts:
            if s.kind == "template":
                templates.setdefault(str(s.names[0]), s)
        file = self.smap.file
        for s in stmts:
            if s.kind in ("model", "optimizer_spec") and s is not heads[0]:
                self.errors.error("E008", f"a second `{s.kw} {s.names[0]}` in one file", _tok(file, s.kw),
                                  "a file holds one spec: one `model NAME { ... }` or one `optimizer NAME { ... }`")
                continue
            if heads[0].kind == "optimizer_spec" and s.kind != "optimizer_spec":
                self.errors.error("E006", f"`{s.kw}` belongs in a model spec, and this file is the optimizer "
                                  f"`{heads[0].names[0]}`", _tok(file, s.kw),
                                  "an optimizer spec holds `hyper` and `params` inside its `{ ... }`")
                continue
            getattr(self, "do_" + s.kind)(s, templates)
        return self.raw

    def _top(self, s: Stmt):
        kw = _tok(self.smap.file, s.kw)
        self.raw["nlc"] = 1
        self.smap.keys[("nlc",)] = self.smap.values[("nlc",)] = kw
        self.smap.keys[("name",)] = kw
        self.smap.values[("name",)] = _tok(self.smap.file, s.names[0])
        self.raw["name"] = Located(str(s.names[0]), self.smap.values[("name",)])

    def do_model(self, s: Stmt, templates):
        self._top(s)
        shape: dict = {}
        self.raw["model"] = shape
        self.smap.keys[("model",)] = _tok(self.smap.file, s.kw)
        self.smap.values[("model",)] = s.span
        for c in s.clauses:
            self.put(shape, ("model",), c.key, c.kspan, c.value, f"`{c.key}`")

    def do_signal(self, s: Stmt, templates):
        sec = self.section("signals", s.kw, s.span)
        name = str(s.names[0])
        self.put(sec, ("signals",), name, _tok(self.smap.file, s.names[0]), s.value, f"signal `{name}`")

    def _level_data(self, s: Stmt, templates, in_template: bool) -> V:
        data: dict = {}
        seen: dict[str, Span] = {}

        def add(key, kspan, v, what):
            if key in data:
                self.errors.error("E008", f"{what} is given twice", kspan, f"the first is on line {seen[key].line}")
                return
            seen[key] = kspan
            data[key] = (kspan, v)

        h = s.head
        if h is not None:
            name = str(h.name)
            nspan = _tok(self.smap.file, h.name)
            if not in_template and _is_template(name, templates, h.args is not None):
                add("use", nspan, V(Located(name, nspan), nspan), "a template")
                if h.args is not None:  # the template's memory with some options changed
                    base = templates.get(name)
                    mem = dict(self._memory(base.head).data) if base is not None and base.head else {}
                    mem.update(self._memory(h, kind=False).data)
                    add("memory", nspan, V(mem, h.span), "the memory")
            else:
                add("memory", nspan, self._memory(h), "the memory")
        for c in s.clauses:
            add(c.key, c.kspan, c.value, f"`{_SPELLING.get(c.key, c.key)}`")
        return V(data, s.span)

    def _memory(self, h: Head, kind: bool = True) -> V:
        """`mlp(depth=2, residual)` -> V({kind: mlp, depth: 2, residual: true})."""
        if (id(h), kind) in self.memories:
            return self.memories[(id(h), kind)]
        nspan = _tok(self.smap.file, h.name)
        mem: dict = {"kind": (nspan, V(Located(str(h.name), nspan), nspan))} if kind else {}
        for a in h.args or []:
            if a.key in mem:
                self.errors.error("E008", f"memory option `{a.key}` is given twice", a.kspan,
                                  f"the first is on line {mem[a.key][0].line}")
                continue
            mem[a.key] = (a.kspan, a.value)
        self.memories[(id(h), kind)] = V(mem, h.span)
        return self.memories[(id(h), kind)]

    def _named(self, s: Stmt, section: str, what: str, templates):
        sec = self.section(section, s.kw, s.span)
        v = self._level_data(s, templates, in_template=section == "templates")
        for n in s.names:
            self.put(sec, (section,), str(n), _tok(self.smap.file, n), v, f"{what} `{n}`")

    def do_level(self, s: Stmt, templates):
        self._named(s, "levels", "level", templates)

    def do_template(self, s: Stmt, templates):
        self._named(s, "templates", "template", templates)

    def _claim_optimizer(self, s: Stmt) -> bool:
        """Record the model's one `optimizer` statement; a second one is E008."""
        kw = _tok(self.smap.file, s.kw)
        if "optimizer" in self.raw:
            self.errors.error("E008", "the optimizer is given twice", kw,
                              f"the first is on line {self.smap.keys[('optimizer',)].line}")
            return False
        self.smap.keys[("optimizer",)] = kw
        return True

    def do_optimizer_ref(self, s: Stmt, templates):
        if self._claim_optimizer(s):
            self.raw["optimizer"] = self.emit(("optimizer",), s.value)

    def do_optimizer_spec(self, s: Stmt, templates):
        self._top(s)
        self._optimizer_body(s, self.raw, ())

    def do_optimizer_inline(self, s: Stmt, templates):
        """`optimizer { hyper ...  params ... }` in a model file: the YAML `optimizer: {hyper, groups}`."""
        if not self._claim_optimizer(s):
            return
        self.smap.values[("optimizer",)] = s.span
        self.raw["optimizer"] = {}
        self._optimizer_body(s, self.raw["optimizer"], ("optimizer",))

    def _optimizer_body(self, s: Stmt, root: dict, at: tuple):
        """`hyper` and `params` items into `root` (the file's top level, or a model's `optimizer`)."""
        file = self.smap.file
        groups: list = []
        root["groups"] = groups
        self.smap.keys[at + ("groups",)] = self.smap.values[at + ("groups",)] = s.span
        for it in s.items:
            if isinstance(it, Stmt):  # hyper
                if "hyper" not in root:
                    root["hyper"] = {}
                    self.smap.keys[at + ("hyper",)] = _tok(file, it.kw)
                    self.smap.values[at + ("hyper",)] = it.span
                for c in it.clauses:
                    self.put(root["hyper"], at + ("hyper",), c.key, c.kspan, c.value, f"hyperparameter `{c.key}`")
                continue
            if not groups:
                self.smap.keys[at + ("groups",)] = _tok(file, it.kw)
                self.smap.values[at + ("groups",)] = it.span
            gpath = at + ("groups", len(groups))
            g: dict = {}
            groups.append(g)
            self.smap.values[gpath] = it.span
            self.put(g, gpath, "params", _tok(file, it.kw), V(Located(str(it.params), _tok(file, it.params)),
                                                               _tok(file, it.params)), "`params`")
            for c in it.items:
                if isinstance(c, Clause):
                    self.put(g, gpath, c.key, c.kspan, c.value, f"`{c.key}`")
                    continue
                if "levels" not in g:
                    g["levels"] = {}
                    self.smap.keys[gpath + ("levels",)] = _tok(file, c.kw)
                    self.smap.values[gpath + ("levels",)] = c.span
                name = str(c.names[0])
                lv = {cl.key: (cl.kspan, cl.value) for cl in c.clauses}
                self.put(g["levels"], gpath + ("levels",), name, _tok(file, c.names[0]), V(lv, c.span),
                         f"level `{name}`")


_SPELLING = {"objective": "minimize", "rule": "by"}


def _is_template(name: str, templates: dict, has_args: bool) -> bool:
    """A name after `level NAME:` is a template, unless it is (or looks like) a memory kind."""
    if name in templates:
        return True
    if name in MEMORY_KINDS or has_args:
        return False
    near_kind = difflib.get_close_matches(name, MEMORY_KINDS, n=1, cutoff=0.6)
    near_template = difflib.get_close_matches(name, sorted(templates), n=1, cutoff=0.6)
    return not (near_kind and not near_template)


def _tok(file: str, t: Token) -> Span:
    return Span(file, t.line, t.column, t.end_line, t.end_column)


# ---------------------------------------------------------------- syntax errors

_PUNCT = {"LBRACE": "{", "RBRACE": "}", "LPAR": "(", "RPAR": ")", "LSQB": "[", "RSQB": "]",
          "COMMA": ",", "EQUAL": "=", "COLON": ":", "MINUS": "-", "PLUS": "+", "STAR": "*",
          "SLASH": "/", "CIRCUMFLEX": "^", "PIPE": "|>"}
_KEYWORDS = {"MODEL", "SIGNAL", "LEVEL", "TEMPLATE", "OPTIMIZER", "EVERY", "NEVER", "CHUNK", "INIT", "READ",
             "OUT", "KEY", "VALUE", "QUERY", "GATE", "MINIMIZE", "BY", "HYPER", "PARAMS", "UPDATE", "USE"}
_OPERATORS = {"PLUS", "STAR", "SLASH", "CIRCUMFLEX"}
_EXPR_START = {"NAME", "NUMBER", "LPAR", "LSQB", "MINUS"}
_CLOSERS = {"(": ")", "[": "]", "{": "}"}


def _describe(expected: set[str]) -> str:
    parts = []
    if _EXPR_START <= expected:
        parts.append("an expression")
        expected = expected - _EXPR_START
    kws = sorted(f"`{t.lower()}`" for t in expected if t in _KEYWORDS)
    for t in sorted(expected - _KEYWORDS - _OPERATORS):
        if t in _PUNCT:
            parts.append(f"`{_PUNCT[t]}`")
        elif t == "NAME":
            parts.append("a name")
        elif t == "NUMBER":
            parts.append("a number")
        elif t == "STRING":
            parts.append('a "path"')
        elif t == "UNIT":
            parts.append("`tokens` or `steps`")
        elif t == "$END":
            parts.append("the end of the file")
    parts += kws
    if len(parts) > 8:
        parts = parts[:8] + ["..."]
    return parts[0] if len(parts) == 1 else "one of " + ", ".join(parts)


def _scan(text: str):
    """Brackets outside comments and strings: (first too-deep opener, openers left unclosed)."""
    stack: list[tuple[str, int, int]] = []
    line, col, i, n = 1, 1, 0, len(text)
    too_deep = None
    while i < n:
        c = text[i]
        if c == "#":
            j = text.find("\n", i)
            j = n if j < 0 else j
            col += j - i
            i = j
            continue
        if c == '"':
            j = text.find('"', i + 1)
            k = text.find("\n", i + 1)
            if j >= 0 and (k < 0 or j < k):
                col += j + 1 - i
                i = j + 1
                continue
        if c == "\n":
            line, col = line + 1, 1
            i += 1
            continue
        if c in _CLOSERS:
            stack.append((c, line, col))
            if len(stack) > MAX_DEPTH and too_deep is None:
                too_deep = (line, col)
        elif c in (")", "]", "}") and stack and _CLOSERS[stack[-1][0]] == c:
            stack.pop()
        i += 1
        col += 1
    return too_deep, stack


def _syntax_error(e: lark.exceptions.UnexpectedInput, text: str, file: str, errors: Collector) -> None:
    if isinstance(e, lark.exceptions.UnexpectedCharacters):
        c = text[e.pos_in_stream] if 0 <= e.pos_in_stream < len(text) else ""
        shown = f"`{c}`" if c.isprintable() and not c.isspace() else repr(c)
        hint = {
            '"': 'a "string" closes on the same line',
            "|": "rule steps are chained with `|>`",
            ";": "a clause ends at the next keyword or line; no `;` is needed",
            "'": 'paths are written in double quotes: "adamw.nl"',
            ".": "names are plain words such as `M_k`; a number is written like `0.5`",
        }.get(c)
        msg = "unterminated string" if c == '"' else f"unexpected character {shown}"
        errors.error("E006", msg, Span(file, e.line, e.column), hint)
        return
    tok = getattr(e, "token", None)
    expected = set(getattr(e, "expected", None) or ())
    _, unclosed = _scan(text)
    if tok is None or tok.type == "$END":
        if unclosed:
            c, ln, col = unclosed[-1]
            errors.error("E006", f"`{c}` is never closed: a `{_CLOSERS[c]}` is missing", Span(file, ln, col, ln, col + 1),
                         f"the file ends (line {text.count(chr(10)) + 1}) before the `{_CLOSERS[c]}`")
            return
        line, col = (tok.line, tok.column) if tok is not None and tok.line and tok.line > 0 else _end(text)
        errors.error("E006", f"the file ends too early: expected {_describe(expected)}", Span(file, line, col))
        return
    where = Span(file, tok.line, tok.column, tok.end_line, tok.end_column)
    shown = _PUNCT.get(tok.type, str(tok))
    after_expr = bool(expected & _OPERATORS)
    words = re.findall(r"[A-Za-z_][A-Za-z0-9_]*", text[max(0, tok.start_pos - 200):tok.start_pos])
    if tok.type in ("NAME", "NUMBER") and after_expr:
        prev = re.search(r"([A-Za-z_][A-Za-z0-9_]*)\s*$", text[:tok.start_pos])
        if prev and prev.group(1) in STATEMENTS:
            ln = text.count("\n", 0, prev.start(1)) + 1
            col = prev.start(1) - (text.rfind("\n", 0, prev.start(1)) + 1) + 1
            errors.error("E006", f"`{prev.group(1)}` is read as part of the expression before it",
                         Span(file, ln, col, ln, col + len(prev.group(1))),
                         "an operator before it is missing its right operand")
            return
    if "UNIT" in expected and tok.type != "UNIT":
        errors.error("E006", "`every` needs a clock unit: `tokens` or `steps`", where,
                     did_you_mean(str(tok), ["tokens", "steps"]) if tok.type == "NAME" else
                     "write `every 1 token`, `every 64, 512 tokens`, `every 16 steps` or `every never`")
        return
    if str(tok) in STATEMENTS and "RBRACE" in expected and unclosed:
        c, ln, _ = unclosed[-1]
        errors.error("E006", f"a `}}` is missing before `{tok}`", where, f"the `{c}` on line {ln} is still open")
        return
    if "EQUAL" in expected and tok.type != "EQUAL" and len(expected) <= 3:
        last = words[-2:] if len(words) >= 2 else words + [""]
        if words and words[-1] in ("key", "value", "query", "gate"):
            hint = f"write `{words[-1]} = EXPR`"
        elif len(words) >= 2 and words[-2] == "signal":
            hint = f"write `signal {words[-1]} = EXPR`"
        elif len(words) >= 2 and words[-2] == "level":
            hint = f"an optimizer level is written `level {words[-1]} = grad |> ema(beta1)`"
        else:
            hint = f"settings are written `{last[-1] or 'name'}=value`"
        errors.error("E006", f"missing `=` before `{shown}`", where, hint)
        return
    kws = [t.lower() for t in expected if t in _KEYWORDS]
    if tok.type == "NAME" and kws:
        hint = did_you_mean(str(tok), kws)
        if hint and hint.startswith("did you mean") or not after_expr:
            errors.error("E006", f"unknown keyword `{tok}`", where, hint or f"expected {_describe(expected)}")
            return
        errors.error("E006", f"unexpected `{tok}` after an expression", where,
                     "is an operator or a `,` missing? otherwise expected " + _describe(expected - _OPERATORS))
        return
    hint = None
    if tok.type == "COLON":
        hint = "`:` follows only the names of `level` and `template`; write `vocab 256` or `key = EXPR`"
    elif tok.type == "EQUAL" and "COLON" in expected:
        hint = "a model level is declared `level NAME: MEMORY ...`; `level NAME = ...` is an optimizer level"
    elif expected <= {"NAME", "RPAR", "COMMA"} and tok.type != "NAME":
        hint = "options and settings are named: `mlp(depth=2)`, `adamw(lr=4e-4)`"
    elif tok.type in ("RPAR", "RSQB", "RBRACE"):
        hint = "brackets do not match here"
    errors.error("E006", f"unexpected `{shown}`: expected {_describe(expected)}", where, hint)


def _end(text: str) -> tuple[int, int]:
    stripped = text.rstrip()
    line = stripped.count("\n") + 1
    return line, len(stripped) - (stripped.rfind("\n") + 1) + 1


_EXPR_RULES = {"add", "sub", "mul", "div", "pow", "neg", "index", "call", "list", "name", "num"}


def _too_deep(tree: lark.Tree):
    """The outermost expression holding a subtree more than MAX_DEPTH below the root (no recursion)."""
    stack = [(tree, 0, None)]
    while stack:
        node, d, outer = stack.pop()
        if outer is None and node.data in _EXPR_RULES:
            outer = node
        if d > MAX_DEPTH:
            return outer or node
        stack.extend((c, d + 1, outer) for c in node.children if isinstance(c, lark.Tree))
    return None


# ---------------------------------------------------------------- entry point

def parse_nl(text: str, file: str, errors: Collector) -> tuple[object, SourceMap]:
    """Parse `.nl` text into the YAML loader's data shape plus a SourceMap; problems go to `errors`."""
    smap = SourceMap(file)
    smap.values[()] = Span(file, 1, 1)
    too_deep, _ = _scan(text)
    if too_deep is not None:
        errors.error("E006", f"brackets nest more than {MAX_DEPTH} deep", Span(file, *too_deep),
                     "split the expression into named signals")
        return None, smap
    try:
        tree = _parser().parse(text)
    except lark.exceptions.UnexpectedInput as e:
        _syntax_error(e, text, file, errors)
        return None, smap
    deep = _too_deep(tree)
    if deep is not None:
        meta = deep.meta
        errors.error("E006", f"the expression nests more than {MAX_DEPTH} levels deep",
                     Span(file, meta.line, meta.column) if not meta.empty else Span(file, 1, 1),
                     "split it into named signals")
        return None, smap
    builder = _Builder(file)
    stmts = builder.transform(tree)
    if not stmts:
        return None, smap
    for what, span, first in builder.duplicates:
        errors.error("E008", f"{what} is given twice", span, f"the first is on line {first.line}")
    return _Assembler(smap, errors).run(stmts), smap

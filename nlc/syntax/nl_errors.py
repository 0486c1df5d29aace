"""Syntax errors in `.nl` text as one located problem (E006): a message, a span and a hint.

Lark names the token where parsing stopped and the terminals it expected there. The rules below
add what a reader needs from the tokens before that point, which the same lexer reads (so a
comment or a "string" is never taken for code): the open brackets, the words just before. Each
rule returns (message, span, hint) or None; the first rule that answers is the problem reported.
Two limits guard the later passes: brackets, and parse-tree levels, nest at most MAX_DEPTH deep.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Iterator

import lark
from lark import Token
from lark.exceptions import UnexpectedCharacters, UnexpectedInput

from nlc.diagnostics import Span, did_you_mean
from nlc.syntax.nl_tree import parser

MAX_DEPTH = 100                           # brackets, and parse-tree levels, nested at most this deep
STATEMENTS = ("model", "signal", "level", "template", "optimizer")
FLOWS = ("key", "value", "query", "gate", "output")

Problem = tuple[str, Span, str | None]  # message, where, hint

# How the grammar's terminals read in a message.
_PUNCT = {"LBRACE": "{", "RBRACE": "}", "LPAR": "(", "RPAR": ")", "LSQB": "[", "RSQB": "]",
          "COMMA": ",", "EQUAL": "=", "COLON": ":", "MINUS": "-", "PLUS": "+", "STAR": "*",
          "SLASH": "/", "CIRCUMFLEX": "^", "PIPE": "|>"}
_KEYWORDS = {"MODEL", "SIGNAL", "LEVEL", "TEMPLATE", "OPTIMIZER", "EVERY", "NEVER", "CHUNK", "INIT", "READ",
             "OUT", "KEY", "VALUE", "QUERY", "GATE", "OUTPUT", "MINIMIZE", "BY", "HYPER", "PARAMS", "UPDATE", "USE"}
_OPERATORS = {"PLUS", "STAR", "SLASH", "CIRCUMFLEX"}
_EXPR_START = {"NAME", "NUMBER", "LPAR", "LSQB", "MINUS"}
_CLOSERS = {"(": ")", "[": "]", "{": "}"}
_is_word = re.compile(r"[A-Za-z_][A-Za-z0-9_]*").fullmatch

# A character the lexer cannot read: the hint for the likely mistake.
_CHARACTER_HINTS = {
    '"': 'a "string" closes on the same line',
    "|": "rule steps are chained with `|>`",
    ";": "a clause ends at the next keyword or line; no `;` is needed",
    "'": 'paths are written in double quotes: "adamw.nl"',
    ".": "names are plain words such as `M_k`; a number is written like `0.5`",
}


def _describe(expected: set[str]) -> str:
    """What the parser expected, in words: `one of an expression, `)`, `,`, ...`."""
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


# ---------------------------------------------------------------- tokens and brackets

def _tokens(text: str, end: int | None = None) -> Iterator[Token]:
    """The lexer's tokens (no whitespace or comments) before offset `end`, up to a character it cannot read."""
    try:
        for t in parser().lex(text):
            if end is not None and t.start_pos >= end:
                return
            yield t
    except UnexpectedCharacters:
        return


def _open_brackets(tokens: Iterable[Token], limit: int | None = None) -> list[Token]:
    """The brackets still open after `tokens`, innermost last (a closer that matches nothing is
    skipped); stops as soon as more than `limit` are open."""
    stack: list[Token] = []
    for t in tokens:
        if str(t) in _CLOSERS:
            stack.append(t)
            if limit is not None and len(stack) > limit:
                break
        elif stack and str(t) == _CLOSERS[str(stack[-1])]:
            stack.pop()
    return stack


def _span(file: str, t: Token) -> Span:
    return Span(file, t.line, t.column, t.end_line, t.end_column)


# ---------------------------------------------------------------- entry points

def too_deep_brackets(text: str, file: str) -> Problem | None:
    """Brackets nested more than MAX_DEPTH deep (checked before parsing)."""
    stack = _open_brackets(_tokens(text), limit=MAX_DEPTH)
    if len(stack) <= MAX_DEPTH:
        return None
    return (f"brackets nest more than {MAX_DEPTH} deep", Span(file, stack[-1].line, stack[-1].column),
            "split the expression into named signals")


_EXPR_RULES = {"add", "sub", "mul", "div", "pow", "neg", "index", "call", "list", "name", "num"}


def too_deep_tree(tree: lark.Tree, file: str) -> Problem | None:
    """A parse tree more than MAX_DEPTH levels deep, at its outermost expression (no recursion)."""
    stack = [(tree, 0, None)]
    while stack:
        node, d, outer = stack.pop()
        if outer is None and node.data in _EXPR_RULES:
            outer = node
        if d > MAX_DEPTH:
            meta = (outer or node).meta
            return (f"the expression nests more than {MAX_DEPTH} levels deep",
                    Span(file, meta.line, meta.column) if not meta.empty else Span(file, 1, 1),
                    "split it into named signals")
        stack.extend((c, d + 1, outer) for c in node.children if isinstance(c, lark.Tree))
    return None


def syntax_error(e: UnexpectedInput, text: str, file: str) -> Problem:
    """The problem a lark parse error stands for."""
    if isinstance(e, UnexpectedCharacters):
        return _bad_character(e, text, file)
    tok = getattr(e, "token", None)
    expected = set(getattr(e, "expected", None) or ())
    if tok is None or tok.type == "$END":
        return _file_ends(tok, expected, list(_tokens(text)), text, file)
    at = _At(text, file, tok, expected, list(_tokens(text, tok.start_pos)))
    for rule in (_statement_in_expression, _missing_unit, _missing_brace, _missing_equal, _unknown_word):
        problem = rule(at)
        if problem is not None:
            return problem
    return _unexpected(at)


def _bad_character(e: UnexpectedCharacters, text: str, file: str) -> Problem:
    c = text[e.pos_in_stream] if 0 <= e.pos_in_stream < len(text) else ""
    shown = f"`{c}`" if c.isprintable() and not c.isspace() else repr(c)
    msg = "unterminated string" if c == '"' else f"unexpected character {shown}"
    return msg, Span(file, e.line, e.column), _CHARACTER_HINTS.get(c)


def _file_ends(tok: Token | None, expected: set[str], tokens: list[Token], text: str, file: str) -> Problem:
    unclosed = _open_brackets(tokens)
    if unclosed:
        b = unclosed[-1]
        return (f"`{b}` is never closed: a `{_CLOSERS[b]}` is missing", _span(file, b),
                f"the file ends (line {text.count(chr(10)) + 1}) before the `{_CLOSERS[b]}`")
    if tok is not None and tok.line and tok.line > 0:
        line, col = tok.line, tok.column
    else:  # just after the last non-blank character
        stripped = text.rstrip()
        line, col = stripped.count("\n") + 1, len(stripped) - (stripped.rfind("\n") + 1) + 1
    return f"the file ends too early: expected {_describe(expected)}", Span(file, line, col), None


# ---------------------------------------------------------------- an unexpected token

@dataclass
class _At:
    """Where parsing stopped: the token, the terminals expected there, and the tokens before it."""
    text: str
    file: str
    tok: Token
    expected: set[str]
    before: list[Token]

    @property
    def span(self) -> Span:
        return _span(self.file, self.tok)

    @property
    def after_expr(self) -> bool:
        """An expression could go on here (an operator would have been read)."""
        return bool(self.expected & _OPERATORS)


def _statement_in_expression(at: _At) -> Problem | None:
    """`signal s = x +` then `level a: ...`: `level` became the operand, so the parser stops after it."""
    prev = at.before[-1] if at.before else None
    if at.tok.type in ("NAME", "NUMBER") and at.after_expr and prev is not None and str(prev) in STATEMENTS:
        return (f"`{prev}` is read as part of the expression before it", _span(at.file, prev),
                "an operator before it is missing its right operand")
    return None


def _missing_unit(at: _At) -> Problem | None:
    if "UNIT" not in at.expected or at.tok.type == "UNIT":
        return None
    hint = (did_you_mean(str(at.tok), ["tokens", "steps"]) if at.tok.type == "NAME" else
            "write `every 1 token`, `every 64, 512 tokens`, `every 16 steps` or `every never`")
    return "`every` needs a clock unit: `tokens` or `steps`", at.span, hint


def _missing_brace(at: _At) -> Problem | None:
    """A statement keyword where a `}` could close the body still open, in a file that leaves a
    bracket open (where the file's brackets balance, the keyword is the mistake, not a `}`)."""
    if str(at.tok) not in STATEMENTS or "RBRACE" not in at.expected or not _open_brackets(_tokens(at.text)):
        return None
    open_here = _open_brackets(at.before)
    if not open_here:
        return None
    b = open_here[-1]
    return f"a `}}` is missing before `{at.tok}`", at.span, f"the `{b}` on line {b.line} is still open"


def _missing_equal(at: _At) -> Problem | None:
    if "EQUAL" not in at.expected or at.tok.type == "EQUAL" or len(at.expected) > 3:
        return None
    *_, prev, last = ["", ""] + [str(t) for t in at.before if _is_word(t)]
    if last in FLOWS:
        hint = f"write `{last} = EXPR`"
    elif prev == "signal":
        hint = f"write `signal {last} = EXPR`"
    elif prev == "level":
        hint = f"an optimizer level is written `level {last} = grad |> ema(beta1)`"
    else:
        hint = f"settings are written `{last or 'name'}=value`"
    return f"missing `=` before `{at.tok}`", at.span, hint


def _unknown_word(at: _At) -> Problem | None:
    """A name where a keyword could go: a misspelt keyword, or (after an expression) a missing operator."""
    kws = [t.lower() for t in at.expected if t in _KEYWORDS]
    if at.tok.type != "NAME" or not kws:
        return None
    hint = did_you_mean(str(at.tok), kws)
    if hint and hint.startswith("did you mean") or not at.after_expr:
        return f"unknown keyword `{at.tok}`", at.span, hint or f"expected {_describe(at.expected)}"
    return (f"unexpected `{at.tok}` after an expression", at.span,
            "is an operator or a `,` missing? otherwise expected " + _describe(at.expected - _OPERATORS))


def _unexpected(at: _At) -> Problem:
    tok, expected = at.tok, at.expected
    hint = None
    if tok.type == "COLON":
        hint = "`:` follows only the names of `level` and `template`; write `vocab 256` or `key = EXPR`"
    elif tok.type == "EQUAL" and "COLON" in expected:
        hint = "a model level is declared `level NAME: MEMORY ...`; `level NAME = ...` is an optimizer level"
    elif expected <= {"NAME", "RPAR", "COMMA"} and tok.type != "NAME":
        hint = "options and settings are named: `mlp(depth=2)`, `adamw(lr=4e-4)`"
    elif tok.type in ("RPAR", "RSQB", "RBRACE"):
        hint = "brackets do not match here"
    return f"unexpected `{tok}`: expected {_describe(expected)}", at.span, hint

"""Diagnostics: every user mistake becomes a `Diagnostic` with a source position and a hint.

Errors are collected and raised together as one `SpecError`; the CLI prints them in the format

    specs/bad.yaml:12:9: error[E204 unknown-level]: flow reads level `memroy`, which is not defined
       12 |   key: memroy(x)
          |        ^^^^^^
    hint: did you mean `memory`?

and exits with status 2. The table `CODES` is the single list of error codes; specs/README.md
documents each and tests/test_errors.py covers each.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field

# code -> (name, what it means). Grouped: E0 input, E1 schema, E2 names, E3 types and shapes,
# E4 graph and schedule, E5 numerics, E6 backend.
CODES: dict[str, tuple[str, str]] = {
    "E001": ("empty-file", "the file holds no spec"),
    "E002": ("not-text", "the file is not UTF-8 text (binary or another encoding)"),
    "E003": ("yaml-syntax", "the YAML does not parse"),
    "E004": ("yaml-alias", "YAML anchors and aliases are not allowed in specs"),
    "E005": ("yaml-tag", "YAML tags (`!foo`, `!!python/...`) are not allowed in specs"),
    "E006": ("nl-syntax", "the .nl text does not parse"),
    "E007": ("expr-syntax", "an expression does not parse"),
    "E008": ("duplicate-key", "a key or name is given twice"),
    "E009": ("unknown-format", "the file is neither .yaml/.yml nor .nl"),
    "E010": ("too-large", "the file is larger than a spec can be"),
    "E101": ("missing-key", "a required key is missing"),
    "E102": ("unknown-key", "a key the language does not know"),
    "E103": ("bad-value", "a value has the wrong type or form"),
    "E104": ("not-positive", "a size, count or period must be a positive integer"),
    "E105": ("bad-version", "the spec's `nlc:` version is not supported"),
    "E201": ("unknown-name", "an expression names a signal or variable that is not defined"),
    "E202": ("unknown-function", "an expression calls a function that does not exist"),
    "E203": ("unknown-rule", "a rule chain names a primitive that does not exist"),
    "E204": ("unknown-level", "a flow or block names a level that is not defined"),
    "E205": ("unknown-template", "a level uses a template that is not defined"),
    "E206": ("name-clash", "a signal, level or hyperparameter reuses a reserved or taken name"),
    "E207": ("unknown-optimizer", "the optimizer spec named cannot be found"),
    "E208": ("unknown-hyper", "an optimizer override or reference names no hyperparameter"),
    "E301": ("shape-mismatch", "a flow's shape does not fit where it is used"),
    "E302": ("bad-arguments", "a function or primitive gets the wrong number or kind of arguments"),
    "E303": ("bad-objective", "the memory cannot take this objective"),
    "E304": ("self-outside-level", "`M` (the level's own memory) used outside a level"),
    "E305": ("bad-memory", "the memory's options contradict each other"),
    "E306": ("bad-rule-chain", "a rule chain is ill-formed (no `grad`, grad twice, ...)"),
    "E401": ("cycle", "a cycle of flows with no delayed edge"),
    "E402": ("clock-mismatch", "a level ticks on the wrong clock (tokens vs steps)"),
    "E403": ("chunk-schedule", "chunk sizes or periods that cannot be scheduled together"),
    "E501": ("diverges", "a rule that diverges for certain with the constants given"),
    "E502": ("bad-hyper", "an optimizer hyperparameter outside its valid range"),
    "E601": ("unsupported", "a valid construct that the backend cannot compile yet"),
}


@dataclass(frozen=True)
class Span:
    """A region of a source file; lines and columns are 1-based, `end_col` exclusive."""

    file: str
    line: int
    col: int
    end_line: int | None = None
    end_col: int | None = None

    def shifted(self, line: int, col: int, end_line: int | None, end_col: int | None) -> Span:
        """A span given relative to this one's start (line 1 = this line, col 1 = this column)."""
        def abs_col(ln: int, c: int) -> int:
            return self.col + c - 1 if ln == 1 else c
        return Span(self.file, self.line + line - 1, abs_col(line, col),
                    None if end_line is None else self.line + end_line - 1,
                    None if end_col is None else abs_col(end_line or line, end_col))


@dataclass
class Diagnostic:
    code: str
    message: str
    span: Span | None = None
    hint: str | None = None
    severity: str = "error"

    @property
    def name(self) -> str:
        return CODES[self.code][0]

    def render(self, source: str | None = None) -> str:
        where = f"{self.span.file}:{self.span.line}:{self.span.col}: " if self.span else ""
        out = [f"{where}{self.severity}[{self.code} {self.name}]: {self.message}"]
        if self.span and source is not None:
            lines = source.splitlines()
            if 1 <= self.span.line <= len(lines):
                text = lines[self.span.line - 1].expandtabs(1)
                gutter = f"{self.span.line:>5} | "
                out.append(gutter + text)
                width = 1
                if self.span.end_col and (self.span.end_line in (None, self.span.line)):
                    width = max(1, self.span.end_col - self.span.col)
                width = min(width, max(1, len(text) - self.span.col + 1))
                out.append(" " * (len(gutter) - 2) + "| " + " " * (self.span.col - 1) + "^" * width)
        if self.hint:
            out.append(f"hint: {self.hint}")
        return "\n".join(out)


@dataclass
class SpecError(Exception):
    """One or more user mistakes in a spec. `str()` renders all of them with source lines."""

    diagnostics: list[Diagnostic]
    sources: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        super().__init__(self.render())

    def render(self) -> str:
        parts = [d.render(self.sources.get(d.span.file) if d.span else None) for d in self.diagnostics]
        n = len(self.diagnostics)
        parts.append(f"{n} error{'s' if n != 1 else ''}")
        return "\n".join(parts)

    def __str__(self) -> str:
        return self.render()

    @property
    def codes(self) -> list[str]:
        return [d.code for d in self.diagnostics]


class Collector:
    """Collects diagnostics for one file; `raise_if_any()` raises them together."""

    def __init__(self, file: str, source: str | None = None):
        self.file, self.source = file, source
        self.diagnostics: list[Diagnostic] = []
        self.warnings: list[Diagnostic] = []

    def error(self, code: str, message: str, span: Span | None = None, hint: str | None = None) -> None:
        assert code in CODES, code
        if span is None:
            span = Span(self.file, 1, 1)
        self.diagnostics.append(Diagnostic(code, message, span, hint))

    def warn(self, code: str, message: str, span: Span | None = None, hint: str | None = None) -> None:
        """A likely mistake that still has a meaning: reported, never fatal."""
        assert code in CODES, code
        self.warnings.append(Diagnostic(code, message, span or Span(self.file, 1, 1), hint, "warning"))

    def render_warnings(self) -> str:
        return "\n".join(d.render(self.source) for d in self.warnings)

    def raise_if_any(self) -> None:
        if self.diagnostics:
            seen, unique = set(), []
            for d in self.diagnostics:  # a template's error shows once, not once per level using it
                if (d.code, d.span) not in seen:
                    seen.add((d.code, d.span))
                    unique.append(d)
            self.diagnostics = unique
            self.diagnostics.sort(key=lambda d: (d.span.line, d.span.col) if d.span else (0, 0))
            raise SpecError(self.diagnostics, {self.file: self.source or ""})


def did_you_mean(name: str, candidates) -> str | None:
    """A hint naming the closest candidate, or listing the choices when there are few."""
    candidates = sorted(set(candidates))
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    if close:
        return f"did you mean `{close[0]}`?"
    if 0 < len(candidates) <= 12:
        return "expected one of: " + ", ".join(f"`{c}`" for c in candidates)
    return None

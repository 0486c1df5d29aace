"""What the parsers hand to validation: plain data whose strings remember where they came from,
and a SourceMap from data paths (as pydantic writes error locations) to spans."""
from __future__ import annotations

from dataclasses import dataclass, field

from nlc.diagnostics import Span


class Located(str):
    """A string from a spec file, with the span of its text."""

    span: Span

    def __new__(cls, value: str, span: Span):
        s = super().__new__(cls, value)
        s.span = span
        return s


@dataclass
class SourceMap:
    file: str
    values: dict[tuple, Span] = field(default_factory=dict)  # path -> span of the value
    keys: dict[tuple, Span] = field(default_factory=dict)    # path -> span of its key

    def find(self, loc: tuple, key: bool = False) -> Span:
        """The span for a pydantic error location: the deepest known path along `loc`.

        Elements pydantic adds that are not in the data (union tags like `mlp`) are skipped.
        """
        path: tuple = ()
        best = self.values.get((), Span(self.file, 1, 1))
        for el in loc:
            cand = path + (el,)
            if cand in self.values or cand in self.keys:
                path = cand
                best = (self.keys.get(path) if key and path in self.keys else None) or self.values.get(path, best)
        return best

    def get(self, *path, key: bool = False) -> Span | None:
        if key and path in self.keys:
            return self.keys[path]
        return self.values.get(path) or self.keys.get(path)

    def copy_subtree(self, src: tuple, dst: tuple) -> None:
        """Give the paths under `dst` the spans of those under `src` (template expansion)."""
        for table in (self.values, self.keys):
            for p, s in list(table.items()):
                if p[:len(src)] == src:
                    table.setdefault(dst + p[len(src):], s)

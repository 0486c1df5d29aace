"""The `.nl` DSL: the second spelling of the spec language (grammar in nlc/syntax/nl.lark).

`parse_nl` returns the same plain data the YAML loader returns for the equivalent YAML file
(dicts, lists, numbers, `Located` strings; expressions as `nlc.expr` nodes built by the shared
`ExprBuilder`), and a SourceMap with a span for every key and value path, so validation and the
checks point into the `.nl` text. Syntax errors are E006 at the offending token, duplicates E008.

The work is in three steps, one file each:
  nl_tree.py      the parser, and the parse tree -> statements (`Stmt`, `Clause`, `V` with spans)
  nl_assemble.py  statements -> the YAML loader's data shape and SourceMap (duplicates: E008)
  nl_errors.py    a parse error -> one located E006 with a message and a hint
"""
from __future__ import annotations

from lark.exceptions import UnexpectedInput

from nlc.diagnostics import Collector, Span
from nlc.syntax.nl_assemble import MEMORY_KINDS, Assembler
from nlc.syntax.nl_errors import MAX_DEPTH, STATEMENTS, syntax_error, too_deep_brackets, too_deep_tree
from nlc.syntax.nl_tree import GRAMMAR, Builder, parser
from nlc.syntax.source import SourceMap

__all__ = ["parse_nl", "GRAMMAR", "MAX_DEPTH", "MEMORY_KINDS", "STATEMENTS"]


def parse_nl(text: str, file: str, errors: Collector) -> tuple[object, SourceMap]:
    """Parse `.nl` text into the YAML loader's data shape plus a SourceMap; problems go to `errors`."""
    smap = SourceMap(file)
    smap.values[()] = Span(file, 1, 1)
    problem = too_deep_brackets(text, file)
    if problem is None:
        try:
            tree = parser().parse(text)
        except UnexpectedInput as e:
            problem = syntax_error(e, text, file)
        else:
            problem = too_deep_tree(tree, file)
    if problem is not None:
        errors.error("E006", *problem)
        return None, smap
    builder = Builder(file)
    stmts = builder.transform(tree)
    if not stmts:
        return None, smap
    for what, span, first in builder.duplicates:
        errors.error("E008", f"{what} is given twice", span, f"the first is on line {first.line}")
    return Assembler(smap, errors).run(stmts), smap

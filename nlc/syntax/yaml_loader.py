"""A YAML loader that keeps the line and column of every key and value, and runs nothing.

Safe by construction: we compose the node graph with PyYAML's safe composer and build plain
dicts, lists and scalars ourselves. Aliases (the way to a YAML bomb) and explicit tags (the way
to construct Python objects) are refused with a located diagnostic; duplicate keys too.
"""
from __future__ import annotations

import yaml
from yaml.events import AliasEvent, MappingStartEvent, ScalarEvent, SequenceStartEvent
from yaml.nodes import MappingNode, ScalarNode, SequenceNode

from nlc.diagnostics import Collector, Span
from nlc.syntax.source import Located, SourceMap

Path = tuple


class _Loader(yaml.SafeLoader):
    """Composes nodes; records aliases and explicit tags instead of following them."""

    def __init__(self, text: str, file: str, errors: Collector):
        super().__init__(text)
        self.file, self.errors = file, errors

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, AliasEvent):
            self.get_event()
            self.errors.error("E004", f"YAML alias `*{event.anchor}` is not allowed in a spec",
                              _span(self.file, event.start_mark, event.end_mark),
                              "write the value out in full; templates (`templates:` and `use:`) share level settings")
            return ScalarNode("tag:yaml.org,2002:null", "", event.start_mark, event.end_mark)
        if isinstance(event, (ScalarEvent, MappingStartEvent, SequenceStartEvent)):
            if event.tag not in (None, "!"):
                self.errors.error("E005", f"YAML tag `{event.tag}` is not allowed in a spec",
                                  _span(self.file, event.start_mark, event.end_mark),
                                  "remove the tag; specs hold plain values and expressions only")
                event.tag = None
        return super().compose_node(parent, index)


def _span(file: str, start, end=None) -> Span:
    if end is not None and end.line == start.line:
        return Span(file, start.line + 1, start.column + 1, end.line + 1, end.column + 1)
    return Span(file, start.line + 1, start.column + 1)


_scalars = yaml.SafeLoader("")  # only its scalar constructors are used


def load_yaml(text: str, file: str, errors: Collector) -> tuple[object, SourceMap]:
    """Parse YAML text into plain data plus a SourceMap; problems go to `errors`."""
    smap = SourceMap(file)
    loader = _Loader(text, file, errors)
    try:
        node = loader.get_single_node()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        span = Span(file, mark.line + 1, mark.column + 1) if mark else Span(file, 1, 1)
        errors.error("E003", f"YAML does not parse: {e.problem or e.context}", span,
                     "check indentation, colons and closing brackets near this point")
        return None, smap
    except yaml.YAMLError as e:
        errors.error("E003", f"YAML does not parse: {e}", Span(file, 1, 1))
        return None, smap
    finally:
        loader.dispose()
    if node is None:
        return None, smap
    return _build(node, (), smap, errors), smap


def _build(node, path: Path, smap: SourceMap, errors: Collector):
    span = _span(smap.file, node.start_mark, node.end_mark)
    smap.values[path] = span
    if isinstance(node, MappingNode):
        out: dict = {}
        for knode, vnode in node.value:
            kspan = _span(smap.file, knode.start_mark, knode.end_mark)
            if not isinstance(knode, ScalarNode):
                errors.error("E103", "a mapping key must be a plain name", kspan)
                continue
            key = knode.value
            if key in out:
                errors.error("E008", f"key `{key}` is given twice", kspan,
                             f"the first `{key}` is on line {smap.keys[path + (key,)].line}")
                continue
            smap.keys[path + (key,)] = kspan
            out[key] = _build(vnode, path + (key,), smap, errors)
        return out
    if isinstance(node, SequenceNode):
        return [_build(v, path + (i,), smap, errors) for i, v in enumerate(node.value)]
    value = _scalars.construct_object(node) if node.tag != "tag:yaml.org,2002:str" else node.value
    if isinstance(value, str):
        # Quoted scalars start at the quote: the text itself starts one column later.
        if node.style in ("'", '"'):
            span = Span(span.file, span.line, span.col + 1, span.end_line,
                        None if span.end_col is None else span.end_col - 1)
        return Located(value, span)
    if not isinstance(value, (int, float, bool, type(None))):
        return Located(str(node.value), span)  # dates and other YAML types stay text
    return value

"""`--set` overrides of `nlc train`: parsed, located on the command line, and applied.

`--set` takes two kinds of override:

- `path.to.key=value` changes the spec itself (`model.d_model=64`, `levels.attn.memory.window=128`);
  the changed spec is validated and checked like a file (`load_spec`), and a mistake in the value
  is located on the command line;
- `name=value` overrides a hyperparameter of the optimizer (`lr=1e-3`, `betas=[0.9,0.95]`);
  unknown names (E208) and values out of range (E502) are located on the command line
  (`check_hyper_sets`).

The diagnostics' source is the command line as `parse_sets` rebuilds it (`--set a=1 --set b=2`),
named `<command line>`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from nlc.diagnostics import Collector, Span, SpecError, did_you_mean

CMDLINE = "<command line>"


@dataclass(frozen=True)
class Override:
    """One `--set key=value`, with the spans of its key and value on the command line."""
    key: str
    value: str
    key_span: Span
    span: Span


def parse_sets(sets: tuple[str, ...]) -> tuple[str, list[Override]]:
    """The command line the diagnostics show (`--set a=1 --set b=2`), and each override."""
    source, items = "", []
    errors = Collector(CMDLINE)
    for item in sets:
        source += ("" if not source else " ") + "--set "
        col = len(source) + 1
        source += item
        key, eq, value = item.partition("=")
        if not eq or not key.strip() or not value.strip():
            errors.error("E103", f"`--set {item}` is not `key=value`", Span(CMDLINE, 1, col, 1, col + len(item)),
                         "write `--set lr=1e-3` (the optimizer) or `--set model.d_model=64` (the spec)")
            continue
        vcol = col + len(key) + 1
        items.append(Override(key=key.strip(), value=value.strip(), key_span=Span(CMDLINE, 1, col, 1, vcol - 1),
                              span=Span(CMDLINE, 1, vcol, 1, vcol + len(value))))
    errors.source = source
    errors.raise_if_any()
    return source, items


def parse_value(text: str):
    """`64` -> 64, `1e-3` -> 0.001, `true` -> True, `[0.9, 0.95]` -> [0.9, 0.95]; other text stays text."""
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    if text in ("true", "false"):
        return text == "true"
    if text.startswith("["):
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            return text
        if isinstance(value, list):
            return [parse_value(str(v)) if isinstance(v, str) else v for v in value]
    return text


def load_spec(path: Path, spec_sets: list[Override], cmdline: str):
    """Read, parse, patch with the spec overrides, validate and check: the loader's steps, with the
    patch between parsing and validation. Raises SpecError (the command line among its sources)."""
    from nlc.check import check
    from nlc.loader import Loaded, load_located, parse_text, read_source, validate
    from nlc.syntax.source import Located, SourceMap
    try:
        if not spec_sets:
            return load_located(path)
        file = str(path)
        errors = Collector(file)
        text = read_source(path, errors)
        raw, smap = parse_text(text, file, errors) if text is not None else (None, SourceMap(file))
        if raw is None and not errors.diagnostics:
            errors.error("E001", "the file holds no spec", Span(file, 1, 1))
        errors.raise_if_any()
        for o in spec_sets:
            _patch(raw, smap, o, errors, Located)
        spec = validate(raw, smap, errors)
        errors.raise_if_any()
        loaded = Loaded(spec, smap, text, file)
        check(loaded, errors)
        errors.raise_if_any()
        return loaded
    except SpecError as e:
        e.sources[CMDLINE] = cmdline
        raise


def _patch(raw, smap, o: Override, errors: Collector, Located) -> None:
    """Set raw[k1][k2]... = value; the spans of the key and the value point at the command line."""
    keys, value, span = o.key.split("."), parse_value(o.value), o.span
    node, path = raw, ()
    for i, k in enumerate(keys):
        key = int(k) if isinstance(node, list) and k.isdigit() else k
        if isinstance(node, list) and isinstance(key, int) and key >= len(node):
            errors.error("E103", f"`{'.'.join(keys[:i])}` has {len(node)} items; there is no item {key}", o.key_span)
            return
        if not isinstance(node, (dict, list)):
            errors.error("E103", f"`{'.'.join(keys[:i])}` is `{node}`, not a mapping: `{'.'.join(keys)}` cannot be set",
                         o.key_span)
            return
        path += (key,)
        smap.keys[path] = o.key_span
        if i == len(keys) - 1:
            node[key] = Located(value, span) if isinstance(value, str) else value
            smap.values[path] = span
            return
        if isinstance(node, dict) and key not in node:
            errors.error("E102", f"`--set {'.'.join(keys)}`: the spec has no `{'.'.join(keys[:i + 1])}`", o.key_span,
                         did_you_mean(key, node) if node else None)
            return
        if key == "memory" and isinstance(node[key], str):  # `memory: attention` is short for {kind: attention}
            node[key] = {"kind": node[key]}
        node = node[key]


def check_hyper_sets(opt, hyper_sets: list[Override], cmdline: str) -> dict:
    """The optimizer overrides of the command line, checked: names (E208), types and ranges (E502)."""
    from nlc.check_common import hyper_problem
    errors, out = Collector(CMDLINE, cmdline), {}
    for o in hyper_sets:
        key, text, span, value = o.key, o.value, o.span, parse_value(o.value)
        if key not in opt.hyper:
            errors.error("E208", f"`{key}` is not a hyperparameter of the optimizer `{opt.name}`", o.key_span,
                         did_you_mean(key, opt.hyper) or f"`{opt.name}` has: {', '.join(opt.hyper)}")
            continue
        default = opt.hyper[key]
        kind_ok = (isinstance(value, list) == isinstance(default, list)
                   and (isinstance(value, list) or isinstance(value, (int, float)))
                   and (not isinstance(value, list) or all(isinstance(v, (int, float)) for v in value)))
        why = hyper_problem(key, value, default) if kind_ok else (
            f"`{key}` is a list like `{default}`" if isinstance(default, list) else f"`{key}` is a number like `{default}`")
        if why:
            errors.error("E502", f"`--set {key}={text}`: not a valid value", span, why)
            continue
        out[key] = float(value) if isinstance(default, float) and not isinstance(value, bool) else value
    errors.raise_if_any()
    return out

"""From a file to a validated Spec: read, parse (YAML or .nl), expand templates, validate.

Every failure becomes a located diagnostic; nothing in the file is executed.
"""
from __future__ import annotations

import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ValidationError

from nlc import spec as S
from nlc.diagnostics import CODES, Collector, Span, did_you_mean
from nlc.syntax.source import SourceMap

MAX_BYTES = 1 << 20


@dataclass
class Loaded:
    spec: S.Spec | None
    smap: SourceMap
    source: str
    file: str
    warnings: list = field(default_factory=list)   # Diagnostics of severity "warning"


def read_source(path: str | Path, errors: Collector) -> str | None:
    p = Path(path)
    if p.suffix not in (".yaml", ".yml", ".nl"):
        errors.error("E009", f"`{p.name}` is not a spec file", hint="name it `.yaml`, `.yml` or `.nl`")
        return None
    if p.exists() and not p.is_file():   # a folder, a FIFO, a device: reading could block forever
        errors.error("E009", f"`{path}` is not a regular file", hint="pass the path of a spec file")
        return None
    try:
        data = p.read_bytes()
    except OSError as e:
        errors.error("E009", f"cannot read `{path}`: {e.strerror or e}")
        return None
    if len(data) > MAX_BYTES:
        errors.error("E010", f"the file is {len(data)} bytes; a spec is at most {MAX_BYTES}")
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        errors.error("E002", "the file is not UTF-8 text", Span(errors.file, line, col),
                     "a spec is a text file; check that you passed the right path")
        return None
    if "\x00" in text:
        line = text[:text.index("\x00")].count("\n") + 1
        errors.error("E002", "the file contains NUL bytes: it is binary, not a spec", Span(errors.file, line, 1))
        return None
    errors.source = text
    if not text.strip() or all(not ln.strip() or ln.lstrip().startswith("#") for ln in text.splitlines()):
        errors.error("E001", "the file holds no spec", Span(errors.file, 1, 1),
                     "start with `nlc: 1` and `name: ...` (YAML) or `model NAME { ... }` (.nl); see specs/README.md")
        return None
    return text


def parse_text(text: str, file: str, errors: Collector) -> tuple[object, SourceMap]:
    if file.endswith(".nl"):
        from nlc.syntax.nl import parse_nl
        return parse_nl(text, file, errors)
    from nlc.syntax.yaml_loader import load_yaml
    return load_yaml(text, file, errors)


def expand_templates(raw: dict, smap: SourceMap, errors: Collector) -> None:
    """Resolve `templates:` and each level's `use:` (shallow merge; the level's keys win)."""
    templates = raw.pop("templates", None) or {}
    if not isinstance(templates, dict):
        errors.error("E103", "`templates` must be a mapping of name to level settings", smap.get("templates"))
        return
    levels = raw.get("levels")
    if not isinstance(levels, dict):
        return
    for name, level in levels.items():
        if not isinstance(level, dict) or "use" not in level:
            continue
        use = level.pop("use")
        if use not in templates or not isinstance(templates[use], dict):
            errors.error("E205", f"level `{name}` uses template `{use}`, which is not defined",
                         smap.get("levels", name, "use"), did_you_mean(str(use), templates))
            continue
        merged = dict(templates[use])
        merged.update(level)
        levels[name] = merged
        for key in templates[use]:
            if key not in level:
                smap.copy_subtree(("templates", use, key), ("levels", name, key))


def validate(raw: object, smap: SourceMap, errors: Collector) -> S.Spec | None:
    if not isinstance(raw, dict):
        errors.error("E103", "a spec is a mapping of keys (`nlc`, `name`, `model`, `levels`, ...)",
                     smap.get() or Span(smap.file, 1, 1), "see specs/README.md for the shape of a spec")
        return None
    expand_templates(raw, smap, errors)
    cls = S.OptimizerSpec if "groups" in raw and "levels" not in raw else S.ModelSpec
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        seen = set()
        # A union reports one error per member (`0` is neither a positive int nor a name): keep the
        # most telling one per location.
        for err in sorted(e.errors(), key=lambda err: err["type"] not in ("greater_than", "missing", "extra_forbidden")):
            where = tuple(x for x in err["loc"] if not _is_branch(x))
            if where in seen:
                continue
            seen.add(where)
            _report(dict(err, loc=where), cls, smap, errors)
        # a comma inside `{...}` also leaves the value's tail as a key (`4)`): the E007 says it all
        cut = {d.span.line for d in errors.diagnostics if d.code == "E007" and d.hint and "a comma ends" in d.hint}
        errors.diagnostics = [d for d in errors.diagnostics if not (
            d.code == "E102" and d.span.line in cut and not re.fullmatch(r"`[A-Za-z_]\w*`", d.message.split()[-1]))]
        return None


def load_located(path: str | Path) -> Loaded:
    """Read, parse and validate one file, then run the semantic checks. Raises SpecError."""
    from nlc.check import check
    file = str(path)
    errors = Collector(file)
    text = read_source(path, errors)
    spec, smap = None, SourceMap(file)
    if text is not None:
        raw, smap = parse_text(text, file, errors)
        if raw is None and not errors.diagnostics:
            errors.error("E001", "the file holds no spec", Span(file, 1, 1))
        elif raw is not None:
            spec = validate(raw, smap, errors)
    errors.raise_if_any()
    loaded = Loaded(spec, smap, text or "", file)
    check(loaded, errors)
    errors.raise_if_any()
    loaded.warnings = errors.warnings
    return loaded


def not_a_model(path, name: str, command: str) -> str:
    """The message for an optimizer spec given where a model spec belongs (``nlc build``, ``nlc
    train``, ``nlc verify``), with what to do instead."""
    return (f"{path} is the optimizer spec `{name}`; `nlc {command}` takes a model spec "
            f"(name this optimizer in one: `optimizer: {name}(lr=...)`)")


# ---------------------------------------------------------------- pydantic errors -> diagnostics

def _fields_at(cls: type, loc: tuple) -> list[str]:
    """The field names allowed at `loc` (for did-you-mean), following models, dicts and unions."""
    tp: object = cls
    for el in loc:
        nxt = _unwrap(tp, el)
        if nxt is not tp and typing.get_origin(tp) in (typing.Union,) and nxt is not None and el not in getattr(nxt, "model_fields", {}):
            tp = nxt  # the union tag itself (e.g. `mlp`) was this step
            continue
        tp = nxt
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            if el not in tp.model_fields:
                return []
            tp = tp.model_fields[el].annotation
        elif typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]
        elif typing.get_origin(tp) is tuple:
            tp = typing.get_args(tp)[0]
    tp = _unwrap(tp, None)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return list(tp.model_fields)
    # a union pydantic resolved without naming the member: every member's fields are candidates
    members = _members(tp)
    return sorted({f for m in members if isinstance(m, type) and issubclass(m, BaseModel) for f in m.model_fields})


def _members(tp) -> list:
    """A union's members, with Annotated stripped and nested unions flattened (None left out)."""
    out = []
    for a in typing.get_args(tp):
        while typing.get_origin(a) is typing.Annotated:
            a = typing.get_args(a)[0]
        if typing.get_origin(a) is typing.Union or str(typing.get_origin(a)) == "<class 'types.UnionType'>":
            out += _members(a)
        elif a is not type(None):
            out.append(a)
    return out


def _unwrap(tp, tag):
    """Strip Annotated and Optional; pick a union member by its `kind` tag (or its only model)."""
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
        elif origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
            members = _members(tp)
            tagged = {typing.get_args(a.model_fields["kind"].annotation)[0]: a for a in members
                      if isinstance(a, type) and issubclass(a, BaseModel) and "kind" in a.model_fields}
            if tag in tagged:
                return tagged[tag]
            models = [a for a in members if isinstance(a, type) and issubclass(a, BaseModel)]
            if tagged or len(models) != 1:
                return tp if not tagged else None
            tp = models[0]
        else:
            return tp


_BRANCH = re.compile(r"^(constrained-\w+|function-\w+|int|str|float|bool|list\[.*\]|tuple\[.*\]|dict\[.*\]|lax-or-strict|json-or-python)$")


def _is_branch(el) -> bool:
    """A loc element pydantic adds for a union member or a validator, not a key of the data."""
    return isinstance(el, str) and bool(_BRANCH.match(el))


def _report(err: dict, cls: type, smap: SourceMap, errors: Collector) -> None:
    loc, kind, ctx = tuple(err["loc"]), err["type"], err.get("ctx") or {}
    where = ".".join(str(x) for x in loc if not (isinstance(x, str) and x in ("matrix", "mlp", "vector", "attention", "function-before")))
    inp = err.get("input")
    span = smap.find(loc)
    if kind == "missing":
        errors.error("E101", f"missing key `{loc[-1]}`" + (f" in `{'.'.join(map(str, loc[:-1]))}`" if len(loc) > 1 else ""),
                     smap.find(loc[:-1]), f"add `{loc[-1]} ...`; specs/README.md shows the .nl form" if smap.file.endswith(".nl")
                     else f"add `{loc[-1]}: ...`; see `nlc schema` for what it takes")
    elif kind == "extra_forbidden":
        allowed = _fields_at(cls, loc[:-1])
        errors.error("E102", f"unknown key `{loc[-1]}`", smap.find(loc, key=True),
                     did_you_mean(str(loc[-1]), allowed))
    elif kind == "expr_syntax":
        base = getattr(inp, "span", None) or span
        hint = "expressions look like `l2norm(conv(proj(x), 4))` or `0.1 * softplus(M_eta(x))`"
        lines = (errors.source or "").splitlines()
        if base and "ends too early" in str(ctx.get("msg")) and 0 < base.line <= len(lines) \
                and "{" in lines[base.line - 1][:base.col]:
            hint = (f"inside `{{...}}` a comma ends the value: quote it (`{loc[-1]}: \"{inp}, ...\"`) "
                    "or write the mapping in block style, one key per line")
        errors.error("E007", f"in `{where}`: {ctx.get('msg')}",
                     base.shifted(ctx.get("line", 1), ctx.get("col", 1), None, None) if base else span, hint)
    elif kind in ("greater_than", "greater_than_equal") and ctx.get("gt", ctx.get("ge")) in (0, 0.0):
        if "every" in loc:   # `every: 0 tokens`: name the key the user wrote, not the parsed field
            where = ".".join(str(x) for x in loc[:loc.index("every") + 1] if not _is_branch(x)
                             and x not in ("matrix", "mlp", "vector", "attention"))
        errors.error("E104", f"`{where}` must be positive, not `{inp}`", span,
                     "a level that never updates is `every: never` (frequency 0)" if "every" in loc
                     else "sizes, counts and periods are at least 1")
    elif kind == "literal_error" and loc[-1] == "nlc":
        errors.error("E105", f"unsupported language version `{inp}`", span, "this nlc reads `nlc: 1`")
    elif kind == "literal_error":
        expected = [s.strip().strip("'") for s in str(ctx.get("expected", "")).replace(" or ", ",").split(",")]
        errors.error("E103", f"`{where}` cannot be `{inp}`", span, did_you_mean(str(inp), [e for e in expected if e]))
    elif kind == "union_tag_invalid":
        tags = [s.strip().strip("'") for s in str(ctx.get("expected_tags", "")).split(",")]
        errors.error("E103", f"unknown memory kind `{ctx.get('tag')}` in `{where}`", span, did_you_mean(str(ctx.get("tag")), tags))
    elif kind in ("every_unit",):
        errors.error("E103", f"`{where}`: {err['msg']}", span, ctx.get("hint"))
    elif kind == "too_short":
        errors.error("E103", f"`{where}` must not be empty", span)
    else:
        msg = err["msg"]
        errors.error("E103", f"`{where}`: {msg[0].lower() + msg[1:]}" if where else msg, span)


assert all(code in CODES for code in ("E101", "E102", "E103", "E104", "E105", "E007"))


SPECS_DIR = Path(__file__).resolve().parent.parent / "specs"


def find_spec(use: str, base_dir: Path) -> Path | None:
    """A spec named by `use`: a path (relative to the referring file), or a shipped spec's name."""
    for d in (base_dir, SPECS_DIR):
        for cand in (d / use, d / f"{use}.yaml", d / f"{use}.nl"):
            if cand.is_file():
                return cand
    return None


def shipped_names(kind: str | None = None) -> list[str]:
    names = sorted({p.stem for p in SPECS_DIR.glob("*.yaml")})
    if kind == "optimizer":
        names = [n for n in names if "groups:" in (SPECS_DIR / f"{n}.yaml").read_text()]
    return names

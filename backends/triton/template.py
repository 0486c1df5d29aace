"""Kernel templates: a skeleton with holes, filled for one level, cached and loaded.

A skeleton (``skeletons/*.py``) is a real Triton module once its includes are in: it runs with
every hole turned on.
Its holes are boolean flags (``DECAY``, ``ERASE``): module-level ``tl.constexpr`` constants, and
``if FLAG:`` / ``else:`` blocks on expressions of them; and code holes, a comment line ``# {NAME}``
replaced by generated statements (the flow prologue's chain of functions); and includes, a line
``# {include NAME}`` replaced by the functions of ``skeletons/parts/NAME.py`` (shared by several
skeletons). ``render`` resolves those blocks for one
level's flags, drops the flag constants and puts a header on top, so the generated source holds
only the terms the level has: what you read is what runs. Triton would fold the same constants
itself; resolving them in the source is for the reader, and it makes each variant its own file.

``load`` writes the rendered body to the cache (``$NLC_CACHE_DIR`` or ``~/.cache/nlc``), named by
the SHA-256 of its text, and imports it; the same flags give the same bytes and the same module.
A module loaded for CPU tensors is decorated under ``TRITON_INTERPRET=1`` (Triton's interpreter
is chosen when ``@triton.jit`` runs), one for CUDA tensors without it.
"""
from __future__ import annotations

import ast
import hashlib
import importlib.util
import os
import re
from pathlib import Path

__all__ = ["SKELETONS", "render", "body", "load", "cache_dir"]

SKELETONS = Path(__file__).parent / "skeletons"
_IF = re.compile(r"^(\s*)if (.+):\s*(#.*)?$")
_ELSE = re.compile(r"^(\s*)else:\s*(#.*)?$")
_FLAG = re.compile(r"^([A-Z][A-Z0-9_]*): tl\.constexpr = (True|False)\s*$")
_INCLUDE = re.compile(r"^(\s*)# \{include (\w+)\}\s*$")
_loaded: dict = {}


def flags_of(skeleton: str) -> tuple[str, ...]:
    """The hole names a skeleton declares (its ``NAME: tl.constexpr = True`` lines)."""
    text = (SKELETONS / f"{skeleton}.py").read_text()
    return tuple(m.group(1) for m in map(_FLAG.match, text.splitlines()) if m)


def body(skeleton: str, flags: dict, code: dict | None = None) -> str:
    """The skeleton's source with its holes resolved for ``flags`` (every flag must be given) and
    its code holes (a line ``# {NAME}``) replaced by ``code[NAME]``, a list of lines."""
    names = flags_of(skeleton)
    if set(flags) != set(names):
        raise ValueError(f"skeleton {skeleton!r} takes flags {sorted(names)}, got {sorted(flags)}")
    lines = _included((SKELETONS / f"{skeleton}.py").read_text().splitlines())
    lines = [ln for ln in lines if not _FLAG.match(ln)]
    for name, fill in (code or {}).items():
        at = [i for i, ln in enumerate(lines) if ln.strip() == f"# {{{name}}}"]
        if len(at) != 1:
            raise ValueError(f"skeleton {skeleton!r} has no code hole `# {{{name}}}`")
        pad = lines[at[0]][:_indent(lines[at[0]])]
        lines[at[0]:at[0] + 1] = [pad + ln for ln in fill]
    out = _resolve(lines, {k: bool(v) for k, v in flags.items()})
    text = "\n".join(out).rstrip() + "\n"
    ast.parse(text)  # a skeleton edit that breaks a variant fails here, not in Triton
    return text


def _included(lines: list[str]) -> list[str]:
    """Each line ``# {include NAME}`` replaced by the part ``skeletons/parts/NAME.py`` after its
    imports, at the line's indentation: what several skeletons share is written once, and every
    generated file is still one module."""
    out = []
    for ln in lines:
        m = _INCLUDE.match(ln)
        if not m:
            out.append(ln)
            continue
        part = (SKELETONS / "parts" / f"{m.group(2)}.py").read_text().splitlines()
        start = max(i for i, p in enumerate(part) if p.startswith(("import ", "from "))) + 1
        while start < len(part) and not part[start].strip():
            start += 1
        out += [m.group(1) + p if p.strip() else "" for p in part[start:]]
    return out


def render(skeleton: str, flags: dict, header: str, code: dict | None = None) -> str:
    """``header`` (comment lines) on top of :func:`body`."""
    head = "".join(f"# {ln}".rstrip() + "\n" for ln in header.splitlines())
    return head + body(skeleton, flags, code)


def cache_dir() -> Path:
    return Path(os.environ.get("NLC_CACHE_DIR") or Path.home() / ".cache" / "nlc") / "triton"


def load(skeleton: str, flags: dict, interpret: bool, code: dict | None = None):
    """The kernel module of ``skeleton`` with ``flags`` and ``code`` filled in (cached on disk and
    in memory)."""
    from nlc.fileio import atomic_write
    call = (skeleton, tuple(sorted(flags.items())), tuple((k, tuple(v)) for k, v in sorted((code or {}).items())),
            interpret)
    if call in _loaded:     # the launch path: no rendering, hashing or file access per call
        return _loaded[call]
    text = body(skeleton, flags, code)
    sha = hashlib.sha256(text.encode()).hexdigest()[:16]
    key = (sha, interpret)
    if key in _loaded:
        _loaded[call] = _loaded[key]
        return _loaded[key]
    path = cache_dir() / f"{skeleton}_{sha}.py"
    if not path.exists() or path.read_text() != text:
        atomic_write(path, text)
    name = f"nlc_triton_{skeleton}_{sha}" + ("_interp" if interpret else "")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    try:
        spec.loader.exec_module(module)
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved
    module.SHA = sha
    _loaded[key] = _loaded[call] = module
    return module


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _block(lines, i, ind):
    """Lines after ``lines[i]`` indented deeper than ``ind`` (blank lines inside included)."""
    j = i + 1
    while j < len(lines) and (not lines[j].strip() or _indent(lines[j]) > ind):
        j += 1
    while j > i + 1 and not lines[j - 1].strip():   # trailing blank lines stay outside
        j -= 1
    return lines[i + 1:j], j


def _resolve(lines, flags):
    out, i = [], 0
    while i < len(lines):
        m = _IF.match(lines[i])
        cond = m and _flag_expr(m.group(2), flags)
        if cond is None or not m:
            out.append(lines[i])
            i += 1
            continue
        ind = len(m.group(1))
        then, j = _block(lines, i, ind)
        other = []
        if j < len(lines) and _ELSE.match(lines[j]) and _indent(lines[j]) == ind:
            other, j = _block(lines, j, ind)
        keep = then if cond else other
        if keep:
            shift = _indent(next(ln for ln in keep if ln.strip())) - ind
            out += _resolve([ln[shift:] if ln.strip() else "" for ln in keep], flags)
        i = j
    return out


def _flag_expr(expr: str, flags):
    """The value of ``expr`` if it is a boolean expression of flag names only, else None."""
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError:
        return None
    ok = (ast.Expression, ast.BoolOp, ast.UnaryOp, ast.And, ast.Or, ast.Not, ast.Name, ast.Load)
    if not all(isinstance(n, ok) for n in ast.walk(tree)):
        return None
    if not all(n.id in flags for n in ast.walk(tree) if isinstance(n, ast.Name)):
        return None
    return bool(eval(compile(tree, "<flags>", "eval"), {"__builtins__": {}}, dict(flags)))

"""Every error code: a spec that triggers it, and the diagnostic's code, position and message."""
from __future__ import annotations

import re
import textwrap

import pytest

from nlc.diagnostics import CODES, SpecError
from nlc.loader import load_located

BASE = textwrap.dedent("""\
    nlc: 1
    name: tiny
    model: {vocab: 64, d_model: 32, layers: 2, heads: 2, block: [memory, mlp, cms]}
    signals:
      eta: 0.1 * gate(x)
      beta: gate(x)
    levels:
      memory:
        memory: {kind: mlp, depth: 2, expansion: 2}
        key: l2norm(conv(proj(x), 4))
        value: conv(proj(x), 4)
        query: l2norm(proj(x))
        objective: l2
        rule: grad |> scale(eta) |> momentum(beta)
        every: 1 token
        chunk: 16
      mlp:
        memory: {kind: mlp, expansion: 4, residual: false}
        every: never
      cms:
        memory: {kind: mlp, residual: false}
        objective: task
        rule: grad |> scale(0.01)
        every: 64, 512 tokens
    optimizer: adamw(lr=4e-4)
""")

OPT = textwrap.dedent("""\
    nlc: 1
    name: opt
    hyper: {lr: 0.01, beta1: 0.9, slow_every: 4}
    groups:
      - params: all
        levels:
          m: {input: grad, rule: ema(beta1)}
          s: {input: grad, rule: accumulate, every: slow_every steps}
        update: -lr * (m + prev(s))
""")


def diagnose(tmp_path, text: str | bytes, name: str = "spec.yaml") -> SpecError:
    p = tmp_path / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(SpecError) as info:
        load_located(p)
    return info.value


def one(err: SpecError, code: str, line: int | None = None, col: int | None = None, message: str = "",
        hint: str | None = None):
    """The error list holds a diagnostic `code` at line:col whose message matches `message`."""
    found = [d for d in err.diagnostics if d.code == code and re.search(message, d.message)]
    assert found, f"no {code} matching {message!r} in:\n{err}"
    d = found[0]
    if line is not None:
        assert d.span.line == line, f"{code} at line {d.span.line}, expected {line}:\n{err}"
    if col is not None:
        assert d.span.col == col, f"{code} at col {d.span.col}, expected {col}:\n{err}"
    assert re.search(message, d.message), f"{d.message!r} does not match {message!r}"
    if hint is not None:
        assert d.hint and re.search(hint, d.hint), f"hint {d.hint!r} does not match {hint!r}"
    return d


def edit(old: str, new: str, text: str = BASE) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


def test_base_specs_are_valid(tmp_path):
    for name, text in (("model.yaml", BASE), ("opt.yaml", OPT)):
        p = tmp_path / name
        p.write_text(text)
        assert load_located(p).spec is not None


CASES = {
    "E001": (lambda: "# only a comment\n\n", 1, 1, "holds no spec"),
    "E003": (lambda: "nlc: 1\nname: [unclosed\n", 3, 1, "YAML does not parse"),
    "E004": (lambda: "a: &x [1, 2]\nb: *x\n", 2, 4, r"alias `\*x`"),
    "E005": (lambda: "nlc: !!python/object/apply:os.system ['echo hi']\n", 1, 6, r"tag .*python/object"),
    "E007": (lambda: edit("key: l2norm(conv(proj(x), 4))", "key: l2norm(conv(proj(x), 4)"), 10, 33, "ends too early"),
    "E008": (lambda: edit("    chunk: 16\n", "    chunk: 16\n    chunk: 32\n"), 17, 5, "`chunk` is given twice"),
    "E101": (lambda: edit("model: {vocab: 64, d_model: 32, layers: 2, heads: 2, block: [memory, mlp, cms]}\n", ""), 1, 1, "missing key `model`"),
    "E102": (lambda: edit("chunk: 16", "chunks: 16"), 16, 5, "unknown key `chunks`"),
    "E103": (lambda: edit("vocab: 64", "vocab: lots"), 3, 16, "model.vocab"),
    "E104": (lambda: edit("chunk: 16", "chunk: 0"), 16, 12, "must be positive"),
    "E105": (lambda: edit("nlc: 1", "nlc: 7"), 1, 6, "version `7`"),
    "E201": (lambda: edit("value: conv(proj(x), 4)", "value: conv(proj(y), 4)"), 11, 22, "`y` is not defined"),
    "E202": (lambda: edit("value: conv(proj(x), 4)", "value: convolve(proj(x), 4)"), 11, 12, "unknown function `convolve`"),
    "E203": (lambda: edit("momentum(beta)", "momentun(beta)"), 14, 33, "unknown rule primitive `momentun`"),
    "E204": (lambda: edit("value: conv(proj(x), 4)", "value: memroy(x)"), 11, 12, "level `memroy`"),
    "E205": (lambda: edit("  mlp:\n    memory: {kind: mlp, expansion: 4, residual: false}\n    every: never\n",
                          "  mlp: {use: static}\n"), 17, 14, "template `static`"),
    "E206": (lambda: edit("  beta: gate(x)", "  mlp: gate(x)"), 6, 3, "signal `mlp` has the name of a level"),
    "E207": (lambda: edit("adamw(lr=4e-4)", "adamx(lr=4e-4)"), 25, 12, "optimizer spec `adamx` not found"),
    "E208": (lambda: edit("adamw(lr=4e-4)", "adamw(lr=4e-4, weigth_decay=0.1)"), 25, 40, "no hyperparameter `weigth_decay`"),
    "E301": (lambda: edit("query: l2norm(proj(x))", "query: eta"), 12, 12, "query must be a vector per head"),
    "E302": (lambda: edit("key: l2norm(conv(proj(x), 4))", "key: l2norm(conv(proj(x)))"), 10, 17, "`conv` takes 2 arguments"),
    "E303": (lambda: edit("memory: {kind: mlp, depth: 2, expansion: 2}", "memory: matrix").replace(
        "objective: l2", "objective: task", 1), None, None, "matrix memory cannot take the `task` objective"),
    "E304": (lambda: edit("  beta: gate(x)", "  beta: gate(M(x))"), 6, 14, "only defined inside a level"),
    "E305": (lambda: edit("    chunk: 16\n", "    chunk: 16\n    out: scalar\n"), 17, 10, "residual memory"),
    "E306": (lambda: edit("rule: grad |> scale(eta)", "rule: grad |> grad |> scale(eta)"), 14, 11, "exactly once"),
    "E401": (lambda: edit("  beta: gate(x)", "  beta: gate(x) * gamma\n  gamma: 2 * beta"), 6, 3, "cycle: beta -> gamma -> beta"),
    "E402": (lambda: edit("every: 1 token", "every: 1 step"), 15, 12, "ticks on the optimizer's clock"),
    "E403": (lambda: edit("chunk: 16", "chunk: 48"), 16, 12, "chunk 48 does not divide the fastest CMS period 64"),
    "E501": (lambda: edit("momentum(beta)", "momentum(1.5)"), 14, 33, "`momentum` with beta = 1.5 diverges"),
}


@pytest.mark.parametrize("code", sorted(CASES))
def test_error_code(tmp_path, code):
    make, line, col, message = CASES[code]
    err = diagnose(tmp_path, make())
    one(err, code, line, col, message)


def test_E002_binary(tmp_path):
    err = diagnose(tmp_path, b"nlc: 1\n\x89PNG\x00\xff\xfe garbage")
    one(err, "E002", 2, None, "not UTF-8|NUL")


def test_E006_nl_syntax(tmp_path):
    err = diagnose(tmp_path, "model tiny { vocab 64 d_model 32 layers 2 heads 2 block mlp\n", "spec.nl")
    one(err, "E006")


def test_E009_unknown_format(tmp_path):
    err = diagnose(tmp_path, "nlc: 1\n", "spec.txt")
    one(err, "E009", message="not a spec file", hint=r"\.yaml")


def test_E010_too_large(tmp_path):
    err = diagnose(tmp_path, "# pad\n" * 300_000)
    one(err, "E010", message="at most")


def test_optimizer_errors(tmp_path):
    err = diagnose(tmp_path, OPT.replace("lr: 0.01", "lr: -0.01").replace("beta1: 0.9", "beta1: 1.0")
                   .replace("slow_every steps", "slow_every tokens"))
    one(err, "E502", 3, None, "`lr` = -0.01 is out of range", "positive")
    one(err, "E502", 3, None, "`beta1` = 1.0 is out of range")
    one(err, "E402", 8, None, "ticks in `tokens`")
    err = diagnose(tmp_path, OPT.replace("slow_every: 4", "slow_every: 0"))
    one(err, "E502", 3, None, "slow_every")
    err = diagnose(tmp_path, OPT.replace("prev(s)", "prev(q)").replace("ema(beta1)", "ema(beta1) |> grad"))
    one(err, "E204", 9, None, "`prev` reads a level")
    one(err, "E203", 7, None, "`grad` needs a model level")


def test_every_code_is_tested_and_documented():
    tested = set(CASES) | {"E002", "E006", "E009", "E010", "E502", "E601"}   # E601: tests/test_language.py
    assert tested == set(CODES), f"untested: {sorted(set(CODES) - tested)}"
    from pathlib import Path
    readme = (Path(__file__).parent.parent / "specs" / "README.md").read_text()
    for code, (name, _) in CODES.items():
        assert code in readme and name in readme, f"{code} {name} missing from specs/README.md"


def test_all_errors_reported_together(tmp_path):
    text = edit("momentum(beta)", "momentun(beta)", edit("query: l2norm(proj(x))", "query: eta"))
    err = diagnose(tmp_path, text)
    assert {"E203", "E301"} <= set(err.codes)


def test_rendering_shows_line_caret_and_hint(tmp_path):
    err = diagnose(tmp_path, edit("value: conv(proj(x), 4)", "value: memroy(x)"))
    text = str(err)
    assert "spec.yaml:11:12: error[E204 unknown-level]: flow reads level `memroy`, which is not defined" in text
    assert "   11 |     value: memroy(x)" in text
    assert "      |            ^^^^^^^^^" in text
    assert "hint: did you mean `memory`?" in text


def test_unknown_key_in_an_inline_optimizer_gets_a_hint(tmp_path):
    text = BASE.replace("optimizer: adamw(lr=4e-4)\n", "optimizer:\n  hyper: {lr: 0.1}\n  grups: []\n")
    err = diagnose(tmp_path, text)
    one(err, "E102", 27, 3, "unknown key `grups`", "did you mean `groups`")


def test_output_gates_reads_and_generators_are_checked(tmp_path):
    """The level options that decide what a model computes are refused where they cannot mean
    anything: a gate on a level without an output, `read` on a matrix memory, `read: current` on
    a generator with a chunk, and a generator fed one head's slice of the raw input."""
    err = diagnose(tmp_path, edit("    every: never\n", "    every: never\n    gate: sigmoid(proj(x))\n"))
    one(err, "E305", 20, 11, "no `query`, so no output to gate")
    err = diagnose(tmp_path, edit("    chunk: 16\n", "    chunk: 16\n    gate: eta + x\n"))
    one(err, "E301", 17, 11, "`\\+` of a scalar per head and a vector per head")
    err = diagnose(tmp_path, edit("{kind: mlp, depth: 2, expansion: 2}", "matrix").replace("chunk: 16\n", "chunk: 16\n    read: current\n"))
    one(err, "E305", 17, 11, "`read` chooses what an MLP memory's tokens read", "remove `read`")
    gen = edit("  eta: 0.1 * gate(x)\n", "  eta: 0.1 * softplus(memory(x))\n")
    one(diagnose(tmp_path, gen), "E301", 5, 30, "generator `memory` would read one head's slice of `x`",
        r"`memory\(proj\(x\)\)`.*`heads: 1`")
    gen = edit("  eta: 0.1 * gate(x)\n", "  eta: 0.1 * softplus(memory(proj(x)))\n").replace("chunk: 16\n", "chunk: 16\n    read: current\n")
    one(diagnose(tmp_path, gen), "E403", 17, 11, "generator `memory` with `read: current`", "chunk: 1")


def test_the_default_chunk_is_scheduled_too(tmp_path):
    """A deep memory without `chunk` runs in chunks of 64: a fastest CMS period of 32 cannot hold
    them (each window would re-anchor the memory), so it is refused where the level is named."""
    err = diagnose(tmp_path, edit("    chunk: 16\n", "").replace("every: 64, 512 tokens", "every: 32, 512 tokens"))
    one(err, "E403", 8, 3, r"`memory`'s chunk 64 \(the default\) does not divide the fastest CMS period 32")


def test_an_optimizer_reference_back_into_the_file_is_a_cycle(tmp_path):
    """E401: a spec whose optimizer names the file itself (a local file shadows the shipped name);
    the chain of files being checked is per check (a context variable), so a later check of
    another file is not affected."""
    from pathlib import Path

    import nlc
    root = Path(__file__).parent.parent
    text = (root / "specs" / "titans.yaml").read_text().replace("optimizer: adamw(lr=4e-4, weight_decay=0.1)", "optimizer: {use: loop.yaml}")
    (tmp_path / "loop.yaml").write_text(text)
    with pytest.raises(SpecError) as e:
        nlc.load(tmp_path / "loop.yaml")
    assert "E401" in e.value.render() and "this file itself" in e.value.render()
    nlc.load(root / "specs" / "titans.yaml")      # the chain was reset

"""The .nl DSL: twins equal their YAML spelling, syntax errors are located E006, duplicates E008,
validation errors point into the .nl text, and no input text raises."""
from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

from nlc import spec as S
from nlc.diagnostics import Collector
from nlc.loader import load_located, parse_text, read_source, validate
from nlc.syntax.nl import parse_nl

SPECS = Path(__file__).resolve().parent.parent / "specs"
TWINS = sorted(p.stem for p in SPECS.glob("*.yaml") if p.with_suffix(".nl").exists())

HEAD = "model m { vocab 16  d_model 8  layers 1  heads 2  block a }\n"


def _read(path: Path):
    errors = Collector(str(path))
    text = read_source(path, errors)
    assert text is not None, errors.diagnostics
    raw, smap = parse_text(text, str(path), errors)
    spec = validate(raw, smap, errors) if raw is not None else None
    return spec, errors.diagnostics


def nl(text: str):
    """Parse and validate .nl text: (spec or None, diagnostics)."""
    errors = Collector("t.nl", text)
    raw, smap = parse_nl(text, "t.nl", errors)
    spec = validate(raw, smap, errors) if raw is not None and not errors.diagnostics else None
    return spec, errors.diagnostics


def one(text: str, code: str):
    _, diags = nl(text)
    assert [d.code for d in diags] == [code], [d.render(text) for d in diags]
    return diags[0]


# ---------------------------------------------------------------- twins

def test_there_are_twins():
    assert {"titans", "hope", "m3", "adamw"} <= set(TWINS)


@pytest.mark.parametrize("name", TWINS)
def test_twin_equals_yaml(name):
    a, da = _read(SPECS / f"{name}.yaml")
    b, db = _read(SPECS / f"{name}.nl")
    assert not da and not db, [d.render() for d in da + db]
    assert a is not None and a == b


@pytest.mark.parametrize("name", TWINS)
def test_twin_passes_checks(name):
    assert load_located(SPECS / f"{name}.nl").spec is not None


def test_expressions_carry_nl_positions():
    spec, _ = _read(SPECS / "titans.nl")
    eta = spec.signals["eta"]
    text = (SPECS / "titans.nl").read_text().splitlines()
    assert text[eta.span.line - 1][eta.span.col - 1:eta.span.end_col - 1] == "0.015 * gate(x)"
    step = spec.levels["memory"].rule[1]
    assert text[step.span.line - 1][step.span.col - 1:step.span.end_col - 1] == "scale(eta)"


@pytest.mark.parametrize("nl_every, yaml_every", [
    ("1 token", "1 token"), ("64, 512, 4096 tokens", "64, 512, 4096 tokens"),
    ("[64, 512] tokens", "[64, 512] tokens"), ("never", "never"), ("16 steps", "16 steps"),
])
def test_every_matches_yaml_form(nl_every, yaml_every):
    spec, diags = nl(HEAD + f"level a: matrix every {nl_every}\n")
    assert not diags, [d.render() for d in diags]
    assert spec.levels["a"].every == S.Every.model_validate(S._parse_every(yaml_every))


def test_memory_forms():
    spec, diags = nl(HEAD + "level a: mlp(depth=3, residual) every 1 token\n")
    assert not diags
    assert spec.levels["a"].memory == S.MLPMemory(kind="mlp", depth=3, residual=True)
    spec, _ = nl(HEAD.replace("block a", "block a, b") + "level a: matrix\nlevel b: attention(window=64)\n")
    assert spec.levels["a"].memory == S.MatrixMemory(kind="matrix")
    assert spec.levels["b"].memory == S.AttentionMemory(kind="attention", window=64)


def test_template_with_memory_override():
    spec, diags = nl(HEAD + "template t: mlp(depth=2, residual=true) chunk 16\n"
                     "level a: t(residual=false) out scalar\n")
    assert not diags, [d.render() for d in diags]
    a = spec.levels["a"]
    assert a.memory == S.MLPMemory(kind="mlp", depth=2, residual=False) and a.chunk == 16 and a.out == "scalar"


def test_optimizer_path_reference():
    spec, diags = nl(HEAD + 'level a: matrix\noptimizer "opt/adamw.nl"(lr=0.1)\n')
    assert not diags
    assert spec.optimizer.use == "opt/adamw.nl" and str(spec.optimizer.hyper["lr"]) == "0.1"


# ---------------------------------------------------------------- syntax errors: E006 at the token

SYNTAX = [
    # (text, line, col, message pattern, hint pattern)
    (HEAD + "level a: matrix every 1 token {\n  key = proj(x)\n", 2, 31, r"`\{` is never closed", r"before the `\}`"),
    (HEAD + "level a: matrix {\n  key = proj(x)\nlevel b: mlp\n", 4, 1, r"a `\}` is missing before `level`", r"line 2"),
    (HEAD + "signal eta 0.1 * gate(x)\n", 2, 12, r"missing `=` before `0.1`", r"signal eta = EXPR"),
    (HEAD + "level a: matrix {\n  key proj(x)\n}\n", 3, 7, r"missing `=`", r"key = EXPR"),
    ("levle a: matrix\n", 1, 1, r"unknown keyword `levle`", r"did you mean `level`"),
    (HEAD + "level a: matrix evry 1 token\n", 2, 17, r"unknown keyword `evry`", r"did you mean `every`"),
    (HEAD + "level a: matrix {\n  minimise l2\n}\n", 3, 3, r"unknown keyword `minimise`", r"`minimize`"),
    (HEAD + "level a: matrix {\n  key = proj(x) vlaue = x\n}\n", 3, 17, r"unknown keyword `vlaue`", r"`value`"),
    (HEAD + "signal s = x +\nlevel a: matrix\n", 3, 1, r"`level` is read as part of the expression", r"operand"),
    (HEAD + "level a: matrix every 1 chunk 64\n", 2, 25, r"needs a clock unit", None),
    (HEAD + "level a: matrix every 1 tokns\n", 2, 25, r"needs a clock unit", r"`tokens`"),
    (HEAD + "level a: matrix { by grad | scale(2) }\n", 2, 27, r"unexpected character `\|`", r"`\|>`"),
    (HEAD + "level a = grad\n", 2, 9, r"unexpected `=`", r"level NAME: MEMORY"),
    ('optimizer "adamw.nl(lr=1)\n', 1, 11, r"unterminated string", None),
    ("model m { vocab: 16 }\n", 1, 16, r"unexpected `:`", r"vocab 256"),
    (HEAD + "optimizer adamw(0.1)\n", 2, 17, r"unexpected `0.1`", r"named"),
    (HEAD + "signal s = f(x))\n", 2, 16, r"unexpected `\)`", None),
    (HEAD + "level a: mlp(depth=2, ", 2, 13, r"`\(` is never closed", None),
    (HEAD + "signal s = " + "(" * 150 + "x" + ")" * 150, 2, 112, r"nest more than", None),
    (HEAD + "signal s = " + "+".join(["x"] * 500), 2, 12, r"nests more than", None),
]


@pytest.mark.parametrize("text, line, col, message, hint", SYNTAX)
def test_syntax_error_located(text, line, col, message, hint):
    errors = Collector("t.nl", text)
    raw, _ = parse_nl(text, "t.nl", errors)
    assert raw is None
    assert [d.code for d in errors.diagnostics] == ["E006"], [d.render(text) for d in errors.diagnostics]
    d = errors.diagnostics[0]
    assert (d.span.line, d.span.col) == (line, col), d.render(text)
    assert re.search(message, d.message), d.message
    if hint:
        assert d.hint and re.search(hint, d.hint), d.hint


def test_optimizer_spec_rejects_model_statements():
    d = one("optimizer o {\n  params all { level m = grad |> ema(0.9)  update m }\n}\nsignal s = x\n", "E006")
    assert (d.span.line, d.span.col) == (4, 1)


def test_file_without_header():
    d = one("level a: matrix\n", "E101")
    assert "model NAME" in d.message


# ---------------------------------------------------------------- duplicates: E008

@pytest.mark.parametrize("text, line, col", [
    (HEAD + "level a: matrix\nlevel a: mlp\n", 3, 7),
    (HEAD + "level a, a: matrix\n", 2, 10),
    (HEAD + "signal s = x\nsignal s = proj(x)\nlevel a: matrix\n", 3, 8),
    (HEAD + "level a: matrix chunk 4 chunk 8\n", 2, 25),
    (HEAD + "level a: mlp(depth=2, depth=3)\n", 2, 23),
    (HEAD + "level a: matrix { key = x  key = x }\n", 2, 28),
    ("model m { vocab 16  vocab 32  d_model 8  layers 1  heads 2  block a }\nlevel a: matrix\n", 1, 21),
    (HEAD + "level a: matrix\noptimizer adamw(lr=1, lr=2)\n", 3, 23),
    (HEAD + "level a: matrix\noptimizer adamw\noptimizer adamw\n", 4, 1),
    (HEAD + "template t: matrix\ntemplate t: mlp\nlevel a: t\n", 3, 10),
    ("optimizer o { hyper lr=1, lr=2  params all { level m = grad |> ema(0.9)  update m } }\n", 1, 27),
    ("optimizer o { params all { level m = grad |> ema(0.9)  level m = grad |> ema(0.5)  update m } }\n", 1, 62),
])
def test_duplicates(text, line, col):
    errors = Collector("t.nl", text)
    parse_nl(text, "t.nl", errors)
    assert [d.code for d in errors.diagnostics] == ["E008"], [d.render(text) for d in errors.diagnostics]
    assert (errors.diagnostics[0].span.line, errors.diagnostics[0].span.col) == (line, col)


# ---------------------------------------------------------------- validation errors point into the .nl text

@pytest.mark.parametrize("text, code, line, col, pattern", [
    ("model m { vocab 16  d_model 8  layers 0  heads 2  block a }\nlevel a: matrix\n", "E104", 1, 39, r"layers"),
    (HEAD + "level a: mlp(depht=2)\n", "E102", 2, 14, r"unknown key `depht`"),
    (HEAD + "level a: mlp(depth=2) init mata\n", "E103", 2, 28, r"mata"),
    (HEAD + "level a: mlpp(depth=2)\n", "E103", 2, 10, r"unknown memory kind `mlpp`"),
    (HEAD + "level a: matrix every 1 token chunk 0\n", "E104", 2, 37, r"chunk"),
    (HEAD + "level a: matrix\n  every 0 tokens\n", "E104", 3, 9, r"`levels.a.every` must be positive"),
    (HEAD + "level a: matrix { minimize l2(x) }\n", "E103", 2, 28, r"two arguments"),
    (HEAD + "template t: mlp(depht=2)\nlevel a: t\n", "E102", 2, 17, r"depht"),
    (HEAD + "template selfmod: matrix\nlevel a: selfmd\n", "E205", 3, 10, r"template `selfmd`"),
])
def test_validation_error_located(text, code, line, col, pattern):
    _, diags = nl(text)
    assert diags and diags[0].code == code, [d.render(text) for d in diags]
    assert (diags[0].span.line, diags[0].span.col) == (line, col), diags[0].render(text)
    assert re.search(pattern, diags[0].message)


def test_unknown_template_hint():
    _, diags = nl(HEAD + "template selfmod: matrix\nlevel a: selfmd\n")
    assert diags[0].hint == "did you mean `selfmod`?"


def test_check_errors_point_into_nl(tmp_path):
    from nlc.diagnostics import SpecError
    p = tmp_path / "bad.nl"
    p.write_text(HEAD + "level a: matrix {\n  key = proj(x)  value = proj(x)  query = proj(x)\n"
                 "  minimize l2 by grad |> scael(0.1)\n}\n")
    with pytest.raises(SpecError) as e:
        load_located(p)
    d = e.value.diagnostics[0]
    assert (d.code, d.span.line, d.span.col) == ("E203", 4, 26)


# ---------------------------------------------------------------- never a traceback

def _no_raise(text: str):
    errors = Collector("t.nl", text)
    raw, smap = parse_nl(text, "t.nl", errors)
    if raw is not None and not errors.diagnostics:
        validate(raw, smap, errors)
    for d in errors.diagnostics:
        assert d.span is not None and d.span.line >= 1 and d.span.col >= 1
        d.render(text)
    return raw, errors.diagnostics


@pytest.mark.parametrize("text", [
    "", "   \n\n", "# only a comment\n", "}", "{", "model", "model m {", "level", "level a:", "optimizer",
    "optimizer o {", '"', "\x00\x01\x02", "\ufeffmodel m {}", "é ü ∑ 日本", "\t\r\n\v\f",
    "(" * 5000, "[" * 5000 + "]" * 5000, "-" * 5000, "x" * 100000, "signal s = " + "-" * 3000 + "x",
    "signal s = 1" + "0" * 5000, "model m { vocab 1" + "0" * 5000 + " }",
])
def test_junk_never_raises(text):
    _no_raise(text)


def test_random_bytes_never_raise():
    rng = random.Random(0)
    for _ in range(200):
        text = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 80))).decode("latin-1")
        _no_raise(text)


@pytest.mark.parametrize("name", TWINS)
def test_truncated_and_mutated_twins_never_raise(name):
    text = (SPECS / f"{name}.nl").read_text()
    rng = random.Random(name)
    for cut in range(0, len(text), max(1, len(text) // 40)):
        _no_raise(text[:cut])
    pieces = ["{", "}", "(", ")", "[", "]", ",", "=", ":", "|>", "level", "every", "-", "\n", "#", '"', "x"]
    for _ in range(60):
        i, j = sorted(rng.randrange(len(text) + 1) for _ in range(2))
        j = min(j, i + rng.randrange(6))
        _no_raise(text[:i] + rng.choice(pieces + [""]) + text[j:])


# ---------------------------------------------------------------- a model's optimizer written inline

INLINE = Path(__file__).resolve().parent / "specs" / "inline_optimizer"


def test_inline_optimizer_twins_are_one_spec():
    a, da = _read(INLINE.with_suffix(".yaml"))
    b, db = _read(INLINE.with_suffix(".nl"))
    assert not da and not db, [d.render() for d in da + db]
    assert a == b
    opt = a.optimizer
    assert isinstance(opt, S.OptimizerSpec) and opt.name == "inline_optimizer_optimizer"
    assert opt.hyper["slow_every"] == 4 and [g.params for g in opt.groups] == ["matrix", "rest"]
    assert str(opt.groups[1].use) == "adamw(lr=lr, eps=eps)"
    for ext in (".yaml", ".nl"):  # and both pass every check, the inline optimizer's included
        assert load_located(INLINE.with_suffix(ext)).spec == a


def test_inline_optimizer_dumps_inline_and_reloads():
    import yaml
    spec = load_located(INLINE.with_suffix(".yaml")).spec
    data = yaml.safe_load(S.dump(spec))
    assert set(data["optimizer"]) == {"hyper", "groups"}
    errors = Collector("dumped.yaml")
    from nlc.syntax.source import SourceMap
    assert validate(data, SourceMap("dumped.yaml"), errors) == spec and not errors.diagnostics


def test_inline_optimizer_graph_draws_its_levels():
    from nlc.graph import lower
    g = lower(INLINE.with_suffix(".nl"))
    name = "inline_optimizer_optimizer"
    assert g.node(name)["kind"] == "optimizer"
    assert g.node(f"{name}.matrix.s")["frequency"] == "1/4"  # slow_every = 4, resolved
    assert (f"{name}.matrix.m", name) in [(u, v) for u, v, _ in g.edges("conditioning")]


@pytest.mark.parametrize("old, new, code, pattern", [
    ("lr: 0.003", "lr: -0.003", "E502", r"`lr` = -0.003 is out of range"),
    ("ema(beta2)", "emma(beta2)", "E203", r"unknown rule primitive `emma`"),
    ("adamw(lr=lr, eps=eps)", "adamw(lr=lr, epps=eps)", "E208", r"`adamw` has no hyperparameter `epps`"),
    ("prev(s)", "prev(t)", "E204", r"`prev` reads a level of this group"),
    ("params: rest", "params: rst", "E103", r"`optimizer.groups.1.params` cannot be `rst`"),
    ("  hyper:", "  name: opt\n  hyper:", "E102", r"unknown key `name`"),
    ("every: slow_every steps", "every: slow_evry steps", "E208", r"period `slow_evry` names no hyperparameter"),
])
def test_inline_optimizer_errors_point_into_the_model_file(tmp_path, old, new, code, pattern):
    from nlc.diagnostics import SpecError
    text = INLINE.with_suffix(".yaml").read_text()
    assert old in text
    bad = text.replace(old, new, 1)
    p = tmp_path / "bad.yaml"
    p.write_text(bad)
    with pytest.raises(SpecError) as e:
        load_located(p)
    d = e.value.diagnostics[0]
    assert d.code == code and re.search(pattern, d.message), e.value.render()
    line = next(i for i, ln in enumerate(bad.splitlines(), 1) if new.splitlines()[-1 if code == "E102" else 0] in ln)
    if code == "E102":
        line -= 1
    assert d.span.file == str(p) and d.span.line == line, e.value.render()


@pytest.mark.parametrize("old, new, code, line, col", [
    ("hyper lr=0.003", "hyper lr=-0.003", "E502", 15, 12),
    ("ema(beta2)", "emma(beta2)", "E203", 18, 25),
    ("level s = grad   |> ema(beta1) every slow_every steps", "level s = grad |> ema(beta1) every 4 tokens", "E402", 19, 40),
])
def test_inline_optimizer_errors_point_into_the_nl_file(tmp_path, old, new, code, line, col):
    from nlc.diagnostics import SpecError
    text = INLINE.with_suffix(".nl").read_text()
    assert old in text
    p = tmp_path / "bad.nl"
    p.write_text(text.replace(old, new))
    with pytest.raises(SpecError) as e:
        load_located(p)
    d = e.value.diagnostics[0]
    assert (d.code, d.span.line, d.span.col) == (code, line, col), e.value.render()


def test_inline_optimizer_nl_forms():
    spec, diags = nl(HEAD + "level a: matrix\noptimizer {\n  hyper lr=0.1\n  params all { level m = grad |> ema(0.9)  update -lr * m }\n}\n")
    assert not diags, [d.render() for d in diags]
    assert spec.optimizer == S.OptimizerSpec(nlc=1, name="m_optimizer", hyper={"lr": 0.1}, groups=(
        S.ParamGroup(params="all", levels={"m": S.OptLevel(input="grad", rule="ema(0.9)")}, update="-lr * m"),))
    d = one(HEAD + "level a: matrix\noptimizer adamw\noptimizer { params all use adamw }\n", "E008")
    assert (d.span.line, d.span.col) == (4, 1) and "given twice" in d.message
    d = one("optimizer o { params all use adamw }\noptimizer { params all use adamw }\n", "E006")
    assert (d.span.line, d.span.col) == (2, 1) and "belongs in a model spec" in d.message
    _, diags = nl(HEAD + "level a: matrix\noptimizer { hyper lr=0.1 }\n")
    assert [d.code for d in diags] == ["E103"]  # `groups` must not be empty


def test_model_optimizer_overrides_are_range_checked(tmp_path):
    from nlc.diagnostics import SpecError
    p = tmp_path / "m.nl"
    p.write_text(HEAD + "level a: mlp(residual=false) every never\noptimizer adamw(lr=-0.1, eps=e)\n")
    with pytest.raises(SpecError) as e:
        load_located(p)
    assert [(d.code, d.span.line, d.span.col) for d in e.value.diagnostics] == [("E502", 3, 20), ("E502", 3, 30)]
    assert "out of range" in e.value.diagnostics[0].message and "not a constant" in e.value.diagnostics[1].message

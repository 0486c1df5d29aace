"""A spec is user input: whatever the bytes, the loader answers with located diagnostics, quickly,
never a traceback, and never runs anything from the file."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nlc.diagnostics import SpecError
from nlc.loader import load_located

SPECS = Path(__file__).parent.parent / "specs"
SOURCES = sorted(SPECS.glob("*.yaml")) + sorted(SPECS.glob("*.nl"))


def outcome(tmp_path: Path, name: str, data: bytes):
    """Load; only a clean Spec or a SpecError whose every diagnostic has a position may come back."""
    p = tmp_path / name
    p.write_bytes(data)
    try:
        return load_located(p).spec
    except SpecError as e:
        assert e.diagnostics
        for d in e.diagnostics:
            assert d.span is not None and d.span.line >= 1 and d.span.col >= 1, d
        str(e)  # renders
        return e


def test_yaml_bomb_is_refused_fast(tmp_path):
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, c in zip("abcdefgh", "bcdefghi"))
    t0 = time.perf_counter()
    err = outcome(tmp_path, "bomb.yaml", bomb.encode())
    assert isinstance(err, SpecError) and "E004" in err.codes
    assert time.perf_counter() - t0 < 5


def test_python_tags_construct_nothing(tmp_path):
    marker = tmp_path / "pwned"
    text = f"nlc: 1\nname: !!python/object/apply:os.system ['touch {marker}']\n"
    err = outcome(tmp_path, "tag.yaml", text.encode())
    assert isinstance(err, SpecError) and "E005" in err.codes
    assert not marker.exists()


@pytest.mark.parametrize("data", [b"", b"\n\n  \n", b"\x00\x01\x02", b"\xff\xfe\xfa", b"[1, 2", b"- a\n- b\n",
                                  b"42", b"model { }", b"level : :", b"nlc: 1\nname: 3\n",
                                  b"nlc: 1\nname: x\nmodel: {vocab: -1, d_model: 0, layers: 1, heads: 1, block: []}\nlevels: {}\n"])
@pytest.mark.parametrize("suffix", [".yaml", ".nl"])
def test_junk(tmp_path, data, suffix):
    assert isinstance(outcome(tmp_path, "junk" + suffix, data), SpecError)


def test_truncations_of_every_shipped_spec(tmp_path):
    for src in SOURCES:
        data = src.read_bytes()
        for cut in range(0, len(data), max(1, len(data) // 23)):
            outcome(tmp_path, src.name, data[:cut])


_mutation = st.tuples(st.sampled_from(["delete", "insert", "replace", "swap_lines", "dup_line"]),
                      st.integers(0, 10_000), st.integers(1, 12),
                      st.sampled_from(["0", "-1", ":", "{", "}", "[", "]", "(", ")", ",", "|>", "\n", "  ", "x",
                                       "mlp", "every", "tokens", "1e-8", "#", "'", '"', "&a", "*a", "!!", "level",
                                       "\x00", "é", "chunk: 0", "key: M(x)"]))


def _mutate(text: str, muts) -> str:
    for kind, pos, n, s in muts:
        pos = pos % (len(text) + 1)
        if kind == "delete":
            text = text[:pos] + text[pos + n:]
        elif kind == "insert":
            text = text[:pos] + s + text[pos:]
        elif kind == "replace":
            text = text[:pos] + s + text[pos + n:]
        else:
            lines = text.split("\n")
            i, j = pos % len(lines), (pos + n) % len(lines)
            if kind == "swap_lines":
                lines[i], lines[j] = lines[j], lines[i]
            else:
                lines.insert(i, lines[j])
            text = "\n".join(lines)
    return text


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(src=st.sampled_from(SOURCES), muts=st.lists(_mutation, min_size=1, max_size=4))
def test_mutated_specs_give_diagnostics_never_tracebacks(tmp_path, src, muts):
    outcome(tmp_path, src.name, _mutate(src.read_text(), muts).encode("utf-8", "surrogatepass"))


def _nlc(*args, **kw):
    import subprocess
    import sys
    kw = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **kw}
    return subprocess.run([sys.executable, "-m", "nlc.runtime.cli", *map(str, args)], text=True, timeout=60, **kw)


def test_a_fifo_is_refused_not_read(tmp_path):
    import os
    fifo = tmp_path / "spec.yaml"
    os.mkfifo(fifo)                      # reading it would block until someone writes
    r = _nlc("check", fifo)
    assert r.returncode == 2 and "is not a regular file" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full on this system")
def test_output_that_cannot_be_written_is_a_message(tmp_path):
    root = Path(__file__).resolve().parent.parent
    with open("/dev/full", "w") as full:
        r = _nlc("explain", root / "specs" / "titans.yaml", stdout=full)
    assert r.returncode == 2 and "cannot write the output: No space left on device" in r.stderr
    assert "Traceback" not in r.stderr

"""`nlc sample`: a chunked prefill plus token-by-token streaming equals one forward pass where the
generated model guarantees it (and is measured where it does not), tokens stream as they come,
and every mistake is a message with exit status 2."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import nlc
from nlc.runtime import sample as S
from nlc.runtime.cli import app
from nlc.runtime.evaluate import EvalError, approximations, load_run, source_of
from nlc.runtime.train import TrainConfig, train

from .test_compile import ROOT, small   # the shipped spec at test size

TINY = ("model.d_model=32", "model.layers=2", "model.heads=2")
MODEL_SPECS = sorted(p.stem for p in (ROOT / "specs").glob("*.yaml") if "model:" in p.read_text())
# exact at any cut: attention with its KV cache, matrix memories (chunked forms exact for any chunk),
# MLP and momentum memories (chunks anchored at absolute positions, the open chunk carried), CMS
# models (the open window carried and run again)
EXACT = MODEL_SPECS


def compiled(name: str, tmp_path: Path):
    torch.manual_seed(0)
    model = nlc.compile(small(name, tmp_path))
    return model.double().eval(), source_of(model)


def test_only_an_unknown_source_is_approximate():
    from nlc.backends.torch.codegen import generate
    for name in MODEL_SPECS:
        assert approximations(generate(nlc.load(ROOT / "specs" / f"{name}.yaml"), f"{name}.yaml")) == []
    assert approximations("") != []


@pytest.mark.parametrize("name", EXACT)
def test_prefill_and_streaming_equal_one_forward_pass(name, tmp_path):
    """float64: the prompt in one pass, then token by token with the state carried, gives the
    logits of the whole text at once, from any prefill length."""
    model, source = compiled(name, tmp_path)
    assert approximations(source) == []
    ids = torch.randint(0, 50, (2, 29), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole, _ = model(ids)
    for prefill in (1, 11):
        torch.testing.assert_close(S.stream_logits(model, ids, prefill), whole, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- trained runs

def trained(out: Path, spec="specs/transformer.yaml", sets=TINY, **kw) -> Path:
    kw = {"steps": 30, "batch": 8, "context": 32, "device": "cpu", "eval_every": 1000, "eval_batches": 1, **kw}
    train(TrainConfig(spec=ROOT / spec, out=out, sets=sets + ("lr=3e-3",), **kw), log=lambda s: None)
    return out


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("text")
    words = "the cat sat on a mat and ran to the red door while birds sang".split()
    g = torch.Generator().manual_seed(0)
    (d / "t.txt").write_text(" ".join(words[i] for i in torch.randint(0, len(words), (2000,), generator=g).tolist()))
    return trained(d / "run", data=d / "t.txt", context=48)


@pytest.fixture(scope="module")
def task_run(tmp_path_factory):
    return trained(tmp_path_factory.mktemp("task") / "run", steps=3, sets=TINY + ("model.vocab=128",))


def invoke(*args):
    return CliRunner().invoke(app, ["sample", *map(str, args)])


def test_sample_streams_text_and_greedy_equals_recomputing_the_whole(text_run):
    r = invoke(text_run, "--prompt", "the cat ", "--tokens", 24, "--temperature", 0, "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "sampled 24 tokens from `transformer` at step 30" in r.stderr and "note:" not in r.stderr
    run = load_run(text_run)
    ids = list(b"the cat ")
    with torch.no_grad():                  # greedy decoding, the whole text again at every token
        for _ in range(24):
            ids.append(int(run.model(torch.tensor([ids]))[0][0, -1].argmax()))
    expected = bytes(ids[8:]).decode("utf-8", errors="replace")
    assert r.stdout == expected + "\n"
    assert set(r.stdout.strip()) <= set("abcdefghijklmnopqrstuvwxyz ")   # it learnt the bytes of the text
    # the same seed samples the same text; top-k 1 is the arg-max
    again = [invoke(text_run, "--prompt", "the", "--tokens", 16, "--seed", s).stdout for s in (5, 5, 6)]
    assert again[0] == again[1] != again[2]
    top1 = invoke(text_run, "--prompt", "the cat ", "--tokens", 24, "--top-k", 1, "--seed", 3)
    assert top1.stdout == r.stdout


def test_bytes_are_decoded_as_they_come(text_run, monkeypatch):
    """A character's bytes print when the character is whole; bytes that are no UTF-8 print U+FFFD."""
    forced = iter([0xE2, 0x82, 0xAC, 0xFF, ord("!")])
    monkeypatch.setattr(S, "chooser", lambda *a: lambda logits: torch.tensor([next(forced)]))
    pieces: list[str] = []
    r = S.sample(load_run(text_run), "ab", tokens=5, emit=pieces.append)
    assert pieces == ["\u20ac", "\ufffd", "!", "\n"] and r["text"] == "\u20ac\ufffd!"
    assert r["ids"] == [0xE2, 0x82, 0xAC, 0xFF, 33] and r["prompt"] == [97, 98] and r["exact"]


def test_a_task_model_reads_and_prints_token_ids(task_run):
    r = invoke(task_run, "--prompt", "3 5,7 0", "--tokens", 6, "--temperature", 0)
    assert r.exit_code == 0, r.output
    out = r.stdout.split()
    assert len(out) == 6 and all(0 <= int(t) < 128 for t in out) and r.stdout.endswith("\n")
    run = load_run(task_run)
    with torch.no_grad():
        first = int(run.model(torch.tensor([[3, 5, 7, 0]]))[0][0, -1].argmax())
    assert int(out[0]) == first
    assert S.prompt_ids("3 5", 40, token_ids=True) == [3, 5] and S.prompt_ids("3 5", 256, token_ids=False) == [51, 32, 53]
    with pytest.raises(EvalError, match="outside"):
        S.prompt_ids("ab", 40, token_ids=False)       # b'a' is 97: not in a vocabulary of 40


def test_streaming_a_cms_model_equals_recomputing_the_whole(tmp_path):
    """A CMS model (window 8) streamed greedily past a window's end picks the tokens that the whole
    text, recomputed at every token, picks; no note on stderr."""
    out = trained(tmp_path / "hope", spec="specs/hope_attention.yaml", steps=2, batch=2, context=16,
                  sets=TINY + ("levels.cms.every=8, 16, 32 tokens",))
    r = invoke(out, "--prompt", "1 2 3", "--tokens", 9, "--temperature", 0)
    assert r.exit_code == 0, r.output
    assert "note:" not in r.stderr
    run = load_run(out)
    ids = [1, 2, 3]
    with torch.no_grad():
        for _ in range(9):
            ids.append(int(run.model(torch.tensor([ids]))[0][0, -1].argmax()))
    assert r.stdout.split() == [str(i) for i in ids[3:]]


@pytest.mark.parametrize("args, message", [
    (("--prompt", "caf\u00e9"), r"byte 3 is 0xc3 \(in '\u00e9'\), outside the model's vocabulary of 128 tokens"),
    (("--prompt", "3 128"), r"token id 128 \(item 2\) is outside the model's vocabulary of 128 ids"),
    (("--prompt", ""), r"--prompt is empty"),
    (("--prompt", "1", "--temperature", "-1"), r"--temperature must be 0"),
    (("--prompt", "1", "--top-k", "-2"), r"--top-k must be 0"),
    (("--prompt", "1", "--tokens", "0"), r"--tokens must be at least 1"),
])
def test_sample_mistakes_exit_2(task_run, args, message):
    r = invoke(task_run, *args)
    assert r.exit_code == 2 and isinstance(r.exception, SystemExit), r.output
    assert r.stderr.startswith("error: ") and re.search(message, r.stderr), r.stderr
    assert "Traceback" not in r.output and r.stdout == ""


def test_sample_refuses_what_is_not_a_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    for target, message in [(tmp_path / "empty", "no checkpoint in"), (tmp_path / "nope", "does not exist"),
                            (ROOT / "README.md", "neither a run directory nor a checkpoint")]:
        r = invoke(target, "--prompt", "1")
        assert r.exit_code == 2 and message in r.stderr and "Traceback" not in r.output, r.output

"""The synthetic tasks: deterministic batches that fill the context, a loss and an accuracy that count
only what memory can predict, options parsed and checked (exit status 2 on the command line), formal
languages evaluated on longer strings than they train on; text data from a file or a folder."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from nlc.runtime.cli import app
from nlc.runtime.data import IGNORE, DataError, TextData, correct, make_data
from nlc.runtime.tasks import TASKS, MQARTask, NIAHTask, make_task, parse

ROOT = Path(__file__).parent.parent
CONTEXT = 128


def counted_positions(y: torch.Tensor) -> list[list[int]]:
    return [torch.nonzero(row != IGNORE).flatten().tolist() for row in y]


@pytest.mark.parametrize("name", list(TASKS))
def test_batches_are_deterministic_and_fill_the_context(name):
    task = make_task(name, 256, CONTEXT, seed=3)
    x, y = task.batch("train", 7, 4)
    assert x.shape == y.shape == (4, CONTEXT) and x.dtype == y.dtype == torch.long
    again = make_task(name, 256, CONTEXT, seed=3).batch("train", 7, 4)
    assert torch.equal(x, again[0]) and torch.equal(y, again[1])
    for other in (task.batch("train", 8, 4), task.batch("val", 7, 4), make_task(name, 256, CONTEXT, 4).batch("train", 7, 4)):
        assert not torch.equal(x, other[0])
    counted = y != IGNORE
    assert torch.equal(y[:, :-1][counted[:, :-1]], x[:, 1:][counted[:, :-1]])    # y is the next token
    assert int(x.max()) < 256 and int(x.min()) >= 0
    for split in ("train", "val"):   # the scored positions reach the end of the context
        margin = task.size(task.lengths(split)[0]) if hasattr(task, "size") else 4
        _, y = task.batch(split, 0, 8)
        assert all(rows and rows[-1] >= CONTEXT - margin for rows in counted_positions(y)), (split, y)


@pytest.mark.parametrize("name", ["recall", "mqar", "niah", "mqar:pairs=8,queries=3", "niah:depth=0.5"])
def test_recall_tasks_score_the_value_of_the_last_occurrence_of_the_key(name):
    task = make_task(name, 256, CONTEXT, seed=0)
    x, y = task.batch("val", 1, 4)
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        scored = [t for t, v in enumerate(row_y) if v != IGNORE]
        assert scored
        for t in scored:
            j = max(i for i in range(t) if row_x[i] == row_x[t])    # where the key was stored
            assert row_x[j + 1] == row_y[t]
    if name == "recall":   # 16 pairs and their 16 queries per episode: two episodes in 129 tokens
        assert [len(r) for r in counted_positions(y)] == [32] * 4
    if name == "niah:depth=0.5":
        assert x[:, 62].tolist() == x[:, -1].tolist()     # the needle's key, half way in


def test_copy_fills_the_context_with_episodes():
    x, y = make_task("copy:length=10", 256, 64, seed=0).batch("train", 0, 2)
    # 65 tokens: 3 episodes of 10 symbols, the separator and the 10 again (63 tokens), 2 of padding
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        scored = [t for t, v in enumerate(row_y) if v != IGNORE]
        assert len(scored) == 30 and scored[-1] == 61
        for t in scored:
            assert row_y[t] == row_x[t - 10]     # the symbol 11 tokens back (10 symbols and the separator)


def parse_episodes(row_x: list[int], row_y: list[int], name: str) -> list[int]:
    """Each episode's length, checking that exactly what memory can predict is scored, and right."""
    lengths, t = [], 0
    seq = row_x + [row_y[-1] if row_y[-1] != IGNORE else 0]
    while t < len(seq) and seq[t] != 0:
        if name == "parity":
            n = 0
            while seq[t + n] in (1, 2):
                n += 1
            assert seq[t + n] == 3
            parity = sum(v - 1 for v in seq[t:t + n]) % 2
            assert row_y[t + n] == parity + 1 and seq[t + n + 1] == parity + 1
            assert all(v == IGNORE for v in row_y[t - 1 if t else 0:t + n])
            t += n + 2
        else:
            n = 0
            while seq[t + n] == 1:
                n += 1
            assert seq[t + n:t + 2 * n + 1] == [2] * n + [3]
            assert row_y[t + n:t + 2 * n] == [2] * (n - 1) + [3]     # b's after the first, then $
            assert all(v == IGNORE for v in row_y[t:t + n])           # the a's and the first b: not predictable
            t += 2 * n + 1
        lengths.append(n)
    return lengths


@pytest.mark.parametrize("name, train, eval_", [("parity", 16, 48), ("anbn", 12, 30), ("parity:train=5,eval=9", 5, 9)])
def test_formal_languages_train_short_and_evaluate_longer(name, train, eval_):
    task = make_task(name, 256, CONTEXT, seed=1)
    seen = {}
    for split in ("train", "val"):
        x, y = task.batch(split, 2, 8)
        seen[split] = [n for rx, ry in zip(x.tolist(), y.tolist()) for n in parse_episodes(rx, ry, name.split(":")[0])]
    assert 1 <= min(seen["train"]) and max(seen["train"]) <= train < min(seen["val"]) <= max(seen["val"]) <= eval_
    assert len(set(seen["train"])) > 3    # lengths vary


def test_accuracy_is_exact():
    for name in ("mqar", "parity"):
        task = make_task(name, 256, CONTEXT, seed=0)
        x, y = task.batch("val", 0, 16)
        n = int((y != IGNORE).sum())
        perfect = torch.nn.functional.one_hot(y.clamp(min=0), 256).float()
        assert correct(perfect, y) == (n, n)
        constant = torch.zeros(*y.shape, 256)
        constant[..., 1] = 1.0            # always token 1: parity's `0`, mqar's first key (never a value)
        right, counted = correct(constant, y)
        assert counted == n and right == int((y == 1).sum())
        if name == "mqar":
            assert right == 0
        else:
            assert 0.3 < right / n < 0.7, right / n


def test_options_parse_with_defaults_and_checks():
    cls, opts = parse("mqar:pairs=32, queries=16")
    assert cls is MQARTask and opts == {"pairs": 32, "queries": 16}
    task = make_task("mqar:pairs=32,queries=16", 256, 256, seed=0)
    assert task.opt == {"pairs": 32, "queries": 16, "symbols": 64}
    assert task.shapes == [(32, 16), (32, 16), (16, 16)]       # 96 + 96 + 64 of the 257 tokens: the last one shorter
    assert parse("niah:depth=0.25") == (NIAHTask, {"depth": 0.25}) and parse("niah")[1] == {}
    assert make_task("recall", 17, 64, 0).symbols == 8           # a default alphabet shrinks to a small vocab
    assert make_task("parity", 256, 32, 0).opt["eval"] == 31     # and a default length to a short context,
    assert make_task("mqar", 256, 32, 0).shapes == [(8, 8)]
    with pytest.raises(DataError, match="needs --context of at least 95"):   # but not one that is given
        make_task("mqar:pairs=32", 256, 32, 0)
    for text, message in [("mqarr", "unknown task `mqarr`.*did you mean `mqar`"),
                          ("mqar:pair=3", "no option `pair` .did you mean `pairs`.*\nhint: `mqar` takes pairs=16, queries=16"),
                          ("mqar:pairs=0", "`pairs` is a whole number of at least 1"),
                          ("mqar:pairs=4,queries=8", "more queries than the 4 pairs"),
                          ("mqar:pairs", "`pairs` is not key=value"), ("mqar:pairs=2,pairs=3", "gives `pairs` twice"),
                          ("niah:depth=1.5", "`depth` is `any` or a fraction"),
                          ("parity:train=8,eval=8", "not longer than train=8"),
                          ("anbn:eval=100", "needs --context of at least 200"),
                          ("copy:symbols=300", "the model's vocab is 256")]:
        with pytest.raises(DataError, match="(?s)" + message):
            make_task(text, 256, CONTEXT, seed=0)


def test_cli_lists_the_tasks_and_rejects_bad_options(tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["train", "--task", "help"])
    assert r.exit_code == 0, r.output
    for name, task in TASKS.items():
        assert f"\n{name} " in r.output and task.about in r.output
        assert all(f"{o.name}={o.default}" in r.output for o in task.options)
    for bad, message in [("mqar:pair=3", "no option `pair`"), ("parity:eval=4", "not longer than train=16"),
                         ("nosuch", "unknown task `nosuch`")]:
        r = runner.invoke(app, ["train", str(ROOT / "specs/transformer.yaml"), "--task", bad, "--steps", "1",
                                "--out", str(tmp_path / "run"), "--device", "cpu"])
        assert r.exit_code == 2, r.output
        assert r.output.startswith("error: ") and message in r.output and "hint: " in r.output, r.output
        assert isinstance(r.exception, SystemExit) and "Traceback" not in r.output
    assert not (tmp_path / "run").exists()


def test_text_data_from_a_folder(tmp_path):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / ".git").mkdir()
    parts = {"b.txt": b"B" * 40, "a.txt": b"A" * 30, "sub/c.txt": b"C" * 50, ".hidden": b"H" * 9, ".git/x": b"G" * 9}
    for name, content in parts.items():
        (folder / name).write_bytes(content)
    data = make_data(folder, "copy", 256, 8, seed=0)
    assert isinstance(data, TextData) and "3 files" in data.describe
    whole = torch.cat([data.parts["train"], data.parts["val"]])
    assert bytes(whole.tolist()) == b"A" * 30 + b"B" * 40 + b"C" * 50      # sorted path order, hidden skipped
    x, y = data.batch("train", 0, 4)
    assert torch.equal(x, data.batch("train", 0, 4)[0]) and torch.equal(x[:, 1:], y[:, :-1])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="without files"):
        TextData(tmp_path / "empty", 8, 0)


def test_stream_trains_the_tasks_in_turn_and_validates_on_all():
    stream = make_task("stream:tasks=copy+mqar+parity,every=5", 256, CONTEXT, seed=2)
    parts = [make_task(n, 256, CONTEXT, seed=2) for n in ("copy", "mqar", "parity")]
    for step, k in ((0, 0), (4, 0), (5, 1), (9, 1), (10, 2), (500, 2)):   # the last task to the end
        x, y = stream.batch("train", step, 3)
        px, py = parts[k].batch("train", step, 3)
        assert torch.equal(x, px) and torch.equal(y, py), (step, k)
    for i in range(6):                                                     # validation cycles through all
        x, _ = stream.batch("val", i, 3)
        assert torch.equal(x, parts[i % 3].batch("val", i // 3, 3)[0])
    for bad, said in (("stream:tasks=copy", "two or more"), ("stream:tasks=copy+stream", "`stream` is not one"),
                      ("stream:tasks=copy+mqar,every=0", "at least 1")):
        with pytest.raises(DataError, match=said):
            make_task(bad, 256, CONTEXT, seed=0)

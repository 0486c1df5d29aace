"""Synthetic tasks that test memory, generated on the fly (nothing to download).

`--task NAME` or `--task NAME:key=value,key=value` (`mqar:pairs=32,queries=16`); `nlc train --task
help` prints every task with its options (`help_text`). The options and the `Task` base class are in
`nlc.runtime.task_base`. Each task fills the context it is given:
the episodic ones repeat independent episodes (the last one shortened to the room left), so the
positions the loss counts reach the end of the sequence.

A batch is a pure function of (seed, split, index) (`nlc.runtime.data.generator`), so a resumed run
sees the same batches. `y` is IGNORE wherever no memory can predict the next token (the random
half of an episode); the loss and the accuracy (`nlc.runtime.data.correct`) count the rest, and
`floor` is the best loss there without memory (None when there is no simple one).

Token ids: 0 is the separator and the padding; each task's symbols follow. An option left at its
default shrinks to fit a small vocabulary or context; one given explicitly must fit (DataError).
"""
from __future__ import annotations

import math

import torch

from nlc.diagnostics import did_you_mean
from nlc.runtime.data import DataError
from nlc.runtime.task_base import HELP, Option, Task, _episodes, _pack, depth, whole


class CopyTask(Task):
    name = "copy"
    about = "random symbols, a separator, the same symbols again; scores the copy"
    options = (Option("length", 0, "symbols per episode; 0: half the context (one episode)", whole(0)),
               Option("symbols", 16, "the alphabet's size", whole(2)))

    def setup(self):
        self.symbols = self.alphabet(1)
        n = self.fit("length", self.opt["length"], self.context // 2,
                     f"an episode of {self.opt['length']} symbols, the separator and the copy needs --context "
                     f"of at least {2 * self.opt['length']}") or self.context // 2
        room = self.context + 1
        self.lengths = []
        while room >= 3:
            self.lengths.append(min(n, (room - 1) // 2))
            room -= 2 * self.lengths[-1] + 1
        self.floor = math.log(self.symbols)

    def layout(self):
        return f"{self.symbols} symbols, {_episodes(self.lengths)} symbols copied per sequence"

    def sequences(self, split, size, g):
        parts = []
        for n in self.lengths:
            sym = torch.randint(1, self.symbols + 1, (size, n), generator=g)
            counts = torch.zeros(size, 2 * n + 1, dtype=torch.bool)
            counts[:, n + 1:] = True
            parts.append((torch.cat([sym, torch.zeros(size, 1, dtype=torch.long), sym], 1), counts))
        return _pack(parts, size, self.context + 1)


class MQARTask(Task):
    name = "mqar"
    about = "multi-query associative recall: key-value pairs, then some of the keys again; scores their values"
    options = (Option("pairs", 16, "key-value pairs per episode (distinct keys)", whole(1)),
               Option("queries", 16, "keys asked again per episode, each once (at most pairs)", whole(1)),
               Option("symbols", 64, "the size of the key and of the value alphabets", whole(2)))
    ask_all = False          # recall asks every key of an episode

    def setup(self):
        self.symbols = self.alphabet(2)
        p = self.fit("pairs", self.opt["pairs"], self.symbols, f"more pairs than the {self.symbols} keys (symbols)")
        q = p if self.ask_all else self.fit("queries", self.opt["queries"], p, f"more queries than the {p} pairs")
        if 2 * (p + q) > self.context + 1 and {"pairs", "queries"} & set(self.given):
            raise self.error(f"`{self.spelled}`: an episode of {p} pairs and {q} queries needs --context of at "
                             f"least {2 * (p + q) - 1}")
        self.shapes, room = [], self.context + 1   # (pairs, queries) of each episode
        while room >= 4:
            q1 = min(q, room // 4)
            p1 = q1 if self.ask_all else min(p, (room - 2 * q1) // 2)
            self.shapes.append((p1, q1))
            room -= 2 * (p1 + q1)
        self.floor = math.log(self.symbols)

    def layout(self):
        return (f"{self.symbols} keys and values, {_episodes([f'{p} pairs, {q} queries' for p, q in self.shapes])} "
                f"per sequence")

    def sequences(self, split, size, g):
        S, parts = self.symbols, []
        for p, q in self.shapes:
            keys = torch.argsort(torch.rand(size, S, generator=g), dim=1)[:, :p] + 1
            values = torch.randint(S + 1, 2 * S + 1, (size, p), generator=g)
            order = torch.argsort(torch.rand(size, p, generator=g), dim=1)[:, :q]
            pairs = torch.stack([keys, values], 2).flatten(1)
            asked = torch.stack([keys.gather(1, order), values.gather(1, order)], 2).flatten(1)
            counts = torch.zeros(size, 2 * (p + q), dtype=torch.bool)
            counts[:, 2 * p + 1::2] = True       # the values after the asked keys
            parts.append((torch.cat([pairs, asked], 1), counts))
        return _pack(parts, size, self.context + 1)


class RecallTask(MQARTask):
    name = "recall"
    about = "associative recall: key-value pairs, then every key again in a new order; scores the values"
    options = (Option("pairs", 16, "key-value pairs per episode (distinct keys), all asked again", whole(1)),
               Option("symbols", 16, "the size of the key and of the value alphabets", whole(2)))
    ask_all = True


class NIAHTask(Task):
    name = "niah"
    about = "needle in a haystack: one key-value pair in noise, its key asked at the end; scores the value"
    options = (Option("depth", "any", "where the needle is, as a fraction of the context; any: anywhere", depth),
               Option("symbols", 32, "the size of the key, the value and the noise alphabets", whole(2)))

    def setup(self):
        self.symbols = self.alphabet(3)
        self.floor = math.log(self.symbols)

    def layout(self):
        return f"a needle in {self.context - 3} noise tokens, {self.symbols} symbols"

    def sequences(self, split, size, g):
        S, T = self.symbols, self.context + 1
        seq = torch.randint(2 * S + 1, 3 * S + 1, (size, T), generator=g)   # the haystack
        key = torch.randint(1, S + 1, (size, 1), generator=g)
        value = torch.randint(S + 1, 2 * S + 1, (size, 1), generator=g)
        d = self.opt["depth"]
        at = (torch.randint(0, T - 3, (size, 1), generator=g) if d == "any"
              else torch.full((size, 1), round(d * (T - 4)), dtype=torch.long))
        seq.scatter_(1, at, key)
        seq.scatter_(1, at + 1, value)
        seq[:, -2:] = torch.cat([key, value], 1)
        counts = torch.zeros(size, T, dtype=torch.bool)
        counts[:, -1] = True
        return seq, counts


class _Formal(Task):
    """A formal language: episodes of lengths 1..train in training, train+1..eval in validation."""
    options = (Option("train", 16, "the longest episode in training (lengths 1..train)", whole(1)),
               Option("eval", 48, "the longest in validation (lengths train+1..eval)", whole(2)))

    def size(self, n: int) -> int:
        raise NotImplementedError

    def setup(self):
        tr, ev = self.opt["train"], self.opt["eval"]
        if ev <= tr:
            raise self.error(f"`{self.name}:eval={ev}` is not longer than train={tr}")
        longest = max(n for n in range(1, self.context + 2) if self.size(n) <= self.context + 1)
        ev = self.opt["eval"] = self.fit("eval", ev, longest, f"needs --context of at least {self.size(ev) - 1}")
        if ev <= tr:
            raise self.error(f"`{self.name}:train={tr}` leaves no longer strings to evaluate on in --context "
                             f"{self.context}: lower train or raise --context")

    def lengths(self, split: str) -> tuple[int, int]:
        tr, ev = self.opt["train"], self.opt["eval"]
        return (1, tr) if split == "train" else (tr + 1, ev)

    def layout(self):
        tr, ev = self.opt["train"], self.opt["eval"]
        return f"lengths 1..{tr} in training, {tr + 1}..{ev} in validation, episodes filling {self.context} tokens"

    def plan(self, split: str, size: int, g: torch.Generator) -> list[list[tuple[int, int]]]:
        """Each row's episodes (start, length): random lengths in the split's range until the
        sequence is full (the last one no longer than the room left)."""
        T, (lo, hi) = self.context + 1, self.lengths(split)
        u = torch.rand(size, T // self.size(lo) + 1, generator=g).tolist()
        rows = []
        for b in range(size):
            at, k, row = 0, 0, []
            while T - at >= self.size(lo):
                top = hi
                while self.size(top) > T - at:
                    top -= 1
                n = lo + int(u[b][k] * (top - lo + 1))
                row.append((at, n))
                at, k = at + self.size(n), k + 1
            rows.append(row)
        return rows


class ParityTask(_Formal):
    name = "parity"
    about = "bits, `=`, then their parity; trained on short strings, evaluated on longer ones"

    def size(self, n):
        return n + 2

    def setup(self):
        super().setup()
        self.floor = math.log(2)

    def sequences(self, split, size, g):
        T = self.context + 1
        episodes = self.plan(split, size, g)
        bits = torch.randint(0, 2, (size, T), generator=g).tolist()
        seq, counts = [[0] * T for _ in range(size)], [[False] * T for _ in range(size)]
        for b, row in enumerate(episodes):          # tokens: 1 and 2 the bits 0 and 1, 3 `=`
            for at, n in row:
                seq[b][at:at + n] = [1 + v for v in bits[b][at:at + n]]
                seq[b][at + n] = 3
                seq[b][at + n + 1] = 1 + sum(bits[b][at:at + n]) % 2
                counts[b][at + n + 1] = True
        return torch.tensor(seq), torch.tensor(counts)


class AnBnTask(_Formal):
    name = "anbn"
    about = "a^n b^n $: scores the b's after the first and the end `$` (counting); longer n in validation"
    options = (Option("train", 12, "the largest n in training (1..train)", whole(1)),
               Option("eval", 30, "the largest n in validation (train+1..eval)", whole(2)))

    def size(self, n):
        return 2 * n + 1

    def sequences(self, split, size, g):
        T = self.context + 1
        seq, counts = [[0] * T for _ in range(size)], [[False] * T for _ in range(size)]
        for b, row in enumerate(self.plan(split, size, g)):      # tokens: 1 a, 2 b, 3 $
            for at, n in row:
                seq[b][at:at + 2 * n + 1] = [1] * n + [2] * n + [3]
                counts[b][at + n + 1:at + 2 * n + 1] = [True] * n
        return torch.tensor(seq), torch.tensor(counts)


TASKS: dict[str, type[Task]] = {t.name: t for t in (CopyTask, RecallTask, MQARTask, NIAHTask, ParityTask, AnBnTask)}


def task_list(text: str) -> tuple[str, ...]:
    names = tuple(t.strip() for t in text.split("+") if t.strip())
    if len(names) < 2:
        raise ValueError("two or more task names joined by `+`, e.g. copy+mqar+parity")
    bad = [n for n in names if n not in TASKS or n == "stream"]
    if bad:
        raise ValueError(f"a list of the other tasks' names joined by `+`; `{bad[0]}` is not one "
                         f"(the tasks: {', '.join(n for n in TASKS if n != 'stream')})")
    return names


class StreamTask(Task):
    """Continual learning: the tasks one after another in training (`every` steps each, the last
    one to the end); validation batches cycle through all of them, so the score says what is
    remembered of the earlier ones. Each part is the task of that name with its defaults (at
    this vocabulary and context); score one part alone with `--task NAME`."""
    name = "stream"
    about = "continual learning: the tasks in turn (`every` steps each); validation cycles through all"
    options = (Option("tasks", "copy+mqar+parity", "task names joined by `+`, trained in this order", task_list),
               Option("every", 100, "training steps (batches) on each task before the next", whole(1)))

    def setup(self):
        names = self.opt["tasks"]
        names = task_list(names) if isinstance(names, str) else names
        self.opt["tasks"] = "+".join(names)
        self.parts = [TASKS[n](self.vocab, self.context, self.seed) for n in names]

    def part(self, split: str, index: int) -> tuple[int, int]:
        """(which task, its own batch index) of batch `index` of `split`."""
        n = len(self.parts)
        if split == "train":
            k = min(index // self.opt["every"], n - 1)
            return k, index
        return index % n, index // n

    def batch(self, split, index, size):
        k, i = self.part(split, index)
        return self.parts[k].batch(split, i, size)

    def layout(self):
        return (f"{' then '.join(p.spelled for p in self.parts)}, {self.opt['every']} steps each "
                f"(the last to the end); validation cycles through them")


TASKS[StreamTask.name] = StreamTask


def parse(text: str) -> tuple[type[Task], dict]:
    """`name:key=value,...` -> (the task's class, its options parsed); DataError with a hint."""
    name, _, rest = text.partition(":")
    name = name.strip()
    if name not in TASKS:
        hint = did_you_mean(name, TASKS) or ""
        raise DataError(f"unknown task `{name}`: the tasks are {', '.join(TASKS)}\n"
                        f"hint: {hint + ' ' if hint.startswith('did') else ''}`{HELP}` lists them with their options")
    cls, opts = TASKS[name], {}
    known = {o.name: o for o in cls.options}
    for item in (s.strip() for s in rest.split(",") if s.strip()):
        key, eq, value = (s.strip() for s in item.partition("="))
        if not eq or not key or not value:
            raise cls.error(f"`--task {text}`: `{item}` is not key=value")
        if key not in known:
            close = did_you_mean(key, known)
            raise cls.error(f"`{name}` has no option `{key}`" + (f" ({close})" if close and close.startswith("did") else ""))
        if key in opts:
            raise cls.error(f"`--task {text}` gives `{key}` twice")
        try:
            opts[key] = known[key].parse(value)
        except ValueError as e:
            raise cls.error(f"`{name}:{key}={value}`: `{key}` is {e}") from None
    return cls, opts


def make_task(text: str, vocab: int, context: int, seed: int) -> Task:
    cls, opts = parse(text)
    return cls(vocab, context, seed, **opts)


def help_text() -> str:
    lines = ["Synthetic tasks (`--task NAME` or `--task NAME:key=value,...`, without --data). Each fills",
             "--context with episodes (the last one shortened to the room left); the loss and the accuracy",
             "count only what memory can predict. Options left at their defaults shrink to fit a small",
             "vocabulary or context; options given must fit.", ""]
    for t in TASKS.values():
        lines.append(f"{t.name:<8} {t.about}")
        for o in t.options:
            lines.append(f"           {o.name + '=' + str(o.default):<14} {o.help}")
    lines += ["", "Example: nlc train specs/titans.yaml --task mqar:pairs=32,queries=16 --context 256"]
    return "\n".join(lines)

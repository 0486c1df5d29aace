"""What every study shares: train a spec through `nlc train`'s own loop, score it, describe it.

A variant is a spec file plus `--set` overrides of its size (never of its design: a design change
is its own spec file, `benchmarks/studies/specs/`, whose diff from its parent the report shows).
Training goes through `nlc.runtime.train.train`, so a study measures exactly what `nlc train`
runs; scoring loads the saved checkpoint (`nlc.runtime.evaluate.load_run`) and reads the
validation split of a task or a text, with the loss per position kept for the context curves.
"""
from __future__ import annotations

import difflib
import math
import os
import platform
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SPECS = ROOT / "specs"
VARIANTS = ROOT / "benchmarks" / "studies" / "specs"


@dataclass(frozen=True)
class Variant:
    """One model to train: a spec file, its label in the tables, and size overrides."""
    label: str
    spec: Path
    sets: tuple[str, ...] = ()

    def with_sets(self, *sets: str) -> "Variant":
        return Variant(self.label, self.spec, self.sets + tuple(sets))


def shipped(name: str, label: str | None = None, *sets: str) -> Variant:
    return Variant(label or name, SPECS / f"{name}.yaml", tuple(sets))


def spec_of(name: str) -> Path:
    """A study-scale spec (benchmarks/studies/specs/NAME.yaml, e.g. hope_small) or a shipped one."""
    return VARIANTS / f"{name}.yaml" if (VARIANTS / f"{name}.yaml").exists() else SPECS / f"{name}.yaml"


def spec_diff(child: Path, parent: Path) -> str:
    """The unified diff of a variant's spec against its parent, without the header comments."""
    a = [ln for ln in parent.read_text().splitlines()]
    b = [ln for ln in child.read_text().splitlines()]
    lines = difflib.unified_diff(a, b, parent.name, child.name, n=0, lineterm="")
    return "\n".join(ln for ln in lines if not ln.startswith("@@"))


@dataclass
class Trained:
    """A finished run: its checkpoint, training summary and model (loaded as saved)."""
    variant: Variant
    seed: int
    summary: dict
    model: object
    params: int
    seconds: float


def train(v: Variant, *, task: str | None = None, data: Path | None = None, steps: int, batch: int,
          context: int, seed: int, sets: tuple[str, ...] = (), out: Path | None = None,
          lr_schedule: str = "constant", warmup: int = 0, init: Path | None = None,
          log=lambda s: None) -> Trained:
    """Train `v` with `nlc train`'s loop (`init`: its `--init` weights); the run lives in a
    temporary folder unless `out`."""
    from nlc.runtime.evaluate import load_run
    from nlc.runtime.train import TrainConfig, train as run_train
    tmp = None
    if out is None:
        tmp = tempfile.TemporaryDirectory(prefix="nlc-study-")
        out = Path(tmp.name)
    cfg = TrainConfig(spec=v.spec, task=task or "copy", data=data, steps=steps, batch=batch, context=context,
                      seed=seed, out=out, sets=v.sets + tuple(sets), log_every=max(1, steps // 10),
                      eval_every=steps, eval_batches=1, save_every=steps, keep=1,
                      lr_schedule=lr_schedule, warmup=warmup, device="cpu", **({"init": init} if init else {}))
    t0 = time.perf_counter()
    summary = run_train(cfg, log=log)
    seconds = time.perf_counter() - t0
    run = load_run(Path(summary["checkpoint"]))
    params = sum(p.numel() for p in run.model.parameters())
    if tmp is not None:
        tmp.cleanup()
    return Trained(v, seed, summary, run.model, params, seconds)


def score(model, *, task: str | None = None, data: Path | None = None, context: int, batches: int,
          batch: int, seed: int = 0, bins: int = 0) -> dict:
    """Validation loss and accuracy of `model` on a task or a text at `context` tokens, in one
    whole-sequence call each; with `bins`, the loss per position averaged in `bins` equal bins."""
    import torch
    import torch.nn.functional as F

    from nlc.runtime.data import IGNORE, correct, make_data
    source = make_data(data, task or "copy", model.embed.num_embeddings, context, seed)
    loss_sum = torch.zeros(context, dtype=torch.float64)
    counts = torch.zeros(context, dtype=torch.float64)
    right = counted = 0
    model.eval()
    with torch.no_grad():
        for i in range(batches):
            x, y = source.batch("val", i, batch)
            logits = model(x)[0]
            per = F.cross_entropy(logits.double().transpose(1, 2), y, ignore_index=IGNORE, reduction="none")
            mask = (y != IGNORE).double()
            loss_sum += (per * mask).sum(0)
            counts += mask.sum(0)
            r, c = correct(logits, y)
            right, counted = right + r, counted + c
    out = {"loss": float(loss_sum.sum() / counts.sum().clamp_min(1)), "accuracy": right / max(counted, 1),
           "counted": counted}
    if bins:
        edges = [round(i * context / bins) for i in range(bins + 1)]
        out["bins"] = [[edges[i], edges[i + 1],
                        float(loss_sum[edges[i]:edges[i + 1]].sum() / counts[edges[i]:edges[i + 1]].sum().clamp_min(1))]
                       for i in range(bins)]
    return out


JOBS = [1]      # worker processes for `parallel`: study.py's --jobs


def parallel(calls: list, log=lambda s: None) -> list:
    """``fn(**kw)`` for each ``(fn, kw)`` of ``calls``, results in order; ``fn`` is a module-level
    function returning a dict, whose ``"log"`` entry (if any) is taken out and logged with the
    progress. With ``JOBS[0] > 1`` the calls run in that many spawned worker processes of one torch
    thread each (this study's models are small: two trainings on two cores do 1.9x the work of one
    training on two threads); otherwise one by one in this process. Each call seeds itself, so the
    results do not depend on the order in which the calls finish."""
    n, out = len(calls), [None] * len(calls)

    def done(i: int, r: dict, k: int) -> None:
        msg = r.pop("log", None)
        out[i] = r
        log(f"[{k}/{n}] {msg}" if msg else f"[{k}/{n}] done")
    if JOBS[0] <= 1 or n <= 1:
        for i, (fn, kw) in enumerate(calls):
            done(i, fn(**kw), i + 1)
        return out
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    with ProcessPoolExecutor(min(JOBS[0], n), mp_context=multiprocessing.get_context("spawn"),
                             initializer=_one_thread) as pool:
        futures = {pool.submit(fn, **kw): i for i, (fn, kw) in enumerate(calls)}
        for k, f in enumerate(as_completed(futures), 1):
            done(futures[f], f.result(), k)
    return out


def _one_thread() -> None:
    import torch
    torch.set_num_threads(1)


def build(v: Variant, sets: tuple[str, ...] = ()):
    """A variant's model with `sets` applied, as `nlc train` builds it (untrained)."""
    import nlc
    from nlc.runtime.overrides import load_spec, parse_sets
    cmdline, overrides = parse_sets(v.sets + tuple(sets))
    loaded = load_spec(v.spec, [o for o in overrides if "." in o.key], cmdline)
    return nlc.compile(loaded.spec)


def param_count(v: Variant, sets: tuple[str, ...] = ()) -> int:
    """The parameters of a variant's model with `sets` applied."""
    return sum(p.numel() for p in build(v, sets).parameters())


def matched(v: Variant, target: int, widths=range(32, 257, 16), sets: tuple[str, ...] = ()) -> Variant:
    """`v` at the `model.d_model` (from `widths`, divisible by its heads) whose parameter count is
    closest to `target`: the studies compare models of matched size."""
    best = None
    for d in widths:
        try:
            n = param_count(v, sets + (f"model.d_model={d}",))
        except Exception:      # a width the spec cannot take (heads, a kernel's block): skip it
            continue
        if best is None or abs(n - target) < abs(best[1] - target):
            best = (d, n)
        if n > target * 1.5:
            break
    assert best is not None, f"no width fits {v.spec}"
    return v.with_sets(*sets, f"model.d_model={best[0]}")


def mean_sd(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return math.nan, math.nan
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def fmt(m: float, sd: float | None = None, digits: int = 3) -> str:
    if m is None or not math.isfinite(m):
        return "nan"
    return f"{m:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd else "")


def machine() -> str:
    """The machine a result came from, for its table."""
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"Python {platform.python_version()}")


def commit() -> str:
    """The commit the study ran from, `-dirty` when the working tree had uncommitted changes
    (other than the studies' own results, which a run of several studies writes as it goes)."""
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True,  # noqa: E731
                                    timeout=10).stdout.strip()
    try:
        head = git("describe", "--always") or "unknown"
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ".",
                      ":!benchmarks/RESULTS.md", ":!benchmarks/results")
        return head + ("-dirty" if changed else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"

"""Reproduction studies: `python -m benchmarks.study NAME [--size toy|default]`.

Each study (`benchmarks/studies/NAME.py`) trains its variants through `nlc train`'s own loop,
scores them, and returns its results as JSON; this driver times it, writes the JSON and a PNG
plot next to RESULTS.md, and replaces the study's section of RESULTS.md with the table, the exact
command, the wall time, the machine and the date. Nothing in RESULTS.md is written by hand: the
verdict of each study is computed from its numbers by the criterion its report states.

    python -m benchmarks.study list              # the studies and what each tests
    python -m benchmarks.study recall            # one study at its default size
    python -m benchmarks.study all               # every study (see RESULTS.md for the times)
    python -m benchmarks.study recall --size toy --out /tmp/s   # the smoke size CI runs
    python -m benchmarks.study ablations --jobs 1   # one model at a time (default: one per core)
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))      # `python benchmarks/study.py` works too

from benchmarks.studies import common  # noqa: E402
from benchmarks.studies.common import commit, machine  # noqa: E402

STUDIES = ["recall", "language", "formal", "ablations", "continual", "transplant", "optimizers", "throughput"]


def load(name: str):
    return importlib.import_module(f"benchmarks.studies.{name}")


def write_atomic(path: Path, data: bytes | str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def section(name: str, study, result: dict, size: str, seconds: float, command: str) -> str:
    png = f"results/{name}.png"
    lines = [f"<!-- study:{name} -->", f"## {study.TITLE}", "",
             f"**Claim tested.** {study.CLAIM}", "",
             f"`{command}` · size `{size}` · {seconds / 60:.1f} min · {result['machine']}"
             + (f", {result['jobs']} worker processes of 1 thread" if result.get("jobs", 1) > 1 else "")
             + (f", load average {result['load']} at the end" if "load" in result else "")
             + f" · {result['date']} · commit {result['commit']}", "",
             study.report(result).rstrip(), ""]
    if result.get("plot"):
        lines += [f"![{name}]({png})", ""]
    lines += [f"<!-- /study:{name} -->"]
    return "\n".join(lines)


def update_results(md: Path, name: str, text: str) -> None:
    """Replace (or append) the study's section of RESULTS.md, keeping the others as they are."""
    head = ("# Results\n\nThe reproduction studies of `benchmarks/study.py`, each written by its own run "
            "(`python -m benchmarks.study NAME`); see `docs/studies.md` for what each one does.\n")
    old = md.read_text() if md.exists() else head
    start, end = f"<!-- study:{name} -->", f"<!-- /study:{name} -->"
    if start in old and end in old:
        a, b = old.index(start), old.index(end) + len(end)
        new = old[:a] + text + old[b:]
    else:
        sections = {n: old.find(f"<!-- study:{n} -->") for n in STUDIES}
        later = [sections[n] for n in STUDIES[STUDIES.index(name) + 1:] if sections[n] >= 0]
        at = min(later) if later else len(old)
        new = old[:at].rstrip() + "\n\n" + text + "\n\n" + old[at:].lstrip()
    write_atomic(md, new.rstrip() + "\n")


def run_one(name: str, size: str, out: Path, seeds: int | None, jobs: int, log) -> float:
    study = load(name)
    cfg = dict(study.SIZES[size])
    if seeds is not None:
        cfg["seeds"] = seeds
    jobs = jobs if getattr(study, "PARALLEL", True) else 1
    log(f"== study {name} ({size}{f', {jobs} jobs' if jobs > 1 else ''}): {study.TITLE}")
    common.JOBS[0] = jobs
    t0 = time.perf_counter()
    result = study.run(cfg, log)
    seconds = time.perf_counter() - t0
    result.update(size=size, config=cfg, seconds=seconds, machine=machine(), commit=commit(), jobs=jobs,
                  date=datetime.date.today().isoformat(), load=round(os.getloadavg()[0], 1))
    (out / "results").mkdir(parents=True, exist_ok=True)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig = study.plot(result, plt)
        path = out / "results" / f"{name}.png"
        tmp = path.with_name(path.name + ".tmp.png")
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
        plt.close(fig)
        os.replace(tmp, path)
        result["plot"] = True
    except ImportError:
        log("no plot: matplotlib is not installed (pip install matplotlib)")
        result["plot"] = False
    write_atomic(out / "results" / f"{name}.json", json.dumps(result, indent=1, default=str))
    command = f"python -m benchmarks.study {name}" + (f" --size {size}" if size != "default" else "") + \
              (f" --seeds {seeds}" if seeds is not None else "")
    update_results(out / "RESULTS.md", name, section(name, study, result, size, seconds, command))
    log(f"== {name}: {seconds / 60:.1f} min; {out / 'RESULTS.md'}, {out / 'results' / (name + '.json')}")
    return seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", help="a study, `all`, or `list`")
    p.add_argument("--size", default="default", choices=["toy", "default"],
                   help="toy: seconds, for the smoke test; default: the size RESULTS.md reports")
    p.add_argument("--seeds", type=int, default=None, help="override the study's number of seeds")
    p.add_argument("--out", type=Path, default=None, help="where RESULTS.md and results/ go [benchmarks/; "
                   "a toy run: runs/studies/toy/, so that it never replaces the reported results]")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                   help="worker processes of one torch thread each that train a study's models side by side "
                        "[the CPU count]; 1: one by one in this process (with --threads). The throughput "
                        "study always runs alone")
    p.add_argument("--rewrite", action="store_true", help="rewrite the RESULTS.md section from the saved "
                   "results/NAME.json (after a change to the report's wording), without running anything")
    a = p.parse_args(argv)
    if a.out is None:
        a.out = HERE.parent / "runs" / "studies" / "toy" if a.size == "toy" and not a.rewrite else HERE
    if a.name == "list":
        for n in STUDIES:
            print(f"{n:<12} {load(n).TITLE}")
        return 0
    names = STUDIES if a.name == "all" else [a.name]
    unknown = [n for n in names if n not in STUDIES]
    if unknown:
        print(f"error: unknown study `{unknown[0]}`; the studies are {', '.join(STUDIES)}", file=sys.stderr)
        return 2
    if a.threads:
        import torch
        torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    log = lambda s: print(s, flush=True)  # noqa: E731
    if a.rewrite:
        for n in names:
            result = json.loads((a.out / "results" / f"{n}.json").read_text())
            command = f"python -m benchmarks.study {n}" + (f" --size {result['size']}" if result["size"] != "default" else "")
            update_results(a.out / "RESULTS.md", n, section(n, load(n), result, result["size"], result["seconds"], command))
            log(f"rewrote the {n} section of {a.out / 'RESULTS.md'} from its JSON")
        return 0
    total = sum(run_one(n, a.size, a.out, a.seeds, max(1, a.jobs), log) for n in names)
    log(f"done: {len(names)} stud{'y' if len(names) == 1 else 'ies'} in {total / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())

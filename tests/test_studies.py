"""The reproduction studies (`python -m benchmarks.study NAME`): each runs end to end at its toy
size, writes its JSON, plot and RESULTS.md section; every variant spec checks, and every
ablation differs from its parent only where it says."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import study  # noqa: E402
from benchmarks.studies import ablations  # noqa: E402
from benchmarks.studies.common import VARIANTS, spec_diff  # noqa: E402


PARALLEL = ("transplant", "optimizers")    # run with worker processes here (their jobs come in rounds)


@pytest.mark.parametrize("name", study.STUDIES)
def test_each_study_runs_at_toy_size_and_writes_its_section(name, tmp_path):
    jobs = "2" if name in PARALLEL else "1"
    assert study.main([name, "--size", "toy", "--out", str(tmp_path), "--jobs", jobs]) == 0
    result = json.loads((tmp_path / "results" / f"{name}.json").read_text())
    assert result["rows"] and result["size"] == "toy" and result["seconds"] > 0
    md = (tmp_path / "RESULTS.md").read_text()
    section = md[md.index(f"<!-- study:{name} -->"):md.index(f"<!-- /study:{name} -->")]
    assert f"python -m benchmarks.study {name} --size toy" in section and "| ---" in section
    assert result["machine"] in section and result["date"] in section
    assert study.main([name, "--rewrite", "--out", str(tmp_path)]) == 0       # the section, again from the JSON
    assert (tmp_path / "RESULTS.md").read_text() == md
    pytest.importorskip("matplotlib", reason="the plots need matplotlib (in the `test` extra)")
    assert (tmp_path / "results" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_worker_processes_give_the_rows_of_one_process(tmp_path):
    """--jobs 2 trains in spawned workers of one thread each: the same models, the same numbers (up
    to float32 sums in another thread count), in the order of the calls."""
    rows = {}
    for jobs in ("1", "2"):
        assert study.main(["ablations", "--size", "toy", "--out", str(tmp_path / jobs), "--jobs", jobs]) == 0
        rows[jobs] = json.loads((tmp_path / jobs / "results" / "ablations.json").read_text())["rows"]
    assert [(r["variant"], r["seed"], r["params"]) for r in rows["1"]] == \
           [(r["variant"], r["seed"], r["params"]) for r in rows["2"]]
    for a, b in zip(rows["1"], rows["2"]):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"]), (a, b)
    assert "2 worker processes of 1 thread" in (tmp_path / "2" / "RESULTS.md").read_text()


def test_a_study_replaces_only_its_own_section(tmp_path):
    md = tmp_path / "RESULTS.md"
    study.update_results(md, "formal", "<!-- study:formal -->\nA\n<!-- /study:formal -->")
    study.update_results(md, "recall", "<!-- study:recall -->\nB\n<!-- /study:recall -->")
    study.update_results(md, "formal", "<!-- study:formal -->\nC\n<!-- /study:formal -->")
    text = md.read_text()
    assert "B" in text and "C" in text and "\nA\n" not in text
    assert text.index("study:recall") < text.index("study:formal")     # in the order of STUDIES


def test_unknown_study_is_an_error(capsys):
    assert study.main(["nope"]) == 2
    assert "unknown study `nope`" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted(VARIANTS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_variant_spec_checks(path):
    from typer.testing import CliRunner
    from nlc.runtime.cli import app
    r = CliRunner().invoke(app, ["check", str(path)])
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("name", [a for a, _ in ablations.ABLATIONS])
def test_each_ablation_changes_its_parent_in_one_place(name):
    diff = spec_diff(VARIANTS / f"{name}.yaml", VARIANTS / f"{ablations.PARENT}.yaml")
    changed = [ln for ln in diff.splitlines()[2:] if "name:" not in ln]
    assert changed, f"{name} is its parent"
    assert len(changed) <= 8, f"{name} changes more than one thing:\n{diff}"
    assert any("ablation" in ln for ln in changed if ln.startswith("+")) or len(changed) <= 3, \
        f"{name}: the changed line says what the ablation is"

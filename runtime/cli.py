"""The `nlc` command. Every user mistake ends as located diagnostics and exit status 2, never a
traceback; outputs are written atomically. Heavy imports (torch) happen only in the commands
that need them, so `nlc check` stays fast. `nlc train` is made in runtime/cli_train.py, and the
exit statuses and `_fail` are runtime/cli_errors.py's."""
from __future__ import annotations

import errno
import json
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer

from nlc.runtime.cli_errors import EXIT_USER, _fail, _run_errors
from nlc.runtime.cli_train import TRAIN_EPILOG, _flag, _task_help, train

__all__ = ["app", "main", "_flag"]   # (_flag: tests import it from here)

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="nlc: the Nested Learning compiler. Check, draw, explain and build specs of nested levels.")


def _load(path: Path):
    from nlc.loader import load_located
    return load_located(path)


@app.command(epilog="\b\nExample:\n  nlc check specs/hope.yaml specs/m3.nl")
def check(specs: List[Path] = typer.Argument(..., help="spec files (.yaml, .yml or .nl)"),
          quiet: bool = typer.Option(False, "--quiet", "-q", help="print errors only")):
    """Check specs: parse, validate and run every semantic check; report all errors of each file."""
    from nlc.diagnostics import SpecError
    failed = 0
    for path in specs:
        t0 = time.perf_counter()
        try:
            loaded = _load(path)
        except SpecError as e:
            failed += 1
            typer.echo(e.render(), err=True)
            continue
        for w in loaded.warnings:
            typer.echo(w.render(loaded.source), err=True)
        if not quiet:
            spec = loaded.spec
            what = (f"model `{spec.name}`: {len(spec.levels)} levels" if hasattr(spec, "levels")
                    else f"optimizer `{spec.name}`: {len(spec.groups)} parameter groups")
            typer.echo(f"ok  {path}  ({what}, {1000 * (time.perf_counter() - t0):.0f} ms)")
    if failed:
        raise typer.Exit(EXIT_USER)


@app.command(epilog="\b\nExamples:\n  nlc graph specs/hope.yaml -o hope.svg\n  nlc graph specs/m3.yaml -o m3.png\n"
                    "  nlc graph specs/titans.nl --dump")
def graph(spec: Path = typer.Argument(..., help="a spec file"),
          output: Optional[Path] = typer.Option(None, "--output", "-o", help="a .dot, .svg or .png file; "
                                                "without it the DOT text is printed"),
          dump: bool = typer.Option(False, "--dump", help="print the level graph as text instead")):
    """Draw the level graph: clock domains as clusters, levels with kind and frequency, the five flow
    kinds in their own colours, delayed edges dashed."""
    from nlc.graph import lower
    from nlc.viz import RenderError, render, to_dot
    g = lower(spec)
    if dump:
        typer.echo(g.dump())
        return
    if output is None:
        typer.echo(to_dot(g), nl=False)
        return
    try:
        render(g, output)
    except (RenderError, OSError) as e:
        _fail(str(e))
    typer.echo(f"wrote {output}")


@app.command(epilog="\b\nExample:\n  nlc explain specs/titans.yaml > titans.md")
def explain(spec: Path = typer.Argument(..., help="a spec file"),
            output: Optional[Path] = typer.Option(None, "--output", "-o", help="write the Markdown here"),
            backend: str = typer.Option("auto", "--backend", metavar="torch|triton|auto",
                                        help="whose placement the last section describes (models compile with auto)")):
    """Print each level's objective and its derived update rule, as Markdown with LaTeX, and what
    runs each level and flow on the chosen backend."""
    from nlc import spec as S
    from nlc.backends.dispatch import BACKENDS
    from nlc.rules import explain as _explain
    if backend not in BACKENDS:
        _fail(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    loaded = _load(spec).spec
    text = _explain(loaded)
    if isinstance(loaded, S.ModelSpec):
        from nlc.backends.triton.plan import describe
        text = text.rstrip("\n") + "\n\n" + describe(loaded, backend)
    if output is None:
        typer.echo(text)
    else:
        from nlc.fileio import atomic_write
        try:
            atomic_write(output, text)
        except OSError as e:
            _fail(f"cannot write {output}: {e.strerror or e}")
        typer.echo(f"wrote {output}")


@app.command(epilog="\b\nExample:\n  nlc build specs/hope.yaml -o build/hope\n  python -c \"import sys; sys.path.insert(0, 'build/hope'); import model; print(model.Model())\"")
def build(spec: Path = typer.Argument(..., help="a model spec file"),
          output: Path = typer.Option(..., "--output", "-o", help="the directory to write into"),
          backend: str = typer.Option("torch", "--backend", metavar="torch|triton|auto",
                                      help="triton or auto: also write each served level's Triton "
                                           "kernels (kernels/LEVEL.py) and each fused flow's "
                                           "(kernels/flows/CHAIN.py), and say which levels run on torch and why")):
    """Generate the model: readable torch source (model.py), manifest.json and graph.svg, and with
    --backend triton the levels' and the fused flows' Triton kernels. The same spec gives the same bytes."""
    from nlc.backends.dispatch import BACKENDS
    from nlc.backends.torch.codegen import build as _build
    if backend not in BACKENDS:
        _fail(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if output.exists() and not output.is_dir():
        _fail(f"{output} is a file: -o takes the directory to write model.py, manifest.json and graph.svg into")
    try:
        files = _build(spec, output, backend)
    except TypeError as e:
        _fail(str(e))
    except OSError as e:
        _fail(f"cannot write {output}: {e.strerror or e}")
    for f in files:
        typer.echo(f"wrote {f}")
    if backend != "torch":
        manifest = json.loads((output / "manifest.json").read_text())
        for name, p in manifest["placement"].items():
            where = (f"Triton, skeleton {p['skeleton']} -> {p['file']}" if p["runs_on"] == "triton"
                     else f"torch ({p['why']})")
            if backend == "auto" and "auto" in p:
                where += f" ({p['auto']})"
            typer.echo(f"level {name}: {where}")
        on = " (on CUDA tensors)" if backend == "auto" else ""
        for f in manifest["fused_flows"].values():
            typer.echo(f"flow {', '.join(f['flows'])}: {f['chain']}, Triton{on}, skeleton flow_prologue -> {f['file']}")


app.command(epilog=TRAIN_EPILOG)(train)   # `nlc train`: runtime/cli_train.py


@app.command(epilog="\b\nExamples:\n  nlc verify specs/gated_deltanet.yaml\n  nlc verify specs/titans.nl --backend torch --tokens 40")
def verify(spec: Path = typer.Argument(..., help="a model spec file"),
           backend: str = typer.Option("triton", "--backend", metavar="torch|triton",
                                       help="torch: recurrent vs chunked only; triton: the Triton kernels too"),
           dtype: str = typer.Option("float64", "--dtype", metavar="float64|float32",
                                     help="float64 (tolerance 1e-8) or float32 (1e-3)"),
           tokens: Optional[int] = typer.Option(None, "--tokens", help="sequence length [two chunks and 3 tokens]"),
           seed: int = typer.Option(0, "--seed", help="seeds the weights and the inputs")):
    """Check the compiled forms of every level against each other: recurrent (the oracle), torch
    chunked and Triton, on logits, final states and parameter gradients, from random inputs.
    Prints a table of errors per level; exit status 1 when any error is over the tolerance."""
    import torch

    from nlc.runtime.verify import render, verify as _verify
    if backend not in ("torch", "triton"):
        _fail(f"--backend must be torch or triton, got {backend!r}")
    dtypes = {"float64": torch.float64, "float32": torch.float32}
    if dtype not in dtypes:
        _fail(f"--dtype must be float64 or float32, got {dtype!r}")
    if tokens is not None and tokens < 1:
        _fail(f"--tokens must be at least 1, got {tokens}")
    loaded = _load(spec)
    if not hasattr(loaded.spec, "levels"):
        from nlc.loader import not_a_model
        _fail(not_a_model(spec, loaded.spec.name, "verify"))
    from nlc.backends.torch.codegen import Unsupported
    try:
        rows, facts = _verify(loaded.spec, backend, dtypes[dtype], tokens, seed)
    except Unsupported as e:
        raise e.located(loaded) from None
    except ValueError as e:   # a backend that cannot run here (no usable Triton, say)
        _fail(str(e))
    typer.echo(render(rows, facts, loaded.spec.name))
    bad = [r for r in rows if not r.ok]
    if bad:
        typer.echo(f"FAILED: {len(bad)} comparison(s) over the tolerance", err=True)
        raise typer.Exit(1)


@app.command(epilog="\b\nExample:\n  nlc schema > nlc-spec.schema.json   (point your editor's YAML plugin at it)")
def schema():
    """Print the JSON schema of the YAML form of a spec (model or optimizer), for editors."""
    from nlc.schema import json_schema
    typer.echo(json.dumps(json_schema(), indent=2))


@app.command("eval", epilog="\b\nExamples:\n  nlc eval runs/titans\n  nlc eval runs/titans --task mqar:pairs=32 --context 512 --batches 20\n"
                            "  nlc eval runs/titans-text/ckpt-00002000.json --data other.txt --out titans-other.json")
def eval_cmd(target: Path = typer.Argument(..., metavar="RUN_DIR|CKPT", help="a run directory (its newest checkpoint) "
                                           "or a checkpoint, DIR/ckpt-STEP.json (or its .safetensors)"),
             task: Optional[str] = typer.Option(None, "--task", metavar="NAME[:KEY=VALUE,...]", is_eager=True,
                                                callback=lambda value: _task_help(value),
                                                help="evaluate on this synthetic task [the run's data or task]"),
             data: Optional[Path] = typer.Option(None, "--data", help="evaluate on this text (its last 10%) [the run's]"),
             context: Optional[int] = typer.Option(None, "--context", help="tokens per sequence [the run's]"),
             batches: int = typer.Option(8, "--batches", help="validation batches"),
             batch: Optional[int] = typer.Option(None, "--batch", help="sequences per batch [the run's]"),
             pieces: int = typer.Option(4, "--pieces", help="cut each sequence into this many pieces to compare the "
                                        "state carried across them with the state reset at each; 1: no pieces"),
             device: str = typer.Option("auto", "--device", help="cpu, cuda, cuda:N or auto"),
             out: Optional[Path] = typer.Option(None, "--out", help="write the JSON here (a file, or a directory for "
                                                "eval.json) [RUN_DIR/eval.json]"),
             progress_every: int = typer.Option(10, "--progress-every", help="a progress line on stderr every N "
                                                "batches; 0: none")):
    """Evaluate a trained model on the validation split: loss, perplexity, exact accuracy (tasks) and
    tokens/s, for each sequence whole, in pieces with the state carried, in pieces with the state
    reset (without its in-context memory across pieces), and for a CMS model with its CMS updates
    off. Prints a table and writes eval.json atomically. Loads nothing but JSON and safetensors."""
    from nlc.runtime import evaluate as E
    user, oom = _run_errors()
    try:
        run = E.load_run(target, device)
        path = E.output_path(run.dir, out)
        result = E.evaluate(run, data=data, task=task, context=context, batches=batches, batch=batch, pieces=pieces,
                            progress_every=progress_every, progress=lambda s: typer.echo(s, err=True))
        E.write(result, path)
    except user as e:
        _fail(str(e))
    except oom:
        _fail("out of memory: lower --batch or --context")
    except ValueError as e:        # an op's precondition, such as a retention gate at 0 (weights gone bad)
        _fail(f"the model cannot run on this data: {e}")
    except OSError as e:
        _fail(f"cannot write {e.filename or 'eval.json'}: {e.strerror or e}")
    except KeyboardInterrupt:
        typer.echo("interrupted: nothing written", err=True)
        raise typer.Exit(130)
    typer.echo(E.table(result))
    typer.echo(f"wrote {path}")


@app.command("sample", epilog="\b\nExamples:\n  nlc sample runs/titans-text --prompt 'The ' --tokens 200 --temperature 0.8 --top-k 40\n"
                              "  nlc sample runs/titans --prompt '5 70 9 74 5' --tokens 1 --temperature 0   (a task model: ids)")
def sample_cmd(target: Path = typer.Argument(..., metavar="RUN_DIR|CKPT", help="a run directory (its newest "
                                             "checkpoint) or a checkpoint, DIR/ckpt-STEP.json"),
               prompt: str = typer.Option(..., "--prompt", help="text (a text model reads its UTF-8 bytes) or, for a "
                                          "model trained on a task, token ids such as '3 17 0'"),
               tokens: int = typer.Option(100, "--tokens", help="tokens to generate"),
               temperature: float = typer.Option(1.0, "--temperature", help="0: always the most likely token"),
               top_k: int = typer.Option(0, "--top-k", help="draw from the k most likely tokens only; 0: all"),
               seed: int = typer.Option(0, "--seed", help="seeds the draws"),
               device: str = typer.Option("auto", "--device", help="cpu, cuda, cuda:N or auto")):
    """Generate from a trained model: the prompt in one forward pass (a chunked prefill), then token
    by token with the state carried, each token printed as it comes (text as UTF-8, a task model's
    token ids as numbers). Notes and timings go to stderr."""
    from nlc.runtime import evaluate as E
    from nlc.runtime.sample import sample as _sample
    user, oom = _run_errors()
    try:
        run = E.load_run(target, device)
        r = _sample(run, prompt, tokens, temperature, top_k, seed, emit=lambda s: typer.echo(s, nl=False),
                    note=lambda s: typer.echo(s, err=True))
    except user as e:
        _fail(str(e))
    except oom:
        _fail("out of memory: a shorter --prompt or fewer --tokens")
    except ValueError as e:
        _fail(f"the model cannot run on this prompt: {e}")
    except KeyboardInterrupt:
        typer.echo("", err=True)
        raise typer.Exit(130)
    rate = f", then {r['tokens_per_s']:,.1f} tokens/s" if r["tokens_per_s"] else ""
    typer.echo(f"sampled {len(r['ids'])} tokens from `{run.spec.name}` at step {run.step} ({run.checkpoint}): prompt of "
               f"{r['prefill_tokens']} tokens in {r['prefill_s']:.2f} s{rate}", err=True)


def main() -> None:
    """Console entry point: user mistakes become diagnostics and exit status 2 (usage errors too)."""
    from nlc.diagnostics import SpecError
    try:
        app()  # standalone: click reports usage errors with status 2; typer.Exit keeps its code
    except SpecError as e:
        typer.echo(e.render(), err=True)
        sys.exit(EXIT_USER)
    except OSError as e:          # the output itself cannot be written: a full disk, a closed pipe
        if e.errno not in (errno.ENOSPC, errno.EPIPE, errno.EIO, errno.EBADF):
            raise
        try:
            sys.stderr.write(f"error: cannot write the output: {e.strerror or e}\n")
        except OSError:
            pass
        os._exit(EXIT_USER)       # not sys.exit: flushing stdout again would fail the same way


if __name__ == "__main__":
    main()

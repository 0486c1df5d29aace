"""The `nlc` command. Every user mistake ends as located diagnostics and exit status 2, never a
traceback; outputs are written atomically. Heavy imports (torch) happen only in the commands
that need them, so `nlc check` stays fast."""
from __future__ import annotations

import errno
import json
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="nlc: the Nested Learning compiler. Check, draw, explain and build specs of nested levels.")

EXIT_USER = 2


class UserError(Exception):
    """A mistake of the user's that is not in a spec (a bad output path, say)."""


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(EXIT_USER)


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
                                           "kernels (kernels/LEVEL.py) and say which levels run on torch and why")):
    """Generate the model: readable torch source (model.py), manifest.json and graph.svg, and with
    --backend triton the levels' Triton kernels. The same spec gives the same bytes."""
    from nlc.backends.dispatch import BACKENDS
    from nlc.backends.torch.codegen import build as _build
    if backend not in BACKENDS:
        _fail(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    try:
        files = _build(spec, output, backend)
    except TypeError as e:
        _fail(f"{spec}: {e}")
    except OSError as e:
        _fail(f"cannot write {output}: {e.strerror or e}")
    for f in files:
        typer.echo(f"wrote {f}")
    if backend != "torch":
        placement = json.loads((output / "manifest.json").read_text())["placement"]
        for name, p in placement.items():
            where = (f"Triton, skeleton {p['skeleton']} -> {p['file']}" if p["runs_on"] == "triton"
                     else f"torch ({p['why']})")
            if "backward" in p:
                where += f"; {p['backward']}"
            if backend == "auto" and "auto" in p:
                where += f" ({p['auto']})"
            typer.echo(f"level {name}: {where}")


TRAIN_EPILOG = ("\b\nExamples:\n  nlc train specs/transformer.yaml --steps 20 --set model.d_model=64\n"
                "  nlc train specs/hope.yaml --task recall --context 256 --set lr=1e-3\n"
                "  nlc train specs/titans.yaml --task mqar:pairs=32,queries=16 --context 256 --lr-schedule cosine --warmup 50\n"
                "  nlc train --task help   (the tasks and their options)\n"
                "  nlc train specs/titans.yaml --data input.txt --steps 2000 --out runs/titans-text\n"
                "  nlc train specs/titans.yaml --data input.txt --steps 4000 --out runs/titans-text --resume\n"
                "  torchrun --nproc_per_node 2 -m nlc.runtime.cli train specs/titans.yaml --batch 32   (data-parallel)")
EXIT_DIVERGED = 3


def train(**given):
    """Train the compiled model of a spec with the optimizer the spec names. Logs a line every
    --log-every steps, evaluates every --eval-every steps, saves a checkpoint (DIR/ckpt-STEP.safetensors
    and .json, atomically; the newest --keep are kept) every --save-every steps and at the end;
    Ctrl-C saves before it exits. Under torchrun it trains data-parallel (DDP: gloo on CPU, NCCL on
    CUDA): each process takes its share of each batch, and process 0 logs, evaluates and saves."""
    from pydantic import ValidationError
    from nlc.runtime.progress import Console
    from nlc.runtime.train import Diverged, TrainError, resolve, train as _train
    # the options given (a flag's False is given too: --resume, --compile are never a checkpoint's)
    explicit = {k: (tuple(v) if isinstance(v, list) else v) for k, v in given.items()
                if v is not None and v != []}
    try:
        cfg = resolve(explicit)
    except ValidationError as e:  # a setting out of its range, e.g. --steps 0
        err = e.errors()[0]
        _fail(f"--{_flag(str(err['loc'][0]))}: {err['msg'][0].lower() + err['msg'][1:]}")
    except TrainError as e:
        _fail(str(e))
    _, oom = _run_errors()
    console = Console()      # on a terminal, a progress bar under the log lines
    try:
        summary = _train(cfg, log=console.log, progress=console.step)
    except Diverged as e:
        console.close()
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(EXIT_DIVERGED)
    except TrainError as e:
        console.close()
        _fail(str(e))
    except oom:
        console.close()
        _fail("out of memory: lower --batch or --context, or train a smaller model (--set model.d_model=...)")
    except OSError as e:
        console.close()
        _fail(f"cannot write the run's files: {e.strerror or e}")
    console.close()
    if summary["interrupted"]:
        raise typer.Exit(130)


def _flag(field: str) -> str:
    """The option of a TrainConfig field, without its dashes (`sets`: `set`)."""
    from nlc.runtime.train import TrainConfig
    how = (TrainConfig.model_fields[field].json_schema_extra or {}).get("cli", {}) if field in TrainConfig.model_fields else {}
    return how.get("flag", "--" + field.replace("_", "-"))[2:]


def _train_signature():
    """`nlc train`'s parameters, one per TrainConfig field (its description the help, `{default}` its
    default): the options are declared once, in runtime/train.py. Every option defaults to None (or
    False, [] for a flag or --set), so that `resolve` can tell the given ones from the checkpoint's."""
    import inspect
    import typing

    from nlc.runtime.train import TrainConfig
    params, hints = [], {}
    for name, field in TrainConfig.model_fields.items():
        how = (field.json_schema_extra or {}).get("cli", {})
        if not how.get("cli", True):
            continue
        text = field.description.format(default=field.default)
        kind = field.annotation
        if typing.get_origin(kind) in (typing.Union, __import__("types").UnionType):
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        if typing.get_origin(kind) is typing.Literal:
            kind = str
        if name == "spec":
            info, hint = typer.Argument(..., help=text), kind
        elif kind is bool:
            info, hint = typer.Option(False, how.get("flag", f"--{name.replace('_', '-')}"), help=text), bool
        elif typing.get_origin(kind) is tuple:
            info, hint = typer.Option([], how["flag"], metavar=how.get("metavar"), help=text), List[str]
        else:
            extra = dict(is_eager=True, callback=lambda value: _task_help(value)) if how.get("eager") else {}
            info = typer.Option(None, how.get("flag", f"--{name.replace('_', '-')}"), metavar=how.get("metavar"),
                                help=text, **extra)
            hint = Optional[kind]
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=hint))
        hints[name] = hint
    return inspect.Signature(params), hints


train.__signature__, train.__annotations__ = _train_signature()
app.command(epilog=TRAIN_EPILOG)(train)


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
        _fail(f"{spec}: `{loaded.spec.name}` is an optimizer spec; `nlc verify` checks model specs")
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



def _run_errors():
    """The errors a run's evaluation or sampling turns into exit status 2 (torch imported lazily)."""
    import torch
    from nlc.runtime.evaluate import EvalError
    return EvalError, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))


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


def _task_help(value: Optional[str]) -> Optional[str]:
    """`nlc train --task help`: print the synthetic tasks with their options and exit 0."""
    if value == "help":
        from nlc.runtime.tasks import help_text
        typer.echo(help_text())
        raise typer.Exit(0)
    return value


if __name__ == "__main__":
    main()

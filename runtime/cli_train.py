"""`nlc train`, the command: its options, made from the fields of `TrainConfig`
(`nlc.runtime.train_config`), and how the run's mistakes end (exit status 2, or 3 for a run that
diverged); and `--task help` (`_task_help`, which `nlc eval --task` shares). runtime/cli.py adds
the command to the `nlc` app."""
from __future__ import annotations

from typing import List, Optional

import typer

from nlc.runtime.cli_errors import EXIT_DIVERGED, _fail, _run_errors


TRAIN_EPILOG = ("\b\nExamples:\n  nlc train specs/transformer.yaml --steps 20 --set model.d_model=64\n"
                "  nlc train specs/hope.yaml --task recall --context 256 --set lr=1e-3\n"
                "  nlc train specs/titans.yaml --task mqar:pairs=32,queries=16 --context 256 --lr-schedule cosine --warmup 50\n"
                "  nlc train --task help   (the tasks and their options)\n"
                "  nlc train specs/titans.yaml --data input.txt --steps 2000 --out runs/titans-text\n"
                "  nlc train specs/titans.yaml --data input.txt --steps 4000 --out runs/titans-text --resume\n"
                "  torchrun --nproc_per_node 2 -m nlc.runtime.cli train specs/titans.yaml --batch 32   (data-parallel)")


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
    from nlc.runtime.train_config import TrainConfig
    how = (TrainConfig.model_fields[field].json_schema_extra or {}).get("cli", {}) if field in TrainConfig.model_fields else {}
    return how.get("flag", "--" + field.replace("_", "-"))[2:]


def _train_signature():
    """`nlc train`'s parameters, one per TrainConfig field (its description the help, `{default}` its
    default): the options are declared once, in runtime/train_config.py. Every option defaults to
    None (or False, [] for a flag or --set), so that `resolve` can tell the given ones from the
    checkpoint's."""
    import inspect
    import typing

    from nlc.runtime.train_config import TrainConfig
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


def _task_help(value: Optional[str]) -> Optional[str]:
    """`nlc train --task help`: print the synthetic tasks with their options and exit 0."""
    if value == "help":
        from nlc.runtime.tasks import help_text
        typer.echo(help_text())
        raise typer.Exit(0)
    return value


train.__signature__, train.__annotations__ = _train_signature()

"""How the `nlc` command ends on a mistake: the exit statuses (2 for a user's mistake, 3 for a run
that diverged), `_fail` (an `error:` line on stderr, then exit 2), and the errors that a run's
evaluation or sampling turns into exit status 2 (`_run_errors`). runtime/cli.py and
runtime/cli_train.py share them."""
from __future__ import annotations

import typer

EXIT_USER = 2
EXIT_DIVERGED = 3


class UserError(Exception):
    """A mistake of the user's that is not in a spec (a bad output path, say)."""


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(EXIT_USER)


def _run_errors():
    """The errors a run's evaluation or sampling turns into exit status 2 (torch imported lazily)."""
    import torch
    from nlc.runtime.evaluate import EvalError
    return EvalError, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))

"""The `nlc` command. Every user mistake ends as located diagnostics and exit status 2, never a
traceback; outputs are written atomically. Heavy imports (torch) happen only in the commands
that need them, so `nlc check` stays fast."""
from __future__ import annotations

import json
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
            output: Optional[Path] = typer.Option(None, "--output", "-o", help="write the Markdown here")):
    """Print each level's objective and its derived update rule, as Markdown with LaTeX."""
    from nlc.rules import explain as _explain
    text = _explain(_load(spec).spec)
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
          output: Path = typer.Option(..., "--output", "-o", help="the directory to write into")):
    """Generate the model: readable torch source (model.py), manifest.json and graph.svg.
    The same spec gives the same bytes."""
    from nlc.backends.torch.codegen import Unsupported, build as _build
    try:
        files = _build(spec, output)
    except Unsupported as e:
        _fail(f"{spec}: {e}")
    except TypeError as e:
        _fail(f"{spec}: {e}")
    except OSError as e:
        _fail(f"cannot write {output}: {e.strerror or e}")
    for f in files:
        typer.echo(f"wrote {f}")


@app.command(epilog="\b\nExample:\n  nlc schema > nlc-spec.schema.json   (point your editor's YAML plugin at it)")
def schema():
    """Print the JSON schema of the YAML form of a spec (model or optimizer), for editors."""
    from nlc.schema import json_schema
    typer.echo(json.dumps(json_schema(), indent=2))


def main() -> None:
    """Console entry point: user mistakes become diagnostics and exit status 2 (usage errors too)."""
    from nlc.diagnostics import SpecError
    try:
        app()  # standalone: click reports usage errors with status 2; typer.Exit keeps its code
    except SpecError as e:
        typer.echo(e.render(), err=True)
        sys.exit(EXIT_USER)


if __name__ == "__main__":
    main()

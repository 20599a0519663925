"""How the command lines (`aligner`, `probe`) report what went wrong with a file, a setting or a model."""

import contextlib
from typing import Iterator

import typer


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """Print what went wrong with a file, a setting or a model as one line, and exit with status 1.
    (NotImplementedError: a model whose layers the aligner cannot read.)"""
    try:
        yield
    except (OSError, ValueError, ImportError, FloatingPointError, NotImplementedError) as err:
        typer.secho(f"Error: {err}", err=True, fg=typer.colors.RED)
        raise typer.Exit(1) from None

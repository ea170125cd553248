"""How the CLI talks to people: results on stdout, progress and errors on stderr, one error path."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from apex_cli.errors import ApexError

stdout = Console()
stderr = Console(stderr=True)

P = ParamSpec("P")
R = TypeVar("R")


def user_errors(command: Callable[P, R]) -> Callable[P, R]:
    """Turn an ApexError into one red line plus a hint and its exit code, 1 (``APEX_DEBUG=1`` re-raises)."""

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except ApexError as err:
            if os.environ.get("APEX_DEBUG"):
                raise
            label = "[bold yellow]Stopped:[/]" if err.exit_code == 130 else "[bold red]Error:[/]"
            # Messages quote user input, e.g. "time_dist [a, b, s]": escaped, or rich would take it for markup.
            stderr.print(f"{label} {escape(str(err))}", highlight=False, soft_wrap=True)
            if err.hint:
                stderr.print(f"[dim]Hint: {escape(err.hint)}[/]", highlight=False, soft_wrap=True)
            raise typer.Exit(code=err.exit_code) from None
        except KeyboardInterrupt:
            stderr.print("[yellow]Interrupted.[/]")
            raise typer.Exit(code=130) from None

    return wrapper

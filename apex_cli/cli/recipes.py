"""`apex recipes list | show`: the built-in recipes, to run as they are or to copy and edit."""

from __future__ import annotations

from typing import Annotated

import typer
import yaml
from rich.table import Table

from apex_cli.cli._output import stdout, user_errors
from apex_cli.config import builtin_recipes, find_recipe

app = typer.Typer(help="List and show the built-in recipes.", no_args_is_help=True)


@app.command("list")
@user_errors
def list_recipes() -> None:
    """List the built-in recipes, one line each.

    Example: apex recipes list
    """
    table = Table(show_header=True, header_style="bold")
    table.add_column("recipe")
    table.add_column("description")
    for name, text in builtin_recipes().items():
        table.add_row(name, (yaml.safe_load(text) or {}).get("description", ""))
    stdout.print(table)


@app.command("show")
@user_errors
def show_recipe(name: Annotated[str, typer.Argument(help="Built-in recipe name (see `apex recipes list`).")]) -> None:
    """Print a recipe with its comments, to copy and edit.

    Example: apex recipes show toy2d-apex > my-recipe.yaml
    """
    typer.echo(find_recipe(name)[1], nl=False)

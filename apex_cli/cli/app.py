"""The `apex` command: one Typer app, one module per subcommand."""

from __future__ import annotations

import typer

from apex_cli import __version__
from apex_cli.cli import eval as eval_cli
from apex_cli.cli import export as export_cli
from apex_cli.cli import recipes
from apex_cli.cli import sample as sample_cli
from apex_cli.cli.distill import EXAMPLES, distill

app = typer.Typer(
    name="apex",
    help="Turn multi-step text-to-image flow models into one-step generators (APEX), and measure the result.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # locals can be multi-GB tensors
    add_completion=False,
    rich_markup_mode="rich",
)
app.command(no_args_is_help=True, epilog=EXAMPLES)(distill)
app.command(no_args_is_help=True, epilog=sample_cli.EXAMPLES)(sample_cli.sample)
app.command(no_args_is_help=True, epilog=export_cli.EXAMPLES)(export_cli.export)
app.add_typer(eval_cli.app, name="eval")
app.add_typer(recipes.app, name="recipes")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"apex {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
) -> None:
    """Turn multi-step text-to-image flow models into one-step generators (APEX), and measure the result."""


def main() -> None:
    """Console-script entry point."""
    app()

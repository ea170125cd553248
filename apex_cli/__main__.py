"""`python -m apex_cli` runs the CLI."""

from apex_cli.cli.app import main

main()

"""The measured tables of docs/benchmarks.md, rewritten by the benchmark scripts that measure them.

A script prints its results as rich tables; :func:`to_markdown` renders the same table objects as Markdown and
:func:`replace_block` writes them between two marker comments of the page, so the page's numbers are always the
last full run's, never typed by hand::

    <!-- bench:quality -->
    ...replaced...
    <!-- /bench:quality -->
"""

from __future__ import annotations

import re
from pathlib import Path

from rich.table import Table
from rich.text import Text

from apex_cli.errors import ApexError
from apex_cli.train.checkpoint import atomic_write_text

DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def _plain(value: object) -> str:
    text = value.plain if isinstance(value, Text) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(table: Table) -> str:
    """A rich table as a Markdown table: its title in bold above, its caption in italics below."""
    headers = [_plain(column.header) for column in table.columns]
    aligns = ["---" if column.justify == "left" else "--:" for column in table.columns]
    columns = [[_plain(cell) for cell in column.cells] for column in table.columns]
    lines = [f"**{_plain(table.title)}**", ""] if table.title else []
    lines += ["| " + " | ".join(headers) + " |", "|" + "|".join(aligns) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in zip(*columns, strict=True)]
    if table.caption:
        lines += ["", f"_{_plain(table.caption)}_"]
    return "\n".join(lines)


def replace_block(name: str, body: str, path: Path = DOCS) -> None:
    """Replace what lies between ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->`` in ``path`` (atomically).

    Raises:
        ApexError: If the page or either marker is missing.
    """
    if not path.is_file():
        raise ApexError(f"{path} does not exist", hint="run from a checkout of apex (docs/benchmarks.md)")
    text = path.read_text()
    pattern = re.compile(rf"(<!-- bench:{re.escape(name)} -->\n).*?(<!-- /bench:{re.escape(name)} -->)", re.S)
    if not pattern.search(text):
        raise ApexError(
            f"{path} has no '<!-- bench:{name} -->' ... '<!-- /bench:{name} -->' block",
            hint="restore the markers from git (git checkout docs/benchmarks.md)",
        )
    atomic_write_text(path, pattern.sub(lambda m: m.group(1) + body.rstrip("\n") + "\n" + m.group(2), text, count=1))

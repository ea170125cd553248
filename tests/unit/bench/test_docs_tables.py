"""bench/docs_tables.py: the benchmark scripts write their own tables into docs/benchmarks.md."""

import importlib.util
from pathlib import Path

import pytest
from rich.table import Table

from apex_cli.errors import ApexError

_SPEC = importlib.util.spec_from_file_location("docs_tables", Path(__file__).parents[3] / "bench" / "docs_tables.py")
docs_tables = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(docs_tables)


def _table():
    table = Table(title="speed", caption="median of 5")
    table.add_column("method", justify="left")
    table.add_column("x dmd2", justify="right")
    table.add_row("apex", "0.66")
    table.add_row("a|b", "1.00")
    return table


def test_a_rich_table_becomes_markdown_with_its_title_alignment_and_caption():
    expected = "**speed**\n\n| method | x dmd2 |\n|---|--:|\n| apex | 0.66 |\n| a\\|b | 1.00 |\n\n_median of 5_"
    assert docs_tables.to_markdown(_table()) == expected


def test_only_the_named_block_is_replaced(tmp_path):
    page = tmp_path / "benchmarks.md"
    page.write_text(
        "# B\n<!-- bench:a -->\nold a\n<!-- /bench:a -->\nprose\n<!-- bench:b -->\nold b\n<!-- /bench:b -->\n"
    )
    docs_tables.replace_block("a", "new a\n", page)
    docs_tables.replace_block("a", "newer a", page)  # the markers survive, so a second run replaces again
    expected = "# B\n<!-- bench:a -->\nnewer a\n<!-- /bench:a -->\nprose\n<!-- bench:b -->\nold b\n<!-- /bench:b -->\n"
    assert page.read_text() == expected


def test_a_missing_block_is_named(tmp_path):
    page = tmp_path / "benchmarks.md"
    page.write_text("# B\n")
    with pytest.raises(ApexError, match="no '<!-- bench:quality -->'"):
        docs_tables.replace_block("quality", "x", page)
    assert page.read_text() == "# B\n"


def test_the_page_carries_every_block_the_scripts_write():
    text = docs_tables.DOCS.read_text()
    for name in ("quality", "speed-training", "speed-sampling"):
        assert f"<!-- bench:{name} -->" in text and f"<!-- /bench:{name} -->" in text

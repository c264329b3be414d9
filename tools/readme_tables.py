"""Rewrite the column tables of README.md from the columns' one definition.

Each CSV's columns are defined as data beside the analysis that fills them
(:func:`dcn_inspect.commands.csv_files`); the README marks where each table goes with
``<!-- columns FILE -->`` ... ``<!-- /columns -->``. ``make readme-tables`` runs this;
``cli_tests/commands/test_csv_outputs.py`` fails when the README is out of date.

    .venv/bin/python tools/readme_tables.py [README.md]
"""

from __future__ import annotations

import sys
from pathlib import Path

from dcn_inspect.commands import csv_files
from dcn_inspect.core.columns import fill_markdown_tables


def main(argv: list) -> None:
    path = Path(argv[0]) if argv else Path(__file__).resolve().parents[1] / "README.md"
    text = path.read_text(encoding="utf-8")
    updated = fill_markdown_tables(text, csv_files())
    if updated != text:
        path.write_text(updated, encoding="utf-8")
        print(f"{path}: column tables updated")
    else:
        print(f"{path}: column tables up to date")


if __name__ == "__main__":
    main(sys.argv[1:])

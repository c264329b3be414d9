"""The README's measured numbers are the code's current output: the dilation table (with the
differences its paragraph quotes) and the Fig. 7 foreground table, recomputed from the bundled
weights and demo dataset, must appear in the README as the commands print them."""

from __future__ import annotations

import re
from pathlib import Path
from typing import List

from dcn_inspect.commands.bins import bins
from dcn_inspect.commands.dilation_stats import dilation_stats

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DEMO = ROOT / "dcn_inspect" / "data" / "demo" / "annotations.json"


def _tables(markdown: str) -> List[List[str]]:
    """Every Markdown table of ``markdown`` as its list of lines (header, rule, rows)."""
    tables: List[List[str]] = []
    current: List[str] = []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line.strip())
        elif current:
            tables.append(current)
            current = []
    return tables


def _readme_table_after(marker: str) -> List[str]:
    """The first README table after the line holding ``marker``."""
    start = README.index(marker)
    return _tables(README[start:])[0]


def _intervals(text: str) -> List[str]:
    return re.findall(r"\[[-+]\d+\.\d+, [-+]\d+\.\d+\]", text)


def test_readme_dilation_table_and_differences_are_the_bundled_models_output(
    tmp_path: Path,
) -> None:
    dilation_stats(out=tmp_path, workers=0, progress=False, figure=False)
    means, differences = _tables((tmp_path / "dilation_table.md").read_text())
    assert _readme_table_after("Effective dilation of `dcn-sample` on the bundled demo") == means
    # The paragraph quotes, in order: medium − small in the three layers, large − medium in the
    # two lower layers then the top one, background − medium in the top layer.
    column = {
        name: [_intervals(row)[i] for row in differences[2:]]
        for i, name in enumerate(["medium-small", "large-medium", "background-medium"])
    }
    quoted = column["medium-small"] + column["large-medium"][1:] + column["large-medium"][:1]
    quoted += column["background-medium"][:1]
    paragraph = README[README.index("The differences (`dilation_differences.csv`)") :]
    paragraph = paragraph.split("\n\n", 1)[0]
    assert _intervals(paragraph) == quoted


def test_readme_fig7_foreground_table_is_the_bundled_models_output(tmp_path: Path) -> None:
    bins([DEMO], out=tmp_path, progress=False)
    (table,) = _tables((tmp_path / "foreground_table.md").read_text())
    assert _readme_table_after("On the bundled demo dataset (20 scenes, 101 objects)") == table
    assert len(table) == 2 + 6  # five classes and `all`

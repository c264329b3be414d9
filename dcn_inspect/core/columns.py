"""What each column of a CSV means: defined once, as data, next to the analysis that makes the
table.

Every CSV dcn-inspect writes is plain (a header line, then rows: it loads with
``pandas.read_csv(path)`` and no arguments). Its columns are described by a tuple of
:class:`Column` defined in the analysis module that produces the table
(:data:`dcn_inspect.analysis.sample_points.POINT_COLUMNS`,
:data:`dcn_inspect.analysis.bins.BIN_COLUMNS`, ...); from that one definition come

- the ``columns`` section of the command's ``summary.json`` (:func:`describe`),
- the column tables of the README (:func:`markdown_table`, kept in sync by
  ``tools/readme_tables.py`` and checked by a test),
- the text of every value in the file (:func:`format_column`): positions get a fixed number of
  decimals (:data:`COORDINATE_DECIMALS`: 0.0001 px at any image size), other floats six
  significant digits, so the same inputs give the same bytes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Optional, Sequence

import numpy as np

if TYPE_CHECKING:  # pandas is imported where a table is written, not by every command's import
    import pandas as pd

#: Decimals of every pixel position in a CSV (0.0001 px, whatever the image size).
COORDINATE_DECIMALS = 4
#: Text of every other float in a CSV: six significant digits.
FLOAT_FORMAT = "%.6g"

#: Unit of positions in the original image (continuous coordinates, PAPER.md / README conventions).
IMAGE_PIXELS = "original-image pixels"


@dataclass(frozen=True)
class Column:
    """One column of a CSV: its name, what a value means, its unit, and how it is written.

    ``decimals`` fixes the number of decimals of a float column (positions); ``None`` writes
    six significant digits (integers and text as they are). ``only`` names the condition under
    which the column exists (e.g. ``"per_group"``); it is absent otherwise.
    """

    name: str
    meaning: str
    unit: str = ""
    decimals: Optional[int] = None
    only: Optional[str] = None
    #: When the column exists, in words, where ``only`` is not an option (default: "with
    #: ``--<only>``").
    only_when: str = ""

    def as_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"name": self.name, "meaning": self.meaning, "unit": self.unit or "-"}
        if self.only:
            out["only_with"] = self.only
        return out


def position(name: str, meaning: str) -> Column:
    """A position in original-image pixels, written with :data:`COORDINATE_DECIMALS` decimals."""
    return Column(name, meaning, IMAGE_PIXELS, COORDINATE_DECIMALS)


def names(columns: Iterable[Column]) -> List[str]:
    return [column.name for column in columns]


def present(columns: Sequence[Column], **conditions: bool) -> List[Column]:
    """The columns a file has: those without a condition, and those whose condition is true."""
    return [
        column for column in columns if column.only is None or conditions.get(column.only, False)
    ]


def describe(columns: Iterable[Column]) -> List[Dict[str, Any]]:
    """The ``summary.json`` description of a file's columns, in file order."""
    return [column.as_dict() for column in columns]


def markdown_table(columns: Iterable[Column]) -> str:
    """The README table of a file's columns (``column | meaning | unit``)."""
    lines = ["| column | meaning | unit |", "|---|---|---|"]
    for column in columns:
        when = column.only_when or (
            f"with `--{column.only.replace('_', '-')}`" if column.only else ""
        )
        meaning = column.meaning + (f" (only {when})" if column.only else "")
        lines.append(f"| `{column.name}` | {meaning.replace('|', '/')} | {column.unit or '–'} |")
    return "\n".join(lines)


def format_value(value: float, column: Column) -> str:
    """One float as the CSV writes it in ``column`` (empty for NaN; no negative zero)."""
    if value is None or math.isnan(value):
        return ""
    value = float(value) + 0.0  # -0.0 + 0.0 is 0.0: no negative zero
    if column.decimals is None:
        return FLOAT_FORMAT % value
    text = f"{value:.{column.decimals}f}"
    return text[1:] if text.startswith("-") and not text.strip("-0.") else text


def format_column(values: pd.Series, column: Column) -> pd.Series:
    """A float column as the text the CSV holds (other columns are returned unchanged)."""
    import pandas as pd

    if not pd.api.types.is_float_dtype(values.dtype):
        return values
    array = values.to_numpy(dtype=np.float64, na_value=np.nan)
    return pd.Series(
        [format_value(float(v), column) for v in array], index=values.index, dtype=object
    )


def formatted(frame: pd.DataFrame, columns: Sequence[Column]) -> pd.DataFrame:
    """``frame`` with every float column as text, by its column's format; the frame's columns
    must be exactly ``columns`` in order (so the description matches the file)."""
    import pandas as pd

    if list(frame.columns) != names(columns):
        raise ValueError(
            f"table columns {list(frame.columns)} differ from their description {names(columns)}"
        )
    return pd.DataFrame(
        {column.name: format_column(frame[column.name], column) for column in columns},
        columns=names(columns),
    )


#: README markers around a generated column table: ``<!-- columns FILE -->`` ...
#: ``<!-- /columns -->``.
_BLOCK = re.compile(
    r"(?P<start><!-- columns (?P<name>[^\n]+?) -->\n)"
    r"(?P<body>(?:(?!<!-- ).*\n)*?)(?P<end><!-- /columns -->)"
)


def fill_markdown_tables(text: str, files: Dict[str, Sequence[Column]]) -> str:
    """``text`` (the README) with every marked block replaced by the column table of its file;
    an error for a marker naming no known file."""

    def table(match: "re.Match[str]") -> str:
        name = match.group("name")
        if name not in files:
            raise KeyError(
                f"README marks columns of {name!r}, which no command writes "
                f"(known: {', '.join(files)})"
            )
        return match.group("start") + markdown_table(files[name]) + "\n" + match.group("end")

    return _BLOCK.sub(table, text)


def marked_files(text: str) -> List[str]:
    """The file names of the marked column tables in ``text``, in order."""
    return [match.group("name") for match in _BLOCK.finditer(text)]

"""Every CSV is plain and self-describing: it loads with ``pandas.read_csv(path)`` and no
arguments, with the csv module, and its columns are exactly those ``summary.json`` and the
README describe, from one definition per file (:func:`dcn_inspect.commands.csv_files`)."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Dict, List

import numpy as np
import pandas as pd
import pytest

from dcn_inspect.commands import csv_files
from dcn_inspect.core.columns import (
    COORDINATE_DECIMALS,
    IMAGE_PIXELS,
    fill_markdown_tables,
    marked_files,
    names,
    present,
)

README = Path(__file__).resolve().parents[2] / "README.md"
#: Columns holding text; every other column must load as numbers.
TEXT_COLUMNS = {
    "layer",
    "category",
    "class",
    "image",
    "units",
    "category_a",
    "category_b",
    "label",
    "chosen_by",
    "group",
    "model",
    "channel",
    "saliency_status",
}


def test_readme_column_tables_are_generated_from_the_column_definitions() -> None:
    text = README.read_text(encoding="utf-8")
    files = csv_files()
    assert sorted(marked_files(text)) == sorted(files)  # every CSV has its table, once
    assert fill_markdown_tables(text, files) == text, (
        "README column tables are stale: run `make readme-tables`"
    )
    for name in files:  # and each table lists exactly the file's columns, in order
        block = text.split(f"<!-- columns {name} -->\n", 1)[1].split("<!-- /columns -->", 1)[0]
        listed = re.findall(r"^\| `([^`]+)` \|", block, flags=re.M)
        assert listed == names(files[name]), name


def _pattern(name: str) -> str:
    """The summary.json key of a written file (``<stem>`` for per-image files)."""
    for suffix in ("_bin_points.csv", "_bins.csv", "_points.csv", "_receptive_field.csv"):
        if name.endswith(suffix):
            return "<stem>" + suffix
    return name


def _check_plain_csv(
    path: Path, described: List[Dict[str, str]], fixed: Dict[str, int]
) -> pd.DataFrame:
    text = path.read_text(encoding="utf-8")
    assert not text.startswith("#") and "\r" not in text
    frame = pd.read_csv(path)  # no arguments
    assert list(frame.columns) == [c["name"] for c in described], path.name
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == list(frame.columns) and len(rows) == len(frame) + 1
    assert {len(row) for row in rows} == {len(rows[0])}
    for column in frame.columns:
        if column not in TEXT_COLUMNS:
            assert pd.api.types.is_numeric_dtype(frame[column]), (
                f"{path.name}: {column} is not numeric"
            )
    # Positions carry exactly COORDINATE_DECIMALS decimals, whatever their size.
    positions = [k for k, c in enumerate(described) if c["name"] in fixed]
    assert all(
        fixed[described[k]["name"]] == COORDINATE_DECIMALS and described[k]["unit"] == IMAGE_PIXELS
        for k in positions
    )
    for row in rows[1 : 1 + 200]:
        for k in positions:
            if row[k]:
                assert re.fullmatch(rf"-?\d+\.\d{{{COORDINATE_DECIMALS}}}", row[k]), (
                    path.name,
                    rows[0][k],
                    row[k],
                )
    return frame


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    from dcn_inspect.commands.bins import bins
    from dcn_inspect.commands.dilation_stats import dilation_stats
    from dcn_inspect.commands.receptive_field import receptive_field, receptive_field_stats
    from dcn_inspect.commands.sample_points import sample_points
    from dcn_inspect.io.datasets import bundled_dataset_path, bundled_images
    from dcn_inspect.models.loading import load_model

    root = tmp_path_factory.mktemp("csv")
    loaded = load_model("dcn-sample")
    image = sorted(Path(p) for p in bundled_images() if Path(p).stem.startswith("scene"))[0]
    results = {
        "sample-points": sample_points(
            [image],
            model=loaded,
            out=root / "sample-points",
            progress=False,
            save_offsets=root / "offsets.npz",
        ),
        "bins": bins([image], model=loaded, points=True, out=root / "bins", progress=False),
        "bins-dataset": bins(
            [bundled_dataset_path()],
            model=loaded,
            max_images=3,
            out=root / "bins-dataset",
            progress=False,
        ),
        "dilation-stats": dilation_stats(
            model=loaded,
            out=root / "dilation-stats",
            max_images=3,
            per_unit=True,
            per_group=True,
            workers=0,
            progress=False,
            figure=False,
        ),
        "receptive-field": receptive_field(
            [image],
            model=loaded,
            at=["100,120"],
            levels=2,
            out=root / "receptive-field",
            progress=False,
        ),
        "receptive-field-stats": receptive_field_stats(
            model=loaded, max_images=1, levels=1, out=root / "receptive-field-stats", progress=False
        ),
    }
    return {"root": root, **results}  # type: ignore[dict-item]


@pytest.mark.parametrize(
    "command",
    [
        "sample-points",
        "bins",
        "bins-dataset",
        "dilation-stats",
        "receptive-field",
        "receptive-field-stats",
    ],
)
def test_every_csv_loads_with_plain_read_csv_and_matches_summary_columns(
    outputs, command: str
) -> None:
    out = outputs["root"] / command
    summary = json.loads((out / "summary.json").read_text())
    written = sorted(out.glob("*.csv"))
    assert written and sorted({_pattern(p.name) for p in written}) == sorted(summary["columns"])
    for path in written:
        described = summary["columns"][_pattern(path.name)]
        definition = {c.name: c for c in csv_files()[_pattern(path.name)]}
        assert all(
            c["meaning"] == definition[c["name"]].meaning
            for c in described
            if "saliency" not in path.name
        )  # the one definition
        _check_plain_csv(
            path,
            described,
            {name: c.decimals for name, c in definition.items() if c.decimals is not None},
        )


def test_csv_values_round_trip_the_results(outputs) -> None:
    points = outputs["sample-points"].images[0]
    back = pd.read_csv(points.csv)
    for column in ("x", "y", "unit_x", "unit_y"):
        np.testing.assert_allclose(
            back[column], points.table[column], atol=0.5 * 10**-COORDINATE_DECIMALS
        )
    np.testing.assert_allclose(back["weight"], points.table["weight"], rtol=1e-5)
    assert back["parent"].isna().sum() == (points.table["level"] == 1).sum()
    bins = outputs["bins"].images[0]
    back = pd.read_csv(bins.csv)
    for column in ("x1", "y1", "x2", "y2", "dx", "dy", "bx1", "by1", "bx2", "by2"):
        np.testing.assert_allclose(
            back[column], bins.table[column], atol=0.5 * 10**-COORDINATE_DECIMALS
        )
    assert back["class"].astype(str).tolist() == bins.table["class"].astype(str).tolist()
    result = outputs["dilation-stats"]
    back = pd.read_csv(result.out_dir / "dilation_table.csv")
    assert back["group"].tolist() == result.table["group"].tolist()
    np.testing.assert_allclose(
        back[["mean", "ci_low", "ci_high"]], result.table[["mean", "ci_low", "ci_high"]], rtol=1e-5
    )


def test_npz_geometry_keeps_each_layers_own_input_size(outputs) -> None:
    summary = json.loads((outputs["root"] / "sample-points" / "summary.json").read_text())
    image = summary["images"][0]
    stem = Path(image["image"]).stem
    with np.load(outputs["root"] / "offsets.npz", allow_pickle=False) as npz:
        for layer in summary["layers"]:
            geometry = json.loads(str(npz[f"{stem}/{layer['name']}/geometry"]))
            assert geometry["input_hw"] == layer["geometry"]["input_hw"]
            assert (
                geometry["output_hw"]
                == layer["geometry"]["output_hw"]
                == list(npz[f"{stem}/{layer['name']}/offset"].shape[-2:])
            )
            assert geometry["model_input_hw"] == image["input_hw"] != geometry["input_hw"]


def test_readme_python_api_snippet_runs_and_the_plots_are_public(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dcn_inspect.report as plots

    text = README.read_text(encoding="utf-8")
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    snippet = section.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    namespace: Dict[str, object] = {}
    exec(compile(snippet, "README.md (Python API)", "exec"), namespace)
    points = namespace["points"]
    assert isinstance(points, pd.DataFrame) and list(points.columns) == names(
        present(csv_files()["<stem>_points.csv"])
    )
    assert len(points) == 9 + 81 + 729
    assert (tmp_path / "my_tree.png").stat().st_size > 1000 and (
        tmp_path / "tree_panels.png"
    ).stat().st_size > 1000
    for name in plots.__all__:  # every public plotting function is named in the README
        assert callable(getattr(plots, name)) and f"`{name}`" in section

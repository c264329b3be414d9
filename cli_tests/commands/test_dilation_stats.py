"""``dcn-inspect dilation-stats`` end to end: tiny models with known offsets on tiny datasets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict

import numpy as np
import pandas as pd
import pytest
from conftest import raises_cli
from PIL import Image

from dcn_inspect.analysis.dilation_tables import DIFFERENCE_COLUMNS, TABLE_COLUMNS, UNIT_COLUMNS
from dcn_inspect.analysis.size_categories import tertile_thresholds
from dcn_inspect.commands.dilation_stats import dilation_stats, size_batches
from dcn_inspect.models.loading import load_model

# A conv stem (stride 2) and three 3x3 deformable convs with dilation 2 whose offset convs have
# zero weights and a chosen bias: every unit gets the same offsets, so the effective dilation
# is known exactly. ``build_random`` has random offset weights (non-trivial, image-dependent).
MODEL_SOURCE = """
import torch
from torch import nn
from dcn_inspect.ops import DeformConv2dPack

PREPROCESS = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "resize": 0, "max_size": 0}


class Tiny(nn.Module):
    def __init__(self, spreads, groups=1, random_offsets=False):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.blocks = nn.ModuleList(
            DeformConv2dPack(4, 4, 3, padding=2, dilation=2, offset_groups=groups)
            for _ in range(3)
        )
        for block in self.blocks:
            bias = torch.zeros(2 * groups * 9)
            for g in range(groups):
                for a in range(3):
                    for b in range(3):
                        k = g * 9 + a * 3 + b
                        bias[2 * k] = spreads[g] * (a - 1) + 0.25  # spread the grid, then shift it
                        bias[2 * k + 1] = spreads[g] * (b - 1) - 0.5
            with torch.no_grad():
                block.conv_offset.bias.copy_(bias)
                if random_offsets:
                    block.conv_offset.weight.normal_(0.0, 0.3)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        for block in self.blocks:
            x = torch.relu(block(x))
        return {"features": x}


def build_spread():
    return Tiny([0.5])


def build_zero():
    return Tiny([0.0])


def build_groups():
    return Tiny([0.0, 1.0], groups=2)


def build_random():
    return Tiny([0.0], random_offsets=True)
"""

CATEGORY_ORDER = ["small", "medium", "large", "background"]
LAYERS_TOP_FIRST = ["blocks.2", "blocks.1", "blocks.0"]


def _image(path: Path, width: int, height: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    root = tmp_path_factory.mktemp("dilation")
    (root / "model.py").write_text(MODEL_SOURCE)
    coco = root / "coco"
    coco.mkdir()
    # Two original sizes with the same aspect ratio: with --resize 16 both become 20x16 inputs.
    sizes = [(40, 32), (60, 48), (40, 32), (60, 48), (40, 32)]
    images, annotations = [], []
    for i, (w, h) in enumerate(sizes):
        _image(coco / f"im{i}.png", w, h, i)
        images.append({"id": i + 1, "file_name": f"im{i}.png", "width": w, "height": h})
        boxes = [
            ([2, 2, 6, 6], 0),
            ([14, 4, 12, 12], 0),
            ([4, 14, 30, 18], 0),
            ([30, 0, 10, 10], 1),
        ]
        for k, (bbox, crowd) in enumerate(boxes):
            annotations.append(
                {
                    "id": 10 * i + k,
                    "image_id": i + 1,
                    "bbox": bbox,
                    "category_id": 1,
                    "iscrowd": crowd,
                }
            )
    (coco / "annotations.json").write_text(
        json.dumps(
            {
                "images": images,
                "annotations": annotations,
                "categories": [{"id": 1, "name": "thing"}],
            }
        )
    )
    return {"root": root, "coco": coco / "annotations.json", "model": root / "model.py"}


def _model(ws: Dict[str, Any], name: str):
    return load_model(f"{ws['model']}:{name}")


def _run(ws: Dict[str, Any], model: str, out: Path, **kwargs: Any):
    options: Dict[str, Any] = {
        "thresholds": "100,300",
        "workers": 0,
        "progress": False,
        "figure": False,
    }
    options.update(kwargs)
    return dilation_stats(
        ws.get("dataset_override", ws["coco"]), model=_model(ws, model), out=out, **options
    )


def _table(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "dilation_table.csv")


# ---------------------------------------------------------------------------------- exact values


def test_constant_offsets_give_a_known_dilation_in_every_category(ws, tmp_path):
    result = _run(ws, "build_spread", tmp_path / "cells")
    table = result.table
    assert list(table.columns) == TABLE_COLUMNS
    assert table["layer"].tolist() == [name for name in LAYERS_TOP_FIRST for _ in CATEGORY_ORDER]
    assert table["category"].tolist() == CATEGORY_ORDER * 3
    assert (table["count"] > 0).all()  # the boxes cover every category
    for key in ("mean", "median", "p10", "p90"):
        np.testing.assert_allclose(table[key], 2.5, rtol=1e-12)  # dilation 2 spread by 0.5 per step
    np.testing.assert_array_equal(table["std"], 0.0)
    assert set(table["units"]) == {"cells"}
    # In pixels: one input cell of these layers is 2 model-input pixels (stride-2 stem), no resize.
    pixels = _run(ws, "build_spread", tmp_path / "pixels", units="pixels").table
    np.testing.assert_allclose(pixels["mean"], 5.0, rtol=1e-12)
    np.testing.assert_array_equal(pixels["count"], table["count"])


def test_zero_offsets_give_the_dilation_in_cells_and_pixels_scaled_to_the_original(ws, tmp_path):
    cells = _run(ws, "build_zero", tmp_path / "cells", resize=16, batch_size=8).table
    np.testing.assert_allclose(cells["mean"], 2.0, rtol=1e-12)
    # --resize 16: 40x32 originals are scaled by 1/2, 60x48 by 1/3, both to 20x16 inputs and batched
    # together; a cell is 2 input pixels = 4 or 6 original pixels, so the dilation is 8 or 12 px.
    result = _run(
        ws,
        "build_zero",
        tmp_path / "pixels",
        resize=16,
        batch_size=8,
        units="pixels",
        per_unit=True,
    )
    units = pd.read_csv(tmp_path / "pixels" / "dilation_units.csv")
    small_images = units["image"].isin(["im0.png", "im2.png", "im4.png"])
    np.testing.assert_allclose(units.loc[small_images, "dilation"], 8.0)
    np.testing.assert_allclose(units.loc[~small_images, "dilation"], 12.0)
    assert result.summary["images"]["used"] == 5


def test_offset_groups_are_averaged_or_kept_apart(ws, tmp_path):
    mean = _run(ws, "build_groups", tmp_path / "mean").table
    np.testing.assert_allclose(mean["mean"], 2.5)  # groups at 2.0 and 3.0
    result = _run(ws, "build_groups", tmp_path / "groups", per_group=True, per_unit=True)
    groups = result.table
    # The group in its own column, in the result and in every CSV.
    assert list(groups.columns) == ["layer", "group", *TABLE_COLUMNS[1:]]
    assert list(zip(groups["layer"], groups["group"]))[::4] == [
        (layer, g) for layer in LAYERS_TOP_FIRST for g in (0, 1)
    ]
    np.testing.assert_allclose(groups[groups["group"] == 0]["mean"], 2.0)
    np.testing.assert_allclose(groups[groups["group"] == 1]["mean"], 3.0)
    written = pd.read_csv(tmp_path / "groups" / "dilation_table.csv")
    assert (
        written["layer"].tolist() == groups["layer"].tolist()
        and written["group"].tolist() == groups["group"].tolist()
    )
    differences = pd.read_csv(tmp_path / "groups" / "dilation_differences.csv")
    assert list(differences.columns) == ["layer", "group", *DIFFERENCE_COLUMNS[1:]] and set(
        differences["group"]
    ) == {0, 1}
    units = pd.read_csv(tmp_path / "groups" / "dilation_units.csv")
    assert list(units.columns) == ["image", "layer", "group", *UNIT_COLUMNS[2:]]
    np.testing.assert_allclose(units.loc[units["group"] == 1, "dilation"], 3.0)
    summary = json.loads((tmp_path / "groups" / "summary.json").read_text())
    assert [c["name"] for c in summary["columns"]["dilation_table.csv"]] == list(groups.columns)


# ---------------------------------------------------------------------------------- outputs


def test_outputs_per_unit_rows_and_determinism(ws, tmp_path):
    first = _run(ws, "build_random", tmp_path / "a", per_unit=True, figure=True)
    out = tmp_path / "a"
    assert sorted(p.name for p in out.iterdir()) == [
        "dilation_differences.csv", "dilation_hist.png", "dilation_table.csv", "dilation_table.md",
        "dilation_units.csv", "summary.json",
    ]  # fmt: skip
    table = _table(out)
    assert list(table.columns) == TABLE_COLUMNS
    assert (out / "dilation_table.csv").read_text().startswith(",".join(TABLE_COLUMNS) + "\n")
    assert table["std"].gt(0).all()  # random offsets: a real distribution
    assert (table["p10"] <= table["median"]).all() and (table["median"] <= table["p90"]).all()
    units = pd.read_csv(out / "dilation_units.csv")
    assert list(units.columns) == UNIT_COLUMNS
    # 3 images of 40x32 (20x16 units) and 2 of 60x48 (30x24 units), three layers each.
    assert len(units) == 3 * (3 * 20 * 16 + 2 * 30 * 24)
    assert units["image"].tolist()[0] == "im0.png" and units["image"].tolist()[-1] == "im4.png"
    counted = units[units["category"].isin(CATEGORY_ORDER)]
    by_cell = counted.groupby(["layer", "category"])["dilation"].agg(["count", "mean"])
    for _, row in table.iterrows():
        assert by_cell.loc[(row["layer"], row["category"]), "count"] == row["count"]
        assert by_cell.loc[(row["layer"], row["category"]), "mean"] == pytest.approx(
            row["mean"], rel=1e-5
        )
    # The crowd box (30, 0)-(40, 10) holds units that count in no category.
    assert (units["category"] == "ignored").any()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["units_not_counted"]["blocks.2"]["ignored_box"] == int(
        (units[units["layer"] == "blocks.2"]["category"] == "ignored").sum()
    )
    assert summary["thresholds"] == {
        "name": "custom",
        "small_medium_px2": 100.0,
        "medium_large_px2": 300.0,
    }
    assert summary["geometry_method"] == ["hooks"] and summary["units"] == "cells"
    assert (
        summary["model"]["source"] == "user-file"
        and "checkpoint_sha256" in summary
        and "versions" in summary
    )
    assert [layer["name"] for layer in summary["layers"]] == LAYERS_TOP_FIRST
    markdown = (out / "dilation_table.md").read_text().splitlines()
    assert markdown[2] == "| layer | small | medium | large | background |"
    top = table[table["layer"] == "blocks.2"].set_index("category")
    assert (
        markdown[4]
        == "| blocks.2 | "
        + " | ".join(
            f"{top.loc[c, 'mean']:.2f} ± {top.loc[c, 'std']:.2f} "
            f"[{top.loc[c, 'ci_low']:.2f}, {top.loc[c, 'ci_high']:.2f}]"
            for c in CATEGORY_ORDER
        )
        + " |"
    )
    # Same inputs, same bytes.
    _run(ws, "build_random", tmp_path / "b", per_unit=True, figure=True)
    for name in (
        "dilation_units.csv",
        "dilation_table.csv",
        "dilation_differences.csv",
        "dilation_table.md",
        "dilation_hist.png",
    ):
        assert (tmp_path / "b" / name).read_bytes() == (out / name).read_bytes(), name
    # Another batch size and a worker process: same units and counts; values equal up to the
    # float32 rounding of a batched versus a single-image convolution.
    _run(ws, "build_random", tmp_path / "c", per_unit=True, batch_size=3, workers=1)
    batched = pd.read_csv(tmp_path / "c" / "dilation_units.csv")
    pd.testing.assert_frame_equal(batched.drop(columns="dilation"), units.drop(columns="dilation"))
    np.testing.assert_allclose(batched["dilation"], units["dilation"], rtol=1e-5)
    again = _table(tmp_path / "c")
    np.testing.assert_array_equal(again["count"], table["count"])
    np.testing.assert_allclose(again["mean"], table["mean"], rtol=1e-6)
    assert first.images_used == 5 and not list(out.glob(".*.part"))


def test_tertiles_and_layer_selection(ws, tmp_path):
    result = _run(ws, "build_zero", tmp_path / "t", thresholds="tertiles", layers=["blocks.0"])
    areas = np.array([36.0, 144.0, 540.0] * 5)  # non-crowd boxes of the five images
    assert result.thresholds == pytest.approx(tertile_thresholds(areas))
    assert result.table["layer"].unique().tolist() == ["blocks.0"]
    with raises_cli(
        r"--layers: unknown deformable layer\(s\) nope; valid: blocks.0, blocks.1, blocks.2",
        "dilation-stats",
    ):
        _run(ws, "build_zero", tmp_path / "bad", layers=["nope"])


def test_size_batches_group_equal_sizes_only():
    sizes = [(2, 2), (3, 3), (2, 2), (2, 2), (3, 3), (4, 4), (2, 2)]
    assert size_batches(sizes, 2) == [[0, 2], [1, 4], [3, 6], [5]]
    assert size_batches(sizes, 1) == [[i] for i in range(7)]


def test_size_batches_keep_one_forward_within_max_pixels():
    sizes = [(10, 10)] * 7 + [(100, 100)] * 2
    # 100-pixel images: at most 3 per batch under 350 pixels; a 10000-pixel image still makes its
    # own batch
    assert size_batches(sizes, 8, max_pixels=350) == [[0, 1, 2], [3, 4, 5], [7], [8], [6]]
    assert size_batches(sizes, 8, max_pixels=0) == [[0, 1, 2, 3, 4, 5, 6], [7, 8]]


# ---------------------------------------------------------------------------------- datasets, skips


def test_skipped_images_are_counted_and_strict_stops(ws, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    _image(folder / "good.png", 40, 32, 0)
    _image(folder / "wrong_size.png", 30, 30, 1)
    (folder / "corrupt.png").write_bytes(b"\x89PNG not really")
    entries = [
        ("good.png", 40, 32),
        ("missing.png", 40, 32),
        ("corrupt.png", 40, 32),
        ("wrong_size.png", 40, 32),
    ]
    images = [
        {"id": i, "file_name": name, "width": w, "height": h}
        for i, (name, w, h) in enumerate(entries)
    ]
    dataset = folder / "annotations.json"
    dataset.write_text(json.dumps({"images": images, "annotations": [], "categories": []}))
    result = dilation_stats(
        dataset,
        model=_model(ws, "build_zero"),
        out=tmp_path / "out",
        workers=0,
        progress=False,
        figure=False,
    )
    assert result.images_used == 1
    assert result.skipped.by_kind() == {
        "image file not found": 1,
        "unreadable image": 1,
        "image size differs from its annotation": 1,
    }
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["skipped"]["count"] == 3
    assert [e["image"] for e in summary["skipped"]["images"]] == [
        "missing.png",
        "corrupt.png",
        "wrong_size.png",
    ]
    # Only background units: no boxes.
    assert (result.table[result.table["category"] != "background"]["count"] == 0).all()
    with raises_cli(
        r"missing.png: image file not found \(skipped images are errors with --strict\)",
        "dilation-stats",
    ):
        dilation_stats(
            dataset,
            model=_model(ws, "build_zero"),
            out=tmp_path / "strict",
            strict=True,
            workers=0,
            progress=False,
        )
    assert not (tmp_path / "strict" / "summary.json").exists()


def test_voc_dataset_with_difficult_boxes(ws, tmp_path):
    root = tmp_path / "VOC2007"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True)
    _image(root / "JPEGImages" / "000001.jpg", 40, 32, 0)
    # 1-based inclusive corners: (1,1)-(20,32) is x 0..20 continuous; the difficult box covers
    # the rest.
    (root / "Annotations" / "000001.xml").write_text(
        "<annotation><filename>000001.jpg</filename><size><width>40</width><height>32</height></size>"
        "<object><name>a</name><difficult>0</difficult><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>20</xmax><ymax>32</ymax></bndbox></object>"
        "<object><name>b</name><difficult>1</difficult><bndbox><xmin>22</xmin><ymin>1</ymin><xmax>40</xmax><ymax>32</ymax></bndbox></object>"
        "</annotation>"
    )
    (root / "ImageSets" / "Main" / "test.txt").write_text("000001\n")
    result = dilation_stats(
        root,
        split="test",
        model=_model(ws, "build_zero"),
        out=tmp_path / "out",
        thresholds="coco",
        workers=0,
        progress=False,
        figure=False,
    )
    table = result.table.set_index(["layer", "category"])
    # Units centred at x = 0.5, 2.5, ..., 38.5: x <= 20 in the box (10 columns, area 640 < 32²:
    # small), x = 20.5 on neither box (background), x >= 21 inside the difficult box (not
    # counted).
    assert table.loc[("blocks.2", "small"), "count"] == 10 * 16
    assert (
        table.loc[("blocks.2", "medium"), "count"] == table.loc[("blocks.2", "large"), "count"] == 0
    )
    assert table.loc[("blocks.2", "background"), "count"] == 1 * 16
    assert result.summary["units_not_counted"]["blocks.2"]["ignored_box"] == 9 * 16
    assert result.summary["dataset"]["format"] == "voc"


# ------------------------------------------------------------------------------ CLI and torchrun


def _cli(args, **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "dcn_inspect", *args],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        **kwargs,
    )


def test_cli_prints_the_table_and_reports_errors_on_one_line(ws, tmp_path):
    done = _cli([
        "dilation-stats", str(ws["coco"]), "--model", f"{ws['model']}:build_spread",
        "--thresholds", "100,300", "--layers", "blocks.2,blocks.0", "--workers", "0",
        "--out", str(tmp_path / "out"),
    ])  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (
        "Effective dilation" in done.stdout
        and "2.50 ± 0.00" in done.stdout
        and "images used: 5" in done.stdout
    )
    assert _table(tmp_path / "out")["layer"].unique().tolist() == ["blocks.2", "blocks.0"]
    bad = _cli(
        [
            "dilation-stats",
            str(ws["coco"]),
            "--model",
            f"{ws['model']}:build_spread",
            "--units",
            "mm",
            "--out",
            str(tmp_path / "bad"),
        ]
    )
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [
        "dcn-inspect: error: --units 'mm': use cells or pixels"
    ]
    help_text = _cli(["dilation-stats", "--help"])
    assert help_text.returncode == 0 and "Example: dcn-inspect dilation-stats" in help_text.stdout


def test_torchrun_two_ranks_equal_one_process(ws, tmp_path):
    common = [
        "dilation-stats", str(ws["coco"]), "--model", f"{ws['model']}:build_random",
        "--thresholds", "100,300", "--per-unit", "--workers", "0", "--batch-size", "2",
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "dcn_inspect",
    ]
    distributed = subprocess.run(
        launcher + common + ["--out", str(tmp_path / "two")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert distributed.returncode == 0, distributed.stderr[-3000:]
    assert distributed.stdout.count("Effective dilation") == 1  # only rank 0 prints
    single = _run(ws, "build_random", tmp_path / "one", per_unit=True, batch_size=2)
    two = _table(tmp_path / "two")
    one = _table(tmp_path / "one")
    np.testing.assert_array_equal(two["count"], one["count"])
    for key in (
        "mean",
        "std",
        "median",
        "p10",
        "p90",
        "ci_low",
        "ci_high",
    ):  # intervals: the ranks' image sums merged in image order
        np.testing.assert_allclose(two[key], one[key], rtol=1e-5)
    differences_two = pd.read_csv(tmp_path / "two" / "dilation_differences.csv")
    differences_one = pd.read_csv(tmp_path / "one" / "dilation_differences.csv")
    pd.testing.assert_frame_equal(differences_two, differences_one, rtol=1e-4, atol=1e-5)
    units_two = pd.read_csv(tmp_path / "two" / "dilation_units.csv")
    units_one = pd.read_csv(tmp_path / "one" / "dilation_units.csv")
    pd.testing.assert_frame_equal(units_two, units_one, rtol=1e-5)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["distributed"] == {"world_size": 2, "backend": "gloo"}
    assert summary["images"]["used"] == single.images_used == 5
    assert not list((tmp_path / "two").glob(".*"))  # part files cleaned up


# ---------------------------------------------------------------------------------- intervals


def _per_image_sums(units: pd.DataFrame, layer: str, images: list) -> tuple:
    """Each image's dilation sum and unit count per category, from dilation_units.csv."""
    part = units[(units["layer"] == layer) & units["category"].isin(CATEGORY_ORDER)]
    sums = np.zeros((len(images), 4))
    counts = np.zeros((len(images), 4))
    for (image, category), values in part.groupby(["image", "category"])["dilation"]:
        sums[images.index(image), CATEGORY_ORDER.index(category)] = values.sum()
        counts[images.index(image), CATEGORY_ORDER.index(category)] = len(values)
    return sums, counts


def test_confidence_intervals_are_a_bootstrap_over_images_of_the_written_units(ws, tmp_path):
    result = _run(ws, "build_random", tmp_path / "a", per_unit=True, batch_size=2)
    table = _table(tmp_path / "a")
    assert list(table.columns[-2:]) == ["ci_low", "ci_high"]
    assert (table["ci_low"] <= table["mean"] + 1e-9).all() and (
        table["mean"] <= table["ci_high"] + 1e-9
    ).all()
    assert (table["ci_low"] < table["ci_high"]).all()  # five different images: real spread
    # Oracle: per-image sums from the per-unit CSV, resampled with the documented seed and count.
    units = pd.read_csv(tmp_path / "a" / "dilation_units.csv")
    images = [f"im{i}.png" for i in range(5)]
    summary = result.summary["statistics"]["confidence_intervals"]
    pairs = [
        ("medium", "small"),
        ("large", "medium"),
        ("background", "medium"),
        ("large", "background"),
    ]
    differences = pd.read_csv(tmp_path / "a" / "dilation_differences.csv")
    assert list(zip(differences["category_a"], differences["category_b"])) == pairs * 3
    for layer in LAYERS_TOP_FIRST:
        sums, counts = _per_image_sums(units, layer, images)
        draws = np.random.default_rng(summary["seed"]).integers(
            0, 5, size=(summary["resamples"], 5)
        )
        means = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
        rows = table[table["layer"] == layer].set_index("category")
        for k, category in enumerate(CATEGORY_ORDER):
            expected = np.percentile(means[:, k], [2.5, 97.5])
            np.testing.assert_allclose(
                rows.loc[category, ["ci_low", "ci_high"]].to_numpy(float), expected, rtol=1e-5
            )
        rows_d = differences[differences["layer"] == layer].reset_index()
        for k, (first, second) in enumerate(pairs):
            a, b = CATEGORY_ORDER.index(first), CATEGORY_ORDER.index(second)
            assert rows_d.loc[k, "difference"] == pytest.approx(
                rows.loc[first, "mean"] - rows.loc[second, "mean"], abs=2e-5
            )  # means written to 6 digits
            expected = np.percentile(means[:, a] - means[:, b], [2.5, 97.5])
            np.testing.assert_allclose(
                rows_d.loc[k, ["ci_low", "ci_high"]].to_numpy(float), expected, rtol=1e-4, atol=1e-6
            )
    # Another batching gives the same intervals (image sums are merged in image order).
    again = _run(ws, "build_random", tmp_path / "b", batch_size=1).table
    np.testing.assert_allclose(
        again[["ci_low", "ci_high"]].to_numpy(float),
        result.table[["ci_low", "ci_high"]].to_numpy(float),
        rtol=1e-6,
    )


def test_constant_offsets_give_zero_width_intervals_and_zero_differences(ws, tmp_path):
    result = _run(ws, "build_spread", tmp_path / "c")
    np.testing.assert_allclose(result.table[["ci_low", "ci_high"]].to_numpy(float), 2.5, rtol=1e-12)
    np.testing.assert_allclose(
        result.differences[["difference", "ci_low", "ci_high"]].to_numpy(float), 0.0, atol=1e-12
    )
    assert set(result.differences["units"]) == {"cells"}


def test_dilation_table_fits_80_columns_without_ellipsis(ws, tmp_path):
    from rich.console import Console

    from dcn_inspect.cli.dilation_stats import rich_differences, rich_table

    def rendered(renderable) -> str:
        console = Console(width=80, record=True, file=open(os.devnull, "w"))
        console.print(renderable)
        return console.export_text()

    plain = _run(ws, "build_random", tmp_path / "plain")
    groups = _run(ws, "build_groups", tmp_path / "groups", per_group=True, units="pixels")
    # A long layer name and wide pixel values: the worst case a real model gives.
    wide = groups.table.copy()
    wide["layer"] = "backbone.stages.3.blocks.2.dcn.conv_offset." + wide["layer"]
    wide[["mean", "ci_low", "ci_high"]] += 1000.0
    for table, differences, units in (
        (plain.table, plain.differences, "cells"),
        (groups.table, groups.differences, "pixels"),
        (wide, groups.differences, "pixels"),
    ):
        text = rendered(rich_table(table, units)) + rendered(rich_differences(differences, units))
        lines = text.splitlines()
        assert max(len(line) for line in lines) <= 80 and "…" not in text
        words = set(text.replace("[", " ").replace("]", " ").replace(",", " ").split())
        for (
            _,
            row,
        ) in table.iterrows():  # every number is printed whole (wrapped, if at all, at a space)
            assert {f"{row[key]:.2f}" for key in ("mean", "std", "ci_low", "ci_high")} <= words
    plain_text = rendered(rich_table(plain.table, "cells"))
    assert "95 % CI" in plain_text and "group" not in plain_text
    assert "group" in rendered(rich_table(groups.table, "pixels"))


# ------------------------------------------------------------------------------------ issue #21

#: The groups model under a backbone prefix: layer names as long as a real model's
#: ("backbone.blocks.2", like "layer4.2.conv2" or longer).
BACKBONE_SOURCE = """

class Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = Tiny([0.0, 1.0], groups=2)

    def forward(self, x):
        return self.backbone(x)


def build_backbone_groups():
    return Backbone()
"""


def _lines_keep_whole(text: str, pieces) -> list:
    """The pieces that appear on no single line of ``text`` (broken or missing)."""
    lines = text.splitlines()
    return [piece for piece in pieces if not any(piece in line for line in lines)]


def test_per_group_table_fits_80_columns_with_layer_names_and_values_whole(ws, tmp_path):
    model = tmp_path / "backbone.py"
    model.write_text(MODEL_SOURCE + BACKBONE_SOURCE)
    out = tmp_path / "out"
    done = subprocess.run(
        [
            sys.executable, "-m", "dcn_inspect", "dilation-stats", str(ws["coco"]),
            "--model", f"{model}:build_backbone_groups", "--thresholds", "100,300",
            "--per-group", "--workers", "0", "--out", str(out),
        ],
        capture_output=True, text=True, timeout=180,
        env=dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="80"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    table = _table(out)
    assert set(table["layer"]) == {f"backbone.blocks.{k}" for k in range(3)}
    tables = done.stdout[: done.stdout.index("thresholds (")]  # then paths, never folded
    assert max(len(line) for line in tables.splitlines()) <= 80
    text = tables[: tables.index("Differences of means")]
    pieces = set(table["layer"])
    for _, row in table.iterrows():
        pieces.add(f"{row['mean']:.2f} ± {row['std']:.2f}")
        pieces.add(f"[{row['ci_low']:.2f}, {row['ci_high']:.2f}]")
    assert _lines_keep_whole(text, pieces) == []
    # Where it fits, the table is one table as before: a layer column beside the group column.
    from rich.console import Console

    from dcn_inspect.cli.dilation_stats import rich_table

    console = Console(width=120, record=True, file=open(os.devnull, "w"))
    console.print(rich_table(table, "cells"))
    wide = console.export_text()
    assert "layer" in wide.splitlines()[2] and "group" in wide.splitlines()[2]
    assert _lines_keep_whole(wide, pieces) == []


def test_random_weights_are_named_in_the_histogram_title(ws, tmp_path, monkeypatch):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from dcn_inspect.commands import dilation_stats as module
    from dcn_inspect.models.loaded_model import LoadedModel

    titles, inside = [], []
    original = module.write_figure

    def keep(path, figure, **kwargs):
        titles.append(" ".join(figure.get_suptitle().split()))
        renderer = FigureCanvasAgg(figure).get_renderer()
        box, page = figure._suptitle.get_window_extent(renderer), figure.bbox
        inside.append(box.x0 >= page.x0 and box.x1 <= page.x1 and box.y1 <= page.y1)
        original(path, figure, **kwargs)

    monkeypatch.setattr(module, "write_figure", keep)
    trained = _model(ws, "build_spread")
    untrained = LoadedModel(
        trained.model, "tiny", "tiny", {}, trained.preprocess, "registered"
    )  # a registered architecture without weights
    for loaded, name in ((trained, "a"), (untrained, "b")):  # one panel: the narrowest figure
        dilation_stats(
            ws["coco"], model=loaded, out=tmp_path / name, thresholds="100,300", workers=0,
            progress=False, layers=["blocks.2"],
        )  # fmt: skip
    assert [title.endswith("(random weights)") for title in titles] == [False, True]
    assert titles[1].startswith(titles[0]) and inside == [True, True]
    model = json.loads((tmp_path / "b" / "summary.json").read_text())["model"]
    assert model["random_weights"] is True and "untrained" in model["note"]

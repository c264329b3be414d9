"""Fig. 7 measured: object masks (COCO polygons, uncompressed and compressed RLE), the fraction
of RoI-bin sampling points on an object's mask, regular vs deformed bins, per RoI and over a
dataset (``bins DATASET``); and ``--class auto`` never showing background offsets unasked.

Oracles: hand-made masks and hand-encoded RLE strings, matplotlib's point-in-polygon test (the
generator's rasteriser), and a model whose offsets move every bin onto a known square, whose
fractions follow from counting sampling points by hand.
"""

from __future__ import annotations

import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import raises_cli
from PIL import Image

from dcn_inspect.analysis.bins import AGNOSTIC, HeadInfo
from dcn_inspect.analysis.bins_foreground import TABLE_COLUMNS, box_iou, match_object, on_mask
from dcn_inspect.analysis.roi_selection import RoIRequest, background_index, choose_classes
from dcn_inspect.commands.bins import FOREGROUND_ROI_COLUMNS, bins
from dcn_inspect.core.errors import InputError
from dcn_inspect.io.annotations import (
    decode_segmentation,
    load_coco,
    object_mask,
    rasterize_polygons,
)
from dcn_inspect.models.loaded_model import LoadedModel
from dcn_inspect.models.registry import Preprocess

# --------------------------------------------------------------------------------------------
# Masks


def _rle_counts(mask: np.ndarray) -> List[int]:
    """Run lengths of ``mask`` in column-major order, starting with a run of zeros (COCO RLE)."""
    flat = mask.T.reshape(-1).astype(np.int64)
    counts, value, run = [], 0, 0
    for pixel in flat:
        if pixel == value:
            run += 1
        else:
            counts.append(run)
            value, run = pixel, 1
    counts.append(run)
    return counts


def _rle_string(counts: List[int]) -> str:
    """COCO's compressed RLE text (written from maskApi.c's rleToString)."""
    out = []
    for i, count in enumerate(counts):
        x = count - (counts[i - 2] if i > 2 else 0)
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def test_polygon_mask_is_the_pixels_whose_centres_lie_inside() -> None:
    # A rectangle from (1, 1) to (4, 3): pixel centres (c + 0.5, r + 0.5) inside are columns 1..3,
    # rows 1..2.
    expected = np.zeros((5, 6), dtype=bool)
    expected[1:3, 1:4] = True
    np.testing.assert_array_equal(
        decode_segmentation([[1, 1, 4, 1, 4, 3, 1, 3]], 5, 6, "x"), expected
    )
    # A right triangle (0,0), (4.2,0), (0,4.2): centre (c+.5, r+.5) inside iff c + r + 1 < 4.2.
    rows, cols = np.mgrid[0:5, 0:5]
    np.testing.assert_array_equal(
        decode_segmentation([[0, 0, 4.2, 0, 0, 4.2]], 5, 5, "x"), cols + rows + 1 < 4.2
    )
    # Two polygons of one object are united; a polygon reaching outside the image is clipped.
    two = decode_segmentation([[0, 0, 2, 0, 2, 2, 0, 2], [3, 3, 9, 3, 9, 9, 3, 9]], 5, 5, "x")
    expected = np.zeros((5, 5), dtype=bool)
    expected[0:2, 0:2] = True
    expected[3:5, 3:5] = True
    np.testing.assert_array_equal(two, expected)


def test_polygon_rasterisation_agrees_with_matplotlib_on_generated_shapes() -> None:
    from dcn_inspect.io.datasets.synthetic import generate_scene, rasterize

    for seed in range(6):
        scene = generate_scene(np.random.default_rng([99, seed]))
        for obj in scene.objects:
            ours = rasterize_polygons([obj.polygon], 256, 256)
            np.testing.assert_array_equal(ours, rasterize(obj.polygon, 256, 256))


def test_uncompressed_rle_decodes_column_major_runs_starting_with_zeros() -> None:
    # 3 x 4 image: column-major pixel order is (0,0), (1,0), (2,0), (0,1), ...
    counts = [1, 2, 4, 3, 2]  # 1 zero, 2 ones, 4 zeros, 3 ones, 2 zeros = 12 pixels
    expected = np.array(
        [
            [0, 0, 0, 1],
            [1, 0, 1, 0],
            [1, 0, 1, 0],
        ],
        dtype=bool,
    )
    np.testing.assert_array_equal(
        decode_segmentation({"size": [3, 4], "counts": counts}, 3, 4, "x"), expected
    )
    assert _rle_counts(expected) == counts


def test_compressed_rle_decodes_hand_encoded_strings() -> None:
    # "04": runs [0, 4] (all four pixels set); "T3": 100 = 4 + 3 * 32 (first group has the
    # continuation bit 0x20: 4 | 0x20 = 36 -> chr(84) = 'T'); "325O": the fourth count is
    # stored as a difference to the second, -1 -> group 31 -> 'O', i.e. runs [3, 2, 5, 1].
    np.testing.assert_array_equal(
        decode_segmentation({"size": [2, 2], "counts": "04"}, 2, 2, "x"), np.ones((2, 2), bool)
    )
    hundred = decode_segmentation(
        {"size": [10, 11], "counts": "T337"}, 10, 11, "x"
    )  # runs [100, 3, 7]
    assert hundred.T.reshape(-1)[:100].sum() == 0 and hundred.T.reshape(-1)[100:103].all()
    mask = decode_segmentation({"size": [1, 11], "counts": "325O"}, 1, 11, "x")
    np.testing.assert_array_equal(mask[0], [0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 1])


def test_compressed_and_uncompressed_rle_agree_on_random_masks() -> None:
    rng = np.random.default_rng(3)
    for _ in range(20):
        height, width = (int(v) for v in rng.integers(1, 40, size=2))
        mask = rng.random((height, width)) < rng.uniform(0.05, 0.95)
        counts = _rle_counts(mask)
        text = _rle_string(counts)
        np.testing.assert_array_equal(
            decode_segmentation({"size": [height, width], "counts": counts}, height, width, "x"),
            mask,
        )
        np.testing.assert_array_equal(
            decode_segmentation({"size": [height, width], "counts": text}, height, width, "x"), mask
        )


@pytest.mark.parametrize(
    "segmentation, message",
    [
        ({"size": [3, 4], "counts": [1, 2, 3]}, "RLE runs cover 6 pixels, the 4x3 image has 12"),
        (
            {"size": [4, 3], "counts": [12]},
            "RLE 'size' 3x4 .width x height. differs from the image's 4x3",
        ),
        ({"size": [3, 4], "counts": [1, -2, 13]}, "negative run length"),
        ({"size": [3, 4], "counts": "0\x7f"}, "invalid character"),
        ({"size": [3, 4], "counts": "0T"}, "ends in the middle of a number"),
        ({"size": "3x4", "counts": [12]}, "RLE 'size' must be .height, width. integers"),
        (
            {"size": [3, 4], "counts": [1.5, 10.5]},
            "RLE 'counts' must be a list of integers or a compressed string",
        ),
        ([[0, 0, 4, 0, 4]], "polygon 0 has 5 numbers; need an even count of at least 6"),
        ([[0, 0, 4, 0]], "polygon 0 has 4 numbers"),
        ([[0, 0, 4, "a", 4, 3]], "polygon 0 must be a flat list of finite numbers"),
        ("polygon", "'segmentation' must be a list of polygons or an RLE object"),
    ],
)
def test_malformed_masks_are_one_line_errors_naming_the_annotation(
    segmentation: Any, message: str
) -> None:
    with pytest.raises(
        InputError, match=f"^file.json: annotations\\[2\\] \\(id 9\\): .*{message}"
    ) as caught:
        decode_segmentation(segmentation, 3, 4, "file.json: annotations[2] (id 9)")
    assert "\n" not in str(caught.value)


def test_mask_memory_is_checked_before_allocating() -> None:
    with pytest.raises(
        InputError, match="mask of 100000x100000 pixels exceeds the limit of 50000000"
    ):
        decode_segmentation(
            {"size": [100000, 100000], "counts": [10**10]},
            100000,
            100000,
            "x",
            max_pixels=50_000_000,
        )


def test_coco_masks_are_kept_only_when_asked_and_named_by_their_annotation(tmp_path: Path) -> None:
    coco = {
        "images": [{"id": 1, "file_name": "a.png", "width": 4, "height": 3}],
        "annotations": [
            {
                "id": 5,
                "image_id": 1,
                "category_id": 1,
                "bbox": [1, 1, 3, 2],
                "segmentation": [[1, 1, 4, 1, 4, 3, 1, 3]],
            },
            {
                "id": 6,
                "image_id": 1,
                "category_id": 1,
                "bbox": [0, 0, 4, 3],
                "iscrowd": 1,
                "segmentation": {"size": [3, 4], "counts": [1, 2, 4, 3, 2]},
            },
            {"id": 7, "image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2]},
            {
                "id": 8,
                "image_id": 1,
                "category_id": 1,
                "bbox": [0, 0, 2, 2],
                "segmentation": {"size": [3, 4], "counts": [5]},
            },
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(coco))
    assert (
        load_coco(path).images[0].segmentations == [None] * 4
    )  # boxes only: no polygons kept in memory
    entry = load_coco(path, masks=True).images[0]
    assert [entry.has_mask(k) for k in range(4)] == [True, True, False, True]
    assert (
        object_mask(entry, 0).sum() == 6
        and object_mask(entry, 1).sum() == 5
        and object_mask(entry, 2) is None
    )
    with pytest.raises(
        InputError, match=r"instances.json: annotations\[3\] \(id 8\): RLE runs cover 5 pixels"
    ):
        object_mask(entry, 3)


# --------------------------------------------------------------------------------------------
# The measurement


def test_points_land_on_the_pixel_that_contains_them() -> None:
    mask = np.zeros((3, 4), dtype=bool)
    mask[1, 2] = True  # pixel covering x in [2, 3), y in [1, 2)
    points = np.array(
        [[2.0, 1.0], [2.999, 1.999], [3.0, 1.5], [2.5, 0.999], [-0.5, 1.5], [2.5, 3.0], [4.0, 1.0]]
    )
    np.testing.assert_array_equal(
        on_mask(points, mask), [True, True, False, False, False, False, False]
    )


def test_roi_object_is_the_best_iou_box_above_one_half() -> None:
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 12], [50, 50, 60, 60]], dtype=np.float64)
    np.testing.assert_allclose(box_iou([0, 0, 10, 11], boxes), [100 / 110, 110 / 120, 0.0])
    assert match_object([0, 0, 10, 11], boxes) == (1, pytest.approx(110 / 120))
    assert match_object([0, 0, 10, 10], boxes)[0] == 0  # ties and exact matches: the first best box
    assert match_object([0, 0, 10, 30], boxes)[0] is None  # IoU 0.4 with box 1: no object
    assert match_object([0, 0, 10, 10], np.zeros((0, 4)))[0] is None


# A model whose deformable PS RoI pooling (class-agnostic offsets, 3x3 bins, 2x2 samples per bin,
# spatial_scale 1, trans_std 0.1) moves bin (i, j) by (4.5 - 4 j, 4.5 - 4 i) pixels: for the
# RoI (0, 0, 11, 11) the op pools [0, 12] x [0, 12] (x2 inclusive), bins are 4 px wide, samples
# sit at bin start + {0, 2}; every bin's samples move to {4.5, 6.5}^2, inside the centre bin's
# pixels [4, 8) x [4, 8) (half a pixel from any pixel edge, so float rounding cannot matter).
MODEL_SOURCE = """
import torch
from torch import nn

from dcn_inspect.ops import DeformPSRoIPool


class CentreSeeker(nn.Module):
    def __init__(self):
        super().__init__()
        self.pool = DeformPSRoIPool(
            1.0,
            output_dim=1,
            group_size=3,
            pooled_size=3,
            part_size=3,
            sample_per_part=2,
            trans_std=0.1,
        )
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, images, rois=None):
        out = {"features": images}
        if rois is not None:
            # the op's RoI width in cells (scale 1)
            roi_w = torch.round(rois[:, 3]) + 1 - torch.round(rois[:, 1])
            roi_h = torch.round(rois[:, 4]) + 1 - torch.round(rois[:, 2])
            index = torch.arange(3, dtype=images.dtype)
            dx = ((4.5 - 4 * index)[None, None, :] / (0.1 * roi_w[:, None, None])).expand(-1, 3, 3)
            dy = ((4.5 - 4 * index)[None, :, None] / (0.1 * roi_h[:, None, None])).expand(-1, 3, 3)
            trans = torch.stack([dx, dy], dim=1)  # [R, 2, 3, 3], x first
            features = (images[:, :1] * 0 + 1).expand(-1, 9, -1, -1).contiguous()
            out["roi_logits"] = self.pool(features, rois, trans).mean((2, 3)) + self.anchor
        return out


def build():
    return CentreSeeker()
"""

SIDE = 12
CENTRE_SQUARE = [[4, 4, 8, 4, 8, 8, 4, 8]]  # pixels 4..7 in both directions: exactly the centre bin
WHOLE_BOX = [[0, 0, 12, 0, 12, 12, 0, 12]]


@pytest.fixture(scope="module")
def seeker(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    root = tmp_path_factory.mktemp("foreground")
    model_file = root / "seeker.py"
    model_file.write_text(MODEL_SOURCE)
    spec = importlib.util.spec_from_file_location("seeker_models", model_file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    images = root / "images"
    images.mkdir()
    for name in ("one.png", "two.png"):
        Image.fromarray(np.full((SIDE, SIDE, 3), 128, dtype=np.uint8)).save(images / name)
    centre_rle = np.zeros((SIDE, SIDE), dtype=bool)
    centre_rle[4:8, 4:8] = True
    coco = {
        "images": [
            {"id": 1, "file_name": "one.png", "width": SIDE, "height": SIDE},
            {"id": 2, "file_name": "two.png", "width": SIDE, "height": SIDE},
        ],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "bbox": [0, 0, 11, 11],
                "segmentation": CENTRE_SQUARE,
            },
            {
                "id": 2,
                "image_id": 1,
                "category_id": 2,
                "bbox": [0, 0, 11, 11],
                "segmentation": WHOLE_BOX,
            },
            {
                "id": 3,
                "image_id": 2,
                "category_id": 1,
                "bbox": [0, 0, 11, 11],
                "segmentation": {
                    "size": [SIDE, SIDE],
                    "counts": _rle_string(_rle_counts(centre_rle)),
                },
            },
            {
                "id": 4,
                "image_id": 2,
                "category_id": 2,
                "bbox": [0, 0, 11, 11],
                "iscrowd": 1,
                "segmentation": {"size": [SIDE, SIDE], "counts": _rle_counts(~centre_rle)},
            },
            {"id": 5, "image_id": 2, "category_id": 2, "bbox": [6, 6, 5, 5]},
        ],
        "categories": [{"id": 1, "name": "core"}, {"id": 2, "name": "block"}],
    }
    annotations = images / "annotations.json"
    annotations.write_text(json.dumps(coco))
    return {
        "root": root,
        "model_file": model_file,
        "module": module,
        "images": images,
        "annotations": annotations,
    }


def _seeker(ws: Dict[str, Any]) -> LoadedModel:
    return LoadedModel(
        ws["module"].build().eval(),
        "seeker",
        None,
        {},
        Preprocess(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)),
        "user-file",
    )


def test_foreground_fraction_of_bins_moved_onto_a_known_object(
    seeker: Dict[str, Any], tmp_path: Path
) -> None:
    result = bins(
        [seeker["images"] / "one.png"], model=_seeker(seeker), annotations=seeker["annotations"],
        rois=["0,0,11,12", "8,8,11,11"], out=tmp_path, progress=False,
    )  # fmt: skip
    table = pd.read_csv(result.images[0].csv)
    summary = json.loads(result.summary.read_text())
    rois = summary["images"][0]["rois"]
    # RoI 0 (typed) belongs to the best-IoU annotated box (box 0, IoU 121/132); RoI 1 to none
    # (IoU 9/121 with both boxes, below one half).
    assert rois[0]["object"] == {
        "index": 0,
        "matched_by": "best IoU",
        "iou": pytest.approx(121 / 132),
        "label": "core",
    }
    assert rois[1]["object"] is None and "fg_regular" not in rois[1]["classes"][0]
    assert table[table["roi"] == 1][["fg_regular", "fg_deformed"]].isna().all().all()
    # RoI 2: annotated box 0, its mask the centre bin. Regular bins: only the centre bin's 4 of
    # 36 sampling points are on it; deformed: every bin moved onto it.
    centre = table[table["roi"] == 2].set_index(["bin_row", "bin_col"])
    assert rois[2]["object"]["matched_by"] == "annotation"
    expected_regular = np.zeros((3, 3))
    expected_regular[1, 1] = 1.0
    np.testing.assert_allclose(centre["fg_regular"].to_numpy().reshape(3, 3), expected_regular)
    np.testing.assert_allclose(centre["fg_deformed"].to_numpy().reshape(3, 3), np.ones((3, 3)))
    assert rois[2]["classes"][0]["fg_regular"] == pytest.approx(1 / 9)
    assert rois[2]["classes"][0]["fg_deformed"] == pytest.approx(1.0)
    assert rois[2]["classes"][0]["gain"] == pytest.approx(8 / 9)
    # RoI 3: box 1, whose mask covers the whole pooled extent: every point on it either way.
    assert (rois[3]["classes"][0]["fg_regular"], rois[3]["classes"][0]["fg_deformed"]) == (
        pytest.approx(1.0),
        pytest.approx(1.0),
    )
    # The bins' shifts are the moves the model asked for.
    np.testing.assert_allclose(
        centre["dx"].to_numpy().reshape(3, 3), np.tile([4.5, 0.5, -3.5], (3, 1)), atol=1e-5
    )
    overall = summary["foreground"]["table"][-1]
    assert overall["group"] == "all" and overall["rois"] == 3


def test_bins_dataset_table_per_class_and_overall(seeker: Dict[str, Any], tmp_path: Path) -> None:
    result = bins([seeker["annotations"]], model=_seeker(seeker), out=tmp_path, progress=False)
    assert result.images == [] and sorted(p.name for p in tmp_path.iterdir()) == [
        "foreground_rois.csv", "foreground_table.csv", "foreground_table.md", "summary.json",
    ]  # fmt: skip
    per_roi = pd.read_csv(tmp_path / "foreground_rois.csv")
    assert list(per_roi.columns) == FOREGROUND_ROI_COLUMNS
    # Measured: image one's core (polygon) and block (whole box), image two's core (compressed
    # RLE); image two's block is a crowd RLE (left out) and its small box has no mask.
    assert per_roi[["image", "roi", "label"]].values.tolist() == [
        ["one.png", 0, "core"],
        ["one.png", 1, "block"],
        ["two.png", 0, "core"],
    ]
    table = pd.read_csv(tmp_path / "foreground_table.csv").set_index("group")
    assert list(table.reset_index().columns) == TABLE_COLUMNS and list(table.index) == [
        "core",
        "block",
        "all",
    ]
    assert table.loc["core", ["rois", "images"]].tolist() == [2, 2]
    np.testing.assert_allclose(
        table.loc["core", ["fg_regular", "fg_deformed", "gain", "improved"]],
        [1 / 9, 1, 8 / 9, 1],
        atol=1e-6,
    )
    np.testing.assert_allclose(
        table.loc["block", ["fg_regular", "fg_deformed", "gain", "improved"]],
        [1, 1, 0, 0],
        atol=1e-6,
    )
    np.testing.assert_allclose(
        table.loc["all", ["fg_regular", "fg_deformed", "gain", "improved"]],
        [11 / 27, 1, 16 / 27, 2 / 3],
        atol=1e-6,
    )
    assert table.loc["core", "gain_ci_low"] == pytest.approx(8 / 9) and table.loc[
        "core", "gain_ci_high"
    ] == pytest.approx(8 / 9)
    markdown = (tmp_path / "foreground_table.md").read_text()
    assert "| core | 2 | 2 | 11.1 % | 100.0 % | +88.9 pt [+88.9, +88.9] | 100 % |" in markdown
    summary = json.loads(result.summary.read_text())
    assert summary["rois"] == {"total": 5, "measured": 3, "without_mask": 1, "ignored_boxes": 1}
    assert summary["images"] == {"used": 2, "without_boxes": 0}
    assert [row["group"] for row in summary["foreground"]["table"]] == ["core", "block", "all"]


def test_a_class_seen_in_one_image_prints_its_image_count_and_no_interval(
    seeker: Dict[str, Any], tmp_path: Path
) -> None:
    # "block" is measured in one image only (image two's block is a crowd box): a bootstrap over
    # one image draws it every time, a zero-width interval that must not be printed as real.
    result = bins([seeker["annotations"]], model=_seeker(seeker), out=tmp_path, progress=False)
    table = pd.read_csv(tmp_path / "foreground_table.csv", keep_default_na=False).set_index("group")
    assert table.loc["block", ["rois", "images"]].tolist() == [1, 1]
    assert table.loc["block", ["gain_ci_low", "gain_ci_high"]].tolist() == ["", ""]
    assert table.loc["core", "images"] == 2 and table.loc["core", "gain_ci_low"] != ""
    markdown = (tmp_path / "foreground_table.md").read_text()
    assert "| class | RoIs | images | regular bins |" in markdown
    assert "| block | 1 | 1 | 100.0 % | 100.0 % | +0.0 pt | 0 % |" in markdown
    summary = json.loads(result.summary.read_text())
    block = next(row for row in summary["foreground"]["table"] if row["group"] == "block")
    assert (block["images"], block["gain_ci_low"], block["gain_ci_high"]) == (1, None, None)
    # The console table: the image count, no interval for block, one line per row in 80 columns.
    from rich.console import Console

    from dcn_inspect.report.tables import foreground_console_table

    console = Console(width=80, record=True, file=io.StringIO())
    console.print(foreground_console_table(result.foreground))
    lines = console.export_text().splitlines()
    block_line = next(line for line in lines if line.startswith("block"))
    assert block_line.split() == ["block", "1", "1", "100.0", "%", "100.0", "%", "+0.0", "pt",
                                  "0", "%"]  # fmt: skip
    assert max(len(line) for line in lines) <= 80 and len(lines) == 2 + 3 + 1  # title, head


def test_gain_interval_over_two_images_spans_their_two_gains() -> None:
    # Two images, one RoI each: resampled means are g1, (g1 + g2) / 2 or g2, and each extreme is
    # drawn with probability 1/4 > 2.5 %, so the 95 % interval is exactly [g1, g2]. One image
    # (three RoIs of class "one"): no interval.
    from dcn_inspect.analysis.bins_foreground import foreground_table

    rois = pd.DataFrame(
        [
            ["a.png", 0, "two", "two", 0.5, 0.6],
            ["b.png", 0, "two", "two", 0.5, 0.9],
            ["c.png", 0, "one", "one", 0.2, 0.3],
            ["c.png", 1, "one", "one", 0.2, 0.4],
            ["c.png", 2, "one", "one", 0.2, 0.2],
        ],
        columns=["image", "roi", "label", "class", "fg_regular", "fg_deformed"],
    )
    table = foreground_table(rois).set_index("group")
    assert table.loc["two", ["gain_ci_low", "gain_ci_high"]].tolist() == pytest.approx([0.1, 0.4])
    assert table.loc["one", "images"] == 1 and table.loc["one", "gain"] == pytest.approx(0.1)
    assert np.isnan(table.loc["one", ["gain_ci_low", "gain_ci_high"]].astype(float)).all()
    assert table.loc["all", "images"] == 3 and np.isfinite(table.loc["all", "gain_ci_low"])


def test_bins_dataset_cli_prints_the_table_and_rejects_a_malformed_mask(
    seeker: Dict[str, Any], tmp_path: Path
) -> None:
    command = [
        sys.executable,
        "-m",
        "dcn_inspect",
        "bins",
        str(seeker["annotations"]),
        "--model",
        f"{seeker['model_file']}:build",
    ]
    done = subprocess.run(
        command + ["--out", str(tmp_path / "ok")], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "core" in done.stdout and "88.9" in done.stdout and "foreground_table.csv" in done.stdout
    bad = json.loads(seeker["annotations"].read_text())
    bad["annotations"][2]["segmentation"]["counts"] = "0T"
    bad_path = seeker["images"] / "bad.json"
    bad_path.write_text(json.dumps(bad))
    done = subprocess.run(
        command[:4] + [str(bad_path)] + command[5:] + ["--out", str(tmp_path / "bad")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"dcn-inspect: error: {bad_path}: annotations[2] (id 3): "
        "compressed RLE 'counts' ends in the middle of a number"
    ]
    assert not (tmp_path / "bad" / "foreground_table.csv").exists()


def test_dataset_options_apply_only_to_a_dataset(seeker: Dict[str, Any], tmp_path: Path) -> None:
    with raises_cli("--max-images applies to a dataset", "bins"):
        bins(
            [seeker["images"] / "one.png"],
            model=_seeker(seeker),
            annotations=seeker["annotations"],
            max_images=1,
            out=tmp_path,
            progress=False,
        )
    with raises_cli("give either image files or one dataset", "bins"):
        bins(
            [seeker["images"] / "one.png", seeker["annotations"]],
            model=_seeker(seeker),
            out=tmp_path,
            progress=False,
        )
    with raises_cli("--class all: the dataset table needs one offset set per RoI", "bins"):
        bins(
            [seeker["annotations"]],
            model=_seeker(seeker),
            class_choice="all",
            out=tmp_path,
            progress=False,
        )


# --------------------------------------------------------------------------------------------
# --class auto


def _head(num_classes: int) -> HeadInfo:
    return HeadInfo(
        "pool", "DeformPSRoIPool", "psroi_pool", 0.125, (3, 3), 0.1, num_classes, True, {}
    )


@pytest.mark.parametrize(
    "names, background",
    [
        (["background", "cat", "dog", "cow"], 0),
        (["cat", "__background__", "dog", "cow"], 1),
        (None, 0),
        (["cat", "dog", "cow", "emu"], None),
    ],
)
def test_auto_and_pred_never_pick_background_when_a_foreground_class_exists(
    names: Any, background: Any
) -> None:
    assert background_index(names, 4) == background
    rng = np.random.default_rng(0)
    logits = torch.from_numpy(rng.normal(size=(200, 4)))
    if background is not None:
        logits[:, background] += 3.0  # background scores highest for most RoIs
    requests = [
        RoIRequest((0.0, 0.0, 10.0, 10.0), label, "test")
        for label in [None, "person", None, "head"] * 50
    ]
    scores = logits.numpy().copy()
    if background is not None:
        scores[:, background] = -np.inf
    for choice in ("auto", "pred"):
        picked = choose_classes(choice, requests, _head(4), names, logits)
        assert [c for _, c, _ in picked.rows] == scores.argmax(axis=1).tolist()
        assert {how for _, _, how in picked.rows} == {"pred"}
        assert picked.top_class == logits.numpy().argmax(axis=1).tolist()
    if background is not None:
        assert sum(t == background for t in picked.top_class) > 150  # the case the rule is for
        # Background only when asked: by index, by name, or all.
        asked = choose_classes(str(background), requests[:2], _head(4), names, logits[:2])
        assert [c for _, c, _ in asked.rows] == [background, background]
        everything = choose_classes("all", requests[:1], _head(4), names, logits[:1])
        assert [c for _, c, _ in everything.rows] == [0, 1, 2, 3]
    # A ground-truth class the model knows wins over the prediction.
    labelled = [RoIRequest((0.0, 0.0, 10.0, 10.0), "dog", "test")]
    known = names or ["background", "cat", "dog", "cow"]
    assert choose_classes("auto", labelled, _head(4), known, logits[:1]).rows == [
        (0, known.index("dog"), "gt")
    ]


def test_class_agnostic_heads_have_no_class_to_choose() -> None:
    picked = choose_classes(
        "auto", [RoIRequest((0.0, 0.0, 1.0, 1.0), None, "t")], _head(1), None, None
    )
    assert picked.rows == [(0, 0, AGNOSTIC)]


def test_bundled_photos_never_show_background_offsets(tmp_path: Path) -> None:
    from dcn_inspect.io import datasets
    from dcn_inspect.models import registry

    weights = registry.get("dcn-sample").bundled_weights
    photos = [p for p in datasets.bundled_images() if p.name.startswith("photo")]
    if weights is None or not Path(weights).is_file() or not photos:
        pytest.skip("the dcn-sample weights or the bundled photographs are not built yet")
    result = bins(photos, out=tmp_path, progress=False)
    summary = json.loads(result.summary.read_text())
    chosen = [c for image in summary["images"] for r in image["rois"] for c in r["classes"]]
    assert len(chosen) == 13 and all(
        c["class"] != "background" and c["chosen_by"] == "pred" for c in chosen
    )
    tops = [r["top_scored_class"] for image in summary["images"] for r in image["rois"]]
    assert "background" in tops  # the model does score background highest for some photo RoIs

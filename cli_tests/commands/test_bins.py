"""``dcn-inspect bins``: regular vs deformed RoI-pooling bins in the pooling ops' own conventions.

The tiny models below have random weights, so the offsets are far from zero. Every check reads
the CSV the command wrote and compares it with what the pooling layer received and returned
in the same forward (captured by a plain forward hook in the test, independently of the
command's own capture).
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Dict, List, Tuple

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import raises_cli
from PIL import Image

from dcn_inspect.commands.bins import CSV_COLUMNS, POINT_COLUMNS, bins
from dcn_inspect.core.errors import InputError
from dcn_inspect.models.loaded_model import LoadedModel
from dcn_inspect.models.registry import Preprocess

MODEL_SOURCE = '''
"""Tiny detectors with deformable RoI pooling heads, for the bins tests (random weights)."""
import torch
from torch import nn

from dcn_inspect.ops import DeformPSRoIPool, DeformRoIPoolPack


def _backbone():
    # Two stride-2 convs: the pooled map is at stride 4 (spatial_scale 1/4).
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.ReLU(),
    )


def _randomise(module, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)


class TinyRFCN(nn.Module):
    """R-FCN head: PS score maps, a PS offset branch pooled without offsets, deformable PS
    pooling."""

    def __init__(self, num_classes=3, class_agnostic=False, k=3, seed=0):
        super().__init__()
        self.backbone = _backbone()
        offset_classes = 1 if class_agnostic else num_classes
        self.score = nn.Conv2d(8, num_classes * k * k, 1)
        self.offset_conv = nn.Conv2d(8, 2 * offset_classes * k * k, 1)
        self.offset_pool = DeformPSRoIPool(
            0.25, output_dim=2 * offset_classes, group_size=k, sample_per_part=2
        )
        self.pool = DeformPSRoIPool(
            0.25, output_dim=num_classes, group_size=k, sample_per_part=2, trans_std=0.1
        )
        _randomise(self, seed)
        self.class_names = ["background", "cat", "dog"][:num_classes]

    def forward(self, images, rois=None):
        features = self.backbone(images)
        out = {"features": features}
        if rois is not None:
            trans = self.offset_pool(self.offset_conv(features), rois)
            out["roi_logits"] = self.pool(self.score(features), rois, trans).mean((2, 3))
        return out


class TinyDeformRoIPool(nn.Module):
    """Faster R-CNN style head with mmcv's DeformRoIPoolPack (offsets from its fc branch)."""

    def __init__(self, seed=1):
        super().__init__()
        self.backbone = _backbone()
        self.pool = DeformRoIPoolPack(
            3,
            output_channels=8,
            deform_fc_channels=16,
            spatial_scale=0.25,
            sampling_ratio=2,
            gamma=0.1,
        )
        self.cls = nn.Linear(8 * 9, 3)
        _randomise(self, seed)

    def forward(self, images, rois=None):
        features = self.backbone(images)
        out = {"features": features}
        if rois is not None:
            out["roi_logits"] = self.cls(self.pool(features, rois).flatten(1))
        return out


class NoRoIHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = _backbone()

    def forward(self, images, rois=None):
        return {"features": self.backbone(images)}


def build():
    return TinyRFCN()


def build_agnostic():
    return TinyRFCN(class_agnostic=True)


def build_mmcv():
    return TinyDeformRoIPool()


def build_plain():
    return NoRoIHead()
'''

IMAGE_HW = (40, 56)
RESIZE = 32  # shorter side 40 -> 32: the model input is 32 x 45, so original != model-input pixels
ROIS = ["5,4,30,33", "-10,-5,20,30", "30.4,12.6,60,44"]  # the last two lie partly outside the image


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    root = tmp_path_factory.mktemp("bins")
    model_file = root / "tiny_models.py"
    model_file.write_text(MODEL_SOURCE)
    spec = importlib.util.spec_from_file_location("tiny_bins_models", model_file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rng = np.random.default_rng(0)
    image = root / "scene.png"
    Image.fromarray(rng.integers(0, 255, (*IMAGE_HW, 3), dtype=np.uint8)).save(image)
    return {"root": root, "model_file": model_file, "module": module, "image": image}


def _loaded(module: ModuleType, builder: str) -> LoadedModel:
    model = getattr(module, builder)().eval()
    return LoadedModel(model, builder, None, {}, Preprocess(), "user-file")


class PoolSpy:
    """Records the last call of a pooling module: its feature map, RoIs, offsets and output."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls: List[Tuple[Tuple[Any, ...], torch.Tensor]] = []
        module.register_forward_hook(lambda mod, args, out: self.calls.append((args, out.detach())))

    @property
    def features(self) -> np.ndarray:
        return self.calls[-1][0][0][0].detach().double().numpy()  # [C, H, W] of batch item 0

    @property
    def output(self) -> np.ndarray:
        return self.calls[-1][1].double().numpy()


def _run(
    ws: Dict[str, Any], loaded: LoadedModel, out: Path, **kwargs: Any
) -> Tuple[pd.DataFrame, Dict[str, Any]]:
    kwargs.setdefault("rois", ROIS)
    kwargs.setdefault("resize", RESIZE)
    result = bins([ws["image"]], model=loaded, out=out, progress=False, **kwargs)
    table = pd.read_csv(result.images[0].csv)
    summary = json.loads(result.summary.read_text())
    return table, summary


def _scales(summary: Dict[str, Any]) -> Tuple[float, float]:
    sx, sy = summary["images"][0]["scale_to_original"]
    assert (sx, sy) == pytest.approx((56 / 45, 40 / 32))
    return sx, sy


def _to_feature(x: np.ndarray, scale: float, spatial_scale: float) -> np.ndarray:
    """Original-image pixels -> the op's feature index (model-input x * spatial_scale - 0.5)."""
    return np.asarray(x) / scale * spatial_scale - 0.5


# --------------------------------------------------------------------------------------------
# Independent bilinear samplers, written from the ops' published semantics (PAPER.md §2)


def _psroi_sample(feature: np.ndarray, channel: int, y: float, x: float) -> float:
    """MSRA deformable PS RoI pooling read: caller checked -0.5 <= x <= W-0.5; clamp, then
    bilinear."""
    height, width = feature.shape[-2:]
    y, x = min(max(y, 0.0), height - 1.0), min(max(x, 0.0), width - 1.0)
    y0, x0 = math.floor(y), math.floor(x)
    y1, x1 = min(y0 + 1, height - 1), min(x0 + 1, width - 1)
    ly, lx = y - y0, x - x0
    f = feature[channel]
    return (
        (1 - ly) * (1 - lx) * f[y0, x0]
        + (1 - ly) * lx * f[y0, x1]
        + ly * (1 - lx) * f[y1, x0]
        + ly * lx * f[y1, x1]
    )


def _roialign_sample(feature: np.ndarray, y: float, x: float) -> np.ndarray:
    """mmcv RoIAlign-style read (all channels): zero beyond one cell outside, else clamped
    bilinear."""
    height, width = feature.shape[-2:]
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return np.zeros(feature.shape[0])
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(math.floor(y)), int(math.floor(x))
    if y0 >= height - 1:
        y0 = y1 = height - 1
        y = float(y0)
    else:
        y1 = y0 + 1
    if x0 >= width - 1:
        x0 = x1 = width - 1
        x = float(x0)
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    return (
        (1 - ly) * (1 - lx) * feature[:, y0, x0]
        + (1 - ly) * lx * feature[:, y0, x1]
        + ly * (1 - lx) * feature[:, y1, x0]
        + ly * lx * feature[:, y1, x1]
    )


def _repool_psroi(
    table: pd.DataFrame,
    features: np.ndarray,
    class_names: List[str],
    k: int,
    per_part: int,
    sx: float,
    sy: float,
) -> np.ndarray:
    """Pool the score maps over the CSV's deformed bins: [R, classes, k, k]."""
    height, width = features.shape[-2:]
    rois = int(table["roi"].max()) + 1
    pooled = np.full((rois, len(class_names), k, k), np.nan)
    for row in table.rename(columns={"class": "cls"}).itertuples(index=False):
        c = class_names.index(row.cls)
        u1 = float(_to_feature(row.bx1, sx, 0.25))
        v1 = float(_to_feature(row.by1, sy, 0.25))
        bin_w = (row.bx2 - row.bx1) / sx * 0.25
        bin_h = (row.by2 - row.by1) / sy * 0.25
        channel = (c * k + row.bin_row) * k + row.bin_col
        total, count = 0.0, 0
        for a in range(per_part):
            for b in range(per_part):
                y = v1 + a * bin_h / per_part
                x = u1 + b * bin_w / per_part
                if -0.5 <= x <= width - 0.5 and -0.5 <= y <= height - 0.5:
                    total += _psroi_sample(features, channel, y, x)
                    count += 1
        pooled[row.roi, c, row.bin_row, row.bin_col] = total / max(count, 1)
    return pooled


# --------------------------------------------------------------------------------------------
# Deformable PS RoI pooling (R-FCN)


def test_csv_columns_units_and_regular_bins_tile_the_rounded_roi(
    workspace: Dict[str, Any], tmp_path: Path
) -> None:
    loaded = _loaded(workspace["module"], "build")
    table, summary = _run(workspace, loaded, tmp_path, class_choice="all")
    csv_path = tmp_path / "scene_bins.csv"
    assert csv_path.read_text().splitlines()[0] == ",".join(
        CSV_COLUMNS
    )  # a plain header; units in summary.json
    described = {c["name"]: c for c in summary["columns"]["<stem>_bins.csv"]}
    assert list(described) == CSV_COLUMNS and described["bx1"]["unit"] == "original-image pixels"
    assert described["dx_norm"]["unit"] == "dimensionless"
    assert list(table.columns) == CSV_COLUMNS
    assert len(table) == len(ROIS) * 3 * 9
    sx, sy = _scales(summary)
    model_rois = [[float(v) for v in r["model_input_box"]] for r in summary["images"][0]["rois"]]
    for roi, group in table[table["class"] == "cat"].groupby("roi"):
        # The op rounds the corners in model-input pixels and treats x2/y2 as inclusive pixels.
        x1, y1, x2, y2 = np.round(np.array(model_rois[roi]))
        expected = np.array([x1 * sx, y1 * sy, (x2 + 1) * sx, (y2 + 1) * sy])
        grid = group.sort_values(["bin_row", "bin_col"])
        xs = grid[["x1", "x2"]].to_numpy().reshape(3, 3, 2)
        ys = grid[["y1", "y2"]].to_numpy().reshape(3, 3, 2)
        # Tiling: shared edges between neighbours, equal sizes, outer edges on the RoI.
        np.testing.assert_allclose(xs[:, :-1, 1], xs[:, 1:, 0], atol=1e-4)
        np.testing.assert_allclose(ys[:-1, :, 1], ys[1:, :, 0], atol=1e-4)
        np.testing.assert_allclose(
            xs[..., 1] - xs[..., 0], (expected[2] - expected[0]) / 3, atol=1e-4
        )
        np.testing.assert_allclose(
            ys[..., 1] - ys[..., 0], (expected[3] - expected[1]) / 3, atol=1e-4
        )
        np.testing.assert_allclose([xs.min(), ys.min(), xs.max(), ys.max()], expected, atol=1e-4)
        # Every class shares the same regular grid.
        for name in ("background", "dog"):
            other = table[(table["class"] == name) & (table["roi"] == roi)].sort_values(
                ["bin_row", "bin_col"]
            )
            np.testing.assert_array_equal(
                other[["x1", "y1", "x2", "y2"]].to_numpy(),
                grid[["x1", "y1", "x2", "y2"]].to_numpy(),
            )
    head = summary["head"]
    assert head["kind"] == "psroi_pool" and head["gamma"] == 0.1 and head["pooled_size"] == [3, 3]
    assert (
        head["offset_classes"] == 3 and head["class_agnostic"] is False and head["layer"] == "pool"
    )
    assert summary["model"]["name"] == "build" and "torch" in summary["versions"]


def test_deformed_bin_is_regular_plus_gamma_times_offset_times_roi_size(
    workspace: Dict[str, Any], tmp_path: Path
) -> None:
    loaded = _loaded(workspace["module"], "build")
    spy = PoolSpy(loaded.model.pool)
    table, summary = _run(workspace, loaded, tmp_path, class_choice="all")
    sx, sy = _scales(summary)
    (features, rois, trans), _ = spy.calls[-1]
    trans = trans.double().numpy().reshape(len(ROIS), 3, 2, 3, 3)  # x first: channel 2c = dx^
    assert np.abs(trans).max() > 0.5, "the test model must produce sizeable offsets"
    names = ["background", "cat", "dog"]
    for row in table.rename(columns={"class": "cls"}).itertuples(index=False):
        c = names.index(row.cls)
        x1, y1, x2, y2 = np.round(rois[row.roi, 1:].double().numpy())
        roi_w, roi_h = (x2 + 1 - x1) * sx, (y2 + 1 - y1) * sy  # the op's RoI size, original pixels
        assert row.dx_norm == pytest.approx(
            trans[row.roi, c, 0, row.bin_row, row.bin_col], rel=1e-5, abs=1e-6
        )
        assert row.dy_norm == pytest.approx(
            trans[row.roi, c, 1, row.bin_row, row.bin_col], rel=1e-5, abs=1e-6
        )
        assert row.dx == pytest.approx(0.1 * row.dx_norm * roi_w, rel=1e-4, abs=1e-4)
        assert row.dy == pytest.approx(0.1 * row.dy_norm * roi_h, rel=1e-4, abs=1e-4)
        np.testing.assert_allclose(
            [row.bx1, row.bx2], [row.x1 + row.dx, row.x2 + row.dx], atol=1e-4
        )
        np.testing.assert_allclose(
            [row.by1, row.by2], [row.y1 + row.dy, row.y2 + row.dy], atol=1e-4
        )


def test_pooling_over_csv_bins_reproduces_the_op_output(
    workspace: Dict[str, Any], tmp_path: Path
) -> None:
    loaded = _loaded(workspace["module"], "build")
    spy = PoolSpy(loaded.model.pool)
    table, summary = _run(workspace, loaded, tmp_path, class_choice="all")
    sx, sy = _scales(summary)
    repooled = _repool_psroi(
        table, spy.features, ["background", "cat", "dog"], k=3, per_part=2, sx=sx, sy=sy
    )
    np.testing.assert_allclose(repooled, spy.output, rtol=1e-4, atol=1e-4)
    # RoIs partly outside: bins reach negative coordinates and past the image's right edge.
    assert table["bx1"].min() < 0 and table["by1"].min() < 0 and table["x2"].max() > IMAGE_HW[1]


def test_sampling_points_csv_matches_bins(workspace: Dict[str, Any], tmp_path: Path) -> None:
    loaded = _loaded(workspace["module"], "build")
    spy = PoolSpy(loaded.model.pool)
    table, summary = _run(workspace, loaded, tmp_path, class_choice="cat", points=True)
    sx, sy = _scales(summary)
    points = pd.read_csv(tmp_path / "scene_bin_points.csv")
    assert list(points.columns) == POINT_COLUMNS
    assert len(points) == len(table) * 4  # sample_per_part = 2
    merged = points.merge(table, on=["roi", "class", "bin_row", "bin_col"])
    a, b = merged["point"] // 2, merged["point"] % 2
    np.testing.assert_allclose(
        merged["x"], merged["bx1"] + b * (merged["bx2"] - merged["bx1"]) / 2, atol=1e-4
    )
    np.testing.assert_allclose(
        merged["y"], merged["by1"] + a * (merged["by2"] - merged["by1"]) / 2, atol=1e-4
    )
    height, width = spy.features.shape[-2:]
    u = _to_feature(merged["x"].to_numpy(), sx, 0.25)
    v = _to_feature(merged["y"].to_numpy(), sy, 0.25)
    expected_inside = (u >= -0.5) & (u <= width - 0.5) & (v >= -0.5) & (v <= height - 0.5)
    np.testing.assert_array_equal(merged["inside"].to_numpy().astype(bool), expected_inside)
    assert 0 < expected_inside.sum() < len(expected_inside)


def test_class_choices_for_class_specific_offsets(
    workspace: Dict[str, Any], tmp_path: Path
) -> None:
    module = workspace["module"]
    loaded = _loaded(module, "build")
    all_table, _ = _run(workspace, loaded, tmp_path / "all", class_choice="all")

    def rows_of(table: pd.DataFrame) -> pd.DataFrame:
        return table.set_index(["roi", "class", "bin_row", "bin_col"]).sort_index()

    every = rows_of(all_table)
    # An explicit class (by name or index) picks that class's offsets for every RoI.
    dog, _ = _run(workspace, loaded, tmp_path / "dog", class_choice="dog")
    two, _ = _run(workspace, loaded, tmp_path / "two", class_choice="2")
    assert set(dog["class"]) == {"dog"} and len(dog) == len(ROIS) * 9
    pd.testing.assert_frame_equal(rows_of(dog), every.loc[rows_of(dog).index])
    pd.testing.assert_frame_equal(rows_of(two), rows_of(dog))
    # Classes differ: the same bin moves differently for cat and dog.
    cat, _ = _run(workspace, loaded, tmp_path / "cat", class_choice="cat")
    assert not np.allclose(cat["dx_norm"].to_numpy(), dog["dx_norm"].to_numpy())
    # gt: the class column of a RoI CSV.
    rois_csv = tmp_path / "rois.csv"
    rois_csv.write_text("x1,y1,x2,y2,class\n5,4,30,33,dog\n-10,-5,20,30,cat\n")
    gt, summary = _run(
        workspace, loaded, tmp_path / "gt", rois=(), rois_file=rois_csv, class_choice="gt"
    )
    assert gt.groupby("roi")["class"].first().tolist() == ["dog", "cat"]
    assert [r["classes"][0]["chosen_by"] for r in summary["images"][0]["rois"]] == ["gt", "gt"]
    pd.testing.assert_frame_equal(rows_of(gt), every.loc[rows_of(gt).index])
    # auto without labels: the foreground class the model scores highest for the RoI (never
    # background, class 0 here, although the model scores it highest for one of these RoIs).
    spy = PoolSpy(loaded.model.pool)
    auto, summary = _run(workspace, loaded, tmp_path / "auto")
    scores = spy.output.mean(axis=(2, 3))
    assert 0 in scores.argmax(axis=1).tolist(), (
        "the test needs an RoI where background scores highest"
    )
    assert auto.groupby("roi")["class"].first().tolist() == [
        ["cat", "dog"][p] for p in scores[:, 1:].argmax(axis=1)
    ]
    assert {c["chosen_by"] for r in summary["images"][0]["rois"] for c in r["classes"]} == {"pred"}
    assert [r["top_scored_class"] for r in summary["images"][0]["rois"]] == [
        ["background", "cat", "dog"][p] for p in scores.argmax(axis=1)
    ]
    with raises_cli("--class 'horse'", "bins"):
        _run(workspace, loaded, tmp_path / "bad", class_choice="horse")
    with raises_cli("--class gt: --roi 5,4,30,33 has no class", "bins"):
        _run(workspace, loaded, tmp_path / "bad", class_choice="gt")


def test_class_agnostic_offsets(workspace: Dict[str, Any], tmp_path: Path) -> None:
    loaded = _loaded(workspace["module"], "build_agnostic")
    spy = PoolSpy(loaded.model.pool)
    table, summary = _run(workspace, loaded, tmp_path, class_choice="all")
    assert set(table["class"]) == {"agnostic"} and len(table) == len(ROIS) * 9
    assert summary["head"]["class_agnostic"] is True and summary["head"]["offset_classes"] == 1
    trans = spy.calls[-1][0][2].double().numpy()  # [R, 2, 3, 3]
    grid = table.sort_values(["roi", "bin_row", "bin_col"])
    np.testing.assert_allclose(
        grid["dx_norm"].to_numpy(), trans[:, 0].reshape(-1), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        grid["dy_norm"].to_numpy(), trans[:, 1].reshape(-1), rtol=1e-5, atol=1e-6
    )
    # Every output class reads the same deformed bins: re-pool each with the shared rows.
    sx, sy = _scales(summary)
    names = ["background", "cat", "dog"]
    copies = pd.concat([grid.assign(**{"class": name}) for name in names])
    repooled = _repool_psroi(copies, spy.features, names, k=3, per_part=2, sx=sx, sy=sy)
    np.testing.assert_allclose(repooled, spy.output, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------
# Deformable RoI pooling (mmcv DeformRoIPoolPack layout)


def test_mmcv_deform_roi_pool_bins(workspace: Dict[str, Any], tmp_path: Path) -> None:
    loaded = _loaded(workspace["module"], "build_mmcv")
    spy = PoolSpy(loaded.model.pool)
    fc_spy = PoolSpy(loaded.model.pool.offset_fc)  # the offset branch's output, [R, 2*3*3]
    table, summary = _run(workspace, loaded, tmp_path, points=True)
    sx, sy = _scales(summary)
    assert summary["head"]["kind"] == "roi_pool" and summary["head"]["class_agnostic"] is True
    assert set(table["class"]) == {"agnostic"}
    features = spy.features
    requested = np.array([[float(v) for v in r.split(",")] for r in ROIS])
    pooled = np.zeros_like(spy.output)
    for roi, group in table.groupby("roi"):
        grid = group.sort_values(["bin_row", "bin_col"])
        # Regular bins tile the RoI exactly (no rounding in this op).
        xs = grid[["x1", "x2"]].to_numpy().reshape(3, 3, 2)
        ys = grid[["y1", "y2"]].to_numpy().reshape(3, 3, 2)
        np.testing.assert_allclose(xs[:, :-1, 1], xs[:, 1:, 0], atol=1e-4)
        np.testing.assert_allclose(ys[:-1, :, 1], ys[1:, :, 0], atol=1e-4)
        x1, y1, x2, y2 = requested[roi]
        np.testing.assert_allclose(
            [xs.min(), ys.min(), xs.max(), ys.max()], [x1, y1, x2, y2], atol=1e-4
        )
        # Shift = gamma * offset * RoI size.
        np.testing.assert_allclose(
            grid["dx"], 0.1 * grid["dx_norm"] * (x2 - x1), rtol=1e-4, atol=1e-4
        )
        np.testing.assert_allclose(
            grid["dy"], 0.1 * grid["dy_norm"] * (y2 - y1), rtol=1e-4, atol=1e-4
        )
        np.testing.assert_allclose(grid["bx1"], grid["x1"] + grid["dx"], atol=1e-4)
        # Independent RoIAlign-style pooling over the CSV's deformed bins (2 x 2 samples, centred).
        for row in grid.itertuples(index=False):
            u1, v1 = float(_to_feature(row.bx1, sx, 0.25)), float(_to_feature(row.by1, sy, 0.25))
            bin_w, bin_h = (row.bx2 - row.bx1) / sx * 0.25, (row.by2 - row.by1) / sy * 0.25
            values = [
                _roialign_sample(features, v1 + (a + 0.5) * bin_h / 2, u1 + (b + 0.5) * bin_w / 2)
                for a in range(2)
                for b in range(2)
            ]
            pooled[roi, :, row.bin_row, row.bin_col] = np.mean(values, axis=0)
    np.testing.assert_allclose(pooled, spy.output, rtol=1e-4, atol=1e-4)
    # The offsets are the ones the fc branch fed the op (x first).
    offset = fc_spy.output.reshape(len(ROIS), 2, 3, 3)
    grid = table.sort_values(["roi", "bin_row", "bin_col"])
    np.testing.assert_allclose(
        grid["dx_norm"].to_numpy(), offset[:, 0].reshape(-1), rtol=1e-5, atol=1e-6
    )
    assert np.abs(offset).max() > 0.1
    # mmcv samples the centres of a sampling_ratio x sampling_ratio grid of sub-cells.
    points = pd.read_csv(tmp_path / "scene_bin_points.csv")
    assert len(points) == len(table) * 4
    merged = points.merge(table, on=["roi", "class", "bin_row", "bin_col"])
    a, b = merged["point"] // 2, merged["point"] % 2
    np.testing.assert_allclose(
        merged["x"], merged["bx1"] + (b + 0.5) * (merged["bx2"] - merged["bx1"]) / 2, atol=1e-4
    )
    np.testing.assert_allclose(
        merged["y"], merged["by1"] + (a + 0.5) * (merged["by2"] - merged["by1"]) / 2, atol=1e-4
    )


# --------------------------------------------------------------------------------------------
# Inputs, errors and reproducibility


def test_inverted_roi_is_an_input_error_and_writes_nothing(
    workspace: Dict[str, Any], tmp_path: Path
) -> None:
    loaded = _loaded(workspace["module"], "build")
    with raises_cli(r"--roi 30,4,5,33: RoI 30,4,5,33 has x2 < x1", "bins"):
        bins(
            [workspace["image"]],
            model=loaded,
            rois=["30,4,5,33"],
            out=tmp_path / "out",
            progress=False,
        )
    with raises_cli(r"--roi '1,2,3': expected four numbers", "bins"):
        bins(
            [workspace["image"]], model=loaded, rois=["1,2,3"], out=tmp_path / "out", progress=False
        )
    assert not (tmp_path / "out").exists()


def test_model_without_deformable_roi_pooling_is_an_input_error(
    workspace: Dict[str, Any], tmp_path: Path
) -> None:
    loaded = _loaded(workspace["module"], "build_plain")
    with pytest.raises(InputError, match="no deformable RoI pooling layer ran"):
        bins([workspace["image"]], model=loaded, rois=ROIS[:1], out=tmp_path, progress=False)


def test_annotations_give_the_rois_and_their_classes(
    workspace: Dict[str, Any], tmp_path: Path
) -> None:
    coco = {
        "images": [
            {"id": 7, "file_name": "scene.png", "width": IMAGE_HW[1], "height": IMAGE_HW[0]}
        ],
        "annotations": [
            {
                "id": 1,
                "image_id": 7,
                "category_id": 2,
                "bbox": [5, 4, 25, 29],
                "iscrowd": 0,
                "area": 725,
            },
            {
                "id": 2,
                "image_id": 7,
                "category_id": 1,
                "bbox": [20, 10, 30, 25],
                "iscrowd": 0,
                "area": 750,
            },
        ],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
    }
    annotation = tmp_path / "instances.json"
    annotation.write_text(json.dumps(coco))
    loaded = _loaded(workspace["module"], "build")
    table, summary = _run(
        workspace, loaded, tmp_path / "out", rois=(), annotations=annotation, class_choice="gt"
    )
    assert table.groupby("roi")["class"].first().tolist() == ["dog", "cat"]
    assert [r["box"] for r in summary["images"][0]["rois"]] == [[5, 4, 30, 33], [20, 10, 50, 35]]
    with pytest.raises(InputError, match="no entry for image other.png"):
        other = tmp_path / "other.png"
        Image.open(workspace["image"]).save(other)
        bins([other], model=loaded, annotations=annotation, out=tmp_path / "x", progress=False)


def test_boxes_are_read_as_sample_points_reads_them(
    workspace: Dict[str, Any], tmp_path: Path
) -> None:
    # The same option and file formats as sample-points --boxes: a CSV, or a COCO json whose crowd
    # boxes are left out (annotations= takes every box).
    coco = {
        "images": [
            {"id": 7, "file_name": "scene.png", "width": IMAGE_HW[1], "height": IMAGE_HW[0]}
        ],
        "annotations": [
            {
                "id": 1,
                "image_id": 7,
                "category_id": 2,
                "bbox": [5, 4, 25, 29],
                "iscrowd": 0,
                "area": 725,
            },
            {
                "id": 2,
                "image_id": 7,
                "category_id": 1,
                "bbox": [0, 0, 40, 40],
                "iscrowd": 1,
                "area": 1600,
            },
            {
                "id": 3,
                "image_id": 7,
                "category_id": 1,
                "bbox": [20, 10, 30, 25],
                "iscrowd": 0,
                "area": 750,
            },
        ],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
    }
    annotation = tmp_path / "instances.json"
    annotation.write_text(json.dumps(coco))
    boxes_csv = tmp_path / "boxes.csv"
    boxes_csv.write_text("x1,y1,x2,y2,class\n5,4,30,33,dog\n20,10,50,35,cat\n")
    loaded = _loaded(workspace["module"], "build")
    from_json, summary = _run(
        workspace, loaded, tmp_path / "json", rois=(), boxes=annotation, class_choice="gt"
    )
    from_csv, _ = _run(
        workspace, loaded, tmp_path / "csv", rois=(), boxes=boxes_csv, class_choice="gt"
    )
    from_rois, _ = _run(
        workspace, loaded, tmp_path / "rois", rois=(), rois_file=boxes_csv, class_choice="gt"
    )
    assert [r["box"] for r in summary["images"][0]["rois"]] == [[5, 4, 30, 33], [20, 10, 50, 35]]
    pd.testing.assert_frame_equal(from_json, from_csv)
    pd.testing.assert_frame_equal(from_csv, from_rois)
    every, _ = _run(
        workspace, loaded, tmp_path / "all", rois=(), annotations=annotation, class_choice="gt"
    )
    assert every["roi"].nunique() == 3  # the crowd box too
    with raises_cli(r"--boxes .*missing.json: file not found", "bins"):
        _run(workspace, loaded, tmp_path / "bad", boxes=tmp_path / "missing.json")


def test_outputs_are_reproducible(workspace: Dict[str, Any], tmp_path: Path) -> None:
    loaded = _loaded(workspace["module"], "build")
    for name in ("a", "b"):
        bins(
            [workspace["image"]],
            model=loaded,
            rois=ROIS,
            class_choice="all",
            points=True,
            out=tmp_path / name,
            progress=False,
        )
    for file in ("scene_bins.csv", "scene_bin_points.csv", "scene_bins.png"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes(), file


def test_cli_with_user_model_file(workspace: Dict[str, Any], tmp_path: Path) -> None:
    pytest.importorskip("dcn_inspect.models.importers")
    out = tmp_path / "cli"
    command = [
        sys.executable, "-m", "dcn_inspect", "bins", str(workspace["image"]),
        "--model", f"{workspace['model_file']}:build", "--roi", ROIS[0], "--roi", ROIS[1],
        "--class", "dog", "--overlay", "--points", "--format", "svg", "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "scene_bin_points.csv",
        "scene_bins.csv",
        "scene_bins.svg",
        "summary.json",
    ]
    table = pd.read_csv(out / "scene_bins.csv")
    assert set(table["class"]) == {"dog"} and len(table) == 18
    bad = subprocess.run(
        command[:5]
        + [
            "--model",
            f"{workspace['model_file']}:build",
            "--roi",
            "9,9,1,20",
            "--out",
            str(tmp_path / "bad"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [
        "dcn-inspect: error: --roi 9,9,1,20: RoI 9,9,1,20 has x2 < x1"
    ]


def test_help_shows_an_example() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "dcn_inspect", "bins", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0
    assert "Example: dcn-inspect bins" in done.stdout and "--class" in done.stdout


def test_default_demo_uses_bundled_images_annotations_and_gt_classes(tmp_path: Path) -> None:
    from dcn_inspect.io import datasets
    from dcn_inspect.io.annotations import annotation_for_image
    from dcn_inspect.models import registry
    from dcn_inspect.models.demo_net import CLASS_NAMES

    weights = registry.get("dcn-sample").bundled_weights
    images = [p for p in datasets.bundled_images() if p.name.startswith(("scene", "photo"))]
    if weights is None or not Path(weights).is_file() or not images:
        pytest.skip("the dcn-sample weights or the bundled demo images are not built yet")
    # One generated scene (shape classes the model knows) and one photograph (classes it does not).
    picked = [
        next(p for p in images if p.name.startswith("scene")),
        next(p for p in images if p.name.startswith("photo")),
    ]
    result = bins(picked, out=tmp_path, progress=False)
    summary = json.loads(result.summary.read_text())
    assert (
        summary["head"]["kind"] == "psroi_pool"
        and summary["head"]["offset_classes"] == len(CLASS_NAMES) + 1
    )
    assert summary["model"]["checkpoint_sha256"]
    for item, image_summary in zip(result.images, summary["images"]):
        entry = annotation_for_image(datasets.bundled_images_annotations(), item.image)
        assert entry is not None and len(entry.boxes) > 0
        assert len(item.table) == len(entry.boxes) * 9
        # auto: the annotated class where the model has it, else the most confident foreground
        # class.
        chosen = item.table.groupby("roi")["class"].first().tolist()
        for label, name, roi in zip(entry.labels, chosen, image_summary["rois"]):
            if label in CLASS_NAMES:
                assert name == label and roi["classes"][0]["chosen_by"] == "gt"
            else:
                assert roi["classes"][0]["chosen_by"] == "pred" and name in CLASS_NAMES


def test_psroi_corner_rounding_is_half_away_from_zero() -> None:
    """The MSRA op rounds RoI corners with C round(): 2.5 -> 3 and -1.5 -> -2 (not to even)."""
    from dcn_inspect.analysis.bins import roi_bins
    from dcn_inspect.capture.records import RoIPoolRecord

    params = {
        "spatial_scale": 0.25,
        "output_dim": 1,
        "group_size": 2,
        "pooled_size": 2,
        "part_size": 2,
        "sample_per_part": 2,
        "trans_std": 0.1,
    }
    rois = torch.tensor([[0.0, 2.5, -1.5, 9.5, 6.4]])
    record = RoIPoolRecord(
        "pool", "DeformPSRoIPool", "psroi_pool", rois, None, params, (8, 8), None
    )
    geometry = roi_bins(record)
    # Extent [round(x1), round(x2) + 1] in model-input pixels: x in [3, 11], y in [-2, 7].
    np.testing.assert_allclose(geometry.op_rois[0], [3.0, -2.0, 11.0, 7.0])
    np.testing.assert_allclose(geometry.regular[0, 0, :, 0], [3.0, 7.0])
    np.testing.assert_allclose(geometry.regular[0, :, 0, 1], [-2.0, 2.5])
    np.testing.assert_array_equal(geometry.deformed, geometry.regular)  # no offsets: no shift


# --------------------------------------------------------------------------------------------
# Issue 21: RoIs outside the image, the figure's marks, panels, legend and title


@pytest.mark.parametrize(
    "rois, rois_csv, message",
    [
        (["500,500,600,600"], None, r"^--roi 500,500,600,600: RoI 500,500,600,600 lies entirely "
         r"outside scene\.png \(56x40 pixels\)$"),
        (["5,4,30,33", "56,0,70,10"], None, r"^--roi 56,0,70,10: RoI 56,0,70,10 lies entirely "
         r"outside scene\.png"),  # touching the right border from outside: no pixel pooled
        ([], "x1,y1,x2,y2\n5,4,30,33\n-30,-20,-1,-2\n", r"^--rois .*rois\.csv box 1: RoI "
         r"-30,-20,-1,-2 lies entirely outside scene\.png \(56x40 pixels\)$"),
    ],
)  # fmt: skip
def test_roi_entirely_outside_the_image_is_refused_and_writes_nothing(
    workspace: Dict[str, Any], tmp_path: Path, rois: List[str], rois_csv: Any, message: str
) -> None:
    rois_file = None
    if rois_csv is not None:
        rois_file = tmp_path / "rois.csv"
        rois_file.write_text(rois_csv)
    out = tmp_path / "out"
    with raises_cli(message, "bins"):
        bins(
            [workspace["image"]],
            model=_loaded(workspace["module"], "build"),
            rois=rois,
            rois_file=rois_file,
            out=out,
            progress=False,
        )
    assert not out.exists() or not any(out.iterdir())


def test_roi_partly_outside_the_image_is_still_pooled(
    workspace: Dict[str, Any], tmp_path: Path
) -> None:
    # Overlapping the image by one pixel column: allowed, as before.
    table, summary = _run(
        workspace, _loaded(workspace["module"], "build"), tmp_path, rois=["-20,-20,1,50"]
    )
    assert len(table) == 9 and summary["images"][0]["rois"][0]["box"] == [-20, -20, 1, 50]


def _rgb(colour: str) -> np.ndarray:
    return np.array([int(colour[k : k + 2], 16) for k in (1, 3, 5)], dtype=np.float64)


def _rendered(fig: Any) -> np.ndarray:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].astype(np.float64)


def _stands_out(fig: Any, ax: Any, x: float, y: float, background: np.ndarray) -> bool:
    """Whether, within 3 screen pixels of data point (x, y), some pixel of the rendered figure
    differs clearly from ``background`` (the colour of the image under it)."""
    pixels = _rendered(fig)
    column, row_from_bottom = ax.transData.transform((x, y))
    row = pixels.shape[0] - row_from_bottom
    r, c = int(round(row)), int(round(column))
    window = pixels[r - 3 : r + 4, c - 3 : c + 4]
    return bool((np.abs(window - background).max(axis=-1) > 100).any())


def test_deformed_bins_and_sampling_points_stay_visible_on_their_own_colour() -> None:
    from dcn_inspect.report.bins import DEFORMED_COLOUR, POINT_COLOUR, RoIPanel, draw_bins_figure

    # One bin moved 40 px right of its regular bin; its right edge (x = 80) lies away from
    # every other mark (the link ends at the bin's centre). A sampling point at (70, 33).
    panel = RoIPanel(
        "t",
        (10.0, 10.0, 40.0, 40.0),
        np.array([[[10.0, 10.0, 40.0, 40.0]]]),
        np.array([[[50.0, 10.0, 80.0, 40.0]]]),
        points=np.array([[70.0, 33.0]]),
    )
    for colour, (x, y) in ((DEFORMED_COLOUR, (80.0, 25.0)), (POINT_COLOUR, (70.0, 33.0))):
        background = _rgb(colour)
        image = np.broadcast_to(background.astype(np.uint8), (100, 100, 3)).copy()
        fig = draw_bins_figure(image, [panel])
        assert _stands_out(fig, fig.axes[0], x, y, background), colour
        # The image itself is plain: away from every mark nothing stands out.
        assert not _stands_out(fig, fig.axes[0], 45.0, 46.0, background)


def test_every_panel_holds_all_its_deformed_bins(
    workspace: Dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dcn_inspect.commands import bins as bins_module

    caught: List[Any] = []
    original = bins_module.write_figure
    monkeypatch.setattr(
        bins_module, "write_figure", lambda p, f, **k: (caught.append(f), original(p, f, **k))
    )
    # A model whose offsets are large (random weights): RoIs near and across the border send
    # bins far beyond the image and its 5 % band.
    table, _ = _run(
        workspace,
        _loaded(workspace["module"], "build"),
        tmp_path,
        rois=["-10,-5,20,30", "40,2,55,38", "1,1,8,8"],
        class_choice="all",
    )
    deformed = table[["bx1", "by1", "bx2", "by2"]].to_numpy()
    assert (deformed[:, 0] < -2.8).any() or (deformed[:, 2] > 58.8).any()  # beyond the band
    panels = caught[0].axes
    assert len(panels) == len(table) // 9
    for ax, (_, rows) in zip(panels, table.groupby(["roi", "class"], sort=False)):
        (x_min, x_max), (y_max, y_min) = ax.get_xlim(), ax.get_ylim()
        boxes = rows[["bx1", "by1", "bx2", "by2"]].to_numpy()
        assert x_min < boxes[:, 0].min() and boxes[:, 2].max() < x_max
        assert y_min < boxes[:, 1].min() and boxes[:, 3].max() < y_max


def _inside(box: Any, figure_box: Any) -> bool:
    return (
        box.x0 >= figure_box.x0 - 0.5
        and box.x1 <= figure_box.x1 + 0.5
        and box.y0 >= figure_box.y0 - 0.5
        and box.y1 <= figure_box.y1 + 0.5
    )


@pytest.mark.parametrize("count, overlay, shape", [
    (1, False, (400, 120)), (2, False, (400, 120)), (5, False, (100, 100)),
    (9, False, (60, 300)), (3, True, (400, 120)), (3, True, (100, 100)),
])  # fmt: skip
def test_legend_and_titles_lie_inside_the_saved_image(
    tmp_path: Path, count: int, overlay: bool, shape: Tuple[int, int]
) -> None:
    from dcn_inspect.io.outputs import write_figure
    from dcn_inspect.report.bins import OP_EXTENT_LABELS, RoIPanel, draw_bins_figure

    height, width = shape
    # Small RoIs (their op extent drawn: the longest legend) with sampling points.
    panels = [
        RoIPanel(
            f"RoI {k} (a long class name): offsets of a long class name [gt]",
            (2.0 + k, 2.0, 8.0 + k, 8.0),
            np.array([[[2.0 + k, 2.0, 9.0 + k, 9.0]]]),
            np.array([[[3.0 + k, 1.0, 10.0 + k, 8.0]]]),
            points=np.array([[5.0 + k, 4.0]]),
            roi_label=f"RoI {k}",
            op_roi=(2.0 + k, 2.0, 9.0 + k, 9.0),
        )
        for k in range(count)
    ]
    title = "a_rather_long_image_name.jpg: DeformPSRoIPool rfcn.psroi_pool (random weights)"
    fig = draw_bins_figure(
        np.zeros((height, width, 3), dtype=np.uint8),
        panels,
        overlay=overlay,
        title=title,
        op_extent_label=OP_EXTENT_LABELS["psroi_pool"],
    )
    path = tmp_path / "bins.png"
    write_figure(path, fig, dpi=100)
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    saved = Image.open(path).size
    assert abs(saved[0] - fig.bbox.width) < 1 and abs(saved[1] - fig.bbox.height) < 1
    (legend,) = fig.legends
    assert OP_EXTENT_LABELS["psroi_pool"] in [t.get_text() for t in legend.get_texts()]
    assert _inside(legend.get_window_extent(renderer), fig.bbox)
    titles = [ax.title for ax in fig.axes] + ([fig._suptitle] if fig._suptitle else [])
    assert title in [t.get_text() for t in titles]
    for text in titles:
        if text.get_text():
            assert _inside(text.get_window_extent(renderer), fig.bbox), text.get_text()


def test_figure_title_says_random_weights_for_a_registered_model_without_weights(
    workspace: Dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dcn_inspect.commands import bins as bins_module

    titles: List[str] = []
    monkeypatch.setattr(
        bins_module,
        "write_figure",
        lambda path, fig, **kwargs: titles.append(fig._suptitle.get_text()),
    )
    trained = _loaded(workspace["module"], "build")
    trained.source, trained.checkpoint = "registered", tmp_path / "weights.pt"
    untrained = _loaded(workspace["module"], "build")
    untrained.source = "registered"
    assert untrained.random_weights and not trained.random_weights
    for loaded, name in ((untrained, "random"), (trained, "trained")):
        bins([workspace["image"]], model=loaded, rois=ROIS[:1], out=tmp_path / name,
             progress=False)  # fmt: skip
    assert titles[0].endswith("(random weights)") and "random" not in titles[1]

"""DCNv3 / DCNv4 layers: recognised by name, converted into the standard layout at capture time,
traced and measured like every other deformable layer.

The layers are written in ``internimage_like.py`` from the published semantics (channels-last,
x before y, column-major kernel points, offset_scale, softmax / unnormalised modulation). The
oracles: dcn-inspect's own deformable op, fed the converted record, reproduces each layer's
aggregation; constant offsets give trees and dilations worked out by hand.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from internimage_like import DCNv3_pytorch, DCNv4, FlashInternImageStage, InternImageStage
from PIL import Image

from dcn_inspect.analysis.dilation import effective_dilation
from dcn_inspect.capture.internimage_layers import identify, kernel_order, to_standard_layout
from dcn_inspect.capture.session import probe
from dcn_inspect.commands.dilation_stats import dilation_stats
from dcn_inspect.commands.info import model_info
from dcn_inspect.commands.sample_points import sample_points
from dcn_inspect.models.loaded_model import LoadedModel
from dcn_inspect.models.registry import Preprocess
from dcn_inspect.ops import deform_conv2d

STRETCH = (
    (0.5, -0.25),
    (0.75, 0.5),
    (0.25, -0.5),
)  # per layer (layers.0, layers.1, top), per group
LOGITS = [
    [[0.1 * p * (g + 1) - 0.3 * (layer == 1) for p in range(9)] for g in range(2)]
    for layer in range(3)
]
PLAIN = Preprocess(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), resize=0)


def _softmax(values):
    e = np.exp(np.asarray(values, dtype=np.float64))
    return e / e.sum()


# ------------------------------------------------------------------------------ conversion


def test_conversion_reorders_points_swaps_x_y_and_keeps_values():
    """Hand-built: kernel point (a, b) of group g carries x = 100g + 10a + b,
    y = -(100g + 10a + b)."""
    kernel = (3, 3)
    native = torch.zeros(1, 1, 1, 2 * 9 * 2)
    mask = torch.zeros(1, 1, 1, 2 * 9)
    for g in range(2):
        for p in range(9):
            b, a = divmod(p, 3)  # column-major in the native layout
            code = 100 * g + 10 * a + b
            native[0, 0, 0, 2 * (g * 9 + p)] = code
            native[0, 0, 0, 2 * (g * 9 + p) + 1] = -code
            mask[0, 0, 0, g * 9 + p] = code
    offset, weights = to_standard_layout(native, mask, kernel, (1, 1), group=2)
    for g in range(2):
        for a in range(3):
            for b in range(3):
                q = g * 9 + a * 3 + b  # row-major in the standard layout
                code = 100 * g + 10 * a + b
                assert offset[0, 2 * q, 0, 0] == -code  # dy first
                assert offset[0, 2 * q + 1, 0, 0] == code
                assert weights[0, q, 0, 0] == code
    assert kernel_order((2, 3)).tolist() == [
        0,
        2,
        4,
        1,
        3,
        5,
    ]  # (a, b) -> b*kh + a for a 2x3 kernel


@pytest.mark.parametrize("offset_scale", [1.0, 2.0])
@pytest.mark.parametrize(
    "remove_center,centre_scale", [(False, False), (True, False), (False, True)]
)
def test_dcnv3_record_reproduces_the_layer_through_the_standard_op(
    offset_scale, remove_center, centre_scale
):
    torch.manual_seed(1)
    layer = DCNv3_pytorch(
        16,
        offset_scale=offset_scale,
        center_feature_scale=centre_scale,
        remove_center=remove_center,
    ).eval()
    with torch.no_grad():
        for branch in (layer.offset, layer.mask):
            branch.weight.normal_(0.0, 0.3)
            branch.bias.normal_(0.0, 0.5)
        if centre_scale:
            layer.center_feature_scale_proj_weight.normal_(0.0, 0.3)
            layer.center_feature_scale_proj_bias.normal_(0.0, 0.5)
    record = probe(layer, torch.randn(1, 9, 11, 16)).convs["DCNv3_pytorch"]
    assert record.converted_from == "DCNv3" and record.offset_groups == 2 and record.modulated
    assert record.offset.shape == (1, 36, 9, 11) and record.geometry.input_hw == (9, 11)
    value = layer.seen["value"].permute(0, 3, 1, 2)
    ones = torch.ones(16, 1, 3, 3)  # per channel: sum of its samples times the modulation
    with torch.no_grad():
        ours = deform_conv2d(value, record.offset, ones, None, 1, 1, 1, record.mask).permute(
            0, 2, 3, 1
        )
    expected = layer.seen["core"]
    if (
        centre_scale
    ):  # recorded mask = modulation x (1 - t): the centre path's weight t is no sampling point
        expected = expected * (1 - layer.seen["centre_scale"]).repeat_interleave(8, dim=-1)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)
    assert record.offset.abs().max() > 0.5
    if remove_center:
        assert (record.mask[:, [4, 13]] == 0).all() and (
            record.offset[:, [8, 9, 26, 27]] == 0
        ).all()


@pytest.mark.parametrize("offset_scale", [1.0, 2.0])
def test_dcnv4_record_reproduces_the_layer_through_the_standard_op(offset_scale):
    torch.manual_seed(2)
    layer = DCNv4(16, offset_scale=offset_scale).eval()
    with torch.no_grad():
        layer.offset_mask.weight.normal_(0.0, 0.3)
        layer.offset_mask.bias.normal_(0.0, 0.5)
    record = probe(layer, torch.randn(1, 7 * 10, 16), shape=(7, 10)).convs["DCNv4"]
    assert (
        record.converted_from == "DCNv4"
        and record.geometry.input_hw == (7, 10)
        and record.offset.shape == (1, 36, 7, 10)
    )
    value = layer.seen["value"].permute(0, 3, 1, 2)
    with torch.no_grad():
        ours = deform_conv2d(
            value, record.offset, torch.ones(16, 1, 3, 3), None, 1, 1, 1, record.mask
        ).permute(0, 2, 3, 1)
    torch.testing.assert_close(ours, layer.seen["core"], rtol=1e-4, atol=1e-5)
    assert (record.mask < 0).any()  # DCNv4's modulation is not normalised (no softmax, no sigmoid)


def test_layers_are_recognised_by_name_and_attributes_only():
    assert identify(DCNv3_pytorch(16)).version == "DCNv3"
    assert identify(DCNv4(16)).version == "DCNv4"

    class DCNv3(DCNv3_pytorch):  # InternImage's CUDA class name, same forward
        pass

    class OwnForward(DCNv3_pytorch):
        def forward(self, input):  # type: ignore[override]
            return input

    assert identify(DCNv3(16)).version == "DCNv3"
    assert identify(OwnForward(16)) is None
    assert identify(torch.nn.Linear(2, 2)) is None


# ------------------------------------------------------------------------------ trees and dilation


def _image(path: Path, size: int = 64) -> Path:
    Image.fromarray(
        np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    ).save(path)
    return path


def _expected_tree(i: int, j: int, dilation: dict) -> list:
    """Image (x, y) of every point of each level. The top layer's input is the stride-4 frame
    (x = 4c + 0.5), the two lower layers work on the stride-2 frame (x = 2c + 0.5)."""
    step = np.array([-1.0, 0.0, 1.0])
    rows = i + np.repeat(step, 3) * dilation["top"]
    cols = j + np.tile(step, 3) * dilation["top"]
    levels = [(4 * cols + 0.5, 4 * rows + 0.5)]
    rows, cols = 2 * rows, 2 * cols  # the same image points in the stride-2 frame
    for name in ("layers.1", "layers.0"):
        rows = (rows[:, None] + np.repeat(step, 3)[None] * dilation[name]).reshape(-1)
        cols = (cols[:, None] + np.tile(step, 3)[None] * dilation[name]).reshape(-1)
        levels.append((2 * cols + 0.5, 2 * rows + 0.5))
    return levels


def _expected_weights(group: int, modulation: list) -> list:
    """Product along the path of each point's modulation (given per layer, column-major per
    group)."""
    weights, out = np.ones(1), []
    for layer in (2, 1, 0):  # top first
        by_row_major = np.asarray(modulation[layer][group], dtype=np.float64)[
            kernel_order((3, 3)).numpy()
        ]
        weights = (weights[:, None] * by_row_major[None]).reshape(-1)
        out.append(weights)
    return out


@pytest.mark.parametrize("kind,offset_scale", [("DCNv3", 1.0), ("DCNv3", 2.0), ("DCNv4", 1.0)])
@pytest.mark.parametrize("group", [0, 1])
def test_three_layer_stage_traced_end_to_end_gives_the_analytic_tree(
    tmp_path, kind, offset_scale, group
):
    if kind == "DCNv3":
        model = InternImageStage(stretch=STRETCH, offset_scale=offset_scale, logits=LOGITS).eval()
        modulation = [[_softmax(LOGITS[layer][g]) for g in range(2)] for layer in range(3)]
    else:
        model = FlashInternImageStage(stretch=STRETCH).eval()
        modulation = [[np.ones(9) for _ in range(2)] for _ in range(3)]
    loaded = LoadedModel(model, f"{kind}-stage", None, {}, PLAIN, "user-file")
    result = sample_points(
        [_image(tmp_path / "scene.png")],
        model=loaded,
        at=["32.5,32.5"],
        group=group,
        out=tmp_path / "out",
        progress=False,
    )
    assert result.layers == ["top.dcn", "layers.1.dcn", "layers.0.dcn"]
    table = pd.read_csv(result.images[0].csv)
    dilation = {
        "top": offset_scale * (2 + STRETCH[2][group]),
        "layers.1": offset_scale * (1 + STRETCH[1][group]),
        "layers.0": offset_scale * (1 + STRETCH[0][group]),
    }
    weights = _expected_weights(group, modulation)
    for level, ((want_x, want_y), want_w) in enumerate(
        zip(_expected_tree(8, 8, dilation), weights), start=1
    ):
        rows = table[table["level"] == level]
        assert len(rows) == 9**level
        np.testing.assert_allclose(rows["x"], want_x, atol=1e-4)
        np.testing.assert_allclose(rows["y"], want_y, atol=1e-4)
        np.testing.assert_allclose(rows["weight"], want_w, rtol=1e-5)
        assert rows["inside"].all()
    assert table["unit_x"].iloc[0] == 32.5
    summary = result.summary.read_text()
    assert (
        '"method": "hooks"' in summary and '"method": "size"' not in summary
    )  # frames through the forward, channels-last too


@pytest.mark.parametrize("stage", [InternImageStage, FlashInternImageStage])
def test_effective_dilation_is_exact_and_dilation_stats_reports_it(tmp_path, stage):
    model = stage(stretch=STRETCH).eval()
    records = probe(model, torch.randn(1, 3, 48, 40)).convs
    for (name, dil), stretch in zip(
        (("layers.0.dcn", 1), ("layers.1.dcn", 1), ("top.dcn", 2)), STRETCH
    ):
        per_group = effective_dilation(records[name].offset.double(), (3, 3), (dil, dil))
        for g, e in enumerate(stretch):
            torch.testing.assert_close(
                per_group[:, g], torch.full_like(per_group[:, g], dil + e), rtol=1e-6, atol=1e-6
            )
    # The command on a one-image dataset: the mean over groups, in every category, std 0.
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(
        tmp_path / "a.png"
    )
    coco = tmp_path / "annotations.json"
    coco.write_text(
        '{"images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 48}],'
        ' "categories": [{"id": 1, "name": "x"}],'
        ' "annotations": [{"id": 1, "image_id": 1, "bbox": [4, 4, 20, 20], "category_id": 1,'
        ' "iscrowd": 0}]}'
    )
    loaded = LoadedModel(model, "stage", None, {}, PLAIN, "user-file")
    table = dilation_stats(
        coco,
        model=loaded,
        out=tmp_path / "out",
        thresholds="100,300",
        workers=0,
        progress=False,
        figure=False,
    ).table
    expected = {
        "top.dcn": 2 + np.mean(STRETCH[2]),
        "layers.1.dcn": 1 + np.mean(STRETCH[1]),
        "layers.0.dcn": 1 + np.mean(STRETCH[0]),
    }
    counted = table[table["count"] > 0]
    assert set(counted["category"]) == {"large", "background"}
    np.testing.assert_allclose(counted["mean"], counted["layer"].map(expected), rtol=1e-6)
    np.testing.assert_allclose(counted["std"], 0.0, atol=1e-6)


def test_info_lists_dcnv3_layers():
    model = InternImageStage().eval()
    info = model_info(LoadedModel(model, "stage", None, {}, PLAIN, "user-file"))
    assert [layer.name for layer in info.layers] == ["layers.0.dcn", "layers.1.dcn", "top.dcn"]
    top = info.layers[2]
    assert (
        top.kernel,
        top.dilation,
        top.offset_groups,
        top.offset_channels,
        top.mask_channels,
    ) == ((3, 3), (2, 2), 2, 36, 18)
    assert (
        top.captured_by == "DCNv3 (converted)"
        and top.geometry_method == "hooks"
        and top.input_stride_px == (4.0, 4.0)
    )
    assert info.offset_branch_parameters > 0

"""The sampling-tree tracer: analytic trees, a brute-force tracer, the demo's rounding, borders."""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pytest
import torch
from conftest import raises_cli
from torch import nn

from dcn_inspect.analysis.sample_points import read_field, trace_sampling_trees
from dcn_inspect.capture.records import DeformConvRecord
from dcn_inspect.capture.session import probe
from dcn_inspect.core.geometry import FrameMap, LayerGeometry
from dcn_inspect.ops import DeformConv2dPack, ModulatedDeformConv2dPack
from dcn_inspect.ops.reference import bilinear_zero_border

# ---------------------------------------------------------------------------------------------
# Constant-offset models: offsets (a*e, b*e) around the kernel centre turn dilation d into d + e.


def _set_constant_offsets(
    layer: DeformConv2dPack, stretch: Sequence[float], mask_logit: Optional[float] = None
) -> None:
    """Offset conv with zero weight; bias makes kernel point (a, b) of group g move by
    ((a-1)*e_g, (b-1)*e_g)."""
    kh, kw = layer.kernel_size
    points = kh * kw
    bias = torch.zeros(layer.conv_offset.out_channels)
    for g, e in enumerate(stretch):
        for k in range(points):
            a, b = divmod(k, kw)
            bias[2 * (g * points + k)] = (a - (kh - 1) / 2) * e
            bias[2 * (g * points + k) + 1] = (b - (kw - 1) / 2) * e
    if mask_logit is not None:
        bias[2 * len(stretch) * points :] = mask_logit
    with torch.no_grad():
        layer.conv_offset.weight.zero_()
        layer.conv_offset.bias.copy_(bias)


class ThreeLevels(nn.Module):
    """dcn1 (3x3, dil 1) -> stride-2 regular conv -> dcn2 (dil 2) -> dcn3 (dil 2), two offset
    groups."""

    def __init__(
        self,
        stretch: Dict[str, Sequence[float]],
        modulated: bool = False,
        mask_logits: Sequence[float] = (0.0, 0.0, 0.0),
    ) -> None:
        super().__init__()
        cls = ModulatedDeformConv2dPack if modulated else DeformConv2dPack
        self.dcn1 = cls(4, 4, 3, padding=1, dilation=1, offset_groups=2)
        self.down = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.dcn2 = cls(4, 4, 3, padding=2, dilation=2, offset_groups=2)
        self.dcn3 = cls(4, 4, 3, padding=2, dilation=2, offset_groups=2)
        for (name, e), logit in zip(stretch.items(), mask_logits):
            _set_constant_offsets(getattr(self, name), e, logit if modulated else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dcn3(torch.relu(self.dcn2(self.down(self.dcn1(x)))))


STRETCH = {"dcn1": (0.5, -0.25), "dcn2": (0.75, 0.5), "dcn3": (0.25, -0.5)}


def _analytic_tree(i: int, j: int, d: Dict[str, float]) -> List[Tuple[np.ndarray, np.ndarray]]:
    """Image (x, y) of every point of each level, worked out by hand for ThreeLevels.

    Frames: dcn1 works on the image (index c -> x = c + 0.5); the stride-2 conv puts dcn2 and
    dcn3 on x = 2c + 0.5. Kernel point (a, b) of a layer with effective dilation D lands at
    (a-1)*D, (b-1)*D from the position it is centred on.
    """
    step = np.array([-1.0, 0.0, 1.0])
    row3 = i + np.repeat(step, 3) * d["dcn3"]  # level 1 rows in the stride-2 index frame, [9]
    col3 = j + np.tile(step, 3) * d["dcn3"]
    row2 = (row3[:, None] + np.repeat(step, 3)[None] * d["dcn2"]).reshape(-1)  # [81]
    col2 = (col3[:, None] + np.tile(step, 3)[None] * d["dcn2"]).reshape(-1)
    # dcn1 is centred on 2*row2 in the image index frame (x = 2c + 0.5 = c1 + 0.5).
    row1 = (2 * row2[:, None] + np.repeat(step, 3)[None] * d["dcn1"]).reshape(-1)  # [729]
    col1 = (2 * col2[:, None] + np.tile(step, 3)[None] * d["dcn1"]).reshape(-1)
    return [
        (2 * col3 + 0.5, 2 * row3 + 0.5),
        (2 * col2 + 0.5, 2 * row2 + 0.5),
        (col1 + 0.5, row1 + 0.5),
    ]


def _top_first(model: nn.Module, image: torch.Tensor) -> List[DeformConvRecord]:
    records = probe(model, image).convs
    assert list(records) == ["dcn1", "dcn2", "dcn3"]
    return [records["dcn3"], records["dcn2"], records["dcn1"]]


@pytest.mark.parametrize("group", [0, 1, "mean"])
def test_constant_offsets_give_the_analytic_tree(group: object) -> None:
    torch.manual_seed(0)
    model = ThreeLevels(STRETCH).eval()
    records = _top_first(model, torch.randn(1, 4, 32, 32))
    assert records[0].offset_groups == 2
    units = torch.tensor([[8, 8], [7, 9]])
    trees = trace_sampling_trees(records, units, group=group)  # type: ignore[arg-type]
    base = {"dcn1": 1.0, "dcn2": 2.0, "dcn3": 2.0}
    e_index = {0: 0, 1: 1}.get(group)  # type: ignore[arg-type]
    dilation = {
        name: base[name] + (sum(e) / 2 if group == "mean" else e[e_index])  # type: ignore[index]
        for name, e in STRETCH.items()
    }
    assert trees.layers == ["dcn3", "dcn2", "dcn1"]
    for u, (i, j) in enumerate(units.tolist()):
        assert trees.unit_xy[u].tolist() == [2 * j + 0.5, 2 * i + 0.5]
        for level, (want_x, want_y) in enumerate(_analytic_tree(i, j, dilation)):
            np.testing.assert_allclose(trees.xs[level][u].numpy(), want_x, atol=1e-5)
            np.testing.assert_allclose(trees.ys[level][u].numpy(), want_y, atol=1e-5)
            assert trees.inside[level][u].all()
            assert (trees.weights[level][u] == 1).all()
    assert [t.shape[1] for t in trees.xs] == [9, 81, 729]


def test_modulated_weights_multiply_along_the_path_and_frames_scale() -> None:
    torch.manual_seed(0)
    logits = (0.3, -1.2, 2.0)  # dcn1, dcn2, dcn3
    model = ThreeLevels(STRETCH, modulated=True, mask_logits=logits).eval()
    records = _top_first(model, torch.randn(1, 4, 32, 32))
    trees = trace_sampling_trees(
        records, torch.tensor([[8, 8]]), group=0, scale_to_original=(3.0, 0.5)
    )
    sig = [1 / (1 + math.exp(-v)) for v in logits]
    expected = [sig[2], sig[2] * sig[1], sig[2] * sig[1] * sig[0]]
    dilation = {"dcn1": 1.5, "dcn2": 2.75, "dcn3": 2.25}
    for level, (want_x, want_y) in enumerate(_analytic_tree(8, 8, dilation)):
        np.testing.assert_allclose(trees.weights[level][0].numpy(), expected[level], rtol=1e-6)
        np.testing.assert_allclose(trees.xs[level][0].numpy(), want_x * 3.0, atol=1e-4)
        np.testing.assert_allclose(trees.ys[level][0].numpy(), want_y * 0.5, atol=1e-5)
    assert trees.unit_xy[0].tolist() == [16.5 * 3.0, 16.5 * 0.5]


def test_group_out_of_range_is_an_input_error() -> None:
    model = ThreeLevels(STRETCH).eval()
    records = _top_first(model, torch.randn(1, 4, 16, 16))
    with raises_cli("--group 2: layer dcn3 has 2 offset groups", "sample-points"):
        trace_sampling_trees(records, torch.tensor([[1, 1]]), group=2)
    with raises_cli("--group", "sample-points"):
        trace_sampling_trees(records, torch.tensor([[1, 1]]), group="median")


def test_read_field_uses_the_ops_border_rule() -> None:
    gen = torch.Generator().manual_seed(0)
    field = torch.randn(5, 6, 7, generator=gen, dtype=torch.float64)
    rows = torch.cat(
        [
            torch.rand(300, generator=gen, dtype=torch.float64) * 10 - 2,
            torch.tensor([-1.0, -0.5, 0.0, 5.0, 5.5, 6.0, 3.0, 1e9, -1e9]),
        ]
    )
    cols = torch.cat(
        [
            torch.rand(300, generator=gen, dtype=torch.float64) * 11 - 2,
            torch.tensor([2.0, 2.0, -1.0, 6.0, 6.5, 3.0, 7.0, 3.0, 3.0]),
        ]
    )
    want = bilinear_zero_border(field[None, None], rows[None, None], cols[None, None])[0, 0].T
    got = read_field(field, rows, cols)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert (got[-9] == 0).all() and got[
        -8
    ].abs().sum() > 0  # y = -1 is outside the band, y = -0.5 inside
    assert (got[-4:-2] == 0).all() and (
        got[-2:] == 0
    ).all()  # y = H, x = W and far outside read zero


# ---------------------------------------------------------------------------------------------
# A brute-force tracer: plain recursion, scalar bilinear reads with the op's border rule.


def _scalar_bilinear(field: np.ndarray, y: float, x: float) -> float:
    """field [H, W] at (y, x): zero outside -1 < y < H, -1 < x < W; out-of-map corners count
    zero."""
    height, width = field.shape
    if not (-1 < y < height and -1 < x < width):
        return 0.0
    y0, x0 = math.floor(y), math.floor(x)
    total = 0.0
    for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
        for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
            if 0 <= yy < height and 0 <= xx < width:
                total += wy * wx * float(field[yy, xx])
    return total


def _brute_force(
    records: Sequence[DeformConvRecord], unit: Tuple[int, int], group: object, round_positions: bool
) -> List[List[Tuple[float, float, float, bool]]]:
    levels: List[List[Tuple[float, float, float, bool]]] = [[] for _ in records]

    def field(record: DeformConvRecord, k: int, part: str) -> np.ndarray:
        G, K = record.offset_groups, record.kernel_points
        groups = range(G) if group == "mean" else [0 if G == 1 else int(group)]  # type: ignore[call-overload]
        maps = []
        for g in groups:
            if part == "mask":
                maps.append(record.mask[0, g * K + k].double().numpy())  # type: ignore[index]
            else:
                maps.append(
                    record.offset[0, 2 * (g * K + k) + (0 if part == "dy" else 1)].double().numpy()
                )
        return sum(maps) / len(maps)

    def visit(level: int, row: float, col: float, weight: float) -> None:
        record = records[level]
        geo = record.geometry
        if round_positions:
            row, col = (
                float(round(row)),
                float(round(col)),
            )  # Python's round is half-to-even like np.round
        for k in range(record.kernel_points):
            a, b = divmod(k, geo.kernel[1])
            dy = _scalar_bilinear(field(record, k, "dy"), row, col)
            dx = _scalar_bilinear(field(record, k, "dx"), row, col)
            m = (
                _scalar_bilinear(field(record, k, "mask"), row, col)
                if record.mask is not None
                else 1.0
            )
            y = row * geo.stride[0] - geo.padding[0] + a * geo.dilation[0] + dy
            x = col * geo.stride[1] - geo.padding[1] + b * geo.dilation[1] + dx
            inside = -1 < y < geo.input_hw[0] and -1 < x < geo.input_hw[1]
            img_x = geo.input_frame.offset_x + geo.input_frame.stride_x * x
            img_y = geo.input_frame.offset_y + geo.input_frame.stride_y * y
            levels[level].append((img_x, img_y, weight * m, inside))
            if level + 1 < len(records):
                below = records[level + 1].geometry.output_frame
                visit(
                    level + 1,
                    (img_y - below.offset_y) / below.stride_y,
                    (img_x - below.offset_x) / below.stride_x,
                    weight * m,
                )

    visit(0, float(unit[0]), float(unit[1]), 1.0)
    return levels


def _record(
    name: str,
    geometry: LayerGeometry,
    groups: int,
    modulated: bool,
    scale: float,
    generator: torch.Generator,
) -> DeformConvRecord:
    K = geometry.kernel[0] * geometry.kernel[1]
    out_h, out_w = geometry.output_hw
    offset = torch.randn(1, 2 * groups * K, out_h, out_w, generator=generator) * scale
    mask = torch.rand(1, groups * K, out_h, out_w, generator=generator) if modulated else None
    return DeformConvRecord(name, "test", offset, mask, 1, groups, geometry)


def _random_records(seed: int) -> List[DeformConvRecord]:
    """Three levels with different kernels, strides, paddings, dilations and frames (top first)."""
    gen = torch.Generator().manual_seed(seed)
    image = FrameMap.image()
    bottom = LayerGeometry((3, 3), (1, 1), (1, 1), (1, 1), (14, 18), (14, 18), image, "hooks")
    # A stride-2 conv between levels: middle's input frame is x = 2c + 0.5; (3, 2) kernel, no x
    # padding.
    middle_in = image.conv_output((3, 3), (2, 2), (1, 1), (1, 1))
    middle = LayerGeometry((3, 2), (1, 1), (1, 0), (1, 1), (7, 9), (7, 8), middle_in, "hooks")
    top = LayerGeometry(
        (3, 3), (2, 2), (2, 2), (2, 2), (7, 8), (4, 4), middle.output_frame, "hooks"
    )
    return [
        _record("top", top, 2, True, 2.0, gen),
        _record("middle", middle, 1, False, 1.5, gen),
        _record("bottom", bottom, 2, True, 3.0, gen),
    ]


@pytest.mark.parametrize(
    "seed,group,round_positions",
    [(0, 0, False), (1, 1, False), (2, "mean", False), (3, "mean", True), (4, 1, True)],
)
def test_vectorised_tracer_matches_brute_force(
    seed: int, group: object, round_positions: bool
) -> None:
    records = _random_records(seed)
    units = [(0, 0), (1, 2), (3, 3), (2, 0)]
    trees = trace_sampling_trees(
        records, torch.tensor(units), group=group, round_positions=round_positions
    )  # type: ignore[arg-type]
    assert [t.shape[1] for t in trees.xs] == [9, 54, 486]
    some_outside = False
    for u, unit in enumerate(units):
        expected = _brute_force(records, unit, group, round_positions)
        for level, points in enumerate(expected):
            want = np.array([p[:3] for p in points])
            np.testing.assert_allclose(trees.xs[level][u].numpy(), want[:, 0], atol=1e-9)
            np.testing.assert_allclose(trees.ys[level][u].numpy(), want[:, 1], atol=1e-9)
            np.testing.assert_allclose(trees.weights[level][u].numpy(), want[:, 2], atol=1e-12)
            assert trees.inside[level][u].tolist() == [p[3] for p in points]
            some_outside |= not all(p[3] for p in points)
    assert some_outside  # the random fields do push points out of the maps
    np.testing.assert_array_equal(trees.parents(3).numpy(), np.arange(486) // 9)


# ---------------------------------------------------------------------------------------------
# --round: the official demo's rule, on a case worked out by hand.


def _hand_records() -> List[DeformConvRecord]:
    """Two 3x3 layers (pad 1, dilation 1) on the same 5x5 frame (x = c + 0.5).

    Top: zero offsets except at unit (2, 2), where every kernel point moves by
    (dy, dx) = (0.4, 0.5).
    Bottom: the same offset for every kernel point, varying over the map: dy = row, dx = -col / 2.
    """
    image = FrameMap.image()
    geometry = LayerGeometry((3, 3), (1, 1), (1, 1), (1, 1), (5, 5), (5, 5), image, "hooks")
    top = torch.zeros(1, 18, 5, 5)
    top[0, 0::2, 2, 2] = 0.4
    top[0, 1::2, 2, 2] = 0.5
    rows, cols = torch.meshgrid(torch.arange(5.0), torch.arange(5.0), indexing="ij")
    bottom = torch.zeros(1, 18, 5, 5)
    bottom[0, 0::2] = rows
    bottom[0, 1::2] = -cols / 2
    return [
        DeformConvRecord("top", "test", top, None, 1, 1, geometry),
        DeformConvRecord("bottom", "test", bottom, None, 1, 1, geometry),
    ]


def test_round_matches_the_hand_worked_case() -> None:
    records = _hand_records()
    exact = trace_sampling_trees(records, torch.tensor([[2, 2]]))
    rounded = trace_sampling_trees(records, torch.tensor([[2, 2]]), round_positions=True)
    # Level 1 is the same in both: index (1.4 + a, 1.5 + b), image +0.5.
    for trees in (exact, rounded):
        assert trees.xs[0][0].tolist() == pytest.approx([2.0, 3.0, 4.0] * 3)
        assert trees.ys[0][0].tolist() == pytest.approx([1.9] * 3 + [2.9] * 3 + [3.9] * 3)
    # Level-1 point 0 is at index (1.4, 1.5). Rounded (half to even): cell (1, 2), where the bottom
    # offsets are dy = 1, dx = -1, so its kernel point (0, 0) samples (1 - 1 + 0 + 1, 2 - 1 + 0 - 1)
    # = (1, 0) -> image (0.5, 1.5); kernel point (2, 2): (3, 2) -> (2.5, 3.5).
    assert (rounded.xs[1][0, 0].item(), rounded.ys[1][0, 0].item()) == pytest.approx((0.5, 1.5))
    assert (rounded.xs[1][0, 8].item(), rounded.ys[1][0, 8].item()) == pytest.approx((2.5, 3.5))
    # Level-1 point 1 is at (1.4, 2.5) -> cell (1, 2) again (2.5 rounds to even): same children,
    # shifted by nothing -- the demo's rounding collapses them.
    assert rounded.xs[1][0, 9:18].tolist() == rounded.xs[1][0, 0:9].tolist()
    # Level-1 point 2 is at (1.4, 3.5) -> cell (1, 4): dy = 1, dx = -2: kernel point (0, 0) at
    # (1, 1).
    assert (rounded.xs[1][0, 18].item(), rounded.ys[1][0, 18].item()) == pytest.approx((1.5, 1.5))
    # Exact tracing reads bilinearly at (1.4, 1.5): dy = 1.4, dx = -0.75 ->
    # kernel point (0, 0) samples (1.4 - 1 + 1.4, 1.5 - 1 - 0.75) = (1.8, -0.25) -> image
    # (-0.25 + 0.5, 2.3).
    assert (exact.xs[1][0, 0].item(), exact.ys[1][0, 0].item()) == pytest.approx((0.25, 2.3))


# ---------------------------------------------------------------------------------------------
# Border units: points outside the map are kept and flagged.


def test_border_unit_points_are_kept_and_flagged() -> None:
    model = ThreeLevels({"dcn1": (0.0, 0.0), "dcn2": (0.0, 0.0), "dcn3": (0.0, 0.0)}).eval()
    records = _top_first(model, torch.randn(1, 4, 32, 32))
    trees = trace_sampling_trees(records, torch.tensor([[0, 0], [8, 8]]))
    assert [t.shape for t in trees.xs] == [(2, 9), (2, 81), (2, 729)]
    # Corner unit (0, 0) of the 16x16 stride-2 map, dilation 2: level-1 rows/cols -2, 0, 2.
    assert trees.inside[0][0].tolist() == [
        False,
        False,
        False,
        False,
        True,
        True,
        False,
        True,
        True,
    ]
    assert trees.xs[0][0, :3].tolist() == [-3.5, 0.5, 4.5]
    # Every level keeps all its points; the flag follows the -1 < index < size band.
    index_x = (trees.xs[2][0] - 0.5).numpy()  # dcn1 input index = image x - 0.5
    index_y = (trees.ys[2][0] - 0.5).numpy()
    band = (index_x > -1) & (index_x < 32) & (index_y > -1) & (index_y < 32)
    assert trees.inside[2][0].numpy().tolist() == band.tolist()
    assert 0 < band.sum() < 729
    # Children of an outside point keep the regular grid (zero offsets read outside the map).
    assert trees.xs[1][0, :3].tolist() == [-7.5, -3.5, 0.5]
    # The centre unit's tree is entirely inside.
    assert all(level[1].all() for level in trees.inside)


def test_no_units_give_empty_levels_and_units_must_be_on_the_map() -> None:
    records = _random_records(0)
    trees = trace_sampling_trees(records, torch.zeros(0, 2, dtype=torch.long))
    assert [tuple(t.shape) for t in trees.xs] == [(0, 9), (0, 54), (0, 486)]
    with pytest.raises(ValueError, match="outside the 4x4 output map of top"):
        trace_sampling_trees(records, torch.tensor([[4, 0]]))

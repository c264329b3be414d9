"""``receptive-field``: ERF, gradient weights of sampling points, saliency regions, theoretical
receptive fields (DCNv2 §2.1), each against a hand-worked or closed-form oracle; the command,
its outputs and its errors."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Sequence, Set, Tuple

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

from dcn_inspect.analysis.receptive_field import (
    CSV_COLUMNS,
    effective_receptive_field,
    erf_numbers,
    receptive_fields,
    saliency_regions,
    tree_gradient_weights,
)
from dcn_inspect.analysis.receptive_field.saliency import (
    MAX_FAMILY,
    MAX_FORWARDS_PER_UNIT,
    prior_family,
    square_family,
)
from dcn_inspect.analysis.sample_points import trace_sampling_trees
from dcn_inspect.capture.extent import Extent
from dcn_inspect.capture.gradients import GradientForward
from dcn_inspect.capture.selection import select_layers
from dcn_inspect.io.images import to_model_input
from dcn_inspect.io.resize import bilinear_resize_matrix, image_gradient
from dcn_inspect.models.registry import Preprocess
from dcn_inspect.ops import DeformConv2dPack

STD = (0.229, 0.224, 0.225)


def _constant_offsets(layer: DeformConv2dPack, shifts: Sequence[Tuple[float, float]]) -> None:
    """Zero offset-conv weight; bias moves kernel point k by shifts[k] = (dy, dx) (one shift for
    all: a 1-list)."""
    points = layer.kernel_points
    bias = torch.zeros(layer.conv_offset.out_channels)
    for k in range(points):
        dy, dx = shifts[k % len(shifts)]
        bias[2 * k], bias[2 * k + 1] = dy, dx
    with torch.no_grad():
        layer.conv_offset.weight.zero_()
        layer.conv_offset.bias.copy_(bias)


def _positive_weights(model: nn.Module) -> None:
    """Every conv weight 1 / fan-in, no bias (offset branches stay as they are): a positive linear
    network."""
    offset_convs = {id(m.conv_offset) for m in model.modules() if isinstance(m, DeformConv2dPack)}
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, DeformConv2dPack)) and id(module) not in offset_convs:
                module.weight.fill_(1.0 / module.weight[0].numel())
                if module.bias is not None:
                    module.bias.zero_()


def _support(mask: np.ndarray) -> Set[Tuple[int, int]]:
    return {(int(r), int(c)) for r, c in zip(*np.nonzero(mask))}


# ---------------------------------------------------------------------------------------------
# The resize


@pytest.mark.parametrize(
    "sizes", [(256, 100), (100, 256), (451, 300), (37, 37), (1067, 800), (5, 13)]
)
def test_resize_matrix_equals_pils_float_bilinear_resize(sizes: Tuple[int, int]) -> None:
    in_w, out_w = sizes
    in_h, out_h = 9, 6
    rng = np.random.default_rng(0)
    image = rng.random((in_h, in_w)).astype(np.float32) * 255
    pil = np.asarray(
        Image.fromarray(image, mode="F").resize((out_w, out_h), Image.BILINEAR), dtype=np.float64
    )
    ours = (
        bilinear_resize_matrix(in_h, out_h).numpy()
        @ image.astype(np.float64)
        @ bilinear_resize_matrix(in_w, out_w).numpy().T
    )
    np.testing.assert_allclose(ours, pil, atol=2e-4)


def test_model_input_is_the_linear_resize_up_to_8_bit_rounding() -> None:
    rng = np.random.default_rng(1)
    image = (rng.random((60, 90, 3)) * 255).astype(np.uint8)
    preprocess = Preprocess(resize=37)
    model_input = to_model_input(image, preprocess)
    h, w = model_input.input_hw
    rows, cols = bilinear_resize_matrix(60, h), bilinear_resize_matrix(90, w)
    linear = torch.einsum("hH,HWc,wW->chw", rows, torch.from_numpy(image).double(), cols)
    normalised = (
        linear / 255 - torch.tensor(preprocess.mean, dtype=torch.float64).view(3, 1, 1)
    ) / torch.tensor(preprocess.std, dtype=torch.float64).view(3, 1, 1)
    # PIL rounds to 8 bits after each of its two passes (horizontal, then vertical): at most one
    # level apart.
    bound = 1.0 / 255 / min(preprocess.std) + 1e-5
    assert float((normalised - model_input.tensor[0].double()).abs().max()) <= bound
    # Without a resize the model input is reproduced to float precision.
    same = to_model_input(image, Preprocess(resize=0))
    direct = (
        torch.from_numpy(image).double().permute(2, 0, 1) / 255
        - torch.tensor(preprocess.mean, dtype=torch.float64).view(3, 1, 1)
    ) / torch.tensor(preprocess.std, dtype=torch.float64).view(3, 1, 1)
    assert float((direct - same.tensor[0].double()).abs().max()) < 1e-6


def test_image_gradient_is_autograd_through_the_linear_resize_and_normalisation() -> None:
    torch.manual_seed(0)
    original = torch.rand(3, 23, 31, dtype=torch.float64) * 255
    rows, cols = bilinear_resize_matrix(23, 10), bilinear_resize_matrix(31, 17)
    mean = torch.tensor([0.4, 0.5, 0.6], dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor([0.2, 0.3, 0.25], dtype=torch.float64).view(3, 1, 1)
    weights = torch.randn(3, 10, 17, dtype=torch.float64)
    leaf = original.clone().requires_grad_(True)
    model_input = (rows @ leaf @ cols.T / 255 - mean) / std
    response = (torch.sin(model_input) * weights).sum()
    (expected,) = torch.autograd.grad(response, leaf)
    dr_dx = torch.cos(model_input.detach()) * weights
    got = image_gradient(dr_dx, (23, 31), std.flatten().tolist())
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Plain convs: the ERF's support is the theoretical receptive field


class PlainStack(nn.Module):
    """3x3 conv -> 3x3 stride-2 conv -> 3x3 deformable dil 2 -> 3x3 deformable, offsets zero."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.down = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.dcn_a = DeformConv2dPack(4, 4, 3, padding=2, dilation=2)
        self.dcn_b = DeformConv2dPack(4, 4, 3, padding=1)
        _positive_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dcn_b(self.dcn_a(self.down(self.stem(x))))


def test_plain_convs_erf_support_equals_the_hand_computed_receptive_field() -> None:
    # By hand: unit (i, j) of dcn_b sits at x = 2j + 0.5 and reads dcn_a cells j-1..j+1, which read
    # down cells j-3..j+3, which read stem cells 2j-7..2j+7, which read pixels 2j-8..2j+8: 17 px.
    model = PlainStack().eval()
    image = torch.rand(1, 3, 40, 36) + 0.1
    forward = GradientForward(model, image)
    assert list(forward.calls) == ["dcn_a", "dcn_b"]
    assert forward.calls["dcn_b"].extent == Extent(8.5, 8.5, 8.5, 8.5)
    units = torch.tensor([[10, 9], [0, 0], [19, 17]])
    xy = torch.tensor([[2 * j + 0.5, 2 * i + 0.5] for i, j in units.tolist()], dtype=torch.float64)
    boxes = forward.theoretical_box("dcn_b", xy)
    expected_boxes = torch.tensor(
        [[2 * j - 8, 2 * i - 8, 2 * j + 9, 2 * i + 9] for i, j in units.tolist()],
        dtype=torch.float64,
    )
    torch.testing.assert_close(boxes, expected_boxes)
    # room for the copies: the three units in one batch
    (batch,) = list(forward.backward_units("dcn_b", units, batch_size=8, memory_bytes=1 << 40))
    erf = effective_receptive_field(batch.input_grad, (40, 36), STD).numpy()
    for u, (i, j) in enumerate(units.tolist()):
        expected = np.zeros((40, 36), dtype=bool)
        expected[max(2 * i - 8, 0) : 2 * i + 9, max(2 * j - 8, 0) : 2 * j + 9] = True
        assert _support(erf[u] > 0) == _support(expected), f"unit {(i, j)}"


# ---------------------------------------------------------------------------------------------
# Constant offsets: the ERF's support is the union of the tree's bilinear footprints


class ConstantOffsets(nn.Module):
    """Three deformable layers reading one another at stride 1; every kernel point of a layer is
    shifted by the layer's constant. The upper two shifts are whole cells: the tree interpolates
    offsets where the network interpolates features, so only with whole-cell positions above the
    deepest level do the tree's points sit exactly where the network reads."""

    SHIFTS = {"dcn1": (0.3, -0.6), "dcn2": (1.0, -2.0), "dcn3": (-1.0, 3.0)}

    def __init__(self) -> None:
        super().__init__()
        self.dcn1 = DeformConv2dPack(3, 4, 3, padding=1)
        self.dcn2 = DeformConv2dPack(4, 4, 3, padding=2, dilation=2)
        self.dcn3 = DeformConv2dPack(4, 4, 3, padding=2, dilation=2)
        _positive_weights(self)
        for name, shift in self.SHIFTS.items():
            _constant_offsets(getattr(self, name), [shift])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dcn3(self.dcn2(self.dcn1(x)))


def _footprint(xs: np.ndarray, ys: np.ndarray, hw: Tuple[int, int]) -> Set[Tuple[int, int]]:
    """Pixels with a non-zero bilinear weight at image points (x, y) (pixel c centred at
    c + 0.5)."""
    cells: Set[Tuple[int, int]] = set()
    for x, y in zip(xs.tolist(), ys.tolist()):
        col, row = x - 0.5, y - 0.5
        if not (-1 < row < hw[0] and -1 < col < hw[1]):
            continue
        c0, r0 = math.floor(col), math.floor(row)
        for r, wr in ((r0, 1 - (row - r0)), (r0 + 1, row - r0)):
            for c, wc in ((c0, 1 - (col - c0)), (c0 + 1, col - c0)):
                if wr > 0 and wc > 0 and 0 <= r < hw[0] and 0 <= c < hw[1]:
                    cells.add((r, c))
    return cells


def test_constant_offset_erf_support_is_the_union_of_the_trees_bilinear_footprints() -> None:
    model = ConstantOffsets().eval()
    hw = (30, 34)
    forward = GradientForward(model, torch.rand(1, 3, *hw) + 0.1)
    records = list(reversed(select_layers(forward.deformable_records(), None, 3)))
    units = torch.tensor([[15, 16], [2, 30], [27, 1]])  # the border units' trees leave the image
    trees = trace_sampling_trees(records, units)
    assert trees.points_per_unit(3) == 729
    (batch,) = list(forward.backward_units("dcn3", units, memory_bytes=1 << 40))
    erf = effective_receptive_field(batch.input_grad, hw, STD).numpy()
    sizes = []
    for u in range(3):
        expected = _footprint(trees.xs[2][u].numpy(), trees.ys[2][u].numpy(), hw)
        assert _support(erf[u] > 0) == expected
        sizes.append(len(expected))
    assert (
        sizes[0] > max(sizes[1:]) > 0
    )  # the border units lose the part of their tree beyond the image


# ---------------------------------------------------------------------------------------------
# A linear model: gradient weights and ERF in closed form


class LinearTwoLevels(nn.Module):
    """dcn_a (3->2, 3x3) on the image and dcn_b (2->2, 3x3 dil 2) on it, per-point constant
    fractional offsets, no bias."""

    SHIFTS_A = [
        (0.25, -0.4),
        (0.1, 0.3),
        (-0.35, 0.15),
        (0.2, 0.2),
        (0.0, -0.3),
        (0.4, 0.05),
        (-0.1, -0.2),
        (0.3, -0.15),
        (-0.25, 0.35),
    ]
    SHIFTS_B = [
        (0.6, -0.3),
        (-0.45, 0.2),
        (0.15, 0.7),
        (0.3, -0.55),
        (-0.2, 0.1),
        (0.5, 0.45),
        (-0.65, -0.1),
        (0.05, 0.35),
        (0.4, -0.6),
    ]

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.dcn_a = DeformConv2dPack(3, 2, 3, padding=1)
        self.dcn_b = DeformConv2dPack(2, 2, 3, padding=2, dilation=2)
        nn.init.normal_(self.dcn_a.weight)
        nn.init.normal_(self.dcn_b.weight)
        _constant_offsets(self.dcn_a, self.SHIFTS_A)
        _constant_offsets(self.dcn_b, self.SHIFTS_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dcn_b(self.dcn_a(x))


def _bilinear(py: float, px: float) -> List[Tuple[int, int, float]]:
    """(row, col, weight) of the four corners of index position (py, px) (all inside the map
    here)."""
    r0, c0 = math.floor(py), math.floor(px)
    fy, fx = py - r0, px - c0
    return [
        (r0, c0, (1 - fy) * (1 - fx)),
        (r0, c0 + 1, (1 - fy) * fx),
        (r0 + 1, c0, fy * (1 - fx)),
        (r0 + 1, c0 + 1, fy * fx),
    ]


def test_linear_model_gradient_weights_and_erf_match_the_closed_form() -> None:
    model = LinearTwoLevels().eval()
    height, width = 32, 36
    slope_x, slope_y, level = (
        np.array([0.02, -0.015, 0.01]),
        np.array([0.012, 0.018, -0.02]),
        np.array([0.1, -0.2, 0.3]),
    )
    ys, xs = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    ramp = (
        slope_x[:, None, None] * xs + slope_y[:, None, None] * ys + level[:, None, None]
    )  # X_c(row, col), a linear ramp
    forward = GradientForward(model, torch.from_numpy(ramp).float()[None])
    records = list(reversed(select_layers(forward.deformable_records(), None, 2)))
    i, j = 15, 17
    fields = receptive_fields(
        forward, records, torch.tensor([[i, j]]), (height, width), STD, saliency_error=None
    )
    w_a = model.dcn_a.weight.detach().double().numpy().reshape(2, 3, 9)  # [c', c, m]
    w_b = (
        model.dcn_b.weight.detach().double().numpy().reshape(2, 2, 9).sum(axis=0).T
    )  # W_b[k, c'] summed over outputs
    grid = [(a, b) for a in range(3) for b in range(3)]
    # y_a[c'](row, col) = alpha_c' col + beta_c' row + const, so a sample of it moved by (dy, dx)
    # changes by (beta, alpha) . (dy, dx).
    alpha = np.einsum("dcm,c->d", w_a, slope_x)
    beta = np.einsum("dcm,c->d", w_a, slope_y)
    top = [
        (i - 2 + 2 * a + dy, j - 2 + 2 * b + dx)
        for (a, b), (dy, dx) in zip(grid, LinearTwoLevels.SHIFTS_B)
    ]  # dcn_b's points
    level1 = np.array(
        [[w_b[k] @ alpha, w_b[k] @ beta] for k in range(9)]
    )  # dr/d(x, y) of each top point
    # dr/dy_a[c'](cell) = sum_k W_b[k, c'] G(cell, p_k);
    # dr/d(location of dcn_a's point m at cell) = sum_c' that * w_a[c', :, m] . slopes.
    dr_dya: Dict[Tuple[int, int], np.ndarray] = {}
    for k, (py, px) in enumerate(top):
        for r, c, g in _bilinear(py, px):
            dr_dya[(r, c)] = dr_dya.get((r, c), np.zeros(2)) + g * w_b[k]
    bottom_grad = np.array(
        [[w_a[:, :, m] @ slope_x, w_a[:, :, m] @ slope_y] for m in range(9)]
    )  # [m, (x|y), c']
    level2 = np.zeros((81, 2))
    erf_by_colour = np.zeros((3, height, width))
    for k, (py, px) in enumerate(top):
        for m in range(9):
            for r, c, g in _bilinear(py, px):  # the tree reads the field of dcn_a at p_k bilinearly
                level2[k * 9 + m] += g * (bottom_grad[m] @ dr_dya[(r, c)])
    for (r, c), weights in dr_dya.items():
        for m, ((a, b), (dy, dx)) in enumerate(zip(grid, LinearTwoLevels.SHIFTS_A)):
            for rr, cc, g in _bilinear(r - 1 + a + dy, c - 1 + b + dx):
                erf_by_colour[:, rr, cc] += g * (weights @ w_a[:, :, m])
    expected_erf = (np.abs(erf_by_colour) / (255 * np.array(STD)[:, None, None])).sum(axis=0)
    got = fields.point_gradients
    assert got is not None
    np.testing.assert_allclose(
        np.stack([got.grad_x[0][0], got.grad_y[0][0]], 1), level1, rtol=1e-4, atol=1e-7
    )
    np.testing.assert_allclose(
        np.stack([got.grad_x[1][0], got.grad_y[1][0]], 1), level2, rtol=1e-4, atol=1e-7
    )
    np.testing.assert_allclose(
        got.weights[1][0].numpy(), np.hypot(level2[:, 0], level2[:, 1]), rtol=1e-4, atol=1e-7
    )
    np.testing.assert_allclose(fields.erf[0].numpy(), expected_erf, rtol=1e-4, atol=1e-9)


def test_gradient_weights_scale_to_original_pixels_and_mean_sums_the_groups() -> None:
    torch.manual_seed(0)
    model = LinearTwoLevels().eval()
    forward = GradientForward(model, torch.rand(1, 3, 24, 24))
    records = list(reversed(select_layers(forward.deformable_records(), None, 2)))
    units = torch.tensor([[11, 12]])
    trees = trace_sampling_trees(records, units, scale_to_original=(2.0, 4.0))
    (batch,) = list(forward.backward_units("dcn_b", units, levels=["dcn_b", "dcn_a"]))
    plain = tree_gradient_weights(trees, records, batch.offset_grads)
    scaled = tree_gradient_weights(trees, records, batch.offset_grads, scale_to_original=(2.0, 4.0))
    for level in range(2):
        torch.testing.assert_close(scaled.grad_x[level], plain.grad_x[level] / 2.0)
        torch.testing.assert_close(scaled.grad_y[level], plain.grad_y[level] / 4.0)
    two_groups = {
        name: torch.cat([g, 3 * g], dim=1) for name, g in batch.offset_grads.items()
    }  # [U, 2 groups, K, 2, H, W]
    summed = tree_gradient_weights(trees, records, two_groups, group="mean")
    torch.testing.assert_close(summed.grad_x[0], 4 * plain.grad_x[0])


class InPlaceAfter(nn.Module):
    """A layer whose output the next op rewrites in place: the kept output must not change."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.dcn_a = DeformConv2dPack(3, 4, 3, padding=1)
        self.dcn_b = DeformConv2dPack(4, 4, 3, padding=1)
        nn.init.normal_(self.dcn_a.conv_offset.weight, std=0.2)
        nn.init.normal_(self.dcn_b.conv_offset.weight, std=0.2)
        self.inplace = inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dcn_a(x)
        y = torch.relu_(y) if self.inplace else torch.relu(y)
        return self.dcn_b(y)


def test_in_place_ops_after_a_layer_do_not_change_its_gradients() -> None:
    image = torch.rand(1, 3, 20, 20)
    results = []
    for inplace in (False, True):
        model = InPlaceAfter(inplace).eval()
        forward = GradientForward(model, image)
        (batch,) = list(
            forward.backward_units(
                "dcn_b",
                torch.tensor([[9, 9], [3, 15]]),
                levels=["dcn_b", "dcn_a"],
                memory_bytes=1 << 40,  # both units in one batch of copies
            )
        )
        results.append(batch)
    torch.testing.assert_close(results[0].input_grad, results[1].input_grad)
    torch.testing.assert_close(results[0].offset_grads["dcn_a"], results[1].offset_grads["dcn_a"])


def test_offset_gradient_is_the_derivative_of_the_response() -> None:
    """dr/d(offset) of the lower layer, against central differences of the real network."""
    model = InPlaceAfter(False).eval().double()
    image = torch.rand(1, 3, 14, 14, dtype=torch.float64)
    forward = GradientForward(model, image)
    unit = (6, 7)
    (batch,) = list(forward.backward_units("dcn_b", torch.tensor([unit]), levels=["dcn_a"]))
    grad = batch.offset_grads["dcn_a"][0]  # [G, K, 2, H, W]
    bias = model.dcn_a.conv_offset.bias
    eps = 1e-6
    for k, axis in ((4, 0), (2, 1), (7, 0)):
        channel = 2 * k + axis
        # A bias change shifts that offset channel at every cell: the response changes by the sum
        # of the field.
        with torch.no_grad():
            bias[channel] += eps
            up = model(image)[0, :, unit[0], unit[1]].sum()
            bias[channel] -= 2 * eps
            down = model(image)[0, :, unit[0], unit[1]].sum()
            bias[channel] += eps
        numeric = float((up - down) / (2 * eps))
        assert math.isclose(float(grad[0, k, axis].sum()), numeric, rel_tol=1e-5, abs_tol=1e-8)


# ---------------------------------------------------------------------------------------------
# Saliency regions


def _mass_evaluator(maps: torch.Tensor, offset: float = 0.0):
    """``evaluate`` of a response that is ``offset`` plus the mass of ``maps[n]`` inside the
    kept box."""

    def evaluate(indices: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        return torch.stack(
            [
                maps[int(n), y1:y2, x1:x2].sum() + offset
                for n, (x1, y1, x2, y2) in zip(indices.tolist(), boxes.tolist())
            ]
        )

    return evaluate


def _marginals(maps: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The prior the search reads: x- [U, W] and y-marginals [U, H] of the maps."""
    return maps.sum(dim=1), maps.sum(dim=2)


def test_saliency_region_is_the_smallest_box_holding_the_response_region_and_its_unit() -> None:
    """The response is the mass of a weight map inside the kept box; the mass lies uniformly on a
    5x7 region R, so dropping any row (20 %) or column (14 %) of R breaks a 10 % bound. With the
    map's marginals as the prior, the region is the smallest box containing R and the unit's
    pixel (a region always contains its unit)."""
    height, width = 48, 64
    regions = [(30, 12, 37, 17), (3, 30, 10, 35), (50, 40, 57, 45)]  # (x1, y1, x2, y2) pixel edges
    maps = torch.zeros(len(regions), height, width, dtype=torch.float64)
    for n, (x1, y1, x2, y2) in enumerate(regions):
        maps[n, y1:y2, x1:x2] = 1.0
    centres = torch.tensor(
        [[33.5, 14.5], [20.0, 20.0], [60.0, 5.0]], dtype=torch.float64
    )  # inside, off and far off R
    # by hand: R widened to the unit's pixel (floor(x), floor(y))
    expected = [(30, 12, 37, 17), (3, 20, 21, 35), (50, 5, 61, 45)]
    evaluate = _mass_evaluator(maps)
    prior = _marginals(maps)
    found = saliency_regions(
        evaluate, centres, maps.sum(dim=(1, 2)), (height, width), 0.1, 1, prior=prior
    )
    assert [r.box for r in found] == expected
    assert all(r.relative_error == 0 and r.status == "found" for r in found)
    assert [r.area for r in found] == [35, 18 * 15, 11 * 40]
    # A coarser resolution, or no prior (squares), still contains the region and the unit.
    coarse = saliency_regions(
        evaluate, centres, maps.sum(dim=(1, 2)), (height, width), 0.1, 4, prior=prior
    )
    squares = saliency_regions(evaluate, centres, maps.sum(dim=(1, 2)), (height, width), 0.1, 1)
    for region, (x1, y1, x2, y2), (cx, cy) in zip(
        coarse + squares, expected * 2, centres.tolist() * 2
    ):
        bx1, by1, bx2, by2 = region.box
        assert bx1 <= x1 and by1 <= y1 and bx2 >= x2 and by2 >= y2 and region.relative_error == 0
        assert bx1 <= cx < bx2 and by1 <= cy < by2
    # The coarse boxes' edges sit on multiples of 4, the border, or next to the unit's pixel.
    for region, (cx, cy) in zip(coarse, centres.tolist()):
        x1, y1, x2, y2 = region.box
        assert x1 % 4 == 0 or x1 == math.floor(cx)
        assert y1 % 4 == 0 or y1 == math.floor(cy)
        assert x2 % 4 == 0 or x2 in (width, math.floor(cx) + 1)
        assert y2 % 4 == 0 or y2 in (height, math.floor(cy) + 1)
    # Searched one unit at a time (the progress counts each), the regions are the same.
    done: List[int] = []
    one_by_one = saliency_regions(
        evaluate,
        centres,
        maps.sum(dim=(1, 2)),
        (height, width),
        0.1,
        1,
        chunk=1,
        on_units=done.append,
        prior=prior,
    )
    assert [r.box for r in one_by_one] == expected and done == [1, 1, 1]
    assert saliency_regions(evaluate, centres[:0], maps.sum(dim=(1, 2))[:0], (height, width)) == []


def test_saliency_search_reports_no_region_when_the_masked_image_meets_the_bound() -> None:
    """r = 100 + the mass of a 5-pixel region: with every pixel masked r is 100, 4.8 % from the
    full 105, within a 10 % bound: no box is the smallest (the search would collapse to a point);
    the row says so. Within a 0.5 % bound (one pixel of the five is 0.95 %) the region is
    found as usual."""
    height, width = 20, 30
    maps = torch.zeros(2, height, width, dtype=torch.float64)
    maps[:, 8:9, 10:15] = 1.0
    centres = torch.tensor([[12.5, 8.5], [25.5, 15.5]], dtype=torch.float64)
    evaluate = _mass_evaluator(maps, offset=100.0)
    full = maps.sum(dim=(1, 2)) + 100.0
    prior = _marginals(maps)
    loose = saliency_regions(evaluate, centres, full, (height, width), 0.1, 1, prior=prior)
    assert [r.status for r in loose] == ["masked_image_within_bound"] * 2
    assert [r.box for r in loose] == [None, None] and [r.area for r in loose] == [None, None]
    assert [r.response for r in loose] == [100.0, 100.0]
    assert loose[0].relative_error == pytest.approx(5 / 105)
    assert [r.evaluations for r in loose] == [1, 1]  # the masked image only
    tight = saliency_regions(evaluate, centres, full, (height, width), 0.005, 1, prior=prior)
    assert [r.status for r in tight] == ["found"] * 2
    assert [r.box for r in tight] == [(10, 8, 15, 9), (10, 8, 26, 16)]


def _integral_evaluator(maps: torch.Tensor, offset: float = 0.0):
    """:func:`_mass_evaluator` in O(1) per box (an integral image), for large images; it counts
    the boxes it is asked for per unit (``evaluate.asked``)."""
    integral = torch.nn.functional.pad(maps.cumsum(dim=1).cumsum(dim=2), (1, 0, 1, 0))
    asked = torch.zeros(maps.shape[0], dtype=torch.long)

    def evaluate(indices: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        asked.index_add_(0, indices, torch.ones_like(indices))
        x1, y1, x2, y2 = boxes.unbind(dim=1)
        n = indices
        inside = (
            integral[n, y2, x2] - integral[n, y1, x2] - integral[n, y2, x1] + integral[n, y1, x1]
        )
        return inside + offset

    evaluate.asked = asked  # type: ignore[attr-defined]
    return evaluate


def _response_maps(kind: str, count: int, hw: Tuple[int, int], rng: np.random.Generator):
    """``count`` weight maps of one kind: uniform random boxes, Gaussian blobs of random widths,
    two blobs of opposite signs (a response the box can overshoot), or noise everywhere."""
    height, width = hw
    ys, xs = np.mgrid[0:height, 0:width]
    maps = np.zeros((count, height, width))
    for n in range(count):
        if kind == "boxes":
            x1, x2 = sorted(rng.integers(0, width + 1, 2))
            y1, y2 = sorted(rng.integers(0, height + 1, 2))
            maps[n, y1 : max(y2, y1 + 1), x1 : max(x2, x1 + 1)] = 1.0
        elif kind in ("gaussian", "signed"):
            for sign in (1.0, -0.6) if kind == "signed" else (1.0,):
                cx, cy = rng.uniform(0, width), rng.uniform(0, height)
                sx, sy = rng.uniform(1, width / 3), rng.uniform(1, height / 3)
                maps[n] += sign * np.exp(-(((xs - cx) / sx) ** 2 + ((ys - cy) / sy) ** 2) / 2)
        else:
            maps[n] = rng.random((height, width)) + 0.2
    return torch.from_numpy(maps)


def _priors(kind: str, maps: torch.Tensor, rng: np.random.Generator):
    """The search's prior: the maps' own marginals, noisy ones, another unit's, zero (squares
    for those units) or none."""
    prior_x, prior_y = maps.abs().sum(dim=1), maps.abs().sum(dim=2)
    if kind == "exact":
        return prior_x, prior_y
    if kind == "noisy":
        return (
            prior_x * torch.from_numpy(rng.uniform(0.2, 3.0, tuple(prior_x.shape))),
            prior_y * torch.from_numpy(rng.uniform(0.2, 3.0, tuple(prior_y.shape))),
        )
    if kind == "another_units":
        return prior_x.roll(1, dims=0), prior_y.roll(1, dims=0)
    if kind == "zero":
        return prior_x * 0, prior_y * 0
    return None


@pytest.mark.parametrize(
    ("hw", "steps", "errors"),
    [
        ((48, 64), (1, 3, 8), (0.02, 0.1, 0.5)),
        ((800, 1333), (1, 16), (0.1,)),
        ((1333, 800), (1, 32), (0.05,)),
    ],
)
def test_every_unit_takes_at_most_12_masked_forwards_and_its_box_passes_and_holds_it(
    hw: Tuple[int, int], steps: Tuple[int, ...], errors: Tuple[float, ...]
) -> None:
    """On responses of many shapes (random boxes, Gaussian blobs, blobs of both signs, noise),
    units on and off the mass, exact / noisy / wrong / zero / no priors, fine and coarse steps and
    images up to 1333x800 (families of more than 127 members, subsampled): every unit is asked
    for at most 12 masked images, as its region says; a found box meets the bound it was
    searched with, lies on the image and contains the unit's pixel."""
    rng = np.random.default_rng(sum(hw))
    height, width = hw
    count = 6 if height * width < 10**5 else 4
    for kind in ("boxes", "gaussian", "signed", "noise"):
        maps = _response_maps(kind, count, hw, rng)
        full = maps.sum(dim=(1, 2))
        centres = torch.from_numpy(
            np.column_stack([rng.uniform(-2, width + 2, count), rng.uniform(-2, height + 2, count)])
        )  # a few outside the image: clamped
        for prior_kind in ("exact", "noisy", "another_units", "zero", "none"):
            prior = _priors(prior_kind, maps, rng)
            for step in steps:
                for error in errors:
                    evaluate = _integral_evaluator(maps)
                    found = saliency_regions(
                        evaluate, centres, full, hw, error, step, chunk=4, prior=prior
                    )
                    assert [r.evaluations for r in found] == evaluate.asked.tolist()
                    assert max(r.evaluations for r in found) <= MAX_FORWARDS_PER_UNIT == 12
                    for region, (cx, cy) in zip(found, centres.tolist()):
                        if region.status != "found":
                            continue
                        x1, y1, x2, y2 = region.box
                        px = math.floor(min(max(cx, 0.0), width - 1e-9))
                        py = math.floor(min(max(cy, 0.0), height - 1e-9))
                        assert 0 <= x1 <= px < x2 <= width and 0 <= y1 <= py < y2 <= height
                        assert region.relative_error <= error * (1 + 1e-9)


def _nested(boxes: torch.Tensor) -> bool:
    inner, outer = boxes[:-1], boxes[1:]
    return bool(((outer[:, :2] <= inner[:, :2]) & (outer[:, 2:] >= inner[:, 2:])).all())


def test_families_grow_from_the_unit_to_the_whole_image_in_at_most_128_members() -> None:
    """Both families are nested, distinct, start at the unit (the prior's: the unit's cell on the
    step grid), end with the whole image and, on a 1333x800 image at step 1 where they would
    have hundreds of members, keep 127 before it."""
    height, width = 800, 1333
    ys, xs = np.mgrid[0:height, 0:width]
    blob = torch.from_numpy(np.exp(-(((xs - 700) / 300.0) ** 2 + ((ys - 400) / 200.0) ** 2) / 2))
    centre = (650.5, 420.5)
    for step, first in ((1, (650, 420, 651, 421)), (16, (640, 416, 656, 432))):
        for family in (
            prior_family(blob.sum(dim=0), blob.sum(dim=1), centre, (height, width), step),
            square_family(centre, (height, width), step),
        ):
            assert family is not None and _nested(family)
            assert len(torch.unique(family, dim=0)) == len(family) <= MAX_FAMILY + 1 == 128
            assert family[-1].tolist() == [0, 0, width, height]
            x1, y1, x2, y2 = family[0].tolist()
            assert x1 <= 650 < x2 and y1 <= 420 < y2
        assert prior_family(blob.sum(0), blob.sum(1), centre, (height, width), step)[
            0
        ].tolist() == list(first)
    assert len(square_family(centre, (height, width), 1)) == 128
    assert len(prior_family(blob.sum(dim=0), blob.sum(dim=1), centre, (height, width), 1)) == 128
    # No mass: no prior family (the search uses the squares).
    assert prior_family(blob.sum(0) * 0, blob.sum(1) * 0, centre, (height, width), 1) is None


def test_the_prior_finds_a_thin_region_that_squares_and_four_single_steps_cannot() -> None:
    """A response read from a 2x100 strip, within 0.5 %: its marginals lead the family straight
    onto the strip (the smallest box), in at most 12 forwards; squares around the unit (the
    prior ignored) must grow to the strip's length and end far bigger, so a search that dropped
    the prior fails this test."""
    height, width = 64, 256
    maps = torch.zeros(1, height, width, dtype=torch.float64)
    maps[0, 30:32, 100:200] = 1.0
    centres = torch.tensor([[150.5, 31.5]], dtype=torch.float64)
    full = maps.sum(dim=(1, 2))
    error = 0.005  # dropping one column of the strip (1 %) breaks it: the strip is the region
    guided = saliency_regions(
        _integral_evaluator(maps), centres, full, (height, width), error, 1, prior=_marginals(maps)
    )[0]
    assert guided.box == (100, 30, 200, 32) and guided.evaluations <= 12
    blind = saliency_regions(_integral_evaluator(maps), centres, full, (height, width), error, 1)
    assert blind[0].area > 20 * guided.area


class BoxResponse(nn.Module):
    """A unit's response is the sum of a 5x7 window of the input shifted by (+4, -6) cells: a
    7x5-pixel box filter read by a 1x1 deformable conv with a constant whole-cell offset."""

    def __init__(self) -> None:
        super().__init__()
        self.box = nn.Conv2d(3, 1, (5, 7), padding=(2, 3), bias=False)
        self.dcn = DeformConv2dPack(1, 1, 1)
        with torch.no_grad():
            self.box.weight.fill_(1.0)
            self.dcn.weight.fill_(1.0)
        _constant_offsets(self.dcn, [(4.0, -6.0)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dcn(self.box(x))


def test_saliency_search_on_a_model_finds_the_box_it_reads() -> None:
    model = BoxResponse().eval()
    forward = GradientForward(model, torch.full((1, 3, 30, 40), 0.8))
    records = list(select_layers(forward.deformable_records(), None, 1))
    fields = receptive_fields(
        forward, records, torch.tensor([[10, 20], [3, 30]]), (30, 40), STD, saliency_step=1
    )
    # Unit (i, j) reads rows i+4-2..i+4+2 and columns j-6-3..j-6+3; its region also holds the
    # unit's own pixel (j, i).
    assert [r.box for r in fields.saliency] == [(11, 10, 21, 17), (21, 3, 31, 10)]
    assert _support(fields.erf[0].numpy() > 0) == {
        (r, c) for r in range(12, 17) for c in range(11, 18)
    }
    assert fields.numbers[0].centroid_x == pytest.approx(14.5) and fields.numbers[
        0
    ].centroid_y == pytest.approx(14.5)


def test_saliency_search_on_a_model_takes_at_most_12_masked_forwards_per_unit() -> None:
    """Through ``receptive_fields`` (the ERF's marginals as the prior) on a random deformable
    model: every unit of its 20x24 map's corners, edges and inside is given at most 12 masked
    images (counted at the gradient forward's ``evaluate_masked``), as its region says, at the
    default step and at step 1 with a tighter bound; every found box meets the bound and holds
    its unit."""
    namespace: Dict[str, object] = {}
    exec(TINY_SOURCE, namespace)
    model = namespace["build"]()  # type: ignore[operator]
    image = torch.from_numpy(np.random.default_rng(1).standard_normal((1, 3, 40, 48))).float()
    units = torch.tensor([[0, 0], [0, 23], [19, 0], [19, 23], [10, 12], [5, 17], [14, 3], [9, 9]])
    for step, error in ((None, 0.1), (1, 0.02)):
        forward = GradientForward(model, image)
        records = list(select_layers(forward.deformable_records(), None, 3))[::-1]
        asked: Dict[Tuple[int, int], int] = {}
        evaluate_masked = forward.evaluate_masked

        def counted(layer, chosen, boxes, *args, **kwargs):
            for row, col in chosen.tolist():
                asked[(row, col)] = asked.get((row, col), 0) + 1
            return evaluate_masked(layer, chosen, boxes, *args, **kwargs)

        forward.evaluate_masked = counted  # type: ignore[method-assign]
        fields = receptive_fields(
            forward,
            records,
            units,
            (40, 48),
            STD,
            saliency_error=error,
            saliency_step=step,
            batch_size=3,
        )
        evaluations = [r.evaluations for r in fields.saliency]
        assert evaluations == [asked[(int(i), int(j))] for i, j in units.tolist()]
        assert max(evaluations) <= 12
        assert fields.saliency_prior is not None and fields.saliency_error == error
        assert fields.saliency_prior[0].shape == (8, 48)
        for region, (x, y) in zip(fields.saliency, fields.unit_xy.tolist()):
            if region.status == "found":
                x1, y1, x2, y2 = region.box
                assert x1 <= x < x2 and y1 <= y < y2 and region.relative_error <= error


def test_erf_numbers_of_a_ring_and_a_box() -> None:
    erf = np.zeros((41, 41))
    erf[20, 20] = 1.0  # centre pixel: mass 1 at distance 0
    ys, xs = np.nonzero(np.ones_like(erf))
    ring = np.abs(np.hypot(xs - 20, ys - 20) - 10) < 0.5
    erf[ys[ring], xs[ring]] = 9.0 / ring.sum()  # mass 9 at distance ~10
    numbers = erf_numbers(erf, box=(15.0, 15.0, 26.0, 26.0))
    assert (numbers.centroid_x, numbers.centroid_y) == pytest.approx((20.5, 20.5))
    assert 9.5 <= numbers.radius_50 <= 10.5 and 9.5 <= numbers.radius_90 <= 10.5
    assert numbers.mass == pytest.approx(10.0)
    assert numbers.mass_in_box == pytest.approx(0.1)
    only_centre = np.zeros((5, 5))
    only_centre[2, 2] = 3.0
    assert erf_numbers(only_centre).radius_90 == 0.0


# ---------------------------------------------------------------------------------------------
# The command: outputs, compare model, dataset mode, errors

TINY_SOURCE = '''
import torch
from torch import nn
from dcn_inspect.ops import DeformConv2dPack, ModulatedDeformConv2dPack


class TinyRF(nn.Module):
    """Stride-2 stem, then three 3x3 layers: deformable (the last modulated) or regular convs of
    the same names."""

    def __init__(self, deformable=True):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        if deformable:
            self.dcn_a = DeformConv2dPack(4, 4, 3, padding=1)
            self.dcn_b = DeformConv2dPack(4, 4, 3, padding=2, dilation=2)
            self.dcn_c = ModulatedDeformConv2dPack(4, 4, 3, padding=2, dilation=2)
            for layer in (self.dcn_a, self.dcn_b, self.dcn_c):
                nn.init.normal_(layer.conv_offset.weight, std=0.3)
        else:
            self.dcn_a = nn.Conv2d(4, 4, 3, padding=1)
            self.dcn_b = nn.Conv2d(4, 4, 3, padding=2, dilation=2)
            self.dcn_c = nn.Conv2d(4, 4, 3, padding=2, dilation=2)

    def forward(self, x):
        return self.dcn_c(torch.relu(self.dcn_b(torch.relu(self.dcn_a(torch.relu(self.stem(x)))))))


def build():
    return TinyRF().eval()


def build_plain():
    return TinyRF(deformable=False).eval()
'''


@pytest.fixture()
def tiny(tmp_path: Path) -> Dict[str, Path]:
    model = tmp_path / "tiny_rf.py"
    model.write_text(TINY_SOURCE)
    rng = np.random.default_rng(0)
    image = tmp_path / "scene.png"
    Image.fromarray((rng.random((40, 48, 3)) * 255).astype(np.uint8)).save(image)
    return {"model": model, "image": image, "root": tmp_path}


def _main(args: List[str], capsys: pytest.CaptureFixture) -> Tuple[int, str, str]:
    import sys

    from dcn_inspect.cli import main
    from dcn_inspect.cli.app import state

    state["debug"] = False
    old = sys.argv
    sys.argv = ["dcn-inspect", *args]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = old
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_writes_every_output_and_compares_with_a_plain_twin(
    tiny: Dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    out = tiny["root"] / "out"
    model = f"{tiny['model']}:build"
    args = [
        "receptive-field",
        str(tiny["image"]),
        "--model",
        model,
        "--at",
        "20,16",
        "--at",
        "3,37",
        "--compare-model",
        f"{tiny['model']}:build_plain",
        "--out",
        str(out),
    ]
    code, stdout, stderr = _main(args, capsys)
    assert code == 0, stderr
    assert "dcn_c, dcn_b, dcn_a" in stdout
    table = pd.read_csv(out / "scene_receptive_field.csv")
    assert list(table.columns) == CSV_COLUMNS
    assert list(table["model"]) == ["model", "model", "compare", "compare"]
    # The same image positions: the plain twin has the same frames, so the same cells and
    # theoretical fields.
    assert list(table["unit_row"]) == [8, 18, 8, 18] and list(table["unit_col"]) == [10, 1, 10, 1]
    for column in ("rf_x1", "rf_y1", "rf_x2", "rf_y2"):
        assert list(table[column][:2]) == list(table[column][2:])
    arrays = np.load(out / "scene_erf.npz")
    assert arrays["model/erf"].shape == (2, 40, 48) and arrays["compare/erf"].shape == (2, 40, 48)
    assert arrays["model/level3/grad_weight"].shape == (2, 729)
    # A regular conv is a deformable one with zero offsets: the twin's points form the regular grid,
    # and its ERF never leaves the theoretical receptive field.
    for u in range(2):
        rows, cols = np.nonzero(arrays["compare/erf"][u])
        x1, y1, x2, y2 = arrays["compare/theoretical_rf"][u]
        assert (
            cols.min() >= math.floor(x1)
            and cols.max() + 1 <= math.ceil(x2)
            and rows.min() >= math.floor(y1)
            and rows.max() + 1 <= math.ceil(y2)
        )
    assert (arrays["compare/level1/grad_weight"] > 0).any()
    assert (out / "scene_receptive_field.png").stat().st_size > 10_000
    summary = json.loads((out / "summary.json").read_text())
    assert summary["response"]["channel"] == "sum over channels"
    assert "sum over channels" in summary["response"]["definition"]
    assert "dataset mean" in summary["saliency"]["schedule"]
    assert summary["compare_model"]["name"].endswith(":build_plain")
    assert summary["layers"] == ["dcn_c", "dcn_b", "dcn_a"]


def test_channel_response_is_that_channels_output(tiny: Dict[str, Path]) -> None:
    from dcn_inspect.commands.receptive_field import receptive_field
    from dcn_inspect.models.loading import load_model

    loaded = load_model(f"{tiny['model']}:build")
    result = receptive_field(
        [tiny["image"]],
        model=loaded,
        at=["20,16"],
        channel=2,
        out=tiny["root"] / "out",
        progress=False,
        saliency_error=0.2,
    )
    image = np.asarray(Image.open(tiny["image"]).convert("RGB"))
    with torch.no_grad():
        output = loaded.model(to_model_input(image, loaded.preprocess).tensor)
    row = result.images[0].table.iloc[0]
    assert row["channel"] == "2"
    assert row["response"] == pytest.approx(
        float(output[0, 2, int(row["unit_row"]), int(row["unit_col"])]), rel=1e-5
    )
    assert row["saliency_error"] <= 0.2


def test_same_inputs_same_csv_bytes(tiny: Dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    out = tiny["root"] / "out"
    args = [
        "receptive-field",
        str(tiny["image"]),
        "--model",
        f"{tiny['model']}:build",
        "--grid",
        "8",
        "--out",
        str(out),
    ]
    snapshots = []
    for _ in range(2):
        code, _, stderr = _main(args, capsys)
        assert code == 0, stderr
        snapshots.append((out / "scene_receptive_field.csv").read_bytes())
    assert snapshots[0] == snapshots[1]


def test_dataset_mode_tabulates_radius_and_area_by_category_like_dilation_stats(
    tiny: Dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    from dcn_inspect.analysis.dilation_tables import TABLE_COLUMNS
    from dcn_inspect.analysis.size_categories import CATEGORIES

    dataset = tiny["root"] / "ds.json"
    dataset.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "scene.png", "width": 48, "height": 40}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 8, 6], "area": 48,
             "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [20, 10, 26, 28], "area": 728,
             "iscrowd": 0},
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }))  # fmt: skip
    out = tiny["root"] / "stats"
    args = [
        "receptive-field",
        str(dataset),
        "--stats",
        "--model",
        f"{tiny['model']}:build",
        "--thresholds",
        "100,500",
        "--levels",
        "2",
        "--out",
        str(out),
    ]
    code, stdout, stderr = _main(args, capsys)
    assert code == 0, stderr
    radius = pd.read_csv(out / "erf_radius_table.csv")
    area = pd.read_csv(out / "saliency_area_table.csv")
    plain = [
        name for name in TABLE_COLUMNS if name not in ("ci_low", "ci_high")
    ]  # the dilation-stats layout, no intervals here
    assert list(radius.columns) == plain and list(area.columns) == plain
    summary = json.loads((out / "summary.json").read_text())
    assert [c["name"] for c in summary["columns"]["erf_radius_table.csv"]] == plain
    assert list(radius["layer"]) == ["dcn_c"] * 4 + ["dcn_b"] * 4
    assert list(radius["category"]) == list(CATEGORIES) * 2
    # per layer: the 8x6 box is small (48 < 100), the 26x28 one large (728 >= 500), plus one
    # background unit
    assert list(radius["count"][:4]) == [1, 0, 1, 1] and list(area["count"][4:]) == [1, 0, 1, 1]
    units = pd.read_csv(out / "receptive_field_units.csv")
    assert len(units) == 6 and set(units["category"]) == {"small", "large", "background"}
    found = units["saliency_status"] == "found"  # else the masked image meets the bound: no area
    assert (units.loc[found, "saliency_area"] > 0).all() and units.loc[
        ~found, "saliency_area"
    ].isna().all()
    assert (units["erf_radius_90"] >= units["erf_radius_50"]).all()
    assert "ERF radius" in (out / "erf_radius_table.md").read_text()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--at", "500,500"], r"--at 500,500: outside scene\.png"),
        (["--channel", "99"], r"--channel 99: layer dcn_c has 4 channels"),
        (["--model", "PLAIN"], r"--model .*no deformable conv layer"),
        (["--saliency-error", "1.5"], r"--saliency-error 1\.5: .*\[0, 1\)"),
        (
            ["--layers", "dcn_z"],
            r"--layers: unknown deformable layer\(s\) dcn_z; valid: dcn_a, dcn_b, dcn_c",
        ),
        (
            ["--compare-model", "PLAIN_OTHER"],
            r"--compare-model .*other\.py:build: no layer named dcn_c, dcn_b, dcn_a",
        ),
        (["--stats", "--grid", "4"], r"--grid is not read with --stats"),
    ],
    ids=[
        "unit-outside",
        "unknown-channel",
        "no-deformable-layer",
        "bad-error-bound",
        "unknown-layer",
        "compare-without-layer",
        "mode-mixup",
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    extra: List[str], message: str, tiny: Dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    import re

    other = tiny["root"] / "other.py"
    other.write_text(
        "from torch import nn\n\ndef build():\n    return nn.Sequential(nn.Conv2d(3, 2, 3))\n"
    )
    out = tiny["root"] / "out"
    replaced = [
        e.replace("PLAIN_OTHER", f"{other}:build").replace("PLAIN", f"{tiny['model']}:build_plain")
        for e in extra
    ]
    args = [
        "receptive-field",
        str(tiny["image"]),
        "--model",
        f"{tiny['model']}:build",
        *replaced,
        "--out",
        str(out),
    ]
    code, stdout, stderr = _main(args, capsys)
    assert code == 1, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("dcn-inspect: error:")]
    assert len(errors) == 1 and "Traceback" not in stderr + stdout, stderr
    assert re.search(message, errors[0]), errors[0]
    written = [p for p in out.rglob("*") if p.is_file()] if out.exists() else []
    assert written == []


def test_sample_points_grad_weight_column_is_the_receptive_field_gradient(
    tiny: Dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    from dcn_inspect.analysis.sample_points import CSV_COLUMNS as POINT_COLUMNS

    model = f"{tiny['model']}:build"
    code, _, stderr = _main(
        [
            "sample-points",
            str(tiny["image"]),
            "--model",
            model,
            "--at",
            "20,16",
            "--at",
            "0,0",
            "--grad-weight",
            "--out",
            str(tiny["root"] / "sp"),
        ],
        capsys,
    )
    assert code == 0, stderr
    points = pd.read_csv(tiny["root"] / "sp" / "scene_points.csv")
    assert list(points.columns) == POINT_COLUMNS + ["grad_weight"]
    code, _, stderr = _main(
        [
            "receptive-field",
            str(tiny["image"]),
            "--model",
            model,
            "--at",
            "20,16",
            "--at",
            "0,0",
            "--out",
            str(tiny["root"] / "rf"),
        ],
        capsys,
    )
    assert code == 0, stderr
    arrays = np.load(tiny["root"] / "rf" / "scene_erf.npz")
    for level in (1, 2, 3):
        rows = points[points["level"] == level]
        got = rows["grad_weight"].to_numpy().reshape(2, -1)
        np.testing.assert_allclose(
            got, arrays[f"model/level{level}/grad_weight"], rtol=1e-4, atol=1e-9
        )
    # The unit's own sampling points are real locations: one the op reads as zero does not matter
    # at all.
    level1 = points[points["level"] == 1]
    assert (level1["grad_weight"] > 0).any() and (
        level1.loc[level1["inside"] == 0, "grad_weight"] == 0
    ).all()
    assert (level1["inside"] == 0).any()
    code, _, stderr = _main(
        [
            "sample-points",
            str(tiny["image"]),
            "--model",
            model,
            "--at",
            "20,16",
            "--out",
            str(tiny["root"] / "plain"),
        ],
        capsys,
    )
    assert code == 0, stderr
    assert list(pd.read_csv(tiny["root"] / "plain" / "scene_points.csv").columns) == POINT_COLUMNS


def test_batched_copies_single_backwards_and_vmap_give_the_same_gradients() -> None:
    model = InPlaceAfter(True).eval()
    forward = GradientForward(model, torch.rand(1, 3, 18, 22))
    units = torch.tensor([[9, 9], [3, 15], [0, 0], [17, 21], [8, 2]])
    levels = ["dcn_b", "dcn_a"]
    copies = list(
        forward.backward_units("dcn_b", units, levels=levels, batch_size=3, memory_bytes=1 << 40)
    )
    assert [b.input_grad.shape[0] for b in copies] == [3, 2]
    one_by_one = list(
        forward.backward_units(
            "dcn_b", units, levels=levels, batch_size=3, memory_bytes=forward.saved_bytes
        )
    )
    assert forward.replicas(3, forward.saved_bytes) == 1 and len(one_by_one) == 5
    vmapped = list(
        forward.backward_units("dcn_b", units, levels=levels, batch_size=5, strategy="vmap")
    )
    for other in (one_by_one, vmapped):
        torch.testing.assert_close(
            torch.cat([b.input_grad for b in other]),
            torch.cat([b.input_grad for b in copies]),
            rtol=1e-4,
            atol=1e-6,
        )
        for name in levels:
            torch.testing.assert_close(
                torch.cat([b.offset_grads[name] for b in other]),
                torch.cat([b.offset_grads[name] for b in copies]),
                rtol=1e-4,
                atol=1e-6,
            )


def test_erf_with_a_resize_is_the_gradient_through_the_float_preprocessing() -> None:
    """A linear model, an image shrunk 60x84 -> 25x35 by the real preprocessing: the ERF equals
    autograd through resize (PIL's operator in float) + normalisation + model, w.r.t. the 8-bit
    pixels."""
    model = LinearTwoLevels().eval()
    rng = np.random.default_rng(4)
    image = (rng.random((60, 84, 3)) * 255).astype(np.uint8)
    preprocess = Preprocess(resize=25)
    model_input = to_model_input(image, preprocess)
    assert model_input.input_hw == (25, 35)
    forward = GradientForward(model, model_input.tensor)
    records = list(reversed(select_layers(forward.deformable_records(), None, 2)))
    units = torch.tensor([[12, 17], [3, 30]])
    fields = receptive_fields(
        forward, records, units, model_input.original_hw, preprocess.std, saliency_error=None
    )
    pixels = torch.from_numpy(image).double().permute(2, 0, 1).clone().requires_grad_(True)
    rows, cols = bilinear_resize_matrix(60, 25), bilinear_resize_matrix(84, 35)
    mean = torch.tensor(preprocess.mean, dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(preprocess.std, dtype=torch.float64).view(3, 1, 1)
    output = model.double()(((rows @ pixels @ cols.T / 255 - mean) / std)[None])
    for u, (i, j) in enumerate(units.tolist()):
        (grad,) = torch.autograd.grad(output[0, :, i, j].sum(), pixels, retain_graph=True)
        np.testing.assert_allclose(
            fields.erf[u].numpy(), grad.abs().sum(dim=0).numpy(), rtol=2e-4, atol=1e-9
        )
    assert fields.erf.shape == (2, 60, 84)


BIASED_SOURCE = (
    TINY_SOURCE
    + '''

def build_biased():
    """dcn_c's output is dominated by its bias: with every pixel masked its units keep their
    response within 10 %."""
    model = TinyRF().eval()
    with torch.no_grad():
        model.dcn_c.bias.fill_(1000.0)
    return model


def build_unbiased():
    """No bias anywhere: with every pixel masked every response is 0."""
    model = TinyRF().eval()
    with torch.no_grad():
        for layer in (model.stem, model.dcn_a, model.dcn_b, model.dcn_c):
            if layer.bias is not None:
                layer.bias.zero_()
    return model
'''
)


# ---------------------------------------------------------------------------------------------
# Padded model inputs (mmdetection / detectron2: zero padding to a size divisor)


@pytest.mark.parametrize(
    "image_hw, preprocess, resized_hw, input_hw",
    [
        ((40, 48), Preprocess(size_divisor=32), (40, 48), (64, 64)),
        ((60, 84), Preprocess(resize=25, size_divisor=16), (25, 35), (32, 48)),
    ],
    ids=["padding-only", "resize-and-padding"],
)
def test_padded_input_maps_through_the_resize_only_and_erf_is_autograd_of_the_padded_input(
    image_hw: Tuple[int, int],
    preprocess: Preprocess,
    resized_hw: Tuple[int, int],
    input_hw: Tuple[int, int],
) -> None:
    """The padding is model input but no image: positions map to the image by original / resized
    size, and the ERF is |dr/dI| through resize + normalisation + zero padding (direct autograd,
    the padded input built from the pixels), not a resize of the padded input onto the image."""
    model = LinearTwoLevels().eval()
    rng = np.random.default_rng(5)
    image = (rng.random((*image_hw, 3)) * 255).astype(np.uint8)
    model_input = to_model_input(image, preprocess)
    assert model_input.input_hw == input_hw and model_input.content_hw == resized_hw
    forward = GradientForward(model, model_input.tensor)
    records = list(reversed(select_layers(forward.deformable_records(), None, 2)))
    units = torch.tensor([[12, 17], [3, 30], [20, 2]])
    fields = receptive_fields(
        forward,
        records,
        units,
        model_input.original_hw,
        preprocess.std,
        saliency_step=1,
        content_hw=model_input.content_hw,
    )
    # dcn_b keeps the input's grid: unit (i, j) is centred at (j + 0.5, i + 0.5) model-input pixels
    sx, sy = image_hw[1] / resized_hw[1], image_hw[0] / resized_hw[0]
    expected_xy = [((j + 0.5) * sx, (i + 0.5) * sy) for i, j in units.tolist()]
    np.testing.assert_allclose(fields.unit_xy.numpy(), expected_xy, rtol=1e-12)
    np.testing.assert_allclose(
        fields.trees.xs[0][0].numpy().mean(), expected_xy[0][0], atol=0.5 * sx
    )  # the level-1 points sit around the unit, in the same frame
    pixels = torch.from_numpy(image).double().permute(2, 0, 1).clone().requires_grad_(True)
    rows = bilinear_resize_matrix(image_hw[0], resized_hw[0])
    cols = bilinear_resize_matrix(image_hw[1], resized_hw[1])
    mean = torch.tensor(preprocess.mean, dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(preprocess.std, dtype=torch.float64).view(3, 1, 1)
    content = (rows @ pixels @ cols.T / 255 - mean) / std
    padded = torch.nn.functional.pad(
        content, (0, input_hw[1] - resized_hw[1], 0, input_hw[0] - resized_hw[0])
    )
    output = model.double()(padded[None])
    for u, (i, j) in enumerate(units.tolist()):
        (grad,) = torch.autograd.grad(output[0, :, i, j].sum(), pixels, retain_graph=True)
        expected = grad.abs().sum(dim=0).numpy()
        np.testing.assert_allclose(fields.erf[u].numpy(), expected, rtol=2e-4, atol=1e-9)
    # the saliency region lies on the image and holds its unit
    for (x, y), box in zip(expected_xy, fields.saliency_boxes.tolist()):
        assert 0 <= box[0] <= x < box[2] <= image_hw[1] and 0 <= box[1] <= y < box[3] <= image_hw[0]


def test_padded_model_unit_is_where_sample_points_puts_it(
    tiny: Dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    """A model whose input is padded to a multiple of 32 (48x40 -> 64x64): receptive-field and
    sample-points put the unit of `--at 20,16` at the same place, (20.5, 16.5) by hand (stride-2
    stem: cell j centred at 2j + 0.5), and so are the sampling points and the theoretical field."""
    padded = tiny["root"] / "tiny_padded.py"
    padded.write_text(BIASED_SOURCE + "\nPREPROCESS = {'size_divisor': 32}\n")
    model = f"{padded}:build_unbiased"
    common = [str(tiny["image"]), "--model", model, "--at", "20,16"]
    code, _, stderr = _main(["sample-points", *common, "--out", str(tiny["root"] / "sp")], capsys)
    assert code == 0, stderr
    points = pd.read_csv(tiny["root"] / "sp" / "scene_points.csv")
    code, _, stderr = _main(["receptive-field", *common, "--out", str(tiny["root"] / "rf")], capsys)
    assert code == 0, stderr
    row = pd.read_csv(tiny["root"] / "rf" / "scene_receptive_field.csv").iloc[0]
    assert (row["unit_x"], row["unit_y"]) == (20.5, 16.5)
    assert (points["unit_x"].iloc[0], points["unit_y"].iloc[0]) == (20.5, 16.5)
    arrays = np.load(tiny["root"] / "rf" / "scene_erf.npz")
    for level in (1, 2, 3):
        rows = points[points["level"] == level]
        # the points CSV keeps 4 decimals
        np.testing.assert_allclose(arrays[f"model/level{level}/x"][0], rows["x"], atol=6e-5)
        np.testing.assert_allclose(arrays[f"model/level{level}/y"][0], rows["y"], atol=6e-5)
    # regular grids: stem 3x3 s2 (+1 px), then 3x3 (+1 cell), two 3x3 dil 2 (+2 cells each) at
    # stride 2: 1.5 + 2 * (1 + 2 + 2) = 11.5 px on each side of the unit
    assert (row["rf_x1"], row["rf_x2"]) == (20.5 - 11.5, 20.5 + 11.5)
    assert row["saliency_x1"] <= 20.5 < row["saliency_x2"] <= 48


# ---------------------------------------------------------------------------------------------
# Units without a saliency region; progress; figures; the dataset mode's printed tables


def test_dataset_mode_leaves_units_without_a_saliency_region_out_with_a_count(
    tiny: Dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    source = tiny["root"] / "tiny_biased.py"
    source.write_text(BIASED_SOURCE)
    dataset = tiny["root"] / "ds.json"
    dataset.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "scene.png", "width": 48, "height": 40}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 8, 6], "area": 48,
             "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [20, 10, 26, 28], "area": 728,
             "iscrowd": 0},
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }))  # fmt: skip
    out = tiny["root"] / "stats"
    args = ["receptive-field", str(dataset), "--stats", "--model", f"{source}:build_biased"]
    code, stdout, stderr = _main(
        [*args, "--thresholds", "100,500", "--levels", "2", "--out", str(out)], capsys
    )
    assert code == 0, stderr
    units = pd.read_csv(out / "receptive_field_units.csv")
    top = units[units["layer"] == "dcn_c"]
    assert len(top) == 3 and (top["saliency_status"] == "masked_image_within_bound").all()
    assert top["saliency_area"].isna().all()
    lower = units[units["layer"] == "dcn_b"]
    assert (lower["saliency_status"] == "found").all() and (lower["saliency_area"] > 0).all()
    area = pd.read_csv(out / "saliency_area_table.csv")
    radius = pd.read_csv(out / "erf_radius_table.csv")
    assert list(area["count"][:4]) == [0, 0, 0, 0] and list(radius["count"][:4]) == [1, 0, 1, 1]
    assert list(area["count"][4:]) == [1, 0, 1, 1]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["saliency"]["units_without_region"] == {"dcn_c": 3, "dcn_b": 0}
    assert "3 unit(s) without a saliency region" in stdout


def test_image_rows_say_when_no_saliency_region_exists(tiny: Dict[str, Path]) -> None:
    from dcn_inspect.commands.receptive_field import receptive_field
    from dcn_inspect.models.loading import load_model

    source = tiny["root"] / "tiny_biased.py"
    source.write_text(BIASED_SOURCE)
    result = receptive_field(
        [tiny["image"]],
        model=load_model(f"{source}:build_biased"),
        compare_model=load_model(f"{source}:build_unbiased"),
        at=["20,16", "3,37"],
        out=tiny["root"] / "out",
        progress=False,
    )
    table = pd.read_csv(tiny["root"] / "out" / "scene_receptive_field.csv")
    assert list(table.columns) == CSV_COLUMNS and "saliency_status" in CSV_COLUMNS
    biased, plain = table[table["model"] == "model"], table[table["model"] == "compare"]
    assert (biased["saliency_status"] == "masked_image_within_bound").all()
    assert biased[["saliency_x1", "saliency_y2", "saliency_area"]].isna().all().all()
    assert (biased["saliency_error"] <= 0.1).all()
    assert (plain["saliency_status"] == "found").all()
    for _, row in plain.iterrows():
        assert row["saliency_x1"] <= row["unit_x"] < row["saliency_x2"]
        assert row["saliency_y1"] <= row["unit_y"] < row["saliency_y2"]
    arrays = np.load(tiny["root"] / "out" / "scene_erf.npz")
    assert np.isnan(arrays["model/saliency_box"]).all()
    assert len(result.images) == 1


class _Bars:
    """A stand-in for ``image_progress`` recording every bar: label, total, unit, advances."""

    def __init__(self) -> None:
        self.bars: List[Dict[str, object]] = []

    def __call__(self, label: str, enabled: bool, total: int, noun: str = "images"):
        from contextlib import contextmanager

        bar: Dict[str, object] = {"label": label, "total": total, "noun": noun, "done": 0}
        self.bars.append(bar)

        @contextmanager
        def opened():
            def advance(n: int = 1) -> None:
                bar["done"] = int(bar["done"]) + n  # type: ignore[call-overload]

            yield advance

        return opened()


def test_saliency_search_shows_its_progress_in_units(
    tiny: Dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from dcn_inspect.commands.receptive_field import per_image, receptive_field

    bars = _Bars()
    monkeypatch.setattr(per_image, "image_progress", bars)
    result = receptive_field(
        [tiny["image"]],
        model=f"{tiny['model']}:build",
        compare_model=f"{tiny['model']}:build_plain",
        grid=8,
        batch_size=4,
        out=tiny["root"] / "out",
    )
    count = len(result.images[0].units)
    labels = [str(b["label"]) for b in bars.bars]
    assert labels == [
        "scene.png: gradients (model)",
        "scene.png: saliency search (model)",
        "scene.png: gradients (compare)",
        "scene.png: saliency search (compare)",
    ]
    assert all(b["noun"] == "units" and b["total"] == b["done"] == count for b in bars.bars)


def _captured_figure(monkeypatch: pytest.MonkeyPatch) -> List[object]:
    from dcn_inspect.commands.receptive_field import image_outputs

    figures: List[object] = []
    original = image_outputs.write_figure

    def keep(path: Path, figure: object, **kwargs: object) -> None:
        figures.append(figure)
        original(path, figure, **kwargs)

    monkeypatch.setattr(image_outputs, "write_figure", keep)
    return figures


def _texts_inside(figure) -> None:
    """Every title, the legend and the colour bar (label and ticks) lie inside the saved image."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(figure).get_renderer()
    figure.draw(renderer)
    width, height = figure.bbox.width, figure.bbox.height
    artists = [figure.legends[0]] + [t for ax in figure.axes for t in (ax.title, ax.xaxis.label)]
    shown = [ax for ax in figure.axes if ax.axison]  # the colour bar's axes
    artists += [t for ax in shown for t in ax.get_xticklabels() if t.get_text()]
    for artist in artists:
        box = artist.get_window_extent(renderer)
        if box.width == 0:
            continue
        label = getattr(artist, "get_text", lambda: "legend")()
        assert box.x0 >= -0.5 and box.y0 >= -0.5, label
        assert box.x1 <= width + 0.5 and box.y1 <= height + 0.5, label


@pytest.mark.parametrize("many", [False, True], ids=["one-panel", "many-panels"])
def test_figure_titles_keep_the_unit_position_channel_and_legends_stay_inside(
    many: bool, tiny: Dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from dcn_inspect.commands.receptive_field import receptive_field

    figures = _captured_figure(monkeypatch)
    options = {"grid": 3, "compare_model": f"{tiny['model']}:build_plain"} if many else {}
    receptive_field(
        [tiny["image"]],
        model=f"{tiny['model']}:build",
        at=[] if many else ["8,8"],
        channel=1,
        out=tiny["root"] / "out",
        progress=False,
        **options,
    )
    (figure,) = figures
    titles = [ax.get_title() for ax in figure.axes if ax.get_title()]
    assert len(titles) == (24 if many else 1)  # grid 3 on 48x40: 12 units, two models
    if not many:
        assert "(8.5, 8.5)" in titles[0]  # the unit's centre, not rounded to (8, 8)
    assert all("`channel` 1" in t or "channel 1" in t for t in titles), titles
    colour_bar = [ax.get_xlabel() for ax in figure.axes if ax.get_xlabel()]
    assert colour_bar and "square-root" in colour_bar[0]
    _texts_inside(figure)


@pytest.mark.parametrize("search", [True, False], ids=["saliency", "no-saliency"])
def test_legend_names_the_saliency_region_only_where_one_is_drawn(
    search: bool, tiny: Dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from matplotlib.colors import to_hex
    from matplotlib.patches import Rectangle

    from dcn_inspect.commands.receptive_field import receptive_field
    from dcn_inspect.report.receptive_field import SALIENCY_COLOUR

    unbiased = tiny["root"] / "tiny_unbiased.py"  # every masked response 0: regions are found
    unbiased.write_text(BIASED_SOURCE)
    figures = _captured_figure(monkeypatch)
    receptive_field(
        [tiny["image"]],
        model=f"{unbiased}:build_unbiased",
        at=["20,16"],
        out=tiny["root"] / "out",
        progress=False,
        **({} if search else {"saliency_error": None}),
    )
    (figure,) = figures
    labels = [t.get_text() for t in figure.legends[0].get_texts()]
    assert "unit" in labels and "theoretical receptive field" in labels
    assert ("saliency region" in labels) == search
    boxes = [
        p
        for ax in figure.axes
        for p in ax.patches
        if isinstance(p, Rectangle) and to_hex(p.get_edgecolor()) == to_hex(SALIENCY_COLOUR)
    ]
    assert len(boxes) == (1 if search else 0)


def test_figure_titles_say_random_weights(
    tiny: Dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from dcn_inspect.commands.receptive_field import receptive_field
    from dcn_inspect.models.loaded_model import LoadedModel
    from dcn_inspect.models.loading import load_model

    trained = load_model(f"{tiny['model']}:build")
    untrained = LoadedModel(trained.model, "tiny-arch", "tiny-arch", {}, Preprocess(), "registered")
    assert untrained.random_weights and not trained.random_weights
    figures = _captured_figure(monkeypatch)
    for model in (untrained, trained):
        receptive_field(
            [tiny["image"]], model=model, at=["8,8"], out=tiny["root"] / "out", progress=False
        )
    random_titles, trained_titles = ([ax.get_title() for ax in f.axes] for f in figures)
    assert any("random weights" in t for t in random_titles)
    assert not any("random weights" in t for t in trained_titles)


def test_stats_tables_fit_80_columns_without_breaking_names_or_values(
    tiny: Dict[str, Path], capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dcn_inspect.commands.receptive_field as commands
    from dcn_inspect.analysis.size_categories import CATEGORIES
    from dcn_inspect.commands.receptive_field import ReceptiveFieldStatsResult

    layers = ["backbone.layer4.2.conv2", "backbone.layer4.1.conv2"]

    def table(scale: float, units: str) -> pd.DataFrame:
        rows = [
            [layer, category, 12, scale * (k + 1.123), scale * 0.91, 0, 0, 0, units]
            for layer in layers
            for k, category in enumerate(CATEGORIES)
        ]
        return pd.DataFrame(
            rows,
            columns=["layer", "category", "count", "mean", "std", "median", "p10", "p90", "units"],
        )

    radius, area = table(81.08, "original-image pixels"), table(21733.85, "original-image pixels^2")

    def fake(**kwargs: object) -> ReceptiveFieldStatsResult:
        return ReceptiveFieldStatsResult(
            radius, area, "paper", (9216.0, 50176.0), 3, None, tiny["root"], {}
        )

    monkeypatch.setattr(commands, "receptive_field_stats", fake)
    code, stdout, stderr = _main(["receptive-field", "--stats"], capsys)
    assert code == 0, stderr
    lines = stdout.split("thresholds (")[0].splitlines()  # the tables
    assert max(len(line) for line in lines) <= 80, "\n".join(lines)
    for layer in layers:
        assert any(layer in line for line in lines), layer
    for frame, decimals in ((radius, 2), (area, 0)):
        for value in list(frame["mean"]) + list(frame["std"]):
            text = f"{value:.{decimals}f}"
            assert any(text in line for line in lines), text

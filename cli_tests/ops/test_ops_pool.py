"""Deformable RoI pooling and deformable PS RoI pooling, native and reference backends.

The naive versions below transcribe the published kernels' loops in plain Python (mmcv's
``deform_roi_pool`` with its RoIAlign border rule; the MSRA ``DeformablePSROIPooling`` with
C ``round()`` of the RoI corners, clamped samples and a count of samples inside); they share
no code with either backend.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Optional, Tuple

import numpy as np
import pytest
import torch
from conftest import native_or_skip
from hypothesis import given, settings
from hypothesis import strategies as st

from dcn_inspect.ops import reference


def _bilinear_roi_align(plane: np.ndarray, y: float, x: float) -> float:
    """mmcv ``bilinear_interpolate``: zero beyond one pixel outside, else clamped corners."""
    height, width = plane.shape
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return 0.0
    y, x = max(y, 0.0), max(x, 0.0)
    y_low, x_low = int(y), int(x)
    if y_low >= height - 1:
        y_high = y_low = height - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_high = x_low = width - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1 - ly, 1 - lx
    return float(
        hy * hx * plane[y_low, x_low]
        + hy * lx * plane[y_low, x_high]
        + ly * hx * plane[y_high, x_low]
        + ly * lx * plane[y_high, x_high]
    )


def naive_deform_roi_pool(
    input: torch.Tensor,
    rois: torch.Tensor,
    offset: Optional[torch.Tensor],
    pooled: Tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    gamma: float,
) -> torch.Tensor:
    x = input.detach().double().numpy()
    boxes = rois.detach().double().numpy()
    off = None if offset is None else offset.detach().double().numpy()
    pooled_h, pooled_w = pooled
    out = np.zeros((boxes.shape[0], x.shape[1], pooled_h, pooled_w))
    for r, (index, x1, y1, x2, y2) in enumerate(boxes):
        start_w, start_h = x1 * spatial_scale - 0.5, y1 * spatial_scale - 0.5
        roi_w = x2 * spatial_scale - 0.5 - start_w
        roi_h = y2 * spatial_scale - 0.5 - start_h
        bin_h, bin_w = roi_h / pooled_h, roi_w / pooled_w
        grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_h / pooled_h)
        grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_w / pooled_w)
        count = max(grid_h * grid_w, 1)
        for c in range(x.shape[1]):
            plane = x[int(index), c]
            for i in range(pooled_h):
                for j in range(pooled_w):
                    sh, sw = start_h, start_w
                    if off is not None:
                        sw += gamma * roi_w * off[r, 0, i, j]
                        sh += gamma * roi_h * off[r, 1, i, j]
                    total = 0.0
                    for iy in range(grid_h):
                        y = sh + i * bin_h + (iy + 0.5) * bin_h / grid_h
                        for ix in range(grid_w):
                            xx = sw + j * bin_w + (ix + 0.5) * bin_w / grid_w
                            total += _bilinear_roi_align(plane, y, xx)
                    out[r, c, i, j] = total / count
    return torch.from_numpy(out)


def _c_round(value: float) -> int:
    """C ``round()``: halves away from zero."""
    return int(math.copysign(math.floor(abs(value) + 0.5), value))


def _bilinear_msra(plane: np.ndarray, x: float, y: float) -> float:
    x1, x2, y1, y2 = math.floor(x), math.ceil(x), math.floor(y), math.ceil(y)
    dx, dy = x - x1, y - y1
    return float(
        (1 - dx) * (1 - dy) * plane[y1, x1]
        + (1 - dx) * dy * plane[y2, x1]
        + dx * (1 - dy) * plane[y1, x2]
        + dx * dy * plane[y2, x2]
    )


def naive_deform_psroi_pool(
    input: torch.Tensor,
    rois: torch.Tensor,
    trans: Optional[torch.Tensor],
    spatial_scale: float,
    output_dim: int,
    group_size: int,
    pooled_size: int,
    part_size: int,
    sample_per_part: int,
    trans_std: float,
) -> torch.Tensor:
    x = input.detach().double().numpy()
    boxes = rois.detach().double().numpy()
    tr = None if trans is None else trans.detach().double().numpy()
    num_classes = 1 if tr is None else tr.shape[1] // 2
    channels_each_class = output_dim // num_classes
    height, width = x.shape[2:]
    out = np.zeros((boxes.shape[0], output_dim, pooled_size, pooled_size))
    for r, (index, x1, y1, x2, y2) in enumerate(boxes):
        start_w = _c_round(x1) * spatial_scale - 0.5
        start_h = _c_round(y1) * spatial_scale - 0.5
        roi_w = max((_c_round(x2) + 1) * spatial_scale - 0.5 - start_w, 0.1)
        roi_h = max((_c_round(y2) + 1) * spatial_scale - 0.5 - start_h, 0.1)
        bin_w, bin_h = roi_w / pooled_size, roi_h / pooled_size
        sub_w, sub_h = bin_w / sample_per_part, bin_h / sample_per_part
        for ctop in range(output_dim):
            class_id = ctop // channels_each_class
            for ph in range(pooled_size):
                for pw in range(pooled_size):
                    part_h, part_w = ph * part_size // pooled_size, pw * part_size // pooled_size
                    tx = 0.0 if tr is None else tr[r, 2 * class_id, part_h, part_w] * trans_std
                    ty = 0.0 if tr is None else tr[r, 2 * class_id + 1, part_h, part_w] * trans_std
                    wstart = pw * bin_w + start_w + tx * roi_w
                    hstart = ph * bin_h + start_h + ty * roi_h
                    gw = min(max(pw * group_size // pooled_size, 0), group_size - 1)
                    gh = min(max(ph * group_size // pooled_size, 0), group_size - 1)
                    plane = x[int(index), (ctop * group_size + gh) * group_size + gw]
                    total, count = 0.0, 0
                    for ih in range(sample_per_part):
                        for iw in range(sample_per_part):
                            w = wstart + iw * sub_w
                            h = hstart + ih * sub_h
                            if w < -0.5 or w > width - 0.5 or h < -0.5 or h > height - 0.5:
                                continue
                            w = min(max(w, 0.0), width - 1.0)
                            h = min(max(h, 0.0), height - 1.0)
                            total += _bilinear_msra(plane, w, h)
                            count += 1
                    out[r, ctop, ph, pw] = 0.0 if count == 0 else total / count
    return torch.from_numpy(out)


@st.composite
def roi_sets(
    draw: st.DrawFn, batch: int, height: int, width: int, spatial_scale: float
) -> torch.Tensor:
    """1-4 RoIs in image coordinates on a half-pixel grid (exercises rounding), some partly
    outside. Never none, so every example checks values (``test_no_rois`` covers R = 0)."""
    count = draw(st.integers(1, 4))
    rows = []
    image_h, image_w = height / spatial_scale, width / spatial_scale
    for _ in range(count):
        x1 = draw(st.integers(-4, int(2 * image_w))) / 2
        y1 = draw(st.integers(-4, int(2 * image_h))) / 2
        x2 = x1 + draw(st.integers(-1, int(2 * image_w))) / 2
        y2 = y1 + draw(st.integers(-1, int(2 * image_h))) / 2
        rows.append([draw(st.integers(0, batch - 1)), x1, y1, x2, y2])
    return torch.tensor(rows, dtype=torch.float64).view(-1, 5)


@st.composite
def roi_pool_cases(draw: st.DrawFn) -> dict:
    batch, channels = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    height, width = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    spatial_scale = draw(st.sampled_from([1.0, 0.5]))
    rois = draw(roi_sets(batch, height, width, spatial_scale))
    pooled = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    input = torch.randn(batch, channels, height, width, generator=gen, dtype=torch.float64)
    if draw(st.booleans()):
        input = torch.randn(
            batch, channels, width, height, generator=gen, dtype=torch.float64
        ).transpose(2, 3)
    offset = None
    if draw(st.booleans()):
        offset = torch.randn(rois.shape[0], 2, *pooled, generator=gen, dtype=torch.float64) * 2
    return dict(
        input=input,
        rois=rois,
        offset=offset,
        output_size=pooled,
        spatial_scale=spatial_scale,
        sampling_ratio=draw(st.integers(0, 3)),
        gamma=draw(st.sampled_from([0.1, 0.6])),
    )


@st.composite
def psroi_pool_cases(draw: st.DrawFn) -> dict:
    batch = draw(st.integers(1, 2))
    group_size, pooled_size = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    part_size = draw(st.integers(1, 4))
    num_classes = draw(st.integers(1, 2))
    output_dim = num_classes * draw(st.integers(1, 2))
    height, width = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    spatial_scale = draw(st.sampled_from([1.0, 0.5]))
    rois = draw(roi_sets(batch, height, width, spatial_scale))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    input = torch.randn(
        batch, output_dim * group_size**2, height, width, generator=gen, dtype=torch.float64
    )
    trans = None
    if draw(st.booleans()):
        trans = torch.randn(
            rois.shape[0], 2 * num_classes, part_size, part_size, generator=gen, dtype=torch.float64
        )
    return dict(
        input=input,
        rois=rois,
        trans=trans,
        spatial_scale=spatial_scale,
        output_dim=output_dim,
        group_size=group_size,
        pooled_size=pooled_size,
        part_size=part_size,
        sample_per_part=draw(st.integers(1, 3)),
        trans_std=draw(st.sampled_from([0.1, 0.5])),
    )


@settings(max_examples=25, deadline=None)
@given(case=roi_pool_cases())
def test_deform_roi_pool_matches_naive(ops: ModuleType, case: dict) -> None:
    expected = naive_deform_roi_pool(
        case["input"],
        case["rois"],
        case["offset"],
        case["output_size"],
        case["spatial_scale"],
        case["sampling_ratio"],
        case["gamma"],
    )
    got = ops.deform_roi_pool(**case)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@settings(max_examples=25, deadline=None)
@given(case=psroi_pool_cases())
def test_deform_psroi_pool_matches_naive(ops: ModuleType, case: dict) -> None:
    expected = naive_deform_psroi_pool(**case)
    got = ops.deform_psroi_pool(**case)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def _grads(fn, tensors: dict, names) -> dict:
    leaves = {
        n: (t.detach().clone().requires_grad_() if n in names and t is not None else t)
        for n, t in tensors.items()
    }
    out = fn(**leaves)
    if not out.requires_grad:  # the reference builds empty bins from constants: zero gradient
        return {n: torch.zeros_like(leaves[n]) for n in names if leaves[n] is not None}
    out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out))
    return {
        n: (leaves[n].grad if leaves[n].grad is not None else torch.zeros_like(leaves[n]))
        for n in names
        if leaves[n] is not None
    }


@settings(max_examples=15, deadline=None)
@given(case=roi_pool_cases())
def test_deform_roi_pool_native_gradients_match_reference(case: dict) -> None:
    native = native_or_skip()
    want = _grads(reference.deform_roi_pool, case, ("input", "offset"))
    got = _grads(native.deform_roi_pool, case, ("input", "offset"))
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-9, msg=name)


@settings(max_examples=15, deadline=None)
@given(case=psroi_pool_cases())
def test_deform_psroi_pool_native_gradients_match_reference(case: dict) -> None:
    native = native_or_skip()
    want = _grads(reference.deform_psroi_pool, case, ("input", "trans"))
    got = _grads(native.deform_psroi_pool, case, ("input", "trans"))
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-9, msg=name)


def test_psroi_rounds_half_away_from_zero(ops: ModuleType) -> None:
    """x1 = 2.5 rounds to 3 (C round), not to 2 (round half to even): the bin moves right."""
    input = torch.arange(6.0, dtype=torch.float64).view(1, 1, 1, 6).expand(1, 1, 3, 6).contiguous()
    rois = torch.tensor([[0, 2.5, 0.0, 3.5, 0.0]], dtype=torch.float64)  # -> columns 3..4
    out = ops.deform_psroi_pool(input, rois, None, 1.0, 1, 1, 1, 1, 2, 0.1)
    # start_x = 2.5, width 2: samples at x = 2.5 and 3.5, mean value 3.0.
    assert out.item() == pytest.approx(3.0)


def _interior_rois() -> torch.Tensor:
    # Well inside a 9x10 map so that small offsets keep every sample away from the borders.
    return torch.tensor(
        [[0, 2.2, 1.7, 7.1, 6.3], [1, 3.4, 2.6, 6.9, 7.2], [0, 1.6, 2.3, 5.2, 4.1]],
        dtype=torch.float64,
    )


@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_deform_roi_pool_gradcheck(ops: ModuleType, sampling_ratio: int) -> None:
    gen = torch.Generator().manual_seed(5)
    input = torch.randn(2, 3, 9, 10, generator=gen, dtype=torch.float64, requires_grad=True)
    offset = (torch.randn(3, 2, 3, 2, generator=gen, dtype=torch.float64) * 0.3).requires_grad_()
    rois = _interior_rois()

    def fn(x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        return ops.deform_roi_pool(x, rois, o, (3, 2), 1.0, sampling_ratio, 0.2)

    assert torch.autograd.gradcheck(fn, (input, offset), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("num_classes", [1, 2])
def test_deform_psroi_pool_gradcheck(ops: ModuleType, num_classes: int) -> None:
    gen = torch.Generator().manual_seed(6)
    output_dim, group_size, pooled_size, part_size = 2, 2, 3, 2
    input = torch.randn(
        2, output_dim * group_size**2, 9, 10, generator=gen, dtype=torch.float64, requires_grad=True
    )
    trans = (
        torch.randn(3, 2 * num_classes, part_size, part_size, generator=gen, dtype=torch.float64)
        * 0.3
    )
    trans.requires_grad_()
    rois = _interior_rois()

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return ops.deform_psroi_pool(
            x, rois, t, 1.0, output_dim, group_size, pooled_size, part_size, 3, 0.1
        )

    assert torch.autograd.gradcheck(fn, (input, trans), eps=1e-6, atol=1e-5)


def test_pools_without_offsets_gradcheck_input(ops: ModuleType) -> None:
    gen = torch.Generator().manual_seed(8)
    input = torch.randn(2, 4, 9, 10, generator=gen, dtype=torch.float64, requires_grad=True)
    rois = _interior_rois()
    assert torch.autograd.gradcheck(
        lambda x: ops.deform_roi_pool(x, rois, None, 2, 1.0, 0, 0.1), (input,)
    )
    assert torch.autograd.gradcheck(
        lambda x: ops.deform_psroi_pool(x, rois, None, 1.0, 1, 2, 2, 2, 2, 0.1), (input,)
    )


def test_no_rois(ops: ModuleType) -> None:
    input = torch.randn(1, 9, 4, 4, dtype=torch.float64)
    rois = torch.zeros(0, 5, dtype=torch.float64)
    assert ops.deform_roi_pool(input, rois, None, 2).shape == (0, 9, 2, 2)
    assert ops.deform_psroi_pool(input, rois, None, 1.0, 1, 3, 3).shape == (0, 1, 3, 3)


@pytest.mark.parametrize("height,width", [(0, 5), (4, 0)])
def test_native_pools_on_empty_maps_are_zero(height: int, width: int) -> None:
    native = native_or_skip()
    input = torch.randn(1, 4, height, width, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 0.0, 0.0, 3.0, 3.0]], dtype=torch.float64)
    offset = torch.randn(1, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    trans = torch.randn(1, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    pooled = native.deform_roi_pool(input, rois, offset, 2)
    ps = native.deform_psroi_pool(input, rois, trans, 1.0, 1, 2, 2, 2, 2)
    assert torch.count_nonzero(pooled) == 0 and torch.count_nonzero(ps) == 0
    (pooled.sum() + ps.sum()).backward()
    assert torch.count_nonzero(offset.grad) == 0 and torch.count_nonzero(trans.grad) == 0

"""Deformable convolution, native and reference backends, against an independent naive version.

The naive implementation below loops over output positions, kernel points and offset groups
in plain Python (PAPER.md §1, torchvision/DCNv2 border rule); it shares no code with either
backend. Gradients are checked with ``torch.autograd.gradcheck`` in float64, and the native
gradients against autograd of the reference.
"""

from __future__ import annotations

import contextlib
import math
import os
from types import ModuleType
from typing import Iterator, Optional, Tuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import native_or_skip
from hypothesis import given, settings
from hypothesis import strategies as st

from dcn_inspect.ops import _native, reference


@contextlib.contextmanager
def column_budget(nbytes: Optional[int]) -> Iterator[None]:
    """Set the native kernels' im2col budget (bytes) for the duration of the block."""
    previous = os.environ.get(_native.COLUMN_BUDGET_ENV)
    if nbytes is not None:
        os.environ[_native.COLUMN_BUDGET_ENV] = str(nbytes)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(_native.COLUMN_BUDGET_ENV, None)
        else:
            os.environ[_native.COLUMN_BUDGET_ENV] = previous


def _bilinear_dcn(planes: np.ndarray, y: float, x: float) -> np.ndarray:
    """Channels of ``planes`` [C, H, W] at (y, x): zero outside -1 < y < H, -1 < x < W, and
    each of the four corners outside the map contributes zero."""
    height, width = planes.shape[1:]
    value = np.zeros(planes.shape[0])
    if not (-1 < y < height and -1 < x < width):
        return value
    y0, x0 = math.floor(y), math.floor(x)
    for cy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
        for cx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
            if 0 <= cy < height and 0 <= cx < width:
                value = value + wy * wx * planes[:, cy, cx]
    return value


def naive_deform_conv2d(
    input: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride: Tuple[int, int],
    padding: Tuple[int, int],
    dilation: Tuple[int, int],
    mask: Optional[torch.Tensor],
) -> torch.Tensor:
    x = input.detach().double().numpy()
    off = offset.detach().double().numpy()
    w = weight.detach().double().numpy()
    m = None if mask is None else mask.detach().double().numpy()
    batch, channels, _, _ = x.shape
    out_channels, channels_per_group, kh, kw = w.shape
    groups = channels // channels_per_group
    kernel_points = kh * kw
    offset_groups = off.shape[1] // (2 * kernel_points)
    channels_per_offset_group = channels // offset_groups
    out_h, out_w = off.shape[2:]
    out = np.zeros((batch, out_channels, out_h, out_w))
    for b in range(batch):
        for i in range(out_h):
            for j in range(out_w):
                sampled = np.zeros((channels, kh, kw))
                for a in range(kh):
                    for c in range(kw):
                        k = a * kw + c
                        for g in range(offset_groups):
                            dy = off[b, 2 * (g * kernel_points + k), i, j]
                            dx = off[b, 2 * (g * kernel_points + k) + 1, i, j]
                            y = i * stride[0] - padding[0] + a * dilation[0] + dy
                            xx = j * stride[1] - padding[1] + c * dilation[1] + dx
                            lo, hi = (
                                g * channels_per_offset_group,
                                (g + 1) * channels_per_offset_group,
                            )
                            value = _bilinear_dcn(x[b, lo:hi], y, xx)
                            if m is not None:
                                value = value * m[b, g * kernel_points + k, i, j]
                            sampled[lo:hi, a, c] = value
                per_group_out = out_channels // groups
                for o in range(out_channels):
                    g = o // per_group_out
                    block = sampled[g * channels_per_group : (g + 1) * channels_per_group]
                    out[b, o, i, j] = float((w[o] * block).sum())
    if bias is not None:
        out += bias.detach().double().numpy()[None, :, None, None]
    return torch.from_numpy(out)


@st.composite
def conv_cases(draw: st.DrawFn) -> dict:
    groups = draw(st.integers(1, 2))
    offset_groups = draw(st.integers(1, 2))
    channels = groups * offset_groups * draw(st.integers(1, 2))
    out_channels = groups * draw(st.integers(1, 3))
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    # Smallest input that still gives one output row/column.
    min_h = max(1, dilation[0] * (kernel[0] - 1) + 1 - 2 * padding[0])
    min_w = max(1, dilation[1] * (kernel[1] - 1) + 1 - 2 * padding[1])
    return dict(
        batch=draw(st.integers(1, 3)),
        channels=channels,
        out_channels=out_channels,
        groups=groups,
        offset_groups=offset_groups,
        kernel=kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        height=draw(st.integers(min_h, min_h + 5)),
        width=draw(st.integers(min_w, min_w + 5)),
        offset_scale=draw(st.sampled_from([0.0, 0.7, 2.5])),
        use_mask=draw(st.booleans()),
        use_bias=draw(st.booleans()),
        non_contiguous=draw(st.booleans()),
        # None: default budget; 1: one image per chunk; "two": two images per chunk.
        budget=draw(st.sampled_from([None, 1, "two"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def make_conv_tensors(case: dict, dtype: torch.dtype = torch.float64) -> dict:
    gen = torch.Generator().manual_seed(case["seed"])
    kh, kw = case["kernel"]
    batch, channels, height, width = case["batch"], case["channels"], case["height"], case["width"]
    out_h = (height + 2 * case["padding"][0] - case["dilation"][0] * (kh - 1) - 1) // case[
        "stride"
    ][0] + 1
    out_w = (width + 2 * case["padding"][1] - case["dilation"][1] * (kw - 1) - 1) // case["stride"][
        1
    ] + 1
    points = case["offset_groups"] * kh * kw
    if case["non_contiguous"]:
        input = torch.randn(batch, channels, width, height, generator=gen, dtype=dtype).transpose(
            2, 3
        )
        offset = torch.randn(batch, out_w, out_h, 2 * points, generator=gen, dtype=dtype).permute(
            0, 3, 2, 1
        )
    else:
        input = torch.randn(batch, channels, height, width, generator=gen, dtype=dtype)
        offset = torch.randn(batch, 2 * points, out_h, out_w, generator=gen, dtype=dtype)
    offset = offset * case["offset_scale"]
    weight = torch.randn(
        case["out_channels"], channels // case["groups"], kh, kw, generator=gen, dtype=dtype
    )
    bias = (
        torch.randn(case["out_channels"], generator=gen, dtype=dtype) if case["use_bias"] else None
    )
    mask = (
        torch.rand(batch, points, out_h, out_w, generator=gen, dtype=dtype)
        if case["use_mask"]
        else None
    )
    return dict(input=input, offset=offset, weight=weight, bias=bias, mask=mask)


def _budget_bytes(case: dict, tensors: dict) -> Optional[int]:
    if case["budget"] != "two":
        return case["budget"]
    kh, kw = case["kernel"]
    out_h, out_w = tensors["offset"].shape[2:]
    per_image = case["channels"] * kh * kw * out_h * out_w * tensors["input"].element_size()
    return 2 * per_image


def _call(ops: ModuleType, case: dict, t: dict) -> torch.Tensor:
    return ops.deform_conv2d(
        t["input"],
        t["offset"],
        t["weight"],
        t["bias"],
        case["stride"],
        case["padding"],
        case["dilation"],
        t["mask"],
    )


@settings(max_examples=25, deadline=None)
@given(case=conv_cases())
def test_forward_matches_naive(ops: ModuleType, case: dict) -> None:
    tensors = make_conv_tensors(case)
    expected = naive_deform_conv2d(
        tensors["input"],
        tensors["offset"],
        tensors["weight"],
        tensors["bias"],
        case["stride"],
        case["padding"],
        case["dilation"],
        tensors["mask"],
    )
    with column_budget(_budget_bytes(case, tensors)):
        got = _call(ops, case, tensors)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@settings(max_examples=15, deadline=None)
@given(case=conv_cases())
def test_native_gradients_match_reference_autograd(case: dict) -> None:
    native = native_or_skip()
    tensors = make_conv_tensors(case)
    names = [n for n, t in tensors.items() if t is not None]
    grads = {}
    for label, ops in (("reference", reference), ("native", native)):
        leaves = {
            n: (t.detach().clone().requires_grad_() if t is not None else None)
            for n, t in tensors.items()
        }
        with column_budget(_budget_bytes(case, tensors) if label == "native" else None):
            out = _call(ops, case, leaves)
            seed_grad = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
            out.backward(seed_grad)
        grads[label] = {n: leaves[n].grad for n in names}
    for name in names:
        torch.testing.assert_close(
            grads["native"][name], grads["reference"][name], rtol=1e-9, atol=1e-9, msg=name
        )


def test_float32_matches_float64(ops: ModuleType) -> None:
    case = dict(
        batch=2,
        channels=4,
        out_channels=6,
        groups=2,
        offset_groups=2,
        kernel=(3, 3),
        stride=(1, 1),
        padding=(1, 1),
        dilation=(1, 1),
        height=9,
        width=8,
        offset_scale=1.5,
        use_mask=True,
        use_bias=True,
        non_contiguous=False,
        budget=None,
        seed=3,
    )
    t64 = make_conv_tensors(case)
    t32 = {n: (t.float() if t is not None else None) for n, t in t64.items()}
    out32 = _call(ops, case, t32)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), _call(ops, case, t64), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "stride,padding,dilation,groups,kernel",
    [
        ((1, 1), (1, 1), (1, 1), 1, (3, 3)),
        ((2, 1), (2, 0), (2, 1), 2, (3, 2)),
        ((1, 2), (0, 2), (1, 3), 4, (1, 3)),
    ],
)
def test_zero_offsets_unit_mask_equal_conv2d(
    ops: ModuleType, stride, padding, dilation, groups, kernel
) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 11, 10, generator=gen, dtype=torch.float64)
    w = torch.randn(12, 8 // groups, *kernel, generator=gen, dtype=torch.float64)
    b = torch.randn(12, generator=gen, dtype=torch.float64)
    expected = F.conv2d(x, w, b, stride, padding, dilation, groups)
    points = kernel[0] * kernel[1]
    offset = torch.zeros(2, 2 * points, *expected.shape[2:], dtype=torch.float64)
    mask = torch.ones(2, points, *expected.shape[2:], dtype=torch.float64)
    torch.testing.assert_close(
        ops.deform_conv2d(x, offset, w, b, stride, padding, dilation), expected
    )
    torch.testing.assert_close(
        ops.deform_conv2d(x, offset, w, b, stride, padding, dilation, mask), expected
    )


@pytest.mark.parametrize("dy,dx", [(1, -2), (-3, 0), (2, 2)])
def test_integer_offset_is_shifted_conv(ops: ModuleType, dy: int, dx: int) -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 9, 12, generator=gen, dtype=torch.float64)
    w = torch.randn(5, 3, 3, 3, generator=gen, dtype=torch.float64)
    height, width = x.shape[2:]
    # Output (i, j) reads x[i - 1 + a + dy, j - 1 + b + dx] (zero outside the map): a plain
    # 3x3 conv over the window of a widely zero-padded input that starts at (dy - 1, dx - 1).
    margin = 5
    padded = F.pad(x, (margin, margin, margin, margin))
    top, left = margin + dy - 1, margin + dx - 1
    expected = F.conv2d(padded[:, :, top : top + height + 2, left : left + width + 2], w)
    offset = torch.zeros(1, 18, height, width, dtype=torch.float64)
    offset[:, 0::2] = dy
    offset[:, 1::2] = dx
    torch.testing.assert_close(ops.deform_conv2d(x, offset, w, padding=1), expected)


@pytest.mark.parametrize(
    "y,expected",
    [
        (-0.5, 0.5),  # in the band: only the lower corners exist, each weighted 0.5
        (-0.999, 0.001),
        (-1.0, 0.0),  # on the band edge: zero
        (-1.2, 0.0),
        (3.5, 0.5),  # H = 4: between the last row and the missing row below
        (4.0, 0.0),
        (1.25, 1.0),
    ],
)
def test_border_band(ops: ModuleType, y: float, expected: float) -> None:
    """A 1x1 kernel on a map of ones reads exactly the sum of the corner weights inside it."""
    x = torch.ones(1, 1, 4, 5, dtype=torch.float64)
    w = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    offset = torch.zeros(1, 2, 4, 5, dtype=torch.float64)
    offset[0, 0, 0, 2] = y  # output (0, 2) samples at (y, 2)
    out = ops.deform_conv2d(x, offset, w)
    assert out[0, 0, 0, 2].item() == pytest.approx(expected, abs=1e-12)


def test_chunking_gives_same_result_and_gradients() -> None:
    native = native_or_skip()
    case = dict(
        batch=5,
        channels=4,
        out_channels=4,
        groups=2,
        offset_groups=2,
        kernel=(3, 3),
        stride=(1, 1),
        padding=(1, 1),
        dilation=(1, 1),
        height=6,
        width=7,
        offset_scale=1.0,
        use_mask=True,
        use_bias=True,
        non_contiguous=False,
        budget=None,
        seed=11,
    )
    tensors = make_conv_tensors(case)
    results = []
    for budget in (None, 1, 2 * 4 * 9 * 42 * 8):  # default (one chunk), one image, two images
        leaves = {n: t.detach().clone().requires_grad_() for n, t in tensors.items()}
        with column_budget(budget):
            out = _call(native, case, leaves)
            out.square().sum().backward()
        results.append((out.detach(), [leaves[n].grad for n in sorted(leaves)]))
    for out, grads in results[1:]:
        torch.testing.assert_close(out, results[0][0], rtol=1e-12, atol=1e-12)
        for got, want in zip(grads, results[0][1]):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_empty_batch(ops: ModuleType) -> None:
    x = torch.zeros(0, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    offset = torch.zeros(0, 18, 3, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    out = ops.deform_conv2d(x, offset, w)
    assert out.shape == (0, 3, 3, 3)
    out.sum().backward()
    assert w.grad is not None and torch.count_nonzero(w.grad) == 0


GRADCHECK_CASES = [
    # (groups, offset_groups, stride, padding, dilation, kernel, use_mask, use_bias)
    (1, 1, (1, 1), (1, 1), (1, 1), (3, 3), False, True),
    (2, 2, (2, 1), (1, 2), (1, 2), (2, 3), True, True),
    (1, 2, (1, 1), (0, 0), (2, 1), (3, 1), True, False),
]


@pytest.mark.parametrize("config", GRADCHECK_CASES)
def test_gradcheck(ops: ModuleType, config) -> None:
    groups, offset_groups, stride, padding, dilation, kernel, use_mask, use_bias = config
    case = dict(
        batch=2,
        channels=2 * groups * offset_groups // math.gcd(groups, offset_groups),
        out_channels=2 * groups,
        groups=groups,
        offset_groups=offset_groups,
        kernel=kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        height=5,
        width=6,
        offset_scale=1.3,
        use_mask=use_mask,
        use_bias=use_bias,
        non_contiguous=False,
        budget=None,
        seed=7,
    )
    tensors = make_conv_tensors(case)
    names = [n for n in ("input", "offset", "weight", "bias", "mask") if tensors[n] is not None]
    leaves = [tensors[n].detach().clone().requires_grad_() for n in names]

    def fn(*args: torch.Tensor) -> torch.Tensor:
        t = dict(zip(names, args))
        return ops.deform_conv2d(
            t["input"],
            t["offset"],
            t["weight"],
            t.get("bias"),
            stride,
            padding,
            dilation,
            t.get("mask"),
        )

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-5)


def test_float32_gradients_match_float64_reference() -> None:
    """float32 takes the vectorised gather paths (blocks of 16 positions plus a scalar tail)."""
    native = native_or_skip()
    case = dict(
        batch=3,
        channels=6,
        out_channels=4,
        groups=2,
        offset_groups=3,
        kernel=(3, 3),
        stride=(1, 1),
        padding=(1, 1),
        dilation=(1, 1),
        height=7,
        width=9,
        offset_scale=2.0,
        use_mask=True,
        use_bias=True,
        non_contiguous=False,
        budget="two",
        seed=21,
    )
    t64 = make_conv_tensors(case)
    grads = {}
    for label, ops, dtype in (
        ("reference", reference, torch.float64),
        ("native", native, torch.float32),
    ):
        leaves = {n: t.detach().to(dtype).requires_grad_() for n, t in t64.items()}
        with column_budget(_budget_bytes(case, leaves) if label == "native" else None):
            out = _call(ops, case, leaves)
            out.backward(torch.linspace(-1, 1, out.numel(), dtype=dtype).view_as(out))
        grads[label] = {n: leaves[n].grad.double() for n in leaves}
    for name in grads["reference"]:
        torch.testing.assert_close(
            grads["native"][name], grads["reference"][name], rtol=1e-4, atol=1e-4, msg=name
        )

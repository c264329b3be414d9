"""The CUDA kernels of the deformable ops against the pure-PyTorch reference (on CPU).

Skipped unless PyTorch sees a CUDA device and the native extension builds with its CUDA
kernels (``csrc/cuda/*.cu``). Every op's forward and gradients on CUDA must equal the
reference's (autograd) in float64 and float32, ``gradcheck`` must pass in float64 on CUDA,
float16 / bfloat16 must stay within their precision, and, where torchvision is importable,
``deform_conv2d`` must agree with ``torchvision.ops.deform_conv2d`` (forward and the gradients
of input, offset, mask, weight and bias).

``DCN_INSPECT_LARGE_CUDA_TESTS=1`` also runs a case whose column buffer has more than 2**31
elements (the 64-bit index path; several GiB of GPU memory).
"""

from __future__ import annotations

import contextlib
import os
from types import ModuleType
from typing import Dict, Iterator, List, Optional, Tuple

import pytest
import torch

from dcn_inspect.ops import _native, reference

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device visible to PyTorch"
)

DEVICE = "cuda"
OPS = (
    "deform_conv2d",
    "_deform_conv2d_backward",
    "deform_roi_pool",
    "_deform_roi_pool_backward",
    "deform_psroi_pool",
    "_deform_psroi_pool_backward",
)


@pytest.fixture(scope="module")
def native() -> ModuleType:
    try:
        module = _native.load()
    except Exception as exc:  # noqa: BLE001 - any build failure is a skip reason
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        pytest.skip(f"native ops unavailable: {reason}")
    if not _native.build_details().get("with_cuda"):
        pytest.skip("the native extension was built without its CUDA kernels (no nvcc / CUDA_HOME)")
    missing = [
        op
        for op in OPS
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"dcn_inspect::{op}", "CUDA")
    ]
    assert not missing, f"CUDA build without CUDA kernels for {missing}"
    return module


@contextlib.contextmanager
def column_budget(nbytes: Optional[int]) -> Iterator[None]:
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


def assert_close_scaled(
    actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str
) -> None:
    """max |actual - expected| <= tol * max(1, max |expected|), compared in float64 on CPU."""
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    if e.numel() == 0:
        return
    scale = max(1.0, float(e.abs().max()))
    err = float((a - e).abs().max())
    assert err <= tol * scale, f"{what}: max abs error {err:.3e} > {tol:.1e} * {scale:.3g}"


# The CUDA backward scatters with atomicAdd, so repeated backward passes may differ in the
# last bits (summation order); gradcheck's reentrancy check gets this much slack.
NONDET_TOL = 1e-12

TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-2, torch.bfloat16: 8e-2}


def forward_and_grads(
    fn, inputs: Dict[str, Optional[torch.Tensor]], grad_seed: int
) -> List[torch.Tensor]:
    """fn(**inputs) and the gradients of <fn, g> (g fixed random) w.r.t. every tensor input."""
    leaves = {
        k: (v.detach().clone().requires_grad_(True) if v is not None else None)
        for k, v in inputs.items()
    }
    out = fn(**leaves)
    gen = torch.Generator().manual_seed(grad_seed)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device, out.dtype)
    names = [k for k, v in leaves.items() if v is not None]
    grads = torch.autograd.grad(out, [leaves[k] for k in names], g, allow_unused=True)
    result = [out]
    for name, grad in zip(names, grads):
        result.append(grad if grad is not None else torch.zeros_like(leaves[name]))
    return result


def to(
    inputs: Dict[str, Optional[torch.Tensor]], device: str, dtype: torch.dtype
) -> Dict[str, Optional[torch.Tensor]]:
    return {
        k: (v.to(device=device, dtype=dtype) if v is not None else None) for k, v in inputs.items()
    }


# ---------------------------------------------------------------------------------------------
# deform_conv2d

CONV_CASES = [
    # batch, cin, cout, (h, w), kernel, stride, padding, dilation, groups, offset_groups, mask,
    # bias, offset scale
    dict(
        batch=2,
        cin=4,
        cout=6,
        hw=(7, 9),
        kernel=(3, 3),
        stride=(1, 1),
        padding=(1, 1),
        dilation=(1, 1),
        groups=1,
        offset_groups=1,
        mask=True,
        bias=True,
        scale=1.5,
    ),
    dict(
        batch=3,
        cin=4,
        cout=4,
        hw=(8, 6),
        kernel=(3, 2),
        stride=(2, 1),
        padding=(2, 0),
        dilation=(2, 1),
        groups=2,
        offset_groups=2,
        mask=False,
        bias=True,
        scale=3.0,
    ),
    dict(
        batch=1,
        cin=6,
        cout=3,
        hw=(5, 5),
        kernel=(1, 1),
        stride=(1, 2),
        padding=(0, 1),
        dilation=(1, 1),
        groups=3,
        offset_groups=1,
        mask=True,
        bias=False,
        scale=0.8,
    ),
    dict(
        batch=2,
        cin=8,
        cout=8,
        hw=(10, 11),
        kernel=(3, 3),
        stride=(1, 1),
        padding=(2, 2),
        dilation=(2, 2),
        groups=1,
        offset_groups=4,
        mask=True,
        bias=True,
        scale=2.5,
    ),
    # Many channels per offset group: the grad_offset / grad_mask reduction is split over threads.
    dict(
        batch=2,
        cin=96,
        cout=8,
        hw=(6, 7),
        kernel=(3, 3),
        stride=(1, 1),
        padding=(1, 1),
        dilation=(1, 1),
        groups=2,
        offset_groups=2,
        mask=True,
        bias=True,
        scale=1.5,
    ),
]


def conv_inputs(case: dict, seed: int) -> Dict[str, Optional[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    kh, kw = case["kernel"]
    h, w = case["hw"]
    out_h = (h + 2 * case["padding"][0] - case["dilation"][0] * (kh - 1) - 1) // case["stride"][
        0
    ] + 1
    out_w = (w + 2 * case["padding"][1] - case["dilation"][1] * (kw - 1) - 1) // case["stride"][
        1
    ] + 1
    points = case["offset_groups"] * kh * kw
    f64 = torch.float64
    return dict(
        input=torch.randn(case["batch"], case["cin"], h, w, generator=gen, dtype=f64),
        offset=torch.randn(case["batch"], 2 * points, out_h, out_w, generator=gen, dtype=f64)
        * case["scale"],
        weight=torch.randn(
            case["cout"], case["cin"] // case["groups"], kh, kw, generator=gen, dtype=f64
        ),
        bias=torch.randn(case["cout"], generator=gen, dtype=f64) if case["bias"] else None,
        mask=torch.rand(case["batch"], points, out_h, out_w, generator=gen, dtype=f64)
        if case["mask"]
        else None,
    )


def conv_fn(ops: ModuleType, case: dict):
    def fn(input, offset, weight, bias=None, mask=None):
        return ops.deform_conv2d(
            input, offset, weight, bias, case["stride"], case["padding"], case["dilation"], mask
        )

    return fn


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("index", range(len(CONV_CASES)))
def test_deform_conv2d_matches_reference(
    native: ModuleType, index: int, dtype: torch.dtype
) -> None:
    case = CONV_CASES[index]
    inputs = conv_inputs(case, seed=100 + index)
    expected = forward_and_grads(conv_fn(reference, case), inputs, grad_seed=7)
    got = forward_and_grads(conv_fn(native, case), to(inputs, DEVICE, dtype), grad_seed=7)
    names = ["output"] + [k for k, v in inputs.items() if v is not None]
    for name, a, e in zip(names, got, expected):
        assert a.device.type == DEVICE and a.dtype == dtype, name
        assert_close_scaled(
            a, e, TOL[dtype] * (20 if name in ("offset", "weight", "bias") else 1), name
        )


@pytest.mark.parametrize("budget", [1, "two", None])
def test_deform_conv2d_batch_chunks(native: ModuleType, budget) -> None:
    """One image per chunk, two per chunk (last one short) and one chunk give the same results."""
    case = dict(CONV_CASES[0], batch=5)
    inputs = conv_inputs(case, seed=5)
    expected = forward_and_grads(conv_fn(reference, case), inputs, grad_seed=3)
    per_image = case["cin"] * 9 * inputs["offset"].shape[2] * inputs["offset"].shape[3] * 8
    with column_budget(2 * per_image if budget == "two" else budget):
        got = forward_and_grads(
            conv_fn(native, case), to(inputs, DEVICE, torch.float64), grad_seed=3
        )
    for a, e in zip(got, expected):
        assert_close_scaled(a, e, 1e-10, "chunked")


def test_deform_conv2d_non_contiguous_and_direct_op(native: ModuleType) -> None:
    case = CONV_CASES[0]
    inputs = to(conv_inputs(case, seed=11), DEVICE, torch.float64)
    expected = reference.deform_conv2d(
        inputs["input"].cpu(), inputs["offset"].cpu(), inputs["weight"].cpu(), None, 1, 1, 1, None
    )
    x = inputs["input"].contiguous(memory_format=torch.channels_last)
    off = inputs["offset"].transpose(2, 3).contiguous().transpose(2, 3)
    got = native.deform_conv2d(x, off, inputs["weight"], None, 1, 1, 1, None)
    assert_close_scaled(got, expected, 1e-10, "non-contiguous")
    empty = x.new_empty(0)
    direct = torch.ops.dcn_inspect.deform_conv2d(
        x, inputs["weight"], off, empty, empty, 1, 1, 1, 1, 1, 1, 1, 1, False
    )
    assert_close_scaled(direct, expected, 1e-10, "direct op")
    grads = torch.ops.dcn_inspect._deform_conv2d_backward(
        torch.ones_like(direct),
        x,
        inputs["weight"],
        off,
        empty,
        empty,
        1,
        1,
        1,
        1,
        1,
        1,
        1,
        1,
        False,
    )
    assert len(grads) == 5
    assert grads[3].numel() == 0 and grads[4].numel() == 0


def test_deform_conv2d_gradcheck(native: ModuleType) -> None:
    case = CONV_CASES[3]
    small = dict(case, batch=1, cin=4, cout=2, hw=(5, 6), offset_groups=2)
    inputs = to(conv_inputs(small, seed=21), DEVICE, torch.float64)
    names = ["input", "offset", "weight", "bias", "mask"]
    leaves = [inputs[n].requires_grad_(True) for n in names]
    fn = conv_fn(native, small)
    assert torch.autograd.gradcheck(
        fn, tuple(leaves), eps=1e-6, atol=1e-5, rtol=1e-4, nondet_tol=NONDET_TOL
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_deform_conv2d_half_precision(native: ModuleType, dtype: torch.dtype) -> None:
    case = dict(CONV_CASES[0], cin=8, cout=8)
    inputs = conv_inputs(case, seed=31)
    # Round the inputs to the low precision first, so the reference sees the same values.
    inputs = {k: (v.to(dtype).double() if v is not None else None) for k, v in inputs.items()}
    expected = forward_and_grads(conv_fn(reference, case), inputs, grad_seed=9)
    got = forward_and_grads(conv_fn(native, case), to(inputs, DEVICE, dtype), grad_seed=9)
    names = ["output"] + [k for k, v in inputs.items() if v is not None]
    for name, a, e in zip(names, got, expected):
        assert a.dtype == dtype, name
        assert_close_scaled(a, e, TOL[dtype] * (2 if name == "output" else 4), f"{dtype} {name}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("index", range(len(CONV_CASES)))
def test_deform_conv2d_matches_torchvision(
    native: ModuleType, index: int, dtype: torch.dtype
) -> None:
    tv_ops = pytest.importorskip("torchvision.ops")
    case = CONV_CASES[index]
    inputs = to(conv_inputs(case, seed=200 + index), DEVICE, dtype)

    def tv_fn(input, offset, weight, bias=None, mask=None):
        return tv_ops.deform_conv2d(
            input,
            offset,
            weight,
            bias,
            stride=case["stride"],
            padding=case["padding"],
            dilation=case["dilation"],
            mask=mask,
        )

    expected = forward_and_grads(tv_fn, inputs, grad_seed=13)
    got = forward_and_grads(conv_fn(native, case), inputs, grad_seed=13)
    names = ["output"] + [k for k, v in inputs.items() if v is not None]
    for name, a, e in zip(names, got, expected):
        assert_close_scaled(
            a,
            e,
            TOL[dtype] * (20 if name in ("offset", "weight", "bias") else 1),
            f"torchvision {name}",
        )


@pytest.mark.skipif(
    os.environ.get("DCN_INSPECT_LARGE_CUDA_TESTS", "") != "1",
    reason="set DCN_INSPECT_LARGE_CUDA_TESTS=1 (GiBs of GPU memory)",
)
def test_deform_conv2d_64bit_indices(native: ModuleType) -> None:
    """A column buffer of more than 2**31 elements (64-bit index path), checked on the last rows."""
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    c, h, w = 1024, 490, 490  # columns: 1024 * 9 * 490 * 490 > 2**31
    x = torch.randn(1, c, h, w, generator=gen, device=DEVICE, dtype=torch.float16)
    off = torch.rand(1, 18, h, w, generator=gen, device=DEVICE, dtype=torch.float16) * 3 - 1.5
    weight = torch.randn(2, c, 3, 3, generator=gen, device=DEVICE, dtype=torch.float16) / 32
    out = native.deform_conv2d(x, off, weight, None, 1, 1, 1, None)
    # Output rows s..h-1 (s = h - 7) need input rows >= s: |dy| <= 1.5, padding 1, kernel 3.
    # In the sliced frame, output row j is original row s + j; rows j >= 4 never reach the
    # slice's upper border, so they equal the original rows.
    s = h - 7
    expected = reference.deform_conv2d(
        x[:, :, s:].double().cpu(),
        off[:, :, s:].double().cpu(),
        weight.double().cpu(),
        None,
        1,
        1,
        1,
        None,
    )
    assert_close_scaled(out[:, :, h - 3 :], expected[:, :, 4:], 2e-2, "64-bit rows")
    del x, off, out
    torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# deform_roi_pool


def roi_pool_inputs(
    seed: int, rois_count: int = 6, channels: int = 3, hw: Tuple[int, int] = (12, 14)
) -> dict:
    gen = torch.Generator().manual_seed(seed)
    h, w = hw
    batch = 2
    f64 = torch.float64
    scale = 0.5  # image coordinates are twice the feature map's
    x1 = torch.rand(rois_count, generator=gen, dtype=f64) * (w / scale) * 0.7 - 3
    y1 = torch.rand(rois_count, generator=gen, dtype=f64) * (h / scale) * 0.7 - 3
    x2 = x1 + 2 + torch.rand(rois_count, generator=gen, dtype=f64) * (w / scale) * 0.6
    y2 = y1 + 2 + torch.rand(rois_count, generator=gen, dtype=f64) * (h / scale) * 0.6
    index = torch.randint(0, batch, (rois_count,), generator=gen).to(f64)
    return dict(
        input=torch.randn(batch, channels, h, w, generator=gen, dtype=f64),
        rois=torch.stack([index, x1, y1, x2, y2], dim=1),
        offset=torch.randn(rois_count, 2, 3, 4, generator=gen, dtype=f64) * 0.8,
        scale=scale,
    )


def roi_fn(ops: ModuleType, rois: torch.Tensor, scale: float, sampling_ratio: int):
    def fn(input, offset=None):
        return ops.deform_roi_pool(input, rois, offset, (3, 4), scale, sampling_ratio, 0.1)

    return fn


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
@pytest.mark.parametrize("with_offset", [True, False])
def test_deform_roi_pool_matches_reference(
    native: ModuleType, dtype, sampling_ratio: int, with_offset: bool
) -> None:
    d = roi_pool_inputs(seed=41 + sampling_ratio)
    inputs = dict(input=d["input"], offset=d["offset"] if with_offset else None)
    expected = forward_and_grads(
        roi_fn(reference, d["rois"], d["scale"], sampling_ratio), inputs, grad_seed=1
    )
    rois = d["rois"].to(DEVICE, dtype)
    got = forward_and_grads(
        roi_fn(native, rois, d["scale"], sampling_ratio), to(inputs, DEVICE, dtype), grad_seed=1
    )
    for name, a, e in zip(["output", "input", "offset"], got, expected):
        assert a.device.type == DEVICE and a.dtype == dtype
        assert_close_scaled(a, e, TOL[dtype] * 10, f"roi_pool {name}")


def test_deform_roi_pool_gradcheck(native: ModuleType) -> None:
    d = roi_pool_inputs(seed=43, rois_count=3)
    rois = d["rois"].to(DEVICE)
    fn = roi_fn(native, rois, d["scale"], 0)
    leaves = (
        d["input"].to(DEVICE).requires_grad_(True),
        d["offset"].to(DEVICE).requires_grad_(True),
    )
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-5, nondet_tol=NONDET_TOL)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_deform_roi_pool_half_precision(native: ModuleType, dtype: torch.dtype) -> None:
    d = roi_pool_inputs(seed=45)
    rois = d["rois"].to(dtype).double()
    inputs = {k: d[k].to(dtype).double() for k in ("input", "offset")}
    expected = forward_and_grads(roi_fn(reference, rois, d["scale"], 2), inputs, grad_seed=2)
    got = forward_and_grads(
        roi_fn(native, rois.to(DEVICE, dtype), d["scale"], 2),
        to(inputs, DEVICE, dtype),
        grad_seed=2,
    )
    for name, a, e in zip(["output", "input", "offset"], got, expected):
        assert a.dtype == dtype
        assert_close_scaled(
            a, e, TOL[dtype] * (2 if name == "output" else 8), f"{dtype} roi_pool {name}"
        )


# ---------------------------------------------------------------------------------------------
# deform_psroi_pool


def psroi_inputs(seed: int, num_classes: int, rois_count: int = 5) -> dict:
    gen = torch.Generator().manual_seed(seed)
    output_dim, group, pooled, part = 2 * num_classes, 3, 3, 3
    h, w = 10, 13
    scale = 0.25
    f64 = torch.float64
    x1 = torch.rand(rois_count, generator=gen, dtype=f64) * (w / scale) * 0.7 - 4
    y1 = torch.rand(rois_count, generator=gen, dtype=f64) * (h / scale) * 0.7 - 4
    x2 = x1 + 4 + torch.rand(rois_count, generator=gen, dtype=f64) * (w / scale) * 0.5
    y2 = y1 + 4 + torch.rand(rois_count, generator=gen, dtype=f64) * (h / scale) * 0.5
    index = torch.randint(0, 2, (rois_count,), generator=gen).to(f64)
    return dict(
        input=torch.randn(2, output_dim * group * group, h, w, generator=gen, dtype=f64),
        rois=torch.stack([index, x1, y1, x2, y2], dim=1),
        trans=torch.randn(rois_count, 2 * num_classes, part, part, generator=gen, dtype=f64) * 1.5,
        params=dict(
            spatial_scale=scale,
            output_dim=output_dim,
            group_size=group,
            pooled_size=pooled,
            part_size=part,
            sample_per_part=3,
            trans_std=0.1,
        ),
    )


def psroi_fn(ops: ModuleType, rois: torch.Tensor, params: dict):
    def fn(input, trans=None):
        return ops.deform_psroi_pool(input, rois, trans, **params)

    return fn


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("num_classes", [1, 2])
@pytest.mark.parametrize("with_trans", [True, False])
def test_deform_psroi_pool_matches_reference(
    native: ModuleType, dtype, num_classes: int, with_trans: bool
) -> None:
    d = psroi_inputs(seed=51 + num_classes, num_classes=num_classes)
    inputs = dict(input=d["input"], trans=d["trans"] if with_trans else None)
    expected = forward_and_grads(psroi_fn(reference, d["rois"], d["params"]), inputs, grad_seed=4)
    rois = d["rois"].to(DEVICE, dtype)
    got = forward_and_grads(
        psroi_fn(native, rois, d["params"]), to(inputs, DEVICE, dtype), grad_seed=4
    )
    for name, a, e in zip(["output", "input", "trans"], got, expected):
        assert a.device.type == DEVICE and a.dtype == dtype
        assert_close_scaled(a, e, TOL[dtype] * 10, f"psroi_pool {name}")


def test_deform_psroi_pool_count_output(native: ModuleType) -> None:
    d = psroi_inputs(seed=55, num_classes=1)
    p = d["params"]
    out, count = torch.ops.dcn_inspect.deform_psroi_pool(
        d["input"].to(DEVICE),
        d["rois"].to(DEVICE),
        d["trans"].to(DEVICE),
        p["spatial_scale"],
        p["output_dim"],
        p["group_size"],
        p["pooled_size"],
        p["part_size"],
        p["sample_per_part"],
        p["trans_std"],
    )
    assert count.shape == out.shape
    assert float(count.min()) >= 0 and float(count.max()) <= p["sample_per_part"] ** 2
    assert torch.equal(count, count.round())
    # Where no sample fell inside the map the output is zero.
    assert bool((out[count == 0] == 0).all())


def test_deform_psroi_pool_gradcheck(native: ModuleType) -> None:
    d = psroi_inputs(seed=57, num_classes=2, rois_count=3)
    fn = psroi_fn(native, d["rois"].to(DEVICE), d["params"])
    leaves = (
        d["input"].to(DEVICE).requires_grad_(True),
        d["trans"].to(DEVICE).requires_grad_(True),
    )
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-5, nondet_tol=NONDET_TOL)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_deform_psroi_pool_half_precision(native: ModuleType, dtype: torch.dtype) -> None:
    d = psroi_inputs(seed=59, num_classes=1)
    rois = d["rois"].to(dtype).double()
    inputs = {k: d[k].to(dtype).double() for k in ("input", "trans")}
    expected = forward_and_grads(psroi_fn(reference, rois, d["params"]), inputs, grad_seed=5)
    got = forward_and_grads(
        psroi_fn(native, rois.to(DEVICE, dtype), d["params"]),
        to(inputs, DEVICE, dtype),
        grad_seed=5,
    )
    for name, a, e in zip(["output", "input", "trans"], got, expected):
        assert a.dtype == dtype
        assert_close_scaled(
            a, e, TOL[dtype] * (2 if name == "output" else 8), f"{dtype} psroi_pool {name}"
        )

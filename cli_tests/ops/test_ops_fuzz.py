"""Malformed tensors passed to the ops raise a Python exception; they never crash the process.

Hypothesis draws shapes (often inconsistent), dtypes and RoI values; every call must either
return a tensor of the documented shape or raise ``ValueError``/``TypeError``/``RuntimeError``.
Devices are drawn too (cpu, meta, and cuda where present), mixed between arguments. A crash
(segfault, abort) would take the test process down with it.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dcn_inspect import ops
from dcn_inspect.ops import _backend

ACCEPTED = (ValueError, TypeError, RuntimeError)
DTYPES = st.sampled_from([torch.float32, torch.float64, torch.float16, torch.int64, torch.bool])
DEVICES = st.sampled_from(["cpu", "cpu", "meta"] + (["cuda"] if torch.cuda.is_available() else []))
small = st.integers(min_value=0, max_value=5)


@pytest.fixture(params=["reference", "native"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("DCN_INSPECT_OPS", request.param)
    _backend.reset()
    if request.param == "native":
        try:
            _backend.active()
        except Exception as exc:  # noqa: BLE001
            _backend.reset()
            pytest.skip(f"native ops unavailable: {exc}")
    yield request.param
    _backend.reset()


def _tensor(shape: tuple, dtype: torch.dtype, device: str = "cpu") -> torch.Tensor:
    if dtype == torch.bool:
        return torch.zeros(shape, dtype=dtype, device=device)
    return (torch.rand(shape) * 4 - 2).to(dtype).to(device)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    data=st.data(),
    dims=st.lists(small, min_size=4, max_size=4),
    weight_dims=st.lists(small, min_size=4, max_size=4),
    offset_channels=st.integers(0, 40),
    use_mask=st.booleans(),
    use_bias=st.booleans(),
    dtype=DTYPES,
)
def test_deform_conv2d_never_crashes(
    backend, data, dims, weight_dims, offset_channels, use_mask, use_bias, dtype
):
    input = _tensor(tuple(dims), dtype, data.draw(DEVICES))
    weight = _tensor(tuple(weight_dims), data.draw(DTYPES), data.draw(DEVICES))
    out_hw = (data.draw(small), data.draw(small))
    offset = _tensor((dims[0], offset_channels, *out_hw), dtype, data.draw(DEVICES))
    mask = _tensor((dims[0], offset_channels // 2, *out_hw), dtype) if use_mask else None
    bias = _tensor((weight_dims[0],), dtype) if use_bias else None
    stride = data.draw(st.integers(-1, 3))
    padding = data.draw(st.integers(-1, 3))
    dilation = data.draw(st.integers(-1, 3))
    try:
        out = ops.deform_conv2d(input, offset, weight, bias, stride, padding, dilation, mask)
    except ACCEPTED:
        return
    assert out.shape[0] == dims[0] and out.shape[1] == weight_dims[0]
    assert tuple(out.shape[2:]) == out_hw


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    data=st.data(),
    dims=st.lists(st.integers(0, 6), min_size=4, max_size=4),
    n_rois=st.integers(0, 3),
    roi_cols=st.sampled_from([4, 5, 6]),
    batch_index=st.sampled_from([0.0, 1.0, -1.0, 0.5, 7.0, float("nan")]),
    coords=st.lists(st.floats(-50, 50, allow_nan=False), min_size=4, max_size=4),
    pooled=st.integers(-1, 3),
    dtype=DTYPES,
)
def test_roi_pools_never_crash(
    backend, data, dims, n_rois, roi_cols, batch_index, coords, pooled, dtype
):
    input = _tensor(tuple(dims), dtype, data.draw(DEVICES))
    row = [batch_index, *coords, 0.0][:roi_cols]
    rois = (
        torch.tensor([row] * n_rois, dtype=torch.float32)
        .reshape(n_rois, roi_cols)
        .to(dtype if dtype.is_floating_point else torch.float32)
    )
    offset = (
        _tensor((n_rois, 2, max(pooled, 0), max(pooled, 0)), dtype)
        if data.draw(st.booleans())
        else None
    )
    try:
        out = ops.deform_roi_pool(
            input, rois, offset, pooled, 0.5, data.draw(st.integers(-1, 2)), 0.1
        )
        assert tuple(out.shape) == (n_rois, dims[1], pooled, pooled)
    except ACCEPTED:
        pass
    group = data.draw(st.integers(0, 3))
    output_dim = data.draw(st.integers(0, 3))
    trans = (
        _tensor((n_rois, data.draw(st.integers(0, 4)), group, group), dtype)
        if data.draw(st.booleans())
        else None
    )
    try:
        out = ops.deform_psroi_pool(
            input,
            rois,
            trans,
            0.25,
            output_dim,
            group,
            group,
            group,
            data.draw(st.integers(0, 3)),
            0.1,
        )
        assert tuple(out.shape) == (n_rois, output_dim, group, group)
    except ACCEPTED:
        pass


def test_messages_name_the_problem() -> None:
    x = torch.randn(1, 4, 8, 8)
    w = torch.randn(4, 4, 3, 3)
    with pytest.raises(ValueError, match="offset has 17 channels"):
        ops.deform_conv2d(x, torch.zeros(1, 17, 6, 6), w)
    with pytest.raises(
        ValueError, match=r"offset has shape \(1, 18, 5, 5\); expected \[1, 18, 6, 6\]"
    ):
        ops.deform_conv2d(x, torch.zeros(1, 18, 5, 5), w)
    with pytest.raises(ValueError, match="rois must have shape \\[R, 5\\]"):
        ops.deform_roi_pool(x, torch.zeros(2, 4), None, 3)
    with pytest.raises(
        ValueError, match="input has 4 channels; expected output_dim \\* group_size\\^2 = 9"
    ):
        ops.deform_psroi_pool(x, torch.zeros(1, 5), None, 1.0, 1, 3, 3)


@pytest.mark.parametrize("dims", [(1, 0, 0, 0), (1, 2, 0, 3), (1, 2, 3, 0)])
def test_roi_pools_on_an_empty_map_give_zeros(backend, dims):
    """A map with no cell (a fuzz finding: the reference indexed an empty map) pools to zeros."""
    input = torch.ones(dims, requires_grad=True)
    rois = torch.tensor([[0.0, 0.0, 0.0, 4.0, 4.0]])
    out = ops.deform_roi_pool(input, rois, None, 2, 1.0, 2, 0.1)
    assert tuple(out.shape) == (1, dims[1], 2, 2) and not out.any()
    out.sum().backward()
    assert input.grad is not None and input.grad.shape == input.shape

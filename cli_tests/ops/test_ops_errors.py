"""Bad arguments raise OpsArgumentError (a ValueError and a RuntimeError) naming the problem, on
both backends; direct calls of the native ops with inconsistent shapes raise RuntimeError
(TORCH_CHECK) instead of crashing."""

from __future__ import annotations

from types import ModuleType
from typing import Callable, Dict

import pytest
import torch
from conftest import native_or_skip

from dcn_inspect.core.errors import OpsArgumentError


def _conv_args(**change: object) -> Dict[str, object]:
    args: Dict[str, object] = dict(
        input=torch.randn(2, 4, 6, 6),
        offset=torch.zeros(2, 18, 6, 6),
        weight=torch.randn(3, 4, 3, 3),
        bias=torch.zeros(3),
        stride=1,
        padding=1,
        dilation=1,
        mask=torch.ones(2, 9, 6, 6),
    )
    args.update(change)
    return args


CONV_CASES = {
    "input not 4-D": (_conv_args(input=torch.randn(4, 6, 6)), r"input must be 4-D"),
    "input not a tensor": (_conv_args(input=[[1.0]]), r"input must be a torch.Tensor"),
    "integer input": (
        _conv_args(input=torch.zeros(2, 4, 6, 6, dtype=torch.int64)),
        r"input must be a floating",
    ),
    "half on cpu": (
        _conv_args(
            input=torch.randn(2, 4, 6, 6).half(),
            offset=torch.zeros(2, 18, 6, 6).half(),
            weight=torch.randn(3, 4, 3, 3).half(),
            bias=None,
            mask=None,
        ),
        r"supported on CUDA only",
    ),
    "weight dtype": (
        _conv_args(weight=torch.randn(3, 4, 3, 3, dtype=torch.float64)),
        r"weight has dtype",
    ),
    "channels vs weight": (
        _conv_args(weight=torch.randn(3, 3, 3, 3)),
        r"not a multiple of weight.shape\[1\]",
    ),
    "out channels vs groups": (
        _conv_args(weight=torch.randn(3, 2, 3, 3)),
        r"not divisible by groups",
    ),
    "offset channels": (_conv_args(offset=torch.zeros(2, 17, 6, 6)), r"offset has 17 channels"),
    "offset groups vs channels": (
        _conv_args(offset=torch.zeros(2, 54, 6, 6), mask=None),
        r"offset groups",
    ),
    "offset spatial size": (_conv_args(offset=torch.zeros(2, 18, 5, 6)), r"offset has shape"),
    "offset batch": (_conv_args(offset=torch.zeros(1, 18, 6, 6)), r"offset has shape"),
    "mask shape": (_conv_args(mask=torch.ones(2, 8, 6, 6)), r"mask has shape"),
    "bias length": (_conv_args(bias=torch.zeros(4)), r"bias has 4 elements"),
    "stride zero": (_conv_args(stride=0), r"stride must be >= 1"),
    "negative padding": (_conv_args(padding=(-1, 0)), r"padding must be >= 0"),
    "dilation zero": (_conv_args(dilation=0), r"dilation must be >= 1"),
    "stride triple": (_conv_args(stride=(1, 1, 1)), r"stride must be an int or a pair"),
    "input too small": (
        _conv_args(input=torch.randn(2, 4, 1, 1), padding=0),
        r"too small for kernel",
    ),
}


@pytest.mark.parametrize("name", sorted(CONV_CASES))
def test_deform_conv2d_bad_arguments(ops: ModuleType, name: str) -> None:
    args, message = CONV_CASES[name]
    with pytest.raises(OpsArgumentError, match=message):
        ops.deform_conv2d(**args)


def _roi_args(**change: object) -> Dict[str, object]:
    args: Dict[str, object] = dict(
        input=torch.randn(2, 3, 8, 8),
        rois=torch.tensor([[0, 1.0, 1.0, 6.0, 6.0], [1, 0.0, 2.0, 5.0, 7.0]]),
        offset=torch.zeros(2, 2, 3, 3),
        output_size=3,
        spatial_scale=1.0,
        sampling_ratio=0,
    )
    args.update(change)
    return args


ROI_CASES = {
    "rois columns": (_roi_args(rois=torch.zeros(2, 4)), r"rois must have shape \[R, 5\]"),
    "rois batch index too large": (
        _roi_args(rois=torch.tensor([[2, 1.0, 1.0, 6.0, 6.0]]), offset=None),
        r"rois\[:, 0\] must be integer batch indices",
    ),
    "rois fractional index": (
        _roi_args(rois=torch.tensor([[0.5, 1.0, 1.0, 6.0, 6.0]]), offset=None),
        r"rois\[:, 0\] must be integer batch indices",
    ),
    "rois nan": (
        _roi_args(rois=torch.tensor([[0, float("nan"), 1.0, 6.0, 6.0]]), offset=None),
        r"NaN or Inf",
    ),
    "rois dtype": (
        _roi_args(rois=torch.zeros(1, 5, dtype=torch.float64), offset=None),
        r"rois has dtype",
    ),
    "offset shape": (_roi_args(offset=torch.zeros(2, 2, 3, 2)), r"offset has shape"),
    "output size zero": (_roi_args(output_size=0, offset=None), r"output_size must be >= 1"),
    "spatial scale zero": (_roi_args(spatial_scale=0.0), r"spatial_scale must be > 0"),
    "fractional sampling ratio": (_roi_args(sampling_ratio=1.5), r"sampling_ratio must be an int"),
}


@pytest.mark.parametrize("name", sorted(ROI_CASES))
def test_deform_roi_pool_bad_arguments(ops: ModuleType, name: str) -> None:
    args, message = ROI_CASES[name]
    with pytest.raises(OpsArgumentError, match=message):
        ops.deform_roi_pool(**args)


def _psroi_args(**change: object) -> Dict[str, object]:
    args: Dict[str, object] = dict(
        input=torch.randn(1, 2 * 9, 8, 8),
        rois=torch.tensor([[0, 1.0, 1.0, 6.0, 6.0]]),
        trans=torch.zeros(1, 2, 3, 3),
        spatial_scale=1.0,
        output_dim=2,
        group_size=3,
        pooled_size=3,
        part_size=3,
        sample_per_part=2,
    )
    args.update(change)
    return args


PSROI_CASES = {
    "channels vs output_dim": (_psroi_args(output_dim=3), r"expected output_dim \* group_size\^2"),
    "group size zero": (_psroi_args(group_size=0), r"group_size must be a positive int"),
    "sample_per_part zero": (
        _psroi_args(sample_per_part=0),
        r"sample_per_part must be a positive int",
    ),
    "trans part size": (_psroi_args(trans=torch.zeros(1, 2, 2, 2)), r"trans has shape"),
    "trans odd channels": (_psroi_args(trans=torch.zeros(1, 3, 3, 3)), r"trans has shape"),
    "classes vs output_dim": (
        _psroi_args(trans=torch.zeros(1, 6, 3, 3)),
        r"not divisible by the number of classes",
    ),
    "rois index": (_psroi_args(rois=torch.tensor([[1, 1.0, 1.0, 6.0, 6.0]])), r"batch indices"),
}


@pytest.mark.parametrize("name", sorted(PSROI_CASES))
def test_deform_psroi_pool_bad_arguments(ops: ModuleType, name: str) -> None:
    args, message = PSROI_CASES[name]
    with pytest.raises(OpsArgumentError, match=message):
        ops.deform_psroi_pool(**args)


def _direct_calls() -> Dict[str, Callable[[], object]]:
    x = torch.randn(1, 4, 6, 6)
    w = torch.randn(3, 4, 3, 3)
    empty = torch.empty(0)
    rois = torch.tensor([[0, 1.0, 1.0, 4.0, 4.0]])
    return {
        "conv offset shape": lambda: torch.ops.dcn_inspect.deform_conv2d(
            x, w, torch.zeros(1, 18, 5, 6), empty, empty, 1, 1, 1, 1, 1, 1, 1, 1, False
        ),
        "conv mask shape": lambda: torch.ops.dcn_inspect.deform_conv2d(
            x,
            w,
            torch.zeros(1, 18, 6, 6),
            torch.ones(1, 9, 3, 3),
            empty,
            1,
            1,
            1,
            1,
            1,
            1,
            1,
            1,
            True,
        ),
        "conv groups": lambda: torch.ops.dcn_inspect.deform_conv2d(
            x, w, torch.zeros(1, 18, 6, 6), empty, empty, 1, 1, 1, 1, 1, 1, 2, 1, False
        ),
        "conv stride zero": lambda: torch.ops.dcn_inspect.deform_conv2d(
            x, w, torch.zeros(1, 18, 6, 6), empty, empty, 0, 1, 1, 1, 1, 1, 1, 1, False
        ),
        "conv backward grad shape": lambda: torch.ops.dcn_inspect._deform_conv2d_backward(
            torch.zeros(1, 3, 5, 5),
            x,
            w,
            torch.zeros(1, 18, 6, 6),
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
        ),
        "roi batch index": lambda: torch.ops.dcn_inspect.deform_roi_pool(
            x, torch.tensor([[3, 1.0, 1.0, 4.0, 4.0]]), empty, 2, 2, 1.0, 0, 0.1
        ),
        "roi offset shape": lambda: torch.ops.dcn_inspect.deform_roi_pool(
            x, rois, torch.zeros(1, 2, 3, 3), 2, 2, 1.0, 0, 0.1
        ),
        "psroi channels": lambda: torch.ops.dcn_inspect.deform_psroi_pool(
            x, rois, empty, 1.0, 1, 3, 3, 3, 2, 0.1
        ),
        "psroi count shape": lambda: torch.ops.dcn_inspect._deform_psroi_pool_backward(
            torch.zeros(1, 1, 2, 2),
            x,
            rois,
            empty,
            torch.zeros(1, 1, 3, 3),
            1.0,
            1,
            2,
            2,
            2,
            2,
            0.1,
        ),
    }


# The kernel's own message for each direct call: a call of the wrong arity or argument type
# also raises RuntimeError, but from the dispatcher, with none of these messages.
DIRECT_MESSAGES = {
    "conv offset shape": r"^deform_conv2d: offset has shape \[1, 18, 5, 6\]; "
    r"expected \[1, 18, 6, 6\]",
    "conv mask shape": r"^deform_conv2d: mask has shape \[1, 9, 3, 3\]; expected \[1, 9, 6, 6\]",
    "conv groups": r"^deform_conv2d: input channels \(4\) != weight.size\(1\) \(4\) "
    r"\* groups \(2\)",
    "conv stride zero": r"^deform_conv2d: stride must be >= 1",
    "conv backward grad shape": r"^deform_conv2d backward: grad has shape \[1, 3, 5, 5\]; "
    r"expected \[1, 3, 6, 6\]",
    "roi batch index": r"^deform_roi_pool: roi batch index 3 is outside \[0, 0\]",
    "roi offset shape": r"^deform_roi_pool: offset has shape \[1, 2, 3, 3\]; "
    r"expected \[1, 2, 2, 2\]",
    "psroi channels": r"^deform_psroi_pool: input has 4 channels; "
    r"expected output_dim \* group_size\^2 = 9",
    "psroi count shape": r"^deform_psroi_pool backward: grad and count must have shape "
    r"\[1, 1, 2, 2\], got \[1, 1, 3, 3\]",
}


def test_every_direct_call_has_its_message() -> None:
    assert sorted(DIRECT_MESSAGES) == sorted(_direct_calls())


@pytest.mark.parametrize("name", sorted(_direct_calls()))
def test_native_ops_reject_bad_shapes_with_the_kernel_message(name: str) -> None:
    native_or_skip()
    with pytest.raises(RuntimeError, match=DIRECT_MESSAGES[name]):
        _direct_calls()[name]()

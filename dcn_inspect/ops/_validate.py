"""Argument checks shared by every backend of the deformable ops.

Each check raises :class:`~dcn_inspect.core.errors.OpsArgumentError` (both a ``ValueError`` and a
``RuntimeError``, the latter as torchvision raises) with a message naming the argument and
the problem, so malformed tensors never reach a kernel.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch

from dcn_inspect.core.errors import OpsArgumentError

IntPair = Union[int, Sequence[int]]
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def pair(value: IntPair, name: str) -> Tuple[int, int]:
    """Normalise an int or a 2-sequence of ints to a tuple (vertical, horizontal)."""
    if isinstance(value, bool):
        raise OpsArgumentError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        return (value, value)
    try:
        items = tuple(value)
    except TypeError:
        raise OpsArgumentError(f"{name} must be an int or a pair of ints, got {value!r}") from None
    if len(items) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        raise OpsArgumentError(f"{name} must be an int or a pair of ints, got {value!r}")
    return (items[0], items[1])


def _tensor(t: object, name: str, ndim: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise OpsArgumentError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise OpsArgumentError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise OpsArgumentError(f"{name} must be a floating tensor, got {t.dtype}")
    return t


def _same(ref: torch.Tensor, t: torch.Tensor, ref_name: str, name: str) -> None:
    if t.device != ref.device:
        raise OpsArgumentError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")
    if t.dtype != ref.dtype:
        raise OpsArgumentError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}")


def _check_half_device(t: torch.Tensor, name: str) -> None:
    if t.dtype in (torch.float16, torch.bfloat16) and t.device.type != "cuda":
        raise OpsArgumentError(
            f"{name}: {t.dtype} is supported on CUDA only; use float32 on {t.device}"
        )


@dataclass(frozen=True)
class DeformConvArgs:
    """Validated, normalised arguments of :func:`deform_conv2d`."""

    stride: Tuple[int, int]
    padding: Tuple[int, int]
    dilation: Tuple[int, int]
    kernel: Tuple[int, int]
    groups: int
    offset_groups: int
    out_hw: Tuple[int, int]


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Output length of a convolution along one axis (PyTorch arithmetic)."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _check_conv_operands(
    input: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
) -> None:
    """Every operand a tensor of the right rank, on the input's device, of its dtype."""
    _tensor(input, "input", 4)
    _tensor(offset, "offset", 4)
    _tensor(weight, "weight", 4)
    _check_half_device(input, "input")
    _same(input, offset, "input", "offset")
    _same(input, weight, "input", "weight")
    if mask is not None:
        _tensor(mask, "mask", 4)
        _same(input, mask, "input", "mask")
    if bias is not None:
        _tensor(bias, "bias", 1)
        _same(input, bias, "input", "bias")


def _conv_pairs(
    stride: IntPair, padding: IntPair, dilation: IntPair
) -> Tuple[Tuple[int, int], Tuple[int, int], Tuple[int, int]]:
    """(stride, padding, dilation) as (h, w) pairs: stride and dilation >= 1, padding >= 0."""
    stride_, padding_, dilation_ = (
        pair(stride, "stride"),
        pair(padding, "padding"),
        pair(dilation, "dilation"),
    )
    if min(stride_) < 1:
        raise OpsArgumentError(f"stride must be >= 1, got {stride_}")
    if min(padding_) < 0:
        raise OpsArgumentError(f"padding must be >= 0, got {padding_}")
    if min(dilation_) < 1:
        raise OpsArgumentError(f"dilation must be >= 1, got {dilation_}")
    return stride_, padding_, dilation_


def check_deform_conv2d(
    input: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride: IntPair,
    padding: IntPair,
    dilation: IntPair,
    mask: Optional[torch.Tensor],
) -> DeformConvArgs:
    _check_conv_operands(input, offset, weight, bias, mask)
    stride_, padding_, dilation_ = _conv_pairs(stride, padding, dilation)
    batch, in_channels, height, width = input.shape
    if in_channels < 1:
        raise OpsArgumentError(f"input has no channels: shape {tuple(input.shape)}")
    out_channels, weight_in, kh, kw = weight.shape
    if kh < 1 or kw < 1 or out_channels < 1 or weight_in < 1:
        raise OpsArgumentError(f"weight has an empty dimension: shape {tuple(weight.shape)}")
    if in_channels % weight_in != 0:
        raise OpsArgumentError(
            f"input has {in_channels} channels, not a multiple of weight.shape[1] = {weight_in}"
        )
    groups = in_channels // weight_in
    if out_channels % groups != 0:
        raise OpsArgumentError(
            f"weight.shape[0] = {out_channels} is not divisible by groups = {groups}"
        )
    kernel_points = kh * kw
    if offset.shape[1] == 0 or offset.shape[1] % (2 * kernel_points) != 0:
        raise OpsArgumentError(
            f"offset has {offset.shape[1]} channels; expected a positive multiple of "
            f"2*kh*kw = {2 * kernel_points}"
        )
    offset_groups = offset.shape[1] // (2 * kernel_points)
    if in_channels % offset_groups != 0:
        raise OpsArgumentError(
            f"input channels ({in_channels}) are not divisible by the offset groups "
            f"({offset_groups})"
        )
    out_h = conv_output_size(height, kh, stride_[0], padding_[0], dilation_[0])
    out_w = conv_output_size(width, kw, stride_[1], padding_[1], dilation_[1])
    if out_h < 1 or out_w < 1:
        raise OpsArgumentError(
            f"input {height}x{width} is too small for kernel {kh}x{kw} with padding {padding_} "
            f"and dilation {dilation_}"
        )
    if offset.shape[0] != batch or tuple(offset.shape[2:]) != (out_h, out_w):
        raise OpsArgumentError(
            f"offset has shape {tuple(offset.shape)}; "
            f"expected [{batch}, {offset.shape[1]}, {out_h}, {out_w}]"
        )
    if mask is not None:
        expected = (batch, offset_groups * kernel_points, out_h, out_w)
        if tuple(mask.shape) != expected:
            raise OpsArgumentError(f"mask has shape {tuple(mask.shape)}; expected {list(expected)}")
    if bias is not None and bias.shape[0] != out_channels:
        raise OpsArgumentError(f"bias has {bias.shape[0]} elements; expected {out_channels}")
    return DeformConvArgs(
        stride_, padding_, dilation_, (kh, kw), groups, offset_groups, (out_h, out_w)
    )


def check_rois(rois: torch.Tensor, input: torch.Tensor) -> None:
    """RoIs are [R, 5] rows (batch_index, x1, y1, x2, y2) in image coordinates."""
    _tensor(rois, "rois", 2)
    _same(input, rois, "input", "rois")
    if rois.shape[1] != 5:
        raise OpsArgumentError(
            f"rois must have shape [R, 5] (batch_index, x1, y1, x2, y2), got {tuple(rois.shape)}"
        )
    if rois.numel() and not bool(torch.isfinite(rois).all()):
        raise OpsArgumentError("rois contain NaN or Inf")
    if rois.numel():
        index = rois[:, 0]
        if (
            bool((index != index.round()).any())
            or bool((index < 0).any())
            or bool((index >= input.shape[0]).any())
        ):
            raise OpsArgumentError(
                f"rois[:, 0] must be integer batch indices in [0, {input.shape[0] - 1}]"
            )


def check_deform_roi_pool(
    input: torch.Tensor,
    rois: torch.Tensor,
    offset: Optional[torch.Tensor],
    output_size: IntPair,
    spatial_scale: float,
    sampling_ratio: int,
) -> Tuple[int, int]:
    _tensor(input, "input", 4)
    _check_half_device(input, "input")
    check_rois(rois, input)
    pooled = pair(output_size, "output_size")
    if min(pooled) < 1:
        raise OpsArgumentError(f"output_size must be >= 1, got {pooled}")
    if not spatial_scale > 0:
        raise OpsArgumentError(f"spatial_scale must be > 0, got {spatial_scale}")
    if isinstance(sampling_ratio, bool) or not isinstance(sampling_ratio, numbers.Integral):
        raise OpsArgumentError(
            f"sampling_ratio must be an int (<= 0: adaptive), got {sampling_ratio!r}"
        )
    if offset is not None and offset.numel() > 0:
        _tensor(offset, "offset", 4)
        _same(input, offset, "input", "offset")
        expected = (rois.shape[0], 2, pooled[0], pooled[1])
        if tuple(offset.shape) != expected:
            raise OpsArgumentError(
                f"offset has shape {tuple(offset.shape)}; expected {list(expected)} (x first)"
            )
    return pooled


def check_deform_psroi_pool(
    input: torch.Tensor,
    rois: torch.Tensor,
    trans: Optional[torch.Tensor],
    spatial_scale: float,
    output_dim: int,
    group_size: int,
    pooled_size: int,
    part_size: int,
    sample_per_part: int,
) -> int:
    """Returns the number of classes carried by ``trans`` (1 when there is no trans)."""
    _tensor(input, "input", 4)
    _check_half_device(input, "input")
    check_rois(rois, input)
    if not spatial_scale > 0:
        raise OpsArgumentError(f"spatial_scale must be > 0, got {spatial_scale}")
    for name, value in (
        ("output_dim", output_dim),
        ("group_size", group_size),
        ("pooled_size", pooled_size),
        ("part_size", part_size),
        ("sample_per_part", sample_per_part),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise OpsArgumentError(f"{name} must be a positive int, got {value!r}")
    if input.shape[1] != output_dim * group_size * group_size:
        raise OpsArgumentError(
            f"input has {input.shape[1]} channels; expected output_dim * group_size^2 = "
            f"{output_dim * group_size * group_size}"
        )
    if trans is None or trans.numel() == 0:
        return 1
    _tensor(trans, "trans", 4)
    _same(input, trans, "input", "trans")
    if (
        trans.shape[0] != rois.shape[0]
        or trans.shape[1] % 2
        or trans.shape[1] == 0
        or tuple(trans.shape[2:]) != (part_size, part_size)
    ):
        raise OpsArgumentError(
            f"trans has shape {tuple(trans.shape)}; "
            f"expected [{rois.shape[0]}, 2*num_classes, {part_size}, {part_size}]"
        )
    num_classes = trans.shape[1] // 2
    if output_dim % num_classes != 0:
        raise OpsArgumentError(
            f"output_dim ({output_dim}) is not divisible by the number of classes in trans "
            f"({num_classes})"
        )
    return num_classes

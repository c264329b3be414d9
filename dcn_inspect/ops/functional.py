"""Public functional deformable ops, dispatched to the active backend.

Every function validates its arguments first and raises
:class:`~dcn_inspect.core.errors.OpsArgumentError` (a ``ValueError`` and a ``RuntimeError``, as
torchvision raises) for shapes, dtypes or devices it cannot take. The layouts are the de facto
standard of torchvision, mmcv, detectron2 and the MSRA op (``PAPER.md`` §1-2).
"""

from __future__ import annotations

from typing import Optional

import torch

from dcn_inspect.ops import _backend
from dcn_inspect.ops._validate import IntPair


def deform_conv2d(
    input: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    r"""Deformable convolution v1 (``mask=None``) or modulated deformable convolution v2 (DCNv2).

    Same signature and semantics as ``torchvision.ops.deform_conv2d``. For output location
    (i, j) and kernel point (a, b), input channel c of offset group g is read (bilinearly) at

        y = i*stride_h - pad_h + a*dilation_h + dy,   x = j*stride_w - pad_w + b*dilation_w + dx

    and, with a mask, multiplied by ``mask[n, g*kh*kw + a*kw + b, i, j]`` before the weighted sum.
    A sample is zero outside the band -1 < y < H, -1 < x < W; bilinear corners outside the map
    count as zero.

    Args:
        input (Tensor[N, C_in, H, W]): input feature map.
        offset (Tensor[N, 2 * G * kh * kw, H_out, W_out]): sampling offsets in input pixels,
            G offset groups (G divides C_in; input channel c belongs to group c // (C_in / G)).
            Pairs (dy, dx), **y first**, one pair per kernel point per offset group: channel
            ``2 * (g*kh*kw + a*kw + b)`` is dy and the next channel dx of kernel point (a, b)
            (row-major) in group g.
        weight (Tensor[C_out, C_in / groups, kh, kw]): convolution weights; ``groups`` is
            ``C_in // weight.shape[1]``.
        bias (Tensor[C_out], optional): added to every output location. Default: None.
        stride (int or Tuple[int, int]): distance between output locations. Default: 1.
        padding (int or Tuple[int, int]): zero padding on each side. Default: 0.
        dilation (int or Tuple[int, int]): spacing between kernel points. Default: 1.
        mask (Tensor[N, G * kh * kw, H_out, W_out], optional): modulation scalars (DCNv2),
            one per kernel point per offset group, usually a sigmoid in [0, 1]. None: v1.

    Here ``H_out = (H + 2*pad_h - dilation_h*(kh - 1) - 1) // stride_h + 1`` (likewise W_out).
    Float32/float64 on CPU; float16/bfloat16 too on CUDA. Any strides are accepted
    (permuted, sliced or channels-last tensors).

    Returns:
        Tensor[N, C_out, H_out, W_out]: the result of the convolution.
    """
    return _backend.active().deform_conv2d(
        input, offset, weight, bias, stride, padding, dilation, mask
    )


def deform_roi_pool(
    input: torch.Tensor,
    rois: torch.Tensor,
    offset: Optional[torch.Tensor] = None,
    output_size: IntPair = 7,
    spatial_scale: float = 1.0,
    sampling_ratio: int = 0,
    gamma: float = 0.1,
) -> torch.Tensor:
    r"""Deformable RoI pooling (mmcv ``deform_roi_pool`` semantics, RoIAlign-style bilinear bins).

    Each RoI is split into ph x pw bins; bin (i, j) averages a grid of bilinear samples,
    shifted by ``gamma * offset[r, :, i, j] * (RoI width, RoI height)``.

    Args:
        input (Tensor[N, C, H, W]): feature map.
        rois (Tensor[R, 5]): rows (batch_index, x1, y1, x2, y2) in image pixels; the corners
            map to the feature map as ``coord * spatial_scale - 0.5``.
        offset (Tensor[R, 2, ph, pw], optional): normalised bin offsets, **x first**
            (channel 0 = dx^, channel 1 = dy^, unlike the conv offsets). None or empty: plain
            RoIAlign pooling (aligned=True).
        output_size (int or Tuple[int, int]): (ph, pw) bins per RoI. Default: 7.
        spatial_scale (float): feature-map pixels per image pixel (1 / stride). Default: 1.
        sampling_ratio (int): samples per bin side; ``<= 0`` adaptive,
            ``ceil(roi_size / pooled_size)`` (mmcv writes 0, torchvision -1). Default: 0.
        gamma (float): scale of the normalised offsets. Default: 0.1.

    Returns:
        Tensor[R, C, ph, pw]: the pooled features.
    """
    return _backend.active().deform_roi_pool(
        input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma
    )


def deform_psroi_pool(
    input: torch.Tensor,
    rois: torch.Tensor,
    trans: Optional[torch.Tensor] = None,
    spatial_scale: float = 1.0 / 16,
    output_dim: int = 1,
    group_size: int = 3,
    pooled_size: int = 3,
    part_size: Optional[int] = None,
    sample_per_part: int = 4,
    trans_std: float = 0.1,
) -> torch.Tensor:
    r"""Deformable position-sensitive RoI pooling (R-FCN; the MSRA op's semantics).

    Bin (i, j) of output channel d reads its own score map, channel
    ``(d * group_size + gi) * group_size + gj`` with (gi, gj) the bin's cell in the
    group_size x group_size grid, averaging sample_per_part^2 bilinear samples shifted by
    ``trans_std * trans * (RoI width, RoI height)``.

    Args:
        input (Tensor[N, output_dim * group_size^2, H, W]): position-sensitive score maps.
        rois (Tensor[R, 5]): rows (batch_index, x1, y1, x2, y2) in image pixels, corners
            rounded to integers with an inclusive end, as the MSRA op does.
        trans (Tensor[R, 2 * num_classes, part_size, part_size], optional): normalised part
            offsets, **x first** (channel 2c = dx^, 2c+1 = dy^ of class c); num_classes = 1
            is class-agnostic, otherwise output channel d uses class
            ``d // (output_dim / num_classes)``. None or empty: no offsets.
        spatial_scale (float): feature-map pixels per image pixel (1 / stride). Default: 1/16.
        output_dim (int): output channels (classes, or classes + 1). Default: 1.
        group_size (int): side of the position-sensitive channel grid. Default: 3.
        pooled_size (int): bins per RoI side. Default: 3.
        part_size (int, optional): side of the ``trans`` grid. Default: pooled_size.
        sample_per_part (int): samples per bin side. Default: 4.
        trans_std (float): scale of the normalised offsets (gamma). Default: 0.1.

    Returns:
        Tensor[R, output_dim, pooled_size, pooled_size]: the pooled scores.
    """
    return _backend.active().deform_psroi_pool(
        input,
        rois,
        trans,
        spatial_scale,
        output_dim,
        group_size,
        pooled_size,
        part_size,
        sample_per_part,
        trans_std,
    )

"""Public functional deformable ops, dispatched to the active backend."""

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
    """Deformable convolution v1 (``mask=None``) or modulated v2; see ``reference.deform_conv2d``."""
    return _backend.active().deform_conv2d(input, offset, weight, bias, stride, padding, dilation, mask)


def deform_roi_pool(
    input: torch.Tensor,
    rois: torch.Tensor,
    offset: Optional[torch.Tensor] = None,
    output_size: IntPair = 7,
    spatial_scale: float = 1.0,
    sampling_ratio: int = 0,
    gamma: float = 0.1,
) -> torch.Tensor:
    """Deformable RoI pooling (mmcv semantics); see ``reference.deform_roi_pool``."""
    return _backend.active().deform_roi_pool(input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma)


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
    """Deformable position-sensitive RoI pooling (R-FCN); see ``reference.deform_psroi_pool``."""
    return _backend.active().deform_psroi_pool(
        input, rois, trans, spatial_scale, output_dim, group_size, pooled_size, part_size, sample_per_part, trans_std
    )

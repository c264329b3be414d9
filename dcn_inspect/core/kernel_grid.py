"""Sampling locations of a deformable conv layer: the regular grid plus the learned offsets.

For output unit (i, j) and kernel point (a, b) of offset group g the op samples its input at
``y = i*stride - pad + a*dilation + dy``, ``x = j*stride - pad + b*dilation + dx``
(PAPER.md §1), in the layer's input-frame index coordinates. These functions give those
positions for every unit at once; map them to the image with the layer's input
:class:`~dcn_inspect.core.geometry.FrameMap`.
"""

from __future__ import annotations

from typing import Tuple

import torch

from dcn_inspect.core.geometry import Pair


def kernel_grid(
    kernel: Pair,
    dilation: Pair,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Row and column displacement of each kernel point, row-major:
    ([K], [K]) = (a*dil_y, b*dil_x)."""
    kh, kw = kernel
    rows = torch.arange(kh, device=device, dtype=dtype).repeat_interleave(kw) * dilation[0]
    cols = torch.arange(kw, device=device, dtype=dtype).repeat(kh) * dilation[1]
    return rows, cols


def split_offsets(offset: torch.Tensor, kernel: Pair) -> Tuple[torch.Tensor, torch.Tensor]:
    """[B, 2*G*K, Ho, Wo] -> (dy, dx), each [B, G, K, Ho, Wo] (y first, interleaved per kernel
    point)."""
    batch, channels, out_h, out_w = offset.shape
    points = kernel[0] * kernel[1]
    groups = channels // (2 * points)
    view = offset.reshape(batch, groups, points, 2, out_h, out_w)
    return view[:, :, :, 0], view[:, :, :, 1]


def sampling_locations(
    offset: torch.Tensor, kernel: Pair, stride: Pair, padding: Pair, dilation: Pair
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sampling positions (ys, xs), each [B, G, K, Ho, Wo], in the layer's input index
    coordinates."""
    dy, dx = split_offsets(offset, kernel)
    out_h, out_w = offset.shape[-2:]
    rows, cols = kernel_grid(kernel, dilation, offset.device, offset.dtype)
    base_y = torch.arange(out_h, device=offset.device, dtype=offset.dtype) * stride[0] - padding[0]
    base_x = torch.arange(out_w, device=offset.device, dtype=offset.dtype) * stride[1] - padding[1]
    ys = rows.view(1, 1, -1, 1, 1) + base_y.view(1, 1, 1, -1, 1) + dy
    xs = cols.view(1, 1, -1, 1, 1) + base_x.view(1, 1, 1, 1, -1) + dx
    return ys, xs

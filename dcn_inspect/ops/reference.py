"""Pure-PyTorch reference implementation of the deformable ops.

Same API and semantics as :mod:`dcn_inspect.ops` (see ``PAPER.md`` §1-2); gradients come
from autograd. It is the fallback when the native extension cannot be built, and the
semantic anchor the native kernels are tested against. It favours clarity over speed, but is
vectorised over positions and kernel points so that small models train with it.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from dcn_inspect.ops._validate import (
    IntPair,
    check_deform_conv2d,
    check_deform_psroi_pool,
    check_deform_roi_pool,
)


def _gather_2d(feature: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """Read ``feature[..., ys, xs]`` with zeros outside the map.

    feature: [B, G, C, H, W]; ys, xs: integer tensors [B, G, P]. Returns [B, G, C, P].
    """
    height, width = feature.shape[-2], feature.shape[-1]
    valid = (ys >= 0) & (ys < height) & (xs >= 0) & (xs < width)
    index = (ys.clamp(0, height - 1) * width + xs.clamp(0, width - 1)).unsqueeze(2)
    flat = feature.flatten(-2)
    values = torch.gather(flat, 3, index.expand(-1, -1, flat.shape[2], -1))
    return values * valid.unsqueeze(2).to(feature.dtype)


def bilinear_zero_border(feature: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """Bilinear sampling with the DCN border rule.

    A sample is zero unless -1 < y < H and -1 < x < W; inside that band each of the four
    corners that falls outside the map contributes zero (torchvision / DCNv2 semantics).
    feature: [B, G, C, H, W]; ys, xs: float [B, G, P] in the map's index coordinates.
    Returns [B, G, C, P].
    """
    height, width = feature.shape[-2], feature.shape[-1]
    y0 = torch.floor(ys)
    x0 = torch.floor(xs)
    ly, lx = ys - y0, xs - x0
    hy, hx = 1 - ly, 1 - lx
    y0i, x0i = y0.long(), x0.long()
    out = (
        _gather_2d(feature, y0i, x0i) * (hy * hx).unsqueeze(2)
        + _gather_2d(feature, y0i, x0i + 1) * (hy * lx).unsqueeze(2)
        + _gather_2d(feature, y0i + 1, x0i) * (ly * hx).unsqueeze(2)
        + _gather_2d(feature, y0i + 1, x0i + 1) * (ly * lx).unsqueeze(2)
    )
    band = (ys > -1) & (ys < height) & (xs > -1) & (xs < width)
    return out * band.unsqueeze(2).to(feature.dtype)


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
    """Deformable convolution (v1), or modulated deformable convolution (v2) with ``mask``.

    Layouts: offset [B, 2*G*kh*kw, Hout, Wout], channel 2*(g*kh*kw + a*kw + b) = dy and the
    next = dx; mask [B, G*kh*kw, Hout, Wout]. Sampling location of output (i, j), kernel
    point (a, b): y = i*stride - pad + a*dilation + dy, x = j*stride - pad + b*dilation + dx.
    Any strides are accepted (permuted or sliced tensors, channels-last).
    """
    args = check_deform_conv2d(input, offset, weight, bias, stride, padding, dilation, mask)
    return deform_conv2d_checked(
        input, offset, weight, bias, args.stride, args.padding, args.dilation, mask
    )


def deform_conv2d_checked(
    input: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride: Tuple[int, int],
    padding: Tuple[int, int],
    dilation: Tuple[int, int],
    mask: Optional[torch.Tensor],
) -> torch.Tensor:
    """:func:`deform_conv2d` on arguments already validated; TorchScript-compatible (the
    modules run it when scripted on the reference backend). Groups and offset groups come
    from the shapes, as in :func:`~dcn_inspect.ops._validate.check_deform_conv2d`."""
    batch, in_channels, height, width = (
        input.shape[0],
        input.shape[1],
        input.shape[2],
        input.shape[3],
    )
    out_channels, kh, kw = weight.shape[0], weight.shape[2], weight.shape[3]
    out_h, out_w = offset.shape[2], offset.shape[3]
    n_points = kh * kw
    groups = in_channels // weight.shape[1]
    offset_groups = offset.shape[1] // (2 * n_points)

    # Regular grid positions of every kernel point at every output location: [K, Ho, Wo].
    dtype, device = input.dtype, input.device
    rows = torch.arange(out_h, device=device, dtype=dtype) * stride[0] - padding[0]
    cols = torch.arange(out_w, device=device, dtype=dtype) * stride[1] - padding[1]
    ka = torch.arange(kh, device=device, dtype=dtype).repeat_interleave(kw) * dilation[0]
    kb = torch.arange(kw, device=device, dtype=dtype).repeat(kh) * dilation[1]
    base_y = ka.view(-1, 1, 1) + rows.view(1, -1, 1)
    base_x = kb.view(-1, 1, 1) + cols.view(1, 1, -1)

    # reshape, not view: torchvision's tests pass permuted (non-contiguous) offsets and masks.
    off = offset.reshape(batch, offset_groups, n_points, 2, out_h, out_w)
    ys = (base_y + off[:, :, :, 0]).flatten(2)  # [B, G, K*Ho*Wo]
    xs = (base_x + off[:, :, :, 1]).flatten(2)

    grouped = input.reshape(batch, offset_groups, in_channels // offset_groups, height, width)
    sampled = bilinear_zero_border(grouped, ys, xs)  # [B, G, C/G, K*L]
    sampled = sampled.view(
        batch, offset_groups, in_channels // offset_groups, n_points, out_h * out_w
    )
    if mask is not None:
        sampled = sampled * mask.reshape(batch, offset_groups, 1, n_points, out_h * out_w)

    # im2col columns, channel-major like the weight layout (c, a, b): [B, groups, Cin/groups*K, L].
    columns = sampled.reshape(batch, groups, (in_channels // groups) * n_points, out_h * out_w)
    w = weight.reshape(groups, out_channels // groups, (in_channels // groups) * n_points)
    out = torch.einsum("gok,bgkl->bgol", w, columns).reshape(batch, out_channels, out_h, out_w)
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    return out


def _bilinear_roi_align(feature: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """Bilinear sampling with the RoIAlign border rule (mmcv ``bilinear_interpolate``).

    Zero if y < -1 or y > H or x < -1 or x > W; otherwise coordinates are clamped to
    [0, H-1] x [0, W-1] before interpolating. feature: [C, H, W]; ys, xs: [...]. Returns [C, ...].
    """
    height, width = feature.shape[-2:]
    if height == 0 or width == 0:
        # An empty map has no sample to read: every point is outside (zero); the sum keeps the
        # result in the graph so the backward gives the (empty) feature a gradient.
        return feature.new_zeros((feature.shape[0], *ys.shape)) + feature.sum() * 0
    outside = (ys < -1) | (ys > height) | (xs < -1) | (xs > width)
    y = ys.clamp(min=0)
    x = xs.clamp(min=0)
    y0 = torch.floor(y).clamp(max=height - 1)
    x0 = torch.floor(x).clamp(max=width - 1)
    y = torch.where(y0 >= height - 1, y0, y)
    x = torch.where(x0 >= width - 1, x0, x)
    y1 = (y0 + 1).clamp(max=height - 1)
    x1 = (x0 + 1).clamp(max=width - 1)
    ly, lx = y - y0, x - x0
    hy, hx = 1 - ly, 1 - lx
    flat = feature.flatten(1)

    def at(yy: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
        index = (yy.long() * width + xx.long()).flatten()
        return flat[:, index].view(feature.shape[0], *ys.shape)

    value = (
        at(y0, x0) * (hy * hx)
        + at(y0, x1) * (hy * lx)
        + at(y1, x0) * (ly * hx)
        + at(y1, x1) * (ly * lx)
    )
    return value * (~outside).to(feature.dtype)


def deform_roi_pool(
    input: torch.Tensor,
    rois: torch.Tensor,
    offset: Optional[torch.Tensor] = None,
    output_size: IntPair = 7,
    spatial_scale: float = 1.0,
    sampling_ratio: int = 0,
    gamma: float = 0.1,
) -> torch.Tensor:
    """Deformable RoI pooling (mmcv ``deform_roi_pool`` semantics).

    rois: [R, 5] (batch_index, x1, y1, x2, y2) in image coordinates. offset: [R, 2, ph, pw],
    channel 0 = x, 1 = y, normalised: bin (i, j) shifts by gamma * offset * (RoI width,
    height). RoI corners map to the feature map as ``coord * spatial_scale - 0.5``; each bin
    averages a sampling_ratio^2 grid (adaptive ``ceil(roi_size / pooled)`` when <= 0: mmcv
    writes 0, torchvision -1).
    Returns [R, C, ph, pw].
    """
    pooled_h, pooled_w = check_deform_roi_pool(
        input, rois, offset, output_size, spatial_scale, sampling_ratio
    )
    channels = input.shape[1]
    outputs = []
    for r in range(rois.shape[0]):
        batch_index = int(rois[r, 0])
        start_x = rois[r, 1] * spatial_scale - 0.5
        start_y = rois[r, 2] * spatial_scale - 0.5
        roi_w = rois[r, 3] * spatial_scale - 0.5 - start_x
        roi_h = rois[r, 4] * spatial_scale - 0.5 - start_y
        bin_w, bin_h = roi_w / pooled_w, roi_h / pooled_h
        grid_h = sampling_ratio if sampling_ratio > 0 else int(math.ceil(float(roi_h) / pooled_h))
        grid_w = sampling_ratio if sampling_ratio > 0 else int(math.ceil(float(roi_w) / pooled_w))
        count = max(grid_h * grid_w, 1)
        if grid_h <= 0 or grid_w <= 0:
            # An empty sampling grid pools to zero; keep it in the graph so backward gives zero
            # gradients.
            zero = input[batch_index].sum() * 0
            if offset is not None and offset.numel() > 0:
                zero = zero + offset[r].sum() * 0
            outputs.append(zero.expand(channels, pooled_h, pooled_w))
            continue
        ph = torch.arange(pooled_h, device=input.device, dtype=input.dtype).view(-1, 1, 1, 1)
        pw = torch.arange(pooled_w, device=input.device, dtype=input.dtype).view(1, -1, 1, 1)
        iy = torch.arange(grid_h, device=input.device, dtype=input.dtype).view(1, 1, -1, 1)
        ix = torch.arange(grid_w, device=input.device, dtype=input.dtype).view(1, 1, 1, -1)
        bin_y = start_y + ph * bin_h
        bin_x = start_x + pw * bin_w
        if offset is not None and offset.numel() > 0:
            bin_x = bin_x + gamma * roi_w * offset[r, 0].view(pooled_h, pooled_w, 1, 1)
            bin_y = bin_y + gamma * roi_h * offset[r, 1].view(pooled_h, pooled_w, 1, 1)
        ys = bin_y + (iy + 0.5) * bin_h / grid_h
        xs = bin_x + (ix + 0.5) * bin_w / grid_w
        ys, xs = torch.broadcast_tensors(ys, xs)
        values = _bilinear_roi_align(input[batch_index], ys, xs)  # [C, ph, pw, gh, gw]
        outputs.append(values.sum(dim=(-1, -2)) / count)
    if not outputs:
        return input.new_zeros(0, channels, pooled_h, pooled_w)
    return torch.stack(outputs)


def _bilinear_psroi(
    feature: torch.Tensor, channels: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor
) -> torch.Tensor:
    """Bilinear read of ``feature[channels, ys, xs]`` for coordinates already clamped inside."""
    height, width = feature.shape[-2:]
    y0 = torch.floor(ys)
    x0 = torch.floor(xs)
    y1 = (y0 + 1).clamp(max=height - 1)
    x1 = (x0 + 1).clamp(max=width - 1)
    ly, lx = ys - y0, xs - x0
    flat = feature.flatten()
    base = channels * (height * width)

    def at(yy: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
        return flat[base + yy.long() * width + xx.long()]

    return (
        at(y0, x0) * (1 - ly) * (1 - lx)
        + at(y0, x1) * (1 - ly) * lx
        + at(y1, x0) * ly * (1 - lx)
        + at(y1, x1) * ly * lx
    )


class _PsRoIBins:
    """Where each output cell of :func:`deform_psroi_pool` reads, independent of the RoI.

    Shapes broadcast over [output_dim D, pooled P, pooled P, sample_per_part S, S]:
    ``channel`` [D, P, P, 1, 1] is the score map of (class channel ``ctop``, group cell
    ``gh, gw``); ``class_id`` [D, 1, 1, 1, 1] the class whose offsets move the bin;
    ``part_h``/``part_w`` the offset cell of bin (ph, pw); ``ph``/``pw`` the bin indices and
    ``ih``/``iw`` the sample indices inside a bin.
    """

    def __init__(
        self,
        output_dim: int,
        group_size: int,
        pooled_size: int,
        part: int,
        sample_per_part: int,
        channels_each_class: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.pooled_size, self.sample_per_part = pooled_size, sample_per_part
        ctop = torch.arange(output_dim, device=device).view(-1, 1, 1, 1, 1)
        self.ph = torch.arange(pooled_size, device=device).view(1, -1, 1, 1, 1)
        self.pw = torch.arange(pooled_size, device=device).view(1, 1, -1, 1, 1)
        self.ih = torch.arange(sample_per_part, device=device, dtype=dtype).view(1, 1, 1, -1, 1)
        self.iw = torch.arange(sample_per_part, device=device, dtype=dtype).view(1, 1, 1, 1, -1)
        self.part_h = torch.div(self.ph * part, pooled_size, rounding_mode="floor")
        self.part_w = torch.div(self.pw * part, pooled_size, rounding_mode="floor")
        gh = torch.div(self.ph * group_size, pooled_size, rounding_mode="floor")
        gw = torch.div(self.pw * group_size, pooled_size, rounding_mode="floor")
        gh, gw = gh.clamp(0, group_size - 1), gw.clamp(0, group_size - 1)
        self.channel = (ctop * group_size + gh) * group_size + gw  # [D, P, P, 1, 1]
        self.class_id = torch.div(ctop, channels_each_class, rounding_mode="floor")


def _rounded_roi_corners(roi: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """C ``round()`` of the corners: halves away from zero (torch.round rounds halves to even).
    In float64, where |x| + 0.5 is exact for float32 input."""
    corners = roi.double()
    return (torch.sign(corners) * torch.floor(corners.abs() + 0.5)).to(dtype)


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
    """Deformable position-sensitive RoI pooling (R-FCN; the MSRA op's semantics).

    input: [B, output_dim*group_size^2, H, W] position-sensitive score maps; rois: [R, 5]
    (batch_index, x1, y1, x2, y2) in image pixels, corners rounded to integers (inclusive end,
    as the op does). trans: [R, 2*num_classes, part_size, part_size], channel 2c = dx^ and
    2c+1 = dy^ (x first), scaled by ``trans_std`` and the RoI width/height; None (or empty)
    means no offsets. Output channel ``ctop`` uses class ``ctop // (output_dim / num_classes)``.
    Returns [R, output_dim, pooled_size, pooled_size].
    """
    part = pooled_size if part_size is None else part_size
    num_classes = check_deform_psroi_pool(
        input,
        rois,
        trans,
        spatial_scale,
        output_dim,
        group_size,
        pooled_size,
        part,
        sample_per_part,
    )
    no_trans = trans is None or trans.numel() == 0
    device, dtype = input.device, input.dtype
    bins = _PsRoIBins(
        output_dim,
        group_size,
        pooled_size,
        part,
        sample_per_part,
        output_dim // num_classes,
        device,
        dtype,
    )
    outputs = []
    for r in range(rois.shape[0]):
        if no_trans:
            shift: Optional[torch.Tensor] = None
        else:
            shift = trans[r].view(num_classes, 2, part, part)  # type: ignore[union-attr]
        outputs.append(
            _psroi_pool_one(
                input[int(rois[r, 0])], rois[r, 1:], shift, bins, spatial_scale, trans_std
            )
        )
    if not outputs:
        return input.new_zeros(0, output_dim, pooled_size, pooled_size)
    return torch.stack(outputs)


def _psroi_pool_one(
    feature: torch.Tensor,
    corners: torch.Tensor,
    shift: Optional[torch.Tensor],
    bins: _PsRoIBins,
    spatial_scale: float,
    trans_std: float,
) -> torch.Tensor:
    """One RoI of :func:`deform_psroi_pool`: ``feature`` [C, H, W] of its image, ``corners``
    [4] (x1, y1, x2, y2) in image pixels, ``shift`` [num_classes, 2, part, part] or ``None``.

    Bin (ph, pw) starts at ``p * roi_size / pooled + start + trans * trans_std * roi_size``
    (``start = corner * spatial_scale - 0.5``); its S x S samples are averaged over those that
    fall inside [-0.5, size - 0.5] (clamped into the map before the bilinear read).
    Returns [output_dim, pooled, pooled].
    """
    dtype = feature.dtype
    height, width = feature.shape[-2:]
    pooled_size, sample_per_part = bins.pooled_size, bins.sample_per_part
    roi = _rounded_roi_corners(corners, dtype)
    start_x = roi[0] * spatial_scale - 0.5
    start_y = roi[1] * spatial_scale - 0.5
    roi_w = torch.clamp((roi[2] + 1) * spatial_scale - 0.5 - start_x, min=0.1)
    roi_h = torch.clamp((roi[3] + 1) * spatial_scale - 0.5 - start_y, min=0.1)
    bin_w, bin_h = roi_w / pooled_size, roi_h / pooled_size
    if shift is None:
        trans_x = trans_y = torch.zeros((), device=feature.device, dtype=dtype)
    else:
        trans_x = shift[bins.class_id, 0, bins.part_h, bins.part_w] * trans_std
        trans_y = shift[bins.class_id, 1, bins.part_h, bins.part_w] * trans_std
    wstart = bins.pw.to(dtype) * bin_w + start_x + trans_x * roi_w
    hstart = bins.ph.to(dtype) * bin_h + start_y + trans_y * roi_h
    xs = wstart + bins.iw * (bin_w / sample_per_part)
    ys = hstart + bins.ih * (bin_h / sample_per_part)
    xs, ys, chan = torch.broadcast_tensors(xs, ys, bins.channel)
    inside = (xs >= -0.5) & (xs <= width - 0.5) & (ys >= -0.5) & (ys <= height - 0.5)
    values = _bilinear_psroi(feature, chan, ys.clamp(0, height - 1), xs.clamp(0, width - 1))
    values = values * inside.to(dtype)
    count = inside.sum(dim=(-1, -2))
    return values.sum(dim=(-1, -2)) / count.clamp(min=1).to(dtype)

"""Stand-in for Deformable-DETR's ``models/ops/functions/ms_deform_attn_func.py``: the pure-PyTorch
core ``ms_deform_attn_core_pytorch`` and the autograd Function ``MSDeformAttnFunction`` whose
``apply`` is what the official module calls (there a CUDA kernel; here the pure core, with a
backward by recomputation). Written from the published calling conventions:

* ``value``: ``[N, sum(H_l * W_l), heads, head_dim]``, the levels' tokens row-major, level by level;
* ``value_spatial_shapes``: ``[L, 2]`` long, ``(H_l, W_l)``;
* ``sampling_locations``: ``[N, Len_q, heads, L, points, 2]``, normalised ``(x, y)`` in ``[0, 1]``
  of each level's map, read by ``grid_sample(align_corners=False)`` (so ``x * W_l - 0.5`` is the
  continuous column);
* ``attention_weights``: ``[N, Len_q, heads, L, points]``;
* result: ``[N, Len_q, heads * head_dim]``.
"""

from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F

__all__ = ["ms_deform_attn_core_pytorch", "MSDeformAttnFunction"]


def ms_deform_attn_core_pytorch(
    value: torch.Tensor,
    value_spatial_shapes: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Bilinear sampling of every level at the given locations, weighted sum over all points."""
    batch, _, heads, dim = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    shapes = [(int(h), int(w)) for h, w in value_spatial_shapes.tolist()]
    per_level = value.split([h * w for h, w in shapes], dim=1)
    grids = sampling_locations * 2 - 1  # grid_sample's [-1, 1]
    sampled: List[torch.Tensor] = []
    for level, (h, w) in enumerate(shapes):
        # [N, H*W, heads, dim] -> [N * heads, dim, H, W]
        maps = per_level[level].permute(0, 2, 3, 1).reshape(batch * heads, dim, h, w)
        # [N, Len_q, heads, points, 2] -> [N * heads, Len_q, points, 2]
        grid = grids[:, :, :, level].transpose(1, 2).reshape(batch * heads, queries, points, 2)
        sampled.append(
            F.grid_sample(maps, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        )  # [N * heads, dim, Len_q, points]
    stacked = torch.stack(sampled, dim=3).flatten(3)  # [N * heads, dim, Len_q, L * points]
    weights = attention_weights.transpose(1, 2).reshape(batch * heads, 1, queries, levels * points)
    out = (stacked * weights).sum(-1).view(batch, heads * dim, queries)
    return out.transpose(1, 2).contiguous()


class MSDeformAttnFunction(torch.autograd.Function):
    """``apply(value, value_spatial_shapes, value_level_start_index, sampling_locations,
    attention_weights, im2col_step)``, as the official CUDA Function."""

    @staticmethod
    def forward(
        ctx,
        value,
        value_spatial_shapes,
        value_level_start_index,
        sampling_locations,
        attention_weights,
        im2col_step,
    ):
        ctx.im2col_step = im2col_step
        ctx.save_for_backward(value, value_spatial_shapes, sampling_locations, attention_weights)
        return ms_deform_attn_core_pytorch(
            value, value_spatial_shapes, sampling_locations, attention_weights
        )

    @staticmethod
    def backward(ctx, grad_output):
        value, shapes, locations, weights = ctx.saved_tensors
        with torch.enable_grad():
            inputs = [t.detach().requires_grad_() for t in (value, locations, weights)]
            out = ms_deform_attn_core_pytorch(inputs[0], shapes, inputs[1], inputs[2])
        grad_value, grad_locations, grad_weights = torch.autograd.grad(out, inputs, grad_output)
        return grad_value, None, None, grad_locations, grad_weights, None

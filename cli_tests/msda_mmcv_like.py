"""Stand-in for mmcv's ``mmcv/ops/multi_scale_deform_attn.py``: the pure-PyTorch core
``multi_scale_deformable_attn_pytorch``, the autograd Function
``MultiScaleDeformableAttnFunction`` (there a CUDA kernel) and the module
``MultiScaleDeformableAttention``, all in one file as in mmcv. Written from the published calling
conventions, not copied.

``forward(query, key=None, value=None, identity=None, query_pos=None, key_padding_mask=None,
reference_points=None, spatial_shapes=None, level_start_index=None, **kwargs)``: ``query``
``[num_query, bs, C]`` (``batch_first=False``, the default) or ``[bs, num_query, C]``;
``reference_points`` always ``[bs, num_query, L, 2 | 4]``; the result is ``dropout(out) +
identity`` in the query's layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "multi_scale_deformable_attn_pytorch",
    "MultiScaleDeformableAttnFunction",
    "MultiScaleDeformableAttention",
]


def multi_scale_deformable_attn_pytorch(
    value: torch.Tensor,
    value_spatial_shapes: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """``value`` ``[bs, num_keys, heads, dim]``, locations ``[bs, num_queries, heads, levels,
    points, 2]``, weights ``[bs, num_queries, heads, levels, points]`` -> ``[bs, num_queries,
    heads * dim]`` (bilinear, ``align_corners=False``, zeros outside)."""
    bs, _, heads, dim = value.shape
    _, num_queries, _, levels, points, _ = sampling_locations.shape
    total = torch.zeros(bs * heads, dim, num_queries, dtype=value.dtype, device=value.device)
    start = 0
    for level, (h, w) in enumerate(value_spatial_shapes.tolist()):
        tokens = value[:, start : start + h * w]
        start += h * w
        feature = tokens.flatten(2).transpose(1, 2).reshape(bs * heads, dim, h, w)
        grid = sampling_locations[:, :, :, level].transpose(1, 2).flatten(0, 1) * 2 - 1
        picked = F.grid_sample(
            feature, grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )  # [bs * heads, dim, num_queries, points]
        weight = attention_weights[:, :, :, level].transpose(1, 2).flatten(0, 1)
        total = total + (picked * weight[:, None]).sum(-1)
    return total.view(bs, heads * dim, num_queries).transpose(1, 2).contiguous()


class MultiScaleDeformableAttnFunction(torch.autograd.Function):
    """``apply(value, value_spatial_shapes, value_level_start_index, sampling_locations,
    attention_weights, im2col_step)``, as mmcv's CUDA Function."""

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
        ctx.save_for_backward(value, value_spatial_shapes, sampling_locations, attention_weights)
        return multi_scale_deformable_attn_pytorch(
            value, value_spatial_shapes, sampling_locations, attention_weights
        )

    @staticmethod
    def backward(ctx, grad_output):
        value, shapes, locations, weights = ctx.saved_tensors
        with torch.enable_grad():
            inputs = [t.detach().requires_grad_() for t in (value, locations, weights)]
            out = multi_scale_deformable_attn_pytorch(inputs[0], shapes, inputs[1], inputs[2])
        grads = torch.autograd.grad(out, inputs, grad_output)
        return grads[0], None, None, grads[1], grads[2], None


class MultiScaleDeformableAttention(nn.Module):
    """mmcv's module. ``use_function=True`` calls ``MultiScaleDeformableAttnFunction.apply`` (mmcv's
    CUDA path), else ``multi_scale_deformable_attn_pytorch`` (its CPU path)."""

    def __init__(
        self,
        embed_dims: int = 256,
        num_heads: int = 8,
        num_levels: int = 4,
        num_points: int = 4,
        im2col_step: int = 64,
        dropout: float = 0.1,
        batch_first: bool = False,
        use_function: bool = False,
    ) -> None:
        super().__init__()
        if embed_dims % num_heads:
            raise ValueError("embed_dims must be divisible by num_heads")
        self.embed_dims = embed_dims
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.im2col_step = im2col_step
        self.batch_first = batch_first
        self.use_function = use_function
        self.dropout = nn.Dropout(dropout)
        self.sampling_offsets = nn.Linear(embed_dims, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dims, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dims, embed_dims)
        self.output_proj = nn.Linear(embed_dims, embed_dims)

    def forward(
        self,
        query,
        key=None,
        value=None,
        identity=None,
        query_pos=None,
        key_padding_mask=None,
        reference_points=None,
        spatial_shapes=None,
        level_start_index=None,
        **kwargs,
    ):
        if value is None:
            value = query
        if identity is None:
            identity = query
        if query_pos is not None:
            query = query + query_pos
        if not self.batch_first:  # [num_query, bs, C] -> [bs, num_query, C]
            query = query.permute(1, 0, 2)
            value = value.permute(1, 0, 2)
        bs, num_query, _ = query.shape
        _, num_value, _ = value.shape
        value = self.value_proj(value)
        if key_padding_mask is not None:
            value = value.masked_fill(key_padding_mask[..., None], 0.0)
        value = value.view(bs, num_value, self.num_heads, -1)
        offsets = self.sampling_offsets(query).view(
            bs, num_query, self.num_heads, self.num_levels, self.num_points, 2
        )
        weights = self.attention_weights(query).view(
            bs, num_query, self.num_heads, self.num_levels * self.num_points
        )
        weights = weights.softmax(-1).view(
            bs, num_query, self.num_heads, self.num_levels, self.num_points
        )
        if reference_points.shape[-1] == 2:
            normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1)
            locations = (
                reference_points[:, :, None, :, None, :]
                + offsets / normalizer[None, None, None, :, None, :]
            )
        elif reference_points.shape[-1] == 4:
            locations = (
                reference_points[:, :, None, :, None, :2]
                + offsets / self.num_points * reference_points[:, :, None, :, None, 2:] * 0.5
            )
        else:
            raise ValueError("reference_points must end in 2 or 4")
        if self.use_function:
            output = MultiScaleDeformableAttnFunction.apply(
                value, spatial_shapes, level_start_index, locations, weights, self.im2col_step
            )
        else:
            output = multi_scale_deformable_attn_pytorch(value, spatial_shapes, locations, weights)
        output = self.output_proj(output)
        if not self.batch_first:
            output = output.permute(1, 0, 2)
        return self.dropout(output) + identity

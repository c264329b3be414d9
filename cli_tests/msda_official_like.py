"""Stand-in for Deformable-DETR's ``models/ops/modules/ms_deform_attn.py``: the ``MSDeformAttn``
module, which (as there) finds its core through names imported into this module's globals
(``from ..functions import MSDeformAttnFunction``; DINO also imports
``ms_deform_attn_core_pytorch`` and calls it off the GPU). Written from the published calling
conventions, not copied.

``forward(query, reference_points, input_flatten, input_spatial_shapes, input_level_start_index,
input_padding_mask=None)``: ``query`` ``[N, Len_q, C]``, ``reference_points`` ``[N, Len_q, L, 2]``
(normalised centres; location = reference + offset / (W_l, H_l)) or ``[N, Len_q, L, 4]`` (boxes;
location = centre + offset / n_points * size * 0.5), ``input_flatten`` ``[N, sum(H_l * W_l), C]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from msda_official_functions import MSDeformAttnFunction, ms_deform_attn_core_pytorch
from torch import nn

__all__ = ["MSDeformAttn"]


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention, official layout. ``use_function=False`` calls
    ``ms_deform_attn_core_pytorch`` directly (DINO's CPU path) instead of
    ``MSDeformAttnFunction.apply``."""

    def __init__(
        self,
        d_model: int = 256,
        n_levels: int = 4,
        n_heads: int = 8,
        n_points: int = 4,
        use_function: bool = True,
    ) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError("d_model must be divisible by n_heads")
        self.im2col_step = 64
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.use_function = use_function
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)

    def forward(
        self,
        query,
        reference_points,
        input_flatten,
        input_spatial_shapes,
        input_level_start_index,
        input_padding_mask=None,
    ):
        batch, len_q, _ = query.shape
        batch, len_in, _ = input_flatten.shape
        assert int((input_spatial_shapes[:, 0] * input_spatial_shapes[:, 1]).sum()) == len_in
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(batch, len_in, self.n_heads, self.d_model // self.n_heads)
        offsets = self.sampling_offsets(query).view(
            batch, len_q, self.n_heads, self.n_levels, self.n_points, 2
        )
        weights = self.attention_weights(query).view(
            batch, len_q, self.n_heads, self.n_levels * self.n_points
        )
        weights = F.softmax(weights, -1).view(
            batch, len_q, self.n_heads, self.n_levels, self.n_points
        )
        if reference_points.shape[-1] == 2:
            normalizer = torch.stack(
                [input_spatial_shapes[..., 1], input_spatial_shapes[..., 0]], -1
            )
            locations = (
                reference_points[:, :, None, :, None, :]
                + offsets / normalizer[None, None, None, :, None, :]
            )
        elif reference_points.shape[-1] == 4:
            locations = (
                reference_points[:, :, None, :, None, :2]
                + offsets / self.n_points * reference_points[:, :, None, :, None, 2:] * 0.5
            )
        else:
            raise ValueError("reference_points must end in 2 or 4")
        if self.use_function:
            output = MSDeformAttnFunction.apply(
                value,
                input_spatial_shapes,
                input_level_start_index,
                locations,
                weights,
                self.im2col_step,
            )
        else:
            output = ms_deform_attn_core_pytorch(value, input_spatial_shapes, locations, weights)
        return self.output_proj(output)

"""Small Deformable-DETR-like models around the multi-scale deformable attention stand-ins of
``msda_official_like.py`` (Deformable-DETR's ``MSDeformAttn`` and its functions) and
``msda_mmcv_like.py`` (mmcv's ``MultiScaleDeformableAttention``), for the attention capture tests.

:class:`TinyDeformableDETR` follows Deformable DETR's data flow: a conv backbone (a 3x3 stride-2
stem *without* padding, then 3x3 stride-2 padding-1 stages) gives two levels (strides 4 and 8),
an extra 3x3 stride-2 padding-1 conv on the last backbone map a third (stride 16); each level is
projected (1x1 conv + GroupNorm), flattened with ``.flatten(2).transpose(1, 2)`` and
concatenated; an encoder layer runs self-attention (queries = the value tokens, reference points
= the token centres ``((j + 0.5) / W, (i + 0.5) / H)``), a decoder layer cross-attention from
``num_queries`` learned queries whose reference points are ``sigmoid(Linear(query_pos))``
(2-d centres, or 4-d boxes with ``box_refs``).

:class:`SamplerModel` calls the core from a module that is not an attention module.
"""

from __future__ import annotations

from typing import List, Tuple

import torch
from msda_mmcv_like import MultiScaleDeformableAttention
from msda_official_functions import ms_deform_attn_core_pytorch
from msda_official_like import MSDeformAttn
from torch import nn

__all__ = [
    "STYLES",
    "make_attention",
    "MultiLevelFeatures",
    "TinyDeformableDETR",
    "LevelSampler",
    "SamplerHead",
    "SamplerModel",
]

#: How the attention module is built and which core route it takes.
STYLES = ("official-function", "official-pure", "mmcv-pure", "mmcv-function")


def make_attention(
    style: str, d_model: int, levels: int, heads: int, points: int, batch_first: bool = True
) -> nn.Module:
    if style.startswith("official"):
        return MSDeformAttn(d_model, levels, heads, points, use_function=style.endswith("function"))
    return MultiScaleDeformableAttention(
        d_model,
        heads,
        levels,
        points,
        dropout=0.0,
        batch_first=batch_first,
        use_function=style.endswith("function"),
    )


def _call_attention(
    attn: nn.Module,
    query: torch.Tensor,
    query_pos: torch.Tensor,
    value: torch.Tensor,
    reference_points: torch.Tensor,
    shapes: torch.Tensor,
    starts: torch.Tensor,
) -> torch.Tensor:
    """``query + attention`` for batch-first ``[B, Q, C]`` tensors, in the module's own convention:
    Deformable DETR's positional call, mmcv's keyword call (``batch_first``) or mmdet 2.x's
    sequence-first call with positional arguments."""
    if isinstance(attn, MSDeformAttn):
        return query + attn(query + query_pos, reference_points, value, shapes, starts, None)
    if attn.batch_first:
        return attn(
            query,
            value=value,
            query_pos=query_pos,
            reference_points=reference_points,
            spatial_shapes=shapes,
            level_start_index=starts,
        )
    out = attn(
        query.transpose(0, 1),
        None,
        value.transpose(0, 1),
        None,
        query_pos.transpose(0, 1),
        None,
        reference_points,
        shapes,
        starts,
    )
    return out.transpose(0, 1)


class MultiLevelFeatures(nn.Module):
    """Backbone + input projections: three ``[B, d_model, H_l, W_l]`` maps. Frames (model-input
    pixels): stem 3x3 s2 p0 -> stride 2, offset 1.5; each 3x3 s2 p1 conv keeps the offset and
    doubles the stride: levels at strides 4, 8, 16, all with offset 1.5."""

    def __init__(self, d_model: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=0), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.stage3 = nn.Sequential(nn.Conv2d(16, 24, 3, stride=2, padding=1), nn.ReLU())
        self.input_proj = nn.ModuleList(
            [
                nn.Sequential(nn.Conv2d(16, d_model, 1), nn.GroupNorm(4, d_model)),
                nn.Sequential(nn.Conv2d(24, d_model, 1), nn.GroupNorm(4, d_model)),
                nn.Sequential(
                    nn.Conv2d(24, d_model, 3, stride=2, padding=1), nn.GroupNorm(4, d_model)
                ),
            ]
        )

    def forward(self, images: torch.Tensor) -> List[torch.Tensor]:
        c2 = self.stage2(self.stem(images))
        c3 = self.stage3(c2)
        return [self.input_proj[0](c2), self.input_proj[1](c3), self.input_proj[2](c3)]


def _flatten_levels(
    maps: List[torch.Tensor], level_embed: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Deformable DETR's flattening: tokens ``[B, S, C]``, their level embeddings, the spatial
    shapes ``[L, 2]`` and the level start indices ``[L]``."""
    tokens, pos, shapes = [], [], []
    for level, feature in enumerate(maps):
        shapes.append(tuple(feature.shape[-2:]))
        flat = feature.flatten(2).transpose(1, 2)
        tokens.append(flat)
        pos.append(level_embed[level].view(1, 1, -1).expand_as(flat))
    spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=maps[0].device)
    starts = torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))
    return torch.cat(tokens, 1), torch.cat(pos, 1), spatial_shapes, starts


def encoder_reference_points(spatial_shapes: torch.Tensor, batch: int) -> torch.Tensor:
    """Deformable DETR's encoder references (no padding: valid ratios 1): token (i, j) of every
    level at ``((j + 0.5) / W, (i + 0.5) / H)``, repeated for every level: ``[B, S, L, 2]``."""
    refs = []
    for h, w in spatial_shapes.tolist():
        ref_y, ref_x = torch.meshgrid(
            torch.linspace(0.5, h - 0.5, h), torch.linspace(0.5, w - 0.5, w), indexing="ij"
        )
        refs.append(torch.stack((ref_x.reshape(-1) / w, ref_y.reshape(-1) / h), -1))
    ref = torch.cat(refs, 0)[None, :, None].expand(batch, -1, len(spatial_shapes), -1)
    return ref.contiguous()


class EncoderLayer(nn.Module):
    def __init__(self, attn: nn.Module, d_model: int) -> None:
        super().__init__()
        self.self_attn = attn
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, 2 * d_model)
        self.linear2 = nn.Linear(2 * d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, reference_points, shapes, starts):
        src = self.norm1(
            _call_attention(self.self_attn, src, pos, src, reference_points, shapes, starts)
        )
        return self.norm2(src + self.linear2(torch.relu(self.linear1(src))))


class DecoderLayer(nn.Module):
    def __init__(self, attn: nn.Module, d_model: int, heads: int) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, heads, batch_first=True)
        self.norm1 = nn.LayerNorm(d_model)
        self.cross_attn = attn
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, tgt, query_pos, reference_points, memory, shapes, starts):
        q = tgt + query_pos
        tgt = self.norm1(tgt + self.self_attn(q, q, tgt, need_weights=False)[0])
        out = _call_attention(
            self.cross_attn, tgt, query_pos, memory, reference_points, shapes, starts
        )
        return self.norm2(out)


class Encoder(nn.Module):
    def __init__(self, layer: EncoderLayer, repeats: int = 1) -> None:
        super().__init__()
        self.layers = nn.ModuleList([layer])
        self.repeats = repeats  # > 1: the same layer called again (its attention: ``#2``, ...)

    def forward(self, src, pos, shapes, starts):
        reference_points = encoder_reference_points(shapes, src.shape[0])
        for layer in self.layers:
            for _ in range(self.repeats):
                src = layer(src, pos, reference_points, shapes, starts)
        return src


class Decoder(nn.Module):
    def __init__(self, layer: DecoderLayer) -> None:
        super().__init__()
        self.layers = nn.ModuleList([layer])

    def forward(self, tgt, query_pos, reference_points, memory, shapes, starts):
        # Deformable DETR: references times the valid ratios (all 1 here), one per level.
        levels = int(shapes.shape[0])
        ref_input = reference_points[:, :, None].expand(-1, -1, levels, -1)
        for layer in self.layers:
            tgt = layer(tgt, query_pos, ref_input, memory, shapes, starts)
        return tgt


class TinyDeformableDETR(nn.Module):
    """Input ``[B, 3, 66, 98]`` gives levels ``(16, 24), (8, 12), (4, 6)`` (504 tokens).
    Returns ``(decoder output [B, num_queries, C], memory [B, 504, C], reference points
    [B, num_queries, 2 | 4])``."""

    def __init__(
        self,
        style: str = "official-function",
        batch_first: bool = True,
        box_refs: bool = False,
        encoder_repeats: int = 1,
        num_queries: int = 5,
        d_model: int = 16,
        heads: int = 2,
        points: int = 2,
        seed: int = 0,
    ) -> None:
        super().__init__()
        torch.manual_seed(seed)
        levels = 3
        self.features = MultiLevelFeatures(d_model)
        self.level_embed = nn.Parameter(torch.randn(levels, d_model) * 0.1)
        encoder_attn = make_attention(style, d_model, levels, heads, points, batch_first)
        decoder_attn = make_attention(style, d_model, levels, heads, points, batch_first)
        self.encoder = Encoder(EncoderLayer(encoder_attn, d_model), encoder_repeats)
        self.decoder = Decoder(DecoderLayer(decoder_attn, d_model, heads))
        self.query_embed = nn.Embedding(num_queries, 2 * d_model)
        self.reference_points = nn.Linear(d_model, 4 if box_refs else 2)

    def forward(self, images: torch.Tensor):
        src, pos, shapes, starts = _flatten_levels(self.features(images), self.level_embed)
        memory = self.encoder(src, pos, shapes, starts)
        batch = images.shape[0]
        query_pos, tgt = self.query_embed.weight.chunk(2, dim=1)
        query_pos = query_pos[None].expand(batch, -1, -1)
        tgt = tgt[None].expand(batch, -1, -1)
        reference_points = self.reference_points(query_pos).sigmoid()
        hs = self.decoder(tgt, query_pos, reference_points, memory, shapes, starts)
        return hs, memory, reference_points


class LevelSampler(nn.Module):
    """Not an attention module: calls the core itself (by its name in this module's globals)."""

    def forward(self, value, shapes, locations, weights):
        return ms_deform_attn_core_pytorch(value, shapes, locations, weights)


class SamplerHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.sampler = LevelSampler()

    def forward(self, value, shapes, locations, weights):
        return self.sampler(value, shapes, locations, weights) * 2.0


class SamplerModel(nn.Module):
    """The backbone's three levels sampled at fixed ``locations`` ``[Q, heads, 3, points, 2]``
    with uniform weights by :class:`LevelSampler` (inside ``head``)."""

    def __init__(self, locations: torch.Tensor, d_model: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = MultiLevelFeatures(d_model)
        self.register_buffer("locations", locations.clone())
        self.head = SamplerHead()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        maps = self.features(images)
        src, _, shapes, _ = _flatten_levels(maps, torch.zeros(len(maps), maps[0].shape[1]))
        queries, heads, levels, points, _ = self.locations.shape
        batch, tokens, channels = src.shape
        value = src.view(batch, tokens, heads, channels // heads)
        locations = self.locations[None].expand(batch, -1, -1, -1, -1, -1)
        weights = torch.full((batch, queries, heads, levels, points), 1.0 / (levels * points))
        return self.head(value, shapes, locations, weights)

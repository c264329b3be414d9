"""The attention sample: a small Deformable-DETR-style detector whose trained weights ship with
dcn-inspect, so the ``attention`` command (multi-scale deformable attention, Deformable DETR's
Fig. 6) has a network that learned. Registered as ``dcn-attn-sample``.

The design of Zhu et al. 2021 (Deformable DETR) at toy size:

* backbone: the ``dcn-sample`` backbone (:mod:`dcn_inspect.models.demo_net`: stem, ``layer1``
  .. ``layer4`` with its three deformable 3x3 convs), stride 8, 96 channels; the recipe starts
  it from the shipped ``dcn_sample.pt`` and keeps it frozen;
* three feature levels: the stride-8 map and two extra 3x3 stride-2 convs (strides 16, 32),
  each brought to ``d_model`` channels by a 1x1 projection + GroupNorm; a sine position
  embedding plus a learned level embedding;
* an encoder of :class:`MSDeformAttn` layers whose queries are the tokens of every level
  (reference points: the token centres ``((j + 0.5) / W, (i + 0.5) / H)``);
* a decoder of ``num_queries`` learned object queries (self-attention, then
  :class:`MSDeformAttn` into the encoder's memory around a reference box), with iterative box
  refinement: the first reference boxes are a linear map + sigmoid of the query embedding,
  each layer's box head refines the box of the layer before (Deformable DETR §4);
* per-layer heads: sigmoid class logits (5 shape classes, focal loss in training, no
  background class) and boxes (cx, cy, w, h), normalised to the image.

:class:`MSDeformAttn` has the official calling convention and ends in the module-level
:func:`ms_deform_attn_core_pytorch` (``grid_sample``, ``align_corners=False``, zero padding),
which is where ``dcn_inspect.capture.attention_calls`` records every call.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from dcn_inspect.models.demo_net import (
    CLASS_NAMES,
    BasicBlock,
    Bottleneck,
    _conv_bn,
    _weights,
)
from dcn_inspect.models.registry import Preprocess, register

#: Environment variable overriding the path of the ``dcn-attn-sample`` weights.
WEIGHTS_ENV = "DCN_INSPECT_ATTN_SAMPLE_WEIGHTS"
#: Prefixes of the ``dcn-sample`` state dict that make up the backbone.
BACKBONE_PREFIXES = ("stem.", "layer1.", "layer2.", "layer3.", "layer4.")


# --------------------------------------------------------------------------------------------
# The core and the attention module
# --------------------------------------------------------------------------------------------


def ms_deform_attn_core_pytorch(
    value: torch.Tensor,
    value_spatial_shapes: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention, in plain PyTorch.

    ``value`` [N, S, M, D] (the tokens of all levels, M heads of D channels),
    ``value_spatial_shapes`` [L, 2] (H_l, W_l), ``sampling_locations`` [N, Lq, M, L, P, 2]
    (normalised (x, y) in each level's map: 0 and 1 are the map's outer edges),
    ``attention_weights`` [N, Lq, M, L, P]. Each level is sampled bilinearly with
    ``grid_sample(align_corners=False)`` and zero padding; returns [N, Lq, M * D].
    """
    batch, _, heads, channels = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    shapes = [(int(h), int(w)) for h, w in value_spatial_shapes.tolist()]
    value_list = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * sampling_locations - 1
    sampled = []
    for level, (height, width) in enumerate(shapes):
        # [N, H*W, M, D] -> [N*M, D, H, W]
        value_l = value_list[level].flatten(2).transpose(1, 2)
        value_l = value_l.reshape(batch * heads, channels, height, width)
        # [N, Lq, M, P, 2] -> [N*M, Lq, P, 2]
        grid_l = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled.append(
            F.grid_sample(
                value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False
            )
        )  # [N*M, D, Lq, P]
    weights = attention_weights.transpose(1, 2).reshape(batch * heads, 1, queries, levels * points)
    output = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)
    return output.view(batch, heads * channels, queries).transpose(1, 2).contiguous()


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention (Deformable DETR, Eq. 3), official layout.

    ``forward(query, reference_points, input_flatten, input_spatial_shapes,
    input_level_start_index, input_padding_mask=None)``: ``query`` [N, Lq, C],
    ``reference_points`` [N, Lq, L, 2] (normalised points; location = point + offset /
    (W_l, H_l)) or [N, Lq, L, 4] (boxes; location = centre + offset / n_points * size / 2),
    ``input_flatten`` [N, sum(H_l * W_l), C]; returns [N, Lq, C].
    """

    def __init__(
        self, d_model: int = 64, n_levels: int = 3, n_heads: int = 4, n_points: int = 4
    ) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} must be divisible by n_heads {n_heads}")
        self.d_model = int(d_model)
        self.n_levels = int(n_levels)
        self.n_heads = int(n_heads)
        self.n_points = int(n_points)
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The paper's initialisation: zero offset weights, offset biases on a ring of
        ``n_heads`` directions (point k at k + 1 cells), uniform attention weights."""
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        directions = torch.stack([thetas.cos(), thetas.sin()], -1)
        directions = directions / directions.abs().max(-1, keepdim=True)[0]
        grid = directions.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        scale = torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_((grid * scale).reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        input_flatten: torch.Tensor,
        input_spatial_shapes: torch.Tensor,
        input_level_start_index: torch.Tensor,
        input_padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        batch, queries, _ = query.shape
        _, tokens, _ = input_flatten.shape
        heads, levels, points = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(batch, tokens, heads, self.d_model // heads)
        offsets = self.sampling_offsets(query).view(batch, queries, heads, levels, points, 2)
        weights = self.attention_weights(query).view(batch, queries, heads, levels * points)
        weights = F.softmax(weights, -1).view(batch, queries, heads, levels, points)
        if reference_points.shape[-1] == 2:
            normaliser = torch.stack(
                [input_spatial_shapes[..., 1], input_spatial_shapes[..., 0]], -1
            )
            locations = (
                reference_points[:, :, None, :, None, :]
                + offsets / normaliser[None, None, None, :, None, :]
            )
        elif reference_points.shape[-1] == 4:
            locations = (
                reference_points[:, :, None, :, None, :2]
                + offsets / points * reference_points[:, :, None, :, None, 2:] * 0.5
            )
        else:
            raise ValueError(
                f"reference_points must end in 2 or 4, got {reference_points.shape[-1]}"
            )
        output = ms_deform_attn_core_pytorch(value, input_spatial_shapes, locations, weights)
        return self.output_proj(output)


# --------------------------------------------------------------------------------------------
# Encoder and decoder layers
# --------------------------------------------------------------------------------------------


class FeedForward(nn.Module):
    """Linear -> ReLU -> Linear, residual, LayerNorm (post-norm, as the paper)."""

    def __init__(self, d_model: int, d_ffn: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.linear2(F.relu(self.linear1(x))))


class EncoderLayer(nn.Module):
    """Deformable self-attention over the tokens of all levels, then the feed-forward."""

    def __init__(self, d_model: int, d_ffn: int, levels: int, heads: int, points: int) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, levels, heads, points)
        self.norm1 = nn.LayerNorm(d_model)
        self.ffn = FeedForward(d_model, d_ffn)

    def forward(
        self,
        src: torch.Tensor,
        pos: torch.Tensor,
        reference_points: torch.Tensor,
        shapes: torch.Tensor,
        level_start: torch.Tensor,
    ) -> torch.Tensor:
        attended = self.self_attn(src + pos, reference_points, src, shapes, level_start)
        return self.ffn(self.norm1(src + attended))


class DecoderLayer(nn.Module):
    """Self-attention among the object queries, deformable cross-attention into the encoder's
    memory around each query's reference box, then the feed-forward."""

    def __init__(self, d_model: int, d_ffn: int, levels: int, heads: int, points: int) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, heads, batch_first=True)
        self.norm1 = nn.LayerNorm(d_model)
        self.cross_attn = MSDeformAttn(d_model, levels, heads, points)
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn = FeedForward(d_model, d_ffn)

    def forward(
        self,
        tgt: torch.Tensor,
        query_pos: torch.Tensor,
        reference_points: torch.Tensor,
        memory: torch.Tensor,
        shapes: torch.Tensor,
        level_start: torch.Tensor,
    ) -> torch.Tensor:
        q = k = tgt + query_pos
        attended = self.self_attn(q, k, tgt, need_weights=False)[0]
        tgt = self.norm1(tgt + attended)
        attended = self.cross_attn(tgt + query_pos, reference_points, memory, shapes, level_start)
        return self.ffn(self.norm2(tgt + attended))


class MLP(nn.Module):
    """A few Linear layers with ReLU between them (the box head)."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int, layers: int) -> None:
        super().__init__()
        dims = [d_in] + [d_hidden] * (layers - 1) + [d_out]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, layer in enumerate(self.layers):
            x = layer(x) if index == len(self.layers) - 1 else F.relu(layer(x))
        return x


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def sine_position_embedding(
    height: int, width: int, d_model: int, device: torch.device, temperature: float = 10000.0
) -> torch.Tensor:
    """DETR's sine embedding of the cell centres ``(i + 0.5) / H * 2 pi``: [H * W, d_model]
    (first half y, second half x)."""
    feats = d_model // 2
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height * 2 * math.pi
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width * 2 * math.pi
    dim_t = torch.arange(feats, device=device, dtype=torch.float32)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / feats)
    pos_y = ys[:, None] / dim_t  # [H, F]
    pos_x = xs[:, None] / dim_t  # [W, F]
    pos_y = torch.stack([pos_y[:, 0::2].sin(), pos_y[:, 1::2].cos()], -1).flatten(1)
    pos_x = torch.stack([pos_x[:, 0::2].sin(), pos_x[:, 1::2].cos()], -1).flatten(1)
    grid = torch.cat(
        [pos_y[:, None, :].expand(height, width, feats), pos_x[None].expand(height, width, feats)],
        -1,
    )
    return grid.reshape(height * width, 2 * feats)


def token_centres(shapes: Sequence[Tuple[int, int]], device: torch.device) -> torch.Tensor:
    """Normalised centres ``((j + 0.5) / W, (i + 0.5) / H)`` of the tokens of every level,
    concatenated: [sum(H * W), 2]."""
    centres = []
    for height, width in shapes:
        ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
        xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        centres.append(torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], -1))
    return torch.cat(centres, 0)


class Backbone(nn.Module):
    """The ``dcn-sample`` backbone (stem, ``layer1`` .. ``layer4``; state-dict keys as in
    :class:`~dcn_inspect.models.demo_net.DemoNet`): images -> [B, 96, H/8, W/8]."""

    def __init__(
        self, widths: Sequence[int] = (16, 24, 48, 64, 96), deformable: bool = True
    ) -> None:
        super().__init__()
        w0, w1, w2, w3, w4 = widths
        self.out_channels = int(w4)
        self.stem = nn.Sequential(_conv_bn(3, w0, stride=2), _conv_bn(w0, w1, stride=2))
        self.layer1 = BasicBlock(w1, w1)
        self.layer2 = BasicBlock(w1, w2, stride=2)
        self.layer3 = BasicBlock(w2, w3)
        mid = w4 // 2
        self.layer4 = nn.Sequential(
            Bottleneck(w3, mid, w4, deformable),
            Bottleneck(w4, mid, w4, deformable),
            Bottleneck(w4, mid, w4, deformable),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.stem(images)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


# --------------------------------------------------------------------------------------------
# The detector
# --------------------------------------------------------------------------------------------


class AttnDetNet(nn.Module):
    """Deformable-DETR-style detector on the ``dcn-sample`` backbone (see the module docstring).

    ``forward(images)``: images [B, 3, H, W] (multiples of 32 are best). Returns
    ``{"pred_logits": [B, Q, C], "pred_boxes": [B, Q, 4]}`` (sigmoid logits; boxes (cx, cy, w,
    h) normalised to the image) from the last decoder layer; in training mode also
    ``"aux_outputs"``, the same pair from every earlier decoder layer.
    """

    def __init__(
        self,
        num_classes: int = len(CLASS_NAMES),
        widths: Sequence[int] = (16, 24, 48, 64, 96),
        deformable: bool = True,
        d_model: int = 64,
        d_ffn: int = 192,
        n_heads: int = 4,
        n_points: int = 4,
        enc_layers: int = 2,
        dec_layers: int = 3,
        num_queries: int = 24,
    ) -> None:
        super().__init__()
        self.num_classes = int(num_classes)
        #: Class index -> name (what `attention` and `receptive-field` label queries with).
        self.class_names = tuple(CLASS_NAMES[: self.num_classes])
        self.num_queries = int(num_queries)
        self.d_model = int(d_model)
        self.n_levels = 3
        self.backbone = Backbone(widths, deformable)
        channels = self.backbone.out_channels
        self.extra_convs = nn.ModuleList(
            [
                nn.Conv2d(channels, d_model, 3, stride=2, padding=1),
                nn.Conv2d(d_model, d_model, 3, stride=2, padding=1),
            ]
        )
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, d_model, 1), nn.GroupNorm(8, d_model))
            for c in (channels, d_model, d_model)
        )
        self.level_embed = nn.Parameter(torch.zeros(self.n_levels, d_model))
        args = (d_model, d_ffn, self.n_levels, n_heads, n_points)
        self.encoder = nn.ModuleList(EncoderLayer(*args) for _ in range(enc_layers))
        self.decoder = nn.ModuleList(DecoderLayer(*args) for _ in range(dec_layers))
        self.query_embed = nn.Embedding(num_queries, 2 * d_model)
        self.reference_points = nn.Linear(d_model, 4)
        self.class_embed = nn.ModuleList(nn.Linear(d_model, num_classes) for _ in range(dec_layers))
        self.bbox_embed = nn.ModuleList(MLP(d_model, d_model, 4, 3) for _ in range(dec_layers))
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """Focal-loss prior on the class biases (p = 0.01), zero last box layers (a layer's box
        starts as its reference box), reference boxes of about 0.2 image sides."""
        nn.init.normal_(self.level_embed)
        prior = -math.log((1 - 0.01) / 0.01)
        for head in self.class_embed:
            nn.init.constant_(head.bias, prior)
        for head in self.bbox_embed:
            nn.init.zeros_(head.layers[-1].weight)
            nn.init.zeros_(head.layers[-1].bias)
        nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
        with torch.no_grad():
            self.reference_points.bias.copy_(torch.tensor([0.0, 0.0, -1.5, -1.5]))

    def levels(self, feature: torch.Tensor) -> List[torch.Tensor]:
        """The three projected feature maps (strides 8, 16, 32), [B, d_model, H_l, W_l], from
        the backbone's map [B, 96, H/8, W/8]."""
        extra1 = F.relu(self.extra_convs[0](feature))
        extra2 = F.relu(self.extra_convs[1](extra1))
        return [proj(x) for proj, x in zip(self.input_proj, (feature, extra1, extra2))]

    def encode(
        self, maps: Sequence[torch.Tensor]
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the encoder: (memory [B, S, d], spatial shapes [L, 2], level start index [L])."""
        batch = maps[0].shape[0]
        device = maps[0].device
        shapes_list = [(int(m.shape[2]), int(m.shape[3])) for m in maps]
        src = torch.cat([m.flatten(2).transpose(1, 2) for m in maps], 1)
        pos = torch.cat(
            [
                sine_position_embedding(h, w, self.d_model, device) + self.level_embed[level]
                for level, (h, w) in enumerate(shapes_list)
            ],
            0,
        )[None].expand(batch, -1, -1)
        shapes = torch.as_tensor(shapes_list, dtype=torch.long, device=device)
        sizes = shapes.prod(1)
        level_start = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
        reference = token_centres(shapes_list, device)
        reference = reference[None, :, None, :].expand(batch, -1, self.n_levels, -1)
        for layer in self.encoder:
            src = layer(src, pos, reference, shapes, level_start)
        return src, shapes, level_start

    def decode(
        self, memory: torch.Tensor, shapes: torch.Tensor, level_start: torch.Tensor
    ) -> List[Dict[str, torch.Tensor]]:
        """Run the decoder with iterative box refinement: one output dict per layer."""
        batch = memory.shape[0]
        query_pos, tgt = self.query_embed.weight.split(self.d_model, dim=1)
        query_pos = query_pos[None].expand(batch, -1, -1)
        tgt = tgt[None].expand(batch, -1, -1)
        reference = self.reference_points(query_pos).sigmoid()  # [B, Q, 4]
        outputs = []
        for index, layer in enumerate(self.decoder):
            level_reference = reference[:, :, None, :].expand(-1, -1, self.n_levels, -1)
            tgt = layer(tgt, query_pos, level_reference, memory, shapes, level_start)
            boxes = (self.bbox_embed[index](tgt) + inverse_sigmoid(reference)).sigmoid()
            outputs.append({"pred_logits": self.class_embed[index](tgt), "pred_boxes": boxes})
            reference = boxes.detach()
        return outputs

    def forward(self, images: torch.Tensor) -> Dict[str, object]:
        return self.detect(self.backbone(images))

    def detect(self, feature: torch.Tensor) -> Dict[str, object]:
        """Everything after the backbone: its map [B, 96, H/8, W/8] -> the output dict (the
        recipe trains from cached maps of the frozen backbone)."""
        memory, shapes, level_start = self.encode(self.levels(feature))
        outputs = self.decode(memory, shapes, level_start)
        result: Dict[str, object] = dict(outputs[-1])
        if self.training:
            result["aux_outputs"] = outputs[:-1]
        return result


_CONFIG = {
    "num_classes": len(CLASS_NAMES),
    "widths": [16, 24, 48, 64, 96],
    "d_model": 64,
    "d_ffn": 192,
    "n_heads": 4,
    "n_points": 4,
    "enc_layers": 2,
    "dec_layers": 3,
    "num_queries": 24,
}


@register(
    "dcn-attn-sample",
    "Deformable-DETR-style detector trained on synthetic shape scenes: the dcn-sample backbone "
    "(stride 8, frozen), 3 levels (strides 8, 16, 32), 2 encoder + 3 decoder layers of "
    "multi-scale deformable attention (MSDeformAttn: 4 heads, 4 points), 24 object queries, "
    "iterative box refinement.",
    default_config=_CONFIG,
    preprocess=Preprocess(resize=0),
    bundled_weights=_weights("dcn_attn_sample.pt", WEIGHTS_ENV),
)
def build_attention_sample(**config: object) -> AttnDetNet:
    return AttnDetNet(deformable=True, **config)  # type: ignore[arg-type]

"""The structure of a converted ResNet backbone, read from its weights' shapes.

Depth from the block count per stage (:data:`~dcn_inspect.models.resnet.BLOCKS_PER_STAGE`),
width from the stem, ResNeXt groups and width per group from ``layer1.0.conv2`` ([width,
width / groups, 3, 3]), deformable stages from which stages hold ``conv2.conv_offset``, and
v1/v2 with the offset groups from the offset branch's output channels: ``2 * groups * kh *
kw`` for DCNv1 (offsets only), ``3 * groups * kh * kw`` for DCNv2 (offsets and mask). A count
that fits both readings (108 = 2 x 9 x 6 = 3 x 9 x 4) is resolved by :func:`_offset_kind`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from dcn_inspect.core.errors import InputError
from dcn_inspect.models.importers.state_dicts import ConvertedWeights
from dcn_inspect.models.resnet import BLOCKS_PER_STAGE


def infer_resnet_config(
    converted: ConvertedWeights,
    path: Path,
    modulated_hint: Optional[bool] = None,
    groups_hint: Optional[int] = None,
) -> Dict[str, Any]:
    """Depth, width, ResNeXt groups, deformable stages, v1/v2 and offset groups of a converted
    ResNet backbone."""
    weights = converted.backbone
    stem = weights.get("conv1.weight")
    if stem is None or stem.dim() != 4:
        raise InputError(
            f"{path}: no ResNet stem among the backbone keys "
            "(expected conv1.weight / stem.conv1.weight)"
        )
    blocks = []
    for stage in range(1, 5):
        indices = {
            int(m.group(1)) for k in weights if (m := re.match(rf"^layer{stage}\.(\d+)\.", k))
        }
        blocks.append(len(indices))
    depth = next((d for d, counts in BLOCKS_PER_STAGE.items() if tuple(blocks) == counts), None)
    if depth is None:
        supported = ", ".join(f"ResNet-{d} {list(c)}" for d, c in BLOCKS_PER_STAGE.items())
        raise InputError(f"{path}: backbone has {blocks} blocks per stage; supported: {supported}")
    base_channels = int(stem.shape[0])
    config: Dict[str, Any] = {"depth": depth, "base_channels": base_channels}
    config.update(_resnext_widths(weights, base_channels, path))
    offsets = {k: v for k, v in weights.items() if k.endswith("conv2.conv_offset.weight")}
    dcn_stages = [any(k.startswith(f"layer{s}.") for k in offsets) for s in range(1, 5)]
    modulated, offset_groups = False, 1
    if offsets:
        shapes = {tuple(v.shape[:1]) + tuple(v.shape[2:]) for v in offsets.values()}
        if len(shapes) > 1:
            raise InputError(
                f"{path}: offset branches of different sizes {sorted(shapes)}; "
                "one v1/v2 setting per model is supported"
            )
        channels, kh, kw = next(iter(shapes))
        widths = sorted(
            {int(v.shape[1]) for v in offsets.values()}
        )  # input channels = the deformable convs' width
        modulated, offset_groups = _offset_kind(
            channels, kh * kw, modulated_hint, path, widths, groups_hint
        )
    config.update(dcn_stages=dcn_stages, modulated=modulated, offset_groups=offset_groups)
    return config


def _resnext_widths(
    weights: Dict[str, torch.Tensor], base_channels: int, path: Path
) -> Dict[str, Any]:
    """``groups`` and ``width_per_group`` of a ResNeXt (nothing for a plain ResNet), from the
    3x3 convs."""
    conv2 = weights.get("layer1.0.conv2.weight")
    if conv2 is None or conv2.dim() != 4:
        return {}
    width = int(conv2.shape[0])
    groups = max(1, width // max(1, int(conv2.shape[1])))
    if groups == 1 and width == base_channels:
        return {}
    if width % groups:
        raise InputError(
            f"{path}: layer1.0.conv2 has {width} channels, not a multiple of its {groups} groups"
        )
    return {"groups": groups, "width_per_group": width // groups}


def _offset_kind(
    channels: int,
    kernel_points: int,
    hint: Optional[bool],
    path: Path,
    widths: Optional[List[int]] = None,
    groups_hint: Optional[int] = None,
) -> Tuple[bool, int]:
    """(modulated, offset groups) from an offset branch's output channels (2N or 3N per group).

    When both readings fit: the config's ``type`` / ``deform_groups`` (``hint``, ``groups_hint``)
    decide; else the reading whose group count divides every deformable conv's width
    (``widths``); else (both or neither divide) DCNv2.
    """
    v1 = channels % (2 * kernel_points) == 0
    v2 = channels % (3 * kernel_points) == 0
    if not v1 and not v2:
        raise InputError(
            f"{path}: offset branch has {channels} channels, "
            f"not 2 or 3 x {kernel_points} per offset group"
        )
    groups_v1, groups_v2 = channels // (2 * kernel_points), channels // (3 * kernel_points)
    if v1 != v2:
        modulated = v2
    elif hint is not None:
        modulated = hint
    elif (
        groups_hint is not None and groups_hint in (groups_v1, groups_v2) and groups_v1 != groups_v2
    ):
        modulated = groups_hint == groups_v2
    else:
        fits_v1 = all(w % groups_v1 == 0 for w in widths or [])
        fits_v2 = all(w % groups_v2 == 0 for w in widths or [])
        modulated = fits_v2 or not fits_v1  # the reading that divides the widths; DCNv2 on a tie
    return modulated, groups_v2 if modulated else groups_v1

"""mmdetection (and torchvision) checkpoints: key names and the input convention.

Backbone keys already have torchvision's names, so :func:`convert_mmdetection` only drops the
``backbone.`` prefix and renames the older ``layerN.i.conv2_offset`` to ``conv2.conv_offset``.
What the weights cannot tell comes from the checkpoint's embedded config (``meta.config``)
when there is one, else from mmdetection's defaults: pytorch style (stride on the 3x3 conv,
RGB ImageNet normalisation), caffe style (stride on the 1x1 conv, BGR caffe means) when the
config says ``style='caffe'``; the padding divisor from ``size_divisor`` (32 without one).
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any, Dict, Optional, Tuple

import torch

from dcn_inspect.models.importers.input_convention import (
    CAFFE_MEAN_RGB,
    CAFFE_STD,
    InputConvention,
)
from dcn_inspect.models.importers.state_dicts import (
    ConvertedWeights,
    put_weight,
    strip_module_prefix,
)
from dcn_inspect.models.registry import Preprocess

_TV_BACKBONE_KEY = re.compile(r"^(?:conv1|bn1|layer[1-4])\.")


def convert_mmdetection(state: Dict[str, torch.Tensor]) -> ConvertedWeights:
    """mmdetection / torchvision key names -> ours (strip ``backbone.``, rename
    ``conv2_offset``)."""

    keys = {k: strip_module_prefix(k) for k in state}
    prefixed = any(k.startswith("backbone.") for k in keys.values())
    converted = ConvertedWeights(
        "mmdetection" if prefixed else "state-dict", {}, {}, [], extras=dict(state)
    )
    for original, key in keys.items():
        if prefixed:
            if not key.startswith("backbone."):
                converted.ignored.append(original)
                continue
            key = key[len("backbone.") :]
        elif not _TV_BACKBONE_KEY.match(key):
            converted.ignored.append(original)  # e.g. torchvision's classifier "fc."
            continue
        key = re.sub(r"^(layer[1-4]\.\d+)\.conv2_offset\.", r"\1.conv2.conv_offset.", key)
        put_weight(converted, key, original, state[original])
    return converted


def mmdet_config_text(meta: Dict[str, Any]) -> str:
    """The config mmdetection embeds in a checkpoint's ``meta`` (``""`` without one)."""
    for key in ("config", "cfg"):
        if isinstance(meta.get(key), str):
            return meta[key]
    return ""


def mmdet_dcn_hints(config_text: str) -> Tuple[Optional[bool], Optional[int]]:
    """(modulated, deform_groups) from an embedded mmdetection config's ``dcn=dict(...)``, or
    Nones."""
    match = re.search(r"dcn\s*=\s*dict\(([^)]*)\)", config_text)
    if match is None:
        return None, None
    body = match.group(1)
    kind = re.search(r"type\s*=\s*['\"](\w+)['\"]", body)
    groups = re.search(r"deform(?:able)?_groups\s*=\s*(\d+)", body)
    modulated = (
        None
        if kind is None
        else kind.group(1) in ("DCNv2", "ModulatedDeformConv", "ModulatedDeformConvPack")
    )
    return modulated, int(groups.group(1)) if groups else None


def _mmdet_size_divisor(config_text: str) -> Tuple[int, str]:
    """The padding divisor of an mmdetection config (``Pad(size_divisor=...)``, mmdet 3's
    ``pad_size_divisor``) and where it came from; 32 (mmdetection's default) without one."""
    found = sorted({int(v) for v in re.findall(r"size_divisor\s*=\s*(\d+)", config_text)})
    if len(found) == 1:
        return found[0], "embedded config"
    if len(found) > 1:
        return (
            32,
            f"embedded config has several size divisors {found}; mmdetection's default 32 used",
        )
    return 32, "mmdetection's default (no size divisor in an embedded config)"


def mmdetection_convention(
    converted: ConvertedWeights, config_text: str, preprocess: Preprocess
) -> InputConvention:
    """The input of an mmdetection (or bare torchvision) backbone: ``preprocess`` (the chosen
    architecture's resize) with the style's normalisation and the config's padding divisor."""
    caffe = bool(re.search(r"style\s*=\s*['\"]caffe['\"]", config_text))
    mean, std = (CAFFE_MEAN_RGB, CAFFE_STD) if caffe else (preprocess.mean, preprocess.std)
    divisor, divisor_source = _mmdet_size_divisor(config_text)
    names = (
        "mmdetection's (prefix backbone. dropped)"
        if converted.layout == "mmdetection"
        else "torchvision's"
    )
    return InputConvention(
        bgr=caffe,
        mean=tuple(mean),
        std=tuple(std),
        preprocess=replace(preprocess, mean=tuple(mean), std=tuple(std), size_divisor=divisor),
        size_divisor_source=divisor_source,
        layer_names=names,
        structure={"stride_in_1x1": caffe},
    )

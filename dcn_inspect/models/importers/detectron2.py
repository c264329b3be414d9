"""detectron2 checkpoints: the key renaming table and the input convention.

detectron2 names (``model`` dict, from ``.pth`` or a model-zoo ``.pkl`` of numpy arrays) map
to torchvision's by the rules of :data:`D2_RULES`, one line each: ``stem.conv1`` ->
``conv1``/``bn1``, ``resN.i`` -> ``layer{N-1}.i``, ``convK.norm`` -> ``bnK``, ``shortcut`` ->
``downsample.0/1``, ``conv2_offset`` -> ``conv2.conv_offset``. The bottom-up ResNet is found
under FPN (``backbone.bottom_up.``), C4 (``backbone.`` and ``roi_heads.`` for res5) or bare
prefixes. Once the structure is read, the stages take detectron2's names back
(:func:`rename_stages`: ``layer4.0.conv2`` -> ``res5.0.conv2``) so records speak of ``res5``.

Input: BGR 0-255 minus ``pixel_mean`` (from the checkpoint, else detectron2's defaults),
divided by ``pixel_std``; ``ResizeShortestEdge`` 800/1333 with Pillow bilinear; padding to 32
for FPN models, none for C4 and bare backbones (``size_divisibility``); stride on the 1x1 conv.
"""

from __future__ import annotations

import re
from typing import Dict, List, Tuple

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

#: detectron2's stage names, in order (the model is built with them: records say ``res5.0.conv2``).
D2_STAGES = ("res2", "res3", "res4", "res5")

#: detectron2 key (after its prefix) -> our key; ``{s}`` is the torchvision stage (res2 -> 1).
D2_RULES: List[Tuple[re.Pattern[str], str]] = [
    (re.compile(r"^stem\.conv1\.weight$"), "conv1.weight"),
    (re.compile(r"^stem\.conv1\.norm\.(\w+)$"), "bn1.{0}"),
    (re.compile(r"^res([2-5])\.(\d+)\.conv([123])\.weight$"), "layer{s}.{1}.conv{2}.weight"),
    (re.compile(r"^res([2-5])\.(\d+)\.conv([123])\.norm\.(\w+)$"), "layer{s}.{1}.bn{2}.{3}"),
    (re.compile(r"^res([2-5])\.(\d+)\.shortcut\.weight$"), "layer{s}.{1}.downsample.0.weight"),
    (re.compile(r"^res([2-5])\.(\d+)\.shortcut\.norm\.(\w+)$"), "layer{s}.{1}.downsample.1.{2}"),
    (
        re.compile(r"^res([2-5])\.(\d+)\.conv2_offset\.(weight|bias)$"),
        "layer{s}.{1}.conv2.conv_offset.{2}",
    ),
]
#: Where detectron2 keeps the bottom-up ResNet: FPN models, C4 models (res5 in the RoI head), bare.
D2_PREFIXES = ("backbone.bottom_up.", "backbone.", "roi_heads.", "")


def _renamed(rest: str) -> str:
    """Our name of a backbone key (prefix removed); unchanged (-> "unexpected") without a rule."""
    for pattern, template in D2_RULES:
        match = pattern.match(rest)
        if match:
            groups = match.groups()
            stage = int(groups[0]) - 1 if template.startswith("layer") else 0
            return template.format(*groups, s=stage)
    return rest


def convert_detectron2(state: Dict[str, torch.Tensor]) -> ConvertedWeights:
    """detectron2 key names -> ours; ``meta["prefixes"]`` counts the keys found under each
    prefix of :data:`D2_PREFIXES`."""
    converted = ConvertedWeights("detectron2", {}, {}, [], extras=dict(state))
    for original, value in state.items():
        key = strip_module_prefix(original)
        name = None
        for prefix in D2_PREFIXES:
            if not key.startswith(prefix):
                continue
            rest = key[len(prefix) :]
            if not re.match(r"^(?:res[2-5]\.\d+|stem)\.", rest):
                continue
            name = _renamed(rest)
            converted.meta.setdefault("prefixes", {})
            converted.meta["prefixes"][prefix] = converted.meta["prefixes"].get(prefix, 0) + 1
            break
        if name is None:
            converted.ignored.append(original)
        else:
            put_weight(converted, name, original, value)
    return converted


def rename_stages(converted: ConvertedWeights, stage_names: Tuple[str, ...]) -> None:
    """``layerK.`` keys -> ``stage_names[K-1].`` (the model is built with those stage names)."""

    def rename(key: str) -> str:
        match = re.match(r"^layer([1-4])\.", key)
        return (
            stage_names[int(match.group(1)) - 1] + key[len(match.group(0)) - 1 :] if match else key
        )

    converted.backbone = {rename(k): v for k, v in converted.backbone.items()}
    converted.origin = {rename(k): v for k, v in converted.origin.items()}


def _detectron2_input(
    extras: Dict[str, torch.Tensor],
) -> Tuple[bool, Tuple[float, ...], Tuple[float, ...]]:
    """(weights expect BGR, RGB mean, std) in [0, 1] units for a detectron2 model."""
    mean = extras.get("pixel_mean")
    std = extras.get("pixel_std")
    if mean is None or mean.numel() != 3:
        return True, CAFFE_MEAN_RGB, CAFFE_STD  # detectron2's defaults: BGR, caffe means, std 1
    m = [float(v) for v in mean.flatten()]
    s = (
        [float(v) for v in std.flatten()]
        if std is not None and std.numel() == 3
        else [1.0, 1.0, 1.0]
    )
    bgr = m[0] < m[2]  # the blue mean (~103.5) is the smallest of the ImageNet means
    if bgr:
        m, s = m[::-1], s[::-1]
    return bgr, tuple(v / 255.0 for v in m), tuple(v / 255.0 for v in s)


def _detectron2_size_divisor(converted: ConvertedWeights) -> Tuple[int, str]:
    """detectron2 pads to its backbone's ``size_divisibility``: 32 for FPN, 0 for C4 and bare
    backbones."""
    prefixes = converted.meta.get("prefixes", {})
    if "backbone.bottom_up." in prefixes:
        return 32, "FPN backbone (backbone.bottom_up.*): size_divisibility 32"
    return 0, "no FPN (C4 or bare backbone): size_divisibility 0"


def detectron2_convention(converted: ConvertedWeights) -> InputConvention:
    """The input of a converted detectron2 backbone (see the module docstring)."""
    bgr, mean, std = _detectron2_input(converted.extras)
    divisor, divisor_source = _detectron2_size_divisor(converted)
    preprocess = Preprocess(
        tuple(mean), tuple(std), 800, 1333, "pil-bilinear", "detectron2", divisor
    )  # type: ignore[arg-type]
    names = (
        "detectron2's (res2..res5; prefix "
        + ", ".join(sorted(converted.meta.get("prefixes", {})) or ["none"])
        + " dropped)"
    )
    return InputConvention(
        bgr=bgr,
        mean=tuple(mean),
        std=tuple(std),
        preprocess=preprocess,
        size_divisor_source=divisor_source,
        layer_names=names,
        # detectron2's default MODEL.RESNETS.STRIDE_IN_1X1, and its stage names
        structure={"stride_in_1x1": True, "stage_names": list(D2_STAGES)},
    )

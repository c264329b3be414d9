"""Models dcn-inspect did not write: mmdetection / detectron2 checkpoints and user model files.

:func:`import_checkpoint` turns a foreign checkpoint into one of the built-in deformable ResNets
(:mod:`dcn_inspect.models.resnet`):

* mmdetection (``state_dict``; ``backbone.`` prefix; ``conv2.conv_offset`` or the older
  ``conv2_offset``): the backbone keys already have torchvision's names, so only the prefix goes.
* detectron2 (``model`` dict, from ``.pth`` or a model-zoo ``.pkl`` of numpy arrays):
  ``stem.conv1`` -> ``conv1``/``bn1``, ``resN.i`` -> ``layer{N-1}.i``, ``convK.norm`` -> ``bnK``,
  ``shortcut`` -> ``downsample.0/1``, ``conv2_offset`` -> ``conv2.conv_offset``.

The structure (depth, width, ResNeXt groups and width per group, deformable stages, v1/v2,
offset groups) is read from the weights. An offset branch whose channel count fits both v1 and
v2 (108 = 2 x 9 x 6 = 3 x 9 x 4) is read as the embedded config says (``dcn=dict(type=...,
deform_groups=...)``); without one, as the reading whose group count divides the width of
every deformable conv (108 on 128..512-wide convs: DCNv2 with 4 groups), and as DCNv2 when both
do. Modulated offset branches need no reordering: detectron2 and mmdetection v1 split the
branch's output as [first 2N channels: offsets | last N: mask logits], and mmcv's ``chunk(3)``
+ ``cat`` of the first two chunks is the same split, which
:class:`~dcn_inspect.ops.modules.ModulatedDeformConv2dPack` uses. What the weights cannot tell
-- stride placement and input channel order -- follows each library's defaults (detectron2:
stride on the 1x1 conv, BGR input in 0-255 minus the pixel mean; mmdetection: pytorch style,
RGB ImageNet normalisation, caffe style when its embedded config says so). BGR weights are made
RGB by reversing the input channels of ``conv1``, so every model takes the same RGB input.

Layer names are the checkpoint's: mmdetection's without ``backbone.`` (``layer4.0.conv2``),
detectron2's ``res2..res5`` stages (``res5.0.conv2``; the model is built with those stage
names). Preprocessing is the framework's (:class:`~dcn_inspect.models.registry.Preprocess`):
mmdetection: cv2 bilinear keep-ratio resize to 1333x800 with mmcv's rounding, zero padding to
the config's ``size_divisor`` (32 without one); detectron2: ``ResizeShortestEdge`` 800/1333
(Pillow bilinear, its rounding), padding to 32 for FPN models (``backbone.bottom_up.``), none
for C4 and bare backbones (detectron2's ``size_divisibility``).

Keys outside the backbone (necks, heads: every model-zoo file has them) are ignored quietly:
one line in ``summary.json`` (``import.ignored``), the key table logged at INFO on the
``dcn_inspect`` logger (the CLI prints it with ``--verbose``); missing or unexpected backbone
keys are a one-line error whose ``details`` carry the full :class:`KeyReport`.

:func:`load_user_file` loads ``path/to/file.py:function``: a user function returning an
``nn.Module`` (optionally with ``--weights``). The file may define ``PREPROCESS`` (a dict with
``mean``, ``std``, ``resize``, ``max_size``, ``interpolation``, ``size_rule``, ``size_divisor``)
to describe its input preprocessing.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import re
import sys
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from dcn_inspect.core.errors import InputError
from dcn_inspect.models import registry
from dcn_inspect.models.checkpoint import (
    is_native,
    missing_file_reason,
    read_checkpoint_file,
    sha256_file,
)
from dcn_inspect.models.loaded_model import LoadedModel
from dcn_inspect.models.registry import Preprocess
from dcn_inspect.models.resnet import BLOCKS_PER_STAGE, RESNET_ARCHITECTURES

#: Details for those who ask (the CLI's ``--verbose``): e.g. the key table of a checkpoint.
logger = logging.getLogger("dcn_inspect")

#: detectron2's stage names, in order (the model is built with them: records say ``res5.0.conv2``).
D2_STAGES = ("res2", "res3", "res4", "res5")

#: detectron2's default PIXEL_MEAN (BGR order, 0-255) with PIXEL_STD 1, expressed for our RGB
#: [0, 1] input: the same per-colour means, divided by 255, and std 1/255.
CAFFE_MEAN_RGB = (123.675 / 255.0, 116.28 / 255.0, 103.53 / 255.0)
CAFFE_STD = (1.0 / 255.0, 1.0 / 255.0, 1.0 / 255.0)

_D2_STAGE_KEY = re.compile(r"(?:^|\.)(?:res[2-5]\.\d+|stem\.conv1)\.")
_TV_STAGE_KEY = re.compile(r"(?:^|\.)layer[1-4]\.\d+\.")
_D2_RULES: List[Tuple[re.Pattern[str], str]] = [
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
_D2_PREFIXES = ("backbone.bottom_up.", "backbone.", "roi_heads.", "")
_TV_BACKBONE_KEY = re.compile(r"^(?:conv1|bn1|layer[1-4])\.")


@dataclass
class ConvertedWeights:
    """A foreign checkpoint's weights renamed to our modules' names."""

    layout: str  # "mmdetection", "detectron2" or "state-dict"
    backbone: Dict[str, torch.Tensor]  # our name -> tensor
    origin: Dict[str, str]  # our name -> the key in the checkpoint
    ignored: List[str]  # checkpoint keys outside the backbone (necks, heads, buffers)
    extras: Dict[str, torch.Tensor] = field(default_factory=dict)  # all tensors by checkpoint key
    meta: Dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- state dicts


def extract_state_dict(
    payload: Any, path: Path
) -> Tuple[Dict[str, torch.Tensor], str, Dict[str, Any]]:
    """The weights of a checkpoint payload as tensors: (state, wrapper key, metadata).

    Accepts mmdetection's ``{"state_dict": ..., "meta": ...}``, detectron2's ``{"model": ...}``
    (numpy arrays in ``.pkl`` files), ``{"blobs": ...}`` and bare dicts of tensors.
    """
    if not isinstance(payload, dict):
        raise InputError(f"{path}: expected a checkpoint dict, found {type(payload).__name__}")
    wrapper = ""
    weights: Any = payload
    for key in ("state_dict", "model", "blobs"):
        if isinstance(payload.get(key), dict):
            wrapper, weights = key, payload[key]
            break
    state: Dict[str, torch.Tensor] = {}
    for key, value in weights.items():
        if not isinstance(key, str):
            continue
        if isinstance(value, torch.Tensor):
            state[key] = value
        elif isinstance(value, np.ndarray) and value.dtype.kind in "fiub":
            state[key] = torch.from_numpy(np.ascontiguousarray(value))
    if not state:
        raise InputError(
            f"{path}: no weights found (expected a 'state_dict' or 'model' dict, or a dict of tensors)"
        )
    meta = payload.get("meta") if isinstance(payload.get("meta"), dict) else {}
    return state, wrapper, dict(meta or {})


def _strip_module_prefix(key: str) -> str:
    # DataParallel / DistributedDataParallel wrappers.
    return key[len("module.") :] if key.startswith("module.") else key


def detect_layout(state: Dict[str, torch.Tensor], wrapper: str) -> str:
    """ "detectron2", "mmdetection", "state-dict" (torchvision names, no wrapper) or "unknown"."""
    keys = [_strip_module_prefix(k) for k in state]
    if any(_D2_STAGE_KEY.search(k) for k in keys):
        return "detectron2"
    if any(_TV_STAGE_KEY.search(k) for k in keys):
        if wrapper == "state_dict" or any(k.startswith("backbone.") for k in keys):
            return "mmdetection"
        return "state-dict"
    return "unknown"


def convert_mmdetection(state: Dict[str, torch.Tensor]) -> ConvertedWeights:
    """mmdetection / torchvision key names -> ours (strip ``backbone.``, rename ``conv2_offset``)."""
    keys = {k: _strip_module_prefix(k) for k in state}
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
        _put(converted, key, original, state[original])
    return converted


def convert_detectron2(state: Dict[str, torch.Tensor]) -> ConvertedWeights:
    """detectron2 key names -> ours."""
    converted = ConvertedWeights("detectron2", {}, {}, [], extras=dict(state))
    for original, value in state.items():
        key = _strip_module_prefix(original)
        name = None
        for prefix in _D2_PREFIXES:
            if not key.startswith(prefix):
                continue
            rest = key[len(prefix) :]
            if not re.match(r"^(?:res[2-5]\.\d+|stem)\.", rest):
                continue
            name = rest  # a backbone key; kept as is (-> "unexpected") unless a rule renames it
            converted.meta.setdefault("prefixes", {})
            converted.meta["prefixes"][prefix] = converted.meta["prefixes"].get(prefix, 0) + 1
            for pattern, template in _D2_RULES:
                match = pattern.match(rest)
                if match:
                    groups = match.groups()
                    stage = int(groups[0]) - 1 if template.startswith("layer") else 0
                    name = template.format(*groups, s=stage)
                    break
            break
        if name is None:
            converted.ignored.append(original)
        else:
            _put(converted, name, original, value)
    return converted


def _put(converted: ConvertedWeights, name: str, original: str, value: torch.Tensor) -> None:
    if name in converted.backbone:
        raise InputError(
            f"checkpoint keys {converted.origin[name]} and {original} both map to {name}"
        )
    converted.backbone[name] = value
    converted.origin[name] = original


# ----------------------------------------------------------------------------- structure


def infer_resnet_config(
    converted: ConvertedWeights,
    path: Path,
    modulated_hint: Optional[bool] = None,
    groups_hint: Optional[int] = None,
) -> Dict[str, Any]:
    """Depth, width, ResNeXt groups, deformable stages, v1/v2 and offset groups of a converted ResNet backbone."""
    weights = converted.backbone
    stem = weights.get("conv1.weight")
    if stem is None or stem.dim() != 4:
        raise InputError(
            f"{path}: no ResNet stem among the backbone keys (expected conv1.weight / stem.conv1.weight)"
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
                f"{path}: offset branches of different sizes {sorted(shapes)}; one v1/v2 setting per model is supported"
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
    """``groups`` and ``width_per_group`` of a ResNeXt (nothing for a plain ResNet), from the 3x3 convs."""
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
            f"{path}: offset branch has {channels} channels, not 2 or 3 x {kernel_points} per offset group"
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


# ----------------------------------------------------------------------------- loading


@dataclass
class KeyReport:
    """How a checkpoint's keys met the model's: what is missing, unexpected or ignored."""

    path: Path
    missing: List[str]  # model keys the checkpoint lacks
    unexpected: List[str]  # backbone keys the model lacks (our names)
    ignored: List[str]  # checkpoint keys outside the backbone (necks, heads, buffers)
    origin: Dict[str, str] = field(default_factory=dict)  # our name -> checkpoint key

    def rows(self, limit: int = 20) -> List[Tuple[str, str, str]]:
        """(status, key, checkpoint key or count) rows of the key table, ``limit`` per status."""
        rows: List[Tuple[str, str, str]] = []
        for status, keys in (("missing", self.missing), ("unexpected", self.unexpected)):
            for key in keys[:limit]:
                rows.append(
                    (
                        status,
                        key if status == "missing" else self.origin.get(key, key),
                        "-" if status == "missing" else "",
                    )
                )
            if len(keys) > limit:
                rows.append((status, f"... {len(keys) - limit} more", ""))
        for prefix, count in sorted(Counter(_prefix(k) for k in self.ignored).items()):
            rows.append(("ignored (not backbone)", prefix, str(count)))
        return rows


def fit_weights(
    model: nn.Module,
    backbone: Dict[str, torch.Tensor],
    path: Path,
    target: str,
    origin: Optional[Dict[str, str]] = None,
    ignored: Optional[List[str]] = None,
) -> Dict[str, torch.Tensor]:
    """The state dict ``model`` takes from ``backbone``, or a one-line error: a shape mismatch
    names the key; missing or unexpected keys put the :class:`KeyReport` in ``details["keys"]``.
    Missing ``num_batches_tracked`` counters keep the model's value (detectron2's frozen BN has
    none). ``model`` may live on the meta device (checked before the real one is built)."""
    origin = origin or {}
    own = model.state_dict()
    for key, value in backbone.items():
        if key in own and tuple(own[key].shape) != tuple(value.shape):
            source = origin.get(key, key)
            where = f"{source} (-> {key})" if source != key else key
            raise InputError(
                f"{path}: shape mismatch at {where}: checkpoint {tuple(value.shape)} vs {target} {tuple(own[key].shape)}"
            )
    state = dict(backbone)
    for key, value in own.items():
        if key not in state and key.endswith("num_batches_tracked"):
            state[key] = value
    missing = [k for k in own if k not in state]
    unexpected = [k for k in backbone if k not in own]
    if missing or unexpected:
        report = KeyReport(Path(path), missing, unexpected, ignored or [], origin)
        examples = ", ".join((missing + [origin.get(k, k) for k in unexpected])[:3])
        raise InputError(
            f"{path}: checkpoint does not fit {target}: {len(missing)} missing and {len(unexpected)} unexpected "
            f"backbone key(s) (e.g. {examples})",
            details={"keys": report},
        )
    return state


def load_weights(
    model: nn.Module,
    backbone: Dict[str, torch.Tensor],
    path: Path,
    target: str,
    origin: Optional[Dict[str, str]] = None,
    ignored: Optional[List[str]] = None,
) -> List[str]:
    """Load ``backbone`` into ``model`` (checked by :func:`fit_weights`). ``ignored``
    (non-backbone keys) are no error: they give one note (returned, for ``summary.json``) and
    the :class:`KeyReport` is logged at INFO on the ``dcn_inspect`` logger
    (``extra={"key_report": ...}``)."""
    state = fit_weights(model, backbone, path, target, origin, ignored)
    notes: List[str] = []
    if ignored:
        # Every detector checkpoint has a neck and heads: one line for summary.json, the table
        # for those who ask (``--verbose``), no warning on every command.
        note = f"ignored {len(ignored)} key(s) outside the backbone ({', '.join(_prefix_counts(ignored))})"
        logger.info(
            "%s: %s",
            path,
            note,
            extra={"key_report": KeyReport(Path(path), [], [], ignored, origin or {})},
        )
        notes.append(note)
    model.load_state_dict(state, strict=True)
    return notes


def _prefix(key: str) -> str:
    parts = key.split(".")
    return ".".join(parts[:2]) + ".*" if len(parts) > 2 else key


def _prefix_counts(keys: List[str]) -> List[str]:
    counts = Counter(_prefix(k) for k in keys)
    return [f"{p} x{n}" if n > 1 else p for p, n in sorted(counts.items())][:6] + (
        ["..."] if len(counts) > 6 else []
    )


# ----------------------------------------------------------------------------- input conventions


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


def _mmdet_config_text(meta: Dict[str, Any]) -> str:
    for key in ("config", "cfg"):
        if isinstance(meta.get(key), str):
            return meta[key]
    return ""


def _mmdet_dcn_hints(config_text: str) -> Tuple[Optional[bool], Optional[int]]:
    """(modulated, deform_groups) from an embedded mmdetection config's ``dcn=dict(...)``, or Nones."""
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


def _detectron2_size_divisor(converted: ConvertedWeights) -> Tuple[int, str]:
    """detectron2 pads to its backbone's ``size_divisibility``: 32 for FPN, 0 for C4 and bare backbones."""
    prefixes = converted.meta.get("prefixes", {})
    if "backbone.bottom_up." in prefixes:
        return 32, "FPN backbone (backbone.bottom_up.*): size_divisibility 32"
    return 0, "no FPN (C4 or bare backbone): size_divisibility 0"


def import_checkpoint(
    payload: Any, path: Path, name: str, arch: Optional[registry.Architecture]
) -> LoadedModel:
    """Load a foreign checkpoint into a built-in architecture (``arch``, or one inferred from the weights)."""
    path = Path(path)
    state, wrapper, meta = extract_state_dict(payload, path)
    layout = detect_layout(state, wrapper)
    if arch is not None and arch.name not in RESNET_ARCHITECTURES:
        return _import_plain(state, path, name, arch)
    if layout == "unknown":
        sample = ", ".join(list(state)[:3])
        raise InputError(
            f"{path}: not a dcn-inspect, mmdetection or detectron2 ResNet checkpoint (keys like {sample}); "
            "for other models use `model` path/to/file.py:function `weights` FILE"
        )
    converted = convert_detectron2(state) if layout == "detectron2" else convert_mmdetection(state)
    config_text = _mmdet_config_text(meta)
    modulated_hint, groups_hint = _mmdet_dcn_hints(config_text)
    inferred = infer_resnet_config(converted, path, modulated_hint, groups_hint)
    arch_name = arch.name if arch is not None else f"resnet{inferred['depth']}-dcn-mmdet"
    if arch is None:
        arch = registry.get(arch_name)
    if arch.default_config.get("depth") != inferred["depth"]:
        raise InputError(
            f"{path}: checkpoint holds a ResNet-{inferred['depth']}, but {arch.name} is a ResNet-{arch.default_config.get('depth')}"
        )
    paper_setting = RESNET_ARCHITECTURES[arch.name][1] == "paper"
    if layout == "detectron2":
        bgr, mean, std = _detectron2_input(converted.extras)
        inferred["stride_in_1x1"] = True  # detectron2's default (MODEL.RESNETS.STRIDE_IN_1X1)
        inferred["stage_names"] = list(D2_STAGES)
        _rename_stages(converted, D2_STAGES)
        divisor, divisor_source = _detectron2_size_divisor(converted)
        preprocess = Preprocess(
            tuple(mean), tuple(std), 800, 1333, "pil-bilinear", "detectron2", divisor
        )  # type: ignore[arg-type]
        names = (
            "detectron2's (res2..res5; prefix "
            + ", ".join(sorted(converted.meta.get("prefixes", {})) or ["none"])
            + " dropped)"
        )
    else:
        caffe = bool(re.search(r"style\s*=\s*['\"]caffe['\"]", config_text))
        bgr = caffe
        mean, std = (
            (CAFFE_MEAN_RGB, CAFFE_STD) if caffe else (arch.preprocess.mean, arch.preprocess.std)
        )
        inferred["stride_in_1x1"] = caffe
        divisor, divisor_source = _mmdet_size_divisor(config_text)
        preprocess = replace(
            arch.preprocess,
            mean=tuple(mean),
            std=tuple(std),
            size_divisor=arch.preprocess.size_divisor if paper_setting else divisor,
        )  # type: ignore[arg-type]
        names = (
            "mmdetection's (prefix backbone. dropped)"
            if converted.layout == "mmdetection"
            else "torchvision's"
        )
    if paper_setting:
        # The user chose the paper's architecture: its input size and resize, with the file's normalisation.
        preprocess = replace(arch.preprocess, mean=tuple(mean), std=tuple(std))  # type: ignore[arg-type]
        divisor_source = f"{arch.name}'s own preprocessing"
    if bgr:
        # conv1 reads our RGB input: reverse its input channels once instead of the image every time.
        converted.backbone["conv1.weight"] = converted.backbone["conv1.weight"].flip(1)
    config = {**arch.default_config, **inferred}
    try:
        # Sized on the meta device and checked against the weights before the real build: a
        # checkpoint's shapes decide the width, and a hostile one must not cost gigabytes first.
        skeleton = arch.build_skeleton(**config)
    except ValueError as exc:
        raise InputError(f"{path}: cannot build {arch.name} for this checkpoint ({exc})") from None
    fit_weights(skeleton, converted.backbone, path, arch.name, converted.origin, converted.ignored)
    del skeleton
    model = arch.build(**config)
    notes = load_weights(
        model, converted.backbone, path, arch.name, converted.origin, converted.ignored
    )
    import_meta = {
        "layout": converted.layout,
        "wrapper": wrapper or None,
        "backbone_keys": len(converted.backbone),
        "ignored_keys": len(converted.ignored),
        "ignored": notes[0] if notes else None,
        "layer_names": names,
        "input_channels": "BGR weights (conv1 input channels reversed to take RGB)"
        if bgr
        else "RGB",
        "size_divisor": divisor_source,
    }
    return LoadedModel(
        model,
        name,
        arch.name,
        config,
        preprocess,
        converted.layout,
        path,
        sha256_file(path),
        {"import": import_meta},
    )


def _rename_stages(converted: ConvertedWeights, stage_names: Tuple[str, ...]) -> None:
    """``layerK.`` keys -> ``stage_names[K-1].`` (the model is built with those stage names)."""

    def rename(key: str) -> str:
        match = re.match(r"^layer([1-4])\.", key)
        return (
            stage_names[int(match.group(1)) - 1] + key[len(match.group(0)) - 1 :] if match else key
        )

    converted.backbone = {rename(k): v for k, v in converted.backbone.items()}
    converted.origin = {rename(k): v for k, v in converted.origin.items()}


def _import_plain(
    state: Dict[str, torch.Tensor], path: Path, name: str, arch: registry.Architecture
) -> LoadedModel:
    """A bare state dict (``module.`` prefixes removed) into a non-ResNet registered architecture."""
    model = arch.build()
    weights = {_strip_module_prefix(k): v for k, v in state.items()}
    load_weights(model, weights, path, arch.name)
    return LoadedModel(
        model,
        name,
        arch.name,
        dict(arch.default_config),
        arch.preprocess,
        "state-dict",
        path,
        sha256_file(path),
        {"import": {"layout": "state-dict", "backbone_keys": len(weights), "ignored_keys": 0}},
    )


# ----------------------------------------------------------------------------- user files


def _import_user_module(path: Path, spec: str) -> Any:
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
    module_name = f"dcn_inspect_user_{path.stem}_{digest}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise InputError(f"{spec}: cannot import {path} as a Python module", param="model")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # dataclasses and pickling look modules up by name
    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)  # let the file import its neighbours
    try:
        module_spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - the user's code failed: report it as their input problem
        sys.modules.pop(module_name, None)
        raise InputError(f"{spec}: importing {path} failed: {_raised(exc)}", param="model") from exc
    return module


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else ""


def _raised(exc: BaseException) -> str:
    """What the user's code raised, in words (``sys.exit`` included: a model file must not end the run)."""
    if isinstance(exc, SystemExit):
        return f"it called sys.exit({exc.code!r})"
    return f"{type(exc).__name__}: {_first_line(exc)}" if _first_line(exc) else type(exc).__name__


def _user_preprocess(module: Any, model: nn.Module, spec: str) -> Preprocess:
    declared = getattr(module, "PREPROCESS", None)
    if declared is None:
        declared = getattr(model, "preprocess", None)
    if declared is None:
        return Preprocess()
    if isinstance(declared, Preprocess):
        return declared
    if isinstance(declared, dict):
        try:
            return Preprocess.from_dict(declared)
        except (TypeError, ValueError) as exc:
            raise InputError(f"{spec}: PREPROCESS is not valid ({exc})", param="model") from None
    raise InputError(
        f"{spec}: PREPROCESS must be a dict with mean, std, resize, max_size, interpolation, size_rule, size_divisor, got {type(declared).__name__}",
        param="model",
    )


def load_user_file(spec: str, weights: Optional[Path]) -> LoadedModel:
    """``path/to/file.py:function`` -> the ``nn.Module`` the function returns (weights optional)."""
    file_part, _, function = spec.rpartition(":")
    path = Path(file_part)
    if not path.is_file():
        reason = missing_file_reason(path)
        raise InputError(
            f"{spec}: file {path} not found"
            if reason == "file not found"
            else f"{spec}: {path}: {reason}",
            param="model",
        )
    if not function.isidentifier():
        raise InputError(
            f"{spec}: {function!r} is not a function name (use path/to/file.py:function)",
            param="model",
        )
    module = _import_user_module(path, spec)
    builder = getattr(module, function, None)
    if not callable(builder):
        raise InputError(f"{spec}: {path} has no function {function!r}", param="model")
    try:
        model = builder()
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - the user's code failed (Ctrl-C passes: exit 130)
        raise InputError(
            f"{spec}: {function}() raised {_raised(exc)}"
            if not isinstance(exc, SystemExit)
            else f"{spec}: {function}(): {_raised(exc)}",
            param="model",
        ) from exc
    if not isinstance(model, nn.Module):
        raise InputError(
            f"{spec}: {function}() returned {type(model).__name__}, not a torch.nn.Module",
            param="model",
        )
    preprocess = _user_preprocess(module, model, spec)
    checkpoint: Optional[Path] = None
    digest: Optional[str] = None
    meta: Dict[str, Any] = {}
    if weights is not None:
        checkpoint = Path(weights)
        payload = read_checkpoint_file(checkpoint)
        if is_native(payload):
            if not isinstance(payload.get("state_dict"), dict):
                raise InputError(
                    f"{checkpoint}: native checkpoint without a state_dict", param="weights"
                )
            state = dict(payload["state_dict"])
        else:
            state, _, _ = extract_state_dict(payload, checkpoint)
        state = {_strip_module_prefix(k): v for k, v in state.items()}
        notes = load_weights(model, state, checkpoint, f"{path.name}:{function}")
        meta["import"] = {
            "layout": "native" if is_native(payload) else "state-dict",
            "ignored": notes[0] if notes else None,
        }
        digest = sha256_file(checkpoint)
    config = {"file": str(path), "function": function}
    return LoadedModel(model, spec, None, config, preprocess, "user-file", checkpoint, digest, meta)

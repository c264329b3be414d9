"""A foreign checkpoint's weights as tensors, which framework wrote them, and the renamed result.

:func:`extract_state_dict` unwraps a checkpoint payload into ``{key: tensor}``;
:func:`detect_layout` tells detectron2 names (``res2.0.conv1``, ``stem.conv1``) from
torchvision / mmdetection names (``layer1.0.conv1``); the converters
(:mod:`~dcn_inspect.models.importers.mmdetection`, :mod:`~dcn_inspect.models.importers.detectron2`)
fill a :class:`ConvertedWeights` with :func:`put_weight`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import torch

from dcn_inspect.core.errors import InputError

_D2_STAGE_KEY = re.compile(r"(?:^|\.)(?:res[2-5]\.\d+|stem\.conv1)\.")
_TV_STAGE_KEY = re.compile(r"(?:^|\.)layer[1-4]\.\d+\.")


@dataclass
class ConvertedWeights:
    """A foreign checkpoint's weights renamed to our modules' names."""

    layout: str  # "mmdetection", "detectron2" or "state-dict"
    backbone: Dict[str, torch.Tensor]  # our name -> tensor
    origin: Dict[str, str]  # our name -> the key in the checkpoint
    ignored: List[str]  # checkpoint keys outside the backbone (necks, heads, buffers)
    extras: Dict[str, torch.Tensor] = field(default_factory=dict)  # all tensors by checkpoint key
    meta: Dict[str, Any] = field(default_factory=dict)


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
            f"{path}: no weights found "
            "(expected a 'state_dict' or 'model' dict, or a dict of tensors)"
        )
    meta = payload.get("meta") if isinstance(payload.get("meta"), dict) else {}
    return state, wrapper, dict(meta or {})


def strip_module_prefix(key: str) -> str:
    """``key`` without the ``module.`` that DataParallel / DistributedDataParallel put before it."""
    return key[len("module.") :] if key.startswith("module.") else key


def detect_layout(state: Dict[str, torch.Tensor], wrapper: str) -> str:
    """ "detectron2", "mmdetection", "state-dict" (torchvision names, no wrapper) or "unknown"."""
    keys = [strip_module_prefix(k) for k in state]
    if any(_D2_STAGE_KEY.search(k) for k in keys):
        return "detectron2"
    if any(_TV_STAGE_KEY.search(k) for k in keys):
        if wrapper == "state_dict" or any(k.startswith("backbone.") for k in keys):
            return "mmdetection"
        return "state-dict"
    return "unknown"


def put_weight(converted: ConvertedWeights, name: str, original: str, value: torch.Tensor) -> None:
    """Add checkpoint key ``original`` as our ``name``; two keys renamed alike are an error."""
    if name in converted.backbone:
        raise InputError(
            f"checkpoint keys {converted.origin[name]} and {original} both map to {name}"
        )
    converted.backbone[name] = value
    converted.origin[name] = original

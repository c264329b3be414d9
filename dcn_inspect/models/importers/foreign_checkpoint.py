"""A foreign checkpoint into one of the built-in deformable ResNets, or a bare state dict into
any registered architecture.

:func:`import_checkpoint` runs the steps in order: unwrap the weights
(:mod:`~dcn_inspect.models.importers.state_dicts`), rename them (mmdetection or detectron2),
read the structure from their shapes (:mod:`~dcn_inspect.models.importers.resnet_structure`),
choose the architecture, take the framework's input convention, size the network on the meta
device and check the weights against it, then build and load the real one.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from dcn_inspect.core.errors import InputError
from dcn_inspect.models import registry
from dcn_inspect.models.checkpoint import sha256_file
from dcn_inspect.models.importers.detectron2 import (
    D2_STAGES,
    convert_detectron2,
    detectron2_convention,
    rename_stages,
)
from dcn_inspect.models.importers.input_convention import InputConvention
from dcn_inspect.models.importers.mmdetection import (
    convert_mmdetection,
    mmdet_config_text,
    mmdet_dcn_hints,
    mmdetection_convention,
)
from dcn_inspect.models.importers.resnet_structure import infer_resnet_config
from dcn_inspect.models.importers.state_dicts import (
    ConvertedWeights,
    detect_layout,
    extract_state_dict,
    strip_module_prefix,
)
from dcn_inspect.models.importers.weight_fitting import fit_weights, load_weights
from dcn_inspect.models.loaded_model import LoadedModel
from dcn_inspect.models.resnet import RESNET_ARCHITECTURES


def import_checkpoint(
    payload: Any, path: Path, name: str, arch: Optional[registry.Architecture]
) -> LoadedModel:
    """Load a foreign checkpoint into a built-in architecture (``arch``, or one inferred from
    the weights)."""
    path = Path(path)
    state, wrapper, meta = extract_state_dict(payload, path)
    layout = detect_layout(state, wrapper)
    if arch is not None and arch.name not in RESNET_ARCHITECTURES:
        return _import_plain(state, path, name, arch)
    if layout == "unknown":
        sample = ", ".join(list(state)[:3])
        raise InputError(
            f"{path}: not a dcn-inspect, mmdetection or detectron2 ResNet checkpoint "
            f"(keys like {sample}); "
            "for other models use `model` path/to/file.py:function `weights` FILE"
        )
    converted = convert_detectron2(state) if layout == "detectron2" else convert_mmdetection(state)
    config_text = mmdet_config_text(meta)
    inferred = infer_resnet_config(converted, path, *mmdet_dcn_hints(config_text))
    arch = _architecture_for(arch, inferred["depth"], path)
    if layout == "detectron2":
        convention = detectron2_convention(converted)
        rename_stages(converted, D2_STAGES)  # the model is built with detectron2's stage names
    else:
        convention = mmdetection_convention(converted, config_text, arch.preprocess)
    inferred.update(convention.structure)
    if RESNET_ARCHITECTURES[arch.name][1] == "paper":
        # The user chose the paper's architecture: its input size and resize, with the file's
        # normalisation.
        convention.preprocess = replace(arch.preprocess, mean=convention.mean, std=convention.std)
        convention.size_divisor_source = f"{arch.name}'s own preprocessing"
    if convention.bgr:
        # conv1 reads our RGB input: reverse its input channels once instead of the image every
        # time.
        converted.backbone["conv1.weight"] = converted.backbone["conv1.weight"].flip(1)
    config = {**arch.default_config, **inferred}
    model = _build_fitting(arch, config, converted, path)
    notes = load_weights(
        model, converted.backbone, path, arch.name, converted.origin, converted.ignored
    )
    return LoadedModel(
        model,
        name,
        arch.name,
        config,
        convention.preprocess,
        converted.layout,
        path,
        sha256_file(path),
        {"import": _import_summary(converted, wrapper, notes, convention)},
    )


def _architecture_for(
    arch: Optional[registry.Architecture], depth: int, path: Path
) -> registry.Architecture:
    """``arch``, or the mmdetection-setting ResNet of the checkpoint's ``depth``; an error when
    the chosen one has another depth."""
    arch = arch if arch is not None else registry.get(f"resnet{depth}-dcn-mmdet")
    if arch.default_config.get("depth") != depth:
        raise InputError(
            f"{path}: checkpoint holds a ResNet-{depth}, "
            f"but {arch.name} is a ResNet-{arch.default_config.get('depth')}"
        )
    return arch


def _build_fitting(
    arch: registry.Architecture, config: Dict[str, Any], converted: ConvertedWeights, path: Path
) -> nn.Module:
    """``arch`` built with ``config``, once the weights are known to fit it."""
    try:
        # Sized on the meta device and checked against the weights before the real build: a
        # checkpoint's shapes decide the width, and a hostile one must not cost gigabytes first.
        skeleton = arch.build_skeleton(**config)
    except ValueError as exc:
        raise InputError(f"{path}: cannot build {arch.name} for this checkpoint ({exc})") from None
    fit_weights(skeleton, converted.backbone, path, arch.name, converted.origin, converted.ignored)
    del skeleton
    return arch.build(**config)


def _import_summary(
    converted: ConvertedWeights, wrapper: str, notes: List[str], convention: InputConvention
) -> Dict[str, Any]:
    """How the checkpoint was read, for ``summary.json``'s ``import`` entry."""
    return {
        "layout": converted.layout,
        "wrapper": wrapper or None,
        "backbone_keys": len(converted.backbone),
        "ignored_keys": len(converted.ignored),
        "ignored": notes[0] if notes else None,
        "layer_names": convention.layer_names,
        "input_channels": "BGR weights (conv1 input channels reversed to take RGB)"
        if convention.bgr
        else "RGB",
        "size_divisor": convention.size_divisor_source,
    }


def _import_plain(
    state: Dict[str, torch.Tensor], path: Path, name: str, arch: registry.Architecture
) -> LoadedModel:
    """A bare state dict (``module.`` prefixes removed) into a non-ResNet registered
    architecture."""
    model = arch.build()
    weights = {strip_module_prefix(k): v for k, v in state.items()}
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

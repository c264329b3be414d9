"""One way for every command to get a model: ``load_model(spec, weights, device)``.

``spec`` is a registered architecture name (weights from ``weights`` or its bundled
weights), a checkpoint path (native format; other formats are recognised by
:mod:`dcn_inspect.importers`), or ``path/to/file.py:function`` returning an ``nn.Module``.
:func:`open_model` is the same for callers that may already hold a :class:`LoadedModel`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import nn

from dcn_inspect import importers
from dcn_inspect.checkpoint import is_native, read_checkpoint_file, sha256_file
from dcn_inspect.defaults import DEFAULT_MODEL
from dcn_inspect.errors import InputError
from dcn_inspect.loaded_model import LoadedModel, model_device, warn_non_finite_weights
from dcn_inspect.models import registry
from dcn_inspect.models.registry import Preprocess

__all__ = ["LoadedModel", "load_model", "open_model", "resolve_device"]


def resolve_device(device: str) -> torch.device:
    """Parse a device name; a clear error for unknown or unavailable devices."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InputError(f"{device!r}: unknown device (use cpu, cuda or cuda:N)", param="device") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"{device}: CUDA is not available on this machine", param="device")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InputError(f"{device}: only {torch.cuda.device_count()} CUDA device(s) present", param="device")
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"{device!r}: only cpu and cuda are supported", param="device")
    return dev


def load_state_dict_strict(model: nn.Module, state_dict: Dict[str, torch.Tensor], source: str) -> None:
    """Load weights; a shape mismatch is a one-line error naming the key, missing keys an error listing them."""
    own = model.state_dict()
    for key, value in state_dict.items():
        if key in own and tuple(own[key].shape) != tuple(value.shape):
            raise InputError(
                f"{source}: shape mismatch at {key}: checkpoint {tuple(value.shape)} vs model {tuple(own[key].shape)}"
            )
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) (e.g. {', '.join(unexpected[:3])})")
        raise InputError(f"{source}: checkpoint does not fit the architecture: {'; '.join(parts)}")
    model.load_state_dict(state_dict, strict=True)


def _from_native(payload: Dict[str, Any], path: Path, name: str) -> LoadedModel:
    arch_name = payload.get("arch")
    try:
        arch = registry.get(str(arch_name))
    except KeyError as exc:
        raise InputError(f"{path}: {exc.args[0]}") from None
    config = dict(payload.get("config") or {})
    try:
        model = arch.build(**config)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{path}: its config does not fit architecture {arch.name} ({exc})") from None
    state_dict = payload.get("state_dict")
    if not isinstance(state_dict, dict):
        raise InputError(f"{path}: native checkpoint without a state_dict")
    load_state_dict_strict(model, state_dict, str(path))
    meta = dict(payload.get("meta") or {})
    try:
        preprocess = Preprocess.from_dict(meta["preprocess"]) if "preprocess" in meta else arch.preprocess
    except (TypeError, ValueError) as exc:
        raise InputError(f"{path}: its preprocessing metadata is not valid ({exc})") from None
    return LoadedModel(model, name, arch.name, {**arch.default_config, **config}, preprocess, "native", path, sha256_file(path), meta)


def load_model(spec: Optional[str] = None, weights: Optional[Path] = None, device: str = "cpu") -> LoadedModel:
    """Load a model for inference (eval mode, on ``device``)."""
    dev = resolve_device(device)
    spec = spec or DEFAULT_MODEL
    loaded: LoadedModel
    if spec in registry.names():
        arch = registry.get(spec)
        path = Path(weights) if weights is not None else arch.bundled_weights
        if path is None:
            model = arch.build()
            loaded = LoadedModel(model, spec, arch.name, dict(arch.default_config), arch.preprocess, "registered")
        else:
            payload = read_checkpoint_file(path)
            if is_native(payload):
                if payload.get("arch") != arch.name:
                    raise InputError(f"{path}: checkpoint is for architecture {payload.get('arch')!r}, not {arch.name!r}")
                loaded = _from_native(payload, Path(path), spec)
            else:
                loaded = importers.import_checkpoint(payload, Path(path), spec, arch)
    elif spec.rpartition(":")[0].endswith(".py"):
        loaded = importers.load_user_file(spec, weights)
    else:
        path = Path(spec)
        if weights is not None:
            raise InputError(
                f"{weights}: `model` {spec} is a checkpoint already; `weights` goes with an architecture name or a file.py:function",
                param="weights",
            )
        if not path.exists():
            raise InputError(f"{spec}: neither a registered architecture ({', '.join(registry.names())}) nor an existing file", param="model")
        payload = read_checkpoint_file(path)
        if not is_native(payload):
            loaded = importers.import_checkpoint(payload, path, spec, None)
        else:
            loaded = _from_native(payload, path, spec)
    warn_non_finite_weights(loaded)
    loaded.model.eval().to(dev)
    return loaded


def open_model(model: Union[str, LoadedModel, None], weights: Optional[Path], device: str) -> Tuple[LoadedModel, torch.device]:
    """``model`` as a :class:`LoadedModel` (loaded unless it is one already) and the device it runs on."""
    loaded = model if isinstance(model, LoadedModel) else load_model(model, weights, device)
    return loaded, model_device(loaded)

"""One way for every command to get a model: ``load_model(spec, weights, device)``.

``spec`` is a registered architecture name (weights from ``weights`` or its bundled
weights), a checkpoint path (native format; other formats are recognised by
:mod:`dcn_inspect.models.importers`), ``path/to/file.py:function`` returning an ``nn.Module``,
or ``hf:DIR``, a HuggingFace ``save_pretrained`` folder loaded offline
(:mod:`dcn_inspect.models.importers.huggingface`).
:func:`open_model` is the same for callers that may already hold a :class:`LoadedModel`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import nn

from dcn_inspect.core.defaults import DEFAULT_MODEL
from dcn_inspect.core.errors import InputError, warn
from dcn_inspect.models import importers, registry
from dcn_inspect.models.checkpoint import (
    is_native,
    missing_file_reason,
    read_checkpoint_file,
    sha256_file,
)
from dcn_inspect.models.loaded_model import (
    RANDOM_WEIGHTS_NOTE,
    RANDOM_WEIGHTS_SEED,
    LoadedModel,
    model_device,
    warn_non_finite_weights,
)
from dcn_inspect.models.registry import Preprocess

__all__ = ["LoadedModel", "load_model", "open_model", "resolve_device"]


def resolve_device(device: str) -> torch.device:
    """Parse a device name; a clear error for unknown or unavailable devices."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(
            f"{device!r}: unknown device (use cpu, cuda or cuda:N)", param="device"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"{device}: CUDA is not available on this machine", param="device")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InputError(
            f"{device}: only {torch.cuda.device_count()} CUDA device(s) present", param="device"
        )
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"{device!r}: only cpu and cuda are supported", param="device")
    if dev.type == "cpu" and dev.index not in (None, 0):
        raise InputError(f"{device}: there is one CPU device (use cpu)", param="device")
    return dev


def check_state_dict_fits(
    model: nn.Module, state_dict: Dict[str, torch.Tensor], source: str
) -> None:
    """Every key of the model in ``state_dict`` with the model's shape, and nothing else; a
    one-line error naming the first mismatch. ``model`` may live on the meta device."""
    own = model.state_dict()
    for key, value in state_dict.items():
        if key in own and tuple(own[key].shape) != tuple(value.shape):
            raise InputError(
                f"{source}: shape mismatch at {key}: checkpoint {tuple(value.shape)} "
                f"vs model {tuple(own[key].shape)}"
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


def load_state_dict_strict(
    model: nn.Module, state_dict: Dict[str, torch.Tensor], source: str
) -> None:
    """Load weights; a shape mismatch is a one-line error naming the key, missing keys an error
    listing them."""
    check_state_dict_fits(model, state_dict, source)
    model.load_state_dict(state_dict, strict=True)


def _native_part(payload: Dict[str, Any], key: str, path: Path) -> Dict[str, Any]:
    """``payload[key]`` as a dict with string keys (``{}`` when absent); an error naming the
    entry otherwise."""
    value = payload.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise InputError(
            f"{path}: native checkpoint entry '{key}' must be a dict with string keys, "
            f"got {type(value).__name__}"
        )
    return dict(value)


def _from_native(payload: Dict[str, Any], path: Path, name: str) -> LoadedModel:
    """A native checkpoint: every entry's type, the config and preprocessing values and the
    weights' shapes are checked (the network is sized on the meta device) before anything is
    built."""
    arch_name = payload.get("arch")
    if not isinstance(arch_name, str):
        raise InputError(
            f"{path}: native checkpoint entry 'arch' must be an architecture name, "
            f"got {type(arch_name).__name__}"
        )
    try:
        arch = registry.get(arch_name)
    except KeyError as exc:
        raise InputError(f"{path}: {exc.args[0]}") from None
    config = _native_part(payload, "config", path)
    meta = _native_part(payload, "meta", path)
    state_dict = payload.get("state_dict")
    if not isinstance(state_dict, dict):
        raise InputError(f"{path}: native checkpoint without a state_dict")
    bad = next(
        (
            k
            for k, v in state_dict.items()
            if not isinstance(k, str) or not isinstance(v, torch.Tensor)
        ),
        None,
    )
    if bad is not None:
        raise InputError(f"{path}: state_dict entry {str(bad)[:80]!r} is not a tensor")
    try:
        preprocess = (
            Preprocess.from_dict(meta["preprocess"]) if "preprocess" in meta else arch.preprocess
        )
    except ValueError as exc:
        raise InputError(f"{path}: meta.preprocess: {exc}") from None
    try:
        skeleton = arch.build_skeleton(**config)
    except ValueError as exc:
        raise InputError(
            f"{path}: its config does not fit architecture {arch.name} ({exc})"
        ) from None
    check_state_dict_fits(skeleton, state_dict, str(path))
    del skeleton
    model = arch.build(**config)
    model.load_state_dict(state_dict, strict=True)
    return LoadedModel(
        model,
        name,
        arch.name,
        arch.check_config(config),
        preprocess,
        "native",
        path,
        sha256_file(path),
        meta,
    )


def load_model(
    spec: Optional[str] = None, weights: Optional[Path] = None, device: str = "cpu"
) -> LoadedModel:
    """Load a model for inference (eval mode, on ``device``)."""
    dev = resolve_device(device)
    spec = spec or DEFAULT_MODEL
    loaded: LoadedModel
    if spec in registry.names():
        arch = registry.get(spec)
        path = Path(weights) if weights is not None else arch.bundled_weights
        if path is None:
            # seeded, and the caller's random state left as it was
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(RANDOM_WEIGHTS_SEED)
                model = arch.build()
            loaded = LoadedModel(
                model, spec, arch.name, dict(arch.default_config), arch.preprocess, "registered"
            )
            warn(f"{spec}: {RANDOM_WEIGHTS_NOTE} (give `weights` for a trained model)")
        else:
            payload = read_checkpoint_file(path)
            if is_native(payload):
                if payload.get("arch") != arch.name:
                    raise InputError(
                        f"{path}: checkpoint is for architecture {payload.get('arch')!r}, "
                        f"not {arch.name!r}"
                    )
                loaded = _from_native(payload, Path(path), spec)
            else:
                loaded = importers.import_checkpoint(payload, Path(path), spec, arch)
    elif spec.startswith("hf:"):
        if weights is not None:
            raise InputError(
                f"{weights}: `model` {spec} holds its weights already; `weights` goes with an "
                "architecture name or a file.py:function",
                param="weights",
            )
        loaded = importers.load_huggingface(spec)
    elif spec.rpartition(":")[0].endswith(".py"):
        loaded = importers.load_user_file(spec, weights)
    else:
        path = Path(spec)
        if weights is not None:
            raise InputError(
                f"{weights}: `model` {spec} is a checkpoint already; `weights` goes with an "
                "architecture name or a file.py:function",
                param="weights",
            )
        if not path.exists():
            if os.path.islink(path):
                raise InputError(f"{spec}: {missing_file_reason(path)}", param="model")
            raise InputError(
                f"{spec}: neither a registered architecture ({', '.join(registry.names())}) "
                "nor an existing file",
                param="model",
            )
        payload = read_checkpoint_file(path)
        if not is_native(payload):
            loaded = importers.import_checkpoint(payload, path, spec, None)
        else:
            loaded = _from_native(payload, path, spec)
    warn_non_finite_weights(loaded)
    loaded.model.eval().to(dev)
    return loaded


def open_model(
    model: Union[str, LoadedModel, None], weights: Optional[Path], device: str
) -> Tuple[LoadedModel, torch.device]:
    """``model`` as a :class:`LoadedModel` (loaded unless it is one already) and the device it
    runs on."""

    loaded = model if isinstance(model, LoadedModel) else load_model(model, weights, device)
    return loaded, model_device(loaded)

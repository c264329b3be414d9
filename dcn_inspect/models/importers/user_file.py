"""User model files: ``path/to/file.py:function`` returning an ``nn.Module``.

:func:`load_user_file` imports the file as a module (its folder on ``sys.path``, so it may
import its neighbours), calls the function and, with ``weights``, loads a native checkpoint's
``state_dict`` or any dict of tensors into the result. The file may define ``PREPROCESS`` (a
dict with ``mean``, ``std``, ``resize``, ``max_size``, ``interpolation``, ``size_rule``,
``size_divisor``) or the model a ``preprocess`` attribute to describe its input
preprocessing. Whatever the user's code raises (``sys.exit`` included) is an input error
naming the model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path
from typing import Any, Dict, Optional

from torch import nn

from dcn_inspect.core.errors import InputError
from dcn_inspect.models.checkpoint import (
    is_native,
    missing_file_reason,
    read_checkpoint_file,
    sha256_file,
)
from dcn_inspect.models.importers.state_dicts import extract_state_dict, strip_module_prefix
from dcn_inspect.models.importers.weight_fitting import load_weights
from dcn_inspect.models.loaded_model import LoadedModel
from dcn_inspect.models.registry import Preprocess


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
    # The user's code failing is their input problem: reported as one, whatever it raised.
    try:
        module_spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:  # noqa: BLE001
        sys.modules.pop(module_name, None)
        raise InputError(f"{spec}: importing {path} failed: {_raised(exc)}", param="model") from exc
    return module


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else ""


def _raised(exc: BaseException) -> str:
    """What the user's code raised, in words (``sys.exit`` included: a model file must not end
    the run)."""
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
        f"{spec}: PREPROCESS must be a dict with mean, std, resize, max_size, interpolation, "
        f"size_rule, size_divisor, got {type(declared).__name__}",
        param="model",
    )


def load_user_file(spec: str, weights: Optional[Path]) -> LoadedModel:
    """``path/to/file.py:function`` -> the ``nn.Module`` the function returns (weights
    optional)."""
    file_part, _, function = spec.rpartition(":")
    path = Path(file_part)
    _check_spec(spec, path, function)
    module = _import_user_module(path, spec)
    model = _call_builder(module, spec, path, function)
    preprocess = _user_preprocess(module, model, spec)
    checkpoint: Optional[Path] = None
    digest: Optional[str] = None
    meta: Dict[str, Any] = {}
    if weights is not None:
        checkpoint = Path(weights)
        meta["import"] = _load_user_weights(model, checkpoint, f"{path.name}:{function}")
        digest = sha256_file(checkpoint)
    config = {"file": str(path), "function": function}
    return LoadedModel(model, spec, None, config, preprocess, "user-file", checkpoint, digest, meta)


def _check_spec(spec: str, path: Path, function: str) -> None:
    """The file exists and the part after ``:`` can name a function."""
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


def _call_builder(module: Any, spec: str, path: Path, function: str) -> nn.Module:
    """The module ``function()`` of the user's file returns."""
    builder = getattr(module, function, None)
    if not callable(builder):
        raise InputError(f"{spec}: {path} has no function {function!r}", param="model")
    try:
        model = builder()
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - user code failed (Ctrl-C: exit 130)
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
    return model


def _load_user_weights(model: nn.Module, checkpoint: Path, target: str) -> Dict[str, Any]:
    """Load a native checkpoint's ``state_dict`` or any dict of tensors (``module.`` prefixes
    removed) into ``model``; how it was read, for ``summary.json``'s ``import`` entry."""
    payload = read_checkpoint_file(checkpoint)
    if is_native(payload):
        if not isinstance(payload.get("state_dict"), dict):
            raise InputError(
                f"{checkpoint}: native checkpoint without a state_dict", param="weights"
            )
        state = dict(payload["state_dict"])
    else:
        state, _, _ = extract_state_dict(payload, checkpoint)
    state = {strip_module_prefix(k): v for k, v in state.items()}
    notes = load_weights(model, state, checkpoint, target)
    return {
        "layout": "native" if is_native(payload) else "state-dict",
        "ignored": notes[0] if notes else None,
    }

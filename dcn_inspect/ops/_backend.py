"""Choose the implementation behind :mod:`dcn_inspect.ops`: native extension or reference.

``DCN_INSPECT_OPS=native`` requires the native extension (build errors propagate),
``reference`` forces the pure-PyTorch path, and the default ``auto`` tries the native
extension once and falls back to the reference with a single warning.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Dict, Optional

from dcn_inspect.core.errors import DcnInspectWarning
from dcn_inspect.ops import reference

ENV_VAR = "DCN_INSPECT_OPS"


@dataclass
class BackendInfo:
    """What ``dcn-inspect doctor`` reports about the active ops backend."""

    name: str  # "native" or "reference"
    requested: str
    error: Optional[str] = None
    details: Dict[str, Any] = field(default_factory=dict)


_active: Optional[ModuleType] = None
_info: Optional[BackendInfo] = None


def _choose() -> None:
    global _active, _info
    requested = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if requested not in ("auto", "native", "reference"):
        raise ValueError(f"{ENV_VAR} must be 'auto', 'native' or 'reference', got {requested!r}")
    if requested == "reference":
        _active, _info = reference, BackendInfo("reference", requested)
        return
    try:
        from dcn_inspect.ops import _native

        module = _native.load()
        _active = module
        _info = BackendInfo("native", requested, details=_native.build_details())
    except Exception as exc:  # noqa: BLE001 - any build failure falls back, by design
        if requested == "native":
            raise
        message = f"{type(exc).__name__}: {exc}".splitlines()[0]
        warnings.warn(
            f"native deformable ops unavailable ({message}); using the pure-PyTorch reference",
            DcnInspectWarning,
            stacklevel=3,
        )
        _active, _info = reference, BackendInfo("reference", requested, error=message)


def active() -> ModuleType:
    """The module implementing the ops (``reference`` or the native wrapper)."""
    if _active is None:
        _choose()
    assert _active is not None
    return _active


def info() -> BackendInfo:
    active()
    assert _info is not None
    return _info


def reset() -> None:
    """Forget the choice (tests switch backends through the environment variable)."""
    global _active, _info
    _active, _info = None, None

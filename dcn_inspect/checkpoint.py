"""The native checkpoint format: one file with architecture, config, weights and metadata.

Written with ``torch.save`` as a plain dict of tensors and primitives so it loads with
``torch.load(weights_only=True)``; no pickled objects, so loading it never runs code.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch import nn

from dcn_inspect.errors import InputError

NATIVE_FORMAT = "dcn-inspect/1"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_native(path: Path, arch: str, config: Dict[str, Any], model: nn.Module, meta: Optional[Dict[str, Any]] = None) -> None:
    """Write a native checkpoint atomically."""
    from dcn_inspect.outputs import atomic_path

    payload = {
        "format": NATIVE_FORMAT,
        "arch": arch,
        "config": dict(config),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        "meta": dict(meta or {}),
    }
    with atomic_path(Path(path)) as tmp:
        torch.save(payload, tmp)


def read_checkpoint_file(path: Path) -> Any:
    """``torch.load(weights_only=True)`` with one-line errors for missing/corrupt/unsafe files."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: checkpoint not found")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected a checkpoint file")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: checkpoint file is empty")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every failure is reported as a bad checkpoint
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights_only" in str(exc) or "Unsupported global" in str(exc) or "GLOBAL" in str(exc):
            raise InputError(
                f"{path}: refused to load: the file contains pickled code or objects, not only tensors "
                f"(loaded with weights_only=True; {first[:160]})"
            ) from None
        raise InputError(f"{path}: not a readable PyTorch checkpoint ({first[:200]})") from None


def is_native(payload: Any) -> bool:
    return isinstance(payload, dict) and payload.get("format") == NATIVE_FORMAT

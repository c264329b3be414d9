"""Loading renamed weights into a model: the shapes checked, missing and unexpected keys told.

:func:`fit_weights` checks a backbone's weights against a model (which may live on the meta
device) and raises a one-line error whose ``details["keys"]`` is the full :class:`KeyReport`;
:func:`load_weights` loads them, keys outside the backbone giving one note and the report
logged at INFO on the ``dcn_inspect`` logger.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from dcn_inspect.core.errors import InputError

#: Details for those who ask (the CLI's ``--verbose``): e.g. the key table of a checkpoint.
logger = logging.getLogger("dcn_inspect")


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
                f"{path}: shape mismatch at {where}: checkpoint {tuple(value.shape)} "
                f"vs {target} {tuple(own[key].shape)}"
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
            f"{path}: checkpoint does not fit {target}: {len(missing)} missing and "
            f"{len(unexpected)} unexpected backbone key(s) (e.g. {examples})",
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
        prefixes = ", ".join(_prefix_counts(ignored))
        note = f"ignored {len(ignored)} key(s) outside the backbone ({prefixes})"

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

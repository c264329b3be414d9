"""A model ready for inference and what the outputs must record about it.

:class:`LoadedModel` is what :func:`dcn_inspect.models.loading.load_model` returns and what every
command consumes; the checkpoint importers (:mod:`dcn_inspect.models.importers`) build it too, which
is why it lives here, below both of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from dcn_inspect.core.errors import warn
from dcn_inspect.models.registry import Preprocess

#: What the outputs say of a registered architecture run without weights (its offsets were never
#: trained): the warning, ``summary.json``'s ``model.note`` and, shorter, the figure titles.
RANDOM_WEIGHTS_NOTE = "random weights: no weights given and none bundled, the offsets are untrained"
RANDOM_WEIGHTS_TITLE = "random weights"
#: The seed of that random initialisation: the same untrained model, and the same bytes, on
#: every run (``summary.json``'s ``model.random_weights_seed``).
RANDOM_WEIGHTS_SEED = 0


@dataclass
class LoadedModel:
    """A model ready for inference, with everything the outputs must record about it."""

    model: nn.Module
    name: str  # what the user asked for (or the default)
    arch: Optional[str]
    config: Dict[str, Any]
    preprocess: Preprocess
    source: str  # "registered", "native", "mmdetection", "detectron2", "state-dict", "user-file",
    # "huggingface"
    checkpoint: Optional[Path] = None
    checkpoint_sha256: Optional[str] = None
    meta: Dict[str, Any] = field(default_factory=dict)

    @property
    def random_weights(self) -> bool:
        """A registered architecture built without weights (none given, none bundled): its
        offsets come from a random initialisation, not from training."""
        return self.source == "registered" and self.checkpoint is None

    def summary(self) -> Dict[str, Any]:
        summary = {
            "name": self.name,
            "arch": self.arch,
            "config": self.config,
            "source": self.source,
            "checkpoint": str(self.checkpoint) if self.checkpoint else None,
            "checkpoint_sha256": self.checkpoint_sha256,
            "preprocess": self.preprocess.as_dict(),
        }
        if (
            "import" in self.meta
        ):  # how a foreign checkpoint was mapped (layout, ignored keys, channel order)
            summary["import"] = self.meta["import"]
        if self.random_weights:
            summary["random_weights"] = True
            summary["random_weights_seed"] = RANDOM_WEIGHTS_SEED
            summary["note"] = RANDOM_WEIGHTS_NOTE
        return summary

    def titled(self, title: str) -> str:
        """A figure title, ending in "(random weights)" when :attr:`random_weights`."""
        return f"{title} ({RANDOM_WEIGHTS_TITLE})" if self.random_weights else title


def warn_non_finite_weights(loaded: LoadedModel) -> List[str]:
    """Warn (a :class:`~dcn_inspect.core.errors.DcnInspectWarning`) when weights hold NaN/Inf;
    returns the offending tensor names.

    A warning rather than an error: a broken head or unused buffer need not spoil the offsets.
    If the offsets themselves come out non-finite, :mod:`dcn_inspect.capture.session` stops
    with an error.

    """
    bad = [
        name
        for name, tensor in loaded.model.state_dict().items()
        if tensor.is_floating_point() and not _all_finite(tensor)
    ]
    if bad:
        source = loaded.checkpoint or loaded.name
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        warn(f"{source}: {len(bad)} weight tensor(s) contain NaN/Inf ({shown})")
        loaded.meta.setdefault("non_finite_weights", bad)
    return bad


def _all_finite(tensor: torch.Tensor) -> bool:
    """Whether every element is finite. A NaN or Inf makes the sum non-finite, so a finite sum
    settles it with one reduction; a non-finite sum (or an overflow) is checked element-wise
    (``isfinite(...).all()`` allocates a mask as large as the tensor: 10x slower on a ResNet-50)."""
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def model_device(loaded: LoadedModel) -> torch.device:
    """The device the model's parameters live on (CPU for a model without parameters)."""
    return next((p.device for p in loaded.model.parameters()), torch.device("cpu"))

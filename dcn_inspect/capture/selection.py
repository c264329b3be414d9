"""Which captured layers an analysis follows: by name, or the last few in call order."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

from dcn_inspect.capture import adapters
from dcn_inspect.capture.records import DeformConvRecord
from dcn_inspect.core.errors import InputError

__all__ = ["select_layers"]


def select_layers(
    convs: Dict[str, DeformConvRecord],
    names: Optional[Sequence[str]] = None,
    count: Optional[int] = None,
    *,
    default_count: Optional[int] = None,
    min_kernel_points: int = 1,
    model_name: str = "the model",
) -> List[DeformConvRecord]:
    """The records an analysis follows, in call order: those ``names``, or the last ``count``
    (``default_count`` when neither is given; ``None`` = all of them).

    Layers with fewer than ``min_kernel_points`` kernel points are not offered (a 1x1
    deformable conv has no pair of sampling points to measure a dilation between).
    """
    available = [
        name for name, record in convs.items() if record.kernel_points >= min_kernel_points
    ]
    if not available:
        looked_for = adapters.looked_for()
        raise InputError(
            f"{model_name}: the model ran no deformable conv layer that dcn-inspect recognises "
            f"on this input (looked for: {looked_for})",
            param="model",
        )
    if names and count is not None:
        raise InputError("and `levels`: give one or the other", param="layers")
    if names:
        wanted = list(dict.fromkeys(names))
        unknown = [name for name in wanted if name not in available]
        if unknown:
            raise InputError(
                f": unknown deformable layer(s) {', '.join(unknown)}; "
                f"valid: {', '.join(available)}",
                param="layers",
            )
        chosen = [name for name in available if name in wanted]
    else:
        if count is not None and not 1 <= count <= len(available):
            raise InputError(
                f"{count}: the model has {len(available)} deformable conv layer(s) "
                f"({', '.join(available)})",
                param="levels",
            )
        take = count if count is not None else default_count
        chosen = available if take is None else available[-take:]
    return [convs[name] for name in chosen]

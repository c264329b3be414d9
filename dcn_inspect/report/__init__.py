"""Figures made by the commands (one module per command): data in, matplotlib ``Figure`` out.

Public, for your own scripts (see the README's "Python API"):

- :func:`draw_sampling_figure` (``sample-points``): sampling trees of traced units over the image;
- :func:`draw_bins_figure` with :class:`RoIPanel` (``bins``): regular versus deformed RoI bins;
- :func:`draw_dilation_histograms` (``dilation-stats``): effective dilation per layer and category;
- :func:`draw_offsets_figure` (``offsets``): dense offset, magnitude and dilation maps per layer.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dcn_inspect.report.bins import RoIPanel, draw_bins_figure
    from dcn_inspect.report.dilation_stats import draw_dilation_histograms
    from dcn_inspect.report.offsets import draw_offsets_figure
    from dcn_inspect.report.sample_points import draw_sampling_figure

#: Public name -> its module. Imported on first use (PEP 562), so importing one report module
#: (e.g. ``report.info``, which draws nothing) does not import matplotlib with every figure.
_MODULES = {
    "RoIPanel": "dcn_inspect.report.bins",
    "draw_bins_figure": "dcn_inspect.report.bins",
    "draw_dilation_histograms": "dcn_inspect.report.dilation_stats",
    "draw_offsets_figure": "dcn_inspect.report.offsets",
    "draw_sampling_figure": "dcn_inspect.report.sample_points",
}

__all__ = [
    "RoIPanel",
    "draw_bins_figure",
    "draw_dilation_histograms",
    "draw_offsets_figure",
    "draw_sampling_figure",
]


def __getattr__(name: str) -> Any:
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_MODULES[name]), name)


def __dir__() -> list:
    return sorted([*globals(), *__all__])

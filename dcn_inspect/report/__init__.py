"""Figures made by the commands (one module per command): data in, matplotlib ``Figure`` out.

Public, for your own scripts (see the README's "Python API"):

- :func:`draw_sampling_figure` (``sample-points``): sampling trees of traced units over the image;
- :func:`draw_bins_figure` with :class:`RoIPanel` (``bins``): regular versus deformed RoI bins;
- :func:`draw_dilation_histograms` (``dilation-stats``): effective dilation per layer and category;
- :func:`draw_offsets_figure` (``offsets``): dense offset, magnitude and dilation maps per layer.
"""

from dcn_inspect.report.bins import RoIPanel, draw_bins_figure
from dcn_inspect.report.dilation_stats import draw_dilation_histograms
from dcn_inspect.report.offsets import draw_offsets_figure
from dcn_inspect.report.sample_points import draw_sampling_figure

__all__ = [
    "RoIPanel",
    "draw_bins_figure",
    "draw_dilation_histograms",
    "draw_offsets_figure",
    "draw_sampling_figure",
]

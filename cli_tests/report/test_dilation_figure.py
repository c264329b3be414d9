"""The figure of ``dcn-inspect dilation-stats`` (``dilation_hist.png``): its fixed layout keeps
every text inside the saved image and off every other panel's texts and axes, whatever the
panel count and however wide the density tick labels get."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.transforms import Bbox
from PIL import Image

from dcn_inspect.analysis.category_stats import CategoryStats
from dcn_inspect.io.outputs import write_figure
from dcn_inspect.report.dilation_stats import draw_dilation_histograms


def _stats(centre: float, spread: float, seed: int) -> CategoryStats:
    rng = np.random.default_rng(seed)
    values = np.abs(rng.normal(centre, spread, 3000)) + 1e-3
    stats = CategoryStats()
    stats.update(torch.from_numpy(values), torch.from_numpy(rng.integers(0, 4, size=3000)))
    return stats


#: (centre, spread) of the values: densities from about 1e-4 (wide: long tick labels such as
#: 0.00025) to about 1e2.
SCALES = [(2.0, 0.3), (3000.0, 900.0), (1.0, 0.004), (40.0, 9.0)]


def _layer_stats(count: int) -> Dict[str, CategoryStats]:
    return {
        f"backbone.layer{k}.conv2": _stats(*SCALES[k % len(SCALES)], seed=k) for k in range(count)
    }


def _text_boxes(figure, renderer) -> List[Tuple[int, str, Bbox]]:
    """(panel index, what, box) of every drawn text, and of each panel's axes frame."""
    boxes = []
    for k, axes in enumerate(figure.axes):
        texts = [("title", axes.title), ("xlabel", axes.xaxis.label), ("ylabel", axes.yaxis.label)]
        texts += [("offset", axes.yaxis.get_offset_text()), ("offset", axes.xaxis.offsetText)]
        for axis in (axes.xaxis, axes.yaxis):
            low, high = sorted(axis.get_view_interval())
            drawn = [t for t in axis.get_major_ticks() if low <= t.get_loc() <= high]
            texts += [("tick", tick.label1) for tick in drawn if tick.label1.get_visible()]
        for what, text in texts:
            if text.get_visible() and text.get_text():
                boxes.append((k, what, text.get_window_extent(renderer)))
        boxes.append((k, "frame", axes.get_window_extent(renderer)))
    return boxes


@pytest.mark.parametrize("count", [1, 2, 4, 13])
def test_texts_lie_inside_the_image_and_off_the_other_panels(tmp_path: Path, count: int) -> None:
    figure = draw_dilation_histograms(
        _layer_stats(count), "pixels", "paper", lambda t: f"{t} (a model, random weights)"
    )
    write_figure(tmp_path / "hist.png", figure, dpi=100)
    with Image.open(tmp_path / "hist.png") as saved:
        width, height = saved.size
    page = figure.bbox  # the figure's pixels at 100 dpi, as saved
    assert (width, height) == (int(page.width), int(page.height))
    renderer = FigureCanvasAgg(figure).get_renderer()
    figure.draw(renderer)
    boxes = _text_boxes(figure, renderer)
    suptitle = figure._suptitle.get_window_extent(renderer)
    for _, what, box in boxes + [(-1, "suptitle", suptitle)]:
        assert page.x0 <= box.x0 and box.x1 <= page.x1, (what, box, page)
        assert page.y0 <= box.y0 and box.y1 <= page.y1, (what, box, page)
    for k, what, box in boxes:
        assert not box.overlaps(suptitle), (k, what, box, suptitle)
        for other, other_what, other_box in boxes:
            if other != k:  # another panel's texts and frame
                assert not box.overlaps(other_box), (k, what, other, other_what)
    # Within a panel, the y tick labels stay off the y axis label, the x tick labels off the x
    # axis label, and the title above the frame.
    for k in range(count):
        own = {(what, i): box for i, (p, what, box) in enumerate(boxes) if p == k}
        frame = next(box for (what, _), box in own.items() if what == "frame")
        ylabel = next(box for (what, _), box in own.items() if what == "ylabel")
        title = next(box for (what, _), box in own.items() if what == "title")
        ticks = [box for (what, _), box in own.items() if what == "tick"]
        assert all(not t.overlaps(ylabel) for t in ticks)
        assert title.y0 >= frame.y1 - 1


def test_the_widest_tick_labels_get_their_room() -> None:
    """A panel whose densities need long labels (0.00025) moves every panel's frame right of
    where short labels (60) put it: the margin is measured, not a guess."""
    narrow = draw_dilation_histograms({"a": _stats(1.0, 0.004, 0)}, "cells", "paper")
    wide = draw_dilation_histograms({"a": _stats(3000.0, 900.0, 0)}, "cells", "paper")
    assert wide.axes[0].get_position().x0 > narrow.axes[0].get_position().x0

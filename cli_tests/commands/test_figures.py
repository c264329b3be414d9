"""Publication-ready figures (issue 14): sample-points panels, GIF, bins legend and links.

Figures are inspected as matplotlib objects (the plot functions return Figures; the commands'
figures are caught on their way to ``write_figure``) and GIFs are decoded with PIL.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pandas as pd
import pytest
import test_bins
import test_sample_points
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from dcn_inspect.analysis.sample_points import SamplingTrees
from dcn_inspect.commands import bins as bins_module
from dcn_inspect.commands import sample_points as sample_points_module
from dcn_inspect.commands.bins import bins
from dcn_inspect.commands.sample_points import sample_points
from dcn_inspect.report.bins import OP_EXTENT_LABELS, RoIPanel, draw_bins_figure, panel_limits
from dcn_inspect.report.sample_points import (
    BAND_MAX,
    GIF_LABEL_HEIGHT,
    POINT_COLOUR,
    UNIT_COLOUR,
    draw_sampling_figure,
    gif_frames,
    gif_position,
    view_limits,
)

# The tiny models and fixtures of the command tests this file draws with: the R-FCN heads and
# their image (test_bins), the tiny DCN model and its image (test_sample_points).
_bins_model = test_bins._loaded
_loaded = test_sample_points._loaded
workspace = test_bins.workspace
image_path = test_sample_points.image_path

TITLE_XY = re.compile(r"\(x, y\) = \((-?[\d.]+), (-?[\d.]+)\)")


def _catch_figures(monkeypatch: pytest.MonkeyPatch, module: Any) -> List[Figure]:
    """Keep every Figure ``module`` writes (and still write it)."""
    caught: List[Figure] = []
    original = module.write_figure

    def keep(path: Path, figure: Figure, **kwargs: Any) -> None:
        caught.append(figure)
        original(path, figure, **kwargs)

    monkeypatch.setattr(module, "write_figure", keep)
    return caught


def _legend_texts(fig: Figure) -> List[str]:
    return [text.get_text() for legend in fig.legends for text in legend.get_texts()]


def _trees(
    unit_xy: List[List[float]], xs: np.ndarray, ys: np.ndarray, weights: np.ndarray | None = None
) -> SamplingTrees:
    """One-level trees of U units with P points each, given in image pixels ([U, P] arrays)."""
    xs_t = torch.as_tensor(xs, dtype=torch.float64)
    units = len(unit_xy)
    return SamplingTrees(
        layers=["top"],
        kernel_points=[xs_t.shape[1]],
        units=torch.zeros(units, 2, dtype=torch.long),
        unit_xy=torch.tensor(unit_xy, dtype=torch.float64),
        xs=[xs_t],
        ys=[torch.as_tensor(ys, dtype=torch.float64)],
        weights=[
            torch.ones_like(xs_t)
            if weights is None
            else torch.as_tensor(weights, dtype=torch.float64)
        ],
        inside=[torch.ones_like(xs_t, dtype=torch.bool)],
    )


# --------------------------------------------------------------------------------------------
# sample-points figure


def test_panels_share_limits_and_scale_and_show_far_points_in_the_band() -> None:
    image = np.zeros((40, 60, 3), dtype=np.uint8)
    # Unit 0 stays on the image; unit 1 sends a point 200 px to the left of it.
    xs = np.array([[10.0, 20.0, 30.0], [30.0, -200.0, 50.0]])
    ys = np.array([[10.0, 20.0, 30.0], [5.0, 20.0, 35.0]])
    trees = _trees([[20.0, 20.0], [40.0, 20.0]], xs, ys)
    fig = draw_sampling_figure(image, trees, ["a", "b"])
    FigureCanvasAgg(fig).draw()
    limits = {(ax.get_xlim(), ax.get_ylim()) for ax in fig.axes}
    assert len(limits) == 1  # every panel the same view
    band = BAND_MAX * 60  # the far point needs more than the largest band: capped
    assert fig.axes[0].get_xlim() == pytest.approx((-band, 60 + band))
    assert fig.axes[0].get_ylim() == pytest.approx((40 + band, -band))  # y down
    scales = {
        round(ax.get_window_extent().width / (ax.get_xlim()[1] - ax.get_xlim()[0]), 6)
        for ax in fig.axes
    }
    assert len(scales) == 1  # the same pixels per image pixel in every panel
    # The far point is drawn on the band's left edge, not dropped and not off the axes.
    drawn_x = np.concatenate([c.get_offsets()[:, 0] for c in fig.axes[1].collections])
    assert drawn_x.min() == pytest.approx(-band, abs=0.1) and drawn_x.min() >= -band

    zoomed = draw_sampling_figure(image, trees, ["a", "b"], zoom=True)
    assert zoomed.axes[0].get_xlim() != zoomed.axes[1].get_xlim()
    assert zoomed.axes[1].get_xlim()[0] < -200  # the unit's own points decide its panel


def test_band_is_only_as_wide_as_the_points_need() -> None:
    xs = np.array([[-6.0, 10.0, 20.0]])  # 6 px left of the image
    trees = _trees([[10.0, 10.0]], xs, np.array([[5.0, 5.0, 5.0]]))
    view = view_limits(trees, [0], 100, 50)
    assert view.x0 == pytest.approx(-(6.0 + 1.0))  # overflow + 1 % of the longer side
    assert (view.x1, view.y0, view.y1) == pytest.approx((107.0, -7.0, 57.0))


def test_legend_names_unit_points_outside_and_mask_opacity() -> None:
    image = np.zeros((20, 20, 3), dtype=np.uint8)
    xs, ys = np.array([[5.0, 10.0, 15.0]]), np.array([[5.0, 10.0, 15.0]])
    plain = _legend_texts(draw_sampling_figure(image, _trees([[10.0, 10.0]], xs, ys), ["t"]))
    assert plain[0] == "unit"
    assert "sampling points, level 1 (top)" in plain
    assert "point outside the map it samples" in plain
    assert any(text.startswith("outside the image") for text in plain)
    assert not any("mask weight" in text for text in plain)  # no masks: no opacity key
    weighted = _legend_texts(
        draw_sampling_figure(
            image, _trees([[10.0, 10.0]], xs, ys, np.array([[1.0, 0.5, 0.1]])), ["t"]
        )
    )
    assert [t for t in weighted if "mask weight" in t] == [
        "mask weight 1 x the unit's largest (opacity)",
        "mask weight 0.5 x the unit's largest (opacity)",
        "mask weight <= 0.15 x the unit's largest (opacity)",
    ]
    zoomed = _legend_texts(
        draw_sampling_figure(image, _trees([[10.0, 10.0]], xs, ys), ["t"], zoom=True)
    )
    assert not any(text.startswith("outside the image") for text in zoomed)  # no band when zoomed


def test_grad_weight_marker_area_is_proportional_to_the_weight_and_zero_is_hollow() -> None:
    image = np.zeros((20, 20, 3), dtype=np.uint8)
    xs, ys = np.array([[4.0, 8.0, 12.0, 16.0, 10.0]]), np.array([[4.0, 8.0, 12.0, 16.0, 3.0]])
    trees = _trees([[10.0, 10.0]], xs, ys)
    weights = np.array([[8.0, 2.0, 0.1, 0.0, 4.0]])
    fig = draw_sampling_figure(
        image, trees, ["t"], size_weights=[torch.tensor(weights)], size_label="gradient weight"
    )
    filled = [c for c in fig.axes[0].collections if len(c.get_facecolors())]
    hollow = [c for c in fig.axes[0].collections if not len(c.get_facecolors())]
    points = filled[0]
    drawn = {tuple(xy): size for xy, size in zip(points.get_offsets(), points.get_sizes())}
    # Area / weight is one constant (no floor): the mean weight (2.82) gets the usual 6 pt^2.
    ratios = [drawn[(x, y)] / w for x, y, w in zip(xs[0], ys[0], weights[0]) if w > 0]
    assert ratios == pytest.approx([6.0 / weights.mean()] * 4)
    # The zero-weight point: hollow (no face), at the usual size, named in the legend.
    assert [tuple(xy) for c in hollow for xy in c.get_offsets()] == [(16.0, 16.0)]
    assert hollow[0].get_sizes() == pytest.approx([6.0])
    legend = _legend_texts(fig)
    assert "gradient weight = 0 (hollow)" in legend
    assert "gradient weight = the unit's mean (marker area proportional)" in legend


def _rendered(fig: Figure) -> np.ndarray:
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3]


def test_red_points_show_on_a_red_object() -> None:
    # A red image, one point at its middle (the unit far away): the point must differ from the
    # red around it (its edge), or it is invisible.
    red = tuple(int(POINT_COLOUR[i : i + 2], 16) for i in (1, 3, 5))
    image = np.empty((100, 100, 3), dtype=np.uint8)
    image[...] = red
    trees = _trees([[90.0, 90.0]], np.array([[50.0]]), np.array([[50.0]]))
    fig = draw_sampling_figure(image, trees, ["t"])
    pixels = _rendered(fig)
    ax = fig.axes[0]
    x, y = ax.transData.transform((50.0, 50.0))
    row, col = int(round(pixels.shape[0] - y)), int(round(x))
    patch = pixels[row - 4 : row + 5, col - 4 : col + 5].astype(int)
    assert (np.abs(patch - np.array(red)).sum(axis=-1) > 150).any()


@pytest.mark.parametrize(
    "units, options",
    [
        (1, {}),
        (1, {"color_by_level": True, "size_weights": True}),
        (2, {}),
        (5, {"zoom": True}),
        (9, {"size_weights": True}),
    ],
)
def test_every_legend_and_title_lies_inside_the_saved_image(
    units: int, options: Dict[str, Any], tmp_path: Path
) -> None:
    # Three levels with real layer names and DCNv2 weights: the longest legend there is.
    rng = np.random.default_rng(0)
    image = np.zeros((256, 256, 3), dtype=np.uint8)
    trees = _three_level_trees(rng, units)
    if options.pop("size_weights", False):
        options.update(
            size_weights=[torch.rand(*x.shape, dtype=torch.float64) for x in trees.xs],
            size_label="grad_weight |dr/dp|",
        )
    titles = [f"unit {k} at (x, y) = (128.5, 136.5)\nmedium: box 3 cross [26, 118, 110, 202]"
              for k in range(units)]  # fmt: skip
    title = "resnet50-dcn-mmdet: random weights (no --weights given), the offsets are untrained"
    fig = draw_sampling_figure(image, trees, titles, title=title, **options)
    fig.savefig(tmp_path / "figure.png")  # as the README's API example saves it (dpi 100)
    with Image.open(tmp_path / "figure.png") as saved:
        width, height = saved.size
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    boxes = [legend.get_window_extent(renderer) for legend in fig.legends]
    boxes += [ax.title.get_window_extent(renderer) for ax in fig.axes if ax.get_title()]
    assert len(fig.legends) == 1 and fig.legends[0].get_title().get_text()
    for box in boxes:
        assert box.x0 >= 0 and box.y0 >= 0, box
        assert box.x1 <= width and box.y1 <= height, (box, width, height)


def _three_level_trees(rng: np.random.Generator, units: int) -> SamplingTrees:
    counts = [9, 81, 729]
    xs = [torch.tensor(rng.uniform(0, 256, (units, n))) for n in counts]
    ys = [torch.tensor(rng.uniform(0, 256, (units, n))) for n in counts]
    return SamplingTrees(
        layers=["layer4.2.conv2", "layer4.1.conv2", "layer4.0.conv2"],
        kernel_points=[9, 9, 9],
        units=torch.zeros(units, 2, dtype=torch.long),
        unit_xy=torch.full((units, 2), 128.0, dtype=torch.float64),
        xs=xs,
        ys=ys,
        weights=[torch.tensor(rng.uniform(0, 1, (units, n))) for n in counts],
        inside=[torch.ones(units, n, dtype=torch.bool) for n in counts],
    )


def test_zoom_fits_each_panel_to_its_own_units_points() -> None:
    image = np.zeros((100, 200, 3), dtype=np.uint8)
    # Unit 0 reads a 20x10 px patch; unit 1 a 60x40 px one sticking out of the image's top.
    xs = np.array([[50.0, 70.0, 60.0], [100.0, 160.0, 130.0]])
    ys = np.array([[40.0, 50.0, 45.0], [-10.0, 30.0, 10.0]])
    trees = _trees([[52.0, 42.0], [110.0, 20.0]], xs, ys)
    fig = draw_sampling_figure(image, trees, ["a", "b"], zoom=True)
    for unit, ax in enumerate(fig.axes):
        (x0, x1), (y1, y0) = ax.get_xlim(), ax.get_ylim()
        lo_x, hi_x = xs[unit].min(), xs[unit].max()
        lo_y, hi_y = ys[unit].min(), ys[unit].max()
        assert x0 < lo_x and hi_x < x1 and y0 < lo_y and hi_y < y1  # every point shown
        # ... and the points fill the panel: 80 % of its width or of its height.
        assert max((hi_x - lo_x) / (x1 - x0), (hi_y - lo_y) / (y1 - y0)) >= 0.8
    assert len({round(ax.get_window_extent().width, 3) for ax in fig.axes}) == 1


def test_zoomed_gif_frames_fit_each_unit() -> None:
    image = np.full((100, 200, 3), 40, dtype=np.uint8)
    xs = np.array([[50.0, 70.0, 60.0], [100.0, 160.0, 130.0]])
    ys = np.array([[40.0, 50.0, 45.0], [-10.0, 30.0, 10.0]])
    trees = _trees([[52.0, 42.0], [110.0, 20.0]], xs, ys)
    red = np.array([int(POINT_COLOUR[i : i + 2], 16) for i in (1, 3, 5)])
    for unit, frame in enumerate(gif_frames(image, trees, zoom=True)):
        pixels = np.asarray(frame.convert("RGB"))[GIF_LABEL_HEIGHT:]
        rows, cols = np.nonzero((pixels == red).all(axis=-1))
        spread = max(np.ptp(cols) / pixels.shape[1], np.ptp(rows) / pixels.shape[0])
        assert spread >= 0.75, (unit, spread)  # the unit's points span its frame
        for k in range(3):  # each point where gif_position says
            x, y = gif_position(trees, (100, 200), xs[unit, k], ys[unit, k], unit=unit, zoom=True)
            near = (np.abs(cols - x) <= 3) & (np.abs(rows - (y - GIF_LABEL_HEIGHT)) <= 3)
            assert near.any(), (unit, k)


def test_titles_say_random_weights(
    image_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    figures = _catch_figures(monkeypatch, sample_points_module)
    random = _loaded()
    random.source, random.checkpoint = "registered", None  # a registered architecture, no weights
    assert random.random_weights
    sample_points([image_path], model=random, levels=1, out=tmp_path / "a", progress=False)
    sample_points([image_path], model=_loaded(), levels=1, out=tmp_path / "b", progress=False)
    assert "random weights" in figures[0].legends[0].get_title().get_text()
    assert not figures[1].legends[0].get_title().get_text()


def test_command_titles_give_the_csv_pixel_coordinates_and_the_category(
    image_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    figures = _catch_figures(monkeypatch, sample_points_module)
    boxes_csv = tmp_path / "boxes.csv"
    boxes_csv.write_text("x1,y1,x2,y2,class\n4,4,44,28,big\n30,18,38,26,small\n")
    result = sample_points(
        [image_path],
        model=_loaded(),
        boxes=boxes_csv,
        at=["10,10"],
        thresholds="100,900",
        out=tmp_path / "out",
        progress=False,
    )
    table = pd.read_csv(result.images[0].csv)
    units = table.groupby("unit")[["unit_x", "unit_y"]].first()
    titles = [ax.get_title() for ax in figures[0].axes]
    assert len(titles) == len(units) == 4
    for k, title in enumerate(titles):
        match = TITLE_XY.search(title)
        assert match, title
        assert (float(match.group(1)), float(match.group(2))) == pytest.approx(
            (units.loc[k, "unit_x"], units.loc[k, "unit_y"]), abs=0.05
        )
    # --at 10,10 (unit at 10.5, 10.5) lies in the big box (40x24 = 960 px² >= 900: large), then
    # background, the small box (64 px² < 100) and the big one.
    # The Python API names the parameter (the command line writes "--at 10,10").
    assert titles[0].endswith("large: box 0 big [4, 4, 44, 28] (at 10,10)")
    assert titles[1].endswith("\nbackground")
    assert titles[2].endswith("\nsmall: box 1 small [30, 18, 38, 26]")
    assert titles[3].endswith("\nlarge: box 0 big [4, 4, 44, 28]")
    legend = _legend_texts(figures[0])
    assert any("mask weight" in text for text in legend)  # the tiny model's top layer is DCNv2


def test_gif_frames_keep_the_green_unit_marker_and_a_label(
    image_path: Path, tmp_path: Path
) -> None:
    result = sample_points(
        [image_path],
        model=_loaded(),
        at=["3,3", "24,16", "44,30"],
        gif=True,
        out=tmp_path / "out",
        progress=False,
    )
    item = result.images[0]
    green = tuple(int(UNIT_COLOUR[i : i + 2], 16) for i in (1, 3, 5))
    strips = []
    with Image.open(item.gif) as animation:
        assert animation.n_frames == 3
        for k in range(animation.n_frames):
            animation.seek(k)
            frame = np.asarray(animation.convert("RGB"))
            x, y = gif_position(
                item.trees,
                (32, 48),
                float(item.trees.unit_xy[k, 0]),
                float(item.trees.unit_xy[k, 1]),
            )
            marker = frame[int(y) - 3 : int(y) + 4, int(x) - 3 : int(x) + 4]
            assert (marker == green).all(axis=-1).all(), (
                f"frame {k}: the unit marker lost its colour"
            )
            # The other units' places hold no marker in this frame.
            for other in range(3):
                if other != k:
                    ox, oy = gif_position(
                        item.trees,
                        (32, 48),
                        float(item.trees.unit_xy[other, 0]),
                        float(item.trees.unit_xy[other, 1]),
                    )
                    assert not (frame[int(oy), int(ox)] == green).all()
            strip = frame[:18]
            assert (strip == 255).all(axis=-1).any()  # white label text on the strip
            strips.append(strip)
    assert not np.array_equal(strips[0], strips[1])  # each frame its own label


# --------------------------------------------------------------------------------------------
# bins figure


def _panel(roi: tuple, op_roi: tuple, shift: float, k: int = 2) -> RoIPanel:
    x1, y1, x2, y2 = op_roi
    w, h = (x2 - x1) / k, (y2 - y1) / k
    regular = np.array(
        [
            [[x1 + j * w, y1 + i * h, x1 + (j + 1) * w, y1 + (i + 1) * h] for j in range(k)]
            for i in range(k)
        ]
    )
    deformed = regular + np.array([shift, -shift, shift, -shift])
    return RoIPanel("t", roi, regular, deformed, op_roi=op_roi)


def _box_lines(ax: Any) -> List[np.ndarray]:
    return [np.asarray(line.get_xydata()) for line in ax.lines if len(line.get_xdata()) == 2]


def test_bins_legend_and_every_deformed_bin_linked_to_its_regular_bin() -> None:
    image = np.zeros((100, 100, 3), dtype=np.uint8)
    large = _panel((10.0, 10.0, 90.0, 90.0), (10.0, 10.0, 90.0, 90.0), shift=4.0)
    fig = draw_bins_figure(image, [large], op_extent_label=OP_EXTENT_LABELS["psroi_pool"])
    assert _legend_texts(fig) == [
        "RoI",
        "regular bins",
        "deformed bins",
        "bin shift (from its regular bin's centre)",
    ]
    overlay = draw_bins_figure(image, [large], overlay=True)
    assert _legend_texts(overlay) == _legend_texts(fig)
    connectors = _box_lines(fig.axes[0])
    assert len(connectors) == 4
    for line, regular, deformed in zip(
        connectors, large.regular.reshape(-1, 4), large.deformed.reshape(-1, 4)
    ):
        assert line[0] == pytest.approx(
            [(regular[0] + regular[2]) / 2, (regular[1] + regular[3]) / 2]
        )
        assert line[1] == pytest.approx(
            [(deformed[0] + deformed[2]) / 2, (deformed[1] + deformed[3]) / 2]
        )


def test_small_roi_draws_the_extent_the_op_pools_and_says_so() -> None:
    image = np.zeros((100, 100, 3), dtype=np.uint8)
    # A 6 px RoI the PS op pools as 7 px (x2, y2 inclusive): a visible difference.
    small = _panel((40.0, 40.0, 46.0, 46.0), (40.0, 40.0, 47.0, 47.0), shift=1.0)
    fig = draw_bins_figure(image, [small], op_extent_label=OP_EXTENT_LABELS["psroi_pool"])
    assert OP_EXTENT_LABELS["psroi_pool"] in _legend_texts(fig)
    assert "+1" in OP_EXTENT_LABELS["psroi_pool"]
    rectangles = [
        (p.get_x(), p.get_y(), p.get_width(), p.get_height()) for p in fig.axes[0].patches
    ]
    assert (40.0, 40.0, 7.0, 7.0) in rectangles and (40.0, 40.0, 6.0, 6.0) in rectangles
    # The same 1 px on a large RoI is invisible: not drawn, not in the legend.
    large = _panel((10.0, 10.0, 90.0, 90.0), (10.0, 10.0, 91.0, 91.0), shift=1.0)
    assert OP_EXTENT_LABELS["psroi_pool"] not in _legend_texts(draw_bins_figure(image, [large]))


def test_large_roi_panel_holds_bins_that_fly_off_the_image_and_cuts_only_its_margin() -> None:
    # Issue 21: the panel holds every deformed bin (x up to 395, y down to -295) with a pad of
    # 2 % of the drawn extent (390 px: 7.8); only the context margin stops at the 5 % band.
    panel = _panel((5.0, 5.0, 95.0, 95.0), (5.0, 5.0, 95.0, 95.0), shift=300.0)
    x_min, x_max, y_min, y_max = panel_limits(panel, 100, 100)
    assert (x_min, x_max) == pytest.approx((-5.0, 395.0 + 7.8))
    assert (y_min, y_max) == pytest.approx((-295.0 - 7.8, 105.0))


def test_bins_command_draws_legend_links_and_the_small_rois_pooled_extent(
    workspace: Dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    figures = _catch_figures(monkeypatch, bins_module)
    result = bins(
        [workspace["image"]],
        model=_bins_model(workspace["module"], "build"),
        rois=["5,4,30,33", "20.2,20.2,23.2,23.2"],
        out=tmp_path,
        progress=False,
    )
    legend = _legend_texts(figures[0])
    assert legend[:4] == [
        "RoI",
        "regular bins",
        "deformed bins",
        "bin shift (from its regular bin's centre)",
    ]
    assert OP_EXTENT_LABELS["psroi_pool"] in legend
    small = figures[0].axes[1]
    extent = result.images[0].rois[1]["op_extent_original"]  # what summary.json says the op pooled
    assert extent == pytest.approx(
        [20.0, 20.0, 24.0, 24.0]
    )  # corners rounded, x2, y2 inclusive (+1)
    rectangles = [
        (p.get_x(), p.get_y(), p.get_x() + p.get_width(), p.get_y() + p.get_height())
        for p in small.patches
    ]
    assert any(r == pytest.approx(extent) for r in rectangles)
    assert len(_box_lines(small)) == 9  # a connector per bin of the 3x3 head


# --------------------------------------------------------------------------------------------
# README pictures


def test_every_readme_picture_is_written_by_make_figures() -> None:
    root = Path(__file__).resolve().parents[2]
    pictures = set(
        re.findall(r"sample_weights/examples/([\w.-]+\.png)", (root / "README.md").read_text())
    )
    makefile = (root / "Makefile").read_text()
    recipe = makefile.split("\nfigures:", 1)[1].split("\n\n", 1)[0]
    written = set(re.findall(r"cp \S+ \$\(EXAMPLES\)/([\w.-]+\.png)", recipe))
    assert pictures and pictures == written
    assert all((root / "sample_weights" / "examples" / name).is_file() for name in pictures)
    assert "dcn-inspect offsets" in makefile.split("\ndemo:", 1)[1].split("\n\n", 1)[0]


def test_make_figures_recipe_reproduces_the_readme_sampling_picture(tmp_path: Path) -> None:
    """Runs the recipe's own ``sample-points`` line (the bundled weights on ``FIGURE_IMAGE``) and
    finds the README's picture byte for byte: the committed figure is the code's current output."""
    root = Path(__file__).resolve().parents[2]
    makefile = (root / "Makefile").read_text()
    image = re.search(r"^FIGURE_IMAGE \?= (\S+)$", makefile, re.M).group(1)
    recipe = makefile.split("\nfigures:", 1)[1].split("\n\n", 1)[0]
    command = re.search(r"\$\(BIN\)/dcn-inspect (sample-points \S+) --out (\S+)", recipe)
    assert command and command.group(1) == "sample-points $(FIGURE_IMAGE)"
    copied = re.search(r"cp (\S+) \$\(EXAMPLES\)/sample_points\.png", recipe).group(1)
    stem = Path(image).stem
    written = copied.replace(command.group(2), str(tmp_path)).replace("$(FIGURE_STEM)", stem)
    subprocess.run(
        [sys.executable, "-m", "dcn_inspect", "sample-points", image, "--out", str(tmp_path)],
        cwd=root,
        check=True,
        capture_output=True,
    )
    expected = (root / "sample_weights" / "examples" / "sample_points.png").read_bytes()
    assert Path(written).read_bytes() == expected

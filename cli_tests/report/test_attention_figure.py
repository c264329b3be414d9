"""The figure of ``dcn-inspect attention`` (Deformable DETR, Fig. 6): one colour scale for every
panel, levels by marker shape, boxes on decoder panels only, a panel per head on request, the
query x layer grid, and a legend and colour bar inside the saved image at any panel count and
image shape."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PathCollection
from matplotlib.colors import to_hex
from matplotlib.patches import Rectangle
from PIL import Image

from dcn_inspect.io.outputs import write_figure
from dcn_inspect.report.attention import (
    BOX_COLOUR,
    MAX_PANELS,
    WEIGHT_LABEL,
    draw_attention_figure,
    grid_columns,
    panel_title,
    panels_left_out,
)

try:
    from dcn_inspect.analysis.attention import QueryPanel
except ImportError:  # until the analysis lands: the same contract

    @dataclass(frozen=True)
    class QueryPanel:  # type: ignore[no-redef]
        query: int
        kind: str
        layer: str
        reference: Optional[Tuple[float, float]]
        box: Optional[Tuple[float, float, float, float]]
        label: str
        points: pd.DataFrame


LEVELS, HEADS, POINTS = 4, 2, 2


def _points(rng: np.random.Generator, width: int, height: int, scale: float = 1.0) -> pd.DataFrame:
    rows = [
        (head, level, point, rng.uniform(0, width), rng.uniform(0, height), scale * rng.random())
        for head in range(HEADS)
        for level in range(LEVELS)
        for point in range(POINTS)
    ]
    return pd.DataFrame(rows, columns=["head", "feature_level", "point", "x", "y", "weight"])


def _panel(
    rng: np.random.Generator,
    query: int,
    layer: str = "model.decoder.layers.5.encoder_attn",
    kind: str = "decoder",
    size: Tuple[int, int] = (48, 64),
    scale: float = 1.0,
) -> QueryPanel:
    height, width = size
    box = (0.2 * width, 0.2 * height, 0.7 * width, 0.8 * height) if kind == "decoder" else None
    label = f"query {query}: class 2, score 0.83" if kind == "decoder" else f"token {query}"
    return QueryPanel(
        query, kind, layer, (0.5 * width, 0.5 * height), box, label,
        _points(rng, width, height, scale),
    )  # fmt: skip


def _image(height: int, width: int) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _image_axes(fig) -> List:  # type: ignore[no-untyped-def]
    return [ax for ax in fig.axes if ax.images]


def _colour_bars(fig) -> List:  # type: ignore[no-untyped-def]
    return [a for ax in fig.axes for a in [ax, *ax.child_axes] if a.get_label() == "<colorbar>"]


def _weight_points(ax) -> PathCollection:  # type: ignore[no-untyped-def]
    (points,) = [
        c for c in ax.collections if isinstance(c, PathCollection) and c.get_array() is not None
    ]
    return points


def _decoder_rows(rng: np.random.Generator, queries: int, layers: int) -> List[QueryPanel]:
    return [
        _panel(rng, query, f"model.decoder.layers.{layer}.encoder_attn")
        for query in range(queries)
        for layer in range(layers)
    ]


@pytest.mark.parametrize(
    "count, size, per_head",
    [
        (1, (48, 64), False),
        (4, (48, 64), False),
        (24, (48, 64), False),
        (1, (64, 640), False),  # wide
        (1, (640, 64), False),  # narrow and tall
        (24, (64, 640), False),
        (24, (640, 64), False),
        (3, (640, 64), True),
    ],
)
def test_legend_colour_bar_and_titles_lie_inside_the_saved_image(
    tmp_path: Path, count: int, size: Tuple[int, int], per_head: bool
) -> None:
    rng = np.random.default_rng(0)
    panels = [
        _panel(
            rng, q, f"model.encoder.layers.{q % 3}.self_attn", ("encoder", "decoder")[q % 2], size
        )
        for q in range(count)
    ]
    fig = draw_attention_figure(
        _image(*size), panels, LEVELS, HEADS, "a long figure title: model, image.jpg, weights",
        per_head=per_head,
    )  # fmt: skip
    write_figure(tmp_path / "attention.png", fig)
    with Image.open(tmp_path / "attention.png") as saved:
        width, height = saved.size
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    (bar,) = _colour_bars(fig)
    assert bar.get_xlabel() == WEIGHT_LABEL
    assert len(fig.legends) == 1 and fig.legends[0].get_title().get_text()
    boxes = [fig.legends[0].get_window_extent(renderer), bar.get_tightbbox(renderer)]
    boxes += [ax.title.get_window_extent(renderer) for ax in _image_axes(fig)]
    assert len(_image_axes(fig)) == count * (HEADS if per_head else 1)
    for box in boxes:
        assert box.x0 >= 0 and box.y0 >= 0, (box, width, height)
        assert box.x1 <= width and box.y1 <= height, (box, width, height)


def test_one_colour_scale_for_every_panel_up_to_the_figures_largest_weight() -> None:
    rng = np.random.default_rng(2)
    panels = [_panel(rng, q, scale=scale) for q, scale in enumerate((0.1, 0.9, 0.4))]
    top = max(float(p.points["weight"].max()) for p in panels)
    fig = draw_attention_figure(_image(48, 64), panels, LEVELS, HEADS, "t")
    (bar,) = _colour_bars(fig)
    norms = [_weight_points(ax).norm for ax in _image_axes(fig)]
    for norm in norms:
        assert (norm.vmin, norm.vmax) == (0.0, pytest.approx(top))
    assert bar.get_xlim() == pytest.approx((0.0, top))  # the colour bar's scale is theirs
    assert len({id(norm) for norm in norms}) == 1  # the very same scale object
    assert len({c.get_cmap().name for c in map(_weight_points, _image_axes(fig))}) == 1
    # The faint panel's strongest point is not the top of the scale; the figure's is.
    assert _weight_points(_image_axes(fig)[0]).get_array().max() < 0.2 * top
    assert _weight_points(_image_axes(fig)[1]).get_array().max() == pytest.approx(top)


def test_points_are_drawn_lightest_first_each_shaped_by_its_level() -> None:
    rng = np.random.default_rng(3)
    panel = _panel(rng, 0)
    fig = draw_attention_figure(_image(48, 64), [panel], LEVELS, HEADS, "t")
    points = _weight_points(_image_axes(fig)[0])
    drawn = np.asarray(points.get_array())
    assert len(drawn) == len(panel.points) and np.all(np.diff(drawn) >= 0)  # heaviest on top
    order = np.argsort(panel.points["weight"].to_numpy(), kind="stable")
    levels = panel.points["feature_level"].to_numpy()[order]
    shapes = [tuple(map(tuple, np.round(path.vertices, 6))) for path in points.get_paths()]
    assert len(shapes) == len(drawn)
    by_level = {
        level: {s for s, lv in zip(shapes, levels) if lv == level} for level in range(LEVELS)
    }
    assert all(len(found) == 1 for found in by_level.values())  # one shape per level
    assert len(set().union(*by_level.values())) == LEVELS  # and a different one for each
    assert np.allclose(points.get_offsets(), panel.points[["x", "y"]].to_numpy()[order])


def test_predicted_boxes_are_drawn_on_decoder_panels_only() -> None:
    rng = np.random.default_rng(4)
    panels = [
        _panel(rng, 0, kind="decoder"),
        _panel(rng, 1, "model.encoder.layers.0.self_attn", kind="encoder"),
    ]
    fig = draw_attention_figure(_image(48, 64), panels, LEVELS, HEADS, "t")
    boxes = [
        [p for p in ax.patches if isinstance(p, Rectangle) and p.get_edgecolor()[:3] != (0, 0, 0)
         and p.get_fill() is False]
        for ax in _image_axes(fig)
    ]  # fmt: skip
    assert [len(b) for b in boxes] == [1, 0]
    assert boxes[0][0].get_xy() == pytest.approx(panels[0].box[:2])  # type: ignore[index]
    texts = [t.get_text() for t in _image_axes(fig)[0].texts]
    assert texts == ["class 2, score 0.83"]
    assert len(_image_axes(fig)[1].texts) == 0
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend[:LEVELS] == ["level 0 (finest)", "level 1", "level 2", "level 3 (coarsest)"]
    assert "reference point" in legend and "predicted box" in legend
    assert to_hex(boxes[0][0].get_edgecolor()) == BOX_COLOUR
    encoder_only = draw_attention_figure(_image(48, 64), panels[1:], LEVELS, HEADS, "t")
    assert "predicted box" not in [t.get_text() for t in encoder_only.legends[0].get_texts()]


def test_per_head_gives_one_panel_per_query_and_head_with_only_its_points() -> None:
    rng = np.random.default_rng(5)
    panels = [_panel(rng, 0), _panel(rng, 1)]
    fig = draw_attention_figure(_image(48, 64), panels, LEVELS, HEADS, "t", per_head=True)
    axes = _image_axes(fig)
    assert len(axes) == len(panels) * HEADS
    assert axes[0].get_subplotspec().get_gridspec().ncols == HEADS  # a row per query panel
    for index, ax in enumerate(axes):
        panel, head = panels[index // HEADS], index % HEADS
        own = panel.points[panel.points["head"] == head]
        drawn = np.sort(np.asarray(_weight_points(ax).get_array()))
        assert np.allclose(drawn, np.sort(own["weight"].to_numpy()))
        assert ax.get_title().replace("\n", " ").endswith(f"head {head}")
    top = max(p.points["weight"].max() for p in panels)
    for points in map(_weight_points, axes):
        assert (points.norm.vmin, points.norm.vmax) == (0.0, pytest.approx(top))


def test_query_by_layer_panels_get_a_column_per_layer_and_others_four() -> None:
    rng = np.random.default_rng(6)
    grid = _decoder_rows(rng, queries=3, layers=6)
    assert grid_columns(grid, HEADS) == 6
    fig = draw_attention_figure(_image(48, 64), grid, LEVELS, HEADS, "t")
    axes = _image_axes(fig)
    assert axes[0].get_subplotspec().get_gridspec().ncols == 6
    assert [a.get_subplotspec().rowspan.start for a in axes] == [
        q for q in range(3) for _ in range(6)
    ]
    shuffled = [grid[1], grid[0], *grid[2:]]  # layers out of order: not a grid
    assert grid_columns(shuffled, HEADS) == 4
    assert grid_columns(grid[:2], HEADS) == 2  # one query, two layers
    assert grid_columns([_panel(rng, q) for q in range(7)], HEADS) == 4


def test_the_figure_caps_panels_at_whole_rows_and_says_how_many_it_left_out() -> None:
    rng = np.random.default_rng(7)
    grid = _decoder_rows(rng, queries=5, layers=6)  # 30 panels, 6 to a row: 4 rows shown
    assert MAX_PANELS == 24 and panels_left_out(grid, HEADS) == 6
    assert panels_left_out(grid[:24], HEADS) is None
    assert panels_left_out([_panel(rng, q) for q in range(30)], HEADS) == 6
    assert panels_left_out([_panel(rng, q) for q in range(4)], 8, per_head=True) == 1  # 3 x 8
    assert panels_left_out([_panel(rng, 0)], 32, per_head=True) is None  # one row at least


def test_titles_give_label_layer_and_reference_in_image_pixels() -> None:
    panel = QueryPanel(
        17, "decoder", "model.decoder.layers.5.encoder_attn", (312.4, 120.0), None,
        "query 17: class 2, score 0.83", _points(np.random.default_rng(8), 10, 10),
    )  # fmt: skip
    assert panel_title(panel) == (
        "query 17: class 2, score 0.83 · decoder.layers.5 · ref (312.4, 120.0)"
    )
    assert panel_title(panel, head=3).endswith(" · head 3")


def test_points_outside_the_image_stay_visible_in_the_margin_band() -> None:
    rng = np.random.default_rng(9)
    panel = _panel(rng, 0, kind="encoder")
    points = panel.points.copy()
    points.loc[0, ["x", "y"]] = (-5.0, 30.0)  # 5 px left of a 64 x 48 image
    points.loc[1, ["x", "y"]] = (5000.0, 30.0)  # far beyond: pinned to the band's edge
    fig = draw_attention_figure(
        _image(48, 64), [QueryPanel(**{**panel.__dict__, "points": points})], LEVELS, HEADS, "t"
    )
    ax = _image_axes(fig)[0]
    x0, x1 = ax.get_xlim()
    assert x0 < -5.0 and x1 > 64  # the near point is inside the view
    offsets = _weight_points(ax).get_offsets()
    assert offsets[:, 0].min() == pytest.approx(-5.0)
    assert x1 - 1 < offsets[:, 0].max() < x1  # the far one on the band's outer edge
    assert ax.get_ylim()[0] > ax.get_ylim()[1]  # y down, as in the image


def test_the_figure_renders_the_same_bytes_twice(tmp_path: Path) -> None:
    def render(path: Path) -> bytes:
        rng = np.random.default_rng(10)
        panels = _decoder_rows(rng, queries=2, layers=2)
        write_figure(path, draw_attention_figure(_image(48, 64), panels, LEVELS, HEADS, "t"))
        return path.read_bytes()

    assert render(tmp_path / "a.png") == render(tmp_path / "b.png")


def test_a_level_beyond_the_figures_levels_is_an_error() -> None:
    rng = np.random.default_rng(11)
    panel = _panel(rng, 0)
    points = panel.points.copy()
    points.loc[0, "feature_level"] = LEVELS
    with pytest.raises(ValueError, match="feature level 4 not in 0..3"):
        draw_attention_figure(
            _image(48, 64), [QueryPanel(**{**panel.__dict__, "points": points})], LEVELS, HEADS, "t"
        )

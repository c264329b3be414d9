"""Effective dilation (:mod:`dcn_inspect.analysis.dilation`), category assignment
(:mod:`dcn_inspect.analysis.size_categories`) and streaming statistics
(:mod:`dcn_inspect.analysis.category_stats`)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dcn_inspect.analysis.category_stats import BINS, CategoryStats, merge_states
from dcn_inspect.analysis.dilation import effective_dilation
from dcn_inspect.analysis.size_categories import (
    BACKGROUND,
    IGNORED,
    LARGE,
    MEDIUM,
    OUTSIDE,
    SMALL,
    area_category,
    resolve_thresholds,
    tertile_thresholds,
    unit_categories,
)
from dcn_inspect.core.errors import InputError
from dcn_inspect.core.geometry import FrameMap
from dcn_inspect.core.kernel_grid import sampling_locations

# ---------------------------------------------------------------------------------- dilation


@pytest.mark.parametrize(
    "kernel, dilation, expected",
    [
        ((3, 3), (1, 1), 1.0),
        ((5, 5), (2, 3), (20 * 3 + 20 * 2) / 40),  # 20 horizontal and 20 vertical pairs
        ((1, 3), (4, 2), 2.0),  # one row: only horizontal pairs
        ((3, 1), (4, 2), 4.0),  # one column: only vertical pairs
        ((2, 3), (2, 5), (4 * 5 + 3 * 2) / 7),  # 2x2 horizontal + 1x3 vertical pairs
    ],
)
def test_pairs_of_any_kernel_shape(kernel, dilation, expected):
    offset = torch.zeros(1, 2 * kernel[0] * kernel[1], 2, 2, dtype=torch.float64)
    torch.testing.assert_close(
        effective_dilation(offset, kernel, dilation),
        torch.full((1, 1, 2, 2), expected, dtype=torch.float64),
    )
    with pytest.raises(ValueError, match="at least two kernel points"):
        effective_dilation(torch.zeros(1, 2, 2, 2), (1, 1), (1, 1))


@pytest.mark.parametrize("dilation", [(1, 1), (2, 2), (2, 3)])
def test_zero_offsets_give_the_dilation(dilation):
    offset = torch.zeros(2, 2 * 2 * 9, 4, 5)
    cells = effective_dilation(offset, (3, 3), dilation)
    assert cells.shape == (2, 2, 4, 5)
    # 6 horizontal pairs at dilation_x, 6 vertical at dilation_y.
    torch.testing.assert_close(cells, torch.full_like(cells, (dilation[0] + dilation[1]) / 2))
    pixels = effective_dilation(offset, (3, 3), dilation, cell_size=(4.0, 8.0))
    torch.testing.assert_close(
        pixels, torch.full_like(cells, (6 * dilation[0] * 4.0 + 6 * dilation[1] * 8.0) / 12)
    )


def test_effective_dilation_matches_brute_force_on_sampling_locations():
    generator = torch.Generator().manual_seed(3)
    offset = torch.randn(1, 2 * 2 * 9, 3, 4, generator=generator, dtype=torch.float64) * 1.5
    dilation, cell = (2, 2), (3.0, 5.0)
    got = effective_dilation(offset, (3, 3), dilation, cell)
    ys, xs = sampling_locations(offset, (3, 3), (1, 1), (2, 2), dilation)  # [1, G, 9, Ho, Wo]
    for g in range(2):
        for i in range(3):
            for j in range(4):
                points = [
                    (float(ys[0, g, k, i, j]) * cell[0], float(xs[0, g, k, i, j]) * cell[1])
                    for k in range(9)
                ]
                distances = []
                for a in range(3):
                    for b in range(3):
                        if b + 1 < 3:
                            distances.append(math.dist(points[a * 3 + b], points[a * 3 + b + 1]))
                        if a + 1 < 3:
                            distances.append(math.dist(points[a * 3 + b], points[(a + 1) * 3 + b]))
                assert len(distances) == 12
                assert float(got[0, g, i, j]) == pytest.approx(sum(distances) / 12, rel=1e-12)


def test_uniform_spread_and_translation():
    offset = torch.zeros(1, 18, 2, 2)
    for a in range(3):
        for b in range(3):
            k = a * 3 + b
            offset[0, 2 * k] = 0.5 * (a - 1) + 7.0  # spread every step by 0.5, then translate
            offset[0, 2 * k + 1] = 0.5 * (b - 1) - 3.0
    torch.testing.assert_close(
        effective_dilation(offset, (3, 3), (2, 2)), torch.full((1, 1, 2, 2), 2.5)
    )


# ---------------------------------------------------------------------------------- categories

IDENTITY = FrameMap.image()  # unit (i, j) centred at (j + 0.5, i + 0.5)


def test_nested_boxes_smallest_decides():
    boxes = np.array([[0, 0, 10, 10], [2, 2, 4, 4]], dtype=np.float64)  # area 100 contains area 4
    codes = unit_categories(IDENTITY, (10, 10), (10, 10), boxes, np.zeros(2, bool), (5.0, 50.0))
    assert (
        codes[2, 2] == SMALL and codes[3, 3] == SMALL
    )  # centres (2.5, 2.5), (3.5, 3.5): inner box
    assert codes[6, 6] == LARGE and codes[0, 0] == LARGE  # only the outer box
    # The same boxes listed the other way round give the same answer.
    flipped = unit_categories(
        IDENTITY, (10, 10), (10, 10), boxes[::-1].copy(), np.zeros(2, bool), (5.0, 50.0)
    )
    np.testing.assert_array_equal(codes, flipped)


def test_box_edges_are_inclusive_and_border_boxes():
    # Centres at 0.5, 1.5, ...: a box from 0.5 to 2.5 has units 0, 1, 2 on or inside its edges.
    boxes = np.array([[0.5, 0.5, 2.5, 2.5]])
    codes = unit_categories(IDENTITY, (5, 5), (5, 5), boxes, np.zeros(1, bool), (5.0, 50.0))
    inside = codes == MEDIUM  # area 4 < 5 -> small; check below
    assert not inside.any()
    expected = np.full((5, 5), BACKGROUND)
    expected[0:3, 0:3] = SMALL
    np.testing.assert_array_equal(codes, expected)
    # A box touching the image border (after clipping) covers the border units.
    border = unit_categories(
        IDENTITY, (5, 5), (5, 5), np.array([[3.0, 0.0, 5.0, 5.0]]), np.zeros(1, bool), (5.0, 50.0)
    )
    assert (border[:, 3:] == MEDIUM).all() and (border[:, :3] == BACKGROUND).all()


def test_crowd_boxes_count_nowhere_unless_inside_a_real_box():
    boxes = np.array([[0, 0, 6, 6], [4, 4, 6, 6]], dtype=np.float64)
    ignore = np.array([True, False])
    codes = unit_categories(IDENTITY, (8, 8), (8, 8), boxes, ignore, (5.0, 50.0))
    assert codes[0, 0] == IGNORED  # inside the crowd box only
    assert codes[4, 4] == SMALL  # inside both: the real box decides (area 4)
    assert codes[7, 7] == BACKGROUND
    assert (codes != MEDIUM).all() and (codes != LARGE).all()


def test_centres_outside_the_image_count_nowhere():
    frame = FrameMap(4.0, 4.0, 2.0, 2.0)  # centres at 2, 6, 10, 14
    codes = unit_categories(
        frame, (4, 4), (10, 10), np.zeros((0, 4)), np.zeros(0, bool), (5.0, 50.0)
    )
    assert (codes[:3, :3] == BACKGROUND).all()  # centre 10 lies on the image edge: inside
    assert (codes[3, :] == OUTSIDE).all() and (codes[:, 3] == OUTSIDE).all()


def _categories_unit_by_unit(frame, output_hw, image_wh, boxes, ignore, thresholds):
    """The category rule written out for one unit at a time (the oracle)."""
    codes = np.empty(output_hw, dtype=np.int64)
    for i in range(output_hw[0]):
        for j in range(output_hw[1]):
            x, y = frame.to_image(float(j), float(i))
            holding = [
                n
                for n in range(len(boxes))
                if boxes[n, 0] <= x <= boxes[n, 2] and boxes[n, 1] <= y <= boxes[n, 3]
            ]
            real = [n for n in holding if not ignore[n]]
            if real:
                areas = [(boxes[n, 2] - boxes[n, 0]) * (boxes[n, 3] - boxes[n, 1]) for n in real]
                codes[i, j] = area_category(np.array([min(areas)]), thresholds)[0]
            elif holding:
                codes[i, j] = IGNORED
            else:
                codes[i, j] = (
                    BACKGROUND if 0 <= x <= image_wh[0] and 0 <= y <= image_wh[1] else OUTSIDE
                )
    return codes


@pytest.mark.parametrize("seed", range(12))
def test_categories_follow_the_unit_by_unit_rule_on_random_boxes(seed):
    rng = np.random.default_rng(seed)
    frame = FrameMap(
        float(rng.choice([1.0, 2.5, 4.0, 8.0])),
        float(rng.choice([1.0, 3.0, 8.0])),
        float(rng.uniform(-3, 3)),
        float(rng.uniform(-3, 3)),
    )
    output_hw = (int(rng.integers(1, 12)), int(rng.integers(1, 12)))
    image_wh = (int(rng.integers(5, 80)), int(rng.integers(5, 80)))
    corners = rng.uniform(-10, 90, size=(int(rng.integers(0, 8)), 2, 2))
    # Some edges exactly on unit centres (the inclusive rule), some boxes of equal area.
    corners[::3] = np.round(corners[::3])
    boxes = np.concatenate([corners.min(axis=1), corners.max(axis=1)], axis=1)
    if len(boxes) > 2:
        boxes[1] = boxes[0] + [7.0, 0.0, 7.0, 0.0]  # same area as box 0, shifted
    ignore = rng.random(len(boxes)) < 0.3
    thresholds = (100.0, 1200.0)
    expected = _categories_unit_by_unit(frame, output_hw, image_wh, boxes, ignore, thresholds)
    np.testing.assert_array_equal(
        unit_categories(frame, output_hw, image_wh, boxes, ignore, thresholds), expected
    )


def test_area_category_and_thresholds():
    np.testing.assert_array_equal(
        area_category(np.array([1.0, 5.0, 49.9, 50.0, 1e6]), (5.0, 50.0)),
        [SMALL, MEDIUM, MEDIUM, LARGE, LARGE],
    )
    assert resolve_thresholds("paper") == ("paper", (96.0**2, 224.0**2))
    assert resolve_thresholds("COCO") == ("coco", (1024.0, 9216.0))
    assert resolve_thresholds("100, 2e3") == ("custom", (100.0, 2000.0))
    assert resolve_thresholds("32^2,96^2") == ("custom", (1024.0, 9216.0))
    for bad, message in (
        ("1", "expected paper"),
        ("5,2", "0 < A < B"),
        ("a,b", "not a number"),
        ("tertiles", "at least 3"),
    ):
        with pytest.raises(InputError, match=message):
            resolve_thresholds(bad, np.zeros(0))


def test_tertiles_split_into_equal_thirds():
    areas = np.arange(1.0, 10.0)[::-1].copy()
    low, high = tertile_thresholds(areas)
    assert (low, high) == pytest.approx((1 + 8 / 3, 1 + 16 / 3))
    counts = np.bincount(area_category(areas, (low, high)), minlength=3)
    np.testing.assert_array_equal(counts, [3, 3, 3])
    assert resolve_thresholds("tertiles", areas) == ("tertiles", (low, high))


# ---------------------------------------------------------------------------------- statistics


def _stats_of(values: np.ndarray, codes: np.ndarray) -> CategoryStats:
    stats = CategoryStats()
    stats.update(torch.from_numpy(values), torch.from_numpy(codes))
    return stats


def test_statistics_match_numpy_and_skip_negative_codes():
    rng = np.random.default_rng(0)
    values = rng.gamma(3.0, 1.2, size=5000)
    codes = rng.integers(-2, 4, size=5000)
    stats = _stats_of(values, codes)
    rows = stats.summary_rows()
    for category in range(4):
        chosen = values[codes == category]
        assert rows[category]["count"] == len(chosen) == int(stats.hist[category].sum())
        assert rows[category]["mean"] == pytest.approx(chosen.mean(), rel=1e-12)
        assert rows[category]["std"] == pytest.approx(chosen.std(), rel=1e-10)
        for key, q in (("median", 0.5), ("p10", 0.1), ("p90", 0.9)):
            # Each order statistic is estimated within its 0.1 % bin.
            ordered = np.sort(chosen)
            rank = q * (len(chosen) - 1)
            assert (
                ordered[math.floor(rank)] / BINS.ratio
                <= rows[category][key]
                <= ordered[math.ceil(rank)] * BINS.ratio
            )
            assert rows[category][key] == pytest.approx(np.quantile(chosen, q), rel=BINS.ratio - 1)


def test_merged_shards_equal_the_whole():
    rng = np.random.default_rng(1)
    values = np.concatenate([rng.normal(3.0, 1.0, 3000).clip(0), np.zeros(5), np.full(3, 2e5)])
    codes = rng.integers(0, 4, size=values.size)
    whole = _stats_of(values, codes)
    cuts = [0, 7, 1000, 1001, 2500, values.size]
    shards = [_stats_of(values[a:b], codes[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
    merged = merge_states([{"layer": s} for s in shards[::-1]])["layer"]  # order does not matter
    assert torch.equal(merged.count, whole.count) and torch.equal(merged.hist, whole.hist)
    assert torch.equal(merged.minimum, whole.minimum) and torch.equal(merged.maximum, whole.maximum)
    torch.testing.assert_close(merged.mean, whole.mean, rtol=1e-12, atol=0)
    torch.testing.assert_close(merged.m2, whole.m2, rtol=1e-10, atol=0)
    assert merged.summary_rows()[2]["median"] == whole.summary_rows()[2]["median"]
    # Merging with an empty state changes nothing; a state survives the pickle-friendly round trip.
    empty = CategoryStats()
    again = CategoryStats.from_state(whole.state()).merge_(empty)
    assert torch.equal(again.count, whole.count) and torch.equal(again.mean, whole.mean)


def test_rows_updated_together_equal_one_state_per_row():
    from dcn_inspect.analysis.category_stats import CategoryStatsRows

    rng = np.random.default_rng(4)
    block = CategoryStatsRows()
    block.add_rows(3)
    single = [CategoryStats() for _ in range(3)]
    for batch, rows in enumerate(
        [[0, 1, 2], [1, 2], [2, 0], [0]]
    ):  # consecutive rows (views) and not (index)
        codes = rng.integers(0, 4, size=200 + 50 * batch)
        codes[:4] = [0, 1, 2, 3]
        values = rng.gamma(2.0, 1.5, size=(len(rows), codes.size))
        count = torch.bincount(torch.from_numpy(codes), minlength=4)
        total = torch.stack(
            [
                torch.bincount(torch.from_numpy(codes), weights=torch.from_numpy(v), minlength=4)
                for v in values
            ]
        )
        block.update(rows, torch.from_numpy(values), torch.from_numpy(codes), count, total)
        for k, row in enumerate(rows):
            single[row].update(torch.from_numpy(values[k]), torch.from_numpy(codes))
    for row, expected in enumerate(single):
        got = block.row(row)
        assert torch.equal(got.count, expected.count) and torch.equal(got.hist, expected.hist)
        assert torch.equal(got.minimum, expected.minimum) and torch.equal(
            got.maximum, expected.maximum
        )
        torch.testing.assert_close(got.mean, expected.mean, rtol=1e-12, atol=0)
        torch.testing.assert_close(got.m2, expected.m2, rtol=1e-10, atol=0)


def test_histogram_bins_hold_values_between_their_edges():
    rng = np.random.default_rng(5)
    values = torch.from_numpy(
        np.concatenate(
            [rng.uniform(0.0, 2e-3, 500), np.exp(rng.uniform(np.log(1e-3), np.log(1e5), 5000))]
        )
    )
    index = BINS.index(values)
    lower = torch.tensor([BINS.lower_edge(int(k)) for k in index], dtype=torch.float64)
    upper = torch.tensor([BINS.upper_edge(int(k)) for k in index], dtype=torch.float64)
    # Within rounding of an edge a value may sit in the neighbouring bin: 1e-12 relative.
    assert bool((values >= lower * (1 - 1e-12)).all()) and bool(
        (values < upper * (1 + 1e-12)).all()
    )
    assert BINS.index(torch.tensor([0.0, 1e-9, 1e9], dtype=torch.float64)).tolist() == [
        0,
        0,
        BINS.count - 1,
    ]


def test_constant_values_give_exact_percentiles_and_zero_std():
    stats = _stats_of(np.full(100, 2.5), np.zeros(100, dtype=np.int64))
    row = stats.summary_rows()[0]
    assert (row["mean"], row["std"], row["median"], row["p10"], row["p90"]) == (
        2.5,
        0.0,
        2.5,
        2.5,
        2.5,
    )
    empty = stats.summary_rows()[1]
    assert empty["count"] == 0 and all(
        math.isnan(empty[k]) for k in ("mean", "std", "median", "p10", "p90")
    )


def test_histogram_figure_densities_integrate_to_one():
    from dcn_inspect.report.dilation_stats import (
        category_density,
        display_bins,
        display_range,
        draw_dilation_histograms,
    )

    rng = np.random.default_rng(2)
    values = rng.normal(4.0, 0.3, 4000).clip(0.1)
    codes = rng.integers(0, 4, size=values.size)
    stats = _stats_of(values, codes)
    low, high = display_range(stats)  # the central 99 % of every category
    assert low == pytest.approx(
        min(np.quantile(values[codes == c], 0.005) for c in range(4)), rel=2e-3
    )
    assert high == pytest.approx(
        max(np.quantile(values[codes == c], 0.995) for c in range(4)), rel=2e-3
    )
    bins = display_bins(stats, low, high)
    assert 8 <= bins <= 60 and (high - low) / bins >= 2 * high * (BINS.ratio - 1)
    edges = np.linspace(low, high, bins + 1)
    for category in range(4):
        density = category_density(stats, category, edges)
        # Unit area over the displayed range (values outside it are left out of the curve).
        assert float((density * np.diff(edges)).sum()) == pytest.approx(1.0)
    figure = draw_dilation_histograms({"top": stats, "bottom": stats}, "cells", "paper")
    assert len(figure.axes) == 2 and figure.axes[0].get_title() == "top"


# --------------------------------------------------------------------------- bootstrap intervals


def _naive_bootstrap(sums, counts, resamples, seed):
    """The textbook percentile bootstrap over images, written out: all draws at once."""
    draws = np.random.default_rng(seed).integers(0, sums.shape[0], size=(resamples, sums.shape[0]))
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums[draws].sum(axis=1) / counts[draws].sum(axis=1)


def test_bootstrap_in_bounded_chunks_equals_all_draws_at_once(monkeypatch):
    import dcn_inspect.analysis.category_stats as category_stats

    rng = np.random.default_rng(3)
    counts = rng.integers(0, 50, size=(37, 4)).astype(np.float64)
    counts[:, 2] = 0  # an empty category: no interval
    sums = counts * rng.uniform(1.0, 6.0, size=(37, 4))
    monkeypatch.setattr(category_stats, "_BOOTSTRAP_ELEMENTS", 37 * 4 * 7)  # 7 resamples per chunk
    intervals, differences = category_stats.bootstrap_means(
        sums, counts, [(1, 0), (2, 0)], resamples=300, seed=5
    )
    means = _naive_bootstrap(sums, counts, 300, 5)
    np.testing.assert_allclose(
        intervals[[0, 1, 3]], np.percentile(means[:, [0, 1, 3]], [2.5, 97.5], axis=0).T, rtol=1e-14
    )
    assert np.isnan(intervals[2]).all()
    assert differences[(1, 0)] == pytest.approx(
        tuple(np.percentile(means[:, 1] - means[:, 0], [2.5, 97.5])), rel=1e-14
    )
    assert all(math.isnan(v) for v in differences[(2, 0)])


def test_difference_intervals_separate_shifted_categories_and_cover_zero_otherwise():
    from dcn_inspect.analysis.category_stats import bootstrap_means

    rng = np.random.default_rng(0)
    counts = rng.integers(20, 40, size=(60, 4)).astype(np.float64)
    per_image = rng.normal(0.0, 0.3, size=(60, 4)) + np.array(
        [2.0, 3.0, 3.0, 4.0]
    )  # medium == large
    sums = counts * per_image
    _, differences = bootstrap_means(sums, counts, [(1, 0), (2, 1), (3, 2)])
    assert differences[(1, 0)][0] > 0.5 and differences[(3, 2)][0] > 0.5  # clearly shifted
    assert differences[(2, 1)][0] < 0 < differences[(2, 1)][1]  # equal means: the interval covers 0

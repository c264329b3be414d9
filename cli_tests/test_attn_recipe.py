"""The recipe of ``dcn-attn-sample`` (``sample_weights/attn_recipe.py``): the assignment solver,
AP50 on hand-made cases, and the whole recipe on tiny settings (issue #23)."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dcn_inspect.models.loading import load_model

SAMPLE_WEIGHTS = Path(__file__).resolve().parents[1] / "sample_weights"
sys.path.insert(0, str(SAMPLE_WEIGHTS))  # the recipe lives beside the weights, outside the package

from attn_recipe import (  # noqa: E402
    CARD_HEADING,
    AttnTrainConfig,
    ap50,
    interpolated_ap,
    linear_sum_assignment,
    train_and_save,
    with_card_section,
)


def _brute_force(cost: np.ndarray) -> float:
    n, m = cost.shape
    if n <= m:
        return min(
            sum(cost[i, p[i]] for i in range(n)) for p in itertools.permutations(range(m), n)
        )
    return min(sum(cost[p[j], j] for j in range(m)) for p in itertools.permutations(range(n), m))


def test_assignment_is_optimal_on_random_rectangular_matrices() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        cost = rng.normal(size=(int(rng.integers(1, 5)), int(rng.integers(1, 6))))
        rows, columns = linear_sum_assignment(cost)
        assert len(rows) == min(cost.shape)
        assert len(set(rows.tolist())) == len(rows) and len(set(columns.tolist())) == len(rows)
        assert list(rows) == sorted(rows)
        assert cost[rows, columns].sum() == pytest.approx(_brute_force(cost), abs=1e-9)


def test_assignment_of_a_hand_made_matrix() -> None:
    # Greedy would take the cheapest pair (0, 0) first and pay 1 + 100.
    cost = np.array([[1.0, 2.0, 9.0], [2.0, 100.0, 50.0]])
    rows, columns = linear_sum_assignment(cost)
    assert rows.tolist() == [0, 1] and columns.tolist() == [1, 0]  # 2 + 2
    rows, columns = linear_sum_assignment(cost.T)  # more rows than columns
    assert rows.tolist() == [0, 1] and columns.tolist() == [1, 0]
    empty_rows, empty_columns = linear_sum_assignment(np.zeros((0, 4)))
    assert len(empty_rows) == len(empty_columns) == 0


def test_ap50_of_a_hand_made_case() -> None:
    """Class 0: boxes A (image 0) and B (image 1). Detections by score: A exactly (TP), a miss
    in image 0 (FP), A again (duplicate: FP), B shifted by 2 px (IoU 0.67: TP). Precision
    1, 1/2, 1/3, 1/2 at recall 1/2, 1/2, 1/2, 1; interpolated 1 up to recall 0.5 (51 of the
    101 points) and 1/2 above (50 points). Class 1 has a box but no detection: AP 0."""
    a, b = [0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]
    dets = [
        (np.array([0.9, 0.8, 0.75]), np.array([0, 0, 0]), np.array([a, [50, 50, 60, 60], a])),
        (np.array([0.7]), np.array([0]), np.array([[22.0, 20.0, 32.0, 30.0]])),
    ]
    truth = [
        (np.array([0, 1]), np.array([a, [40.0, 40.0, 50.0, 50.0]])),
        (np.array([0]), np.array([b])),
    ]
    per_class = ap50(dets, truth, classes=3)
    assert per_class[0] == pytest.approx((51 * 1.0 + 50 * 0.5) / 101)
    assert per_class[1] == 0.0
    assert np.isnan(per_class[2])  # no boxes of class 2
    # Only boxes of area >= 100 count, and the 10x10 boxes all are; a range that excludes them
    # leaves no counted box of class 0 and ignores the detections on them.
    assert np.isnan(ap50(dets, truth, classes=1, area_range=(200.0, 1e9))[0])
    assert interpolated_ap(np.array([True, True]), 2) == 1.0
    assert interpolated_ap(np.array([False, True]), 1) == pytest.approx(0.5)


def test_card_section_replaces_only_its_own_part() -> None:
    card = "# Model card: `dcn-sample`\n\ntext\n"
    first = with_card_section(card, f"{CARD_HEADING}\n\none\n")
    assert first.startswith(card) and first.endswith("one\n")
    second = with_card_section(first, f"{CARD_HEADING}\n\ntwo\n")
    assert second.startswith(card) and "one" not in second and second.endswith("two\n")


def test_tiny_recipe_writes_a_loadable_checkpoint_and_metrics(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    config = AttnTrainConfig(
        pool_scenes=2, steps=2, batch_size=2, warmup_steps=1, monitor_images=2, image_size=64
    )
    out = tmp_path / "dcn_attn_sample.pt"
    report = train_and_save(config, out, eval_seed=1000, eval_images=2, log=lambda _: None)
    saved = json.loads(out.with_suffix(".metrics.json").read_text())
    assert saved["sha256"] == report["sha256"] and saved["eval"]["images"] == 2
    assert set(saved["eval"]["ap50_per_class"]) == {"disc", "square", "triangle", "cross", "star"}
    loaded = load_model("dcn-attn-sample", weights=out)
    assert loaded.meta["train_config"]["steps"] == 2
    with pytest.raises(ValueError):
        train_and_save(config, out, eval_seed=0, eval_images=2, log=lambda _: None)

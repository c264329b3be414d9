"""``dcn-inspect attention --stats``: attention spread, level shares and weight inside the matched
box per object size, on a stand-in Deformable DETR with constant offsets and weights (every
value known by hand), on hand-made decoder calls, and the statistics' merge."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from dcn_inspect.analysis.attention import DecoderPredictions
from dcn_inspect.analysis.attention_stats import (
    DIFFERENCES_CSV,
    TABLE_CSV,
    AttentionAccumulator,
    QueryValues,
    decoder_values,
    match_queries,
    table_frame,
)
from dcn_inspect.analysis.dilation_tables import bootstrap_intervals
from dcn_inspect.capture.attention_calls import DECODER, AttentionRecord
from dcn_inspect.commands import csv_files
from dcn_inspect.commands.attention_stats import attention_stats
from dcn_inspect.core.columns import names
from dcn_inspect.core.geometry import FrameMap

TESTS = Path(__file__).resolve().parents[1]

# The stand-in's encoder attention with zero offset / weight layers and chosen biases: every
# token samples, in every level l, its reference + (1, 0) cells (head 0) or + (0, 2) cells
# (head 1), with the softmax weights WEIGHTS over (level, point). The 196x132 images enter at
# 98x66 (resize 66): levels of stride 4, 8, 16 model-input pixels, 8, 16, 32 original pixels.
STANDIN_SOURCE = """
import math
import sys
sys.path.insert(0, {tests!r})
import torch
from msda_standins import TinyDeformableDETR

PREPROCESS = {{"resize": 66, "max_size": 0}}
WEIGHTS = {weights!r}


def build():
    model = TinyDeformableDETR("official-function", heads=2, points=2, seed=1).eval()
    attn = model.encoder.layers[0].self_attn
    offsets = torch.zeros(2, 3, 2, 2)
    offsets[0, ..., 0] = 1.0
    offsets[1, ..., 1] = 2.0
    with torch.no_grad():
        attn.sampling_offsets.weight.zero_()
        attn.sampling_offsets.bias.copy_(offsets.reshape(-1))
        attn.attention_weights.weight.zero_()
        attn.attention_weights.bias.copy_(
            torch.tensor([math.log(w) for w in WEIGHTS] * 2)
        )
    return model


def build_random():
    model = TinyDeformableDETR("official-function", heads=2, points=2, seed=2).eval()
    with torch.no_grad():  # offsets and weights that differ per token
        for name, p in model.named_parameters():
            if "sampling_offsets" in name or "attention_weights" in name:
                p.add_(torch.randn_like(p) * 0.5)
    return model
"""
#: Softmax weights of (level, point), level-major: level shares 0.5, 0.2, 0.3.
WEIGHTS = [0.3, 0.2, 0.1, 0.1, 0.2, 0.1]
#: Head 0: sqrt(sum w (stride_l * 1)^2), original pixels (strides 8, 16, 32); head 1: twice it.
HEAD0 = math.sqrt(0.5 * 8**2 + 0.2 * 16**2 + 0.3 * 32**2)
SPREAD = (HEAD0 + 2 * HEAD0) / 2
#: Boxes (original pixels) and their finest-level tokens (centres at 3 + 8 j): small 10x10
#: (2 x 2 tokens), medium 30x30 (3 x 3), large 60x60 (8 x 8), a crowd box (4 x 4, counted
#: nowhere); the rest of the 24 x 16 tokens is background.
BOXES = [
    ([10, 10, 10, 10], 0, "small", 4, 10.0),
    ([60, 20, 30, 30], 0, "medium", 9, 30.0),
    ([120, 40, 60, 60], 0, "large", 64, 60.0),
    ([10, 80, 30, 30], 1, None, 16, None),
]
BACKGROUND_TOKENS = 24 * 16 - 4 - 9 - 64 - 16


def _coco(root: Path, images: int, with_boxes: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    listed, annotations = [], []
    for i in range(images):
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 255, (132, 196, 3), dtype=np.uint8)).save(
            root / f"im{i}.png"
        )
        listed.append({"id": i + 1, "file_name": f"im{i}.png", "width": 196, "height": 132})
        for k, (bbox, crowd, *_rest) in enumerate(BOXES if with_boxes else []):
            annotations.append(
                {"id": 10 * i + k, "image_id": i + 1, "bbox": bbox, "category_id": 1,
                 "iscrowd": crowd, "area": bbox[2] * bbox[3]}
            )  # fmt: skip
    path = root / "annotations.json"
    path.write_text(
        json.dumps(
            {"images": listed, "annotations": annotations, "categories": [{"id": 1, "name": "x"}]}
        )
    )
    return path


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    root = tmp_path_factory.mktemp("attention_stats")
    model = root / "standin.py"
    model.write_text(STANDIN_SOURCE.format(tests=str(TESTS), weights=WEIGHTS))
    return {
        "root": root,
        "model": f"{model}:build",
        "random": f"{model}:build_random",
        "coco": _coco(root / "coco", 2),
    }


def test_constant_offsets_give_hand_worked_spreads_and_level_shares(ws, tmp_path):
    torch.set_num_threads(1)
    result = attention_stats(
        ws["coco"], model=ws["model"], thresholds="400,1600", out=tmp_path, progress=False
    )
    table = pd.read_csv(tmp_path / "attention_table.csv")
    assert list(table.columns) == names(TABLE_CSV)
    assert set(table["kind"]) == {"encoder"}  # the stand-in's output has no logits or boxes
    assert any("decoder rows left out" in note for note in result.notes)
    layer = "encoder.layers.0.self_attn"
    rows = table[table["layer"] == layer].set_index(["measure", "feature_level", "category"])
    counts = {name: 2 * tokens for _, _, name, tokens, _ in BOXES if name}
    counts["background"] = 2 * BACKGROUND_TOKENS
    for category, count in counts.items():
        spread = rows.loc[("spread_px", np.nan, category)]
        assert spread["count"] == count
        assert spread["mean"] == pytest.approx(SPREAD, rel=1e-5)
        assert spread["ci_low"] == pytest.approx(SPREAD, rel=1e-5)
        assert spread["ci_high"] == pytest.approx(SPREAD, rel=1e-5)
        for level, share in enumerate((0.5, 0.2, 0.3)):
            row = rows.loc[("level_share", level, category)]
            assert row["mean"] == pytest.approx(share, rel=1e-5) and row["count"] == count
    for _, _, category, _, side in BOXES[:3]:
        relative = rows.loc[("spread_rel", np.nan, category)]
        assert relative["mean"] == pytest.approx(SPREAD / side, rel=1e-5)
    assert rows.loc[("spread_rel", np.nan, "background")]["count"] == 0
    differences = pd.read_csv(tmp_path / "attention_differences.csv")
    assert list(differences.columns) == names(DIFFERENCES_CSV)
    spread = differences[(differences["layer"] == layer) & (differences["measure"] == "spread_px")]
    assert np.allclose(spread["difference"], 0.0, atol=1e-4)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["tokens_not_counted"][layer] == {"ignored_box": 32, "centre_outside_image": 0}
    assert summary["images"]["used"] == 2
    assert set(summary["columns"]) == {"attention_table.csv", "attention_differences.csv"}
    markdown = (tmp_path / "attention_table.md").read_text()
    assert f"| {layer} L0 |" in markdown and "Attention spread_rel (encoder queries)" in markdown
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["attention_table.csv", "attention_differences.csv", "attention_table.md", "summary.json"]
    )
    assert csv_files()["attention_table.csv"] == TABLE_CSV


def _values(rng: np.random.Generator, count: int, levels: int = 3) -> QueryValues:
    share = rng.random((count, levels))
    spread = rng.random(count) * 50 + 1
    return QueryValues(
        codes=rng.integers(-2, 4, count),
        spread_px=spread,
        spread_rel=np.where(rng.random(count) < 0.8, spread / 30, np.nan),
        level_share=share / share.sum(1, keepdims=True),
    )


def test_merged_ranks_equal_one_pass():
    rng = np.random.default_rng(0)
    images = [(index, _values(rng, int(rng.integers(5, 40)))) for index in range(7)]
    one = AttentionAccumulator()
    ranks = [AttentionAccumulator(), AttentionAccumulator()]
    for index, values in images:
        one.add_values("encoder", "enc.0", index, values)
        ranks[index % 2].add_values("encoder", "enc.0", index, values)
    merged = AttentionAccumulator()
    for rank in ranks:
        merged.merge(rank.state())
    first = table_frame(one, bootstrap_intervals(one.image_sums))
    second = table_frame(merged, bootstrap_intervals(merged.image_sums))
    pd.testing.assert_frame_equal(first, second, rtol=1e-9)
    assert merged.not_counted == one.not_counted


def test_torchrun_two_ranks_equal_one_process(ws, tmp_path):
    coco = _coco(tmp_path / "five", 5)
    common = [
        "attention",
        "--stats",
        str(coco),
        "--model",
        ws["random"],
        "--thresholds",
        "400,1600",
    ]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", "2", "-m", "dcn_inspect"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    two = subprocess.run(launcher + common + ["--out", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("Attention spread_px") == 1  # only rank 0 prints
    attention_stats(
        coco, model=ws["random"], thresholds="400,1600", out=tmp_path / "one", progress=False
    )
    for name in ("attention_table.csv", "attention_differences.csv"):
        one = pd.read_csv(tmp_path / "one" / name)
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "two" / name), one, rtol=1e-5)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["distributed"] == {"world_size": 2, "backend": "gloo"}
    assert summary["images"]["used"] == 5


def _decoder_record(xy: np.ndarray, weights: np.ndarray, refs: np.ndarray) -> AttentionRecord:
    """A one-level decoder call on a 10 x 10 map whose cell j is centred at model-input pixel
    j + 0.5 (stride 1): normalised x = pixel / 10. ``xy`` [Q, H, P, 2] pixels."""
    queries = xy.shape[0]
    return AttentionRecord(
        name="dec.0", module_type="MSDeformAttn", captured_by="test", kind=DECODER,
        locations=torch.tensor(xy[None] / 10.0), weights=torch.tensor(weights[None]),
        queries=torch.arange(queries), query_count=queries, point_level=(0, 0),
        spatial_shapes=((10, 10),), level_frames=(FrameMap(1.0, 1.0, 0.5, 0.5),),
        frame_methods=("hooks",), reference_points=torch.tensor(refs[None, :, None] / 10.0),
    )  # fmt: skip


def test_decoder_queries_are_matched_greedily_by_score_and_measured():
    boxes = np.array([[0, 0, 4, 4], [5, 5, 9, 9], [0, 5, 4, 9], [6, 0, 9, 3]], dtype=float)
    ignore = np.array([False, False, False, True])
    predictions = DecoderPredictions(
        scores=np.array([0.2, 0.9, 0.5, 0.8, 0.7]),
        labels=np.zeros(5, np.int64),
        boxes=np.array(
            [
                [0, 0, 4, 4],  # box 0 exactly, but after query 3 took it
                [5, 5, 9, 8],  # box 1 (IoU 0.75)
                [6, 0, 9, 3],  # only the ignored box
                [0, 0, 4, 3],  # box 0 (IoU 0.75), the higher score
                [0, 5, 2, 7],  # box 2 at IoU 0.25: below 0.5
            ],
            dtype=float,
        ),
    )
    pairs = match_queries(predictions, boxes, ignore)
    assert pairs == [(1, 1), (3, 0)]
    # Query 1: two points (reference (7, 7)) at distance 1 inside box 1 and 3 outside it.
    xy = np.zeros((5, 2, 2, 2))
    weights = np.full((5, 2, 2), 0.5)
    xy[1, 0] = [[8, 7], [7, 10]]  # head 0: (8, 7) inside, (7, 10) outside, distances 1 and 3
    xy[1, 1] = [[7, 6], [7, 8]]  # head 1: both inside, distance 1
    weights[1, 0] = [0.75, 0.25]
    xy[3] = [[[2, 2], [2, 2]], [[2, 2], [2, 2]]]  # query 3: at its reference, inside box 0
    refs = np.tile([[7.0, 7.0]], (5, 1))
    refs[3] = [2.0, 2.0]
    values = decoder_values(
        _decoder_record(xy, weights, refs), pairs, (2.0, 2.0), boxes * 2, (40.0, 100.0)
    )
    head0 = math.sqrt(0.75 * 2**2 + 0.25 * 6**2)  # original pixels: everything times 2
    assert values.spread_px[0] == pytest.approx((head0 + 2.0) / 2)
    assert values.spread_px[1] == pytest.approx(0.0)
    assert values.spread_rel[0] == pytest.approx((head0 + 2.0) / 2 / 8.0)  # box 1: 8 x 8 px
    assert values.inside.tolist() == pytest.approx([(0.75 + 1.0) / 2, 1.0])
    assert values.codes.tolist() == [1, 1]  # areas 64 px²: medium between 40 and 100


def _cli(args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dcn_inspect", *args],
        capture_output=True, text=True, timeout=180, cwd=cwd,
    )  # fmt: skip


def test_bad_inputs_give_one_line_and_write_nothing(ws, tmp_path):
    bare = _coco(tmp_path / "bare", 1, with_boxes=False)
    out = tmp_path / "out"
    done = _cli(["attention", "--stats", str(bare), "--model", ws["model"], "--out", str(out)],
                tmp_path)  # fmt: skip
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stderr
    assert "no ground-truth box" in lines[0]
    mixed = _cli(["attention", "--stats", "--query", "3", "--out", str(out)], tmp_path)
    lines = mixed.stderr.strip().splitlines()
    assert mixed.returncode == 1 and lines == [
        "dcn-inspect: error: --query is not read with --stats"
    ]
    images_only = _cli(["attention", "--max-images", "3", "--out", str(out)], tmp_path)
    lines = images_only.stderr.strip().splitlines()
    assert images_only.returncode == 1 and lines == [
        "dcn-inspect: error: --max-images needs --stats"
    ]
    assert not out.exists()

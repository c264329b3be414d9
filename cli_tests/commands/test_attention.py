"""``dcn-inspect attention``: every CSV row equals what the real transformers op used.

The model is a real (tiny, random-weight) transformers Deformable DETR, built from a config in a
``file.py:build`` (nothing downloaded). An independent recorder wraps transformers' own core
module (``MultiScaleDeformableAttention.forward``, at class level) and keeps the
``sampling_locations`` / ``attention_weights`` it received; the expected image positions are
computed here by hand: every level of this backbone (HF ResNet: conv 7x7/2 pad 3, max pool 3/2
pad 1, stride-2 3x3 convs with pad 1, then the extra 3x3/2 pad 1 level) has cell j centred at
``0.5 + stride * j`` model-input pixels, and the bundled 512x512 images enter at their own size.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import raises_cli
from typer.testing import CliRunner

from dcn_inspect.analysis.attention import ATTENTION_CSV
from dcn_inspect.commands.attention import attention
from dcn_inspect.core.columns import names, present

transformers = pytest.importorskip("transformers")

MODEL_SOURCE = """
import torch
from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection, ResNetConfig

PREPROCESS = {"resize": 0}


def build():
    config = DeformableDetrConfig(
        use_timm_backbone=False, use_pretrained_backbone=False,
        backbone_config=ResNetConfig(
            embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
            out_features=["stage2", "stage3", "stage4"],
        ),
        num_queries=12, encoder_layers=2, decoder_layers=2, d_model=32,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_n_points=2,
        decoder_n_points=3, num_feature_levels=4, encoder_ffn_dim=32, decoder_ffn_dim=32,
        num_labels=3,
    )
    torch.manual_seed(0)
    model = DeformableDetrForObjectDetection(config)
    with torch.no_grad():  # offsets and weights that differ per query (the init is a ring)
        for name, p in model.named_parameters():
            if "sampling_offsets" in name or "attention_weights" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return model.eval()
"""

#: Strides of the four levels (model-input pixels); every level's cell 0 is centred at 0.5.
STRIDES = (8, 16, 32, 64)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("model") / "tiny_detr.py"
    path.write_text(MODEL_SOURCE)
    return f"{path}:build"


@pytest.fixture()
def real_calls(monkeypatch: pytest.MonkeyPatch) -> List[Dict[str, Any]]:
    """What transformers' core module received, call by call (an independent record)."""
    from transformers.models.deformable_detr import modeling_deformable_detr as detr

    calls: List[Dict[str, Any]] = []
    original = detr.MultiScaleDeformableAttention.forward

    @functools.wraps(original)  # keeps the signature capture reads the arguments by
    def recorded(self: Any, value: Any, spatial_shapes: Any, shapes_list: Any, *args: Any) -> Any:
        locations, weights = args[1], args[2]  # after level_start_index
        calls.append(
            {
                "locations": locations.detach().clone(),
                "weights": weights.detach().clone(),
                "shapes": [tuple(s) for s in shapes_list],
            }
        )
        return original(self, value, spatial_shapes, shapes_list, *args)

    monkeypatch.setattr(detr.MultiScaleDeformableAttention, "forward", recorded)
    return calls


def _image() -> Path:
    from dcn_inspect.io.datasets import bundled_images

    return Path(bundled_images()[0])


def _expected_xy(call: Dict[str, Any], query: int, head: int, level: int, point: int) -> tuple:
    height, width = call["shapes"][level]
    x, y = call["locations"][0, query, head, level, point].double().tolist()
    stride = STRIDES[level]
    return 0.5 + stride * (x * width - 0.5), 0.5 + stride * (y * height - 0.5)


def test_every_decoder_row_is_the_point_the_real_op_sampled(
    model_file: str, real_calls: List[Dict[str, Any]], tmp_path: Path
) -> None:
    result = attention([_image()], model=model_file, out=tmp_path, progress=False, top=3)
    table = pd.read_csv(result.images[0].csv)
    assert list(table.columns) == names(present(ATTENTION_CSV, decoder=True))
    decoder_calls = [c for c in real_calls if c["locations"].shape[1] == 12]
    assert len(decoder_calls) == 2 and len(real_calls) == 4  # 2 encoder + 2 decoder layers
    # 3 queries x 2 layers x 2 heads x 4 levels x 3 points
    assert len(table) == 3 * 2 * 2 * 4 * 3
    layers = ["model.decoder.layers.0.encoder_attn", "model.decoder.layers.1.encoder_attn"]
    assert sorted(set(table["layer"])) == layers
    for row in table.itertuples():
        call = decoder_calls[layers.index(row.layer)]
        x, y = _expected_xy(call, row.query, row.head, row.feature_level, row.point)
        assert abs(row.x - x) < 1e-3 and abs(row.y - y) < 1e-3
        weight = float(call["weights"][0, row.query, row.head, row.feature_level, row.point])
        assert abs(row.weight - weight) < 1e-5
    # Each query's weights sum to 1 per head (the op's softmax over levels x points).
    sums = table.groupby(["query", "layer", "head"])["weight"].sum()
    assert np.allclose(sums.to_numpy(), 1.0, atol=1e-4)


def test_decoder_queries_are_the_top_ones_by_the_models_own_score(
    model_file: str, tmp_path: Path
) -> None:
    from dcn_inspect.models.loading import load_model

    loaded = load_model(model_file)
    from dcn_inspect.io.images import load_image, to_model_input

    image = load_image(_image(), 10**8, loaded.preprocess)
    with torch.no_grad():
        output = loaded.model(to_model_input(image, loaded.preprocess).tensor)
    scores = output.logits[0].sigmoid().max(-1).values
    expected = torch.argsort(-scores, stable=True)[:3].tolist()
    result = attention([_image()], model=loaded, out=tmp_path, progress=False, top=3)
    assert result.images[0].queries == expected
    table = pd.read_csv(result.images[0].csv)
    assert list(dict.fromkeys(table["query"])) == expected
    for query in expected:
        rows = table[table["query"] == query]
        assert np.allclose(rows["score"], float(scores[query]), atol=1e-5)
        cx, cy, w, h = output.pred_boxes[0, query].double().tolist()
        assert np.allclose(rows["box_x0"], (cx - w / 2) * 512, atol=1e-3)
        assert np.allclose(rows["box_y1"], (cy + h / 2) * 512, atol=1e-3)
    summary = json.loads(result.summary.read_text())
    assert summary["images"][0]["queries"]["chosen"] == "top 3 by class score"
    described = [c["name"] for c in summary["columns"]["<stem>_attention.csv"]]
    assert described == list(table.columns)


def test_encoder_query_is_the_token_nearest_to_at(
    model_file: str, real_calls: List[Dict[str, Any]], tmp_path: Path
) -> None:
    # (100, 37) on the stride-8 level (64 x 64 cells): nearest centre 0.5 + 8 j -> column 12
    # (96.5), row 5 (40.5): token 5 * 64 + 12 = 332.
    result = attention(
        [_image()], model=model_file, out=tmp_path, progress=False, queries="encoder",
        at=["100,37"],
    )  # fmt: skip
    table = pd.read_csv(result.images[0].csv)
    assert set(table["query"]) == {332} and set(table["kind"]) == {"encoder"}
    assert list(table.columns) == names(present(ATTENTION_CSV, decoder=False))
    encoder_calls = [c for c in real_calls if c["locations"].shape[1] != 12]
    for row in table.itertuples():
        call = encoder_calls[int(row.layer.split(".")[3])]
        x, y = _expected_xy(call, 332, row.head, row.feature_level, row.point)
        assert abs(row.x - x) < 1e-3 and abs(row.y - y) < 1e-3
    # The reference point of the token's own level is its cell centre.
    own = table[table["feature_level"] == 0]
    assert np.allclose(own["ref_x"], 96.5) and np.allclose(own["ref_y"], 40.5)
    # On feature level 1 (32 x 32, stride 16): column 6 (96.5), row 2 (32.5): 4096 + 70.
    result = attention(
        [_image()], model=model_file, out=tmp_path / "l1", progress=False, queries="encoder",
        at=["100,37"], feature_level=1,
    )  # fmt: skip
    assert result.images[0].queries == [64 * 64 + 2 * 32 + 6]


def _written(out: Path) -> List[str]:
    return sorted(p.name for p in out.iterdir()) if out.exists() else []


@pytest.mark.parametrize(
    "options, pattern",
    [
        ({"query": [12]}, r"--query 12: no such object query; .* has 12 \(0..11\)"),
        (
            {"queries": "encoder", "feature_level": 4},
            r"--feature-level 4: no such feature level; the attention has 4 \(0..3\)",
        ),
        (
            {"queries": "encoder", "query": [1]},
            r"--query: picks decoder queries; encoder tokens are picked with --at",
        ),
        (
            {"queries": "decoder", "at": ["3,3"]},
            r"--at: picks encoder tokens; decoder queries are picked with --query or --top",
        ),
        (
            {"queries": "encoder", "at": ["600,3"]},
            r"--at 600,3: outside photo_astronaut.jpg \(512x512 pixels\)",
        ),
        (
            {"layers": ["model.encoder.layers.0.self_attn"]},
            r"--layers model.encoder.layers.0.self_attn: not a decoder attention layer",
        ),
        ({"queries": "sideways"}, r"--queries sideways: must be decoder or encoder"),
        ({"top": 0}, r"--top 0: must be 1 or more"),
    ],
)
def test_bad_queries_get_one_line_and_nothing_written(
    model_file: str, tmp_path: Path, options: Dict[str, Any], pattern: str
) -> None:
    out = tmp_path / "out"
    with raises_cli(pattern, "attention"):
        attention([_image()], model=model_file, out=out, progress=False, **options)
    assert not [name for name in _written(out) if name.endswith((".csv", ".png", ".json"))]


def test_a_model_without_attention_is_told_what_was_looked_for(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with raises_cli(
        r"--model dcn-sample: the model ran no multi-scale deformable attention .*"
        r"\(it ran 3 deformable conv layer\(s\)\); looked for .*MSDeformAttn",
        "attention",
    ):
        attention([_image()], model="dcn-sample", out=out, progress=False)
    assert _written(out) == []


def test_the_command_line_writes_csv_figure_and_summary(model_file: str, tmp_path: Path) -> None:
    from dcn_inspect.cli import app

    out = tmp_path / "cli"
    done = CliRunner().invoke(
        app,
        ["attention", str(_image()), "--model", model_file, "--top", "2", "--per-head",
         "--out", str(out)],
    )  # fmt: skip
    assert done.exit_code == 0, done.output
    stem = _image().stem
    assert _written(out) == [f"{stem}_attention.csv", f"{stem}_attention.png", "summary.json"]
    assert "decoder queries" in done.output
    # A point off the image: one line from the real entry point, before torch is imported.
    refused = subprocess.run(
        [sys.executable, "-m", "dcn_inspect", "attention", str(_image()), "--model", model_file,
         "--queries", "encoder", "--at", "999,1", "--out", str(tmp_path / "refused")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert refused.returncode != 0
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and f"--at 999,1: outside {_image().name}" in lines[0], lines
    assert not (tmp_path / "refused").exists()


STANDIN_SOURCE = """
import sys
sys.path.insert(0, {tests!r})
from msda_standins import TinyDeformableDETR

PREPROCESS = {{"resize": 0}}


def build():
    model = TinyDeformableDETR("official-function", seed=3).eval()
    import torch
    with torch.no_grad():  # offsets and weights that differ per query and point
        for name, p in model.named_parameters():
            if "sampling_offsets" in name or "attention_weights" in name:
                p.add_(torch.randn_like(p) * 0.5)
    return model
"""


def test_rows_equal_the_official_msdeformattn_calls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deformable-DETR's calling convention (``MSDeformAttn`` -> ``MSDeformAttnFunction.apply``):
    the CSV holds what the core received, through frames known by hand (a 3x3/2 stem without
    padding, then 3x3/2 pad-1 convs: every level's cell j centred at 1.5 + stride * j)."""
    import msda_official_functions as functions
    from PIL import Image

    calls: List[Dict[str, Any]] = []
    core = functions.ms_deform_attn_core_pytorch

    def recorded(value: Any, shapes: Any, locations: Any, weights: Any) -> Any:
        calls.append({"locations": locations.detach().clone(), "weights": weights.detach()})
        return core(value, shapes, locations, weights)

    monkeypatch.setattr(functions, "ms_deform_attn_core_pytorch", recorded)
    model = tmp_path / "standin.py"
    model.write_text(STANDIN_SOURCE.format(tests=str(Path(__file__).resolve().parents[1])))
    image = tmp_path / "wide.png"
    Image.fromarray(np.full((66, 98, 3), 120, np.uint8)).save(image)
    result = attention(
        [image], model=f"{model}:build", out=tmp_path / "out", progress=False, query=[3, 0]
    )
    table = pd.read_csv(result.images[0].csv)
    assert list(dict.fromkeys(table["query"])) == [3, 0]
    assert "score" not in table.columns  # the stand-in's output has no class logits
    decoder = calls[1]  # encoder first, then decoder
    shapes, strides = [(16, 24), (8, 12), (4, 6)], [4, 8, 16]
    for row in table.itertuples():
        h, w = shapes[row.feature_level]
        x, y = decoder["locations"][0, row.query, row.head, row.feature_level, row.point].tolist()
        stride = strides[row.feature_level]
        assert abs(row.x - (1.5 + stride * (x * w - 0.5))) < 1e-3
        assert abs(row.y - (1.5 + stride * (y * h - 0.5))) < 1e-3
        weight = decoder["weights"][0, row.query, row.head, row.feature_level, row.point]
        assert abs(row.weight - float(weight)) < 1e-5
    assert set(table["layer"]) == {"decoder.layers.0.cross_attn"}


def test_encoder_trees_start_with_the_tokens_own_points(model_file: str, tmp_path: Path) -> None:
    """Depth 1 of a token's tree is its points in the last encoder layer, weights / heads; the
    tree goes one encoder layer deeper per depth (default 2 here: two encoder layers)."""
    from dcn_inspect.commands.attention import TREE_CSV

    result = attention(
        [_image()], model=model_file, out=tmp_path, progress=False, queries="encoder",
        at=["100,37", "300,400"],
    )  # fmt: skip
    item = result.images[0]
    tree = pd.read_csv(item.tree_csv)
    assert list(tree.columns) == names(TREE_CSV)
    assert item.tree_figure is not None and item.tree_figure.exists()
    points = pd.read_csv(item.csv)
    last = "model.encoder.layers.1.self_attn"
    for query in item.queries:
        own = points[(points["query"] == query) & (points["layer"] == last)]
        depth1 = tree[(tree["query"] == query) & (tree["depth"] == 1)]
        assert set(depth1["layer"]) == {last} and len(depth1) == len(own)
        assert np.allclose(depth1["x"].to_numpy(), own["x"].to_numpy(), atol=1e-4)
        assert np.allclose(depth1["weight"].to_numpy(), own["weight"].to_numpy() / 2, atol=1e-6)
        depth2 = tree[(tree["query"] == query) & (tree["depth"] == 2)]
        assert set(depth2["layer"]) == {"model.encoder.layers.0.self_attn"}
        inside = depth2["weight"].sum()  # corners outside the maps drop out
        assert 0.5 < inside <= 1 + 1e-6
    summary = json.loads(result.summary.read_text())
    assert summary["images"][0]["tree"]["levels"] == 2
    assert "<stem>_attention_tree.csv" in summary["columns"]


def test_tree_levels_beyond_the_encoder_are_refused(model_file: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with raises_cli(r"--levels 3: a tree from model.encoder.layers.1.self_attn", "attention"):
        attention(
            [_image()], model=model_file, out=out, progress=False, queries="encoder", levels=3
        )
    assert _written(out) == []
    single = attention(
        [_image()], model=model_file, out=tmp_path / "one", progress=False, queries="encoder",
        levels=1,
    )  # fmt: skip
    assert single.images[0].tree_csv is None
    assert _written(tmp_path / "one") == sorted(
        [f"{_image().stem}_attention.csv", f"{_image().stem}_attention.png", "summary.json"]
    )


def test_offsets_draws_the_attention_weighted_mean_displacement(
    model_file: str, real_calls: List[Dict[str, Any]], tmp_path: Path
) -> None:
    """``offsets`` on an attention model: per encoder layer, each finest-level token's mean over
    heads of sum_p w_p (point_p - reference_p), from what the real op received."""
    from dcn_inspect.commands.offsets import offsets

    result = offsets([_image()], model=model_file, out=tmp_path, progress=False)
    assert result.layers == ["model.encoder.layers.1.self_attn", "model.encoder.layers.0.self_attn"]
    maps = result.images[0].maps
    call = real_calls[1]  # encoder layer 1
    assert maps[0].mean.dx.shape == call["shapes"][0]  # the finest level: 64 x 64
    width = call["shapes"][0][1]
    for token in (0, 5 * width + 12, 63 * width + 63):
        dx = dy = 0.0
        heads = call["locations"].shape[2]
        for head in range(heads):
            for level in range(4):
                h, w = call["shapes"][level]
                stride = STRIDES[level]
                # Encoder reference: the token's own cell centre, normalised on every level.
                row, col = divmod(token, width)
                ref_x = 0.5 + stride * (((col + 0.5) / 64) * w - 0.5)
                ref_y = 0.5 + stride * (((row + 0.5) / 64) * h - 0.5)
                for point in range(2):
                    x, y = _expected_xy(call, token, head, level, point)
                    weight = float(call["weights"][0, token, head, level, point])
                    dx += weight * (x - ref_x) / heads
                    dy += weight * (y - ref_y) / heads
        row, col = divmod(token, width)
        assert abs(maps[0].mean.dx[row, col] - dx) < 1e-3
        assert abs(maps[0].mean.dy[row, col] - dy) < 1e-3


def test_info_lists_the_attention_calls(model_file: str) -> None:
    from dcn_inspect.commands.info import model_info
    from dcn_inspect.models.loading import load_model

    info = model_info(load_model(model_file))
    assert [(a.name, a.kind, a.heads, a.points_per_level) for a in info.attention] == [
        ("model.encoder.layers.0.self_attn", "encoder", 2, (2, 2, 2, 2)),
        ("model.encoder.layers.1.self_attn", "encoder", 2, (2, 2, 2, 2)),
        ("model.decoder.layers.0.encoder_attn", "decoder", 2, (3, 3, 3, 3)),
        ("model.decoder.layers.1.encoder_attn", "decoder", 2, (3, 3, 3, 3)),
    ]
    assert info.attention[0].level_strides_px == ((8, 8), (16, 16), (32, 32), (64, 64))
    assert info.attention[2].queries == 12
    assert "MultiScaleDeformableAttention module" in info.attention[0].captured_by

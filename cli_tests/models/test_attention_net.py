"""The ``dcn-attn-sample`` architecture, its bundled weights and what the attention capture
records of it (issue #23)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dcn_inspect.capture.attention_calls import DECODER, ENCODER
from dcn_inspect.capture.session import probe
from dcn_inspect.models import registry
from dcn_inspect.models.attention_net import (
    WEIGHTS_ENV,
    AttnDetNet,
    MSDeformAttn,
    ms_deform_attn_core_pytorch,
)
from dcn_inspect.models.demo_net import WEIGHTS_DIR
from dcn_inspect.models.loading import load_model

SAMPLE_WEIGHTS = Path(__file__).resolve().parents[2] / "sample_weights"
WEIGHTS = SAMPLE_WEIGHTS / "dcn_attn_sample.pt"
ENCODER_CALLS = ("encoder.0.self_attn", "encoder.1.self_attn")
DECODER_CALLS = ("decoder.0.cross_attn", "decoder.1.cross_attn", "decoder.2.cross_attn")


@pytest.fixture(scope="module")
def trained() -> AttnDetNet:
    torch.set_num_threads(1)
    return load_model("dcn-attn-sample").model  # type: ignore[return-value]


def test_registered_with_bundled_weights_and_no_resize() -> None:
    arch = registry.get("dcn-attn-sample")
    assert arch.bundled_weights == WEIGHTS_DIR / "dcn_attn_sample.pt"
    assert arch.preprocess.resize == 0
    assert WEIGHTS_ENV != "DCN_INSPECT_SAMPLE_WEIGHTS"


def test_output_shapes_in_eval_and_training_mode() -> None:
    torch.manual_seed(0)
    model = registry.get("dcn-attn-sample").build().eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 96))
    assert set(out) == {"pred_logits", "pred_boxes"}
    assert out["pred_logits"].shape == (2, 24, 5) and out["pred_boxes"].shape == (2, 24, 4)
    assert bool(((out["pred_boxes"] > 0) & (out["pred_boxes"] < 1)).all())
    model.train()
    out = model(torch.randn(1, 3, 64, 64))
    assert len(out["aux_outputs"]) == 2
    assert out["aux_outputs"][0]["pred_boxes"].shape == (1, 24, 4)


def test_attention_module_starts_as_the_paper_says() -> None:
    attn = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=3)
    bias = attn.sampling_offsets.bias.view(4, 2, 3, 2)
    # Head h points along its ring direction, point k at k + 1 cells, every level alike.
    assert torch.allclose(bias[0, 0], torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]]))
    assert torch.allclose(bias[1, 1, 2], torch.tensor([0.0, 3.0]), atol=1e-6)
    assert torch.equal(attn.sampling_offsets.weight, torch.zeros_like(attn.sampling_offsets.weight))
    assert not attn.attention_weights.weight.any() and not attn.attention_weights.bias.any()


def test_core_reads_cell_centres_exactly() -> None:
    """A location at a cell's centre ((j + 0.5) / W, (i + 0.5) / H) reads that cell's value
    (grid_sample, align_corners=False); one point per level with weight 1 on level 1."""
    torch.manual_seed(0)
    shapes = torch.tensor([[3, 4], [2, 2]])
    value = torch.randn(1, 16, 2, 5)  # 12 + 4 tokens, 2 heads of 5 channels
    locations = torch.zeros(1, 1, 2, 2, 1, 2)
    locations[..., 1, 0, :] = torch.tensor([1.5 / 2, 0.5 / 2])  # level 1, cell (row 0, col 1)
    weights = torch.zeros(1, 1, 2, 2, 1)
    weights[..., 1, 0] = 1.0
    out = ms_deform_attn_core_pytorch(value, shapes, locations, weights)
    assert torch.allclose(out.view(2, 5), value[0, 12 + 1], atol=1e-6)


def test_bundled_weights_load_as_a_native_checkpoint(trained: AttnDetNet) -> None:
    loaded = load_model("dcn-attn-sample")
    assert loaded.arch == "dcn-attn-sample" and loaded.source == "native"
    assert WEIGHTS.stat().st_size < 3 * 2**20
    assert not trained.training


def test_capture_records_every_encoder_and_decoder_call(trained: AttnDetNet) -> None:
    torch.manual_seed(0)
    result = probe(trained, torch.randn(1, 3, 64, 64))
    records = result.capture.attention
    assert tuple(records) == ENCODER_CALLS + DECODER_CALLS
    tokens = 8 * 8 + 4 * 4 + 2 * 2
    for name, record in records.items():
        assert record.module_type == "MSDeformAttn"
        assert record.spatial_shapes == ((8, 8), (4, 4), (2, 2))
        assert record.heads == 4 and record.points_per_level == (4, 4, 4)
        encoder = name.startswith("encoder")
        assert record.kind == (ENCODER if encoder else DECODER)
        assert record.query_count == (tokens if encoder else 24)
        assert record.reference_points is not None
        assert record.reference_points.shape[-1] == (2 if encoder else 4)
    first = records["encoder.0.self_attn"].reference_points[0, :, 0]
    assert torch.allclose(first[:2], torch.tensor([[0.5 / 8, 0.5 / 8], [1.5 / 8, 0.5 / 8]]))
    frames = records["encoder.0.self_attn"].level_frames
    assert [f.stride_x for f in frames] == [8, 16, 32]


def test_trained_queries_find_the_held_out_shapes(trained: AttnDetNet) -> None:
    """On held-out scenes the trained model's highest-scoring queries cover the shapes; the
    same architecture with random weights does not."""
    sys.path.insert(0, str(SAMPLE_WEIGHTS))
    from attn_recipe import evaluate, evaluation_scenes

    scenes = evaluation_scenes(1000, 4)
    torch.manual_seed(0)
    random_model = registry.get("dcn-attn-sample").build()
    trained_iou = evaluate(trained, scenes)["mean_best_iou"]
    random_iou = evaluate(random_model, scenes)["mean_best_iou"]
    assert trained_iou > 0.45, trained_iou
    assert trained_iou > random_iou + 0.3, (trained_iou, random_iou)
    assert np.isfinite(trained_iou)

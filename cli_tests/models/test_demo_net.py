"""The ``dcn-sample`` architecture, its dilated baseline and the bundled weights (issue #4)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dcn_inspect.capture.session import probe
from dcn_inspect.models import registry
from dcn_inspect.models.checkpoint import read_checkpoint_file
from dcn_inspect.models.demo_net import WEIGHTS_DIR, WEIGHTS_ENV, DemoNet, _weights
from dcn_inspect.ops import DeformConv2dPack, DeformPSRoIPool

TOP_LAYERS = ("layer4.0.conv2", "layer4.1.conv2", "layer4.2.conv2")


def _inputs() -> tuple:
    torch.manual_seed(0)
    images = torch.randn(2, 3, 64, 64)
    rois = torch.tensor([[0, 4.0, 6.0, 40.0, 50.0], [1, 10.0, 10.0, 60.0, 30.0]])
    return images, rois


def test_both_architectures_are_registered_with_bundled_weight_paths() -> None:
    deformable = registry.get("dcn-sample")
    dilated = registry.get("dcn-sample-dilated")
    assert (
        deformable.bundled_weights is not None
        and deformable.bundled_weights.name == "dcn_sample.pt"
    )
    assert dilated.bundled_weights == WEIGHTS_DIR / "dcn_sample_dilated.pt"
    assert deformable.preprocess.resize == 0


def test_weights_path_can_be_overridden_by_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "mine.pt"))
    assert _weights("dcn_sample.pt", WEIGHTS_ENV) == tmp_path / "mine.pt"
    monkeypatch.delenv(WEIGHTS_ENV)
    assert _weights("dcn_sample.pt", WEIGHTS_ENV) == WEIGHTS_DIR / "dcn_sample.pt"


def test_outputs_and_deformable_layers_as_in_the_paper() -> None:
    model = registry.get("dcn-sample").build().eval()
    modules = dict(model.named_modules())
    for name in TOP_LAYERS:
        layer = modules[name]
        assert isinstance(layer, DeformConv2dPack)
        assert layer.kernel_size == (3, 3) and layer.dilation == (2, 2) and layer.padding == (2, 2)
        assert not layer.conv_offset.weight.any() and not layer.conv_offset.bias.any()
    assert (
        isinstance(modules["psroi_pool"], DeformPSRoIPool) and modules["psroi_pool"].group_size == 3
    )
    images, rois = _inputs()
    with torch.no_grad():
        out = model(images, rois=rois)
        seg_only = model(images)
    assert out["seg"].shape == (2, 6, 64, 64) and out["roi_logits"].shape == (2, 6)
    assert set(seg_only) == {"seg"}


def test_zero_offsets_make_the_deformable_net_equal_to_the_dilated_one() -> None:
    torch.manual_seed(1)
    dilated = DemoNet(deformable=False).eval()
    deformable = DemoNet(deformable=True).eval()
    state = dilated.state_dict()
    missing = deformable.load_state_dict(state, strict=False).missing_keys
    assert missing and all("conv_offset" in key for key in missing)
    images, rois = _inputs()
    with torch.no_grad():
        a, b = dilated(images, rois=rois), deformable(images, rois=rois)
    assert torch.allclose(a["seg"], b["seg"], atol=1e-4)
    assert torch.allclose(a["roi_logits"], b["roi_logits"], atol=1e-4)


def test_probe_sees_the_three_deformable_layers_in_order_and_the_roi_pooling() -> None:
    model = registry.get("dcn-sample").build().eval()
    images, rois = _inputs()
    result = probe(model, images, rois=rois)
    assert tuple(result.convs) == TOP_LAYERS
    record = result.convs["layer4.2.conv2"]
    assert record.offset.shape == (2, 18, 8, 8)
    assert record.geometry.method == "hooks" and record.geometry.input_frame.stride_x == 8
    assert "psroi_pool" in result.capture.roi_pools


def test_bundled_weights_load_and_have_learned_offsets() -> None:
    from dcn_inspect.models.loading import load_model

    for name, file_name in (
        ("dcn-sample", "dcn_sample.pt"),
        ("dcn-sample-dilated", "dcn_sample_dilated.pt"),
    ):
        path = WEIGHTS_DIR / file_name
        assert path.stat().st_size <= 10 * 1024 * 1024
        payload = read_checkpoint_file(path)
        assert payload["arch"] == name and payload["meta"]["eval"]["seg_miou"] > 0
    loaded = load_model("dcn-sample")
    assert loaded.checkpoint == WEIGHTS_DIR / "dcn_sample.pt"
    offsets = [m.conv_offset.weight for n, m in loaded.model.named_modules() if n in TOP_LAYERS]
    assert len(offsets) == 3 and all(w.abs().max() > 1e-3 for w in offsets)

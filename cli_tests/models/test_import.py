"""Checkpoint import: mmdetection and detectron2 layouts (DCN and DCNv2), key problems, user files.

Synthetic checkpoints are written by the tests in each library's key layout with small widths
(base_channels 4), so every forward pass is tiny.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import warnings
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dcn_inspect.cli.render import print_key_table
from dcn_inspect.core.errors import DcnInspectWarning, InputError
from dcn_inspect.io.images import to_model_input
from dcn_inspect.models import registry
from dcn_inspect.models.loading import load_model
from dcn_inspect.ops import deform_conv2d

BLOCKS_R50 = (3, 4, 6, 3)
BASE = 4


def _image(height: int = 64, width: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def _randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Random weights everywhere, offset branches included (so offsets are non-zero), and BN
    statistics."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
            elif "conv_offset" in name:
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.05)
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.2)


def _small_config(**overrides: object) -> Dict[str, object]:
    return {**registry.get("resnet50-dcn-mmdet").default_config, "base_channels": BASE, **overrides}


# --------------------------------------------------------------------------------- mmdetection


@pytest.mark.parametrize(
    "modulated,deform_groups,old_names", [(False, 1, False), (True, 2, False), (True, 1, True)]
)
def test_mmdetection_checkpoint_loads_with_identical_outputs(
    tmp_path, caplog, modulated, deform_groups, old_names
):
    reference = registry.get("resnet50-dcn-mmdet").build(
        **_small_config(modulated=modulated, deform_groups=deform_groups)
    )
    _randomise(reference)
    reference.eval()
    state = {}
    for key, value in reference.state_dict().items():
        if old_names:  # mmdetection 1.x: the offset conv is a sibling named conv2_offset
            key = key.replace("conv2.conv_offset.", "conv2_offset.")
        state["backbone." + key] = value.clone()
    state["neck.lateral_convs.0.conv.weight"] = torch.zeros(8, 16, 1, 1)
    state["rpn_head.rpn_cls.weight"] = torch.zeros(3, 8, 1, 1)
    path = tmp_path / "mmdet_dcn.pth"
    dcn_type = (
        "DCNv2" if modulated else "DCN"
    )  # 54 offset channels fit both v1 x3 and v2 x2: the config decides
    config_text = (
        "model = dict(backbone=dict(type='ResNet', "
        f"dcn=dict(type='{dcn_type}', deform_groups={deform_groups})))"
    )
    torch.save({"meta": {"config": config_text, "epoch": 12}, "state_dict": state}, path)

    with warnings.catch_warnings(), caplog.at_level(logging.INFO, logger="dcn_inspect"):
        warnings.simplefilter(
            "error", DcnInspectWarning
        )  # the neck/head keys every zoo file has: no warning
        loaded = load_model(str(path))
    assert loaded.source == "mmdetection"
    assert loaded.arch == "resnet50-dcn-mmdet"
    assert loaded.config["modulated"] is modulated
    assert loaded.config["offset_groups"] == deform_groups
    assert loaded.config["base_channels"] == BASE and loaded.config["stride_in_1x1"] is False
    summary = loaded.summary()["import"]
    assert summary["ignored_keys"] == 2
    # One line in summary.json; the key table goes to the INFO log (the CLI's --verbose).
    assert (
        "ignored 2 key(s) outside the backbone" in summary["ignored"]
        and "neck.lateral_convs.*" in summary["ignored"]
    )
    reports = [r.key_report for r in caplog.records if hasattr(r, "key_report")]
    assert len(reports) == 1 and sorted(reports[0].ignored) == [
        "neck.lateral_convs.0.conv.weight",
        "rpn_head.rpn_cls.weight",
    ]

    images = to_model_input(_image(), loaded.preprocess).tensor
    with torch.no_grad():
        expected = reference(images)
        actual = loaded.model(images)
    for stage in ("layer2", "layer3", "layer4"):
        torch.testing.assert_close(actual[stage], expected[stage], rtol=0, atol=0)
    assert expected["layer4"].abs().max() > 0


def test_mmdetection_weights_into_the_paper_architecture(tmp_path):
    """--model resnet50-dcn-paper --weights mmdet.pth: stride-16 conv5 with the file's weights."""
    reference = registry.get("resnet50-dcn-paper").build(
        **{**registry.get("resnet50-dcn-paper").default_config, "base_channels": BASE}
    )
    _randomise(reference, seed=3)
    reference.eval()
    path = tmp_path / "paper.pth"
    torch.save(
        {"state_dict": {"backbone." + k: v for k, v in reference.state_dict().items()}}, path
    )
    loaded = load_model("resnet50-dcn-paper", path)
    assert loaded.arch == "resnet50-dcn-paper" and loaded.config["dilations"] == [1, 1, 1, 2]
    assert loaded.config["dcn_stages"] == [False, False, False, True]
    images = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        out = loaded.model(images)["layer4"]
        torch.testing.assert_close(out, reference(images)["layer4"], rtol=0, atol=0)
    assert out.shape[-2:] == (3, 4)  # stride 16


def _mmdet_file(tmp_path: Path, edit) -> Path:
    model = registry.get("resnet50-dcn-mmdet").build(**_small_config())
    state = {"backbone." + k: v for k, v in model.state_dict().items()}
    edit(state)
    path = tmp_path / "edited.pth"
    torch.save({"state_dict": state}, path)
    return path


def test_shape_mismatch_is_one_line_naming_the_key(tmp_path):
    def edit(state):
        state["backbone.layer3.1.conv2.weight"] = torch.zeros(16, 16, 1, 1)

    with pytest.raises(InputError) as info:
        load_model(str(_mmdet_file(tmp_path, edit)))
    message = str(info.value)
    assert "\n" not in message
    assert (
        "shape mismatch at backbone.layer3.1.conv2.weight" in message
        and "(16, 16, 1, 1)" in message
    )


def test_missing_backbone_keys_show_a_table_then_an_error(tmp_path, capsys):
    def edit(state):
        del state["backbone.layer4.2.bn3.running_var"]
        state["backbone.layer4.2.extra.weight"] = torch.zeros(1)

    with pytest.raises(InputError) as info:
        load_model(str(_mmdet_file(tmp_path, edit)))
    assert "1 missing and 1 unexpected backbone key(s)" in str(info.value) and "\n" not in str(
        info.value
    )
    print_key_table(info.value.details["keys"])  # what the CLI shows above the error line
    err = capsys.readouterr().err
    assert re.search(r"missing\s+│\s+layer4\.2\.bn3\.running_var", err)
    assert re.search(r"unexpected\s+│\s+backbone\.layer4\.2\.extra\.weight", err)


def test_depth_mismatch_with_named_architecture(tmp_path):
    path = _mmdet_file(tmp_path, lambda state: None)
    with pytest.raises(
        InputError, match="holds a ResNet-50, but resnet101-dcn-paper is a ResNet-101"
    ):
        load_model("resnet101-dcn-paper", path)


def test_unknown_layout_is_refused_with_a_hint(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"encoder.block.weight": torch.zeros(2)}, path)
    with pytest.raises(InputError, match="not a dcn-inspect, mmdetection or detectron2"):
        load_model(str(path))


# --------------------------------------------------------------------------------- detectron2


def _d2_weights(
    modulated: bool, deform_stages: Tuple[bool, ...], seed: int
) -> Dict[str, np.ndarray]:
    """Random weights under detectron2's names (bare, without the backbone prefix)."""
    rng = np.random.default_rng(seed)
    weights: Dict[str, np.ndarray] = {}

    def conv(name: str, out_c: int, in_c: int, k: int, scale: float = 0.2) -> None:
        weights[f"{name}.weight"] = (rng.standard_normal((out_c, in_c, k, k)) * scale).astype(
            np.float32
        )

    def norm(name: str, channels: int) -> None:
        for stat, values in (
            ("weight", rng.standard_normal(channels) * 0.2 + 1),
            ("bias", rng.standard_normal(channels) * 0.2),
            ("running_mean", rng.standard_normal(channels) * 0.2),
            ("running_var", rng.random(channels) + 0.5),
        ):
            weights[f"{name}.norm.{stat}"] = values.astype(np.float32)

    conv("stem.conv1", BASE, 3, 7, scale=0.01)
    norm("stem.conv1", BASE)
    in_c = BASE
    for index, blocks in enumerate(BLOCKS_R50):
        planes = BASE * 2**index
        for block in range(blocks):
            prefix = f"res{index + 2}.{block}"
            conv(f"{prefix}.conv1", planes, in_c, 1)
            norm(f"{prefix}.conv1", planes)
            conv(f"{prefix}.conv2", planes, planes, 3)
            norm(f"{prefix}.conv2", planes)
            conv(f"{prefix}.conv3", planes * 4, planes, 1)
            norm(f"{prefix}.conv3", planes * 4)
            if block == 0:
                conv(f"{prefix}.shortcut", planes * 4, in_c, 1)
                norm(f"{prefix}.shortcut", planes * 4)
            if deform_stages[index]:
                channels = 27 if modulated else 18
                conv(f"{prefix}.conv2_offset", channels, planes, 3, scale=0.05)
                weights[f"{prefix}.conv2_offset.bias"] = (
                    rng.standard_normal(channels) * 0.5
                ).astype(np.float32)
            in_c = planes * 4
    return weights


def _frozen_bn(x: torch.Tensor, w: Dict[str, torch.Tensor], name: str) -> torch.Tensor:
    scale = w[f"{name}.norm.weight"] * (w[f"{name}.norm.running_var"] + 1e-5).rsqrt()
    shift = w[f"{name}.norm.bias"] - w[f"{name}.norm.running_mean"] * scale
    return x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)


def _d2_forward(
    w: Dict[str, torch.Tensor], bgr: torch.Tensor, modulated: bool, deform_stages: Tuple[bool, ...]
) -> Dict[str, torch.Tensor]:
    """detectron2's ResNet by hand: stride on the 1x1 conv (STRIDE_IN_1X1), offsets split
    [2N | N]."""
    x = F.relu(
        _frozen_bn(F.conv2d(bgr, w["stem.conv1.weight"], stride=2, padding=3), w, "stem.conv1")
    )
    x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
    outputs = {}
    for index, blocks in enumerate(BLOCKS_R50):
        for block in range(blocks):
            p = f"res{index + 2}.{block}"
            stride = 2 if (index > 0 and block == 0) else 1
            out = F.relu(
                _frozen_bn(F.conv2d(x, w[f"{p}.conv1.weight"], stride=stride), w, f"{p}.conv1")
            )
            if deform_stages[index]:
                raw = F.conv2d(
                    out, w[f"{p}.conv2_offset.weight"], w[f"{p}.conv2_offset.bias"], padding=1
                )
                if modulated:
                    offset, logits = torch.split(raw, [18, 9], dim=1)
                    out = deform_conv2d(
                        out, offset, w[f"{p}.conv2.weight"], None, 1, 1, 1, torch.sigmoid(logits)
                    )
                else:
                    out = deform_conv2d(out, raw, w[f"{p}.conv2.weight"], None, 1, 1, 1)
            else:
                out = F.conv2d(out, w[f"{p}.conv2.weight"], padding=1)
            out = F.relu(_frozen_bn(out, w, f"{p}.conv2"))
            out = _frozen_bn(F.conv2d(out, w[f"{p}.conv3.weight"]), w, f"{p}.conv3")
            shortcut = (
                _frozen_bn(
                    F.conv2d(x, w[f"{p}.shortcut.weight"], stride=stride), w, f"{p}.shortcut"
                )
                if block == 0
                else x
            )
            x = F.relu(out + shortcut)
        outputs[f"res{index + 2}"] = x
    return outputs


@pytest.mark.parametrize(
    "modulated,deform_stages,layout,fmt",
    [
        (True, (False, True, True, True), "fpn", "pkl"),
        (False, (False, False, False, True), "c4", "pth"),
    ],
)
def test_detectron2_checkpoint_matches_detectron2_conventions(
    tmp_path, capsys, modulated, deform_stages, layout, fmt
):
    weights = _d2_weights(modulated, deform_stages, seed=7)
    stored: Dict[str, object] = {}
    for key, value in weights.items():
        if layout == "c4" and key.startswith("res5."):
            stored["roi_heads." + key] = value  # C4 models keep res5 in the RoI head
        else:
            stored["backbone.bottom_up." + key if layout == "fpn" else "backbone." + key] = value
    stored["proposal_generator.rpn_head.conv.weight"] = np.zeros((4, 4, 3, 3), np.float32)
    if fmt == "pkl":
        path = tmp_path / "model_final.pkl"
        with open(path, "wb") as handle:
            pickle.dump(
                {
                    "model": stored,
                    "__author__": "Detectron2 Model Zoo",
                    "matching_heuristics": True,
                },
                handle,
                protocol=2,
            )
    else:
        path = tmp_path / "model_final.pth"
        torch.save(
            {"model": {k: torch.from_numpy(v) for k, v in stored.items()}, "iteration": 90000}, path
        )

    with warnings.catch_warnings():
        warnings.simplefilter("error", DcnInspectWarning)
        loaded = load_model(str(path))
    assert loaded.source == "detectron2"
    assert loaded.config["modulated"] is modulated
    assert loaded.config["dcn_stages"] == list(deform_stages)
    assert loaded.config["stride_in_1x1"] is True
    assert loaded.config["stage_names"] == ["res2", "res3", "res4", "res5"]
    summary = loaded.summary()["import"]
    assert "BGR" in summary["input_channels"] and "ignored 1 key(s)" in summary["ignored"]
    # detectron2's preprocessing: ResizeShortestEdge(800, 1333), pads to 32 with FPN only.
    pre = loaded.preprocess
    assert (pre.resize, pre.max_size, pre.size_rule, pre.interpolation) == (
        800,
        1333,
        "detectron2",
        "pil-bilinear",
    )
    assert pre.size_divisor == (32 if layout == "fpn" else 0)

    image = _image(64, 96, seed=1)
    ours = to_model_input(image, loaded.preprocess, resize=0).tensor
    # detectron2's input: BGR, 0-255, minus PIXEL_MEAN (103.530, 116.280, 123.675), PIXEL_STD 1.
    bgr = (
        torch.from_numpy(image[:, :, ::-1].astype(np.float32).copy()).permute(2, 0, 1).unsqueeze(0)
    )
    bgr = bgr - torch.tensor([103.530, 116.280, 123.675]).view(1, 3, 1, 1)
    tensors = {k: torch.from_numpy(v) for k, v in weights.items()}
    with torch.no_grad():
        expected = _d2_forward(tensors, bgr, modulated, deform_stages)
        actual = loaded.model(ours)
    for stage in (2, 3, 4, 5):
        want, got = expected[f"res{stage}"], actual[f"res{stage}"]
        scale = want.abs().max()
        assert scale > 0
        # float32 through a ResNet: the native ops sum in another order than the hand-written
        # forward.
        torch.testing.assert_close(got / scale, want / scale, rtol=0, atol=2e-4)


# --------------------------------------------------------------------------------- unsafe pickles


class _WritesFile:
    """Unpickling this runs exec(), which creates ``path`` -- the side effect must not happen."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (exec, (f"open({str(self.path)!r}, 'w').write('pwned')",))


class _RunsShell:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.path}",))


@pytest.mark.parametrize("payload_type", [_WritesFile, _RunsShell])
def test_malicious_checkpoints_are_refused_without_side_effects(tmp_path, payload_type):
    # Control: the payload really is live when unpickled naively.
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(payload_type(control)))
    assert control.exists()

    marker_pth = tmp_path / "marker_pth"
    pth = tmp_path / "evil.pth"
    torch.save(
        {"state_dict": {"conv1.weight": torch.zeros(1)}, "meta": payload_type(marker_pth)}, pth
    )
    with pytest.raises(InputError) as info:
        load_model(str(pth))
    assert "refused to load" in str(info.value) and "\n" not in str(info.value)
    assert not marker_pth.exists()

    marker_pkl = tmp_path / "marker_pkl"
    pkl = tmp_path / "evil.pkl"
    with open(pkl, "wb") as handle:
        pickle.dump(
            {"model": {"stem.conv1.weight": np.zeros(1)}, "x": payload_type(marker_pkl)},
            handle,
            protocol=2,
        )
    with pytest.raises(InputError) as info:
        load_model(str(pkl))
    assert "refused to load" in str(info.value) and "refused global" in str(info.value)
    assert not marker_pkl.exists()


def test_pkl_object_arrays_and_array_subclasses_are_refused(tmp_path):
    path = tmp_path / "objects.pkl"
    with open(path, "wb") as handle:
        pickle.dump({"model": {"w": np.array([1, "two"], dtype=object)}}, handle, protocol=2)
    with pytest.raises(InputError, match="object arrays"):
        load_model(str(path))
    masked = tmp_path / "masked.pkl"
    with open(masked, "wb") as handle:
        pickle.dump({"model": {"w": np.ma.masked_array([1.0, 2.0])}}, handle, protocol=4)
    with pytest.raises(InputError, match="refused"):
        load_model(str(masked))


def test_numpy_metadata_in_a_pth_is_readable(tmp_path):
    """weights_only loading still accepts numpy scalars/arrays in metadata (guarded
    reconstructors)."""
    from dcn_inspect.models.checkpoint import read_checkpoint_file

    path = tmp_path / "meta.pth"
    torch.save(
        {
            "meta": {"best": np.float64(0.5), "hist": np.arange(3)},
            "state_dict": {"a": torch.ones(2)},
        },
        path,
    )
    payload = read_checkpoint_file(path)
    assert payload["meta"]["best"] == 0.5 and payload["meta"]["hist"].tolist() == [0, 1, 2]


# --------------------------------------------------------------------------------- user files

USER_FILE = """
import torch
from torch import nn
from dcn_inspect.ops import DeformConv2d

PREPROCESS = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "resize": 0}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.offset = nn.Conv2d(4, 18, 3, padding=1)
        self.dcn = DeformConv2d(4, 4, 3, padding=1)

    def forward(self, images):
        x = self.stem(images)
        return self.dcn(x, self.offset(x))


def build():
    return Net()


def not_a_model():
    return 42


def broken():
    raise RuntimeError("weights server unreachable")
"""


def test_user_file_with_weights_and_preprocess(tmp_path):
    source = tmp_path / "user_net.py"
    source.write_text(USER_FILE)
    loaded = load_model(f"{source}:build")
    assert loaded.source == "user-file" and loaded.arch is None
    assert loaded.preprocess.mean == (0.5, 0.5, 0.5) and loaded.preprocess.std == (0.25, 0.25, 0.25)
    trained = {k: torch.randn_like(v) for k, v in loaded.model.state_dict().items()}
    weights = tmp_path / "user_net.pth"
    torch.save(
        {"state_dict": {"module." + k: v for k, v in trained.items()}}, weights
    )  # DataParallel names
    reloaded = load_model(f"{source}:build", weights)
    for key, value in reloaded.model.state_dict().items():
        torch.testing.assert_close(value, trained[key], rtol=0, atol=0)
    assert reloaded.checkpoint == weights and len(reloaded.checkpoint_sha256) == 64


@pytest.mark.parametrize(
    "function,message",
    [
        ("not_a_model", "returned int, not a torch.nn.Module"),
        ("broken", "broken() raised RuntimeError: weights server unreachable"),
        ("missing", "has no function 'missing'"),
    ],
)
def test_user_file_errors_are_one_line(tmp_path, function, message):
    source = tmp_path / "user_net.py"
    source.write_text(USER_FILE)
    with pytest.raises(InputError) as info:
        load_model(f"{source}:{function}")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_user_file_import_error_and_missing_file(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import no_such_module_for_dcn_inspect\n")
    with pytest.raises(InputError, match=r"importing .*bad.py failed: ModuleNotFoundError"):
        load_model(f"{bad}:build")
    with pytest.raises(InputError, match="not found"):
        load_model(f"{tmp_path / 'absent.py'}:build")


# ---------------------------------------------------------------- the frameworks' preprocessing


def _photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth photo-like image (noise would make every resize look alike)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    rng = np.random.default_rng(seed)
    channels = [
        127
        + 120
        * np.sin(x / (20 + 7 * c) + rng.random() * 6)
        * np.cos(y / (30 + 5 * c) + rng.random() * 6)
        for c in range(3)
    ]
    return np.clip(np.stack(channels, axis=2), 0, 255).astype(np.uint8)


def _bilinear_no_antialias(image: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """cv2.INTER_LINEAR's arithmetic when cv2 is installed, else float bilinear (half-pixel
    centres, no antialiasing) rounded: within one grey level of it."""
    try:
        import cv2
    except ImportError:
        source = torch.from_numpy(image).permute(2, 0, 1)[None].double()
        return (
            F.interpolate(source, size=size, mode="bilinear", align_corners=False)
            .round()[0]
            .permute(1, 2, 0)
            .numpy()
            .astype(np.uint8)
        )
    return cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)


def _mmdetection_pipeline(
    image: np.ndarray, divisor: int = 32
) -> Tuple[np.ndarray, Tuple[int, int]]:
    """mmdetection's test pipeline by hand: Resize(img_scale=(1333, 800), keep_ratio=True) with
    mmcv's rounding, Normalize(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375],
    to_rgb=True), Pad(size_divisor) with zeros -> [3, H, W] RGB, and the resized size."""
    h, w = image.shape[:2]
    factor = min(1333 / max(h, w), 800 / min(h, w))
    new_w, new_h = int(w * factor + 0.5), int(h * factor + 0.5)
    resized = _bilinear_no_antialias(image, (new_h, new_w)).astype(np.float32)
    normalised = (resized - np.array([123.675, 116.28, 103.53], np.float32)) / np.array(
        [58.395, 57.12, 57.375], np.float32
    )
    padded = np.zeros(
        (3, -(-new_h // divisor) * divisor, -(-new_w // divisor) * divisor), np.float32
    )
    padded[:, :new_h, :new_w] = normalised.transpose(2, 0, 1)
    return padded, (new_h, new_w)


def _detectron2_pipeline(image: np.ndarray, divisor: int) -> Tuple[np.ndarray, Tuple[int, int]]:
    """detectron2's by hand: ResizeShortestEdge(800, 1333) (PIL bilinear on the uint8 image), BGR,
    minus PIXEL_MEAN [103.530, 116.280, 123.675], PIXEL_STD 1, padded with zeros to the divisor
    -> [3, H, W] in BGR order, and the resized size."""
    h, w = image.shape[:2]
    size = 800.0
    scale = size / min(h, w)
    new_h, new_w = (size, scale * w) if h < w else (scale * h, size)
    if max(new_h, new_w) > 1333:
        scale = 1333.0 / max(new_h, new_w)
        new_h, new_w = new_h * scale, new_w * scale
    new_h, new_w = int(new_h + 0.5), int(new_w + 0.5)
    bgr = np.asarray(
        Image.fromarray(image[:, :, ::-1].copy()).resize((new_w, new_h), Image.BILINEAR), np.float32
    )
    normalised = bgr - np.array([103.530, 116.280, 123.675], np.float32)
    pad_h, pad_w = (
        (-(-new_h // divisor) * divisor, -(-new_w // divisor) * divisor)
        if divisor
        else (new_h, new_w)
    )
    padded = np.zeros((3, pad_h, pad_w), np.float32)
    padded[:, :new_h, :new_w] = normalised.transpose(2, 0, 1)
    return padded, (new_h, new_w)


@pytest.mark.parametrize(
    "height,width,divisor_config", [(1500, 2000, None), (3024, 4032, None), (333, 517, 64)]
)
def test_mmdetection_preprocessing_matches_its_pipeline(tmp_path, height, width, divisor_config):
    def edit(state):
        pass

    path = _mmdet_file(tmp_path, edit)
    if divisor_config:
        payload = torch.load(path, weights_only=True)
        payload["meta"] = {
            "config": f"test_pipeline = [dict(type='Pad', size_divisor={divisor_config})]"
        }
        torch.save(payload, path)
    loaded = load_model(str(path))
    image = _photo(height, width)
    prepared = to_model_input(image, loaded.preprocess)
    expected, resized = _mmdetection_pipeline(image, divisor_config or 32)
    assert prepared.resized_hw == resized and prepared.input_hw == expected.shape[1:]
    assert (
        prepared.input_hw[0] % (divisor_config or 32) == 0
        and prepared.input_hw[1] % (divisor_config or 32) == 0
    )
    assert prepared.scale_to_original == (width / resized[1], height / resized[0])
    tolerance = (
        1e-4 if _has_cv2() else 1.0 / 57.12 + 1e-4
    )  # bit-exact with cv2; else within a grey level
    np.testing.assert_allclose(prepared.tensor[0].numpy(), expected, atol=tolerance, rtol=0)
    assert loaded.preprocess.size_divisor == (divisor_config or 32)
    assert loaded.summary()["import"]["size_divisor"] == (
        "embedded config"
        if divisor_config
        else "mmdetection's default (no size divisor in an embedded config)"
    )


def _has_cv2() -> bool:
    try:
        import cv2  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("layout,divisor", [("fpn", 32), ("c4", 0)])
def test_detectron2_preprocessing_matches_its_pipeline(tmp_path, layout, divisor):
    weights = _d2_weights(True, (False, True, True, True), seed=3)
    prefix = "backbone.bottom_up." if layout == "fpn" else ""
    stored = {
        (("roi_heads." if layout == "c4" and k.startswith("res5.") else prefix) + k): v
        for k, v in weights.items()
    }
    path = tmp_path / "d2.pkl"
    with open(path, "wb") as handle:
        pickle.dump({"model": stored}, handle, protocol=2)
    loaded = load_model(str(path))
    image = _photo(375, 500, seed=2)
    prepared = to_model_input(image, loaded.preprocess)
    expected, resized = _detectron2_pipeline(image, divisor)
    assert prepared.resized_hw == resized == (800, 1067) and prepared.input_hw == expected.shape[1:]
    # Our input is RGB (conv1's weights were reversed to take it): compare against BGR reversed.
    np.testing.assert_allclose(prepared.tensor[0].numpy(), expected[::-1], atol=1e-3, rtol=0)


# -------------------------------------------------------------------- mmdetection ambiguities


def _mmdet_checkpoint(tmp_path: Path, **config: object) -> Tuple[Path, torch.nn.Module]:
    reference = registry.get("resnet50-dcn-mmdet").build(**_small_config(**config))
    _randomise(reference, seed=11)
    reference.eval()
    path = tmp_path / "mmdet.pth"
    torch.save(
        {"state_dict": {"backbone." + k: v.clone() for k, v in reference.state_dict().items()}},
        path,
    )
    return path, reference


def test_108_channel_offsets_without_a_config_load_as_dcnv2_with_4_groups(tmp_path):
    """3 x 9 x 4 = 2 x 9 x 6 = 108: 4 groups divide the 8..32-channel convs, 6 do not."""
    path, reference = _mmdet_checkpoint(tmp_path, modulated=True, deform_groups=4)
    assert reference.layer2[0].conv2.conv_offset.weight.shape[0] == 108
    loaded = load_model(str(path))
    assert loaded.config["modulated"] is True and loaded.config["offset_groups"] == 4
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.model(images)["layer4"], reference(images)["layer4"], rtol=0, atol=0
        )
    # A config that says otherwise wins.
    from dcn_inspect.models.importers.resnet_structure import _offset_kind

    assert _offset_kind(108, 9, False, path, [8, 16, 32], None) == (False, 6)
    assert _offset_kind(108, 9, None, path, [12, 24], 6) == (False, 6)
    assert _offset_kind(108, 9, None, path, [12, 24], None) == (True, 4)  # both divide: DCNv2


def test_resnext_dcn_backbones_load(tmp_path):
    """A small ResNeXt (4 groups of 2 channels in layer1) loads with identical outputs; the model
    zoo's x101-32x4d and x101-64x4d build with mmdetection's parameter shapes."""
    path, reference = _mmdet_checkpoint(tmp_path, groups=4, width_per_group=2)
    loaded = load_model(str(path))
    assert loaded.config["groups"] == 4 and loaded.config["width_per_group"] == 2
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.model(images)["layer4"], reference(images)["layer4"], rtol=0, atol=0
        )
    # mmdetection's ResNeXt: width = floor(planes * base_width / 64) * groups,
    # planes = 64 * 2**stage.
    for groups, base_width in ((32, 4), (64, 4)):
        config = {
            **registry.get("resnet101-dcn-mmdet").default_config,
            "groups": groups,
            "width_per_group": base_width,
        }
        with torch.device("meta"):
            shapes = {
                k: tuple(v.shape)
                for k, v in registry.get("resnet101-dcn-mmdet").build(**config).state_dict().items()
            }
        for stage in range(4):
            width = (64 * 2**stage * base_width // 64) * groups
            assert shapes[f"layer{stage + 1}.0.conv2.weight"] == (width, width // groups, 3, 3)
            assert shapes[f"layer{stage + 1}.0.conv3.weight"] == (64 * 2**stage * 4, width, 1, 1)
        assert shapes["layer4.2.conv2.conv_offset.weight"] == (
            18,
            (64 * 8 * base_width // 64) * groups,
            3,
            3,
        )


# ----------------------------------------------------------------- the user's names, quietly


def _d2_c4_file(tmp_path: Path) -> Path:
    weights = _d2_weights(False, (False, False, False, True), seed=5)
    stored = {
        ("roi_heads." + k if k.startswith("res5.") else "backbone." + k): v
        for k, v in weights.items()
    }
    stored["roi_heads.box_predictor.cls_score.weight"] = np.zeros((3, 8), np.float32)
    path = tmp_path / "model_final.pkl"
    with open(path, "wb") as handle:
        pickle.dump({"model": stored}, handle, protocol=2)
    return path


def _run_cli(args, monkeypatch, capsys):
    import sys

    from dcn_inspect.cli import main

    monkeypatch.setenv("COLUMNS", "250")
    monkeypatch.setattr(sys, "argv", ["dcn-inspect", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def test_detectron2_checkpoint_speaks_of_res5_everywhere(tmp_path, monkeypatch, capsys):
    path = _d2_c4_file(tmp_path)
    image = tmp_path / "scene.png"
    Image.fromarray(_photo(64, 96)).save(image)
    code, out, err = _run_cli(["info", str(path), str(image), "--resize", "0"], monkeypatch, capsys)
    assert code == 0, err
    names = [line.split()[0] for line in out.splitlines() if line.strip().startswith("res")]
    assert (
        names == ["res5.0.conv2", "res5.1.conv2", "res5.2.conv2"] * 4
    )  # one row per layer in each of info's tables
    assert "warning" not in err  # the heads' keys are ignored quietly
    code, out, err = _run_cli(
        ["sample-points", str(image), "--model", str(path),
         "--layers", "res5.2.conv2,res5.1.conv2", "--resize", "0", "--out", str(tmp_path / "out")],
        monkeypatch, capsys,
    )  # fmt: skip
    assert code == 0, err
    table = pd.read_csv(tmp_path / "out" / "scene_points.csv")
    assert sorted(table["layer"].unique()) == ["res5.1.conv2", "res5.2.conv2"]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [layer["name"] for layer in summary["layers"]] == ["res5.2.conv2", "res5.1.conv2"]
    assert (
        "ignored 1 key(s)" in summary["model"]["import"]["ignored"]
        and "res2..res5" in summary["model"]["import"]["layer_names"]
    )
    code, _, err = _run_cli(
        [
            "sample-points",
            str(image),
            "--model",
            str(path),
            "--layers",
            "layer4.2.conv2",
            "--out",
            str(tmp_path / "x"),
        ],
        monkeypatch,
        capsys,
    )
    assert (
        code == 1
        and "unknown deformable layer(s) layer4.2.conv2; "
        "valid: res5.0.conv2, res5.1.conv2, res5.2.conv2"
        in err
    )


def test_ignored_keys_table_only_with_verbose(tmp_path, monkeypatch, capsys):
    path = _d2_c4_file(tmp_path)
    code, out, err = _run_cli(["info", str(path)], monkeypatch, capsys)
    assert code == 0 and "ignored" not in err and "checkpoint keys" not in err
    code, out, err = _run_cli(["--verbose", "info", str(path)], monkeypatch, capsys)
    assert code == 0
    assert (
        "checkpoint keys: model_final.pkl" in err
        and "roi_heads.box_predictor" in err
        and "ignored 1 key(s) outside the backbone" in err
    )


def test_user_file_preprocess_takes_the_framework_keys(tmp_path):
    source = tmp_path / "user_net.py"
    source.write_text(
        USER_FILE.replace(
            '"resize": 0}',
            '"resize": 800, "max_size": 1333, "interpolation": "cv2-bilinear", '
            '"size_rule": "mmdetection", "size_divisor": 32}',
        )
    )
    pre = load_model(f"{source}:build").preprocess
    assert (pre.interpolation, pre.size_rule, pre.size_divisor, pre.resize, pre.max_size) == (
        "cv2-bilinear",
        "mmdetection",
        32,
        800,
        1333,
    )
    bad = tmp_path / "bad_net.py"
    bad.write_text(USER_FILE.replace('"resize": 0}', '"resize": 0, "interpolation": "bicubic"}'))
    with pytest.raises(InputError) as info:
        load_model(f"{bad}:build")
    assert (
        "PREPROCESS is not valid (interpolation 'bicubic': use pil-bilinear or cv2-bilinear)"
        in str(info.value)
        and "\n" not in str(info.value)
    )


# --------------------------------------------------------------------------------- bounded memory


def test_deflated_checkpoint_loads_but_a_zip_bomb_is_refused_before_inflating(tmp_path):
    import io
    import zipfile

    from dcn_inspect.models.checkpoint import MAX_INFLATION, read_checkpoint_file

    buffer = io.BytesIO()
    torch.save({"state_dict": {"w": torch.randn(5000)}}, buffer)
    source = zipfile.ZipFile(io.BytesIO(buffer.getvalue()))
    deflated = tmp_path / "deflated.pth"
    with zipfile.ZipFile(deflated, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for info in source.infolist():
            archive.writestr(info.filename, source.read(info.filename))
    assert torch.equal(
        read_checkpoint_file(deflated)["state_dict"]["w"],
        torch.load(io.BytesIO(buffer.getvalue()))["state_dict"]["w"],
    )
    bomb = tmp_path / "bomb.pth"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for info in source.infolist():
            archive.writestr(info.filename, source.read(info.filename))
        archive.writestr("archive/data/9", bytes(80 * 2**20))  # 80 MiB of zeros in ~80 KB
    assert bomb.stat().st_size * MAX_INFLATION < 2**20
    with pytest.raises(
        InputError,
        match=r"bomb\.pth: the \d+-byte archive declares \d+ bytes uncompressed "
        r"\(\d compressed entries, over 4x its size\): refused before inflating",
    ):
        read_checkpoint_file(bomb)


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_pickled_bytearrays_still_load_but_not_a_zero_filled_length(tmp_path, protocol):
    from dcn_inspect.models.safe_pickle import load_pickle_file

    path = tmp_path / "ok.pkl"
    path.write_bytes(
        pickle.dumps(
            {"model": {"w": np.arange(4.0)}, "raw": bytearray(b"\x00\xffab")}, protocol=protocol
        )
    )
    payload = load_pickle_file(path)
    assert payload["raw"] == bytearray(b"\x00\xffab") and payload["model"]["w"].tolist() == [
        0,
        1,
        2,
        3,
    ]
    bomb = tmp_path / "bomb.pkl"
    bomb.write_bytes(
        b"\x80\x04cbuiltins\nbytearray\n\x8a\x05"
        + (4_000_000_000).to_bytes(5, "little")
        + b"\x85R."
    )
    with pytest.raises(
        InputError, match=r"bomb\.pkl: refused to load: refused: bytearray from anything but bytes"
    ):
        load_pickle_file(bomb)


def test_foreign_checkpoint_is_sized_on_the_meta_device_before_the_build(tmp_path, monkeypatch):
    """A ResNet stem of 20000 channels (whose real build would need ~100 GB) with nothing else
    fitting."""
    built = []
    original = registry.Architecture.build
    monkeypatch.setattr(
        registry.Architecture, "build", lambda self, **c: built.append(c) or original(self, **c)
    )
    reference = registry.get("resnet50-dcn-mmdet").build(**_small_config())
    state = {f"backbone.{k}": v for k, v in reference.state_dict().items()}
    state["backbone.conv1.weight"] = torch.zeros(20000, 3, 1, 1)
    path = tmp_path / "wide.pth"
    torch.save({"state_dict": state}, path)
    built.clear()
    with pytest.raises(InputError, match=r"wide\.pth: shape mismatch at .*conv1\.weight"):
        load_model(str(path))
    assert built == []


def test_user_file_sys_exit_is_an_error_and_ctrl_c_an_interrupt(tmp_path):
    source = tmp_path / "exits.py"
    source.write_text(
        "def build():\n    raise SystemExit(3)\n\n\n"
        "def interrupted():\n    raise KeyboardInterrupt\n"
    )
    with pytest.raises(InputError, match=r"build\(\): it called sys\.exit\(3\)"):
        load_model(f"{source}:build")
    with pytest.raises(KeyboardInterrupt):
        load_model(f"{source}:interrupted")
    on_import = tmp_path / "exits_on_import.py"
    on_import.write_text("import sys\nsys.exit(2)\n")
    with pytest.raises(
        InputError, match=r"importing .*exits_on_import\.py failed: it called sys\.exit\(2\)"
    ):
        load_model(f"{on_import}:build")

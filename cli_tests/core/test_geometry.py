"""Where feature cells sit in the image: the probe's frames against receptive-field arithmetic
done by hand, for the built-in ResNets and for a traced user model file."""

from __future__ import annotations

import gc
import math
import sys
import weakref
from pathlib import Path
from typing import List, Tuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dcn_inspect.capture.session import probe
from dcn_inspect.core.geometry import FrameMap, FrameTracker
from dcn_inspect.models import registry
from dcn_inspect.models.loading import load_model

Layer = Tuple[int, int, int, int]  # kernel, stride, padding, dilation (square)


def index_in_image(chain: List[Layer], index: float) -> float:
    """Continuous index of the last layer's cell -> image x (or y), walking back layer by layer.

    Output cell j of a conv/pool reads input positions j*s - p + d*t for t = 0..k-1; the centre of
    that window is j*s - p + d*(k-1)/2. Image pixel c has its centre at c + 0.5.
    """
    for kernel, stride, padding, dilation in reversed(chain):
        index = index * stride - padding + dilation * (kernel - 1) / 2
    return index + 0.5


def output_size(chain: List[Layer], size: int) -> int:
    for kernel, stride, padding, dilation in chain:
        size = math.floor((size + 2 * padding - dilation * (kernel - 1) - 1) / stride) + 1
    return size


def resnet_chain(
    setting: str, stride_in_1x1: bool, upto_stage: int, upto_block: int
) -> List[Layer]:
    """Main-path layers from the image to the input of ``layer{upto_stage}.{upto_block}.conv2``,
    by hand."""
    chain: List[Layer] = [(7, 2, 3, 1), (3, 2, 1, 1)]  # conv1 7x7 s2 p3, maxpool 3x3 s2 p1
    blocks = (3, 4, 6, 3)
    for stage in range(1, 5):
        stride = 2 if stage > 1 and not (setting == "paper" and stage == 4) else 1
        dilation = 2 if setting == "paper" and stage == 4 else 1
        for block in range(blocks[stage - 1]):
            s = stride if block == 0 else 1
            conv1: Layer = (1, s if stride_in_1x1 else 1, 0, 1)
            conv2: Layer = (3, 1 if stride_in_1x1 else s, dilation, dilation)
            chain.append(conv1)
            if (stage, block) == (upto_stage, upto_block):
                return chain
            chain += [conv2, (1, 1, 0, 1)]
    raise AssertionError("no such block")


@pytest.mark.parametrize(
    "arch,stride_in_1x1,layer,stage,block,in_stride,out_stride",
    [
        ("resnet50-dcn-paper", False, "layer4.0.conv2", 4, 0, 16, 16),
        ("resnet50-dcn-paper", True, "layer4.2.conv2", 4, 2, 16, 16),
        ("resnet50-dcn-mmdet", False, "layer2.0.conv2", 2, 0, 4, 8),
        ("resnet50-dcn-mmdet", False, "layer4.0.conv2", 4, 0, 16, 32),
        ("resnet50-dcn-mmdet", True, "layer3.0.conv2", 3, 0, 16, 16),
    ],
)
def test_resnet_frames_match_receptive_field_arithmetic(
    arch, stride_in_1x1, layer, stage, block, in_stride, out_stride
):
    setting = "paper" if "paper" in arch else "mmdet"
    config = {
        **registry.get(arch).default_config,
        "base_channels": 4,
        "stride_in_1x1": stride_in_1x1,
    }
    model = registry.get(arch).build(**config).eval()
    height, width = 75, 93  # odd sizes: output sizes round down at every stride
    result = probe(model, torch.randn(1, 3, height, width))
    geometry = result.convs[layer].geometry
    assert geometry.method == "hooks"
    chain = resnet_chain(setting, stride_in_1x1, stage, block)
    assert geometry.input_hw == (output_size(chain, height), output_size(chain, width))
    frame = geometry.input_frame
    assert (frame.stride_x, frame.stride_y) == (in_stride, in_stride)
    for row, col in [
        (0, 0),
        (1, 2),
        (geometry.input_hw[0] - 1, geometry.input_hw[1] - 1),
        (2.5, 0.25),
    ]:
        x, y = frame.to_image(col, row)
        assert x == pytest.approx(index_in_image(chain, col)) and y == pytest.approx(
            index_in_image(chain, row)
        )
    # The deformable conv itself: output cells, and the regular-grid sampling points of kernel point
    # (a, b).
    kernel, stride, padding, dilation = (
        geometry.kernel[0],
        geometry.stride[0],
        geometry.padding[0],
        geometry.dilation[0],
    )
    conv2: Layer = (kernel, stride, padding, dilation)
    assert geometry.output_hw == (
        output_size(chain + [conv2], height),
        output_size(chain + [conv2], width),
    )
    assert geometry.output_frame.stride_x == out_stride
    for i, j in [(0, 0), (1, 1), (geometry.output_hw[0] - 1, 0)]:
        x, y = geometry.output_frame.to_image(j, i)
        assert (x, y) == (
            pytest.approx(index_in_image(chain + [conv2], j)),
            pytest.approx(index_in_image(chain + [conv2], i)),
        )
        for a, b in [(0, 0), (2, 1)]:
            sample_y, sample_x = (
                i * stride - padding + a * dilation,
                j * stride - padding + b * dilation,
            )
            px, py = frame.to_image(sample_x, sample_y)
            assert (px, py) == (
                pytest.approx(index_in_image(chain, sample_x)),
                pytest.approx(index_in_image(chain, sample_y)),
            )


def test_paper_setting_cell_centres_in_pixels():
    """conv5 at stride 16: cell (i, j) of res5 is centred at (16 j + 0.5, 16 i + 0.5) of the model
    input."""
    arch = registry.get("resnet101-dcn-paper")
    model = arch.build(**{**arch.default_config, "base_channels": 4}).eval()
    result = probe(model, torch.randn(1, 3, 64, 96))
    for name in ("layer4.0.conv2", "layer4.1.conv2", "layer4.2.conv2"):
        geometry = result.convs[name].geometry
        assert geometry.input_frame == FrameMap(16.0, 16.0, 0.5, 0.5) == geometry.output_frame
        assert geometry.output_hw == (4, 6)
    # Scaled to an original image twice the model input's size: centres double, the COCO origin
    # stays.
    frame = result.convs["layer4.2.conv2"].geometry.output_frame.scaled(2.0, 2.0)
    assert frame.to_image(3, 1) == (
        pytest.approx(2 * (16 * 3 + 0.5)),
        pytest.approx(2 * (16 * 1 + 0.5)),
    )


# ------------------------------------------------------------------------ a traced user model file

USER_MODEL = '''
import torch
import torch.nn.functional as F
from torch import nn
from dcn_inspect.ops import DeformConv2d


class Net(nn.Module):
    """torchvision style: plain convs compute offsets that are passed into DeformConv2d."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, stride=2)          # applied after padding right/bottom by 1
        self.offset1 = nn.Conv2d(4, 18, 3, padding=1)
        self.dcn1 = DeformConv2d(4, 4, 3, padding=1)
        self.down = nn.Conv2d(4, 4, 2, stride=2)           # applied after padding left/top by 1
        self.offset2 = nn.Conv2d(4, 18, 3, stride=2, padding=2, dilation=2)
        self.dcn2 = DeformConv2d(4, 4, 3, stride=2, padding=2, dilation=2)
        self.offset3 = nn.Conv2d(4, 18, 3, padding=1)
        self.dcn3 = DeformConv2d(4, 4, 3, padding=1)
        for conv in (self.offset1, self.offset2, self.offset3):
            nn.init.normal_(conv.weight, std=0.2)

    def forward(self, images):
        x = self.stem(F.pad(images, (0, 1, 0, 1)))
        x = self.dcn1(x, self.offset1(x))
        x = F.avg_pool2d(self.down(F.pad(x, (1, 0, 1, 0))), 2)
        x = self.dcn2(x, self.offset2(x))
        x = F.interpolate(x, scale_factor=3)               # no exact arithmetic: the frame is lost here
        return self.dcn3(x, self.offset3(x))


def build():
    return Net()
'''  # noqa: E501 - the source is written to a model file as is


def _user_model(tmp_path: Path) -> Path:
    path = tmp_path / "tv_style_net.py"
    path.write_text(USER_MODEL)
    return path


def test_user_model_file_is_hooked_and_traced(tmp_path):
    loaded = load_model(f"{_user_model(tmp_path)}:build")
    images = torch.randn(1, 3, 37, 50)
    result = probe(loaded.model, images)
    assert list(result.convs) == ["dcn1", "dcn2", "dcn3"]
    # Offsets: the tensors the model's offset convs produced, recomputed by hand.
    with torch.no_grad():
        net = loaded.model
        x = net.stem(F.pad(images, (0, 1, 0, 1)))
        torch.testing.assert_close(result.convs["dcn1"].offset, net.offset1(x), rtol=0, atol=0)
        x = F.avg_pool2d(net.down(F.pad(net.dcn1(x, net.offset1(x)), (1, 0, 1, 0))), 2)
        torch.testing.assert_close(result.convs["dcn2"].offset, net.offset2(x), rtol=0, atol=0)

    # dcn1 input: pad (right/bottom) then 3x3 s2 p0 -> cell j reads padded 2j..2j+2, centre 2j + 1.
    dcn1 = result.convs["dcn1"].geometry
    assert dcn1.method == "hooks"
    assert dcn1.input_frame == FrameMap(2.0, 2.0, 1.5, 1.5)
    for j in (0, 3, 7):
        assert dcn1.input_frame.to_image(j, j) == (2 * j + 1.5, 2 * j + 1.5)
    # dcn2 input: pad (left/top) by 1, 2x2 s2 conv, 2x2 s2 average pool. By hand, cell j of the pool
    # covers down-conv cells 2j, 2j+1 (centre 2j + 0.5), i.e. padded dcn1 cells 4j + 1.5, i.e. dcn1
    # cells 4j + 0.5, at image x = 2 (4j + 0.5) + 1.5.
    dcn2 = result.convs["dcn2"].geometry
    assert dcn2.method == "hooks"
    for j in (0, 1, 2):
        assert dcn2.input_frame.to_image(j, j)[0] == pytest.approx(2 * (4 * j + 0.5) + 1.5)
    assert dcn2.output_frame.stride_x == 16.0
    # dcn3 follows an interpolation: the map is inferred from sizes and says so.
    dcn3 = result.convs["dcn3"].geometry
    assert dcn3.method == "size"
    # By hand: 37x50 -> pad 38x51 -> stem 3x3 s2: 18x25 -> pad 19x26 -> down 2x2 s2: 9x13
    # -> pool 2: 4x6 -> dcn2 3x3 s2 p2 d2: 2x3 -> interpolate x3: 6x9. A 6x9 map spread over the
    # 37x50 image: steps 37/6 and 50/9 px, cell 0 centred half a step in.
    assert dcn3.input_hw == (6, 9)
    assert dcn3.input_frame.as_dict() == pytest.approx(
        {"stride_x": 50 / 9, "stride_y": 37 / 6, "offset_x": 25 / 9, "offset_y": 37 / 12}
    )


def test_info_cli_on_a_user_model_file(tmp_path, monkeypatch, capsys):
    from dcn_inspect.cli import main

    image = tmp_path / "scene.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 50, 3), dtype=np.uint8)).save(
        image
    )
    monkeypatch.setenv("COLUMNS", "250")
    monkeypatch.setattr(
        sys, "argv", ["dcn-inspect", "info", f"{_user_model(tmp_path)}:build", str(image)]
    )
    with pytest.raises(SystemExit) as exit_info:
        main()
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    # One narrow table per concern, each row led by the layer: type, kernel arithmetic, frames,
    # offsets.
    rows: dict = {}
    for line in out.splitlines():
        words = line.split()
        if words and words[0] in ("dcn1", "dcn2", "dcn3"):
            rows.setdefault(words[0], []).append(words[1:])
    assert set(rows) == {"dcn1", "dcn2", "dcn3"} and all(len(found) == 4 for found in rows.values())
    assert rows["dcn1"][2] == [
        "2",
        "2",
        "hooks",
    ]  # pixels between input / output cells, how the frame was derived
    assert rows["dcn2"][1][1:3] == ["2", "2"] and rows["dcn2"][2] == [
        "8",
        "16",
        "hooks",
    ]  # stride, dilation
    assert rows["dcn3"][2][2] == "size"
    assert float(rows["dcn1"][3][0]) > 0  # mean |offset| in cells, from the image


def test_frame_tracker_does_not_keep_activations_alive():
    """Frames are held by weak reference: intermediate activations are freed during the forward."""
    tracker = FrameTracker()
    images = torch.randn(1, 3, 16, 16)
    weight = torch.randn(4, 3, 3, 3)
    with tracker:
        tracker.set_frame(images, FrameMap.image())
        hidden = F.conv2d(images, weight, stride=2, padding=1)
        assert tracker.frame_of(hidden) == FrameMap(2.0, 2.0, 0.5, 0.5)
        alive = weakref.ref(hidden)
        del hidden
        gc.collect()
        assert alive() is None
        assert len(tracker._frames) == 1  # only the images' entry is left

"""Built-in deformable ResNets, the ``models`` and ``info`` commands and their library functions."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import List, Tuple

import numpy as np
import pytest
import torch
from PIL import Image

from dcn_inspect.commands.info import list_architectures, model_info
from dcn_inspect.models import registry
from dcn_inspect.models.checkpoint import save_native
from dcn_inspect.models.loading import load_model
from dcn_inspect.models.resnet import DeformableResNet
from dcn_inspect.ops import DeformConv2dPack, ModulatedDeformConv2dPack

RESNETS = ["resnet50-dcn-paper", "resnet101-dcn-paper", "resnet50-dcn-mmdet", "resnet101-dcn-mmdet"]


def _run_cli(args: List[str], monkeypatch, capsys) -> Tuple[int, str, str]:
    from dcn_inspect.cli import main

    monkeypatch.setenv("COLUMNS", "250")
    monkeypatch.setattr(sys, "argv", ["dcn-inspect", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def _deformable(model: torch.nn.Module) -> dict:
    return {name: m for name, m in model.named_modules() if isinstance(m, DeformConv2dPack)}


def test_resnets_are_registered_with_torchvision_names():
    assert set(RESNETS) <= set(registry.names())
    model = registry.get("resnet50-dcn-mmdet").build(base_channels=8)
    keys = model.state_dict().keys()
    for key in (
        "conv1.weight",
        "bn1.running_mean",
        "layer1.0.downsample.0.weight",
        "layer1.0.downsample.1.weight",
        "layer2.0.conv2.weight",
        "layer2.0.conv2.conv_offset.weight",
        "layer4.2.bn3.bias",
    ):
        assert key in keys
    assert not any("fc." in k for k in keys)  # backbone only unless num_classes is set


def test_paper_setting_structure():
    model = registry.get("resnet101-dcn-paper").build()
    deformable = _deformable(model)
    assert sorted(deformable) == ["layer4.0.conv2", "layer4.1.conv2", "layer4.2.conv2"]
    for layer in deformable.values():
        assert (layer.kernel_size, layer.stride, layer.dilation, layer.padding) == (
            (3, 3),
            (1, 1),
            (2, 2),
            (2, 2),
        )
        offset = layer.conv_offset
        assert (offset.kernel_size, offset.dilation, offset.padding, offset.out_channels) == (
            (3, 3),
            (2, 2),
            (2, 2),
            18,
        )
        assert offset.weight.abs().sum() == 0 and offset.bias.abs().sum() == 0  # zero-initialised
    assert model.layer4[0].downsample[0].stride == (1, 1)
    assert len(model.layer3) == 23
    # torchvision's ResNet-101 has 44,549,160 parameters, 2,049,000 of them in the fc classifier;
    # the three offset convs add 3 x (512*18*9 + 18).
    assert sum(p.numel() for p in model.parameters()) == 44_549_160 - 2_049_000 + 3 * (
        512 * 18 * 9 + 18
    )


def test_mmdet_setting_structure_and_options():
    model = registry.get("resnet50-dcn-mmdet").build(
        base_channels=8, modulated=True, offset_groups=2
    )
    deformable = _deformable(model)
    assert len(deformable) == 4 + 6 + 3  # every 3x3 conv of layer2..layer4
    assert all(isinstance(m, ModulatedDeformConv2dPack) for m in deformable.values())
    assert all(m.conv_offset.out_channels == 2 * 27 for m in deformable.values())
    for stage in ("layer2", "layer3", "layer4"):  # pytorch style: the stride sits on the 3x3 conv
        assert deformable[f"{stage}.0.conv2"].stride == (2, 2)
        assert getattr(model, stage)[0].conv1.stride == (1, 1)
    caffe = registry.get("resnet50-dcn-mmdet").build(base_channels=8, stride_in_1x1=True)
    assert caffe.layer3[0].conv1.stride == (2, 2) and caffe.layer3[0].conv2.stride == (1, 1)


@pytest.mark.parametrize("arch,stride", [("resnet50-dcn-paper", 16), ("resnet50-dcn-mmdet", 32)])
def test_forward_returns_stage_outputs(arch, stride):
    model = registry.get(arch).build(base_channels=4, num_classes=5).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 96))
    assert out["layer1"].shape == (2, 16, 16, 24)
    assert out["layer4"].shape == (2, 128, 64 // stride, 96 // stride)
    assert out["logits"].shape == (2, 5)


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match="depth must be one of"):
        DeformableResNet(depth=34)
    with pytest.raises(ValueError, match="one value per stage"):
        DeformableResNet(dcn_stages=[True])


def test_native_checkpoint_round_trip(tmp_path):
    arch = registry.get("resnet50-dcn-paper")
    config = {**arch.default_config, "base_channels": 4, "modulated": True}
    model = arch.build(**config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.1)
    path = tmp_path / "native.pt"
    save_native(path, arch.name, config, model, meta={"note": "test"})
    loaded = load_model(str(path))
    assert (
        loaded.source == "native"
        and loaded.config["modulated"] is True
        and loaded.config["base_channels"] == 4
    )
    images = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.model(images)["layer4"], model(images)["layer4"], rtol=0, atol=0
        )


def test_models_command_lists_architectures(monkeypatch, capsys):
    code, out, _ = _run_cli(["models"], monkeypatch, capsys)
    assert code == 0
    rows = [row for row in list_architectures() if row.name in RESNETS]
    assert len(rows) == 4 and all(row.weights_label == "-" for row in rows)
    for name in RESNETS:
        line = next(line for line in out.splitlines() if f"│ {name} " in line)
        assert line.rstrip().rstrip("│").rstrip().endswith("-")
    code, out, _ = _run_cli(["models", "--help"], monkeypatch, capsys)
    assert code == 0 and "Example: dcn-inspect models" in out
    code, out, _ = _run_cli(["info", "--help"], monkeypatch, capsys)
    assert code == 0 and "dcn-inspect info resnet101-dcn-paper" in out


def _offset_model_file(tmp_path: Path) -> Path:
    """A tiny paper-setting ResNet-50 (v2) with non-zero offsets, saved natively."""
    arch = registry.get("resnet50-dcn-paper")
    config = {**arch.default_config, "base_channels": 4, "modulated": True}
    model = arch.build(**config)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "conv_offset" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    path = tmp_path / "r50_paper_v2.pt"
    save_native(path, arch.name, config, model)
    return path


def _image_file(tmp_path: Path, height: int = 48, width: int = 64) -> Path:
    path = tmp_path / "scene.png"
    Image.fromarray(
        np.random.default_rng(2).integers(0, 256, (height, width, 3), dtype=np.uint8)
    ).save(path)
    return path


def test_model_info_statistics_match_the_probe(tmp_path):
    from dcn_inspect.capture.session import probe
    from dcn_inspect.io.images import load_image, to_model_input

    loaded = load_model(str(_offset_model_file(tmp_path)))
    image = _image_file(tmp_path)
    info = model_info(loaded, image, resize=0)
    assert [layer.name for layer in info.layers] == [
        "layer4.0.conv2",
        "layer4.1.conv2",
        "layer4.2.conv2",
    ]
    assert info.probe_input_hw == (48, 64) and info.original_hw == (48, 64)
    layer = info.layers[1]
    assert (
        layer.kernel,
        layer.stride,
        layer.dilation,
        layer.offset_channels,
        layer.mask_channels,
    ) == ((3, 3), (1, 1), (2, 2), 18, 9)
    assert (
        layer.version == "v2"
        and layer.input_stride_px == (16.0, 16.0)
        and layer.geometry_method == "hooks"
    )
    # Offsets by hand from an independent probe: |(dy, dx)| per kernel point and cell.
    record = probe(
        loaded.model, to_model_input(load_image(image), loaded.preprocess, 0).tensor
    ).convs["layer4.1.conv2"]
    dy, dx = record.offset[0, 0::2].double(), record.offset[0, 1::2].double()
    magnitude = (dy**2 + dx**2).sqrt()
    assert layer.offsets.mean_cells == pytest.approx(float(magnitude.mean()))
    assert layer.offsets.max_cells == pytest.approx(float(magnitude.max()))
    assert layer.offsets.mean_pixels == pytest.approx(16 * float(magnitude.mean()))
    assert layer.offsets.mean_mask == pytest.approx(float(record.mask.double().mean()))
    assert layer.offsets.mean_cells > 0.05
    # Parameter counts: the offset branches of three v2 layers with 32 channels.
    assert info.offset_branch_parameters == 3 * (32 * 27 * 9 + 27)
    assert info.deformable_parameters == 3 * 32 * 32 * 9
    assert info.total_parameters == sum(p.numel() for p in loaded.model.parameters())


def test_info_command_with_an_image(tmp_path, monkeypatch, capsys):
    model_path = _offset_model_file(tmp_path)
    code, out, err = _run_cli(
        ["info", str(model_path), str(_image_file(tmp_path)), "--resize", "0"], monkeypatch, capsys
    )
    assert code == 0, err
    assert "native" in out and "48x64" not in out and "64x48 model-input pixels" in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith("layer4.")]
    names = ["layer4.0.conv2", "layer4.1.conv2", "layer4.2.conv2"]
    # One narrow table per concern, each row led by the layer name: type, arithmetic, frames,
    # offsets.
    assert [row[0] for row in rows] == names * 4
    assert rows[0][1:] == [
        "ModulatedDeformConv2dPack",
        "v2",
        "module",
    ]  # type, version, captured as
    assert rows[3][1:] == ["3x3", "1", "2", "1", "1", "18+9"]
    assert rows[6][1:] == ["16", "16", "hooks"]
    assert all(float(value) > 0 for row in rows[9:] for value in row[1:])


def test_info_fits_80_columns_without_ellipsis(tmp_path):
    from rich.console import Console

    from dcn_inspect.commands.info import model_info
    from dcn_inspect.models.loading import load_model
    from dcn_inspect.report.info import info_renderables

    loaded = load_model(str(_offset_model_file(tmp_path)))
    for image in (None, _image_file(tmp_path)):
        info = model_info(loaded, image, 0)
        console = Console(width=80, record=True, file=open(os.devnull, "w"))
        for renderable in info_renderables(info):
            console.print(renderable)
        text = console.export_text()
        assert max(len(line) for line in text.splitlines()) <= 80 and "…" not in text
        squeezed = "".join(text.split())  # a long value may wrap, but is printed whole
        for word in (
            "ModulatedDeformConv2dPack",
            "layer4.2.conv2",
            "18+9",
            "offset",
            "channels",
            "dilation",
            loaded.checkpoint_sha256,
        ):
            assert word in squeezed
        assert ("median" in text) == (image is not None)


def test_info_takes_the_model_as_argument_or_option_and_explains_the_order(
    tmp_path, monkeypatch, capsys
):
    model_path = _offset_model_file(tmp_path)
    image = str(_image_file(tmp_path))
    code, out, err = _run_cli(
        ["info", image, "--model", str(model_path), "--resize", "0"], monkeypatch, capsys
    )
    assert code == 0, err
    assert "64x48 model-input pixels" in out and "layer4.2.conv2" in out
    code, _, err = _run_cli(["info", image], monkeypatch, capsys)
    assert (
        code == 2
        and "is an image, not a model" in err
        and "MODEL [IMAGE]" in err
        and "--model" in err
    )
    code, _, err = _run_cli(["info", image, str(model_path)], monkeypatch, capsys)
    assert (
        code == 2
        and f"the order is MODEL IMAGE: dcn-inspect info {model_path} {image}"
        in " ".join(err.split())
    )
    code, _, err = _run_cli(
        ["info", str(model_path), image, "--model", "dcn-sample"], monkeypatch, capsys
    )
    assert code == 2 and "at most one argument" in err


def test_info_command_errors_are_one_line(tmp_path, monkeypatch, capsys):
    code, _, err = _run_cli(["info", "no-such-model"], monkeypatch, capsys)
    assert code == 1 and err.count("\n") == 1 and "neither a registered architecture" in err
    code, _, err = _run_cli(
        ["info", "resnet50-dcn-mmdet", str(tmp_path / "missing.png")], monkeypatch, capsys
    )
    assert code == 1 and "image not found" in err


def test_info_on_a_model_without_deformable_layers(tmp_path, monkeypatch, capsys):
    source = tmp_path / "plain.py"
    source.write_text("from torch import nn\n\ndef build():\n    return nn.Conv2d(3, 4, 3)\n")
    code, out, _ = _run_cli(["info", f"{source}:build"], monkeypatch, capsys)
    assert code == 0 and "No deformable conv layer or deformable attention ran" in out


# --------------------------------------------------------------------------------------------
# Configs and preprocessing from files are checked before anything is built


@pytest.mark.parametrize(
    "data,message",
    [
        (
            5,
            "expected a dict of mean, std, resize, max_size, interpolation, size_rule, "
            "size_divisor, fixed_size, got int",
        ),
        ({"fixed_size": [640, 0]}, "fixed_size must be (height, width) in pixels"),
        ({"fixed_size": [64, 64], "resize": 32}, "fixed_size replaces resize and max_size"),
        (
            {"size_divisor": 10**6},
            "size_divisor 1000000: must be 0 (no padding) or a positive number of pixels "
            "up to 16384",
        ),
        ({"interpolation": 3}, "interpolation 3: use pil-bilinear or cv2-bilinear"),
        ({"resize": "600"}, "resize must be a whole number of pixels from 0 to 16384, got '600'"),
        ({"resize": 60000}, "resize must be a whole number of pixels from 0 to 16384, got 60000"),
        ({"max_size": -1}, "max_size must be a whole number"),
        ({"resize": True}, "resize must be a whole number"),
        ({"mean": [0.5, 0.5]}, "mean must be 3 finite numbers"),
        ({"std": [0.2, float("nan"), 0.2]}, "std must be 3 finite numbers"),
        ({"std": [0.2, 0.0, 0.2]}, "std must be positive"),
        ({"scale": 2}, "unknown field 'scale'"),
    ],
)
def test_preprocess_from_dict_names_the_bad_field(data, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        registry.Preprocess.from_dict(data)


def test_preprocess_from_dict_keeps_valid_values_and_defaults():
    preprocess = registry.Preprocess.from_dict(
        {"mean": [0.5, 0.4, 0.3], "resize": 600, "max_size": 1000}
    )
    assert preprocess == registry.Preprocess(mean=(0.5, 0.4, 0.3), resize=600, max_size=1000)


@pytest.mark.parametrize(
    "config,message",
    [
        ({"depth": "50"}, "depth must be a whole number (like 50), got '50'"),
        ({"base_channels": 2**40}, "base_channels must be a whole number"),
        ({"modulated": 1}, "modulated must be true or false"),
        ({"dcn_stages": [True, True]}, "dcn_stages must be a list of 4 values"),
        ({"strides": [1, 2, "2", 2]}, "strides[2] must be a whole number"),
        ({"num_classes": 2.5}, "num_classes must be a whole number"),
        (
            {"extra": {"nested": 1}},
            "extra must be a number, a string, true/false or a short list of them",
        ),
        ({"extra": [[1]]}, "extra[0] must be a number"),
        ({"extra": 10**40}, "extra must be a whole number"),
        ({7: 1}, "option names must be identifiers, got 7"),
    ],
)
def test_config_options_are_checked_against_their_defaults(config, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        registry.get("resnet50-dcn-paper").check_config(config)


def test_an_option_the_builder_does_not_take_is_named_by_the_skeleton():
    with pytest.raises(ValueError, match="unexpected keyword argument 'widths'"):
        registry.get("resnet50-dcn-paper").build_skeleton(widths=[16])


def test_config_aliases_and_none_defaults_pass():
    arch = registry.get("resnet50-dcn-paper")
    checked = arch.check_config({"deform_groups": 2, "num_classes": 10})
    assert (
        checked["offset_groups"] == 2
        and checked["num_classes"] == 10
        and "deform_groups" not in checked
    )


def test_skeleton_has_every_shape_and_no_memory():
    import resource

    arch = registry.get("dcn-sample")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    skeleton = arch.build_skeleton(widths=[16, 24, 48, 64, 40000])  # ~40 GB of weights for real
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    weight = skeleton.state_dict()["layer4.0.conv1.weight"]
    assert weight.is_meta and tuple(weight.shape) == (20000, 64, 1, 1)
    assert (after - before) * 1024 < 64 * 2**20
    real = arch.build()
    assert {k: tuple(v.shape) for k, v in arch.build_skeleton().state_dict().items()} == {
        k: tuple(v.shape) for k, v in real.state_dict().items()
    }


def test_builder_refusal_on_the_skeleton_is_a_value_error():
    with pytest.raises(ValueError, match=r"width \(6\) must be divisible by offset_groups \(4\)"):
        registry.get("resnet50-dcn-mmdet").build_skeleton(base_channels=6, offset_groups=4)

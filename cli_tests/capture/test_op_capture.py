"""Capture at the op: functional deform_conv calls made by the user's own modules are recorded,
named after the innermost module that made them, with frames through the forward, never twice.

Each functional model has a module-level twin computing the same offsets with the same convs
(the op called through dcn-inspect's ``DeformConv2d`` module instead of the functional entry
point, at the same qualified name): the two must give the same sample-points CSV bytes and the
same dilation table.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import raises_cli
from deformable_twins import (
    FunctionalDeformable,
    InSequential,
    ThreeFunctional,
    TwiceInOneModule,
    TwiceModuleLevel,
    module_twin,
    sequential_twin,
)
from PIL import Image
from torch import nn

from dcn_inspect.capture.selection import select_layers
from dcn_inspect.capture.session import capture_offsets, probe
from dcn_inspect.commands.dilation_stats import dilation_stats
from dcn_inspect.commands.sample_points import sample_points
from dcn_inspect.core.errors import InputError
from dcn_inspect.models.loaded_model import LoadedModel
from dcn_inspect.models.loading import load_model
from dcn_inspect.models.registry import Preprocess
from dcn_inspect.ops import DeformConv2dPack, deform_conv2d

PLAIN = Preprocess(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), resize=0)


def _dataset(root: Path) -> Path:
    root.mkdir()
    images, annotations = [], []
    for i, (w, h) in enumerate([(48, 40), (40, 48)]):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            root / f"im{i}.png"
        )
        images.append({"id": i + 1, "file_name": f"im{i}.png", "width": w, "height": h})
        for k, bbox in enumerate([[2, 2, 8, 8], [10, 6, 14, 14], [4, 12, 30, 24]]):
            annotations.append(
                {"id": 10 * i + k, "image_id": i + 1, "bbox": bbox, "category_id": 1, "iscrowd": 0}
            )
    path = root / "annotations.json"
    path.write_text(
        json.dumps(
            {
                "images": images,
                "annotations": annotations,
                "categories": [{"id": 1, "name": "thing"}],
            }
        )
    )
    return path


CASES = {
    "offset and modulator convs": (
        ThreeFunctional,
        lambda m: module_twin(m, ["a.conv", "b.conv", "c.conv"]),
        ["a.conv", "b.conv", "c.conv"],
    ),
    "two op calls in one module": (TwiceInOneModule, TwiceModuleLevel, ["body", "body#2"]),
    "inside nn.Sequential": (InSequential, sequential_twin, ["features.2", "features.4"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_functional_model_equals_its_module_level_twin(tmp_path, case):
    build, twin_of, names = CASES[case]
    functional = build().eval()
    twin = twin_of(functional).eval()
    records = probe(functional, torch.randn(1, 3, 40, 48)).convs
    assert list(records) == names
    assert all(
        r.op == "dcn_inspect.ops.deform_conv2d" and r.geometry.method == "hooks" and r.modulated
        for r in records.values()
    )
    twin_records = probe(twin, torch.randn(1, 3, 40, 48)).convs
    assert list(twin_records) == names and all(r.op is None for r in twin_records.values())

    image = tmp_path / "scene.png"
    Image.fromarray(np.random.default_rng(9).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(
        image
    )
    dataset = _dataset(tmp_path / "data")
    outputs = {}
    for label, model in (("functional", functional), ("module", twin)):
        loaded = LoadedModel(model, case, None, {}, PLAIN, "user-file")
        result = sample_points(
            [image], model=loaded, grid=3, levels=len(names), out=tmp_path / label, progress=False
        )
        table = dilation_stats(
            dataset,
            model=loaded,
            out=tmp_path / f"{label}-dil",
            thresholds="50,300",
            workers=0,
            progress=False,
            figure=False,
        ).table
        outputs[label] = (result.images[0].csv.read_bytes(), table)
    assert outputs["functional"][0] == outputs["module"][0]
    assert len(outputs["functional"][0].splitlines()) > 9
    assert outputs["functional"][1].equals(outputs["module"][1])
    assert (outputs["functional"][1]["count"] > 0).any()


def test_frames_of_op_calls_follow_the_forward():
    """Stem 3x3 s2 p1: the first layer reads the stride-2 frame (x = 2c + 0.5); a stride-2 op
    call doubles it for the layer after it."""

    class Strided(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 3, stride=2, padding=1)
            self.first = FunctionalDeformable(4, 1, seed=1)
            self.weight = nn.Parameter(torch.randn(4, 4, 3, 3) * 0.1)
            self.second = FunctionalDeformable(4, 1, seed=2)

        def forward(self, images):
            x = self.first(self.stem(images))
            offset = torch.zeros(x.shape[0], 18, (x.shape[2] + 1) // 2, (x.shape[3] + 1) // 2)
            x = deform_conv2d(x, offset, self.weight, None, 2, 1, 1)  # made by the model itself
            return self.second(x)

    records = probe(Strided().eval(), torch.randn(1, 3, 32, 40)).convs
    assert list(records) == ["first", "Strided", "second"]
    assert records["first"].geometry.input_frame.as_dict() == {
        "stride_x": 2.0,
        "stride_y": 2.0,
        "offset_x": 0.5,
        "offset_y": 0.5,
    }
    assert records["Strided"].geometry.stride == (2, 2)
    assert records["second"].geometry.input_frame.as_dict() == {
        "stride_x": 4.0,
        "stride_y": 4.0,
        "offset_x": 0.5,
        "offset_y": 0.5,
    }
    assert records["second"].weight_shape == (4, 4, 3, 3) and records["second"].groups == 1


def test_module_level_capture_is_not_counted_again_at_the_op():
    layer = DeformConv2dPack(4, 4, 3, padding=1).eval()
    records = probe(layer, torch.randn(1, 4, 8, 8)).convs
    assert list(records) == ["DeformConv2dPack"] and records["DeformConv2dPack"].op is None


# ------------------------------------------------------------------------------ other libraries

USER_FILE = '''
import torch
from torch import nn
import torchvision.ops
from torchvision.ops import deform_conv2d as tv_deform_conv2d
from mmcv.ops import modulated_deform_conv2d


class Research(nn.Module):
    """Three ways of calling other libraries' ops, none through a module they define."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.offset_conv = nn.Conv2d(4, 18, 3, padding=1)
        self.modulator_conv = nn.Conv2d(4, 9, 3, padding=1)
        self.weight = nn.Parameter(torch.randn(4, 4, 3, 3) * 0.2)
        self.seen = {}

    def forward(self, images):
        x = images[:, :1].repeat(1, 4, 1, 1)
        offset, mask = self.offset_conv(x), torch.sigmoid(self.modulator_conv(x))
        self.seen["a"] = (offset, mask)
        x = tv_deform_conv2d(x, offset, self.weight, mask=mask, padding=(1, 1))  # a name bound at import
        offset, mask = self.offset_conv(x), torch.sigmoid(self.modulator_conv(x))
        self.seen["b"] = (offset, mask)
        x = torchvision.ops.deform_conv2d(x, offset, self.weight, None, 1, 1, 1, mask)  # looked up at call time
        offset, mask = self.offset_conv(x), torch.sigmoid(self.modulator_conv(x))
        self.seen["c"] = (offset, mask)
        return modulated_deform_conv2d(x, offset, mask, self.weight, None, 1, 1, 1, 1, 1)  # mmcv's signature


def build():
    return Research().eval()
'''  # noqa: E501 - the source is written to a model file as is


def _stand_in_modules(monkeypatch) -> None:
    """torchvision.ops and mmcv.ops stand-ins: their functional entry points with their real
    signatures, computing with dcn-inspect's op (the libraries do not run on this CPU)."""

    def tv_deform_conv2d(
        input, offset, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), mask=None
    ):
        return deform_conv2d(input, offset, weight, bias, stride, padding, dilation, mask)

    def mmcv_modulated(
        input,
        offset,
        mask,
        weight,
        bias,
        stride=1,
        padding=0,
        dilation=1,
        groups=1,
        deform_groups=1,
    ):
        return deform_conv2d(input, offset, weight, bias, stride, padding, dilation, mask)

    def mmcv_deform(
        input,
        offset,
        weight,
        stride=1,
        padding=0,
        dilation=1,
        groups=1,
        deform_groups=1,
        bias=False,
        im2col_step=32,
    ):
        return deform_conv2d(input, offset, weight, None, stride, padding, dilation)

    packages = {}
    for name in (
        "torchvision",
        "torchvision.ops",
        "torchvision.ops.deform_conv",
        "mmcv",
        "mmcv.ops",
        "mmcv.ops.deform_conv",
        "mmcv.ops.modulated_deform_conv",
    ):
        packages[name] = types.ModuleType(name)
        monkeypatch.setitem(sys.modules, name, packages[name])
    packages["torchvision"].ops = packages["torchvision.ops"]
    packages["mmcv"].ops = packages["mmcv.ops"]
    packages["torchvision.ops.deform_conv"].deform_conv2d = packages[
        "torchvision.ops"
    ].deform_conv2d = tv_deform_conv2d
    packages["mmcv.ops.modulated_deform_conv"].modulated_deform_conv2d = packages[
        "mmcv.ops"
    ].modulated_deform_conv2d = mmcv_modulated
    packages["mmcv.ops.deform_conv"].deform_conv2d = packages["mmcv.ops"].deform_conv2d = (
        mmcv_deform
    )


def test_stand_ins_for_torchvision_and_mmcv_entry_points_are_captured(tmp_path, monkeypatch):
    _stand_in_modules(monkeypatch)
    source = tmp_path / "research.py"
    source.write_text(USER_FILE)
    loaded = load_model(f"{source}:build")
    model = loaded.model
    import torchvision.ops  # the stand-in

    original = torchvision.ops.deform_conv2d
    result = probe(model, torch.randn(1, 3, 12, 14))
    assert list(result.convs) == ["Research", "Research#2", "Research#3"]
    ops = [r.op for r in result.convs.values()]
    assert ops == [
        "torchvision.ops.deform_conv2d",
        "torchvision.ops.deform_conv2d",
        "mmcv.ops.modulated_deform_conv2d",
    ]
    for record, key in zip(result.convs.values(), "abc"):
        offset, mask = model.seen[key]
        torch.testing.assert_close(record.offset, offset, rtol=0, atol=0)
        torch.testing.assert_close(record.mask, mask, rtol=0, atol=0)
        assert record.geometry.padding == (1, 1) and record.geometry.method == "hooks"
    # Everything is put back: the library attribute and the user's own name.
    assert torchvision.ops.deform_conv2d is original
    assert sys.modules[type(model).__module__].tv_deform_conv2d is original


def test_torchvisions_cpp_op_is_captured_whatever_name_holds_it():
    """A ``torchvision::deform_conv2d`` custom op with torchvision's schema (registered here when
    torchvision itself is absent), called directly: seen through the torch-function mode."""
    from dcn_inspect.capture.op_calls import torchvision_op_registered

    if not torchvision_op_registered():
        library = torch.library.Library("torchvision", "DEF")  # noqa: F841 - kept for the process
        library.define(
            "deform_conv2d(Tensor input, Tensor weight, Tensor offset, Tensor mask, Tensor bias, "
            "SymInt stride_h, SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, "
            "SymInt dilation_w, SymInt groups, SymInt offset_groups, bool use_mask) -> Tensor"
        )

        def kernel(
            input,
            weight,
            offset,
            mask,
            bias,
            sh,
            sw,
            ph,
            pw,
            dh,
            dw,
            groups,
            offset_groups,
            use_mask,
        ):
            from dcn_inspect.ops import reference

            return reference.deform_conv2d(
                input,
                offset,
                weight,
                bias,
                (sh, sw),
                (ph, pw),
                (dh, dw),
                mask if use_mask else None,
            )

        library.impl("deform_conv2d", kernel, "CPU")
        _LIBRARIES.append(library)
    op = torch.ops.torchvision.deform_conv2d

    class Raw(nn.Module):
        def __init__(self):
            super().__init__()
            self.offset = nn.Conv2d(4, 18, 3, stride=2, padding=1)
            self.weight = nn.Parameter(torch.randn(4, 4, 3, 3) * 0.2)

        def forward(self, x):
            offset = self.offset(x)
            return op(
                x,
                self.weight,
                offset,
                torch.zeros(0),
                torch.zeros(4),
                2,
                2,
                1,
                1,
                1,
                1,
                1,
                1,
                False,
            )

    model = nn.Sequential(nn.Conv2d(3, 4, 1), Raw()).eval()
    records = probe(model, torch.randn(1, 3, 10, 12)).convs
    assert list(records) == ["1"]
    record = records["1"]
    assert (
        record.op == "torch.ops.torchvision.deform_conv2d"
        and record.mask is None
        and record.geometry.stride == (2, 2)
    )
    assert record.offset.shape == (1, 18, 5, 6) and record.geometry.method == "hooks"


_LIBRARIES: list = []


def test_no_capture_names_what_was_looked_for():
    model = nn.Sequential(nn.Conv2d(3, 4, 3)).eval()
    with capture_offsets(model) as capture:
        capture.watch_input(torch.zeros(1, 3, 8, 8))
        model(torch.zeros(1, 3, 8, 8))
    with raises_cli(
        r"--model plain: the model ran no deformable conv layer .*DCNv3"
        r".*torchvision\.ops\.deform_conv2d.*mmcv\.ops\.modulated_deform_conv2d",
        "sample-points",
    ):
        select_layers(capture.convs, model_name="plain")
    with pytest.raises(InputError) as info:
        select_layers(capture.convs, model_name="plain")
    assert (
        "\n" not in str(info.value)
        and "detectron2.layers.deform_conv" in str(info.value)
        and "DCNv4" in str(info.value)
    )


def test_the_op_is_restored_even_when_the_forward_fails():
    import dcn_inspect.ops as ops_package
    import dcn_inspect.ops.functional as functional_module

    original = functional_module.deform_conv2d
    model = ThreeFunctional().eval()
    from dcn_inspect.capture.session import ModelRaised

    with pytest.raises(ModelRaised) as info:  # the model's own error, named as the model's
        probe(model, torch.randn(1, 5, 8, 8))  # wrong channel count
    assert isinstance(info.value.original, RuntimeError)
    assert functional_module.deform_conv2d is original and ops_package.deform_conv2d is original
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == 0


LATE_SOURCE = """
from torch import nn


class Late(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        offset, mask = self.inner.branches(x)
        return late_conv(x, offset, self.inner.weight, None, 1, self.inner.dilation, self.inner.dilation, mask)
"""  # noqa: E501 - the source is compiled as is


def test_an_entry_point_bound_after_a_capture_is_captured_by_the_next(monkeypatch):
    # Captures remember where entry points were found; a module that gains a name bound to one
    # (here after a first capture searched it without) is searched again.
    module = types.ModuleType("late_user_module")
    monkeypatch.setitem(sys.modules, "late_user_module", module)
    exec(compile(LATE_SOURCE, "late_user_module.py", "exec"), module.__dict__)
    model = module.Late(FunctionalDeformable(3, 1, seed=4)).eval()
    images = torch.randn(1, 3, 10, 12)
    with (
        torch.no_grad(),
        capture_offsets(ThreeFunctional().eval()) as first,
    ):  # searches late_user_module: nothing there yet
        first.watch_input(images)
    assert "late_conv" not in module.__dict__
    module.late_conv = deform_conv2d
    result = probe(model, images)
    assert (
        list(result.convs) == ["Late"]
        and result.convs["Late"].op == "dcn_inspect.ops.deform_conv2d"
    )
    offset, mask = model.inner.branches(images)
    torch.testing.assert_close(result.convs["Late"].offset, offset, rtol=0, atol=0)
    assert module.late_conv is deform_conv2d  # put back after the capture

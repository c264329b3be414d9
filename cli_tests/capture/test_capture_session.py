"""Offset hooks: the captured offsets are the ones the layers used; foreign layers are matched
by class name and module path; model outputs are unchanged and hooks are removed on exit."""

from __future__ import annotations

from typing import Dict, Optional

import pytest
import torch
from torch import nn

from dcn_inspect.capture.foreign_layers import identify
from dcn_inspect.capture.session import capture_offsets, probe
from dcn_inspect.models import registry
from dcn_inspect.ops import deform_conv2d


def _tiny_paper_resnet(modulated: bool, offset_groups: int = 1) -> nn.Module:
    config = {
        **registry.get("resnet50-dcn-paper").default_config,
        "base_channels": 4,
        "modulated": modulated,
        "offset_groups": offset_groups,
    }
    model = registry.get("resnet50-dcn-paper").build(**config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "conv_offset" in name:  # non-zero offsets and masks
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    return model.eval()


def _hook_count(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(getattr(m, "_offset_observers", []))
        for m in model.modules()
    )


@pytest.mark.parametrize("modulated,offset_groups", [(False, 1), (True, 2)])
def test_hooked_offsets_are_the_offsets_used(modulated, offset_groups):
    model = _tiny_paper_resnet(modulated, offset_groups)
    images = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        plain = model(images)
    result = probe(model, images)
    assert list(result.convs) == ["layer4.0.conv2", "layer4.1.conv2", "layer4.2.conv2"]
    assert _hook_count(model) == 0  # everything removed on exit
    for stage, value in plain.items():
        torch.testing.assert_close(result.output[stage], value, rtol=0, atol=0)

    # Manual forward of layer4, block by block, with the offsets computed by hand.
    with torch.no_grad():
        x = plain["layer3"]
        for index, block in enumerate(model.layer4):
            out = block.relu(block.bn1(block.conv1(x)))
            raw = block.conv2.conv_offset(out)
            points = 9 * offset_groups
            if modulated:
                offset, mask = raw[:, : 2 * points], torch.sigmoid(raw[:, 2 * points :])
            else:
                offset, mask = raw, None
            record = result.convs[f"layer4.{index}.conv2"]
            torch.testing.assert_close(record.offset, offset, rtol=0, atol=0)
            assert record.offset.abs().max() > 0.01
            if modulated:
                torch.testing.assert_close(record.mask, mask, rtol=0, atol=0)
            else:
                assert record.mask is None
            assert record.offset_groups == offset_groups and record.modulated is modulated
            assert (
                record.geometry.kernel == (3, 3)
                and record.geometry.dilation == (2, 2)
                and record.geometry.padding == (2, 2)
            )
            conv = deform_conv2d(out, record.offset, block.conv2.weight, None, 1, 2, 2, record.mask)
            out = block.relu(block.bn2(conv))
            x = block.relu(
                block.bn3(block.conv3(out))
                + (x if block.downsample is None else block.downsample(x))
            )
    torch.testing.assert_close(x, plain["layer4"], rtol=1e-5, atol=1e-5)


def test_hooks_removed_even_when_the_forward_fails():
    model = _tiny_paper_resnet(False)
    with pytest.raises(RuntimeError):
        with capture_offsets(model) as capture:
            capture.watch_input(torch.zeros(1, 3, 8, 8))
            model(torch.zeros(1, 5, 8, 8))  # wrong channel count
    assert _hook_count(model) == 0


# ------------------------------------------------------------------------ foreign layers (fakes)
# Stand-ins with the foreign classes' names, module paths, attributes and forward signatures,
# computing with our functional op: they prove matching without torchvision or mmcv installed.


class _ForeignBase(nn.Module):
    def __init__(
        self,
        channels: int,
        stride: int = 1,
        padding: int = 1,
        dilation: int = 1,
        deform_groups: int = 1,
    ) -> None:
        super().__init__()
        self.kernel_size = (3, 3)
        self.stride = (stride, stride)
        self.padding = (padding, padding)
        self.dilation = (dilation, dilation)
        self.groups = 1
        self.deform_groups = deform_groups
        self.weight = nn.Parameter(torch.randn(channels, channels, 3, 3) * 0.2)

    def _op(
        self, x: torch.Tensor, offset: torch.Tensor, mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        return deform_conv2d(
            x, offset, self.weight, None, self.stride, self.padding, self.dilation, mask
        )


class TorchvisionDeformConv2d(_ForeignBase):
    def forward(
        self, input: torch.Tensor, offset: torch.Tensor, mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        return self._op(input, offset, mask)


TorchvisionDeformConv2d.__name__ = "DeformConv2d"
TorchvisionDeformConv2d.__module__ = "torchvision.ops.deform_conv"


class MmcvDeformConv2d(_ForeignBase):
    def forward(self, x: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        return self._op(x, offset)


MmcvDeformConv2d.__name__ = "DeformConv2d"
MmcvDeformConv2d.__module__ = "mmcv.ops.deform_conv"


class MmcvModulatedDeformConv2d(_ForeignBase):
    def forward(self, x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self._op(x, offset, mask)


MmcvModulatedDeformConv2d.__name__ = "ModulatedDeformConv2d"
MmcvModulatedDeformConv2d.__module__ = "mmcv.ops.modulated_deform_conv"


class MmcvDeformConv2dPack(MmcvDeformConv2d):
    def __init__(self, channels: int, **kwargs) -> None:
        super().__init__(channels, **kwargs)
        self.conv_offset = nn.Conv2d(
            channels, 18, 3, stride=self.stride, padding=self.padding, dilation=self.dilation
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self._op(x, self.conv_offset(x))


MmcvDeformConv2dPack.__name__ = "DeformConv2dPack"
MmcvDeformConv2dPack.__module__ = "mmcv.ops.deform_conv"


class MmcvModulatedDeformConv2dPack(MmcvModulatedDeformConv2d):
    def __init__(self, channels: int, **kwargs) -> None:
        super().__init__(channels, **kwargs)
        self.conv_offset = nn.Conv2d(
            channels, 27, 3, stride=self.stride, padding=self.padding, dilation=self.dilation
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        o1, o2, mask = torch.chunk(self.conv_offset(x), 3, dim=1)
        return self._op(x, torch.cat((o1, o2), dim=1), torch.sigmoid(mask))


MmcvModulatedDeformConv2dPack.__name__ = "ModulatedDeformConv2dPack"
MmcvModulatedDeformConv2dPack.__module__ = "mmcv.ops.modulated_deform_conv"


class SameNameElsewhere(_ForeignBase):
    def forward(
        self, input: torch.Tensor, offset: torch.Tensor, mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        return self._op(input, offset, mask)


SameNameElsewhere.__name__ = "DeformConv2d"
SameNameElsewhere.__module__ = "mylib.layers"


class OverridesForward(TorchvisionDeformConv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self._op(x, torch.zeros(x.shape[0], 18, x.shape[2], x.shape[3]))


class ForeignNet(nn.Module):
    """One of each foreign layer; offsets for the passed-in kinds come from plain convs."""

    def __init__(self) -> None:
        super().__init__()
        c = 4
        self.stem = nn.Conv2d(3, c, 3, stride=2, padding=1)
        self.tv_offset = nn.Conv2d(c, 27, 3, padding=1)
        self.tv = TorchvisionDeformConv2d(c)
        self.mm_offset = nn.Conv2d(c, 18, 3, stride=2, padding=2, dilation=2)
        self.mm = MmcvDeformConv2d(c, stride=2, padding=2, dilation=2)
        self.mmod_offset = nn.Conv2d(c, 27, 3, padding=1)
        self.mmod = MmcvModulatedDeformConv2d(c)
        self.pack = MmcvDeformConv2dPack(c)
        self.mpack = MmcvModulatedDeformConv2dPack(c)
        self.elsewhere = SameNameElsewhere(c)
        self.overrides = OverridesForward(c)
        for module in (
            self.tv_offset,
            self.mm_offset,
            self.mmod_offset,
            self.pack.conv_offset,
            self.mpack.conv_offset,
        ):
            nn.init.normal_(module.weight, std=0.1)
        self.seen: Dict[str, torch.Tensor] = {}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.stem(images)
        raw = self.tv_offset(x)
        self.seen["tv.offset"], self.seen["tv.mask"] = raw[:, :18], torch.sigmoid(raw[:, 18:])
        x = self.tv(x, self.seen["tv.offset"], mask=self.seen["tv.mask"])  # mask as a keyword
        self.seen["mm.offset"] = self.mm_offset(x)
        x = self.mm(x, self.seen["mm.offset"])
        raw = self.mmod_offset(x)
        self.seen["mmod.offset"], self.seen["mmod.mask"] = raw[:, :18], torch.sigmoid(raw[:, 18:])
        x = self.mmod(x, self.seen["mmod.offset"], self.seen["mmod.mask"])
        self.seen["pack.input"] = x
        x = self.pack(x)
        self.seen["mpack.input"] = x
        x = self.mpack(x)
        x = self.elsewhere(x, torch.zeros(x.shape[0], 18, *x.shape[-2:]))
        return self.overrides(x)


def test_foreign_layers_are_matched_by_name_and_module_path():
    net = ForeignNet()
    assert identify(net.tv).library == "torchvision"
    assert identify(net.mm).library == "mmcv" and identify(net.mm).offsets_from == "arguments"
    assert identify(net.pack).offsets_from == "conv_offset" and not identify(net.pack).modulated
    assert identify(net.mpack).modulated
    assert identify(net.elsewhere) is None  # right name, wrong library
    assert identify(net.overrides) is None  # subclass with another forward signature
    assert identify(net.stem) is None


def test_foreign_layers_record_the_offsets_they_used():
    torch.manual_seed(0)
    net = ForeignNet().eval()
    images = torch.randn(1, 3, 40, 48)
    with torch.no_grad():
        plain = net(images)
    result = probe(net, images)
    torch.testing.assert_close(result.output, plain, rtol=0, atol=0)
    # The five library layers are captured as modules; the two look-alikes that are not library
    # layers (another package's class, a subclass with its own forward) call the functional op
    # themselves, so the op-level capture records them, once each.
    assert list(result.convs) == ["tv", "mm", "mmod", "pack", "mpack", "elsewhere", "overrides"]
    assert [c.op for c in result.convs.values()] == [None] * 5 + [
        "dcn_inspect.ops.deform_conv2d"
    ] * 2
    assert _hook_count(net) == 0
    seen = net.seen
    convs = result.convs
    torch.testing.assert_close(convs["tv"].offset, seen["tv.offset"], rtol=0, atol=0)
    torch.testing.assert_close(convs["tv"].mask, seen["tv.mask"], rtol=0, atol=0)
    torch.testing.assert_close(convs["mm"].offset, seen["mm.offset"], rtol=0, atol=0)
    assert convs["mm"].mask is None
    torch.testing.assert_close(convs["mmod"].mask, seen["mmod.mask"], rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(
            convs["pack"].offset, net.pack.conv_offset(seen["pack.input"]), rtol=0, atol=0
        )
        raw = net.mpack.conv_offset(seen["mpack.input"])
    torch.testing.assert_close(convs["mpack"].offset, raw[:, :18], rtol=0, atol=0)
    torch.testing.assert_close(convs["mpack"].mask, torch.sigmoid(raw[:, 18:]), rtol=0, atol=0)
    assert [c.module_type for c in convs.values()][:5] == [
        "DeformConv2d",
        "DeformConv2d",
        "ModulatedDeformConv2d",
        "DeformConv2dPack",
        "ModulatedDeformConv2dPack",
    ]

    # Geometry: kernel arithmetic from the layers' attributes, frames derived through the forward.
    mm = convs["mm"].geometry
    assert (mm.stride, mm.padding, mm.dilation) == ((2, 2), (2, 2), (2, 2))
    assert all(c.geometry.method == "hooks" for c in convs.values())
    # stem: 3x3 s2 p1 -> stride 2, centre offset 0.5; mm (s2) doubles the stride of everything
    # after it.
    assert convs["tv"].geometry.input_frame.as_dict() == {
        "stride_x": 2.0,
        "stride_y": 2.0,
        "offset_x": 0.5,
        "offset_y": 0.5,
    }
    assert convs["mmod"].geometry.input_frame.stride_x == 4.0
    assert convs["mpack"].geometry.input_frame.stride_y == 4.0
    assert convs["mpack"].geometry.output_hw == (10, 12)  # 40x48 -> stem s2 -> 20x24 -> mm s2


def test_hooks_see_repeated_calls_of_one_layer():
    layer = TorchvisionDeformConv2d(3)
    x = torch.randn(1, 3, 8, 8)
    first, second = torch.rand(1, 18, 8, 8), torch.rand(1, 18, 8, 8)
    with torch.no_grad(), capture_offsets(layer) as capture:
        capture.watch_input(x)
        layer(layer(x, first), second)
    assert list(capture.convs) == ["DeformConv2d", "DeformConv2d#2"]
    torch.testing.assert_close(capture.convs["DeformConv2d#2"].offset, second, rtol=0, atol=0)

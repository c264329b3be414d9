"""Small models that call the deformable op functionally (the way research code does: their own
offset and modulator convs, then ``deform_conv2d``), each with a module-level twin computing the
same thing through dcn-inspect's ``DeformConv2d`` at the same qualified name. Shared by the
capture tests and the receptive-field capture tests."""

from __future__ import annotations

import torch
from torch import nn

from dcn_inspect.ops import DeformConv2d, deform_conv2d

__all__ = [
    "OffsetsAndMask",
    "FunctionalDeformable",
    "ModuleDeformable",
    "ThreeFunctional",
    "TwiceInOneModule",
    "FunctionalTwice",
    "TwiceModuleLevel",
    "InSequential",
    "module_twin",
    "sequential_twin",
]


class OffsetsAndMask(nn.Module):
    """The research-code pattern: an ``offset_conv`` (2K channels) and a ``modulator_conv`` (K)."""

    def __init__(self, channels: int, dilation: int, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.offset_conv = nn.Conv2d(channels, 18, 3, padding=dilation, dilation=dilation)
        self.modulator_conv = nn.Conv2d(channels, 9, 3, padding=dilation, dilation=dilation)
        with torch.no_grad():
            for conv in (self.offset_conv, self.modulator_conv):
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * 0.3)
                conv.bias.copy_(torch.randn(conv.bias.shape, generator=gen) * 0.3)

    def forward(self, x: torch.Tensor):
        return self.offset_conv(x), torch.sigmoid(self.modulator_conv(x))


class FunctionalDeformable(nn.Module):
    """Offset and modulator convs, then the functional op (no deformable module to hook)."""

    def __init__(self, channels: int, dilation: int, seed: int) -> None:
        super().__init__()
        self.branches = OffsetsAndMask(channels, dilation, seed)
        self.weight = nn.Parameter(
            torch.randn(channels, channels, 3, 3, generator=torch.Generator().manual_seed(seed + 1))
            * 0.2
        )
        self.dilation = dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        offset, mask = self.branches(x)
        return deform_conv2d(x, offset, self.weight, None, 1, self.dilation, self.dilation, mask)


class ModuleDeformable(DeformConv2d):
    """Twin of :class:`FunctionalDeformable`: the same branches and weight, the op run by
    dcn-inspect's ``DeformConv2d`` module (captured at module level, under the same name)."""

    def __init__(self, functional: FunctionalDeformable) -> None:
        channels = functional.weight.shape[0]
        super().__init__(
            channels,
            channels,
            3,
            padding=functional.dilation,
            dilation=functional.dilation,
            bias=False,
        )
        self.branches = functional.branches
        with torch.no_grad():
            self.weight.copy_(functional.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        offset, mask = self.branches(x)
        return self.deform(x, offset, mask)


class ThreeFunctional(nn.Module):
    """Stem, then three deformable layers called functionally (names ``a.conv``, ``b.conv``,
    ``c.conv``)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.a = nn.Module()
        self.a.conv = FunctionalDeformable(4, 1, seed=1)
        self.b = nn.Module()
        self.b.conv = FunctionalDeformable(4, 2, seed=2)
        self.c = nn.Module()
        self.c.conv = FunctionalDeformable(4, 2, seed=3)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(images))
        x = torch.relu(self.a.conv(x))
        x = torch.relu(self.b.conv(x))
        return self.c.conv(x)


def module_twin(model: nn.Module, names) -> nn.Module:
    """A deep copy of ``model`` whose functional layers at ``names`` become their module-level
    twins."""
    import copy

    twin = copy.deepcopy(model)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = twin.get_submodule(parent_name) if parent_name else twin
        setattr(parent, child, ModuleDeformable(getattr(parent, child)))
    return twin


class TwiceInOneModule(nn.Module):
    """One module calling the op twice (same offset branch and weight): records ``body``,
    ``body#2``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.body = FunctionalTwice(4)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(torch.relu(self.stem(images)))


class FunctionalTwice(FunctionalDeformable):
    def __init__(self, channels: int) -> None:
        super().__init__(channels, 2, seed=5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        once = torch.relu(super().forward(x))
        return super().forward(once)


class TwiceModuleLevel(nn.Module):
    """The twin: one DeformConv2d module at ``body`` called twice."""

    def __init__(self, functional: TwiceInOneModule) -> None:
        super().__init__()
        self.stem = functional.stem
        self.branches = functional.body.branches
        self.body = DeformConv2d(4, 4, 3, padding=2, dilation=2, bias=False)
        with torch.no_grad():
            self.body.weight.copy_(functional.body.weight)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(images))
        offset, mask = self.branches(x)
        once = torch.relu(self.body(x, offset, mask))
        offset, mask = self.branches(once)
        return self.body(once, offset, mask)


class InSequential(nn.Module):
    """A functional layer as an element of ``nn.Sequential``: records ``features.2``,
    ``features.4``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, stride=2, padding=1),
            nn.ReLU(),
            FunctionalDeformable(4, 1, seed=7),
            nn.ReLU(),
            FunctionalDeformable(4, 2, seed=8),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images)


def sequential_twin(model: InSequential) -> nn.Module:
    import copy

    twin = copy.deepcopy(model)
    for index in (2, 4):
        twin.features[index] = ModuleDeformable(twin.features[index])
    return twin

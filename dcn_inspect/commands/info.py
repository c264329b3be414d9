"""What the ``models`` and ``info`` commands report: registered architectures, and a model's
deformable layers with their geometry and (given an image) offset statistics.

Layer geometry comes from one probe forward pass (:func:`dcn_inspect.capture.session.probe`): on the
given image, or on a blank image of :data:`BLANK_PROBE_SIZE` pixels when there is none (the
frame strides do not depend on the image). Layers are named as the model names them (a
detectron2 checkpoint's ``res5.0.conv2``), whether they were captured as a module, as an op
call inside the user's module, or as a DCNv3/DCNv4 layer (converted to the standard layout). Offsets
are measured in cells of the layer's input
feature map -- the unit the op adds them in -- and converted to model-input pixels through the
layer's input frame stride.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from dcn_inspect.capture.attention_calls import AttentionRecord
from dcn_inspect.capture.records import DeformConvRecord
from dcn_inspect.capture.session import probe
from dcn_inspect.core.defaults import DEFAULT_MAX_PIXELS
from dcn_inspect.io.images import check_resize, load_image, to_model_input
from dcn_inspect.models import registry
from dcn_inspect.models.loaded_model import LoadedModel, model_device
from dcn_inspect.ops import modules as ours

#: Size (height, width) of the blank image probed when ``info`` gets no image.
BLANK_PROBE_SIZE: Tuple[int, int] = (224, 224)


@dataclass(frozen=True)
class ArchitectureRow:
    """One line of ``dcn-inspect models``."""

    name: str
    description: str
    bundled_weights: Optional[Path]

    @property
    def weights_label(self) -> str:
        return str(self.bundled_weights) if self.bundled_weights is not None else "-"


def list_architectures() -> List[ArchitectureRow]:
    """The registered architectures, sorted by name."""
    return [
        ArchitectureRow(arch.name, arch.description, arch.bundled_weights)
        for arch in (registry.get(name) for name in registry.names())
    ]


@dataclass(frozen=True)
class OffsetStats:
    """|offset| = sqrt(dy^2 + dx^2) over all cells, kernel points and offset groups of one layer."""

    mean_cells: float
    median_cells: float
    max_cells: float
    mean_pixels: (
        float  # mean |offset| in model-input pixels (cells scaled by the input frame stride)
    )
    mean_mask: Optional[float]  # DCNv2 only: mean modulation


@dataclass(frozen=True)
class DeformLayerInfo:
    """One deformable conv layer as the probe saw it."""

    name: str
    module_type: str
    kernel: Tuple[int, int]
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    dilation: Tuple[int, int]
    groups: int
    offset_groups: int
    offset_channels: int  # 2 * offset groups * kernel points (dy, dx)
    mask_channels: int  # offset groups * kernel points for DCNv2, else 0
    modulated: bool
    input_stride_px: Tuple[float, float]  # (x, y) pixels between adjacent cells of the input frame
    output_stride_px: Tuple[float, float]
    geometry_method: str  # "hooks" (derived through the forward) or "size" (inferred from sizes)
    parameters: int  # of the layer module, its offset branch included
    offsets: Optional[OffsetStats]
    captured_by: str = (
        "module"  # "module", the op entry point called, or "DCNv3"/"DCNv4 (converted)"
    )

    @property
    def version(self) -> str:
        return "v2" if self.modulated else "v1"


@dataclass(frozen=True)
class RoIPoolInfo:
    """A deformable RoI pooling module (found by type; it only runs when a model gets RoIs)."""

    name: str
    module_type: str
    output_size: Tuple[int, int]
    spatial_scale: float


@dataclass(frozen=True)
class AttentionLayerInfo:
    """A multi-scale deformable attention call seen in the probe forward pass."""

    name: str
    module_type: str
    kind: str  # encoder | decoder
    heads: int
    levels: int
    points_per_level: Tuple[int, ...]
    queries: int
    level_strides_px: Tuple[Tuple[float, float], ...]  # per level (x, y), model-input pixels
    frame_methods: Tuple[str, ...]
    captured_by: str
    reference_points: Optional[str]  # "2-d" / "4-d" / None


@dataclass
class ModelInfo:
    """Everything ``dcn-inspect info`` shows."""

    model: Dict[str, Any]  # LoadedModel.summary()
    total_parameters: int
    trainable_parameters: int
    deformable_parameters: int  # deformable conv weights/biases (offset branches excluded)
    offset_branch_parameters: int
    probe_input_hw: Tuple[int, int]
    image: Optional[Path]
    original_hw: Optional[Tuple[int, int]]
    layers: List[DeformLayerInfo] = field(default_factory=list)
    roi_pools: List[RoIPoolInfo] = field(default_factory=list)
    attention: List[AttentionLayerInfo] = field(default_factory=list)


def attention_layers(records: Dict[str, AttentionRecord]) -> List[AttentionLayerInfo]:
    """What ``info`` shows of each captured attention call."""
    return [
        AttentionLayerInfo(
            name=record.name,
            module_type=record.module_type,
            kind=record.kind,
            heads=record.heads,
            levels=record.levels,
            points_per_level=record.points_per_level,
            queries=record.query_count,
            level_strides_px=tuple((f.stride_x, f.stride_y) for f in record.level_frames),
            frame_methods=record.frame_methods,
            captured_by=record.captured_by,
            reference_points=record.summary()["reference_points"],
        )
        for record in records.values()
    ]


def offset_stats(record: DeformConvRecord) -> OffsetStats:
    """Magnitude statistics of one layer's captured offsets (all images of the batch)."""
    offset = record.offset.detach().to("cpu", torch.float64)
    batch, channels, height, width = offset.shape
    pairs = offset.view(batch, channels // 2, 2, height, width)
    magnitude = pairs.pow(2).sum(dim=2).sqrt().flatten()
    frame = record.geometry.input_frame
    # Offsets are (dy, dx) in input cells; the frame stride turns each component into pixels.
    pixels = (
        (pairs[:, :, 0] * frame.stride_y)
        .pow(2)
        .add((pairs[:, :, 1] * frame.stride_x).pow(2))
        .sqrt()
    )
    mean_mask = (
        float(record.mask.detach().to(torch.float64).mean()) if record.mask is not None else None
    )
    return OffsetStats(
        mean_cells=float(magnitude.mean()),
        median_cells=float(magnitude.median()),
        max_cells=float(magnitude.max()),
        mean_pixels=float(pixels.mean()),
        mean_mask=mean_mask,
    )


def _parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _module_by_name(model: nn.Module) -> Dict[str, nn.Module]:
    return {name or type(model).__name__: module for name, module in model.named_modules()}


#: Children that compute offsets or modulation: mmcv/ours, mmdetection 1.0, research code
#: calling the functional op, DCNv3 (``offset``, ``mask``, ``dw_conv``) and DCNv4.
OFFSET_BRANCHES = (
    "conv_offset",
    "conv_offset_mask",
    "offset_conv",
    "modulator_conv",
    "mask_conv",
    "offset",
    "mask",
    "dw_conv",
    "offset_mask",
    "offset_mask_dw",
)


def captured_by(record: DeformConvRecord) -> str:
    """How a record was captured, for people: "module", the op called, or the converted layout."""
    if record.converted_from:
        return f"{record.converted_from} (converted)"
    return record.op or "module"


def _deform_parameter_counts(model: nn.Module, deform_names: List[str]) -> Tuple[int, int]:
    """(deformable conv parameters without offset branches, offset branch parameters)."""
    modules = _module_by_name(model)
    deformable = branches = 0
    for name in dict.fromkeys(n.split("#")[0] for n in deform_names):  # repeated calls count once
        module = modules.get(name)
        if module is None:
            continue
        branch_modules = [
            m for child_name, m in module.named_children() if child_name in OFFSET_BRANCHES
        ]
        branch = sum(_parameter_count(m) for m in branch_modules)
        deformable += _parameter_count(module) - branch
        branches += branch
    return deformable, branches


def _roi_pools(model: nn.Module) -> List[RoIPoolInfo]:
    found = []
    for name, module in model.named_modules():
        if isinstance(module, ours.DeformRoIPool):
            found.append(
                RoIPoolInfo(name, type(module).__name__, module.output_size, module.spatial_scale)
            )
        elif isinstance(module, ours.DeformPSRoIPool):
            found.append(
                RoIPoolInfo(
                    name,
                    type(module).__name__,
                    (module.pooled_size, module.pooled_size),
                    module.spatial_scale,
                )
            )
    return found


def model_info(
    loaded: LoadedModel,
    image: Optional[Path] = None,
    resize: Optional[int] = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> ModelInfo:
    """Probe ``loaded`` once and describe its deformable layers (offset statistics with an
    image)."""
    check_resize(resize)
    model = loaded.model
    device = model_device(loaded)
    original_hw: Optional[Tuple[int, int]] = None
    if image is not None:
        prepared = to_model_input(
            load_image(Path(image), max_pixels, loaded.preprocess, resize),
            loaded.preprocess,
            resize,
            max_pixels,
        )
        tensor, original_hw = prepared.tensor, prepared.original_hw
    else:
        tensor = torch.zeros(1, 3, *BLANK_PROBE_SIZE)  # normalised zeros: the dataset's mean colour
    result = probe(model, tensor.to(device), model_name=loaded.name)
    modules = _module_by_name(model)
    layers = []
    for name, record in result.convs.items():
        geometry = record.geometry
        module = modules.get(name.split("#")[0])
        layers.append(
            DeformLayerInfo(
                name=name,
                module_type=record.module_type,
                kernel=geometry.kernel,
                stride=geometry.stride,
                padding=geometry.padding,
                dilation=geometry.dilation,
                groups=record.groups,
                offset_groups=record.offset_groups,
                offset_channels=int(record.offset.shape[1]),
                mask_channels=int(record.mask.shape[1]) if record.mask is not None else 0,
                modulated=record.modulated,
                input_stride_px=(geometry.input_frame.stride_x, geometry.input_frame.stride_y),
                output_stride_px=(geometry.output_frame.stride_x, geometry.output_frame.stride_y),
                geometry_method=geometry.method,
                parameters=_parameter_count(module) if module is not None else 0,
                offsets=offset_stats(record) if image is not None else None,
                captured_by=captured_by(record),
            )
        )
    deformable, branches = _deform_parameter_counts(model, list(result.convs))
    return ModelInfo(
        model=loaded.summary(),
        total_parameters=_parameter_count(model),
        trainable_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
        deformable_parameters=deformable,
        offset_branch_parameters=branches,
        probe_input_hw=(int(tensor.shape[-2]), int(tensor.shape[-1])),
        image=Path(image) if image is not None else None,
        original_hw=original_hw,
        layers=layers,
        roi_pools=_roi_pools(model),
        attention=attention_layers(result.capture.attention),
    )

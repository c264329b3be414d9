"""Gradient weights of the sampling points: how much a unit's response depends on where each
point of its sampling tree samples.

Gradient weight of a sampling point: ``|dr / dp|`` (Euclidean norm of the 2-vector, in
response units per original-image pixel), the total derivative of the response r with respect
to the position p of the sampling location: move p, let everything downstream of it (upper
layers' offsets included) follow, watch r (DCNv2: "the gradient of the network node with
respect to the sampling locations"). A point whose sample does not matter scores 0.

From offset gradients to points. The gradient forward gives, per unit, the gradient field of
each followed layer's offsets ``[U, G, K, 2, Ho, Wo]`` (dy then dx, in input cells:
:meth:`~dcn_inspect.capture.gradients.GradientForward.backward_units`). The tree's points
(:mod:`dcn_inspect.analysis.sample_points`): level l's point (parent q, kernel point k) sits at
kernel point k of a filter centred at a (fractional) position of layer l's output frame, whose
offsets the tracer read by bilinear interpolation of the four neighbouring cells. Its gradient
is read from the gradient field at the same position with the same interpolation
(:func:`tree_gradient_weights`): exactly the gradient of the real sampling location at level 1
(the unit is a cell) and with ``round_positions`` at every level, the interpolated gradient of
the four neighbouring cells' locations otherwise. With ``group="mean"`` the tree follows the
mean of the groups' locations; moving every group's point k by the same step moves the mean by
that step, so the groups' gradients are summed. Gradients in input cells become gradients per
original-image pixel by dividing by the layer's input-frame stride and the
original/model-input scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from dcn_inspect.analysis.sample_points import GroupChoice, SamplingTrees, check_group, read_field
from dcn_inspect.capture.gradients import DEFAULT_BATCH_SIZE, GradientForward
from dcn_inspect.capture.records import DeformConvRecord
from dcn_inspect.core.errors import InputError

__all__ = ["PointGradients", "sampling_point_gradients", "tree_gradient_weights"]


@dataclass
class PointGradients:
    """dr/dp of every tree point, per level [U, P_l], in response units per original-image
    pixel."""

    grad_x: List[torch.Tensor]
    grad_y: List[torch.Tensor]

    @property
    def weights(self) -> List[torch.Tensor]:
        """``|dr/dp|`` per level [U, P_l]."""
        return [torch.hypot(gx, gy) for gx, gy in zip(self.grad_x, self.grad_y)]


def _group_field(
    field_all: torch.Tensor, group: GroupChoice, record: DeformConvRecord
) -> torch.Tensor:
    """The gradient field [U, K, 2, Ho, Wo] of the tree's offset group: the sum over the groups
    for ``"mean"``, the one group of a single-group layer, else group ``group``."""
    groups = field_all.shape[1]
    if group == "mean":
        return field_all.sum(dim=1)
    g = 0 if groups == 1 else int(group)
    if not 0 <= g < groups:
        raise InputError(
            f"{group}: layer {record.name} has {groups} offset groups (0..{groups - 1})",
            param="group",
        )
    return field_all[:, g]


def tree_gradient_weights(
    trees: SamplingTrees,
    records: Sequence[DeformConvRecord],
    offset_grads: Dict[str, torch.Tensor],
    group: GroupChoice = 0,
    scale_to_original: Tuple[float, float] = (1.0, 1.0),
) -> PointGradients:
    """dr/dp of every point of ``trees`` (traced through ``records``, top first) from the units'
    offset gradient fields ``offset_grads[layer]`` [U, G, K, 2, Ho, Wo].

    Level l's points are read from layer l's field at the positions where the tracer read that
    layer's offsets (``trees.read_at``), by the same bilinear interpolation and border rule.
    """
    group = check_group(group)
    if len(trees.read_at) != trees.num_levels:
        raise ValueError("trees without read positions (traced by an older tracer)")
    sx, sy = float(scale_to_original[0]), float(scale_to_original[1])
    grad_x: List[torch.Tensor] = []
    grad_y: List[torch.Tensor] = []
    for level, record in enumerate(records[: trees.num_levels]):
        # [U, G, K, 2, Ho, Wo] -> the tree's group [U, K, 2, Ho, Wo]
        field = _group_field(offset_grads[record.name].to(torch.float64).cpu(), group, record)
        kernel_points = field.shape[1]
        rows, cols = trees.read_at[level]
        per_unit_x, per_unit_y = [], []
        for u in range(trees.num_units):
            # [2K, Ho, Wo]: d/d(dy), d/d(dx)
            table = torch.cat([field[u, :, 0], field[u, :, 1]], dim=0)
            values = read_field(table, rows[u], cols[u])  # [N, 2K]
            per_unit_y.append(values[:, :kernel_points].reshape(-1))
            per_unit_x.append(values[:, kernel_points:].reshape(-1))
        frame = record.geometry.input_frame
        empty = torch.zeros(0, trees.points_per_unit(level + 1), dtype=torch.float64)
        gx = torch.stack(per_unit_x) if per_unit_x else empty
        gy = torch.stack(per_unit_y) if per_unit_y else empty
        grad_x.append(gx / (frame.stride_x * sx))
        grad_y.append(gy / (frame.stride_y * sy))
    return PointGradients(grad_x, grad_y)


def sampling_point_gradients(
    model: nn.Module,
    images: torch.Tensor,
    levels: Sequence[str],
    trees: SamplingTrees,
    *,
    group: GroupChoice = 0,
    scale_to_original: Tuple[float, float] = (1.0, 1.0),
    channel: Optional[int] = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> Optional[PointGradients]:
    """dr/dp of every point of ``trees`` (traced through the layers ``levels``, top first, on
    ``images`` [1, 3, H, W]), r the response of each tree's unit; None when a layer's op cannot be
    re-run (see :meth:`~dcn_inspect.capture.gradients.GradientForward.offset_gradient`)."""
    forward = GradientForward(model, images, stop_after=levels[0])
    records = [forward.calls[name].record for name in levels]
    fields: Dict[str, List[torch.Tensor]] = {name: [] for name in levels}
    for batch in forward.backward_units(levels[0], trees.units, channel, levels, batch_size):
        if set(batch.offset_grads) != set(levels):
            return None
        for name in levels:
            fields[name].append(batch.offset_grads[name].cpu())
    if trees.num_units == 0:
        empty = [
            torch.zeros(0, trees.points_per_unit(level), dtype=torch.float64)
            for level in range(1, trees.num_levels + 1)
        ]
        return PointGradients(empty, [e.clone() for e in empty])
    return tree_gradient_weights(
        trees,
        records,
        {name: torch.cat(parts) for name, parts in fields.items()},
        group,
        scale_to_original,
    )

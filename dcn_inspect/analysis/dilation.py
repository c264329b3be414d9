"""Effective dilation of a deformable filter at every output unit (PAPER.md §3, Table 2).

The effective dilation of a ``k_h x k_w`` filter at one output unit is the mean Euclidean
distance between horizontally and vertically adjacent sampling locations of its grid:
``k_h*(k_w-1) + (k_h-1)*k_w`` pairs (12 for 3x3). An undeformed filter with dilation ``d``
scores exactly ``d``.

Kernel point ``(a, b)`` of offset group ``g`` samples at ``origin + (a*dilation_y,
b*dilation_x) + (dy, dx)`` in the layer's input cells (``origin``: the unit's top-left kernel
point), so the step between horizontal neighbours ``(a, b) -> (a, b + 1)`` is
``(dy' - dy, dilation_x + dx' - dx)`` and between vertical neighbours ``(a, b) -> (a + 1, b)``
``(dilation_y + dy' - dy, dx' - dx)``: the regular grid's positions cancel. Distances are
measured

- in the layer's input cells (``cell_size = (1, 1)``), or
- in original-image pixels: the input frame maps a cell step to ``stride_x`` / ``stride_y``
  model-input pixels and the model-input -> original scale multiplies those again, so a
  horizontal step of ``dx`` cells is ``dx * Sx`` pixels.

Shapes: offsets ``[B, 2*G*kh*kw, Ho, Wo]`` in the (dy, dx)-interleaved layout of PAPER.md §1
-> dilations ``[B, G, Ho, Wo]``, one per offset group.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

#: A cell step's length in the output unit: a float, or a [B] tensor (one per image).
CellSize = Union[float, torch.Tensor]


def effective_dilation(
    offset: torch.Tensor,
    kernel: Tuple[int, int],
    dilation: Tuple[int, int],
    cell_size: Tuple[CellSize, CellSize] = (1.0, 1.0),
) -> torch.Tensor:
    """Per-group effective dilation [B, G, Ho, Wo] from an offset field [B, 2*G*kh*kw, Ho, Wo].

    ``cell_size = (size_y, size_x)`` is the length of one input cell step in the output unit:
    (1, 1) for cells; for pixels the input frame's strides times the original/model-input
    scale, as floats or as [B] tensors (one scale per image of the batch). The regular grid's
    positions cancel in the differences, so only the kernel offsets ``a*dilation`` and the
    learned ``(dy, dx)`` enter.
    """
    if kernel[0] * kernel[1] < 2:
        raise ValueError(
            f"effective dilation needs at least two kernel points, got kernel {kernel}"
        )
    batch, channels, out_h, out_w = offset.shape
    kh, kw = kernel
    # (dy, dx) of kernel point (a, b) of group g: [B, G, kh, kw, 2, Ho, Wo] (PAPER.md §1 layout).
    view = offset.reshape(batch, channels // (2 * kh * kw), kh, kw, 2, out_h, out_w)
    size_y, size_x = (_per_image(size, offset) for size in cell_size)
    total: Optional[torch.Tensor] = None
    if kw > 1:
        # Horizontal neighbours (a, b) -> (a, b + 1): one dilation_x step plus the offset change.
        step = view[:, :, :, 1:] - view[:, :, :, :-1]
        step[:, :, :, :, 1] += dilation[1]
        total = _step_lengths(step, size_y, size_x).sum(dim=(2, 3))
    if kh > 1:  # vertical neighbours (a, b) -> (a + 1, b)
        step = view[:, :, 1:] - view[:, :, :-1]
        step[:, :, :, :, 0] += dilation[0]
        vertical = _step_lengths(step, size_y, size_x).sum(dim=(2, 3))
        total = vertical if total is None else total.add_(vertical)
    assert total is not None
    return total.div_(kh * (kw - 1) + (kh - 1) * kw)


def _step_lengths(step: torch.Tensor, size_y: CellSize, size_x: CellSize) -> torch.Tensor:
    """Euclidean length of steps [B, G, a, b, 2 (dy, dx), Ho, Wo] in cells scaled by the cell
    size -> [B, G, a, b, Ho, Wo]."""
    dy, dx = step[:, :, :, :, 0], step[:, :, :, :, 1]
    if not (isinstance(size_y, float) and isinstance(size_x, float) and size_y == size_x == 1.0):
        dy, dx = dy * size_y, dx * size_x
    return torch.hypot(dy, dx)


def _per_image(size: CellSize, offset: torch.Tensor) -> CellSize:
    """A cell size as a float, or as a [B] tensor shaped to scale steps [B, G, a, b, Ho, Wo]."""
    if isinstance(size, torch.Tensor):
        return size.to(offset.device, offset.dtype).view(-1, 1, 1, 1, 1, 1)
    return float(size)

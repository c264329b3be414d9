"""Receptive fields of single units (DCNv2, Zhu et al. 2019, §2.1): the effective receptive
field, gradient-weighted sampling points, the error-bounded saliency region and the theoretical
receptive field.

Definitions. A *unit* is one output cell (row i, column j) of a chosen layer (the top deformable
layer by default); its *response* r is the sum over channels of that layer's output at the unit,
``r = sum_c y[c, i, j]`` (``channel=None``), or one channel's value ``y[channel, i, j]``. ``y`` is
the layer's output as the layer returns it (for a deformable conv: the op's output, before any
norm or activation that follows; for an op-level call, the output of that op call; for a
DCNv3 / DCNv4 layer, its own channels-last ``[N, H, W, C]`` or token ``[N, H*W, C]`` output,
cell (i, j) being row i, column j of its map:
:meth:`~dcn_inspect.core.geometry.MapLayout.to_nchw`).

- **Effective receptive field (ERF)**: ``sum_colour |dr / dI(p)|`` for every pixel p of the
  ORIGINAL image, I in 8-bit intensity levels (0..255), through the linearised resize
  (:mod:`.erf`, :func:`~dcn_inspect.io.resize.image_gradient`).
- **Gradient weight of a sampling point**: ``|dr / dp|`` per original-image pixel, the total
  derivative of the response with respect to the position p of the sampling location
  (:mod:`.point_gradients`).
- **Saliency region**: the smallest axis-aligned box of the model input whose pixels alone
  (everything else set to the dataset mean) give a response within ``error`` (relative) of the
  full image's, found by progressive masking (:mod:`.saliency`).
- **Theoretical receptive field**: the box of input pixels the unit can depend on through the
  layers' regular grids (offsets taken as zero), derived through the real forward
  (:class:`~dcn_inspect.capture.extent.ExtentTracker`).

The gradients come from one gradient forward per image and one backward per batch of units
(:class:`~dcn_inspect.capture.gradients.GradientForward`, in the capture layer: it re-runs the
captured calls); :func:`~.fields.receptive_fields` computes everything above for the units of
one image, :mod:`.table` lays it out as the CSV and npz files.

Coordinates: continuous pixels, (0, 0) = top-left corner of the top-left pixel, pixel (r, c)
centred at (c + 0.5, r + 0.5), x right, y down; model-input pixels unless said otherwise.

This package re-exports its public API and, for the callers the README points here, the
gradient forward and the resize adjoint it uses.
"""

from __future__ import annotations

from dcn_inspect.analysis.receptive_field.erf import (
    ErfNumbers,
    effective_receptive_field,
    erf_memory_bytes,
    erf_numbers,
    unit_box,
)
from dcn_inspect.analysis.receptive_field.fields import ReceptiveFields, receptive_fields
from dcn_inspect.analysis.receptive_field.point_gradients import (
    PointGradients,
    sampling_point_gradients,
    tree_gradient_weights,
)
from dcn_inspect.analysis.receptive_field.saliency import (
    DEFAULT_SALIENCY_ERROR,
    Evaluator,
    SaliencyRegion,
    default_saliency_step,
    saliency_regions,
)
from dcn_inspect.analysis.receptive_field.table import (
    CSV_COLUMNS,
    RECEPTIVE_FIELD_CSV,
    STATS_UNITS_CSV,
    field_arrays,
    units_table,
)
from dcn_inspect.capture.extent import Extent, ExtentTracker, grid_reach
from dcn_inspect.capture.following import run_until, unusable_layers
from dcn_inspect.capture.gradients import (
    DEFAULT_BATCH_SIZE,
    EXTRA_MEMORY_SHARE,
    RERUN_TOLERANCE,
    GradientForward,
    LayerCall,
    UnitGradients,
    check_channel,
)
from dcn_inspect.io.resize import bilinear_resize_matrix, image_gradient

__all__ = [
    "CSV_COLUMNS",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_SALIENCY_ERROR",
    "EXTRA_MEMORY_SHARE",
    "RECEPTIVE_FIELD_CSV",
    "RERUN_TOLERANCE",
    "STATS_UNITS_CSV",
    "ErfNumbers",
    "Evaluator",
    "Extent",
    "ExtentTracker",
    "GradientForward",
    "LayerCall",
    "PointGradients",
    "ReceptiveFields",
    "SaliencyRegion",
    "UnitGradients",
    "bilinear_resize_matrix",
    "check_channel",
    "default_saliency_step",
    "effective_receptive_field",
    "erf_memory_bytes",
    "erf_numbers",
    "field_arrays",
    "grid_reach",
    "image_gradient",
    "receptive_fields",
    "run_until",
    "sampling_point_gradients",
    "saliency_regions",
    "tree_gradient_weights",
    "unit_box",
    "units_table",
    "unusable_layers",
]

"""What both modes of ``receptive-field`` choose and check: this command's own options
(:class:`FieldOptions`: the response's channel, the saliency search, the batch size), their
checks together with the shared groups' in one fixed order (:func:`check_options`), the layers
followed (:func:`followed_records`) and how ``summary.json`` defines the response and the
saliency search.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import List, Optional, Tuple

from dcn_inspect.analysis.receptive_field.saliency import DEFAULT_SALIENCY_ERROR
from dcn_inspect.analysis.sample_points import check_group
from dcn_inspect.analysis.unit_selection import check_unit_options
from dcn_inspect.capture.gradients import DEFAULT_BATCH_SIZE, GradientForward
from dcn_inspect.capture.records import DeformConvRecord
from dcn_inspect.capture.selection import select_layers
from dcn_inspect.commands.options import ImageInput, OutputOptions, UnitOptions
from dcn_inspect.core.defaults import DEFAULT_LEVELS
from dcn_inspect.core.errors import InputError

__all__ = [
    "RESPONSE_DEFINITION",
    "SALIENCY_SCHEDULE",
    "FieldOptions",
    "check_options",
    "followed_records",
]

#: How summary.json and the README define the response.
RESPONSE_DEFINITION = (
    "r = sum over channels of the layer's output at the unit (its op's output, before any norm "
    "or activation), or the value of channel `channel` when given; ERF = sum over colour "
    "channels of |dr/dI| per 8-bit intensity level of each original-image pixel (through the "
    "linearised bilinear resize and the normalisation); gradient weight of a sampling point = "
    "|dr/dp| per original-image pixel (total derivative)"
)

#: How summary.json describes the saliency search.
SALIENCY_SCHEDULE = (
    "masking value: the dataset mean (zero after normalisation); model-input pixels outside the "
    "box are masked (the padding of a padded model input is masked already; boxes stay on the "
    "resized image). Box edges sit on multiples of saliency_step model-input pixels (default: "
    "the layer's output stride) or the image border, and boxes always contain the unit's pixel. "
    "At most 12 masked forwards per unit (max_forwards_per_unit): 0) the image with every pixel "
    "masked (1 forward): when it passes, the unit has no region (saliency_status "
    "masked_image_within_bound); 1) a nested family of candidate boxes from the unit's own "
    "|dr/dX| (summed over colour, its x- and y-marginals on the resized image): Box(q), q in "
    "[0, 1], has each side where at most (1 - q) of the gradient mass on that side of the unit "
    "lies beyond it, snapped outward to the step grid, from the unit's cell (q = 0) to the "
    "gradient's support (q = 1), at most 127 boxes (subsampled evenly), then the whole image "
    "(squares centred on the unit, half-sizes k*step, when the gradient is zero); 2) binary "
    "search for the smallest passing box of the family (at most 7 forwards); 3) each side "
    "(left, top, right, bottom) tried once moved inward by one step, never past the unit, kept "
    "when the box still passes (at most 4 forwards). A box passes when |r_box - r| <= "
    "saliency_error * |r|."
)


@dataclass(frozen=True)
class FieldOptions:
    """This command's own choices: what the response is and how the receptive fields are
    searched."""

    channel: Optional[int] = None  # the response is this channel's value; None: the sum
    # Relative error bound of the saliency region; None: no saliency search (ERF and gradient
    # weights only, a user's most common request).
    saliency_error: Optional[float] = DEFAULT_SALIENCY_ERROR
    saliency_step: Optional[int] = None  # search resolution (model-input pixels); None: stride
    batch_size: int = DEFAULT_BATCH_SIZE  # units per backward (and masked images per forward)

    def checked(self) -> "FieldOptions":
        """These options, checked (``saliency_error`` as a float)."""
        if self.channel is not None and self.channel < 0:
            raise InputError(f"{self.channel}: channels are numbered from 0", param="channel")
        if self.saliency_error is not None and not (0.0 <= self.saliency_error < 1.0):
            raise InputError(
                f"{self.saliency_error}: the relative error bound must be in [0, 1)",
                param="saliency_error",
            )
        if self.saliency_step is not None and self.saliency_step < 1:
            raise InputError(
                f"{self.saliency_step}: the search resolution must be at least 1 pixel",
                param="saliency_step",
            )
        if self.batch_size < 1:
            raise InputError(f"{self.batch_size}: must be at least 1", param="batch_size")
        if self.saliency_error is None:
            return self
        return replace(self, saliency_error=float(self.saliency_error))


def check_options(
    units: UnitOptions, own: FieldOptions, inputs: ImageInput, output: OutputOptions
) -> Tuple[UnitOptions, FieldOptions, OutputOptions]:
    """Every option checked before any work, in this order: the figure format, ``resize``,
    ``at`` and ``grid``, ``levels``, ``layers`` with ``levels``, this command's own options,
    ``group``. Returns the groups with ``at`` as (x, y) pairs, ``group`` and ``fmt``
    normalised."""
    output = output.checked()
    inputs.checked()
    points = check_unit_options(units.at, units.grid)
    if units.levels is not None and units.levels < 1:
        raise InputError(f"{units.levels}: must be at least 1", param="levels")
    if units.layers and units.levels is not None:
        raise InputError("and `levels`: give one or the other", param="layers")
    own = own.checked()
    units = replace(units, at=points, group=check_group(units.group))
    return units, own, output


def followed_records(
    forward: GradientForward, units: UnitOptions, model_name: str
) -> List[DeformConvRecord]:
    """The layers to follow (``units.layers``, else the last ``units.levels``), top (last
    called) first."""
    chosen = select_layers(
        forward.deformable_records(),
        units.layers,
        units.levels,
        default_count=DEFAULT_LEVELS,
        model_name=model_name,
    )
    return list(reversed(chosen))

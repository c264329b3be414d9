"""``dcn-inspect receptive-field``: effective receptive fields, gradient-weighted sampling points
and error-bounded saliency regions of chosen units (DCNv2 §2.1), for images or, with ``stats``,
a dataset.

- :func:`receptive_field` (:mod:`.per_image`): for each image, one gradient forward, the
  followed layers, the units (as sample-points chooses them) and their receptive fields (and,
  with ``compare_model``, the same image positions under a second model), written as
  ``<stem>_receptive_field.csv`` (one row per unit and model), ``<stem>_erf.npz`` (the ERF maps
  and the gradient-weighted trees), ``<stem>_receptive_field.<fmt>`` (one panel per unit and
  model) and ``summary.json`` (models, layers, units, the response's definition, parameters)
  (:mod:`.image_outputs`);
- :func:`receptive_field_stats` (:mod:`.stats`): the same analysis on the units of a dataset's
  boxes (one at each box centre, one background unit) of every followed layer, tabulating the
  ERF 90 % radius and the saliency area per object-size category, in the layout and with the
  thresholds of ``dilation-stats``;
- :func:`query_receptive_field` (:mod:`.query_mode`, with ``queries``): the ERF and the
  gradient-weighted attention sampling points of object queries or encoder tokens of a
  multi-scale deformable attention model.

Both modes take the shared option groups (:mod:`dcn_inspect.commands.options`) and this
command's own choices (:class:`~.choices.FieldOptions`), checked once (:mod:`.choices`).
"""

from __future__ import annotations

from dcn_inspect.analysis.receptive_field.table import CSV_COLUMNS
from dcn_inspect.commands.receptive_field.choices import RESPONSE_DEFINITION, FieldOptions
from dcn_inspect.commands.receptive_field.image_outputs import ImageFields
from dcn_inspect.commands.receptive_field.per_image import ReceptiveFieldResult, receptive_field
from dcn_inspect.commands.receptive_field.query_mode import QueryFieldResult, query_receptive_field
from dcn_inspect.commands.receptive_field.stats import (
    ReceptiveFieldStatsResult,
    receptive_field_stats,
)

__all__ = [
    "CSV_COLUMNS",
    "RESPONSE_DEFINITION",
    "FieldOptions",
    "ImageFields",
    "QueryFieldResult",
    "ReceptiveFieldResult",
    "ReceptiveFieldStatsResult",
    "query_receptive_field",
    "receptive_field",
    "receptive_field_stats",
]

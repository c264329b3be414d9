"""The commands as Python functions: each loads, reads, probes, calls its analysis and writes.

``dcn_inspect.commands.sample_points.sample_points``, ``...dilation_stats.dilation_stats``,
``...bins.bins`` and ``...info.model_info`` take the same options as the command line (as
Python values) and return what they computed along with the paths they wrote.
"""

from __future__ import annotations

from typing import Dict, Tuple

from dcn_inspect.core.columns import Column


def csv_files() -> Dict[str, Tuple[Column, ...]]:
    """Every CSV the commands write (file name, ``<stem>`` = the image's stem) -> its columns,
    as defined beside the analysis that fills them (the README's column tables come from here)."""
    from dcn_inspect.analysis.attention import ATTENTION_CSV
    from dcn_inspect.analysis.attention_stats import DIFFERENCES_CSV as ATTENTION_DIFFERENCES_CSV
    from dcn_inspect.analysis.attention_stats import TABLE_CSV as ATTENTION_TABLE_CSV
    from dcn_inspect.analysis.bins import BIN_POINTS_CSV, BINS_CSV
    from dcn_inspect.analysis.bins_foreground import ROIS_CSV
    from dcn_inspect.analysis.bins_foreground import TABLE_CSV as FOREGROUND_TABLE_CSV
    from dcn_inspect.analysis.dilation_tables import (
        DIFFERENCES_CSV,
        TABLE_CSV,
        UNITS_CSV,
        category_table_columns,
    )
    from dcn_inspect.analysis.receptive_field import RECEPTIVE_FIELD_CSV, STATS_UNITS_CSV
    from dcn_inspect.analysis.receptive_field.queries import QUERY_FIELD_CSV
    from dcn_inspect.analysis.sample_points import POINTS_CSV
    from dcn_inspect.commands.attention import TREE_CSV

    return {
        "<stem>_points.csv": POINTS_CSV,
        "<stem>_bins.csv": BINS_CSV,
        "<stem>_bin_points.csv": BIN_POINTS_CSV,
        "foreground_rois.csv": ROIS_CSV,
        "foreground_table.csv": FOREGROUND_TABLE_CSV,
        "dilation_table.csv": TABLE_CSV,
        "dilation_differences.csv": DIFFERENCES_CSV,
        "dilation_units.csv": UNITS_CSV,
        "<stem>_receptive_field.csv": RECEPTIVE_FIELD_CSV,
        "erf_radius_table.csv": category_table_columns(
            "ERF radius holding 90 % of sum_colour |dr/dI| around its centroid",
            "original-image pixels",
        ),
        "saliency_area_table.csv": category_table_columns(
            "error-bounded saliency region area (error as `saliency_error`)",
            "original-image pixels²",
        ),
        "receptive_field_units.csv": STATS_UNITS_CSV,
        "<stem>_attention.csv": ATTENTION_CSV,
        "<stem>_attention_tree.csv": TREE_CSV,
        "attention_table.csv": ATTENTION_TABLE_CSV,
        "attention_differences.csv": ATTENTION_DIFFERENCES_CSV,
        "<stem>_query_receptive_field.csv": QUERY_FIELD_CSV,
    }

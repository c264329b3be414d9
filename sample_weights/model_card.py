"""``MODEL_CARD.md`` of the sample weights: ``MODEL_CARD.template.md`` filled with the numbers of
their ``*.metrics.json`` (written by ``recipe.py`` and ``head_finetune.py`` beside this file).

Every table is drawn by :func:`dcn_inspect.report.tables.markdown_table` (plain ``| --- |``
rule); the Fig. 7 foreground cells are those ``dcn-inspect bins`` prints
(:func:`dcn_inspect.report.tables.foreground_measure_cells`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from attn_recipe import CARD_HEADING as ATTN_CARD_HEADING
from attn_recipe import with_card_section
from recipe import DIFFERENCES, weights_file_name

from dcn_inspect.analysis.size_categories import CATEGORIES
from dcn_inspect.io.outputs import write_text
from dcn_inspect.report.tables import foreground_measure_cells, markdown_table

HERE = Path(__file__).resolve().parent
CARD_TEMPLATE = HERE / "MODEL_CARD.template.md"

#: The card's Fig. 7 table (``eval.foreground``): its columns.
FOREGROUND_HEADER = (
    "class",
    "RoIs",
    "regular bins on mask",
    "deformed bins on mask",
    "gain [95 % CI]",
    "RoIs improved",
)
#: The head fine-tune's table: its columns (its rows also end with the RoIs improved).
FINETUNE_HEADER = (
    "head",
    "RoI acc.",
    "\\|normalised offset\\| p50 / p90 / max",
    "regular bins on mask",
    "deformed bins on mask",
    "gain [95 % CI]",
)


def render_card(out: Path, archs: Sequence[str]) -> Path:
    """Fill MODEL_CARD.template.md with the metrics files' numbers -> MODEL_CARD.md.

    ``archs``: the deformable model, then its dilated baseline; their metrics files are read
    from ``out``."""
    reports = [
        json.loads((out / weights_file_name(arch)).with_suffix(".metrics.json").read_text())
        for arch in archs
    ]
    deformable, dilated = reports
    fields = {
        "metrics_table": metrics_markdown(reports),
        "dilation_table": dilation_markdown(deformable),
        "dilation_differences": dilation_differences_markdown(deformable),
        "sha_deformable": deformable["sha256"],
        "sha_dilated": dilated["sha256"],
        "train_config": json.dumps(deformable["train_config"], sort_keys=True),
        "eval_seed": deformable["eval"]["seed"],
        "eval_images": deformable["eval"]["images"],
        "backend": deformable["ops_backend"],
        "torch": deformable["torch"],
        "threads": deformable["threads"],
        "wall_deformable": deformable["wall_seconds"],
        "wall_dilated": dilated["wall_seconds"],
        "train_deformable": deformable["train_seconds"],
        "train_dilated": dilated["train_seconds"],
        "foreground_table": foreground_markdown(deformable),
        "finetune": finetune_markdown(deformable),
    }
    card = CARD_TEMPLATE.read_text(encoding="utf-8").format(**fields)
    # The ``dcn-attn-sample`` section (``train_attn.py`` writes it) is kept as it is.
    previous_path = out / "MODEL_CARD.md"
    previous = previous_path.read_text(encoding="utf-8") if previous_path.exists() else ""
    index = previous.find("\n" + ATTN_CARD_HEADING)
    if index >= 0:
        card = with_card_section(card, previous[index + 1 :])
    write_text(out / "MODEL_CARD.md", card)
    return out / "MODEL_CARD.md"


def _dilation_cell(row: Optional[Dict[str, Any]]) -> str:
    """``mean ± std (units)``; ``-`` for a category without units."""
    if not row or row.get("mean") is None or not row.get("units"):
        return "-"
    return f"{row['mean']:.2f} ± {row['std']:.2f} ({row['units']})"


def dilation_markdown(report: Dict[str, Any]) -> str:
    """Markdown table: effective dilation (input cells) per deformable layer and size category."""
    table = report["eval"].get("effective_dilation") or {}
    rows = [
        [layer, *(_dilation_cell(table[layer].get(c)) for c in CATEGORIES)]
        for layer in sorted(table, reverse=True)  # top layer first, as the paper's table
    ]
    return markdown_table(["layer", *CATEGORIES], rows)


def dilation_differences_markdown(report: Dict[str, Any]) -> str:
    """Markdown table: bootstrap 95 % intervals of differences of category means, per layer."""
    table = report["eval"].get("effective_dilation_differences_ci95") or {}
    names = [f"{a}-{b}" for a, b in DIFFERENCES]
    rows = []
    for layer in sorted(table, reverse=True):
        cells = [layer]
        for name in names:
            low, high = table[layer].get(name, [None, None])
            cells.append("-" if low is None else f"[{low:+.2f}, {high:+.2f}]")
        rows.append(cells)
    return markdown_table(["layer", *(name.replace("-", " − ") for name in names)], rows)


def metrics_markdown(reports: Sequence[Dict[str, Any]]) -> str:
    """Markdown table of the task metrics of several trained models, side by side."""
    header = [
        "model",
        "weights",
        "train wall time (s)",
        "seg mIoU",
        "pixel acc.",
        "shape pixel acc. small / medium / large",
        "RoI acc.",
    ]
    rows = []
    for report in reports:
        ev = report["eval"]
        shape = ev["shape_pixel_accuracy"]
        rows.append(
            [
                report["arch"],
                f"`{report['weights']}`",
                str(report["train_seconds"]),
                f"{ev['seg_miou']:.3f}",
                f"{ev['pixel_accuracy']:.3f}",
                f"{shape['small']:.3f} / {shape['medium']:.3f} / {shape['large']:.3f}",
                f"{ev['roi_accuracy']:.3f}",
            ]
        )
    return markdown_table(header, rows)


def foreground_markdown(report: Dict[str, Any]) -> str:
    """Markdown table: Fig. 7 measured per class and overall (``eval.foreground``)."""
    table = report["eval"].get("foreground") or {}
    # The metrics files count RoIs, not images (every class spans many of the held-out images).
    rows = [[name, str(row["rois"]), *foreground_measure_cells(row)] for name, row in table.items()]
    return markdown_table(FOREGROUND_HEADER, rows)


def finetune_markdown(report: Dict[str, Any]) -> str:
    """What the head fine-tune changed (empty for weights that were not fine-tuned)."""
    finetune = report.get("head_finetune")
    if not finetune:
        return "The R-FCN head was trained with the rest of the network (no separate fine-tune)."
    before, after = finetune["before"], report["eval"]
    config = json.dumps(finetune["config"], sort_keys=True)
    summary = (
        f"Fine-tune of `rfcn_offset` only: `{config}`, from the base weights "
        f"`{finetune['base_sha256']}`; {finetune['train_seconds']} s of training "
        f"({finetune['wall_seconds']} s with the evaluations), {finetune['threads']} CPU thread."
    )
    rows = [
        _finetune_row("base (unbounded)", before),
        _finetune_row("shipped (fine-tuned, bounded)", after),
    ]
    return summary + "\n\n" + markdown_table(FINETUNE_HEADER, rows)


def _finetune_row(head: str, evaluation: Dict[str, Any]) -> list:
    """RoI accuracy, offset magnitudes and the overall Fig. 7 cells of one head."""
    magnitude = evaluation["roi_offset_magnitude"]
    return [
        head,
        f"{evaluation['roi_accuracy']:.3f}",
        f"{magnitude['p50']:.2f} / {magnitude['p90']:.2f} / {magnitude['max']:.2f}",
        *foreground_measure_cells(evaluation["foreground"]["all"]),
    ]

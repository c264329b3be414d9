"""``dcn-inspect dilation-stats``: the paper's Table 2 on any COCO/VOC dataset
(parses, then calls :func:`dcn_inspect.dilation_stats.dilation_stats`)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from dcn_inspect.cli.app import app
from dcn_inspect.images import DEFAULT_MAX_PIXELS

EPILOG = (
    "Example: dcn-inspect dilation-stats  (the bundled demo dataset, sample model)\n\n"
    "Example: dcn-inspect dilation-stats VOCdevkit/VOC2007 --split test --thresholds coco --units pixels --batch-size 8 --workers 4 --out out/\n\n"
    "Distributed: torchrun --nproc-per-node 4 $(which dcn-inspect) dilation-stats instances_val2017.json --images val2017/ --device cuda"
)


@app.command("dilation-stats", epilog=EPILOG)
def dilation_stats(
    dataset: Optional[Path] = typer.Argument(
        None, help="COCO annotation json, Pascal VOC directory, or nothing for the bundled demo dataset.", show_default=False
    ),
    images: Optional[Path] = typer.Option(None, "--images", help="Image folder (default: next to the COCO json / VOC JPEGImages/)."),
    split: Optional[str] = typer.Option(None, "--split", help="VOC ImageSets/Main/<split>.txt (default: every annotation)."),
    model: Optional[str] = typer.Option(None, "--model", help="Registered architecture, checkpoint, or file.py:function (default: dcn-sample)."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Weights for a registered architecture."),
    layers: Optional[List[str]] = typer.Option(None, "--layers", help="Deformable layer(s) to measure (repeatable or comma-separated; default: all)."),
    thresholds: str = typer.Option("paper", "--thresholds", help="Box-area split: paper (96²,224²), coco (32²,96²), tertiles, or A,B in pixels²."),
    units: str = typer.Option("cells", "--units", help="cells (the layer's input cells) or pixels (original-image pixels)."),
    per_group: bool = typer.Option(False, "--per-group", help="One row per offset group instead of the groups' mean."),
    per_unit: bool = typer.Option(False, "--per-unit", help="Also write dilation_units.csv (one row per unit and layer)."),
    max_images: Optional[int] = typer.Option(None, "--max-images", help="Use only the first N images."),
    batch_size: int = typer.Option(1, "--batch-size", help="Images per forward (only images of equal input size are batched)."),
    workers: int = typer.Option(2, "--workers", help="DataLoader worker processes decoding images (0: in the main process)."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N (under torchrun: each rank its local GPU)."),
    resize: Optional[int] = typer.Option(None, "--resize", help="Shorter side of the model input in pixels (0: own size; default: the model's)."),
    strict: bool = typer.Option(False, "--strict", help="Stop at the first image that cannot be used instead of skipping it."),
    out: Path = typer.Option(Path("dcn-inspect-out"), "--out", help="Output directory."),
    max_pixels: int = typer.Option(DEFAULT_MAX_PIXELS, "--max-pixels", help="Skip larger images (0: no limit)."),
) -> None:
    """Effective dilation per deformable layer and object size (the paper's Table 2): CSV, Markdown, histogram, summary.json."""
    from dcn_inspect.dilation_stats import dilation_stats as run, rich_table

    layer_names = [name.strip() for item in (layers or []) for name in item.split(",") if name.strip()]
    result = run(
        dataset=dataset,
        images=images,
        split=split,
        model=model,
        weights=weights,
        layers=layer_names or None,
        thresholds=thresholds,
        units=units,
        per_group=per_group,
        per_unit=per_unit,
        max_images=max_images,
        batch_size=batch_size,
        workers=workers,
        device=device,
        resize=resize,
        strict=strict,
        out=out,
        max_pixels=max_pixels,
    )
    if result.rank != 0:
        return
    console = Console()
    console.print(rich_table(result.table, result.units))
    low, high = result.thresholds
    console.print(f"thresholds ({result.thresholds_name}): small < {low:g} px² <= medium < {high:g} px² <= large")
    skipped = sum(result.skipped.values())
    line = f"images used: {result.images_used}"
    if skipped:
        line += f", skipped: {skipped} (" + ", ".join(f"{reason}: {n}" for reason, n in sorted(result.skipped.items())) + ")"
    console.print(line)
    for name, path in result.files.items():
        console.print(f"{name}: {path}")

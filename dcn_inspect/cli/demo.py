"""``dcn-inspect demo-data`` and ``dcn-inspect train-sample``: the demo data and the sample weights."""

from __future__ import annotations

from pathlib import Path

import typer

from dcn_inspect.cli.app import app
from dcn_inspect.datasets.synthetic import SceneConfig
from dcn_inspect.errors import InputError


@app.command(
    "demo-data",
    epilog="Example: dcn-inspect demo-data shapes/ --n 50 --seed 7 --format voc",
)
def demo_data(
    out: Path = typer.Argument(..., help="Output directory (created; existing files with the same names are replaced)."),
    n: int = typer.Option(20, "--n", help="Number of scenes."),
    seed: int = typer.Option(0, "--seed", help="Random seed; the same seed gives the same images and annotations."),
    fmt: str = typer.Option("coco", "--format", help="coco (annotations.json + images/) or voc (Annotations/, JPEGImages/, ImageSets/Main/all.txt)."),
    size: int = typer.Option(256, "--size", help="Image width and height in pixels (at least 64)."),
    image_format: str = typer.Option("png", "--image-format", help="png (exact pixels) or jpg (quality 90, ~5x smaller)."),
) -> None:
    """Generate synthetic shape scenes (disc, square, triangle, cross, star at small/medium/large scales on cluttered textured backgrounds) with ground-truth boxes and polygons."""
    from rich.progress import Progress

    from dcn_inspect.datasets.synthetic import write_dataset
    from dcn_inspect.outputs import prepare_out_dir

    if n < 1:
        raise InputError(f"--n {n}: need at least one scene")
    if fmt not in ("coco", "voc"):
        raise InputError(f"--format {fmt}: expected coco or voc")
    if image_format not in ("png", "jpg"):
        raise InputError(f"--image-format {image_format}: expected png or jpg")
    if size < 64:
        raise InputError(f"--size {size}: images must be at least 64 pixels wide")
    prepare_out_dir(out)
    config = SceneConfig.for_size(size)
    with Progress() as bar:
        task = bar.add_task("generating scenes", total=n)
        result = write_dataset(
            out, n, seed, fmt, config, progress=lambda done: bar.update(task, completed=done), image_format=image_format
        )
    typer.echo(f"wrote {n} scenes ({fmt}) to {result}")


@app.command(
    "train-sample",
    epilog="Example: dcn-inspect train-sample sample_weights/ --seed 0 (then dcn-inspect train-sample sample_weights/ --arch dcn-sample-dilated)",
)
def train_sample(
    out: Path = typer.Argument(..., help="Output directory for the checkpoint (<arch>.pt) and its metrics json."),
    arch: str = typer.Option("dcn-sample", "--arch", help="dcn-sample (deformable) or dcn-sample-dilated (baseline)."),
    seed: int = typer.Option(0, "--seed", help="Training seed (scenes are generated from it on the fly)."),
    steps: int = typer.Option(0, "--steps", help="Training steps (0: the recipe's default)."),
    eval_seed: int = typer.Option(1000, "--eval-seed", help="Seed of the held-out evaluation scenes (must differ from --seed)."),
    eval_images: int = typer.Option(200, "--eval-images", help="Number of held-out evaluation scenes."),
    threads: int = typer.Option(0, "--threads", help="CPU threads for torch (0: torch's default)."),
) -> None:
    """Train the sample network on synthetic scenes and evaluate it (mIoU, RoI accuracy, effective dilation per object size)."""
    from dcn_inspect.train_sample import TrainConfig, train_and_save, weights_file_name

    if arch not in ("dcn-sample", "dcn-sample-dilated"):
        raise InputError(f"--arch {arch}: expected dcn-sample or dcn-sample-dilated")
    if eval_seed == seed:
        raise InputError(f"--eval-seed {eval_seed}: must differ from --seed so the evaluation scenes are unseen")
    if steps < 0 or eval_images < 1:
        raise InputError("--steps must be >= 0 and --eval-images >= 1")
    config = TrainConfig(arch=arch, seed=seed, threads=threads)
    if steps:
        config.steps = steps
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = train_and_save(config, out / weights_file_name(arch), eval_seed=eval_seed, eval_images=eval_images)
    metrics = result.metrics["eval"]
    typer.echo(
        f"wrote {result.weights} (train {result.metrics['train_seconds']} s): "
        f"mIoU {metrics['seg_miou']:.3f}, RoI accuracy {metrics['roi_accuracy']:.3f}"
    )

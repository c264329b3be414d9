"""The recipe of the bundled sample weights: training and evaluation of the demo network
(``dcn-sample``) and its dilated baseline (``dcn-sample-dilated``). Not part of the runtime
package: ``python sample_weights/train.py`` runs it.

The task (PAPER.md §3 at toy size): per-pixel shape-class segmentation of synthetic scenes
(:mod:`dcn_inspect.io.datasets.synthetic`) plus R-FCN classification of jittered ground-truth
and background RoIs. Scenes are generated on the fly from the seed, so training needs no
files and is reproducible: scene k of step s depends only on (seed, s, k).

Evaluation uses a fresh set generated from a different seed: segmentation mIoU (over the
background and the shape classes), per-size-category pixel accuracy of the shapes, RoI
accuracy, and - for deformable models - the effective dilation of every deformable layer
per object-size category, measured by the same code as ``dcn-inspect dilation-stats``
(:class:`dcn_inspect.analysis.dilation_stats.DilationAccumulator`: units grouped by the smallest
ground-truth box containing the unit's centre, background if none; bootstrap intervals over
images from :func:`dcn_inspect.analysis.category_stats.bootstrap_means`).

The R-FCN head's fine-tune is ``head_finetune.py``, the model card's tables ``model_card.py``
(both beside this file).
"""

from __future__ import annotations

import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dcn_inspect.analysis.category_stats import bootstrap_means
from dcn_inspect.analysis.dilation_stats import DilationAccumulator
from dcn_inspect.analysis.size_categories import CATEGORIES, NAMED_THRESHOLDS, area_category
from dcn_inspect.io.annotations import ImageAnnotation
from dcn_inspect.io.datasets.synthetic import CLASSES, Scene, SceneConfig, generate_scene
from dcn_inspect.models import registry
from dcn_inspect.models.registry import Preprocess

#: Stream ids mixed into the seed so that scenes, RoIs and evaluation never share randomness.
_SCENE_STREAM, _ROI_STREAM = 1, 2


@dataclass
class TrainConfig:
    """Everything that determines the trained weights."""

    arch: str = "dcn-sample"
    seed: int = 0
    steps: int = 1500
    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    offset_lr_mult: float = 1.0  # learning-rate multiplier of the offset branches
    fg_rois_per_image: int = 8
    bg_rois_per_image: int = 4
    roi_loss_weight: float = 1.0
    threads: int = 0  # torch threads; 0 = torch's default
    image_size: int = 256
    device: str = "cpu"

    def scene_config(self) -> SceneConfig:
        return SceneConfig.for_size(self.image_size)


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------


def normalise(images: np.ndarray, preprocess: Preprocess = Preprocess()) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> normalised float [B, 3, H, W] (as
    :func:`dcn_inspect.io.images.to_model_input`)."""
    array = images.astype(np.float32) / 255.0
    array = (array - np.asarray(preprocess.mean, np.float32)) / np.asarray(
        preprocess.std, np.float32
    )
    return torch.from_numpy(array.transpose(0, 3, 1, 2).copy())


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one box [4] with boxes [N, 4] (x1, y1, x2, y2)."""
    if len(boxes) == 0:
        return np.zeros(0)
    ix = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    iy = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = ix * iy
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-9)


def sample_rois(
    rng: np.random.Generator, scene: Scene, n_fg: int, n_bg: int
) -> Tuple[np.ndarray, np.ndarray]:
    """RoIs [R, 4] (input pixels) and labels [R]: jittered GT boxes (IoU >= 0.5, the GT class)
    and background boxes (IoU < 0.3 with every GT box, label 0)."""
    height, width = scene.labels.shape
    gt = np.array([obj.box for obj in scene.objects], dtype=np.float64).reshape(-1, 4)
    boxes: List[np.ndarray] = []
    labels: List[int] = []
    for _ in range(n_fg if len(gt) else 0):
        index = int(rng.integers(len(gt)))
        x1, y1, x2, y2 = gt[index]
        chosen = gt[index]
        for _try in range(10):
            w, h = x2 - x1, y2 - y1
            cx = (x1 + x2) / 2 + rng.normal(0, 0.1) * w
            cy = (y1 + y2) / 2 + rng.normal(0, 0.1) * h
            w, h = w * math.exp(rng.normal(0, 0.15)), h * math.exp(rng.normal(0, 0.15))
            box = np.array(
                [
                    max(cx - w / 2, 0),
                    max(cy - h / 2, 0),
                    min(cx + w / 2, width),
                    min(cy + h / 2, height),
                ]
            )
            if (
                box[2] - box[0] >= 4
                and box[3] - box[1] >= 4
                and box_iou(box, gt[index : index + 1])[0] >= 0.5
            ):
                chosen = box
                break
        boxes.append(chosen)
        labels.append(scene.objects[index].label)
    for _ in range(n_bg):
        for _try in range(20):
            side = math.exp(rng.uniform(math.log(16), math.log(0.9 * min(height, width))))
            aspect = math.exp(rng.uniform(-0.4, 0.4))
            w, h = min(side * aspect, width), min(side / aspect, height)
            x1, y1 = rng.uniform(0, width - w), rng.uniform(0, height - h)
            box = np.array([x1, y1, x1 + w, y1 + h])
            if len(gt) == 0 or box_iou(box, gt).max() < 0.3:
                boxes.append(box)
                labels.append(0)
                break
    return np.array(boxes, dtype=np.float32).reshape(-1, 4), np.array(labels, dtype=np.int64)


@dataclass
class Batch:
    images: torch.Tensor  # [B, 3, H, W] normalised
    seg_labels: torch.Tensor  # [B, H, W]
    rois: torch.Tensor  # [R, 5] (batch index, x1, y1, x2, y2)
    roi_labels: torch.Tensor  # [R]
    scenes: List[Scene]

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(
            self.images.to(device),
            self.seg_labels.to(device),
            self.rois.to(device),
            self.roi_labels.to(device),
            self.scenes,
        )


def make_batch(
    scene_list: Sequence[Scene], rng: np.random.Generator, n_fg: int, n_bg: int
) -> Batch:
    rois, roi_labels = [], []
    for index, scene in enumerate(scene_list):
        boxes, labels = sample_rois(rng, scene, n_fg, n_bg)
        rois.append(np.concatenate([np.full((len(boxes), 1), index, np.float32), boxes], axis=1))
        roi_labels.append(labels)
    return Batch(
        images=normalise(np.stack([s.image for s in scene_list])),
        seg_labels=torch.from_numpy(np.stack([s.labels for s in scene_list])),
        rois=torch.from_numpy(np.concatenate(rois)),
        roi_labels=torch.from_numpy(np.concatenate(roi_labels)),
        scenes=list(scene_list),
    )


def training_batch(config: TrainConfig, step: int) -> Batch:
    """The batch of training step ``step`` (a pure function of the config's seed and the step)."""
    scene_config = config.scene_config()
    scene_list = [
        generate_scene(np.random.default_rng([config.seed, _SCENE_STREAM, step, k]), scene_config)
        for k in range(config.batch_size)
    ]
    rng = np.random.default_rng([config.seed, _ROI_STREAM, step])
    return make_batch(scene_list, rng, config.fg_rois_per_image, config.bg_rois_per_image)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def is_offset_parameter(name: str) -> bool:
    """Parameters of the offset branches (deformable convs' ``conv_offset``, R-FCN
    ``rfcn_offset``)."""
    return "conv_offset" in name or "rfcn_offset" in name


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    offset, other = [], []
    for name, parameter in model.named_parameters():
        (offset if is_offset_parameter(name) else other).append(parameter)
    groups = [{"params": other, "lr_mult": 1.0}]
    if offset:
        groups.append({"params": offset, "lr_mult": config.offset_lr_mult})
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(config.steps - config.warmup_steps, 1)
    return config.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def losses(model: nn.Module, batch: Batch, roi_loss_weight: float) -> Dict[str, torch.Tensor]:
    out = model(batch.images, rois=batch.rois)
    seg = F.cross_entropy(out["seg"], batch.seg_labels)
    roi = (
        F.cross_entropy(out["roi_logits"], batch.roi_labels)
        if len(batch.rois)
        else seg.new_zeros(())
    )
    return {"loss": seg + roi_loss_weight * roi, "seg": seg, "roi": roi}


StepCallback = Callable[[int, Dict[str, float]], None]


def train(
    config: TrainConfig, on_step: Optional[StepCallback] = None
) -> Tuple[nn.Module, Dict[str, Any]]:
    """Train ``config.arch`` from scratch; returns the model (eval mode) and a training log."""
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    model = registry.get(config.arch).build().to(config.device)
    model.train()
    optimizer = build_optimizer(model, config)
    history: List[Dict[str, float]] = []
    window: Dict[str, List[float]] = {"loss": [], "seg": [], "roi": []}
    started = time.perf_counter()
    for step in range(config.steps):
        lr = learning_rate(config, step)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_mult"]
        batch = training_batch(config, step).to(config.device)
        terms = losses(model, batch, config.roi_loss_weight)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        optimizer.step()
        values = {k: float(v.detach()) for k, v in terms.items()}
        for key, value in values.items():
            window[key].append(value)
        if (step + 1) % 50 == 0 or step + 1 == config.steps:
            history.append(
                {"step": step + 1, "lr": lr, **{k: float(np.mean(v)) for k, v in window.items()}}
            )
            window = {k: [] for k in window}
        if on_step is not None:
            on_step(step + 1, values)
    model.eval().cpu()
    log = {"history": history, "train_seconds": round(time.perf_counter() - started, 1)}
    return model, log


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def evaluation_scenes(seed: int, n: int, image_size: int = 256) -> List[Scene]:
    config = SceneConfig.for_size(image_size)
    return [
        generate_scene(np.random.default_rng([seed, _SCENE_STREAM, 0, k]), config) for k in range(n)
    ]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    scene_list: Sequence[Scene],
    seed: int,
    batch_size: int = 8,
    thresholds: Tuple[float, float] = NAMED_THRESHOLDS["paper"],
    progress: Optional[Callable[[int], None]] = None,
) -> Dict[str, Any]:
    """Task metrics on ``scene_list``; adds the effective dilation table for deformable models.

    ``seg_miou``: mean IoU over background + shape classes (pixels of all scenes pooled);
    ``shape_pixel_accuracy``: fraction of a shape's visible pixels given its class, per size
    category of the shape; ``roi_accuracy``: RoIs sampled as in training from ``seed``.
    """
    from dcn_inspect.capture.session import capture_offsets

    model.eval()
    device = next(model.parameters()).device
    classes = len(CLASSES) + 1
    confusion = np.zeros((classes, classes), dtype=np.int64)
    size_hits = np.zeros(3)
    size_totals = np.zeros(3)
    roi_correct = roi_total = 0
    dilation = DilationAccumulator(thresholds)
    rng = np.random.default_rng([seed, _ROI_STREAM])
    for start in range(0, len(scene_list), batch_size):
        chunk = list(scene_list[start : start + batch_size])
        batch = make_batch(chunk, rng, 8, 4).to(device)
        with capture_offsets(model) as capture:
            capture.watch_input(batch.images)
            out = model(batch.images, rois=batch.rois)
        prediction = out["seg"].argmax(1).cpu().numpy()
        truth = batch.seg_labels.cpu().numpy()
        confusion += np.bincount(
            truth.ravel() * classes + prediction.ravel(), minlength=classes * classes
        ).reshape(classes, classes)
        for index, scene in enumerate(chunk):
            correct = prediction[index] == truth[index]
            for k, obj in enumerate(scene.objects):
                pixels = scene.instances == k
                code = int(area_category(np.array([obj.box_area]), thresholds)[0])
                size_hits[code] += correct[pixels].sum()
                size_totals[code] += pixels.sum()
        roi_correct += int((out["roi_logits"].argmax(1) == batch.roi_labels).sum().cpu())
        roi_total += len(batch.roi_labels)
        records = [r for r in capture.convs.values() if r.kernel_points >= 2]
        if records:
            entries = [_scene_annotation(start + k, scene) for k, scene in enumerate(chunk)]
            dilation.add(
                records,
                entries,
                list(range(start, start + len(chunk))),
                tuple(batch.images.shape[-2:]),
            )
        if progress is not None:
            progress(len(chunk))
    intersection = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - np.diag(confusion)
    iou = intersection / np.maximum(union, 1)
    metrics: Dict[str, Any] = {
        "images": len(scene_list),
        "seg_miou": float(iou.mean()),
        "seg_iou_per_class": {name: float(v) for name, v in zip(("background",) + CLASSES, iou)},
        "pixel_accuracy": float(intersection.sum() / max(confusion.sum(), 1)),
        "shape_pixel_accuracy": {
            name: float(size_hits[i] / max(size_totals[i], 1))
            for i, name in enumerate(CATEGORIES[:3])
        },
        "roi_accuracy": roi_correct / max(roi_total, 1),
        "roi_count": roi_total,
    }
    if dilation.stats:
        metrics["effective_dilation"] = {
            name: _dilation_table(stats.summary_rows()) for name, stats in dilation.stats.items()
        }
        metrics["effective_dilation_differences_ci95"] = {
            name: dilation_bootstrap(rows) for name, rows in dilation.image_sums.items()
        }
    return metrics


def _scene_annotation(index: int, scene: Scene) -> ImageAnnotation:
    """A generated scene's ground truth in the form the dilation statistics read."""
    height, width = scene.labels.shape
    boxes = np.array([obj.box for obj in scene.objects], dtype=np.float64).reshape(-1, 4)
    labels = [CLASSES[obj.label - 1] for obj in scene.objects]
    return ImageAnnotation(
        index,
        f"scene_{index:05d}",
        None,
        width,
        height,
        boxes,
        labels,
        np.zeros(len(boxes), dtype=bool),
    )


#: Differences of category means whose bootstrap intervals the evaluation reports.
DIFFERENCES = (
    ("medium", "small"),
    ("large", "medium"),
    ("large", "small"),
    ("large", "background"),
)


def dilation_bootstrap(
    image_sums: Sequence[Tuple[int, np.ndarray, np.ndarray]], resamples: int = 2000, seed: int = 0
) -> Dict[str, List[float]]:
    """95 % intervals of differences of category means, resampling whole images (see
    :func:`dcn_inspect.analysis.category_stats.bootstrap_means`)."""
    sums = np.array([s for _, s, _ in image_sums], dtype=np.float64).reshape(-1, len(CATEGORIES))
    counts = np.array([c for _, _, c in image_sums], dtype=np.float64).reshape(-1, len(CATEGORIES))
    index = {name: i for i, name in enumerate(CATEGORIES)}
    pairs = [(index[first], index[second]) for first, second in DIFFERENCES]
    _, differences = bootstrap_means(sums, counts, pairs, resamples=resamples, seed=seed)
    return {
        f"{first}-{second}": list(differences[pair])
        for (first, second), pair in zip(DIFFERENCES, pairs)
    }


def _dilation_table(rows: Sequence[Dict[str, float]]) -> Dict[str, Dict[str, float]]:
    """mean, std and number of units per category, from :meth:`CategoryStats.summary_rows`."""
    return {
        name: {"mean": row["mean"], "std": row["std"], "units": int(row["count"])}
        for name, row in zip(CATEGORIES, rows)
    }


# --------------------------------------------------------------------------------------------
# The whole recipe: train, evaluate, save
# --------------------------------------------------------------------------------------------


def weights_file_name(arch: str) -> str:
    """``dcn-sample`` -> ``dcn_sample.pt`` (the file names under ``sample_weights/``)."""
    return arch.replace("-", "_") + ".pt"


def _finite(value: Any) -> Any:
    """NaN (an empty category) -> None, so the metrics file is strict JSON."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_metrics(path: Path, report: Dict[str, Any]) -> None:
    """``report`` as strict, sorted, indented JSON (NaN written as null) into ``path``."""
    import json

    from dcn_inspect.io.outputs import write_text

    write_text(path, json.dumps(_finite(report), indent=2, sort_keys=True, allow_nan=False) + "\n")


def reevaluate(weights: Path, eval_images: int = 200, show_progress: bool = True) -> Dict[str, Any]:
    """Evaluate saved weights again (same held-out seed) and rewrite the ``eval`` section of
    their metrics json; training records (config, times, loss history, SHA256) are kept."""
    import json

    from rich.progress import Progress

    from dcn_inspect.models.loading import load_model

    weights = Path(weights)
    metrics_path = weights.with_suffix(".metrics.json")
    report = json.loads(metrics_path.read_text(encoding="utf-8"))
    loaded = load_model(report["arch"], weights=weights)
    seed = int(report["eval"]["seed"])
    image_size = int(report["train_config"].get("image_size", 256))
    with Progress(disable=not show_progress) as bar:
        task = bar.add_task(f"evaluate {report['arch']}", total=eval_images)
        scene_list = evaluation_scenes(seed, eval_images, image_size)
        report["eval"] = {
            "seed": seed,
            **evaluate(loaded.model, scene_list, seed, progress=lambda n: bar.advance(task, n)),
        }
    write_metrics(metrics_path, report)
    return report


@dataclass
class RecipeResult:
    weights: Path
    metrics: Dict[str, Any] = field(default_factory=dict)


def train_and_save(
    config: TrainConfig,
    out: Path,
    eval_seed: int = 1000,
    eval_images: int = 200,
    show_progress: bool = True,
) -> RecipeResult:
    """Train ``config``, evaluate on ``eval_images`` fresh scenes from ``eval_seed`` and write
    ``out`` (a native checkpoint) and ``out`` with suffix ``.metrics.json``."""
    from dcn_inspect.models.checkpoint import save_native, sha256_file
    from dcn_inspect.ops import backend_info

    if eval_seed == config.seed:
        raise ValueError("the evaluation seed must differ from the training seed")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model, log, metrics = _train_and_evaluate(config, eval_seed, eval_images, show_progress)
    wall = time.perf_counter() - started
    arch = registry.get(config.arch)
    meta = {
        "train_config": asdict(config),
        "preprocess": arch.preprocess.as_dict(),
        "classes": ["background", *CLASSES],
        "ops_backend": backend_info().name,
        "torch": str(torch.__version__),
        "train_seconds": log["train_seconds"],
        "eval": {
            "seed": eval_seed,
            "images": eval_images,
            "seg_miou": metrics["seg_miou"],
            "roi_accuracy": metrics["roi_accuracy"],
        },
    }
    save_native(out, config.arch, dict(arch.default_config), model, meta)
    report = {
        "arch": config.arch,
        "weights": out.name,
        "sha256": sha256_file(out),
        "train_config": asdict(config),
        "ops_backend": backend_info().name,
        "torch": str(torch.__version__),
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "train_seconds": log["train_seconds"],
        "wall_seconds": round(wall, 1),
        "history": log["history"],
        "eval": {"seed": eval_seed, **metrics},
    }
    write_metrics(out.with_suffix(".metrics.json"), report)
    return RecipeResult(weights=out, metrics=report)


def _train_and_evaluate(
    config: TrainConfig, eval_seed: int, eval_images: int, show_progress: bool
) -> Tuple[nn.Module, Dict[str, Any], Dict[str, Any]]:
    """:func:`train` then :func:`evaluate` on fresh scenes, under one progress display:
    (model, training log, metrics)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, disable=not show_progress) as bar:
        task = bar.add_task(f"train {config.arch}", total=config.steps, info="")

        def on_step(step: int, values: Dict[str, float]) -> None:
            bar.update(task, completed=step, info=f"loss {values['loss']:.3f}")

        model, log = train(config, on_step)
        eval_task = bar.add_task(f"evaluate {config.arch}", total=eval_images, info="")
        scene_list = evaluation_scenes(eval_seed, eval_images, config.image_size)
        metrics = evaluate(
            model, scene_list, eval_seed, progress=lambda n: bar.advance(eval_task, n)
        )
    return model, log, metrics

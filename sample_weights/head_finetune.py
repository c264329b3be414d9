"""Fine-tuning the R-FCN head's offset branch of the sample weights (how the shipped
``dcn_sample.pt`` head was made): ``python sample_weights/train.py --finetune-head``.

Only ``rfcn_offset`` trains (see :class:`HeadFinetuneConfig`); before and after, the held-out
scenes of the recipe (``recipe.py`` beside this file) measure the task metrics and the paper's
Fig. 7: the fraction of regular vs deformed bin sampling points on each ground-truth object's
mask, by the code ``dcn-inspect bins`` uses (:func:`foreground_evaluation`).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from recipe import (
    StepCallback,
    TrainConfig,
    evaluate,
    evaluation_scenes,
    normalise,
    training_batch,
    write_metrics,
)
from torch import nn

from dcn_inspect.io.datasets.synthetic import Scene


@dataclass
class HeadFinetuneConfig:
    """Fine-tune only ``rfcn_offset`` (the R-FCN head's offset branch) of trained weights.

    Everything else is frozen (backbone with its deformable offsets, BatchNorm statistics,
    segmentation head, score maps), so the effective dilation of the backbone is unchanged.
    The pooled normalised offsets are bounded softly (``offset_bound * tanh(t / offset_bound)``,
    see ``DemoNet``). Loss: the recipe's RoI cross-entropy (jittered ground-truth boxes and
    background boxes). Batches are steps ``first_step .. first_step + steps - 1`` of the
    training stream of ``seed`` (scenes the base training, ``TrainConfig.steps`` long, never drew).
    """

    seed: int = 0
    first_step: int = 1500
    steps: int = 300
    batch_size: int = 8
    lr: float = 1e-3
    offset_bound: float = 2.0
    trans_std: float = 0.1
    threads: int = 1
    image_size: int = 256


def finetune_head_offsets(
    model: nn.Module, config: HeadFinetuneConfig, on_step: Optional[StepCallback] = None
) -> Dict[str, Any]:
    """Train ``model.rfcn_offset`` in place (model stays in eval mode: BatchNorm frozen); returns
    a log."""
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    model.offset_bound = float(config.offset_bound)
    model.psroi_pool.trans_std = float(config.trans_std)
    model.eval()
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith("rfcn_offset."))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=0.0)
    stream = TrainConfig(
        seed=config.seed, batch_size=config.batch_size, image_size=config.image_size
    )
    history: List[Dict[str, float]] = []
    window: List[float] = []
    started = time.perf_counter()
    for step in range(config.steps):
        lr = config.lr * 0.5 * (1 + math.cos(math.pi * step / config.steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = training_batch(stream, config.first_step + step)
        with torch.no_grad():
            features = model.features(batch.images)
        logits = model.roi_logits(features, batch.rois)
        loss = F.cross_entropy(logits, batch.roi_labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        window.append(float(loss.detach()))
        if (step + 1) % 50 == 0 or step + 1 == config.steps:
            history.append({"step": step + 1, "lr": lr, "roi": float(np.mean(window))})
            window = []
        if on_step is not None:
            on_step(step + 1, {"loss": float(loss.detach())})
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return {"history": history, "train_seconds": round(time.perf_counter() - started, 1)}


@torch.no_grad()
def foreground_evaluation(model: nn.Module, scene_list: Sequence[Scene]) -> Dict[str, Any]:
    """Fig. 7 measured on generated scenes: every ground-truth box is an RoI (offsets of its
    class), its object mask the generator's polygon rasterised at pixel centres; the fraction
    of regular vs deformed bin sampling points on the mask, by the code ``dcn-inspect bins``
    uses (:mod:`dcn_inspect.analysis.bins_foreground`, :mod:`dcn_inspect.analysis.bins`)."""
    import pandas as pd

    from dcn_inspect.analysis.bins import geometry_for_rows, head_info
    from dcn_inspect.analysis.bins_foreground import bin_foreground, foreground_table
    from dcn_inspect.capture.session import probe
    from dcn_inspect.io.datasets.synthetic import rasterize

    model.eval()
    rows = []
    for index, scene in enumerate(scene_list):
        if not scene.objects:
            continue
        boxes = torch.tensor([[0.0, *obj.box] for obj in scene.objects], dtype=torch.float32)
        result = probe(model, normalise(scene.image[None]), rois=boxes)
        record = next(iter(result.capture.roi_pools.values()))
        choice = [(k, obj.label, "gt") for k, obj in enumerate(scene.objects)]
        geometry = geometry_for_rows(record, choice, head_info(record))
        height, width = scene.labels.shape
        for k, obj in enumerate(scene.objects):
            fraction = bin_foreground(geometry, k, rasterize(obj.polygon, height, width))
            rows.append(
                {
                    "image": index,
                    "roi": k,
                    "label": obj.name,
                    "class": obj.name,
                    "fg_regular": fraction.regular,
                    "fg_deformed": fraction.deformed,
                }
            )
    table = foreground_table(pd.DataFrame(rows))
    return {
        row["group"]: {
            k: row[k]
            for k in (
                "rois",
                "fg_regular",
                "fg_deformed",
                "gain",
                "gain_ci_low",
                "gain_ci_high",
                "improved",
            )
        }
        for row in table.to_dict("records")
    }


@torch.no_grad()
def offset_magnitudes(model: nn.Module, scene_list: Sequence[Scene]) -> Dict[str, float]:
    """Percentiles of |normalised offset| of the ground-truth boxes' own-class offsets."""
    from dcn_inspect.capture.session import probe

    values = []
    for scene in scene_list:
        if not scene.objects:
            continue
        boxes = torch.tensor([[0.0, *obj.box] for obj in scene.objects], dtype=torch.float32)
        record = next(
            iter(probe(model, normalise(scene.image[None]), rois=boxes).capture.roi_pools.values())
        )
        trans = record.offset.double().numpy().reshape(len(boxes), -1, 2, model.bins, model.bins)
        values.append(
            np.abs(trans[np.arange(len(boxes)), [obj.label for obj in scene.objects]]).ravel()
        )
    every = np.concatenate(values)
    return {
        "p50": float(np.percentile(every, 50)),
        "p90": float(np.percentile(every, 90)),
        "max": float(every.max()),
    }


def finetune_and_save(
    config: HeadFinetuneConfig,
    weights: Path,
    out: Path,
    eval_seed: int = 1000,
    eval_images: int = 200,
    show_progress: bool = True,
) -> Dict[str, Any]:
    """Fine-tune the R-FCN offset branch of ``weights`` (:func:`finetune_head_offsets`), evaluate
    the result as :func:`recipe.train_and_save` does plus the Fig. 7 foreground measurement
    (before and after, same held-out scenes), and write ``out`` and its ``.metrics.json``.

    The base's training record (config, times, loss history) is kept in the metrics; the
    fine-tune is recorded under ``head_finetune``. A base whose head is already bounded is refused
    (fine-tuning twice would not reproduce the shipped file).
    """
    import json

    from dcn_inspect.models.checkpoint import save_native, sha256_file
    from dcn_inspect.models.loading import load_model

    weights, out = Path(weights), Path(out)
    base_report = json.loads(weights.with_suffix(".metrics.json").read_text(encoding="utf-8"))
    loaded = load_model(base_report["arch"], weights=weights)
    if float(loaded.config.get("offset_bound", 0.0)) > 0:
        raise ValueError(
            f"{weights}: its R-FCN head is already fine-tuned "
            f"(offset_bound {loaded.config['offset_bound']}); start from the base weights"
        )
    base_sha = sha256_file(weights)
    model = loaded.model
    started = time.perf_counter()
    before, log, metrics = _finetune_and_evaluate(
        model, config, eval_seed, eval_images, show_progress
    )
    wall = time.perf_counter() - started
    model_config = {
        **loaded.config,
        "offset_bound": config.offset_bound,
        "trans_std": config.trans_std,
    }
    before["roi_accuracy"] = base_report["eval"]["roi_accuracy"]
    finetune = {
        "config": asdict(config),
        "base_sha256": base_sha,
        "train_seconds": log["train_seconds"],
        "wall_seconds": round(wall, 1),
        "threads": torch.get_num_threads(),
        "history": log["history"],
        "before": before,
    }
    meta = {
        **loaded.meta,
        "head_finetune": {k: finetune[k] for k in ("config", "base_sha256", "train_seconds")},
    }
    meta["eval"] = {
        "seed": eval_seed,
        "images": eval_images,
        "seg_miou": metrics["seg_miou"],
        "roi_accuracy": metrics["roi_accuracy"],
    }
    save_native(out, base_report["arch"], model_config, model, meta)
    report = {
        **base_report,
        "weights": out.name,
        "sha256": sha256_file(out),
        "head_finetune": finetune,
        "eval": {"seed": eval_seed, **metrics},
    }
    write_metrics(out.with_suffix(".metrics.json"), report)
    return report


def _finetune_and_evaluate(
    model: nn.Module,
    config: HeadFinetuneConfig,
    eval_seed: int,
    eval_images: int,
    show_progress: bool,
) -> Tuple[Dict[str, Any], Dict[str, Any], Dict[str, Any]]:
    """The Fig. 7 measurement and offset magnitudes before, the fine-tune, then the recipe's
    evaluation plus both again, on the same held-out scenes: (before, fine-tune log, metrics)."""
    from rich.progress import Progress

    scene_list = evaluation_scenes(eval_seed, eval_images, config.image_size)
    with Progress(disable=not show_progress) as bar:
        before = {
            "foreground": foreground_evaluation(model, scene_list),
            "roi_offset_magnitude": offset_magnitudes(model, scene_list),
        }
        task = bar.add_task("fine-tune rfcn_offset", total=config.steps)
        log = finetune_head_offsets(
            model, config, lambda step, _values: bar.update(task, completed=step)
        )
        eval_task = bar.add_task("evaluate", total=eval_images)
        metrics = evaluate(
            model, scene_list, eval_seed, progress=lambda n: bar.advance(eval_task, n)
        )
        metrics["foreground"] = foreground_evaluation(model, scene_list)
        metrics["roi_offset_magnitude"] = offset_magnitudes(model, scene_list)
    return before, log, metrics

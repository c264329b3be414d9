"""The recipe of ``dcn-attn-sample`` (:mod:`dcn_inspect.models.attention_net`): set-prediction
training of the small Deformable-DETR-style detector on synthetic shape scenes, and its
held-out evaluation (AP50). Not part of the runtime package: ``python
sample_weights/train_attn.py`` runs it.

* Data: a pool of ``pool_scenes`` training scenes from the seed (scene k from
  ``numpy.random.default_rng([seed, 3, k])``), each in its four flips (none, horizontal,
  vertical, both; a flipped scene is another valid scene). The backbone is the shipped
  ``dcn_sample.pt`` backbone, frozen, so its stride-8 maps are computed once and cached
  (float16); step s trains on ``batch_size`` pool items drawn by
  ``default_rng([seed, 4, s])``. Monitoring scenes (seed 2000) are never used for a decision
  the run makes; the held-out evaluation scenes (seed 1000) are never seen before the end.
* Loss (Deformable DETR): Hungarian matching of queries to ground-truth boxes (cost 2 focal
  class + 5 L1 + 2 GIoU; :func:`linear_sum_assignment`, our own solver), then sigmoid focal
  class loss (alpha 0.25, gamma 2) + 5 L1 + 2 GIoU, summed over every decoder layer.
* Optimiser: AdamW, linear warm-up then cosine decay; the sampling offsets and the
  reference-point layer at 0.1 x the learning rate (as the paper); gradient norm clipped.
* Evaluation: COCO-style AP at IoU 0.5 (101-point interpolated) per class, and over the
  classes, by box-size category (small < 96^2 px, large >= 224^2 px of box area: the
  dataset's split), from the top 100 (query, class) scores per image (:func:`ap50`).
"""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from dcn_inspect.io.datasets.synthetic import (
    CLASSES,
    LARGE_MIN_AREA,
    SMALL_MAX_AREA,
    Scene,
    SceneConfig,
    generate_scene,
)
from dcn_inspect.models import registry
from dcn_inspect.models.attention_net import BACKBONE_PREFIXES, AttnDetNet

HERE = Path(__file__).resolve().parent
ARCH = "dcn-attn-sample"
#: Seed streams: the training pool's scenes, the batches' draws (the scenes of
#: ``recipe.evaluation_scenes`` use stream 1).
_POOL_STREAM, _DRAW_STREAM, _EVAL_STREAM = 3, 4, 1
SIZES = ("small", "medium", "large")


@dataclass
class AttnTrainConfig:
    """Everything that determines the trained weights."""

    seed: int = 0
    pool_scenes: int = 2000
    steps: int = 3200
    batch_size: int = 8
    lr: float = 5e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    low_lr_mult: float = 0.1  # sampling offsets and reference points
    clip_norm: float = 1.0
    class_weight: float = 2.0
    l1_weight: float = 5.0
    giou_weight: float = 2.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    backbone_weights: str = "dcn_sample.pt"
    monitor_seed: int = 2000
    monitor_images: int = 48
    monitor_every: int = 200
    threads: int = 1
    image_size: int = 256


# --------------------------------------------------------------------------------------------
# Boxes
# --------------------------------------------------------------------------------------------


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def pairwise_iou(a: torch.Tensor, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """IoU [N, M] and union [N, M] of xyxy boxes a [N, 4], b [M, 4]."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    low = torch.max(a[:, None, :2], b[None, :, :2])
    high = torch.min(a[:, None, 2:], b[None, :, 2:])
    inter = (high - low).clamp(min=0).prod(-1)
    union = area_a[:, None] + area_b[None] - inter
    return inter / union.clamp(min=1e-9), union


def generalized_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """GIoU [N, M] of xyxy boxes."""
    iou, union = pairwise_iou(a, b)
    low = torch.min(a[:, None, :2], b[None, :, :2])
    high = torch.max(a[:, None, 2:], b[None, :, 2:])
    hull = (high - low).clamp(min=0).prod(-1)
    return iou - (hull - union) / hull.clamp(min=1e-9)


# --------------------------------------------------------------------------------------------
# Matching
# --------------------------------------------------------------------------------------------


def linear_sum_assignment(cost: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Minimum-cost assignment of a rectangular cost matrix (Hungarian method with potentials,
    shortest augmenting paths, O(n^2 m)): (rows, columns), ``min(n, m)`` pairs, rows sorted."""
    cost = np.nan_to_num(np.asarray(cost, dtype=np.float64), nan=1e9, posinf=1e9, neginf=-1e9)
    transposed = cost.shape[0] > cost.shape[1]
    if transposed:
        cost = cost.T
    n, m = cost.shape
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    u, v = np.zeros(n + 1), np.zeros(m + 1)
    owner = np.zeros(m + 1, np.int64)  # 1-based row holding column j (column 0: the new row)
    way = np.zeros(m + 1, np.int64)
    for row in range(1, n + 1):
        owner[0] = row
        column = 0
        min_reduced = np.full(m + 1, np.inf)
        used = np.zeros(m + 1, bool)
        while True:
            used[column] = True
            current = owner[column]
            free = np.nonzero(~used[1:])[0] + 1
            reduced = cost[current - 1, free - 1] - u[current] - v[free]
            better = reduced < min_reduced[free]
            min_reduced[free[better]] = reduced[better]
            way[free[better]] = column
            nearest = free[np.argmin(min_reduced[free])]
            delta = min_reduced[nearest]
            taken = np.nonzero(used)[0]
            u[owner[taken]] += delta
            v[taken] -= delta
            min_reduced[free] -= delta
            column = nearest
            if owner[column] == 0:
                break
        while column:
            previous = way[column]
            owner[column] = owner[previous]
            column = previous
    columns = np.nonzero(owner[1:])[0]
    rows = owner[columns + 1] - 1
    if transposed:
        rows, columns = columns, rows
    order = np.argsort(rows)
    return rows[order].astype(np.int64), columns[order].astype(np.int64)


Target = Dict[str, torch.Tensor]  # "labels" [n] (0..C-1), "boxes" [n, 4] cxcywh normalised


@torch.no_grad()
def hungarian_match(
    logits: torch.Tensor, boxes: torch.Tensor, targets: Sequence[Target], config: AttnTrainConfig
) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Per image, (query indices, target indices) of the minimum-cost matching."""
    matches = []
    alpha, gamma = config.focal_alpha, config.focal_gamma
    for index, target in enumerate(targets):
        if len(target["labels"]) == 0:
            matches.append((torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)))
            continue
        prob = logits[index].sigmoid()[:, target["labels"]]
        negative = (1 - alpha) * prob**gamma * -(1 - prob + 1e-8).log()
        positive = alpha * (1 - prob) ** gamma * -(prob + 1e-8).log()
        cost = (
            config.class_weight * (positive - negative)
            + config.l1_weight * torch.cdist(boxes[index], target["boxes"], p=1)
            - config.giou_weight
            * generalized_iou(cxcywh_to_xyxy(boxes[index]), cxcywh_to_xyxy(target["boxes"]))
        )
        rows, columns = linear_sum_assignment(cost.numpy())
        matches.append((torch.from_numpy(rows), torch.from_numpy(columns)))
    return matches


# --------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------


def sigmoid_focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, alpha: float, gamma: float
) -> torch.Tensor:
    """Element-wise focal loss of sigmoid logits (Lin et al. 2017)."""
    prob = logits.sigmoid()
    ce = nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    return (alpha * targets + (1 - alpha) * (1 - targets)) * loss


def set_loss(
    output: Dict[str, torch.Tensor], targets: Sequence[Target], config: AttnTrainConfig
) -> Dict[str, torch.Tensor]:
    """Focal class, L1 and GIoU losses of one decoder layer's output, normalised by the number
    of ground-truth boxes."""
    logits, boxes = output["pred_logits"], output["pred_boxes"]
    matches = hungarian_match(logits.detach(), boxes.detach(), targets, config)
    count = max(sum(len(t["labels"]) for t in targets), 1)
    onehot = torch.zeros_like(logits)
    matched_boxes, target_boxes = [], []
    for index, ((queries, objects), target) in enumerate(zip(matches, targets)):
        onehot[index, queries, target["labels"][objects]] = 1.0
        matched_boxes.append(boxes[index, queries])
        target_boxes.append(target["boxes"][objects])
    focal = sigmoid_focal_loss(logits, onehot, config.focal_alpha, config.focal_gamma)
    predicted, truth = torch.cat(matched_boxes), torch.cat(target_boxes)
    l1 = (predicted - truth).abs().sum()
    giou = (1 - torch.diag(generalized_iou(cxcywh_to_xyxy(predicted), cxcywh_to_xyxy(truth)))).sum()
    return {"class": focal.sum() / count, "l1": l1 / count, "giou": giou / count}


def total_loss(
    out: Dict[str, Any], targets: Sequence[Target], config: AttnTrainConfig
) -> Dict[str, torch.Tensor]:
    """The weighted loss summed over the last and every auxiliary decoder output; the last
    layer's terms are reported."""
    layers = [*out.get("aux_outputs", []), out]
    loss = torch.zeros(())
    terms: Dict[str, torch.Tensor] = {}
    for layer in layers:
        terms = set_loss(layer, targets, config)
        loss = (
            loss
            + config.class_weight * terms["class"]
            + config.l1_weight * terms["l1"]
            + config.giou_weight * terms["giou"]
        )
    return {"loss": loss, **terms}


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def scene_target(scene: Scene) -> Target:
    height, width = scene.labels.shape
    boxes = np.array([o.box for o in scene.objects], np.float32).reshape(-1, 4)
    boxes = boxes / np.array([width, height, width, height], np.float32)
    cxcywh = np.stack(
        [
            (boxes[:, 0] + boxes[:, 2]) / 2,
            (boxes[:, 1] + boxes[:, 3]) / 2,
            boxes[:, 2] - boxes[:, 0],
            boxes[:, 3] - boxes[:, 1],
        ],
        -1,
    )
    return {
        "labels": torch.tensor([o.label - 1 for o in scene.objects], dtype=torch.long),
        "boxes": torch.from_numpy(cxcywh),
    }


def flip_target(target: Target, horizontal: bool, vertical: bool) -> Target:
    boxes = target["boxes"].clone()
    if horizontal:
        boxes[:, 0] = 1 - boxes[:, 0]
    if vertical:
        boxes[:, 1] = 1 - boxes[:, 1]
    return {"labels": target["labels"], "boxes": boxes}


def normalise(images: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> the model's input (the architecture's preprocessing)."""
    preprocess = registry.get(ARCH).preprocess
    array = images.astype(np.float32) / 255.0
    array = (array - np.asarray(preprocess.mean, np.float32)) / np.asarray(
        preprocess.std, np.float32
    )
    return torch.from_numpy(array.transpose(0, 3, 1, 2).copy())


@dataclass
class Pool:
    """Cached backbone maps (float16) [N, 96, H/8, W/8] and their targets."""

    features: torch.Tensor
    targets: List[Target]


FLIPS = ((False, False), (True, False), (False, True), (True, True))


@torch.no_grad()
def build_pool(
    backbone: nn.Module,
    scene_seeds: Sequence[Sequence[int]],
    image_size: int,
    flips: Sequence[Tuple[bool, bool]] = FLIPS,
    progress: Optional[Callable[[int], None]] = None,
) -> Pool:
    """Scenes from ``scene_seeds`` (one rng seed each), in every flip of ``flips``, through the
    frozen backbone."""
    backbone.eval()
    config = SceneConfig.for_size(image_size)
    features, targets = [], []
    for seed in scene_seeds:
        scene = generate_scene(np.random.default_rng(list(seed)), config)
        target = scene_target(scene)
        images = []
        for horizontal, vertical in flips:
            image = scene.image[:, ::-1] if horizontal else scene.image
            images.append(image[::-1] if vertical else image)
            targets.append(flip_target(target, horizontal, vertical))
        features.append(backbone(normalise(np.stack(images))).half())
        if progress is not None:
            progress(1)
    return Pool(torch.cat(features), targets)


def load_backbone(model: AttnDetNet, path: Path) -> None:
    """The ``dcn-sample`` backbone weights (stem, layer1..layer4) of a native checkpoint."""
    from dcn_inspect.models.checkpoint import read_checkpoint_file

    state = read_checkpoint_file(path)["state_dict"]
    backbone = {k: v for k, v in state.items() if k.startswith(BACKBONE_PREFIXES)}
    model.backbone.load_state_dict(backbone, strict=True)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def learning_rate(config: AttnTrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(config.steps - config.warmup_steps, 1)
    return config.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def build_optimizer(model: nn.Module, config: AttnTrainConfig) -> torch.optim.Optimizer:
    low, other = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        is_low = "sampling_offsets" in name or name.startswith("reference_points")
        (low if is_low else other).append(parameter)
    groups = [{"params": other, "lr_mult": 1.0}, {"params": low, "lr_mult": config.low_lr_mult}]
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)


def build_model(config: AttnTrainConfig) -> AttnDetNet:
    """The architecture with the ``dcn-sample`` backbone loaded and frozen."""
    model = registry.get(ARCH).build()
    load_backbone(model, HERE / config.backbone_weights)
    for parameter in model.backbone.parameters():
        parameter.requires_grad_(False)
    return model  # type: ignore[return-value]


Log = Callable[[str], None]


def train(config: AttnTrainConfig, log: Log = print) -> Tuple[AttnDetNet, Dict[str, Any]]:
    """Train from the seed; returns the model (eval mode) and a training record."""
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    started = time.perf_counter()
    model = build_model(config)
    pool = build_pool(
        model.backbone, [(config.seed, _POOL_STREAM, k) for k in range(config.pool_scenes)],
        config.image_size,
    )  # fmt: skip
    monitor_scenes = evaluation_scenes(
        config.monitor_seed, config.monitor_images, config.image_size
    )
    pool_seconds = time.perf_counter() - started
    log(f"pool: {len(pool.targets)} items in {pool_seconds:.0f} s")
    optimizer = build_optimizer(model, config)
    history: List[Dict[str, float]] = []
    window: Dict[str, List[float]] = {}
    train_started = time.perf_counter()
    for step in range(config.steps):
        model.train()
        lr = learning_rate(config, step)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_mult"]
        draw = np.random.default_rng([config.seed, _DRAW_STREAM, step])
        chosen = draw.choice(len(pool.targets), config.batch_size, replace=False)
        terms = total_loss(
            model.detect(pool.features[chosen].float()),
            [pool.targets[i] for i in chosen],
            config,
        )
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        nn.utils.clip_grad_norm_(model.parameters(), config.clip_norm)
        optimizer.step()
        for key, value in terms.items():
            window.setdefault(key, []).append(float(value.detach()))
        if (step + 1) % 50 == 0 or step + 1 == config.steps:
            row = {"step": step + 1, "lr": lr, **{k: float(np.mean(v)) for k, v in window.items()}}
            row["seconds"] = round(time.perf_counter() - train_started, 1)
            if (step + 1) % config.monitor_every == 0 or step + 1 == config.steps:
                row["monitor_ap50"] = evaluate(model, monitor_scenes)["ap50"]
            history.append(row)
            window = {}
            log(json.dumps(row))
    model.eval()
    record = {
        "history": history,
        "pool_seconds": round(pool_seconds, 1),
        "train_seconds": round(time.perf_counter() - train_started, 1),
        "steps_per_second": round(config.steps / (time.perf_counter() - train_started), 3),
    }
    return model, record


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def evaluation_scenes(seed: int, n: int, image_size: int = 256) -> List[Scene]:
    """Scene k from ``default_rng([seed, 1, 0, k])`` (as ``recipe.evaluation_scenes``)."""
    config = SceneConfig.for_size(image_size)
    return [
        generate_scene(np.random.default_rng([seed, _EVAL_STREAM, 0, k]), config) for k in range(n)
    ]


Detections = Tuple[np.ndarray, np.ndarray, np.ndarray]  # scores [K], labels [K], xyxy px [K, 4]


def detections(output: Dict[str, Any], size: Tuple[int, int], top: int = 100) -> List[Detections]:
    """Per image, the ``top`` highest (query, class) sigmoid scores with their query's box in
    pixels (Deformable DETR's post-processing)."""
    height, width = size
    prob = output["pred_logits"].sigmoid()
    batch, queries, classes = prob.shape
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    boxes = cxcywh_to_xyxy(output["pred_boxes"]) * scale
    result = []
    for index in range(batch):
        scores, flat = prob[index].flatten().topk(min(top, queries * classes))
        chosen = boxes[index, flat // classes]
        result.append((scores.numpy(), (flat % classes).numpy(), chosen.numpy()))
    return result


def _area(boxes: np.ndarray) -> np.ndarray:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    low = np.maximum(box[:2], boxes[:, :2])
    high = np.minimum(box[2:], boxes[:, 2:])
    inter = np.clip(high - low, 0, None).prod(-1)
    return inter / np.maximum(_area(box[None]) + _area(boxes) - inter, 1e-9)


def _match_class(
    dets: Sequence[Tuple[float, int, np.ndarray]],
    truth: Sequence[np.ndarray],
    ignored: Sequence[np.ndarray],
    area_range: Tuple[float, float],
    threshold: float,
) -> Tuple[np.ndarray, np.ndarray]:
    """COCO matching of one class's detections (score order): (true positive, ignored) flags.
    A detection takes the best-IoU unmatched box above ``threshold``, a counted box before an
    ignored one; one matched to an ignored box, or unmatched and outside ``area_range``, is
    ignored."""
    taken = [np.zeros(len(t), bool) for t in truth]
    tp = np.zeros(len(dets), bool)
    skip = np.zeros(len(dets), bool)
    for k, (_, image, box) in enumerate(dets):
        boxes = truth[image]
        ious = _iou(box, boxes) if len(boxes) else np.zeros(0)
        ok = (ious >= threshold) & ~taken[image]
        best = -1
        for want_ignored in (False, True):
            candidates = np.nonzero(ok & (ignored[image] == want_ignored))[0]
            if len(candidates):
                best = int(candidates[np.argmax(ious[candidates])])
                break
        if best >= 0:
            taken[image][best] = True
            tp[k], skip[k] = not ignored[image][best], bool(ignored[image][best])
        else:
            area = float(_area(box[None])[0])
            skip[k] = not area_range[0] <= area < area_range[1]
    return tp, skip


def interpolated_ap(tp: np.ndarray, positives: int) -> float:
    """101-point interpolated AP (COCO) of detections in score order (true-positive flags)."""
    if positives == 0:
        return float("nan")
    hits = np.cumsum(tp)
    recall = hits / positives
    precision = hits / np.arange(1, len(tp) + 1)
    precision = np.maximum.accumulate(precision[::-1])[::-1] if len(tp) else precision
    points = np.searchsorted(recall, np.linspace(0, 1, 101), side="left")
    values = [precision[i] if i < len(precision) else 0.0 for i in points]
    return float(np.mean(values))


def ap50(
    dets: Sequence[Detections],
    truth: Sequence[Tuple[np.ndarray, np.ndarray]],
    classes: int = len(CLASSES),
    area_range: Tuple[float, float] = (0.0, float("inf")),
    threshold: float = 0.5,
) -> List[float]:
    """AP at IoU ``threshold`` per class (NaN for a class without counted boxes).

    ``dets``: per image (scores, labels, xyxy boxes); ``truth``: per image (labels, xyxy boxes).
    Boxes whose area is outside ``area_range`` are ignored (COCO's area ranges)."""
    result = []
    for c in range(classes):
        entries = [
            (float(s), image, box)
            for image, (scores, labels, boxes) in enumerate(dets)
            for s, label, box in zip(scores, labels, boxes)
            if label == c
        ]
        entries.sort(key=lambda e: -e[0])  # stable: ties keep image order
        boxes_c = [b[lab == c] for lab, b in truth]
        ignored = [~((_area(b) >= area_range[0]) & (_area(b) < area_range[1])) for b in boxes_c]
        tp, skip = _match_class(entries, boxes_c, ignored, area_range, threshold)
        positives = int(sum((~i).sum() for i in ignored))
        result.append(interpolated_ap(tp[~skip], positives))
    return result


def _mean(values: Sequence[float]) -> Optional[float]:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def mean_best_iou(dets: Sequence[Detections], truth: Sequence[Tuple[np.ndarray, np.ndarray]]):
    """Mean over ground-truth boxes of the best IoU among the image's n highest-scoring
    detections (n = its number of boxes), class-agnostic."""
    values = []
    for (_, _, boxes), (_, gt) in zip(dets, truth):
        for box in gt:
            values.append(float(_iou(box, boxes[: len(gt)]).max()) if len(boxes) else 0.0)
    return float(np.mean(values)) if values else float("nan")


@torch.no_grad()
def evaluate(model: nn.Module, scene_list: Sequence[Scene], batch_size: int = 8) -> Dict[str, Any]:
    """AP50 per class, mean, by size category, and the mean best IoU, on ``scene_list``."""
    was_training = model.training
    model.eval()
    dets: List[Detections] = []
    for start in range(0, len(scene_list), batch_size):
        chunk = scene_list[start : start + batch_size]
        out = model(normalise(np.stack([s.image for s in chunk])))
        dets.extend(detections(out, chunk[0].labels.shape))
    model.train(was_training)
    truth = [
        (
            np.array([o.label - 1 for o in s.objects], np.int64),
            np.array([o.box for o in s.objects], np.float64).reshape(-1, 4),
        )
        for s in scene_list
    ]
    per_class = ap50(dets, truth)
    ranges = {
        "small": (0.0, SMALL_MAX_AREA),
        "medium": (SMALL_MAX_AREA, LARGE_MIN_AREA),
        "large": (LARGE_MIN_AREA, float("inf")),
    }
    boxes = np.concatenate([b for _, b in truth]) if truth else np.zeros((0, 4))
    return {
        "images": len(scene_list),
        "boxes": int(len(boxes)),
        "ap50": _mean(per_class),
        "ap50_per_class": dict(zip(CLASSES, per_class)),
        "ap50_by_size": {
            name: _mean(ap50(dets, truth, area_range=r)) for name, r in ranges.items()
        },
        "boxes_by_size": {
            name: int(((_area(boxes) >= r[0]) & (_area(boxes) < r[1])).sum())
            for name, r in ranges.items()
        },
        "mean_best_iou": mean_best_iou(dets, truth),
    }


# --------------------------------------------------------------------------------------------
# The whole recipe: train, evaluate, save, describe
# --------------------------------------------------------------------------------------------


def train_and_save(
    config: AttnTrainConfig,
    out: Path,
    eval_seed: int = 1000,
    eval_images: int = 200,
    log: Log = print,
) -> Dict[str, Any]:
    """Train ``config``, evaluate on ``eval_images`` fresh scenes from ``eval_seed``, write
    ``out`` (a native checkpoint) and ``out`` with suffix ``.metrics.json``; returns the
    metrics report."""
    from recipe import write_metrics

    from dcn_inspect.models.checkpoint import save_native, sha256_file

    if eval_seed in (config.seed, config.monitor_seed):
        raise ValueError("the evaluation seed must differ from the training and monitor seeds")
    started = time.perf_counter()
    model, record = train(config, log)
    eval_started = time.perf_counter()
    metrics = evaluate(model, evaluation_scenes(eval_seed, eval_images, config.image_size))
    eval_seconds = time.perf_counter() - eval_started
    log(f"held-out AP50 {metrics['ap50']:.3f} ({eval_seconds:.0f} s)")
    arch = registry.get(ARCH)
    meta = {
        "train_config": asdict(config),
        "preprocess": arch.preprocess.as_dict(),
        "classes": list(CLASSES),
        "torch": str(torch.__version__),
        "train_seconds": record["train_seconds"],
        "eval": {"seed": eval_seed, "images": eval_images, "ap50": metrics["ap50"]},
    }
    out = Path(out)
    save_native(out, ARCH, dict(arch.default_config), model, meta)
    report = {
        "arch": ARCH,
        "weights": out.name,
        "sha256": sha256_file(out),
        "train_config": asdict(config),
        "torch": str(torch.__version__),
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        **{k: v for k, v in record.items() if k != "history"},
        "eval_seconds": round(eval_seconds, 1),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "history": record["history"],
        "eval": {"seed": eval_seed, **metrics},
    }
    write_metrics(out.with_suffix(".metrics.json"), report)
    return report


#: The model card's section of this model starts with this line and runs to the card's end.
CARD_HEADING = "# Model card: `dcn-attn-sample`"


def _cell(value: Optional[float]) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.3f}"


def card_section(report: Dict[str, Any]) -> str:
    """The ``dcn-attn-sample`` section of ``MODEL_CARD.md`` from its metrics report."""
    ev = report["eval"]
    per_class = " | ".join(_cell(ev["ap50_per_class"][c]) for c in CLASSES)
    sizes = " | ".join(f"{_cell(ev['ap50_by_size'][s])} ({ev['boxes_by_size'][s]})" for s in SIZES)
    config = report["train_config"]
    template = (HERE / "MODEL_CARD.attn.template.md").read_text(encoding="utf-8")
    return template.format(
        heading=CARD_HEADING,
        train_config=json.dumps(config, sort_keys=True),
        steps=config["steps"],
        batch=config["batch_size"],
        pool=config["pool_scenes"],
        items=4 * config["pool_scenes"],
        steps_per_second=report["steps_per_second"],
        pool_seconds=report["pool_seconds"],
        train_seconds=report["train_seconds"],
        wall_seconds=report["wall_seconds"],
        torch=report["torch"],
        threads=report["threads"],
        eval_seed=ev["seed"],
        eval_images=ev["images"],
        eval_boxes=ev["boxes"],
        class_header=" | ".join(CLASSES),
        class_rule=" | ".join("---" for _ in CLASSES),
        per_class=per_class,
        mean=_cell(ev["ap50"]),
        sizes=sizes,
        best_iou=_cell(ev["mean_best_iou"]),
        sha=report["sha256"],
    )


def with_card_section(card: str, section: str) -> str:
    """``card`` with its ``dcn-attn-sample`` section replaced by (or, absent, followed by)
    ``section``; everything before the section is kept byte for byte."""
    index = card.find("\n" + CARD_HEADING)
    head = card if index < 0 else card[: index + 1]
    return head.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"

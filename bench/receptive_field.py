"""Seconds per unit of ``receptive-field``'s analysis: the gradient forward, the batched backward
(ERF + gradient weights of the 9/81/729 sampling points) and the saliency search, with the
saliency search's masked forwards per unit (max / mean, budget
:data:`~dcn_inspect.analysis.receptive_field.saliency.MAX_FORWARDS_PER_UNIT`) and the relative
error it reached (max / mean over the units with a region, default bound 0.1).

Issue 13 asks for seconds per unit for the bundled model on a bundled image and for a
ResNet-50-DCN (mmdetection layout, random weights) at 800x1067, target <= 1 s per unit for the
latter on a 2-core CPU. Batching is measured against one unit per backward, interleaved, in one
process. The machine's load average is printed with the numbers: on a shared machine it
dominates them.

    # both models, ERF + weights; saliency on the bundled model
    .venv/bin/python bench/receptive_field.py
    .venv/bin/python bench/receptive_field.py --only bundled --repeats 3
    # the saliency search on ResNet-50 too (slow: up to 12 masked 800x1067 forwards per unit)
    .venv/bin/python bench/receptive_field.py --only resnet --units 2 --saliency
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from dcn_inspect.analysis.receptive_field import receptive_fields
from dcn_inspect.analysis.receptive_field.saliency import (
    DEFAULT_SALIENCY_ERROR,
    MAX_FORWARDS_PER_UNIT,
    saliency_cost,
)
from dcn_inspect.capture.gradients import GradientForward
from dcn_inspect.capture.selection import select_layers
from dcn_inspect.io.images import load_image, to_model_input
from dcn_inspect.models.loading import load_model


def _load() -> str:
    try:
        one, five, _ = os.getloadavg()
        return f"load average {one:.1f} (1 min), {five:.1f} (5 min) on {os.cpu_count()} CPU(s)"
    except OSError:
        return "load average unknown"


def _time(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _warm_up(model, images: torch.Tensor, units: torch.Tensor, batch_size: int) -> None:
    """First-call costs (allocator, kernels, thread pool), untimed: one forward and a backward
    by each strategy."""
    warm = GradientForward(model, images)
    warm_levels = [
        r.name
        for r in reversed(select_layers(warm.deformable_records(), None, None, default_count=3))
    ]
    for strategy, size in (("replicate", batch_size), ("replicate", 1), ("vmap", batch_size)):
        list(
            warm.backward_units(
                warm_levels[0], units[:2], None, warm_levels, min(size, 2), strategy=strategy
            )
        )


def _saliency_seconds(
    forward: GradientForward, records, units, original_hw, std, batch_size: int
) -> Tuple[float, Dict]:
    """The saliency search's share of ``receptive_fields`` (with it minus without it) and its
    cost (:func:`~dcn_inspect.analysis.receptive_field.saliency.saliency_cost`)."""
    found = []
    with_search = _time(
        lambda: found.append(
            receptive_fields(forward, records, units, original_hw, std, batch_size=batch_size)
        )
    )
    without = _time(
        lambda: receptive_fields(
            forward, records, units, original_hw, std, saliency_error=None, batch_size=batch_size
        )
    )
    return with_search - without, saliency_cost(found[0].saliency)


def _time_stages(
    loaded, images, original_hw, units, batch_size: int, repeats: int, saliency: bool
) -> Tuple[Dict[str, List[float]], GradientForward, List[str]]:
    """Seconds of each stage, ``repeats`` times (the backward strategies interleaved), with the
    last forward and its followed layers."""
    stages = ("forward", "batched", "single", "vmap", "saliency", "saliency_cost")
    times: Dict[str, List] = {stage: [] for stage in stages}
    forward: Optional[GradientForward] = None
    levels: List[str] = []
    for _ in range(repeats):
        started = time.perf_counter()
        forward = GradientForward(loaded.model, images)
        times["forward"].append(time.perf_counter() - started)
        records = list(
            reversed(select_layers(forward.deformable_records(), None, None, default_count=3))
        )
        levels = [r.name for r in records]

        def backward(size: int, strategy: str = "replicate") -> float:
            return _time(
                lambda: list(
                    forward.backward_units(levels[0], units, None, levels, size, strategy=strategy)
                )
            )

        times["batched"].append(backward(batch_size))
        times["single"].append(backward(1))
        times["vmap"].append(backward(batch_size, "vmap"))
        if saliency:
            seconds, cost = _saliency_seconds(
                forward, records, units, original_hw, loaded.preprocess.std, batch_size
            )
            times["saliency"].append(seconds)
            times["saliency_cost"] = [cost]  # the same boxes every repeat
    assert forward is not None
    return times, forward, levels


def _print_result(
    label: str,
    result: Dict[str, float],
    forward: GradientForward,
    images: torch.Tensor,
    levels: List[str],
    count: int,
    batch_size: int,
) -> None:
    shape = "x".join(str(v) for v in images.shape[-2:])
    print(
        f"{label}: model input {shape}, {count} units of {levels[0]} "
        f"(levels {', '.join(levels)}), batch {batch_size}, {torch.get_num_threads()} thread(s)"
    )
    print(f"  gradient forward (once per image): {result['forward_s']:.2f} s")
    copies = forward.replicas(batch_size, layer=levels[0])
    budget = forward.memory_budget(gradients=True)
    print(
        f"  saved activations of one image: {forward.saved_bytes / 1024**2:.0f} MiB -> {copies} "
        f"copies per batched backward (budget {budget / 1024**2:.0f} MiB)"
    )
    batched, single = result["backward_per_unit_s"], result["backward_one_at_a_time_per_unit_s"]
    print(
        f"  ERF + gradient weights: {batched:.2f} s per unit batched ({copies} copies per "
        f"forward+backward); one unit per backward {single:.2f} s; is_grads_batched (vmap) "
        f"{result['backward_vmap_per_unit_s']:.2f} s (batched / one-at-a-time = "
        f"{batched / single:.2f})"
    )
    if "saliency_per_unit_s" in result:
        print(f"  saliency search: {result['saliency_per_unit_s']:.2f} s per unit")
        error = result["saliency_error_max"]
        reached = (
            "no unit with a region"
            if error is None
            else f"max {error:.4f}, mean {result['saliency_error_mean']:.4f} over "
            f"{result['saliency_units_with_region']} unit(s) with a region "
            f"(bound {DEFAULT_SALIENCY_ERROR:g})"
        )
        print(
            f"  saliency masked forwards per unit: max {result['saliency_forwards_max']}, mean "
            f"{result['saliency_forwards_mean']:.1f} (budget {MAX_FORWARDS_PER_UNIT}); relative "
            f"error reached: {reached}"
        )
    per_unit = batched + result.get("saliency_per_unit_s", 0.0) + result["forward_s"] / count
    print(f"  total per unit ({count} units per image, forward shared): {per_unit:.2f} s")


def bench_model(
    label: str,
    loaded,
    images: torch.Tensor,
    original_hw,
    units: torch.Tensor,
    batch_size: int,
    repeats: int,
    saliency: bool,
) -> Dict[str, float]:
    """Median seconds of each stage over ``repeats`` (batched and one-unit backwards
    interleaved)."""
    _warm_up(loaded.model, images, units, batch_size)
    times, forward, levels = _time_stages(
        loaded, images, original_hw, units, batch_size, repeats, saliency
    )
    median = lambda values: sorted(values)[len(values) // 2]  # noqa: E731
    count = int(units.shape[0])
    result = {
        "forward_s": median(times["forward"]),
        "backward_per_unit_s": median(times["batched"]) / count,
        "backward_one_at_a_time_per_unit_s": median(times["single"]) / count,
        "backward_vmap_per_unit_s": median(times["vmap"]) / count,
    }
    if saliency:
        result["saliency_per_unit_s"] = median(times["saliency"]) / count
        cost = times["saliency_cost"][0]
        result["saliency_forwards_max"] = cost["forwards_per_unit"]["max"]
        result["saliency_forwards_mean"] = cost["forwards_per_unit"]["mean"]
        result["saliency_error_max"] = cost["error_reached"]["max"]
        result["saliency_error_mean"] = cost["error_reached"]["mean"]
        result["saliency_units_with_region"] = cost["units_with_region"]
    _print_result(label, result, forward, images, levels, count, batch_size)
    return result


def bundled(args: argparse.Namespace) -> None:
    from dcn_inspect.io.datasets import bundled_images

    path = (
        next(p for p in bundled_images() if p.name == "scene_04.jpg")
        if args.image is None
        else Path(args.image)
    )
    loaded = load_model("dcn-sample")
    image = load_image(path)
    model_input = to_model_input(image, loaded.preprocess)
    units = torch.tensor([[1, 1], [29, 8], [20, 8], [15, 12], [12, 21], [17, 16]])[: args.units]
    bench_model(
        f"dcn-sample on {path.name}",
        loaded,
        model_input.tensor,
        model_input.original_hw,
        units,
        args.batch_size,
        args.repeats,
        saliency=True,
    )


def resnet(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    loaded = load_model(
        "resnet50-dcn-mmdet"
    )  # random weights; offset branches get small random weights so offsets are not all zero
    with torch.no_grad():
        for module in loaded.model.modules():
            if hasattr(module, "conv_offset"):
                torch.nn.init.normal_(module.conv_offset.weight, std=0.01)
    images = torch.randn(1, 3, 800, 1067)
    units = torch.tensor(
        [[12, 16], [5, 5], [20, 30], [12, 20], [3, 28], [22, 2], [8, 9], [17, 25]]
    )[: args.units]
    bench_model(
        "resnet50-dcn-mmdet (random weights) at 800x1067",
        loaded,
        images,
        (800, 1067),
        units,
        args.batch_size,
        args.repeats,
        saliency=args.saliency,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", choices=["bundled", "resnet"], default=None)
    parser.add_argument("--units", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--saliency",
        action="store_true",
        help="Also time the saliency search on ResNet-50 (up to 12 masked 800x1067 forwards per "
        "unit) and print its forwards per unit and error reached.",
    )
    parser.add_argument(
        "--image",
        default=None,
        help="Image for the bundled model (default: the bundled scene_04.jpg).",
    )
    args = parser.parse_args()
    print(_load())
    if args.only in (None, "bundled"):
        bundled(args)
    if args.only in (None, "resnet"):
        resnet(args)
    print(_load())


if __name__ == "__main__":
    main()

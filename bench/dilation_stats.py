"""Speed of ``dcn-inspect dilation-stats``: images/s of the whole command and of the model's
forward alone, and the overheads on top of the forward (goals, issue #15: offset capture at most
5 %, statistics at most 10 % of the forward).

Datasets: the bundled demo dataset (when installed) and a generated set of N synthetic scenes
(``dcn_inspect.io.datasets.synthetic.write_dataset``, 256x256, default 200 images). Model:
``--model`` (default dcn-sample; without its trained weights the architecture is built with its
initial weights, which runs at the same speed).

    .venv/bin/python bench/dilation_stats.py                 # bundled + 200 generated images
    .venv/bin/python bench/dilation_stats.py --n 50 --batch-size 4 --workers 2

Per dataset, on the same preloaded batches, after one warm-up batch, ``--repeats`` rounds; in
each round every batch is timed three ways back to back (interleaved, so a busy machine slows
all three alike), and the medians over rounds are reported:

- ``forward``: ``model(batch)`` under ``torch.no_grad``;
- ``forward+capture``: the same inside :func:`dcn_inspect.capture.session.capture_offsets`, frames
  tracked only for the first batch of each input size, as the command does (reported in total
  and for the batches without frame tracking);
- ``capture set-up``: :func:`~dcn_inspect.capture.session.capture_offsets` entered and left
  without a forward (the per-batch bookkeeping: finding the deformable layers, installing the
  hooks);
- ``statistics``: :meth:`DilationAccumulator.add` on the captured offsets (per-unit dilation,
  categories, streaming statistics, per-image sums for the bootstrap; held batches folded at
  the end of each round);
- ``command``: :func:`dcn_inspect.commands.dilation_stats.dilation_stats` end to end (decoding in
  the DataLoader, forward, statistics, bootstrap intervals, outputs).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from dcn_inspect.analysis.dilation_stats import DilationAccumulator
from dcn_inspect.analysis.size_categories import NAMED_THRESHOLDS
from dcn_inspect.capture.session import capture_offsets
from dcn_inspect.commands.dilation_stats import dilation_stats, size_batches
from dcn_inspect.core.errors import InputError
from dcn_inspect.io.annotations import load_dataset
from dcn_inspect.io.images import load_image, model_input_size, to_model_input
from dcn_inspect.models import registry
from dcn_inspect.models.loaded_model import LoadedModel
from dcn_inspect.models.loading import load_model


def get_model(spec: str, device: str) -> LoadedModel:
    try:
        return load_model(spec, None, device)
    except InputError as exc:
        if spec not in registry.names():
            raise
        print(f"note: {exc}; timing the {spec} architecture with its initial weights")
        arch = registry.get(spec)
        model = arch.build().eval().to(device)
        return LoadedModel(
            model, spec, arch.name, dict(arch.default_config), arch.preprocess, "registered"
        )


def preload(
    dataset: Path, loaded: LoadedModel, batch_size: int, device: str
) -> List[Tuple[torch.Tensor, list]]:
    data = load_dataset(dataset)
    entries = [e for e in data.images if e.path is not None]
    sizes = [model_input_size((e.height, e.width), loaded.preprocess)[1] for e in entries]
    batches = []
    for positions in size_batches(sizes, batch_size):
        chosen = [entries[p] for p in positions]
        tensors = [to_model_input(load_image(e.path), loaded.preprocess).tensor[0] for e in chosen]
        batches.append((torch.stack(tensors).to(device), chosen))
    return batches


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(device: str, call) -> float:
    _sync(device)
    tick = time.perf_counter()
    call()
    _sync(device)
    return time.perf_counter() - tick


def bench(
    dataset: Path,
    label: str,
    loaded: LoadedModel,
    batch_size: int,
    workers: int,
    device: str,
    repeats: int,
) -> None:
    batches = preload(dataset, loaded, batch_size, device)
    images = sum(len(chosen) for _, chosen in batches)
    model = loaded.model
    # Per round: forward, capture, capture of untracked batches, forward of those, statistics.
    rounds = []
    with torch.no_grad():
        model(batches[0][0])  # warm-up (native ops, allocator)
        for _ in range(repeats):
            accumulator = DilationAccumulator(
                NAMED_THRESHOLDS["paper"], "cells", False, torch.device(device)
            )
            forward = capture = untracked_capture = untracked_forward = stats = 0.0
            for tensor, chosen in batches:
                input_hw = (int(tensor.shape[-2]), int(tensor.shape[-1]))
                track = accumulator.needs_frames(input_hw)
                plain = _timed(device, lambda: model(tensor))
                holder = {}

                def captured() -> None:
                    with capture_offsets(model, track_frames=track) as capture_:
                        capture_.watch_input(tensor)
                        model(tensor)
                    holder["records"] = list(capture_.convs.values())

                hooked = _timed(device, captured)
                stats += _timed(
                    device,
                    lambda: accumulator.add(
                        holder["records"], chosen, list(range(len(chosen))), input_hw
                    ),
                )
                forward += plain
                capture += hooked
                if not track:
                    untracked_forward += plain
                    untracked_capture += hooked
            fold = getattr(
                accumulator, "flush", None
            )  # small batches are held and folded together (none in older versions)
            if fold is not None:
                stats += _timed(device, fold)
            rounds.append((forward, capture, untracked_capture, untracked_forward, stats))
        # The capture's own bookkeeping without a forward (hooks installed and removed): the part
        # of the capture overhead that does not depend on the model's size.
        tensor = batches[0][0]

        def bookkeeping() -> None:
            with capture_offsets(model, track_frames=False) as capture_:
                capture_.watch_input(tensor)

        setup = statistics.median(_timed(device, bookkeeping) for _ in range(50))

    best_command = float("inf")
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as out:
            tick = time.perf_counter()
            dilation_stats(
                dataset,
                model=loaded,
                out=Path(out),
                batch_size=batch_size,
                workers=workers,
                device=device,
                progress=False,
            )
            best_command = min(best_command, time.perf_counter() - tick)

    forward = statistics.median(r[0] for r in rounds)
    capture_share = statistics.median((r[1] - r[0]) / r[0] for r in rounds)
    untracked = [(r[2] - r[3]) / r[3] for r in rounds if r[3] > 0]
    stats_share = statistics.median(r[4] / r[0] for r in rounds)
    print(
        f"\n{label}: {images} images in {len(batches)} batches, batch size {batch_size}, "
        f"{workers} worker(s), device {device}, median of {repeats} interleaved rounds"
    )
    print(
        f"  forward alone     {images / forward:8.2f} images/s  "
        f"({1000 * forward / images:7.2f} ms/image)"
    )
    print(
        f"  offset capture    {100 * capture_share:5.1f} % of the forward (goal <= 5 %)"
        + (
            f"; {100 * statistics.median(untracked):5.1f} % "
            "on batches of an input size already seen"
            if untracked
            else ""
        )
    )
    print(
        f"  capture set-up    {1000 * setup:7.3f} ms per batch "
        "(hooks installed and removed, no forward) = "
        f"{100 * setup * len(batches) / forward:5.1f} % of the forward"
    )
    print(
        f"  statistics        {100 * stats_share:5.1f} % of the forward (goal <= 10 %), "
        f"{1000 * statistics.median(r[4] for r in rounds) / images:7.2f} ms/image"
    )
    print(
        f"  whole command     {images / best_command:8.2f} images/s  "
        f"({1000 * best_command / images:7.2f} ms/image, best of {repeats})"
    )


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dcn-sample")
    parser.add_argument(
        "--n", type=int, default=200, help="generated images (0: skip the generated set)"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = get_model(args.model, args.device)
    print(
        f"model {loaded.name} ({loaded.source}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    from dcn_inspect.ops import backend_info

    print(f"ops backend: {backend_info().name}")
    try:
        from dcn_inspect.io.datasets import bundled_dataset_path

        bundled: Optional[Path] = bundled_dataset_path()
    except ImportError:
        bundled = None
    if bundled is not None and Path(bundled).exists():
        bench(
            Path(bundled),
            "bundled demo dataset",
            loaded,
            args.batch_size,
            args.workers,
            args.device,
            args.repeats,
        )
    else:
        print("bundled demo dataset not installed: skipped")
    if args.n > 0:
        from dcn_inspect.io.datasets.synthetic import write_dataset

        with tempfile.TemporaryDirectory() as tmp:
            path = write_dataset(Path(tmp) / "generated", args.n, seed=0)
            bench(
                path,
                f"{args.n} generated scenes",
                loaded,
                args.batch_size,
                args.workers,
                args.device,
                args.repeats,
            )


if __name__ == "__main__":
    main()

"""Reproduce the bundled sample weights: ``python sample_weights/train.py``.

Trains ``dcn-sample`` (deformable) and ``dcn-sample-dilated`` (baseline) with the same recipe
and seed, evaluates both on held-out scenes from another seed, writes ``dcn_sample.pt``,
``dcn_sample_dilated.pt`` and their ``*.metrics.json`` next to this file, then renders the
results into ``MODEL_CARD.md`` (``--card-only`` re-renders it from the metrics files,
``--reevaluate`` evaluates the saved weights again first).
Each architecture alone: ``python sample_weights/train.py --arch ARCH``.
The recipe itself is ``sample_weights/recipe.py`` (beside this file; not part of the package).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from recipe import (
    TrainConfig,
    dilation_differences_markdown,
    dilation_markdown,
    metrics_markdown,
    reevaluate,
    train_and_save,
    weights_file_name,
)

from dcn_inspect.outputs import write_text

HERE = Path(__file__).resolve().parent
ARCHS = ("dcn-sample", "dcn-sample-dilated")
CARD_TEMPLATE = HERE / "MODEL_CARD.template.md"


def render_card(out: Path) -> Path:
    """Fill MODEL_CARD.template.md with the metrics files' numbers -> MODEL_CARD.md."""
    reports = [json.loads((out / weights_file_name(arch)).with_suffix(".metrics.json").read_text()) for arch in ARCHS]
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
    }
    card = CARD_TEMPLATE.read_text(encoding="utf-8").format(**fields)
    write_text(out / "MODEL_CARD.md", card)
    return out / "MODEL_CARD.md"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("--eval-seed", type=int, default=1000, help="seed of the held-out evaluation scenes")
    parser.add_argument("--eval-images", type=int, default=200)
    parser.add_argument("--steps", type=int, default=0, help="training steps (0: the recipe's default)")
    parser.add_argument("--arch", action="append", choices=ARCHS, help="train only this one (repeatable); default: both")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--card-only", action="store_true", help="only re-render MODEL_CARD.md from the metrics files")
    parser.add_argument("--reevaluate", action="store_true", help="evaluate the saved weights again (no training), then the card")
    args = parser.parse_args()
    if args.eval_seed == args.seed:
        parser.error(f"--eval-seed {args.eval_seed}: must differ from --seed so the evaluation scenes are unseen")
    if args.reevaluate:
        for arch in args.arch or ARCHS:
            reevaluate(args.out / weights_file_name(arch), args.eval_images)
    elif not args.card_only:
        for arch in args.arch or ARCHS:
            config = TrainConfig(arch=arch, seed=args.seed, threads=args.threads)
            if args.steps:
                config.steps = args.steps
            result = train_and_save(config, args.out / weights_file_name(arch), args.eval_seed, args.eval_images)
            metrics = result.metrics["eval"]
            print(f"{arch}: train {result.metrics['train_seconds']} s, mIoU {metrics['seg_miou']:.3f}, RoI accuracy {metrics['roi_accuracy']:.3f}")
    if all((args.out / weights_file_name(arch)).with_suffix(".metrics.json").exists() for arch in ARCHS):
        print(f"wrote {render_card(args.out)}")


if __name__ == "__main__":
    main()

"""Reproduce the bundled sample weights: ``python sample_weights/train.py``.

Trains ``dcn-sample`` (deformable) and ``dcn-sample-dilated`` (baseline) with the same recipe
and seed, evaluates both on held-out scenes from another seed, writes ``dcn_sample.pt``,
``dcn_sample_dilated.pt`` and their ``*.metrics.json`` next to this file, then renders the
results into ``MODEL_CARD.md`` (``--card-only`` re-renders it from the metrics files,
``--reevaluate`` evaluates the saved weights again first).
Each architecture alone: ``python sample_weights/train.py --arch ARCH``. Then
``--finetune-head`` fine-tunes the R-FCN head's offset branch of ``dcn_sample.pt`` in place
(bounded offsets, everything else frozen; see ``HeadFinetuneConfig`` in ``head_finetune.py``),
as the shipped file was. The recipe itself is ``sample_weights/recipe.py``, the card's tables
``model_card.py`` (beside this file; not part of the package).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from head_finetune import HeadFinetuneConfig, finetune_and_save
from model_card import render_card
from recipe import TrainConfig, reevaluate, train_and_save, weights_file_name

HERE = Path(__file__).resolve().parent
#: The deformable model, then its dilated baseline (the model card's order).
ARCHS = ("dcn-sample", "dcn-sample-dilated")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument(
        "--eval-seed", type=int, default=1000, help="seed of the held-out evaluation scenes"
    )
    parser.add_argument("--eval-images", type=int, default=200)
    parser.add_argument(
        "--steps", type=int, default=0, help="training steps (0: the recipe's default)"
    )
    parser.add_argument(
        "--arch",
        action="append",
        choices=ARCHS,
        help="train only this one (repeatable); default: both",
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0: torch's default)"
    )
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument(
        "--card-only",
        action="store_true",
        help="only re-render MODEL_CARD.md from the metrics files",
    )
    parser.add_argument(
        "--reevaluate",
        action="store_true",
        help="evaluate the saved weights again (no training), then the card",
    )
    parser.add_argument(
        "--finetune-head",
        action="store_true",
        help="fine-tune the R-FCN offset branch of dcn_sample.pt in place, then the card",
    )
    args = parser.parse_args()
    if args.eval_seed == args.seed:
        parser.error(
            f"--eval-seed {args.eval_seed}: must differ from --seed "
            "so the evaluation scenes are unseen"
        )
    if args.finetune_head:
        config = HeadFinetuneConfig(seed=args.seed, threads=args.threads or 1)
        if args.steps:
            config.steps = args.steps
        path = args.out / weights_file_name("dcn-sample")
        report = finetune_and_save(config, path, path, args.eval_seed, args.eval_images)
        fg = report["eval"]["foreground"]["all"]
        print(
            f"dcn-sample head: fine-tune {report['head_finetune']['train_seconds']} s, "
            f"RoI accuracy {report['eval']['roi_accuracy']:.3f}, "
            f"foreground {fg['fg_regular']:.3f} -> {fg['fg_deformed']:.3f}"
        )
    elif args.reevaluate:
        for arch in args.arch or ARCHS:
            reevaluate(args.out / weights_file_name(arch), args.eval_images)
    elif not args.card_only:
        for arch in args.arch or ARCHS:
            config = TrainConfig(arch=arch, seed=args.seed, threads=args.threads)
            if args.steps:
                config.steps = args.steps
            result = train_and_save(
                config, args.out / weights_file_name(arch), args.eval_seed, args.eval_images
            )
            metrics = result.metrics["eval"]
            print(
                f"{arch}: train {result.metrics['train_seconds']} s, "
                f"mIoU {metrics['seg_miou']:.3f}, RoI accuracy {metrics['roi_accuracy']:.3f}"
            )
    if all(
        (args.out / weights_file_name(arch)).with_suffix(".metrics.json").exists() for arch in ARCHS
    ):
        print(f"wrote {render_card(args.out, ARCHS)}")


if __name__ == "__main__":
    main()

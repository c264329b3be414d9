"""Reproduce the bundled sample weights: ``python sample_weights/train.py``.

Trains ``dcn-sample`` (deformable) and ``dcn-sample-dilated`` (baseline) with the same recipe
and seed, evaluates both on held-out scenes from another seed, writes ``dcn_sample.pt``,
``dcn_sample_dilated.pt`` and their ``*.metrics.json`` next to this file, then renders the
results into ``MODEL_CARD.md`` (``--card-only`` re-renders it from the metrics files,
``--reevaluate`` evaluates the saved weights again first).
Each architecture alone: ``python sample_weights/train.py --arch ARCH``. Then
``--finetune-head`` fine-tunes the R-FCN head's offset branch of ``dcn_sample.pt`` in place
(bounded offsets, everything else frozen; see ``HeadFinetuneConfig``), as the shipped file was.
The recipe itself is ``sample_weights/recipe.py`` (beside this file; not part of the package).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from recipe import (
    HeadFinetuneConfig,
    TrainConfig,
    dilation_differences_markdown,
    dilation_markdown,
    finetune_and_save,
    foreground_markdown,
    metrics_markdown,
    reevaluate,
    train_and_save,
    weights_file_name,
)

from dcn_inspect.io.outputs import write_text

HERE = Path(__file__).resolve().parent
ARCHS = ("dcn-sample", "dcn-sample-dilated")
CARD_TEMPLATE = HERE / "MODEL_CARD.template.md"


def render_card(out: Path) -> Path:
    """Fill MODEL_CARD.template.md with the metrics files' numbers -> MODEL_CARD.md."""
    reports = [
        json.loads((out / weights_file_name(arch)).with_suffix(".metrics.json").read_text())
        for arch in ARCHS
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
    write_text(out / "MODEL_CARD.md", card)
    return out / "MODEL_CARD.md"


def finetune_markdown(report: dict) -> str:
    """What the head fine-tune changed (empty for weights that were not fine-tuned)."""
    finetune = report.get("head_finetune")
    if not finetune:
        return "The R-FCN head was trained with the rest of the network (no separate fine-tune)."
    before, after = finetune["before"], report["eval"]
    fg_before, fg_after = before["foreground"]["all"], after["foreground"]["all"]
    mag_before, mag_after = before["roi_offset_magnitude"], after["roi_offset_magnitude"]
    return "\n".join(
        [
            f"Fine-tune of `rfcn_offset` only: `{json.dumps(finetune['config'], sort_keys=True)}`, from the base weights "
            f"`{finetune['base_sha256']}`; {finetune['train_seconds']} s of training ({finetune['wall_seconds']} s with the "
            f"evaluations), {finetune['threads']} CPU thread.",
            "",
            "| head | RoI acc. | \\|normalised offset\\| p50 / p90 / max | regular bins on mask | deformed bins on mask | gain [95 % CI] |",
            "| --- | --- | --- | --- | --- | --- |",
            f"| base (unbounded) | {before['roi_accuracy']:.3f} | {mag_before['p50']:.2f} / {mag_before['p90']:.2f} / {mag_before['max']:.2f} | "
            f"{100 * fg_before['fg_regular']:.1f} % | {100 * fg_before['fg_deformed']:.1f} % | {100 * fg_before['gain']:+.1f} pt "
            f"[{100 * fg_before['gain_ci_low']:+.1f}, {100 * fg_before['gain_ci_high']:+.1f}] | {100 * fg_before['improved']:.0f} % |",
            f"| shipped (fine-tuned, bounded) | {after['roi_accuracy']:.3f} | {mag_after['p50']:.2f} / {mag_after['p90']:.2f} / {mag_after['max']:.2f} | "
            f"{100 * fg_after['fg_regular']:.1f} % | {100 * fg_after['fg_deformed']:.1f} % | {100 * fg_after['gain']:+.1f} pt "
            f"[{100 * fg_after['gain_ci_low']:+.1f}, {100 * fg_after['gain_ci_high']:+.1f}] | {100 * fg_after['improved']:.0f} % |",
        ]
    )


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
            f"--eval-seed {args.eval_seed}: must differ from --seed so the evaluation scenes are unseen"
        )
    if args.finetune_head:
        config = HeadFinetuneConfig(seed=args.seed, threads=args.threads or 1)
        if args.steps:
            config.steps = args.steps
        path = args.out / weights_file_name("dcn-sample")
        report = finetune_and_save(config, path, path, args.eval_seed, args.eval_images)
        fg = report["eval"]["foreground"]["all"]
        print(
            f"dcn-sample head: fine-tune {report['head_finetune']['train_seconds']} s, RoI accuracy {report['eval']['roi_accuracy']:.3f}, "
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
                f"{arch}: train {result.metrics['train_seconds']} s, mIoU {metrics['seg_miou']:.3f}, RoI accuracy {metrics['roi_accuracy']:.3f}"
            )
    if all(
        (args.out / weights_file_name(arch)).with_suffix(".metrics.json").exists() for arch in ARCHS
    ):
        print(f"wrote {render_card(args.out)}")


if __name__ == "__main__":
    main()

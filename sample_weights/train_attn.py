"""Reproduce the bundled ``dcn-attn-sample`` weights: ``python sample_weights/train_attn.py``.

Trains the Deformable-DETR-style detector (:mod:`dcn_inspect.models.attention_net`) with the
recipe of ``attn_recipe.py`` (beside this file) on one CPU thread, evaluates it on held-out
scenes (seed 1000), writes ``dcn_attn_sample.pt`` and ``dcn_attn_sample.metrics.json`` next to
this file and puts the model's section into ``MODEL_CARD.md`` (the card's other sections are
kept byte for byte). ``--card-only`` re-renders that section from the metrics file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from attn_recipe import AttnTrainConfig, card_section, train_and_save, with_card_section

from dcn_inspect.io.outputs import write_text

HERE = Path(__file__).resolve().parent
WEIGHTS = "dcn_attn_sample.pt"


def write_card(out: Path) -> Path:
    """Render the ``dcn-attn-sample`` section of ``out/MODEL_CARD.md`` from its metrics file."""
    report = json.loads((out / WEIGHTS).with_suffix(".metrics.json").read_text(encoding="utf-8"))
    card_path = out / "MODEL_CARD.md"
    card = card_path.read_text(encoding="utf-8") if card_path.exists() else ""
    write_text(card_path, with_card_section(card, card_section(report)))
    return card_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = AttnTrainConfig()
    parser.add_argument("--seed", type=int, default=defaults.seed, help="training seed")
    parser.add_argument("--eval-seed", type=int, default=1000, help="held-out scenes' seed")
    parser.add_argument("--eval-images", type=int, default=200)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--pool-scenes", type=int, default=defaults.pool_scenes)
    parser.add_argument("--threads", type=int, default=defaults.threads, help="torch threads")
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--card-only", action="store_true", help="only re-render the card")
    args = parser.parse_args()
    if not args.card_only:
        config = AttnTrainConfig(
            seed=args.seed, steps=args.steps, pool_scenes=args.pool_scenes, threads=args.threads
        )
        report = train_and_save(
            config,
            args.out / WEIGHTS,
            args.eval_seed,
            args.eval_images,
            log=lambda line: print(line, flush=True),
        )
        print(
            f"dcn-attn-sample: train {report['train_seconds']} s, wall {report['wall_seconds']} s, "
            f"held-out AP50 {report['eval']['ap50']:.3f}",
            flush=True,
        )
    print(f"wrote {write_card(args.out)}")


if __name__ == "__main__":
    main()

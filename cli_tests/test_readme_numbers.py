"""The README's measured numbers are the code's current output: the dilation table (with the
differences its paragraph quotes) and the Fig. 7 foreground table, recomputed from the bundled
weights and demo dataset, must appear in the README as the commands print them."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, List

from dcn_inspect.commands.bins import bins
from dcn_inspect.commands.dilation_stats import dilation_stats

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DEMO = ROOT / "dcn_inspect" / "data" / "demo" / "annotations.json"


def _tables(markdown: str) -> List[List[str]]:
    """Every Markdown table of ``markdown`` as its list of lines (header, rule, rows)."""
    tables: List[List[str]] = []
    current: List[str] = []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line.strip())
        elif current:
            tables.append(current)
            current = []
    return tables


def _readme_table_after(marker: str) -> List[str]:
    """The first README table after the line holding ``marker``."""
    start = README.index(marker)
    return _tables(README[start:])[0]


def _intervals(text: str) -> List[str]:
    return re.findall(r"\[[-+]\d+\.\d+, [-+]\d+\.\d+\]", text)


def test_readme_dilation_table_and_differences_are_the_bundled_models_output(
    tmp_path: Path,
) -> None:
    dilation_stats(out=tmp_path, workers=0, progress=False, figure=False)
    means, differences = _tables((tmp_path / "dilation_table.md").read_text())
    assert _readme_table_after("Effective dilation of `dcn-sample` on the bundled demo") == means
    # The paragraph quotes, in order: medium − small in the three layers, large − medium in the
    # two lower layers then the top one, background − medium in the top layer.
    column = {
        name: [_intervals(row)[i] for row in differences[2:]]
        for i, name in enumerate(["medium-small", "large-medium", "background-medium"])
    }
    quoted = column["medium-small"] + column["large-medium"][1:] + column["large-medium"][:1]
    quoted += column["background-medium"][:1]
    paragraph = README[README.index("The differences (`dilation_differences.csv`)") :]
    paragraph = paragraph.split("\n\n", 1)[0]
    assert _intervals(paragraph) == quoted


def test_readme_fig7_foreground_table_is_the_bundled_models_output(tmp_path: Path) -> None:
    bins([DEMO], out=tmp_path, progress=False)
    (table,) = _tables((tmp_path / "foreground_table.md").read_text())
    assert _readme_table_after("On the bundled demo dataset (20 scenes, 101 objects)") == table
    assert len(table) == 2 + 6  # five classes and `all`


def _attention_means(table: Any, kind: str, layer: str, measure: str, level: Any = None) -> Any:
    rows = table[
        (table["kind"] == kind) & (table["layer"] == layer) & (table["measure"] == measure)
    ]
    if level is not None:
        rows = rows[rows["feature_level"] == level]
    return {row.category: (row.mean, row.std) for row in rows.itertuples()}


def test_readme_attention_table_numbers_are_the_bundled_models_output(tmp_path: Path) -> None:
    """The attention paragraph's numbers: `attention --stats` of dcn-attn-sample on the demo
    dataset (means ± std, the quoted differences, level shares, matched queries)."""
    import json

    import pandas as pd

    from dcn_inspect.commands.attention_stats import attention_stats

    attention_stats(out=tmp_path, progress=False)
    markdown = (tmp_path / "attention_table.md").read_text()

    def first_table_under(heading: str) -> List[str]:
        return _tables(markdown[markdown.index(heading) :])[0]

    assert _readme_table_after("Attention spread of `dcn-attn-sample`'s encoder") == (
        first_table_under("# Attention spread_px (encoder queries)")
    )
    assert _readme_table_after("Weight inside the matched box of its decoder") == (
        first_table_under("# Attention inside (decoder queries)")
    )
    table = pd.read_csv(tmp_path / "attention_table.csv")
    differences = pd.read_csv(tmp_path / "attention_differences.csv")
    paragraph = README[
        README.index("On the bundled demo dataset (20 images, `dcn-inspect attention") :
    ]
    paragraph = " ".join(paragraph.split("\n\n", 1)[0].split())
    enc = _attention_means(table, "encoder", "encoder.1.self_attn", "spread_px")
    quoted = [f"small {enc['small'][0]:.1f} ± {enc['small'][1]:.1f}",
              f"medium {enc['medium'][0]:.1f} ± {enc['medium'][1]:.1f}",
              f"large {enc['large'][0]:.1f} ± {enc['large'][1]:.1f} px",
              f"background ({enc['background'][0]:.1f} ± {enc['background'][1]:.1f})"]  # fmt: skip
    for pair, words in (("medium", "small"), ("large", "medium")):
        row = differences[
            (differences["layer"] == "encoder.1.self_attn")
            & (differences["measure"] == "spread_px")
            & (differences["category_a"] == pair)
            & (differences["category_b"] == words)
        ]
        d, low, high = row[["difference", "ci_low", "ci_high"]].iloc[0]
        quoted.append(f"{pair} − {words} {d:+.2f} [{low:+.2f}, {high:+.2f}]")
    for level, name in ((2, "coarsest level"), (0, "finest")):
        share = _attention_means(table, "encoder", "encoder.1.self_attn", "level_share", level)
        values = [f"{share[c][0]:.2f}" for c in ("small", "medium", "large")]
        quoted.append(f"{name}: {', '.join(values)}")
    rel = _attention_means(table, "encoder", "encoder.1.self_attn", "spread_rel")
    quoted.append("(" + ", ".join(f"{rel[c][0]:.2f}" for c in ("small", "medium", "large")) + ")")
    matches = json.loads((tmp_path / "summary.json").read_text())["decoder_matches"]
    quoted.append(f"{matches['queries']} matched queries (of {matches['boxes']} boxes)")
    last = _attention_means(table, "decoder", "decoder.2.cross_attn", "spread_px")
    quoted.append(", ".join(f"{last[c][0]:.1f}" for c in ("small", "medium", "large")) + " px")
    inside = _attention_means(table, "decoder", "decoder.2.cross_attn", "inside")
    quoted.append(", ".join(f"{inside[c][0]:.2f} ± {inside[c][1]:.2f} {c}"
                            for c in ("small", "medium", "large")))  # fmt: skip
    first = _attention_means(table, "decoder", "decoder.0.cross_attn", "inside")
    quoted.append(f"first layer only {first['small'][0]:.2f}")
    missing = [text for text in quoted if text not in paragraph]
    assert not missing, missing


def test_readme_query_receptive_field_numbers_are_the_bundled_models_output(
    tmp_path: Path,
) -> None:
    from dcn_inspect.commands.receptive_field import query_receptive_field

    image = ROOT / "dcn_inspect" / "data" / "images" / "scene_00.jpg"
    paragraph = README[README.index("On `dcn-attn-sample` (`receptive-field") :]
    paragraph = " ".join(paragraph.split("\n\n", 1)[0].split())
    decoder = query_receptive_field(
        [image], model="dcn-attn-sample", queries="decoder", top=4, out=tmp_path / "d",
        progress=False,
    )  # fmt: skip
    encoder = query_receptive_field(
        [image], model="dcn-attn-sample", queries="encoder", at=["120,170", "20,120"],
        out=tmp_path / "e", progress=False,
    )  # fmt: skip
    import json

    correlations = [
        json.loads(result.summary.read_text())["correlation"] for result in (decoder, encoder)
    ]
    dec, enc = correlations

    def layers(c: Any) -> str:
        return ", ".join(f"{v['spearman']:.2f}" for v in c["per_layer"].values())

    quoted = [
        f"{dec['mean_spearman']:.2f} on average for the four decoder queries "
        f"(per layer {layers(dec)})",
        f"{enc['mean_spearman']:.2f} for the two encoder tokens ({layers(enc)})",
        f"{100 * dec['mean_top_quarter_share']:.0f} % (decoder) and "
        f"{100 * enc['mean_top_quarter_share']:.0f} % (encoder)",
    ]
    missing = [text for text in quoted if text not in paragraph]
    assert not missing, missing


def test_readme_and_model_card_ap50_is_the_bundled_attention_models_output() -> None:
    """`dcn-attn-sample`'s held-out AP50 (README, model card, metrics file) re-evaluated from
    the shipped weights on the 200 held-out scenes (seed 1000)."""
    import json
    import sys

    import torch

    from dcn_inspect.models.loading import load_model

    sys.path.insert(0, str(ROOT / "sample_weights"))  # the recipe lives beside the weights
    from attn_recipe import evaluate, evaluation_scenes

    metrics = json.loads((ROOT / "sample_weights" / "dcn_attn_sample.metrics.json").read_text())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the recipe's evaluation ran on one thread
    try:
        with torch.no_grad():
            result = evaluate(load_model("dcn-attn-sample").model, evaluation_scenes(1000, 200))
    finally:
        torch.set_num_threads(threads)
    assert abs(result["ap50"] - metrics["eval"]["ap50"]) < 1e-9
    quoted = f"{result['ap50']:.3f}"
    assert f"held-out AP50 {quoted}" in README
    card = (ROOT / "sample_weights" / "MODEL_CARD.md").read_text()
    assert f"| {quoted} |" in card

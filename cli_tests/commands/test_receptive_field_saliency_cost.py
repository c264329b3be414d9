"""``receptive-field``'s saliency search costs at most 12 masked forwards per unit, and
``summary.json`` says how many it took and what error it reached, per image and model and, in
the dataset mode, over the dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from dcn_inspect.commands.receptive_field import receptive_field, receptive_field_stats
from dcn_inspect.models.loading import load_model

ROOT = Path(__file__).resolve().parents[2]
IMAGE = ROOT / "dcn_inspect" / "data" / "images" / "scene_04.jpg"


def _masked_images(loaded) -> list:
    """The batch sizes of every forward of ``loaded``'s model."""
    calls: list = []
    loaded.model.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    return calls


def test_summary_counts_the_masked_forwards_each_unit_took_and_the_error_reached(
    tmp_path: Path,
) -> None:
    """Three units of the bundled image under the bundled model: each takes at most 12 masked
    images, summary.json's counts are the regions' own and add up to the images the model was
    fed beyond the same run without a search; the error reached is the CSV's and within the
    bound."""
    at = ["8,8", "64,232", "128,136"]
    searched = load_model("dcn-sample")
    with_search = _masked_images(searched)
    result = receptive_field([IMAGE], model=searched, at=at, out=tmp_path / "a", progress=False)
    plain = load_model("dcn-sample")
    without_search = _masked_images(plain)
    receptive_field(
        [IMAGE], model=plain, at=at, saliency_error=None, out=tmp_path / "b", progress=False
    )
    summary = json.loads(result.summary.read_text())
    image = summary["images"][0]
    evaluations = image["saliency_evaluations"]["model"]
    assert len(evaluations) == 3 and max(evaluations) <= 12
    assert sum(with_search) - sum(without_search) == sum(evaluations)
    cost = image["saliency"]["model"]
    assert cost["searched"] and cost["error_bound"] == 0.1 and cost["max_forwards_per_unit"] == 12
    assert cost["forwards_per_unit"] == {
        "max": max(evaluations),
        "mean": pytest.approx(sum(evaluations) / 3),
    }
    table = pd.read_csv(result.images[0].csv)
    found = table[table["saliency_status"] == "found"]
    assert cost["units_with_region"] == len(found)
    if len(found):
        assert cost["error_reached"]["max"] == pytest.approx(
            found["saliency_error"].max(), abs=1e-6
        )
        assert cost["error_reached"]["mean"] == pytest.approx(
            found["saliency_error"].mean(), abs=1e-6
        )
        assert cost["error_reached"]["max"] <= 0.1


def test_dataset_mode_summary_totals_the_saliency_forwards_and_error_reached(
    tmp_path: Path,
) -> None:
    result = receptive_field_stats(max_images=1, levels=1, out=tmp_path, progress=False)
    saliency = json.loads((result.out_dir / "summary.json").read_text())["saliency"]
    units = pd.read_csv(result.out_dir / "receptive_field_units.csv")
    assert saliency["max_forwards_per_unit"] == 12 and saliency["error_bound"] == 0.1
    assert saliency["units"] == len(units) > 0
    assert 1 <= saliency["forwards_per_unit"]["mean"] <= saliency["forwards_per_unit"]["max"] <= 12
    assert saliency["units_with_region"] == int((units["saliency_status"] == "found").sum())
    if saliency["units_with_region"]:
        assert saliency["error_reached"]["max"] <= 0.1
    layers = saliency["per_layer"]
    assert sum(layer["units"] for layer in layers.values()) == saliency["units"]

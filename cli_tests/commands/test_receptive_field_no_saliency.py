"""``receptive-field --no-saliency``: the ERF and gradient-weighted points alone, with the same
numbers as a full run, one forward per image instead of a saliency search per unit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from dcn_inspect.analysis.receptive_field.table import NOT_SEARCHED
from dcn_inspect.commands.receptive_field import receptive_field, receptive_field_stats
from dcn_inspect.models.loading import load_model

ROOT = Path(__file__).resolve().parents[2]
IMAGE = ROOT / "dcn_inspect" / "data" / "images" / "scene_04.jpg"


def _counted_forwards(loaded) -> list:
    calls = []
    loaded.model.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    return calls


def test_no_saliency_keeps_every_other_number_and_runs_one_forward(tmp_path: Path) -> None:
    searched = load_model("dcn-sample")
    all_forwards = _counted_forwards(searched)
    full = receptive_field(
        [IMAGE], model=searched, at=["64,232", "8,8"], out=tmp_path / "full", progress=False
    )
    loaded = load_model("dcn-sample")
    forwards = _counted_forwards(loaded)
    quick = receptive_field(
        [IMAGE], model=loaded, at=["64,232", "8,8"], saliency_error=None,
        out=tmp_path / "quick", progress=False,
    )  # fmt: skip
    # The gradient forward alone (each unit one backward through its graph: copies would cost
    # more than they save on this model); no masked forwards.
    assert forwards == [1] and len(all_forwards) > 2
    a = pd.read_csv(full.images[0].csv)
    b = pd.read_csv(quick.images[0].csv)
    kept = [c for c in a.columns if not c.startswith("saliency") and c != "model"]
    pd.testing.assert_frame_equal(a[kept], b[kept])
    assert b["saliency_area"].isna().all() and set(b["saliency_status"]) == {NOT_SEARCHED}
    assert a["saliency_area"].notna().any()
    summary = json.loads(quick.summary.read_text())
    assert summary["saliency"]["searched"] is False


def test_dataset_mode_without_saliency_writes_no_area_table(tmp_path: Path) -> None:
    result = receptive_field_stats(max_images=2, saliency_error=None, out=tmp_path, progress=False)
    written = sorted(p.name for p in tmp_path.iterdir())
    assert "saliency_area_table.csv" not in written and "erf_radius_table.csv" in written
    units = pd.read_csv(tmp_path / "receptive_field_units.csv")
    assert set(units["saliency_status"]) == {NOT_SEARCHED}
    assert np.isfinite(units["erf_radius_90"]).all()
    assert "area_csv" not in result.files


def test_the_command_line_refuses_a_saliency_option_with_no_saliency(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "dcn_inspect", "receptive-field", str(IMAGE), "--at", "3,3",
         "--no-saliency", "--saliency-error", "0.2", "--out", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode != 0
    assert (
        done.stderr.strip() == "dcn-inspect: error: --saliency-error is not read with --no-saliency"
    )
    assert not (tmp_path / "o").exists()

"""Outputs are atomic and deterministic."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest

from dcn_inspect.errors import InputError
from dcn_inspect.columns import Column, position
from dcn_inspect.outputs import RunSummary, atomic_path, prepare_out_dir, write_csv


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "result.csv"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half a file")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_existing_file_replaced_only_on_success(tmp_path: Path) -> None:
    target = tmp_path / "result.csv"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("new")
            raise RuntimeError
    assert target.read_text() == "old"
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"


def test_csv_is_plain_reproducible_and_positions_have_fixed_decimals(tmp_path: Path) -> None:
    frame = pd.DataFrame({"x": [1234.56789, -0.00001, float("nan")], "w": [1 / 3, 1e-7, -0.0], "n": [1, 2, 3]})
    columns = [position("x", "a position"), Column("w", "a weight"), Column("n", "a count")]
    write_csv(tmp_path / "a.csv", frame, columns)
    write_csv(tmp_path / "b.csv", frame.copy(), columns)
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    # Six significant digits would write 1234.57 (0.01 px); no negative zero; NaN is empty.
    assert (tmp_path / "a.csv").read_text().splitlines() == ["x,w,n", "1234.5679,0.333333,1", "0.0000,1e-07,2", ",0,3"]
    back = pd.read_csv(tmp_path / "a.csv")
    assert back["x"].tolist()[:2] == [1234.5679, 0.0] and back["n"].tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="differ from their description"):
        write_csv(tmp_path / "c.csv", frame, columns[:2])
    assert not (tmp_path / "c.csv").exists()


def test_out_dir_reused_and_unwritable_reported(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    prepare_out_dir(out)
    assert (out / "keep.txt").read_text() == "mine"
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InputError, match="exists and is not a directory|cannot create"):
        prepare_out_dir(blocker)
    if os.geteuid() != 0:  # root can write anywhere
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        with pytest.raises(InputError, match="not writable"):
            prepare_out_dir(locked)


def test_summary_has_versions_and_parameters(tmp_path: Path) -> None:
    summary = RunSummary("demo", {"grid": 4})
    summary["model"] = {"name": "m"}
    path = summary.write(tmp_path)
    data = json.loads(path.read_text())
    assert data["parameters"] == {"grid": 4}
    assert data["model"] == {"name": "m"}
    assert {"torch", "dcn_inspect", "ops_backend"} <= set(data["versions"])

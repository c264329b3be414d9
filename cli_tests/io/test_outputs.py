"""Outputs are atomic and deterministic."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest

from dcn_inspect.core.columns import Column, position
from dcn_inspect.core.errors import InputError
from dcn_inspect.io.outputs import RunSummary, atomic_path, prepare_out_dir, write_csv


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
    frame = pd.DataFrame(
        {"x": [1234.56789, -0.00001, float("nan")], "w": [1 / 3, 1e-7, -0.0], "n": [1, 2, 3]}
    )
    columns = [position("x", "a position"), Column("w", "a weight"), Column("n", "a count")]
    write_csv(tmp_path / "a.csv", frame, columns)
    write_csv(tmp_path / "b.csv", frame.copy(), columns)
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    # Six significant digits would write 1234.57 (0.01 px); no negative zero; NaN is empty.
    assert (tmp_path / "a.csv").read_text().splitlines() == [
        "x,w,n",
        "1234.5679,0.333333,1",
        "0.0000,1e-07,2",
        ",0,3",
    ]
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
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.geteuid() != 0:  # the real permission error
        with pytest.raises(InputError, match="not writable"):
            prepare_out_dir(locked)
    locked.chmod(0o700)


def test_unwritable_out_dir_reported_even_as_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Root may write anywhere (CI runs as root), so the refusal of write access is simulated."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    refused = []

    def access(path, mode, *args, **kwargs):
        if Path(path) == locked and mode & os.W_OK:
            refused.append(path)
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)
    with pytest.raises(InputError, match="not writable"):
        prepare_out_dir(locked)
    assert refused  # the check asked the operating system about this directory
    assert prepare_out_dir(tmp_path / "free") == tmp_path / "free"


def test_summary_has_versions_and_parameters(tmp_path: Path) -> None:
    summary = RunSummary("demo", {"grid": 4})
    summary["model"] = {"name": "m"}
    path = summary.write(tmp_path)
    data = json.loads(path.read_text())
    assert data["parameters"] == {"grid": 4}
    assert data["model"] == {"name": "m"}
    assert {"torch", "dcn_inspect", "ops_backend"} <= set(data["versions"])


# --------------------------------------------------------------------------------------------
# One run's files: invisible until commit, removed on abort, the directory locked, inputs kept


def _visible(folder: Path) -> list:
    return sorted(p.name for p in folder.iterdir())


def test_run_files_appear_only_at_commit_and_summary_last(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dcn_inspect.io.outputs import RunOutputs, write_text

    renamed = []
    original = os.replace
    monkeypatch.setattr(
        os, "replace", lambda src, dst: renamed.append(Path(dst).name) or original(src, dst)
    )
    with RunOutputs(tmp_path) as run:
        write_text(tmp_path / "summary.json", "{}")
        write_csv(tmp_path / "a.csv", pd.DataFrame({"x": [1]}))
        write_text(tmp_path / "b.md", "b")
        assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == []
        assert sorted(p.name for p in run.pending) == ["a.csv", "b.md", "summary.json"]
    assert _visible(tmp_path) == ["a.csv", "b.md", "summary.json"]
    assert renamed == ["a.csv", "b.md", "summary.json"]


def test_aborted_run_removes_its_files_and_scratch_and_keeps_older_ones(tmp_path: Path) -> None:
    from dcn_inspect.io.outputs import RunOutputs, write_text

    (tmp_path / "a.csv").write_text("previous run")
    with pytest.raises(KeyboardInterrupt):
        with RunOutputs(tmp_path) as run:
            write_csv(tmp_path / "a.csv", pd.DataFrame({"x": [1]}))
            write_text(tmp_path / "new.md", "x")
            fd, scratch = run.scratch_file(tmp_path, ".part.", ".tmp")
            os.write(fd, b"rows")
            os.close(fd)
            raise KeyboardInterrupt
    assert _visible(tmp_path) == ["a.csv"]
    assert (tmp_path / "a.csv").read_text() == "previous run"


def test_a_run_that_created_its_directory_removes_it_on_abort(tmp_path: Path) -> None:
    from dcn_inspect.io.outputs import RunOutputs, write_text

    out = prepare_out_dir(tmp_path / "new")
    run = RunOutputs(out, created=True)
    write_text(out / "x.txt", "x")
    run.abort()
    assert not out.exists()


def test_second_run_on_a_locked_directory_is_refused_until_the_first_ends(tmp_path: Path) -> None:
    from dcn_inspect.io.outputs import RunOutputs

    first = RunOutputs(tmp_path)
    with pytest.raises(
        InputError, match="another dcn-inspect run is writing into this directory"
    ) as info:
        RunOutputs(tmp_path)
    assert info.value.param == "out"
    first.commit()
    RunOutputs(tmp_path).commit()  # free again
    assert _visible(tmp_path) == []


def test_writing_onto_an_input_is_refused_and_the_input_kept(tmp_path: Path) -> None:
    from dcn_inspect.io.outputs import RunOutputs, write_text

    source = tmp_path / "summary.json"
    source.write_text("the dataset")
    link = tmp_path / "alias.json"
    os.link(source, link)  # the same file under another name is the same input
    with pytest.raises(
        InputError, match=r"alias\.json: is an input of this run \(dataset .*summary\.json\)"
    ):
        with RunOutputs(tmp_path) as run:
            run.protect("dataset", [source])
            write_text(link, "{}")
    assert source.read_text() == "the dataset"
    assert _visible(tmp_path) == ["alias.json", "summary.json"]


def test_a_failed_write_is_one_line_naming_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    def full(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_csv", full)
    with pytest.raises(InputError) as info:
        write_csv(tmp_path / "t.csv", pd.DataFrame({"x": [1]}))
    assert (
        str(info.value)
        == f"{tmp_path / 't.csv'}: cannot write (no space left on the device); nothing was written"
    )
    assert _visible(tmp_path) == []


@pytest.mark.parametrize("blocked", ["summary.json", "offsets.npz"])
def test_commit_checks_every_target_before_the_first_file_moves(
    tmp_path: Path, blocked: str
) -> None:
    """A directory where an output goes (``summary.json``, ``save_offsets``) stops the run before
    any file is renamed: "nothing was written" is true."""
    from dcn_inspect.io.outputs import RunOutputs, write_npz, write_text

    (tmp_path / blocked).mkdir()
    (tmp_path / "a.csv").write_text("previous run")
    with pytest.raises(InputError) as info:
        with RunOutputs(tmp_path):
            write_csv(tmp_path / "a.csv", pd.DataFrame({"x": [1]}))
            write_text(tmp_path / "b.png", "figure")
            write_npz(tmp_path / "offsets.npz", {"x": [1]})
            write_text(tmp_path / "summary.json", "{}")
    assert str(info.value) == (
        f"{tmp_path / blocked}: cannot write (Is a directory); nothing was written"
    )
    assert _visible(tmp_path) == sorted(["a.csv", blocked])
    assert (tmp_path / "a.csv").read_text() == "previous run"


@pytest.mark.parametrize("empty", ["", " "])
def test_an_empty_out_is_refused_not_read_as_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, empty: str
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match=r"empty path .*unset shell variable") as info:
        prepare_out_dir(empty)  # type: ignore[arg-type]
    assert info.value.param == "out"
    assert _visible(tmp_path) == []

"""Every bad input gets one clear line and a non-zero exit, no traceback, no output files.

A table of cases over a corpus of broken files generated here. Each case runs the real CLI
entry point (``dcn_inspect.cli.main``) in-process and checks: the exit code, exactly one
``dcn-inspect: error:`` line naming the problem, no traceback, and an output directory with
nothing written in it. The pickle-that-runs-code case also runs as a separate process and
checks that the code did not run. A last group checks determinism: the same command twice
gives byte-identical CSVs and JSON that differs only in timing fields.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch
from PIL import Image

from dcn_inspect.cli import main
from dcn_inspect.cli.app import state
from dcn_inspect.outputs import TIMING_KEYS

TINY_MODEL = '''
import torch
from torch import nn
from dcn_inspect.ops import DeformConv2dPack


class Tiny(nn.Module):
    """Conv stem at stride 2, then three deformable 3x3 convs with dilation 2."""

    def __init__(self, poison: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.d1 = DeformConv2dPack(8, 8, 3, padding=2, dilation=2)
        self.d2 = DeformConv2dPack(8, 8, 3, padding=2, dilation=2)
        self.d3 = DeformConv2dPack(8, 8, 3, padding=2, dilation=2)
        for layer in (self.d1, self.d2, self.d3):
            nn.init.normal_(layer.conv_offset.weight, std=0.05)
        if poison:  # offsets that come out non-finite in the second layer
            with torch.no_grad():
                self.d2.conv_offset.bias.fill_(float("nan"))

    def forward(self, x):
        x = torch.relu(self.stem(x))
        return self.d3(torch.relu(self.d2(torch.relu(self.d1(x)))))


def build():
    torch.manual_seed(0)
    return Tiny()


def build_poisoned():
    torch.manual_seed(0)
    return Tiny(poison=True)
'''


class _Evil:
    """Unpickling this would create a marker file: the loader must refuse it before that."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _image(path: Path, size=(48, 40), mode: str = "RGB") -> Path:
    rng = np.random.default_rng(0)
    array = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(array).convert(mode).save(path)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    root = tmp_path_factory.mktemp("corpus")
    files: Dict[str, Path] = {"root": root}
    (root / "tiny.py").write_text(TINY_MODEL)
    files["model"] = root / "tiny.py"
    files["good"] = _image(root / "good.png")
    files["empty"] = root / "empty.png"
    files["empty"].write_bytes(b"")
    files["text"] = root / "text.png"
    files["text"].write_text("not an image at all")
    whole = _image(root / "whole.png", size=(96, 96)).read_bytes()
    files["truncated"] = root / "truncated.png"
    files["truncated"].write_bytes(whole[: len(whole) // 3])
    files["big"] = _image(root / "big.png", size=(120, 100))
    # checkpoints
    files["ckpt_missing"] = root / "nope.pt"
    files["ckpt_text"] = root / "text.pt"
    files["ckpt_text"].write_text("hello")
    torch.save({"state_dict": {"w": torch.zeros(3)}}, root / "full.pt")
    data = (root / "full.pt").read_bytes()
    files["ckpt_truncated"] = root / "truncated.pt"
    files["ckpt_truncated"].write_bytes(data[: len(data) // 2])
    files["evil_marker"] = root / "PWNED"
    files["ckpt_evil"] = root / "evil.pt"
    with open(files["ckpt_evil"], "wb") as handle:
        pickle.dump({"state_dict": _Evil(files["evil_marker"])}, handle)
    files["ckpt_wrong_arch"] = root / "wrong_arch.pt"
    torch.save({"format": "dcn-inspect/1", "arch": "no-such-arch", "config": {}, "state_dict": {}, "meta": {}},
               files["ckpt_wrong_arch"])
    # annotations
    files["json_bad"] = root / "bad.json"
    files["json_bad"].write_text("{not json")
    files["json_empty"] = root / "empty_dataset.json"
    files["json_empty"].write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    files["json_missing_field"] = root / "missing_field.json"
    files["json_missing_field"].write_text(json.dumps({
        "images": [{"id": 1, "file_name": "good.png", "width": 48, "height": 40}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1}],
        "categories": [{"id": 1, "name": "thing"}],
    }))
    files["json_wrong_type"] = root / "wrong_type.json"
    files["json_wrong_type"].write_text(json.dumps({
        "images": [{"id": 1, "file_name": "good.png", "width": "wide", "height": 40}],
        "annotations": [], "categories": [],
    }))
    files["json_unknown_image"] = root / "unknown_image.json"
    files["json_unknown_image"].write_text(json.dumps({
        "images": [{"id": 1, "file_name": "good.png", "width": 48, "height": 40}],
        "annotations": [{"id": 1, "image_id": 7, "category_id": 1, "bbox": [1, 1, 5, 5]}],
        "categories": [{"id": 1, "name": "thing"}],
    }))
    files["json_duplicate"] = root / "duplicate.json"
    files["json_duplicate"].write_text(json.dumps({
        "images": [{"id": 1, "file_name": "good.png", "width": 48, "height": 40},
                   {"id": 1, "file_name": "big.png", "width": 120, "height": 100}],
        "annotations": [], "categories": [],
    }))
    files["voc_dir"] = root / "voc"
    (files["voc_dir"] / "Annotations").mkdir(parents=True)
    (files["voc_dir"] / "JPEGImages").mkdir()
    (files["voc_dir"] / "Annotations" / "a.xml").write_text("<annotation><filename>a.jpg</oops>")
    files["rois_csv"] = root / "rois.csv"
    files["rois_csv"].write_text("x1,y1,x2,y2\n30,5,10,20\n")
    files["file_as_out"] = root / "a_file"
    files["file_as_out"].write_text("x")
    return files


@dataclass
class Case:
    id: str
    args: List[str]
    message: str  # regex the error line must match
    code: int = 1


# "{name}" is replaced by the corpus path; {out} by the case's output directory.
CASES = [
    # images
    Case("image-missing", ["sample-points", "{root}/missing.png", "--model", "{model}:build"], r"missing\.png: image not found"),
    Case("image-empty", ["sample-points", "{empty}", "--model", "{model}:build"], r"empty\.png: image file is empty"),
    Case("image-not-image", ["sample-points", "{text}", "--model", "{model}:build"], r"text\.png: not an image"),
    Case("image-truncated", ["sample-points", "{truncated}", "--model", "{model}:build"], r"truncated\.png: image is corrupt or truncated"),
    Case("image-bomb", ["sample-points", "{big}", "--model", "{model}:build", "--max-pixels", "5000"], r"big\.png: .*above the limit of 5000 \(raise it with --max-pixels\)"),
    Case("bins-image-missing", ["bins", "{root}/missing.png", "--roi", "1,1,10,10"], r"missing\.png: image not found"),
    # checkpoints
    Case("ckpt-missing", ["sample-points", "{good}", "--model", "dcn-sample", "--weights", "{ckpt_missing}"], r"nope\.pt: checkpoint not found"),
    Case("ckpt-not-checkpoint", ["sample-points", "{good}", "--model", "{ckpt_text}"], r"text\.pt: not a readable PyTorch checkpoint"),
    Case("ckpt-truncated", ["sample-points", "{good}", "--model", "{ckpt_truncated}"], r"truncated\.pt: not a readable PyTorch checkpoint"),
    Case("ckpt-pickle-code", ["sample-points", "{good}", "--model", "{ckpt_evil}"], r"evil\.pt: refused to load"),
    Case("ckpt-wrong-arch", ["sample-points", "{good}", "--model", "{ckpt_wrong_arch}"], r"wrong_arch\.pt: unknown architecture 'no-such-arch'"),
    Case("offsets-non-finite", ["sample-points", "{good}", "--model", "{model}:build_poisoned"], r"d2.*(non-finite|NaN)"),
    # annotations / datasets
    Case("json-invalid", ["dilation-stats", "{json_bad}", "--model", "{model}:build"], r"bad\.json: .*(JSON|json)"),
    Case("json-empty-dataset", ["dilation-stats", "{json_empty}", "--model", "{model}:build"], r"empty_dataset\.json: .*(no images|empty)"),
    Case("json-missing-field", ["dilation-stats", "{json_missing_field}", "--model", "{model}:build"], r"missing_field\.json: .*bbox"),
    Case("json-wrong-type", ["dilation-stats", "{json_wrong_type}", "--model", "{model}:build"], r"wrong_type\.json: .*width"),
    Case("json-unknown-image", ["dilation-stats", "{json_unknown_image}", "--model", "{model}:build"], r"unknown_image\.json: .*image_id 7|unknown_image\.json: .*7"),
    Case("json-duplicate-id", ["dilation-stats", "{json_duplicate}", "--model", "{model}:build"], r"duplicate\.json: .*duplicate"),
    Case("voc-invalid-xml", ["dilation-stats", "{voc_dir}", "--model", "{model}:build"], r"a\.xml: .*(XML|xml)"),
    Case("dataset-unknown-kind", ["dilation-stats", "{good}", "--model", "{model}:build"], r"good\.png: .*(COCO|VOC)"),
    # arguments
    Case("unit-outside-image", ["sample-points", "{good}", "--model", "{model}:build", "--at", "500,500"], r"--at 500,500: .*outside"),
    Case("unknown-layer", ["sample-points", "{good}", "--model", "{model}:build", "--layers", "d9"], r"d9.*(d1|valid)"),
    Case("roi-x2-before-x1", ["bins", "{good}", "--rois", "{rois_csv}"], r"x2 .*x1|x1.*x2"),
    Case("roi-arg-x2-before-x1", ["bins", "{good}", "--roi", "30,5,10,20"], r"x2 .*x1|x1.*x2"),
    Case("out-is-a-file", ["sample-points", "{good}", "--model", "{model}:build", "--out", "{file_as_out}"], r"a_file: .*not a directory"),
    Case("unknown-device", ["sample-points", "{good}", "--model", "{model}:build", "--device", "tpu"], r"--device 'tpu': unknown device"),
    Case("cuda-unavailable", ["sample-points", "{good}", "--model", "{model}:build", "--device", "cuda"], r"--device cuda: CUDA is not available"),
    Case("unknown-model", ["sample-points", "{good}", "--model", "no-such-model"], r"--model no-such-model: neither a registered architecture"),
    Case("usage-error", ["sample-points", "{good}", "--grid", "many"], r"", code=2),
]


def _run(args: List[str], capsys: pytest.CaptureFixture) -> tuple:
    state["debug"] = False
    old = sys.argv
    sys.argv = ["dcn-inspect", *args]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = old
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, corpus: Dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    if case.id == "cuda-unavailable" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    out = tmp_path / "out"
    args = [a.format(out=out, **{k: str(v) for k, v in corpus.items()}) for a in case.args]
    if "--out" not in args:
        args += ["--out", str(out)]
    code, stdout, stderr = _run(args, capsys)
    assert code == case.code, f"exit {code}, stderr: {stderr}"
    assert "Traceback" not in stderr + stdout
    if case.code == 1:
        errors = [line for line in stderr.splitlines() if line.startswith("dcn-inspect: error:")]
        assert len(errors) == 1, stderr
        assert "internal error" not in stderr
        assert __import__("re").search(case.message, errors[0]), errors[0]
    written = [p for p in out.rglob("*") if p.is_file()] if out.exists() else []
    assert written == [], f"output files left behind: {written}"


def test_pickle_code_never_runs_in_a_fresh_process(corpus: Dict[str, Path], tmp_path: Path) -> None:
    marker = corpus["evil_marker"]
    for spec in (["--model", str(corpus["ckpt_evil"])], ["--model", "dcn-sample", "--weights", str(corpus["ckpt_evil"])]):
        result = subprocess.run(
            [sys.executable, "-m", "dcn_inspect", "sample-points", str(corpus["good"]), *spec, "--out", str(tmp_path / "o")],
            capture_output=True, text=True, timeout=300,
        )
        assert result.returncode == 1, result.stderr
        assert "refused to load" in result.stderr
        assert "Traceback" not in result.stderr
        assert not marker.exists(), "the pickle's code ran"


def _strip_timing(data: object) -> object:
    if isinstance(data, dict):
        return {k: _strip_timing(v) for k, v in data.items() if k not in TIMING_KEYS}
    if isinstance(data, list):
        return [_strip_timing(v) for v in data]
    return data


@pytest.mark.parametrize(
    "command",
    [
        ["sample-points", "{good}", "--model", "{model}:build", "--grid", "4"],
        ["dilation-stats", "{dataset}", "--model", "{model}:build", "--workers", "0", "--per-unit"],
    ],
    ids=["sample-points", "dilation-stats"],
)
def test_same_command_twice_gives_identical_outputs(command: List[str], corpus: Dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    dataset = tmp_path / "ds.json"
    dataset.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "good.png", "width": 48, "height": 40}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 20, 18], "area": 360, "iscrowd": 0}],
        "categories": [{"id": 1, "name": "thing"}],
    }))
    (tmp_path / "good.png").write_bytes(corpus["good"].read_bytes())
    names = {k: str(v) for k, v in corpus.items()}
    names["dataset"] = str(dataset)
    out = tmp_path / "out"
    args = [a.format(**names) for a in command] + ["--out", str(out)]
    snapshots = []
    for _ in range(2):  # the same command twice, into the same directory
        code, _, stderr = _run(args, capsys)
        assert code == 0, stderr
        snapshots.append({p.name: p.read_bytes() for p in out.iterdir() if p.is_file()})
    csvs = sorted(name for name in snapshots[0] if name.endswith(".csv"))
    assert csvs, "the command wrote no CSV"
    for name in csvs:
        assert snapshots[0][name] == snapshots[1][name], (name, snapshots[0][name][:600], snapshots[1][name][:600])
    first = json.loads(snapshots[0]["summary.json"])
    second = json.loads(snapshots[1]["summary.json"])
    assert first != {} and _strip_timing(first) == _strip_timing(second)


@pytest.mark.parametrize("command", ["sample-points", "bins"])
def test_batch_skips_unreadable_images_and_strict_stops(command: str, corpus: Dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    options = ["--model", f"{corpus['model']}:build"] if command == "sample-points" else ["--roi", "2,2,30,30"]
    base = [command, str(corpus["good"]), str(corpus["text"]), *options]
    code, stdout, stderr = _run(base + ["--out", str(tmp_path / "lenient")], capsys)
    assert code == 0, stderr
    assert "1 image(s) skipped" in stdout
    summary = json.loads((tmp_path / "lenient" / "summary.json").read_text())
    assert summary["skipped"]["count"] == 1
    assert "text.png: not an image" in summary["skipped"]["images"][0]["reason"]
    assert (tmp_path / "lenient" / f"good_{'points' if command == 'sample-points' else 'bins'}.csv").exists()
    code, _, stderr = _run(base + ["--strict", "--out", str(tmp_path / "strict")], capsys)
    assert code == 1 and "text.png: not an image" in stderr
    assert not (tmp_path / "strict" / "summary.json").exists()


def test_nan_weights_warn_but_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from dcn_inspect.checkpoint import save_native
    from dcn_inspect.models import get

    model = get("dcn-sample").build()
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "head" in n or "cls" in n or "seg" in n).fill_(float("nan"))
    checkpoint = tmp_path / "nan.pt"
    save_native(checkpoint, "dcn-sample", {}, model)
    image = _image(tmp_path / "img.png", size=(64, 64))
    code, _, stderr = _run(["sample-points", str(image), "--model", str(checkpoint), "--out", str(tmp_path / "out")], capsys)
    assert code == 0, stderr
    warnings = [line for line in stderr.splitlines() if line.startswith("dcn-inspect: warning:")]
    assert len(warnings) == 1 and "nan.pt" in warnings[0] and "NaN/Inf" in warnings[0]

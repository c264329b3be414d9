"""Every bad input gets one clear line and a non-zero exit, no traceback, no output files.

A table of cases over a corpus of broken and hostile files generated here. Each case runs the
real CLI entry point (``dcn_inspect.cli.main``) in-process and checks: the exit code, exactly
one ``dcn-inspect: error:`` line naming the problem, no traceback, and an output directory with
nothing written in it (hidden files included). The cases that would cost memory (a 235-byte
image that resizes to gigabytes, zip and pickle bombs, checkpoints whose config or
preprocessing asks for huge tensors) also run as a separate process under a memory cap and
must peak under 1 GiB. The pickle-that-runs-code case also runs as a separate process and
checks that the code did not run.

Faults: Ctrl-C (SIGINT) and SIGTERM sent to a real process halfway through a run (exit 130 /
143, no partial or hidden files), two runs on one output directory at once, disk full (a tiny
tmpfs where the machine lets us mount one, a simulated ENOSPC otherwise), a later image failing
after earlier images were written, outputs that would overwrite an input. A last group checks
determinism: the same command twice gives byte-identical CSVs and JSON that differs only in
timing fields.
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from dcn_inspect.cli import main
from dcn_inspect.cli.app import state
from dcn_inspect.io.outputs import TIMING_KEYS

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


def build_interrupted():
    raise KeyboardInterrupt


def build_exits():
    raise SystemExit(0)


class Raising(Tiny):
    def forward(self, x):
        raise ValueError("shapes do not line up in block 3")


def build_raising():
    return Raising()


class Slow(Tiny):
    """Sleeps in every forward, so a run of a few images lasts long enough to be interrupted."""

    def forward(self, x):
        import time
        time.sleep(0.4)
        return super().forward(x)


def build_slow():
    torch.manual_seed(0)
    return Slow()
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
    return build_corpus(tmp_path_factory.mktemp("corpus"))


def build_corpus(root: Path) -> Dict[str, Path]:
    """Every broken and hostile file of the table, in ``root`` (``bench/hostile_memory.py`` uses it
    too)."""
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
    torch.save(
        {
            "format": "dcn-inspect/1",
            "arch": "no-such-arch",
            "config": {},
            "state_dict": {},
            "meta": {},
        },
        files["ckpt_wrong_arch"],
    )
    # annotations
    files["json_bad"] = root / "bad.json"
    files["json_bad"].write_text("{not json")
    files["json_empty"] = root / "empty_dataset.json"
    files["json_empty"].write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    files["json_missing_field"] = root / "missing_field.json"
    files["json_missing_field"].write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "good.png", "width": 48, "height": 40}],
                "annotations": [{"id": 1, "image_id": 1, "category_id": 1}],
                "categories": [{"id": 1, "name": "thing"}],
            }
        )
    )
    files["json_wrong_type"] = root / "wrong_type.json"
    files["json_wrong_type"].write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "good.png", "width": "wide", "height": 40}],
                "annotations": [],
                "categories": [],
            }
        )
    )
    files["json_unknown_image"] = root / "unknown_image.json"
    files["json_unknown_image"].write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "good.png", "width": 48, "height": 40}],
                "annotations": [{"id": 1, "image_id": 7, "category_id": 1, "bbox": [1, 1, 5, 5]}],
                "categories": [{"id": 1, "name": "thing"}],
            }
        )
    )
    files["json_duplicate"] = root / "duplicate.json"
    files["json_duplicate"].write_text(
        json.dumps(
            {
                "images": [
                    {"id": 1, "file_name": "good.png", "width": 48, "height": 40},
                    {"id": 1, "file_name": "big.png", "width": 120, "height": 100},
                ],
                "annotations": [],
                "categories": [],
            }
        )
    )
    files["voc_dir"] = root / "voc"
    (files["voc_dir"] / "Annotations").mkdir(parents=True)
    (files["voc_dir"] / "JPEGImages").mkdir()
    (files["voc_dir"] / "Annotations" / "a.xml").write_text("<annotation><filename>a.jpg</oops>")
    files["rois_csv"] = root / "rois.csv"
    files["rois_csv"].write_text("x1,y1,x2,y2\n30,5,10,20\n")
    files["file_as_out"] = root / "a_file"
    files["file_as_out"].write_text("x")
    _hostile_files(root, files)
    return files


def _native(path: Path, **changes: object) -> Path:
    """A native dcn-sample checkpoint (its real initial weights) with entries replaced."""
    payload = {
        "format": "dcn-inspect/1",
        "arch": "dcn-sample",
        "config": {},
        "state_dict": _sample_state(),
        "meta": {},
    }
    payload.update(changes)
    torch.save(payload, path)
    return path


_SAMPLE_STATE: Dict[str, torch.Tensor] = {}


def _sample_state() -> Dict[str, torch.Tensor]:
    from dcn_inspect.models import get

    if not _SAMPLE_STATE:
        torch.manual_seed(0)
        _SAMPLE_STATE.update(get("dcn-sample").build().state_dict())
    return _SAMPLE_STATE


def _zip_bomb(path: Path, inflated: int) -> Path:
    """A real torch.save archive whose tensor record is replaced by ``inflated`` deflated zeros."""
    buffer = io.BytesIO()
    torch.save({"state_dict": {"w": torch.zeros(1)}}, buffer)
    source = zipfile.ZipFile(io.BytesIO(buffer.getvalue()))
    with zipfile.ZipFile(path, "w") as archive:
        for info in source.infolist():
            if not info.filename.endswith("/data/0"):
                archive.writestr(info, source.read(info.filename))
                continue
            entry = zipfile.ZipInfo(info.filename, date_time=(2020, 1, 1, 0, 0, 0))
            entry.compress_type = zipfile.ZIP_DEFLATED
            with archive.open(entry, "w", force_zip64=True) as handle:
                chunk = bytes(1 << 24)
                for _ in range(inflated // len(chunk)):
                    handle.write(chunk)
    return path


def _hostile_files(root: Path, files: Dict[str, Path]) -> None:
    """Files built to cost memory or to reach unusual code paths."""
    files["thin"] = (
        root / "thin.png"
    )  # a 1x40000 PNG of ~200 bytes: 600 x 24,000,000 at --resize 600
    Image.fromarray(np.zeros((1, 40000, 3), np.uint8)).save(files["thin"])
    files["loop"] = root / "loop.png"
    os.symlink(files["loop"].name, files["loop"])
    files["loop_dir"] = root / "loop_dir"
    os.symlink(files["loop_dir"].name, files["loop_dir"])
    files["loop_ckpt"] = root / "loop.pt"
    os.symlink(files["loop_ckpt"].name, files["loop_ckpt"])
    # Named pipes: reading one blocks until a writer comes, so they must be refused before any open.
    for key, name in (
        ("fifo_image", "fifo.png"),
        ("fifo_json", "fifo.json"),
        ("fifo_ckpt", "fifo.pt"),
        ("fifo_csv", "fifo.csv"),
    ):
        files[key] = root / name
        os.mkfifo(files[key])
    # checkpoints
    files["ckpt_resize_huge"] = _native(
        root / "resize_huge.pt", meta={"preprocess": {"resize": 60000}}
    )
    files["ckpt_resize_max"] = _native(
        root / "resize_max.pt", meta={"preprocess": {"resize": 16384}}
    )
    files["ckpt_width_huge"] = _native(
        root / "width_huge.pt", config={"widths": [16, 24, 48, 64, 20000]}
    )
    files["ckpt_config_str"] = _native(root / "config_str.pt", config="widths=20000")
    files["ckpt_meta_list"] = _native(root / "meta_list.pt", meta=[1, 2, 3])
    files["ckpt_preprocess_int"] = _native(root / "preprocess_int.pt", meta={"preprocess": 5})
    files["ckpt_preprocess_std"] = _native(
        root / "preprocess_std.pt", meta={"preprocess": {"std": [0.2, 0.0, 0.2]}}
    )
    files["ckpt_config_bigint"] = _native(root / "config_bigint.pt", config={"num_classes": 10**40})
    files["ckpt_config_unknown"] = _native(root / "config_unknown.pt", config={"depth": 50})
    files["ckpt_state_not_tensors"] = _native(
        root / "state_not_tensors.pt", state_dict={"stem.0.weight": "zeros"}
    )
    files["ckpt_zip_bomb"] = _zip_bomb(root / "zip_bomb.pt", 2**30)  # ~1 MB that inflates to 1 GiB
    files["ckpt_bytearray_bomb"] = (
        root / "bytearray_bomb.pkl"
    )  # bytearray(4_000_000_000): 30 bytes, 4 GB zero-filled
    files["ckpt_bytearray_bomb"].write_bytes(
        b"\x80\x04cbuiltins\nbytearray\n\x8a\x05"
        + (4_000_000_000).to_bytes(5, "little")
        + b"\x85R."
    )
    files["ckpt_array_bomb"] = (
        root / "array_bomb.pkl"
    )  # numpy's reconstructor asked for a 10**12-element array
    files["ckpt_array_bomb"].write_bytes(
        b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n\x8a\x06"
        + (10**12).to_bytes(6, "little")
        + b"\x85cnumpy\ndtype\nX\x02\x00\x00\x00f8\x85R\x87R."
    )
    # annotations
    coco = {
        "images": [{"id": 1, "file_name": "good.png", "width": 48, "height": 40}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 10, 10]}],
        "categories": [{"id": 1, "name": "thing"}],
    }
    files["coco_bigint"] = root / "bigint.json"
    files["coco_bigint"].write_text(
        json.dumps(coco).replace('"width": 48', '"width": ' + "9" * 400)
    )
    files["coco_bigbbox"] = root / "bigbbox.json"
    files["coco_bigbbox"].write_text(
        json.dumps(coco).replace("[1, 1, 10, 10]", "[1, 1, " + "9" * 400 + ", 10]")
    )
    files["coco_hugeint"] = root / "hugeint.json"  # more digits than Python converts
    files["coco_hugeint"].write_text(
        json.dumps(coco).replace('"id": 1, "file_name"', '"id": ' + "7" * 5000 + ', "file_name"')
    )
    files["coco_deep"] = root / "deep.json"
    files["coco_deep"].write_text("[" * 100_000 + "]" * 100_000)
    files["coco_absolute"] = root / "absolute.json"
    files["coco_absolute"].write_text(
        json.dumps(
            {**coco, "images": [{"id": 1, "file_name": "/etc/hostname", "width": 48, "height": 40}]}
        )
    )
    files["coco_dotdot"] = root / "dotdot.json"
    files["coco_dotdot"].write_text(
        json.dumps(
            {
                **coco,
                "images": [{"id": 1, "file_name": "../../secret.png", "width": 48, "height": 40}],
            }
        )
    )
    files["coco_ok"] = root / "ok.json"
    files["coco_ok"].write_text(json.dumps(coco))
    voc = root / "voc_split"
    (voc / "Annotations").mkdir(parents=True)
    (voc / "JPEGImages").mkdir()
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    (voc / "Annotations" / "a.xml").write_text(
        "<annotation><size><width>48</width><height>40</height></size><object><name>x</name>"
        "<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>10</xmax><ymax>10</ymax></bndbox></object></annotation>"
    )
    (voc / "ImageSets" / "Main" / "binary.txt").write_bytes(bytes(range(256)) * 4)
    files["voc_split"] = voc
    files["rois_huge_field"] = root / "huge_field.csv"
    files["rois_huge_field"].write_text('x1,y1,x2,y2\n"' + "1" * 200_000 + '",1,10,10\n')
    # boxes in another frame than the image's
    files["coco_larger"] = root / "larger.json"  # made for a 2x larger version of good.png
    files["coco_larger"].write_text(
        json.dumps(coco).replace('"width": 48, "height": 40', '"width": 96, "height": 80')
    )
    phone = Image.fromarray(np.zeros((40, 48, 3), np.uint8))
    exif = phone.getexif()
    exif[0x0112] = 6  # stored 48x40, displayed 40x48
    files["phone"] = root / "phone.jpg"
    phone.save(files["phone"], exif=exif.tobytes())
    files["coco_stored_frame"] = root / "stored_frame.json"  # annotated on the stored pixels
    files["coco_stored_frame"].write_text(json.dumps(coco).replace("good.png", "phone.jpg"))
    files["boxes_outside"] = root / "outside.csv"
    files["boxes_outside"].write_text("x1,y1,x2,y2\n5,5,20,20\n500,500,600,600\n")


@dataclass
class Case:
    id: str
    args: List[str]
    message: str  # regex the error line must match
    code: int = 1


# "{name}" is replaced by the corpus path; {out} by the case's output directory.
CASES = [
    # images
    Case(
        "image-missing",
        ["sample-points", "{root}/missing.png", "--model", "{model}:build"],
        r"missing\.png: image not found",
    ),
    Case(
        "image-empty",
        ["sample-points", "{empty}", "--model", "{model}:build"],
        r"empty\.png: image file is empty",
    ),
    Case(
        "image-not-image",
        ["sample-points", "{text}", "--model", "{model}:build"],
        r"text\.png: not an image",
    ),
    Case(
        "image-truncated",
        ["sample-points", "{truncated}", "--model", "{model}:build"],
        r"truncated\.png: image is corrupt or truncated",
    ),
    Case(
        "image-bomb",
        ["sample-points", "{big}", "--model", "{model}:build", "--max-pixels", "5000"],
        r"big\.png: .*above the limit of 5000 \(raise it with --max-pixels\)",
    ),
    Case(
        "bins-image-missing",
        ["bins", "{root}/missing.png", "--roi", "1,1,10,10"],
        r"missing\.png: image not found",
    ),
    # checkpoints
    Case(
        "ckpt-missing",
        ["sample-points", "{good}", "--model", "dcn-sample", "--weights", "{ckpt_missing}"],
        r"nope\.pt: checkpoint not found",
    ),
    Case(
        "ckpt-not-checkpoint",
        ["sample-points", "{good}", "--model", "{ckpt_text}"],
        r"text\.pt: not a readable PyTorch checkpoint",
    ),
    Case(
        "ckpt-truncated",
        ["sample-points", "{good}", "--model", "{ckpt_truncated}"],
        r"truncated\.pt: not a readable PyTorch checkpoint",
    ),
    Case(
        "ckpt-pickle-code",
        ["sample-points", "{good}", "--model", "{ckpt_evil}"],
        r"evil\.pt: refused to load",
    ),
    Case(
        "ckpt-wrong-arch",
        ["sample-points", "{good}", "--model", "{ckpt_wrong_arch}"],
        r"wrong_arch\.pt: unknown architecture 'no-such-arch'",
    ),
    Case(
        "offsets-non-finite",
        ["sample-points", "{good}", "--model", "{model}:build_poisoned"],
        r"d2.*(non-finite|NaN)",
    ),
    # annotations / datasets
    Case(
        "json-invalid",
        ["dilation-stats", "{json_bad}", "--model", "{model}:build"],
        r"bad\.json: .*(JSON|json)",
    ),
    Case(
        "json-empty-dataset",
        ["dilation-stats", "{json_empty}", "--model", "{model}:build"],
        r"empty_dataset\.json: .*(no images|empty)",
    ),
    Case(
        "json-missing-field",
        ["dilation-stats", "{json_missing_field}", "--model", "{model}:build"],
        r"missing_field\.json: .*bbox",
    ),
    Case(
        "json-wrong-type",
        ["dilation-stats", "{json_wrong_type}", "--model", "{model}:build"],
        r"wrong_type\.json: .*width",
    ),
    Case(
        "json-unknown-image",
        ["dilation-stats", "{json_unknown_image}", "--model", "{model}:build"],
        r"unknown_image\.json: .*image_id 7|unknown_image\.json: .*7",
    ),
    Case(
        "json-duplicate-id",
        ["dilation-stats", "{json_duplicate}", "--model", "{model}:build"],
        r"duplicate\.json: .*duplicate",
    ),
    Case(
        "voc-invalid-xml",
        ["dilation-stats", "{voc_dir}", "--model", "{model}:build"],
        r"a\.xml: .*(XML|xml)",
    ),
    Case(
        "dataset-unknown-kind",
        ["dilation-stats", "{good}", "--model", "{model}:build"],
        r"good\.png: .*(COCO|VOC)",
    ),
    # arguments
    Case(
        "unit-outside-image",
        ["sample-points", "{good}", "--model", "{model}:build", "--at", "500,500"],
        r"--at 500,500: .*outside",
    ),
    Case(
        "unknown-layer",
        ["sample-points", "{good}", "--model", "{model}:build", "--layers", "d9"],
        r"d9.*(d1|valid)",
    ),
    Case("roi-x2-before-x1", ["bins", "{good}", "--rois", "{rois_csv}"], r"x2 .*x1|x1.*x2"),
    Case("roi-arg-x2-before-x1", ["bins", "{good}", "--roi", "30,5,10,20"], r"x2 .*x1|x1.*x2"),
    Case(
        "out-is-a-file",
        ["sample-points", "{good}", "--model", "{model}:build", "--out", "{file_as_out}"],
        r"a_file: .*not a directory",
    ),
    Case(
        "unknown-device",
        ["sample-points", "{good}", "--model", "{model}:build", "--device", "tpu"],
        r"--device 'tpu': unknown device",
    ),
    Case(
        "cuda-unavailable",
        ["sample-points", "{good}", "--model", "{model}:build", "--device", "cuda"],
        r"--device cuda: CUDA is not available",
    ),
    Case(
        "unknown-model",
        ["sample-points", "{good}", "--model", "no-such-model"],
        r"--model no-such-model: neither a registered architecture",
    ),
    Case("usage-error", ["sample-points", "{good}", "--grid", "many"], r"", code=2),
    # memory: refused before anything large is allocated (peaks measured in MEMORY_CASES below)
    Case(
        "model-input-too-large",
        ["sample-points", "{thin}", "--model", "{model}:build", "--resize", "600"],
        r"thin\.png: the 40000x1 image becomes a 24000000x600 = 14400000000 pixel model input "
        r"\(shorter side resized to 600\), above the limit of 25000000",
    ),
    Case(
        "model-input-from-checkpoint-preprocess",
        ["sample-points", "{good}", "--model", "{ckpt_resize_max}"],
        r"good\.png: the 48x40 image becomes a 19661x16384 = \d+ pixel model input "
        r"\(shorter side resized to 16384\)",
    ),
    Case(
        "ckpt-preprocess-resize-huge",
        ["sample-points", "{good}", "--model", "{ckpt_resize_huge}"],
        r"resize_huge\.pt: meta\.preprocess: resize must be a whole number of pixels "
        r"from 0 to 16384, got 60000",
    ),
    Case(
        "ckpt-config-width-huge",
        ["sample-points", "{good}", "--model", "{ckpt_width_huge}"],
        r"width_huge\.pt: shape mismatch at .*checkpoint \(48, 64, 1, 1\) "
        r"vs model \(10000, 64, 1, 1\)",
    ),
    Case(
        "ckpt-zip-bomb",
        ["sample-points", "{good}", "--model", "{ckpt_zip_bomb}"],
        r"zip_bomb\.pt: the \d+-byte archive declares 1073742\d+ bytes uncompressed "
        r".*refused before inflating",
    ),
    Case(
        "ckpt-pickle-bytearray-bomb",
        ["sample-points", "{good}", "--model", "dcn-sample", "--weights", "{ckpt_bytearray_bomb}"],
        r"bytearray_bomb\.pkl: refused to load: .*bytearray",
    ),
    Case(
        "ckpt-pickle-array-bomb",
        ["sample-points", "{good}", "--model", "dcn-sample", "--weights", "{ckpt_array_bomb}"],
        r"array_bomb\.pkl: refused to load: .*array reconstruction",
    ),
    Case(
        "max-pixels-negative",
        ["sample-points", "{good}", "--model", "{model}:build", "--max-pixels", "-1"],
        r"--max-pixels -1: must be a number of pixels >= 1, or 0 for no limit",
    ),
    Case(
        "resize-too-large",
        ["sample-points", "{good}", "--model", "{model}:build", "--resize", "99999"],
        r"--resize 99999: above the largest shorter side of 16384",
    ),
    Case(
        "resize-not-a-number",
        ["sample-points", "{good}", "--model", "{model}:build", "--resize", "1e30"],
        r"",
        code=2,
    ),
    # checkpoints whose entries have the wrong type
    Case(
        "ckpt-config-wrong-type",
        ["sample-points", "{good}", "--model", "{ckpt_config_str}"],
        r"config_str\.pt: native checkpoint entry 'config' must be a dict",
    ),
    Case(
        "ckpt-meta-wrong-type",
        ["sample-points", "{good}", "--model", "{ckpt_meta_list}"],
        r"meta_list\.pt: native checkpoint entry 'meta' must be a dict .*got list",
    ),
    Case(
        "ckpt-preprocess-wrong-type",
        ["sample-points", "{good}", "--model", "{ckpt_preprocess_int}"],
        r"preprocess_int\.pt: meta\.preprocess: expected a dict .*got int",
    ),
    Case(
        "ckpt-preprocess-zero-std",
        ["sample-points", "{good}", "--model", "{ckpt_preprocess_std}"],
        r"preprocess_std\.pt: meta\.preprocess: std must be positive",
    ),
    Case(
        "ckpt-config-bigint",
        ["sample-points", "{good}", "--model", "{ckpt_config_bigint}"],
        r"config_bigint\.pt: its config does not fit architecture dcn-sample "
        r"\(num_classes must be a whole number",
    ),
    Case(
        "ckpt-config-unknown-option",
        ["sample-points", "{good}", "--model", "{ckpt_config_unknown}"],
        r"config_unknown\.pt: its config does not fit architecture dcn-sample "
        r"\(.*unexpected keyword argument 'depth'\)",
    ),
    Case(
        "ckpt-state-not-tensors",
        ["sample-points", "{good}", "--model", "{ckpt_state_not_tensors}"],
        r"state_not_tensors\.pt: state_dict entry 'stem\.0\.weight' is not a tensor",
    ),
    # messages that name the problem
    Case(
        "image-fifo",
        ["sample-points", "{fifo_image}", "--model", "{model}:build"],
        r"fifo\.png: not a regular file \(a pipe, socket or device\)",
    ),
    Case(
        "dataset-fifo",
        ["dilation-stats", "{fifo_json}", "--model", "{model}:build"],
        r"fifo\.json: not a regular file or directory \(a pipe, socket or device\)",
    ),
    Case(
        "ckpt-fifo",
        ["sample-points", "{good}", "--model", "dcn-sample", "--weights", "{fifo_ckpt}"],
        r"fifo\.pt: not a regular file \(a pipe, socket or device\)",
    ),
    Case(
        "rois-fifo",
        ["bins", "{good}", "--rois", "{fifo_csv}"],
        r"fifo\.csv: not a regular file \(a pipe, socket or device\), expected a CSV file of boxes",
    ),
    Case(
        "boxes-fifo",
        ["sample-points", "{good}", "--model", "{model}:build", "--boxes", "{fifo_csv}"],
        r"fifo\.csv: not a regular file \(a pipe, socket or device\)",
    ),
    Case(
        "image-symlink-loop",
        ["sample-points", "{loop}", "--model", "{model}:build"],
        r"loop\.png: symlink loop",
    ),
    Case(
        "ckpt-symlink-loop",
        ["sample-points", "{good}", "--model", "{loop_ckpt}"],
        r"--model .*loop\.pt: symlink loop",
    ),
    Case(
        "out-symlink-loop",
        ["sample-points", "{good}", "--model", "{model}:build", "--out", "{loop_dir}"],
        r"--out .*loop_dir: is a symlink that leads nowhere",
    ),
    Case(
        "dataset-symlink-loop",
        ["dilation-stats", "{loop_dir}", "--model", "{model}:build"],
        r"loop_dir: cannot read the dataset \(symlink loop\)",
    ),
    Case(
        "coco-400-digit-width",
        ["dilation-stats", "{coco_bigint}", "--model", "{model}:build"],
        r"bigint\.json: images\[0\] \(id 1\): 'width' and 'height' must be positive integers",
    ),
    Case(
        "coco-400-digit-bbox",
        ["dilation-stats", "{coco_bigbbox}", "--model", "{model}:build"],
        r"bigbbox\.json: annotations\[0\] \(id 1\): 'bbox' must be 4 finite numbers",
    ),
    Case(
        "coco-5000-digit-id",
        ["dilation-stats", "{coco_hugeint}", "--model", "{model}:build"],
        r"hugeint\.json: not valid JSON \(.*digits",
    ),
    Case(
        "json-nested-100000-deep",
        ["dilation-stats", "{coco_deep}", "--model", "{model}:build"],
        r"deep\.json: JSON nested too deeply",
    ),
    Case(
        "voc-binary-split-file",
        ["dilation-stats", "{voc_split}", "--split", "binary", "--model", "{model}:build"],
        r"--split .*binary\.txt: not a text file of image names",
    ),
    Case(
        "coco-absolute-file-name",
        ["dilation-stats", "{coco_absolute}", "--model", "{model}:build"],
        r"absolute\.json: images\[0\] \(id 1\): file_name '/etc/hostname' points outside "
        r"the dataset directory .*--allow-outside-paths",
    ),
    Case(
        "coco-dotdot-file-name",
        ["dilation-stats", "{coco_dotdot}", "--model", "{model}:build"],
        r"dotdot\.json: images\[0\] .*'\.\./\.\./secret\.png' points outside",
    ),
    Case(
        "thresholds-overflow",
        [
            "dilation-stats",
            "{coco_ok}",
            "--model",
            "{model}:build",
            "--thresholds",
            "1e200^2,1e300^2",
        ],
        r"--thresholds '1e200\^2,1e300\^2': '1e200\^2' is too large",
    ),
    Case(
        "thresholds-complex",
        ["dilation-stats", "{coco_ok}", "--model", "{model}:build", "--thresholds", "-2^0.5,100"],
        r"--thresholds .*'-2\^0\.5' is not a real number",
    ),
    Case(
        "workers-too-many",
        ["dilation-stats", "{coco_ok}", "--model", "{model}:build", "--workers", "1000000"],
        r"--workers 1000000: at most \d+ worker processes",
    ),
    Case(
        "roi-beyond-float32",
        ["bins", "{good}", "--roi", "0,0,1e300,1e300"],
        r"--roi 0,0,1e\+300,1e\+300: RoI 0,0,1e\+300,1e\+300 has a coordinate "
        r"beyond ±16777216 pixels",
    ),
    Case(
        "roi-file-huge-field",
        ["bins", "{good}", "--rois", "{rois_huge_field}"],
        r"huge_field\.csv: not a readable CSV \(field larger than field limit",
    ),
    Case(
        "model-forward-raises",
        ["sample-points", "{good}", "--model", "{model}:build_raising"],
        r"--model .*tiny\.py:build_raising: the model raised ValueError in its forward: "
        r"shapes do not line up in block 3",
    ),
    Case(
        "model-build-exits",
        ["sample-points", "{good}", "--model", "{model}:build_exits"],
        r"--model .*tiny\.py:build_exits: build_exits\(\): it called sys\.exit\(0\)",
    ),
    Case(
        "group-beyond-the-model",
        ["sample-points", "{good}", "--model", "{model}:build", "--group", "5"],
        r"--group 5: layer d3 has 1 offset group \(use 0 or mean\)",
    ),
    Case(
        "offsets-group-beyond-the-model",
        ["offsets", "{good}", "--model", "{model}:build", "--group", "5"],
        r"--group 5: layer d3 has 1 offset group \(use 0 or mean\)",
    ),
    Case(
        "offsets-model-input-too-large",
        ["offsets", "{thin}", "--model", "{model}:build", "--resize", "600"],
        r"thin\.png: the 40000x1 image becomes a 24000000x600 = 14400000000 pixel model input",
    ),
    Case(
        "offsets-model-forward-raises",
        ["offsets", "{good}", "--model", "{model}:build_raising"],
        r"tiny\.py:build_raising: the model raised ValueError in its forward",
    ),
    Case(
        "device-cpu-99",
        ["sample-points", "{good}", "--model", "{model}:build", "--device", "cpu:99"],
        r"--device cpu:99: there is one CPU device",
    ),
    # boxes in another frame than the image's: refused by every command that reads them
    *[
        Case(
            f"{command}-boxes-for-another-image-size",
            [command, "{good}", "--boxes", "{coco_larger}", *extra],
            r"good\.png: image is 48x40 but its annotation in .*larger\.json says 96x80$",
        )
        for command, extra in (
            ("sample-points", ["--model", "{model}:build"]),
            ("receptive-field", ["--model", "{model}:build"]),
            ("bins", []),
        )
    ],
    Case(
        "bins-annotations-for-another-image-size",
        ["bins", "{good}", "--annotations", "{coco_larger}"],
        r"good\.png: image is 48x40 but its annotation in .*larger\.json says 96x80$",
    ),
    Case(
        "boxes-in-the-stored-frame-of-an-exif-rotated-image",
        ["sample-points", "{phone}", "--model", "{model}:build", "--boxes", "{coco_stored_frame}"],
        r"phone\.jpg: image is 40x48 but its annotation in .*stored_frame\.json says 48x40 "
        r"\(width and height swapped: the image carries an EXIF rotation \(orientation 6\)",
    ),
    *[
        Case(
            f"{command}-box-entirely-outside-the-image",
            [command, "{good}", "--boxes", "{boxes_outside}", *extra],
            r"outside\.csv: line 3: box 500,500,600,600 lies entirely outside good\.png "
            r"\(48x40 pixels\)$",
        )
        for command, extra in (
            ("sample-points", ["--model", "{model}:build"]),
            ("receptive-field", ["--model", "{model}:build"]),
            ("bins", []),
        )
    ],
    # interrupts: a KeyboardInterrupt from the user's model is an interrupt, exit 130
    Case(
        "model-build-keyboard-interrupt",
        ["sample-points", "{good}", "--model", "{model}:build_interrupted"],
        r"",
        code=130,
    ),
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
def test_bad_input(
    case: Case, corpus: Dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    if case.id == "cuda-unavailable" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    out = tmp_path / "out"
    args = [a.format(out=out, **{k: str(v) for k, v in corpus.items()}) for a in case.args]
    if "--out" not in args:
        args += ["--out", str(out)]
    code, stdout, stderr = _run(args, capsys)
    assert code == case.code, f"exit {code}, stderr: {stderr}"
    assert "Traceback" not in stderr + stdout
    assert "internal error" not in stderr
    if case.code == 1:
        errors = [line for line in stderr.splitlines() if line.startswith("dcn-inspect: error:")]
        assert len(errors) == 1, stderr
        assert re.search(case.message, errors[0]), errors[0]
    if case.code == 130:
        assert stderr.strip().splitlines()[-1] == "dcn-inspect: interrupted", stderr
    assert _files_under(out) == [], f"output files left behind: {_files_under(out)}"


def _files_under(folder: Path) -> List[Path]:
    """Every file (hidden ones included) under ``folder``; [] when it does not exist."""
    return sorted(p for p in folder.rglob("*") if not p.is_dir()) if folder.is_dir() else []


def test_pickle_code_never_runs_in_a_fresh_process(corpus: Dict[str, Path], tmp_path: Path) -> None:
    marker = corpus["evil_marker"]
    for spec in (
        ["--model", str(corpus["ckpt_evil"])],
        ["--model", "dcn-sample", "--weights", str(corpus["ckpt_evil"])],
    ):
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "dcn_inspect",
                "sample-points",
                str(corpus["good"]),
                *spec,
                "--out",
                str(tmp_path / "o"),
            ],
            capture_output=True,
            text=True,
            timeout=300,
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
def test_same_command_twice_gives_identical_outputs(
    command: List[str], corpus: Dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    dataset = tmp_path / "ds.json"
    dataset.write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "good.png", "width": 48, "height": 40}],
                "annotations": [
                    {
                        "id": 1,
                        "image_id": 1,
                        "category_id": 1,
                        "bbox": [4, 4, 20, 18],
                        "area": 360,
                        "iscrowd": 0,
                    }
                ],
                "categories": [{"id": 1, "name": "thing"}],
            }
        )
    )
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
        assert snapshots[0][name] == snapshots[1][name], (
            name,
            snapshots[0][name][:600],
            snapshots[1][name][:600],
        )
    first = json.loads(snapshots[0]["summary.json"])
    second = json.loads(snapshots[1]["summary.json"])
    assert first != {} and _strip_timing(first) == _strip_timing(second)


@pytest.mark.parametrize("command", ["sample-points", "bins"])
def test_batch_skips_unreadable_images_and_strict_stops(
    command: str, corpus: Dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    options = (
        ["--model", f"{corpus['model']}:build"]
        if command == "sample-points"
        else ["--roi", "2,2,30,30"]
    )
    base = [command, str(corpus["good"]), str(corpus["text"]), *options]
    code, stdout, stderr = _run(base + ["--out", str(tmp_path / "lenient")], capsys)
    assert code == 0, stderr
    assert "1 image(s) skipped" in stdout
    summary = json.loads((tmp_path / "lenient" / "summary.json").read_text())
    assert summary["skipped"]["count"] == 1
    assert "text.png: not an image" in summary["skipped"]["images"][0]["reason"]
    assert (
        tmp_path / "lenient" / f"good_{'points' if command == 'sample-points' else 'bins'}.csv"
    ).exists()
    code, _, stderr = _run(base + ["--strict", "--out", str(tmp_path / "strict")], capsys)
    assert code == 1 and "text.png: not an image" in stderr
    assert not (tmp_path / "strict" / "summary.json").exists()


def test_nan_weights_warn_but_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from dcn_inspect.models import get
    from dcn_inspect.models.checkpoint import save_native

    model = get("dcn-sample").build()
    with torch.no_grad():
        next(
            p for n, p in model.named_parameters() if "head" in n or "cls" in n or "seg" in n
        ).fill_(float("nan"))
    checkpoint = tmp_path / "nan.pt"
    save_native(checkpoint, "dcn-sample", {}, model)
    image = _image(tmp_path / "img.png", size=(64, 64))
    code, _, stderr = _run(
        ["sample-points", str(image), "--model", str(checkpoint), "--out", str(tmp_path / "out")],
        capsys,
    )
    assert code == 0, stderr
    warnings = [line for line in stderr.splitlines() if line.startswith("dcn-inspect: warning:")]
    assert len(warnings) == 1 and "nan.pt" in warnings[0] and "NaN/Inf" in warnings[0]


# --------------------------------------------------------------------------------------------
# Memory: the hostile cases in a separate process under a cap, peak resident memory < 1 GiB

#: What a refused hostile case may cost at most (Python, torch and the model are ~0.3 GiB of it).
PEAK_LIMIT_BYTES = 2**30

#: The cap the process runs under (address space): a case that does allocate fails fast instead
#: of taking the machine down with it.
ADDRESS_SPACE_CAP = 4 * 2**30

MEMORY_CASES = [
    "model-input-too-large",
    "model-input-from-checkpoint-preprocess",
    "ckpt-preprocess-resize-huge",
    "ckpt-config-width-huge",
    "ckpt-zip-bomb",
    "ckpt-pickle-bytearray-bomb",
    "ckpt-pickle-array-bomb",
    "coco-400-digit-width",
    "json-nested-100000-deep",
]


def run_capped(args: List[str], cwd: Optional[Path] = None) -> Tuple[int, str, int]:
    """``dcn-inspect args`` in a fresh process under :data:`ADDRESS_SPACE_CAP`: (exit code,
    stderr, peak RSS in bytes)."""

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_CAP, ADDRESS_SPACE_CAP))

    err_path = Path(cwd or ".") / f".stderr-{os.getpid()}-{time.monotonic_ns()}"
    with open(err_path, "w") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "dcn_inspect", *args],
            stdout=subprocess.DEVNULL,
            stderr=err,
            preexec_fn=cap,
            cwd=cwd,
        )
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    stderr = err_path.read_text()
    err_path.unlink()
    return process.returncode, stderr, usage.ru_maxrss * 1024  # Linux reports KiB


@pytest.mark.parametrize("case", [c for c in CASES if c.id in MEMORY_CASES], ids=MEMORY_CASES)
def test_hostile_case_peaks_under_one_gib(
    case: Case, corpus: Dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    args = [a.format(**{k: str(v) for k, v in corpus.items()}) for a in case.args] + [
        "--out",
        str(out),
    ]
    code, stderr, peak = run_capped(args, cwd=tmp_path)
    assert code == case.code, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("dcn-inspect: error:")]
    assert len(errors) == 1 and re.search(case.message, errors[0]), stderr
    assert "Traceback" not in stderr
    assert peak < PEAK_LIMIT_BYTES, f"peak {peak / 2**20:.0f} MiB"
    assert _files_under(out) == []


# --------------------------------------------------------------------------------------------
# Signals, concurrent runs, disk full, later failures, outputs onto inputs


def _noise_dataset(root: Path, count: int, side: int = 64) -> Path:
    """A COCO json with ``count`` noise images (one box each) in ``root``."""
    rng = np.random.default_rng(1)
    images, annotations = [], []
    for k in range(count):
        Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(
            root / f"n{k:03d}.png"
        )
        images.append({"id": k, "file_name": f"n{k:03d}.png", "width": side, "height": side})
        annotations.append(
            {"id": k, "image_id": k, "category_id": 1, "bbox": [4, 4, side // 2, side // 2]}
        )
    path = root / "dataset.json"
    path.write_text(
        json.dumps(
            {
                "images": images,
                "annotations": annotations,
                "categories": [{"id": 1, "name": "thing"}],
            }
        )
    )
    return path


def _interruptible() -> None:
    """In the child before it runs: Ctrl-C back to its default. A shell's background job (``make
    test &``) starts with SIGINT ignored, which Python and the command then keep, as they
    should; these tests are about a run that can be interrupted."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(args: List[str], **kwargs: object) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "dcn_inspect", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_interruptible,
        **kwargs,
    )


def _wait_for(predicate, timeout: float = 240.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def _part_files(out: Path) -> List[Path]:
    return list(out.glob(".dilation_units.*.part")) if out.is_dir() else []


@pytest.mark.parametrize(
    "signum,code,word,workers,group",
    [
        (signal.SIGINT, 130, "interrupted", "0", False),
        (signal.SIGTERM, 143, "terminated", "0", False),
        (
            signal.SIGINT,
            130,
            "interrupted",
            "2",
            True,
        ),  # Ctrl-C in a terminal: the whole process group, workers too
        (signal.SIGTERM, 143, "terminated", "2", False),
    ],
    ids=["sigint", "sigterm", "ctrl-c-group-with-workers", "sigterm-with-workers"],
)
def test_signal_halfway_exits_with_its_code_and_leaves_no_file(
    signum: int,
    code: int,
    word: str,
    workers: str,
    group: bool,
    corpus: Dict[str, Path],
    tmp_path: Path,
) -> None:
    dataset = _noise_dataset(tmp_path, 12)
    out = tmp_path / "out"
    process = _start(
        [
            "dilation-stats",
            str(dataset),
            "--model",
            f"{corpus['model']}:build_slow",
            "--per-unit",
            "--workers",
            workers,
            "--out",
            str(out),
        ],
        start_new_session=group,
    )
    assert _wait_for(lambda: bool(_part_files(out)) or process.poll() is not None), (
        "the run never started writing"
    )
    time.sleep(1.0)  # a few images into the run (each forward sleeps 0.4 s)
    assert process.poll() is None, "the run ended before the signal"
    if group:
        os.killpg(process.pid, signum)
    else:
        process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == code, stderr
    assert stderr.strip().splitlines()[-1] == f"dcn-inspect: {word}", stderr
    assert "Traceback" not in stderr
    assert _files_under(out) == [] and not out.exists(), f"left behind: {_files_under(out)}"


def test_second_run_on_a_busy_out_is_refused_and_the_first_is_intact(
    corpus: Dict[str, Path], tmp_path: Path
) -> None:
    dataset = _noise_dataset(tmp_path, 8)
    out = tmp_path / "out"
    args = [
        "dilation-stats",
        str(dataset),
        "--model",
        f"{corpus['model']}:build_slow",
        "--per-unit",
        "--workers",
        "0",
        "--out",
        str(out),
    ]
    first = _start(args)
    assert _wait_for(lambda: bool(_part_files(out)) or first.poll() is not None)
    second = _start(args)
    _, second_err = second.communicate(timeout=300)
    _, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err
    assert second.returncode == 1, second_err
    assert second_err.strip().splitlines()[-1] == (
        f"dcn-inspect: error: --out {out}: another dcn-inspect run is writing into this directory; "
        "wait for it to finish or choose another --out"
    )
    units = pd.read_csv(out / "dilation_units.csv", comment="#")
    table = pd.read_csv(out / "dilation_table.csv", comment="#")
    assert list(units.columns) == ["image", "layer", "unit_x", "unit_y", "category", "dilation"]
    assert units["image"].nunique() == 8
    counted = table[table["layer"] == "d3"]["count"].sum()
    assert (
        len(
            units[
                (units["layer"] == "d3")
                & units["category"].isin(["small", "medium", "large", "background"])
            ]
        )
        == counted
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "dilation_differences.csv",
        "dilation_hist.png",
        "dilation_table.csv",
        "dilation_table.md",
        "dilation_units.csv",
        "summary.json",
    ]


def _mount_tmpfs(target: Path, size: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    target.mkdir()
    return (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(target)],
            capture_output=True,
        ).returncode
        == 0
    )


@pytest.mark.parametrize("command", ["dilation-stats", "sample-points"])
def test_disk_full_on_a_tiny_tmpfs_gives_one_line_and_no_file(
    command: str, corpus: Dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    mount = tmp_path / "tiny"
    if not _mount_tmpfs(mount, "96k"):
        pytest.skip("cannot mount a tmpfs here (needs root and mount)")
    try:
        out = mount / "out"
        if command == "dilation-stats":
            dataset = _noise_dataset(tmp_path, 6, side=96)
            args = [
                "dilation-stats",
                str(dataset),
                "--model",
                f"{corpus['model']}:build",
                "--per-unit",
                "--workers",
                "0",
                "--out",
                str(out),
            ]
            where = (
                rf"error: {re.escape(str(out))}: cannot write the per-unit rows "
                r"\(no space left on the device\); nothing was written$"
            )
        else:
            args = [
                "sample-points",
                str(corpus["good"]),
                "--model",
                f"{corpus['model']}:build",
                "--grid",
                "1",
                "--levels",
                "1",
                "--out",
                str(out),
            ]
            where = (
                rf"error: {re.escape(str(out))}/good_points\.csv: cannot write "
                r"\(no space left on the device\); nothing was written$"
            )
        code, stdout, stderr = _run(args, capsys)
        assert code == 1, stderr
        errors = [line for line in stderr.splitlines() if line.startswith("dcn-inspect: error:")]
        assert len(errors) == 1 and re.search(where, errors[0]), stderr
        assert "Traceback" not in stderr
        assert list(mount.iterdir()) == [], list(mount.rglob("*"))
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_disk_full_simulated_removes_what_the_run_wrote(
    corpus: Dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ENOSPC on the second image's figure, after the first image's CSV and figure were written."""
    from matplotlib.figure import Figure

    original = Figure.savefig
    calls = []

    def full_disk(self, fname, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(fname)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", full_disk)
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("kept")
    code, _, stderr = _run(
        [
            "sample-points",
            str(corpus["good"]),
            str(corpus["big"]),
            "--model",
            f"{corpus['model']}:build",
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 1, stderr
    assert re.search(
        r"dcn-inspect: error: .*out/big_sampling\.png: cannot write "
        r"\(no space left on the device\); nothing was written$",
        stderr.strip(),
    ), stderr
    assert len(calls) == 2
    assert _files_under(out) == [out / "mine.txt"]


def test_a_later_image_failing_leaves_no_file_of_the_earlier_ones(
    corpus: Dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    # --at inside the first image (120x100), outside the second (48x40)
    args = [
        "sample-points",
        str(corpus["big"]),
        str(corpus["good"]),
        "--model",
        f"{corpus['model']}:build",
        "--at",
        "100,90",
        "--out",
        str(out),
    ]
    code, _, stderr = _run(args, capsys)
    assert code == 1, stderr
    assert re.search(r"--at 100,90: .*outside", stderr), stderr
    assert _files_under(out) == []


def test_ctrl_c_after_the_first_image_leaves_no_file(
    corpus: Dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """bins on two images, Ctrl-C while drawing the second one's figure: exit 130, nothing left."""
    from matplotlib.figure import Figure

    original = Figure.savefig
    calls = []

    def interrupted(self, fname, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(fname)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", interrupted)
    out = tmp_path / "out"
    code, _, stderr = _run(
        ["bins", str(corpus["big"]), str(corpus["good"]), "--roi", "2,2,30,30", "--out", str(out)],
        capsys,
    )
    assert code == 130 and stderr.strip().splitlines()[-1] == "dcn-inspect: interrupted", stderr
    assert len(calls) == 2
    assert _files_under(out) == []


def test_strict_checks_every_image_before_the_first_forward(
    corpus: Dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import dcn_inspect.commands.sample_points as command

    forwards = []
    original = command.probe
    monkeypatch.setattr(command, "probe", lambda *a, **k: forwards.append(1) or original(*a, **k))
    out = tmp_path / "out"
    code, _, stderr = _run(
        [
            "sample-points",
            str(corpus["good"]),
            str(corpus["truncated"]),
            "--model",
            f"{corpus['model']}:build",
            "--strict",
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 1 and "truncated.png: image is corrupt or truncated" in stderr
    assert forwards == []
    assert _files_under(out) == []


def test_dataset_named_like_an_output_is_refused_before_anything_is_written(
    corpus: Dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = tmp_path / "d"
    folder.mkdir()
    shutil.copy(corpus["good"], folder / "good.png")
    dataset = folder / "summary.json"
    dataset.write_text(corpus["coco_ok"].read_text())
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    code, _, stderr = _run(
        [
            "dilation-stats",
            str(dataset),
            "--model",
            f"{corpus['model']}:build",
            "--workers",
            "0",
            "--out",
            str(folder),
        ],
        capsys,
    )
    assert code == 1, stderr
    assert stderr.strip() == (
        f"dcn-inspect: error: --out {dataset}: is an input of this run (--dataset {dataset}); "
        "refusing to overwrite it: choose another --out"
    ).replace("--dataset", "DATASET")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_image_named_like_an_output_is_refused_before_anything_is_written(
    corpus: Dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    victim = out / "good_sampling.png"  # sample-points writes <stem>_sampling.png for good.png
    shutil.copy(corpus["big"], victim)
    before = victim.read_bytes()
    code, _, stderr = _run(
        [
            "sample-points",
            str(victim),
            str(corpus["good"]),
            "--model",
            f"{corpus['model']}:build",
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 1, stderr
    assert re.search(
        r"--out .*good_sampling\.png: is an input of this run \(IMAGE .*good_sampling\.png\); "
        r"refusing to overwrite it",
        stderr,
    ), stderr
    assert victim.read_bytes() == before and _files_under(out) == [victim]


def test_an_empty_out_is_refused_and_nothing_is_written_in_the_current_directory(
    corpus: Dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``--out "$UNSET"`` is an empty argument, not the current directory."""
    monkeypatch.chdir(tmp_path)
    code, _, stderr = _run(
        ["sample-points", str(corpus["good"]), "--model", f"{corpus['model']}:build", "--out", ""],
        capsys,
    )
    assert code == 1, stderr
    assert stderr.strip().splitlines() == [
        "dcn-inspect: error: --out '': an empty path (an unset shell variable?); "
        "name the output directory"
    ]
    assert _files_under(tmp_path) == []


@pytest.mark.parametrize("blocked", ["summary.json", "offsets.npz"])
def test_a_directory_where_an_output_goes_leaves_no_file_of_the_run(
    corpus: Dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture, blocked: str
) -> None:
    """``--out D`` with ``D/summary.json`` a directory, ``--save-offsets`` onto a directory: the
    line says nothing was written, and nothing was (the CSV and PNG are not left in D)."""
    out = tmp_path / "out"
    (out / blocked).mkdir(parents=True)
    code, _, stderr = _run(
        [
            "sample-points",
            str(corpus["good"]),
            "--model",
            f"{corpus['model']}:build",
            "--out",
            str(out),
            "--save-offsets",
            str(out / "offsets.npz"),
        ],
        capsys,
    )
    assert code == 1, stderr
    assert stderr.strip().splitlines() == [
        f"dcn-inspect: error: {out / blocked}: cannot write (Is a directory); nothing was written"
    ]
    assert _files_under(out) == [] and sorted(p.name for p in out.iterdir()) == [blocked]


def test_a_corrupt_exif_block_is_one_dcn_inspect_warning(
    corpus: Dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    image = Image.fromarray(np.zeros((40, 48, 3), np.uint8))
    exif = image.getexif()
    exif[0x010E] = "x" * 100  # an ImageDescription stored past the IFD, then cut off
    path = tmp_path / "corrupt_exif.jpg"
    image.save(path, exif=exif.tobytes()[:-60])
    out = tmp_path / "out"
    code, _, stderr = _run(
        ["sample-points", str(path), "--model", f"{corpus['model']}:build", "--out", str(out)],
        capsys,
    )
    assert code == 0, stderr
    assert "UserWarning" not in stderr and "site-packages" not in stderr, stderr
    warnings = [line for line in stderr.splitlines() if "EXIF" in line]
    assert warnings == [
        f"dcn-inspect: warning: {path}: corrupt EXIF block, read as far as it goes "
        "(Tag data larger than file. Skipping tag 270)"
    ], stderr

"""Compare two output snapshots of `tools/snapshot_outputs.sh`: every file byte for byte, except
`summary.json`, compared as JSON without its timing keys (wall time, timestamps, speeds).

Usage: python tools/compare_outputs.py BEFORE AFTER [ROOT_BEFORE ROOT_AFTER]
(exit 1 when anything differs). Text naming the snapshot's folder (argv, console lines) is
compared with that folder replaced; ROOT_BEFORE / ROOT_AFTER: the checkouts the two snapshots
were made in (two worktrees name their bundled weights under different roots).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

TIMING_KEYS = {
    "wall_seconds",
    "finished_at",
    "started_at",
    "images_per_second",
    "forward_seconds",
    "build_seconds",
    "timing",
    "wall_seconds_measured",
}


def _without_timing(value):
    if isinstance(value, dict):
        return {k: _without_timing(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [_without_timing(v) for v in value]
    return value


def _svg_without_ids(path: Path) -> str:
    return re.sub(r"\b(p|m|image)[0-9a-f]{8,}\b", "ID", path.read_text())


def _text(path: Path, folder: Path, root: str) -> str:
    text = path.read_text().replace(str(folder), "OUT")
    return text.replace(root, "ROOT") if root else text


def main(before: Path, after: Path, root_before: str = "", root_after: str = "") -> int:
    names = sorted(
        {p.relative_to(before) for p in before.rglob("*") if p.is_file()}
        | {p.relative_to(after) for p in after.rglob("*") if p.is_file()}
    )
    differing = 0
    for name in names:
        a, b = before / name, after / name
        if not a.exists() or not b.exists():
            print(f"only in {'after' if not a.exists() else 'before'}: {name}")
            differing += 1
            continue
        if name.name == "summary.json":
            # argv names the snapshot's own folder
            same = _without_timing(json.loads(_text(a, before, root_before))) == (
                _without_timing(json.loads(_text(b, after, root_after)))
            )
        elif name.suffix == ".stdout":  # console output names the snapshot's own folder
            same = _text(a, before, root_before) == _text(b, after, root_after)
        elif name.suffix == ".svg":  # matplotlib draws clip-path ids at random
            same = _svg_without_ids(a) == _svg_without_ids(b)
        else:
            same = a.read_bytes() == b.read_bytes()
        if not same:
            print(f"differs: {name}")
            differing += 1
    print(f"{len(names)} files compared, {differing} differ")
    return 1 if differing else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2]), *sys.argv[3:5]))

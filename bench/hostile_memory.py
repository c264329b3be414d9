"""Peak memory of every memory case of the hostile corpus (``cli_tests/cli/test_bad_inputs.py``).

Builds the corpus the tests build, runs each case of ``MEMORY_CASES`` as its own
``python -m dcn_inspect`` process under the tests' address-space cap, and prints one row per
case: exit code, peak resident memory (``ru_maxrss`` from ``wait4``) and the error line. A
baseline row runs a good image through the same model, for scale.

    .venv/bin/python bench/hostile_memory.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "cli_tests"
sys.path[:0] = [str(TESTS / "cli"), str(TESTS)]  # the corpus, and the tests' shared helpers

import test_bad_inputs as corpus_module  # noqa: E402  (the corpus and cases live with the tests)


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        files = corpus_module.build_corpus(root)
        names = {k: str(v) for k, v in files.items()}
        rows = [
            (
                "baseline: good image, tiny model",
                ["sample-points", names["good"], "--model", f"{names['model']}:build"],
            )
        ]
        rows += [
            (case.id, [a.format(**names) for a in case.args])
            for case in corpus_module.CASES
            if case.id in corpus_module.MEMORY_CASES
        ]
        print("| case | input size | exit | peak RSS (MiB) | message |\n|---|---:|---:|---:|---|")
        for index, (name, args) in enumerate(rows):
            code, stderr, peak = corpus_module.run_capped(
                args + ["--out", str(root / f"out{index}")], cwd=root
            )
            line = next(
                (text for text in stderr.splitlines() if text.startswith("dcn-inspect:")), ""
            ).replace(str(root) + "/", "")
            size = _input_size(args, names)
            print(f"| {name} | {size} | {code} | {peak / 2**20:.0f} | {line[:110]} |")


def _input_size(args: list, names: dict) -> str:
    """The size of the hostile file of a case (the checkpoint, dataset or image it names)."""
    paths = [
        Path(a) for a in args if a in names.values() and Path(a).is_file() and not a.endswith(".py")
    ]
    hostile = [p for p in paths if p.name != "good.png"] or paths
    return f"{hostile[-1].stat().st_size:,} B" if hostile else "-"


if __name__ == "__main__":
    main()

"""The console script's entry (``dcn_inspect.cli.run``, also ``python -m dcn_inspect``) ends
the process without Python's teardown (issue #24: 0.4-0.7 s after a torch run) and loses
nothing by it: the exit code, every byte written to the standard streams, ``atexit``
callbacks, and threads still at work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import List

from PIL import Image


def _python(code: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300
    )


def _module(argv: List[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dcn_inspect", *argv], capture_output=True, text=True, timeout=300
    )


#: ``main`` as the tests call it: exits through SystemExit and the normal teardown.
_MAIN = (
    "import sys\nsys.argv = ['dcn-inspect', *sys.argv[1:]]\n"
    "from dcn_inspect.cli import main\nmain()\n"
)


def test_exit_codes_and_streams_are_those_of_main(tmp_path: Path) -> None:
    image = tmp_path / "scene.png"
    Image.new("RGB", (40, 32), (90, 120, 150)).save(image)
    cases = [
        ["models"],  # 0, a table on stdout
        ["sample-points", str(tmp_path / "missing.png")],  # 1, one line on stderr
        ["sample-points", "--grid", "0", str(image)],  # 2 or 1: a refused value
        ["sample-points", str(image), "--at", "5,5", "--out", str(tmp_path / "out")],
    ]
    codes = []
    for argv in cases:
        fast, normal = _module(argv), _python(_MAIN, *argv)
        assert fast.returncode == normal.returncode, argv
        assert fast.stdout == normal.stdout, argv
        assert fast.stderr.splitlines()[-1:] == normal.stderr.splitlines()[-1:], argv
        codes.append(fast.returncode)
    assert codes[0] == 0 and codes[1] == 1 and codes[2] in (1, 2) and codes[3] == 0, codes
    assert (tmp_path / "out" / "summary.json").is_file()


def test_a_closed_pipe_is_no_error() -> None:
    """``dcn-inspect models | head -c 10``: the reader went away; no traceback, no complaint."""
    done = subprocess.run(
        f"{sys.executable} -m dcn_inspect models | head -c 10",
        shell=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr
    assert len(done.stdout) == 10


def test_atexit_callbacks_run_and_busy_threads_are_waited_for(tmp_path: Path) -> None:
    code = f"""
import atexit, sys, threading, time
from pathlib import Path
import dcn_inspect.cli as cli
atexit.register(lambda: Path({str(tmp_path / "atexit")!r}).write_text("ran"))
ended, original = threading.Event(), cli.main
def main():
    try:
        original()
    finally:
        ended.set()
cli.main = main
def late():  # still at work when the command is over
    ended.wait()
    time.sleep(0.3)
    Path({str(tmp_path / "thread")!r}).write_text("done")
threading.Thread(target=late).start()
sys.argv = ["dcn-inspect", "models"]
cli.run()
"""
    done = _python(code)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "atexit").read_text() == "ran"
    assert (tmp_path / "thread").read_text() == "done"
    # with nothing left at work, the callbacks run before the process ends at once
    (tmp_path / "atexit").unlink()
    done = _python(code.replace("threading.Thread(target=late).start()", ""))
    assert done.returncode == 0 and (tmp_path / "atexit").read_text() == "ran"
    assert "dcn-sample" in done.stdout  # the listing, flushed before the end


def test_a_profiler_still_gets_its_results(tmp_path: Path) -> None:
    """``python -m cProfile -o F -m dcn_inspect ...`` writes F in the normal teardown."""
    done = subprocess.run(
        [sys.executable, "-m", "cProfile", "-o", str(tmp_path / "run.prof"), "-m", "dcn_inspect"]
        + ["models"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "run.prof").stat().st_size > 0

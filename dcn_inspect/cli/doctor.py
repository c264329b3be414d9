"""``dcn-inspect doctor``: what this installation can do."""

from __future__ import annotations

import platform
import time
from typing import Any, Dict, List, Tuple

from dcn_inspect.cli import render
from dcn_inspect.cli.app import app


@app.command(epilog="Example: dcn-inspect doctor")
def doctor() -> None:
    """Show torch version, devices, which ops backend is active, and the ops build cache."""
    import torch
    from rich.table import Table

    from dcn_inspect.ops import backend_info

    started = time.perf_counter()
    info = backend_info()
    elapsed = time.perf_counter() - started
    table = Table(title="dcn-inspect doctor", show_header=False)
    table.add_row("python", platform.python_version())
    table.add_row("torch", torch.__version__)
    cuda = (
        f"{torch.cuda.device_count()} device(s): "
        + ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        if torch.cuda.is_available()
        else "not available"
    )
    table.add_row("cpu threads", str(torch.get_num_threads()))
    table.add_row("cuda", cuda)
    table.add_row("ops backend", f"{info.name} (requested: {info.requested})")
    if info.error:
        table.add_row("native ops error", info.error)
    for key, value in ops_rows(info.details):
        table.add_row(f"ops {key}", value)
    table.add_row("backend load time", f"{elapsed:.2f} s")
    render.console().print(table)


#: Details the table shows in one row of their own (``ops backend``, ``ops build``), not as is.
_FOLDED = ("backend", "build_seconds", "cached", "compile_seconds")


def ops_rows(details: Dict[str, Any]) -> List[Tuple[str, str]]:
    """The native build's details as (name, text) rows: how the library was obtained in one
    ``build`` row (compiled now, or loaded from the cache and what compiling it took), then the
    rest by name; the backend's name is the ``ops backend`` row already."""
    rows: List[Tuple[str, str]] = []
    if "cached" in details:
        seconds = details.get("compile_seconds")
        took = f" in {seconds:.1f} s" if isinstance(seconds, (int, float)) else ""
        rows.append(
            (
                "build",
                f"cached (compiled earlier{took})" if details["cached"] else f"compiled now{took}",
            )
        )
    rows += [(key, str(value)) for key, value in sorted(details.items()) if key not in _FOLDED]
    return rows

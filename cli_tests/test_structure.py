"""The package's shape (README "Code map"): no import circles, layers import only downwards,
the library speaks of parameters and the CLI of flags, and ``--help`` never loads torch."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Set

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dcn_inspect"

#: Modules that compute one figure's numbers (and the math under them): no I/O, no CLI, no reports.
ANALYSIS = {
    "geometry", "sampling", "records", "category_stats", "tracing", "dilation", "roi_bins", "foreground", "unit_selection", "roi_selection", "offset_maps",
    "receptive_field",
}  # fmt: skip
#: What analysis modules may not import.
ABOVE_ANALYSIS = ("dcn_inspect.commands", "dcn_inspect.cli", "dcn_inspect.plots", "dcn_inspect.outputs", "dcn_inspect.loading", "dcn_inspect.importers", "dcn_inspect.progress")


def _modules() -> Dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


def _imports(path: Path, modules: Dict[str, Path], top_level_only: bool = False) -> Set[str]:
    """dcn_inspect modules (and third-party roots) ``path`` imports; ``from pkg import sub`` counts as ``pkg.sub``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: Set[str] = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules]
            found.update(subs if len(subs) == len(node.names) else [node.module, *subs])
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def _graph() -> Dict[str, Set[str]]:
    modules = _modules()
    return {name: {t for t in _imports(path, modules) if t in modules and t != name} for name, path in modules.items()}


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_import_circles_even_through_imports_inside_functions() -> None:
    graph = _graph()
    assert "dcn_inspect.hooks" in graph and "dcn_inspect.records" in graph["dcn_inspect.hooks"]
    assert _cycles(graph) == []
    # The check itself finds a circle when there is one.
    assert _cycles({**graph, "dcn_inspect.records": graph["dcn_inspect.records"] | {"dcn_inspect.hooks"}})


def test_layers_import_only_downwards() -> None:
    graph = _graph()
    for name, targets in graph.items():
        short = name.removeprefix("dcn_inspect.")
        if not name.startswith(("dcn_inspect.cli", "dcn_inspect.__main__")):
            assert not any(t.startswith("dcn_inspect.cli") for t in targets), f"{name} imports the CLI"
        if not name.startswith(("dcn_inspect.cli", "dcn_inspect.commands")):
            assert not any(t.startswith("dcn_inspect.commands") for t in targets), f"{name} imports a command module"
        if short in ANALYSIS:
            bad = [t for t in targets if t.startswith(ABOVE_ANALYSIS)]
            assert not bad, f"analysis module {name} imports {bad}"
        if name.startswith("dcn_inspect.ops"):
            bad = [t for t in targets if not t.startswith(("dcn_inspect.ops", "dcn_inspect.errors"))]
            assert not bad, f"{name} imports {bad} (the ops layer stands alone)"


def test_cli_modules_import_no_library_at_module_level() -> None:
    modules = _modules()
    light = ("dcn_inspect.cli", "dcn_inspect.defaults", "dcn_inspect.errors")
    heavy = ("dcn_inspect", "torch", "numpy", "pandas", "matplotlib", "PIL", "rich")
    for name, path in modules.items():
        if name.startswith("dcn_inspect.cli"):
            top = _imports(path, modules, top_level_only=True)
            bad = sorted(t for t in top if t.split(".")[0] in heavy and not t.startswith(light))
            assert not bad, f"{name} imports {bad} at module level (keeps --help slow)"


def _error_calls() -> List[ast.Call]:
    calls = []
    for path in PACKAGE.rglob("*.py"):
        if "cli" in path.relative_to(PACKAGE).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) in ("InputError", "ImageError", "warn"):
                calls.append(node)
    return calls


def _literal_text(node: ast.AST) -> str:
    return " ".join(n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str))


def test_library_errors_name_parameters_not_flags() -> None:
    calls = _error_calls()
    assert len(calls) > 100
    flagged = [ast.unparse(call)[:120] for call in calls if re.search(r"(^|[\s(`])--[a-z]", _literal_text(call.args[0]) if call.args else "")]
    assert flagged == []


def test_every_parameter_an_error_names_is_an_option_of_some_command() -> None:
    import typer.main

    from dcn_inspect.cli import app
    from dcn_inspect.cli.render import FALLBACK_FLAGS

    group = typer.main.get_command(app)
    known = {param.name for command in group.commands.values() for param in command.params} | set(FALLBACK_FLAGS)
    named: Set[str] = set()
    for call in _error_calls():
        for keyword in call.keywords:
            if keyword.arg == "param" and isinstance(keyword.value, ast.Constant):
                named.add(keyword.value.value)
        if call.args:
            named.update(re.findall(r"`([A-Za-z_]\w*)`", _literal_text(call.args[0])))
    assert {"at", "resize", "fmt", "class_choice", "max_pixels", "strict", "rois"} <= named
    assert sorted(named - known) == []


def test_cli_renders_parameter_names_as_the_commands_flags() -> None:
    from dcn_inspect.cli.render import error_line
    from dcn_inspect.errors import InputError

    error = InputError("'jpg': use png, svg or pdf (see `max_pixels`, `rois_file`)", param="fmt")
    assert str(error) == "fmt 'jpg': use png, svg or pdf (see max_pixels, rois_file)"
    assert error_line(error, "bins") == "--format 'jpg': use png, svg or pdf (see --max-pixels, --rois)"
    assert error_line(InputError(": unknown", param="layers"), "dilation-stats") == "--layers: unknown"


@pytest.mark.parametrize("argv", [["--help"], ["sample-points", "--help"], ["bins", "--no-such-flag"]])
def test_help_and_usage_errors_do_not_import_torch_or_pandas(argv: List[str]) -> None:
    """Issue #15: ``--help`` under 0.5 s; torch (~3 s) and pandas (~0.3 s) are the heavy imports."""
    code = (
        "import sys\n"
        f"sys.argv = ['dcn-inspect', *{argv!r}]\n"
        "from dcn_inspect.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'pandas') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout + done.stderr

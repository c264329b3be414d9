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

#: The package's layers, bottom first: one folder each (README "Code map"). A module imports
#: only from its own layer and the layers below it.
LAYERS = ("core", "ops", "models", "io", "capture", "analysis", "report", "commands", "cli")
#: What the analysis layer may not import even though it sits above it: writing files, showing
#: progress and loading models are the commands' business.
ANALYSIS_MAY_NOT_IMPORT = (
    "dcn_inspect.io.outputs",
    "dcn_inspect.io.progress",
    "dcn_inspect.models.loading",
    "dcn_inspect.models.importers",
)
#: Size limits (issue #20): a module is read in one sitting, a function on one screen or two.
MAX_MODULE_LINES = 700
MAX_FUNCTION_LINES = 80


def _layer(module: str) -> str:
    """The layer of a module ``dcn_inspect.<layer>...`` (its first folder)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _modules() -> Dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


def _imports(path: Path, modules: Dict[str, Path], top_level_only: bool = False) -> Set[str]:
    """dcn_inspect modules (and third-party roots) ``path`` imports; ``from pkg import sub`` counts
    as ``pkg.sub``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: Set[str] = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = [
                f"{node.module}.{a.name}"
                for a in node.names
                if f"{node.module}.{a.name}" in modules
            ]
            found.update(subs if len(subs) == len(node.names) else [node.module, *subs])
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def _graph() -> Dict[str, Set[str]]:
    modules = _modules()
    return {
        name: {t for t in _imports(path, modules) if t in modules and t != name}
        for name, path in modules.items()
    }


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
    assert (
        "dcn_inspect.capture.session" in graph
        and "dcn_inspect.capture.records" in graph["dcn_inspect.capture.session"]
    )
    assert _cycles(graph) == []
    # The check itself finds a circle when there is one.
    assert _cycles(
        {
            **graph,
            "dcn_inspect.capture.records": graph["dcn_inspect.capture.records"]
            | {"dcn_inspect.capture.session"},
        }
    )


def test_every_module_lives_in_a_layer_folder() -> None:
    loose = [
        name
        for name in _modules()
        if name.count(".") == 1
        and name not in ("dcn_inspect.__main__",)
        and _layer(name) not in LAYERS
        and _layer(name) != "data"
    ]
    assert loose == [], f"modules outside the layer folders {LAYERS}: {loose}"


def test_layers_import_only_downwards() -> None:
    graph = _graph()
    checked = 0
    for name, targets in graph.items():
        layer = _layer(name)
        if layer not in LAYERS:
            continue
        for target in targets:
            target_layer = _layer(target)
            if target_layer in LAYERS:
                checked += 1
                assert LAYERS.index(target_layer) <= LAYERS.index(layer), (
                    f"{name} ({layer}) imports {target} ({target_layer}), a layer above it"
                )
        if layer == "analysis":
            bad = [t for t in targets if t.startswith(ANALYSIS_MAY_NOT_IMPORT)]
            assert not bad, f"analysis module {name} imports {bad}"
        if layer == "ops":
            bad = [
                t
                for t in targets
                if not t.startswith(("dcn_inspect.ops", "dcn_inspect.core.errors"))
            ]
            assert not bad, f"{name} imports {bad} (the ops layer stands alone)"
    assert checked > 200
    # The rule finds an upward import when there is one.
    assert LAYERS.index(_layer("dcn_inspect.report.bins")) > LAYERS.index(
        _layer("dcn_inspect.analysis.bins")
    )


def test_modules_and_functions_stay_small() -> None:
    too_long = []
    for name, path in _modules().items():
        text = path.read_text(encoding="utf-8")
        lines = text.count("\n")
        if lines > MAX_MODULE_LINES:
            too_long.append(f"{name}: {lines} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{name}.{node.name}: {length} lines")
    assert too_long == []


def test_one_registry_lists_every_capture_adapter() -> None:
    """Every LayerAdapter subclass in the package is registered once, in the registry's fixed
    order, and the "looked for" message comes from that table alone."""
    from dcn_inspect.capture import adapters
    from dcn_inspect.capture.records import LayerAdapter

    defined = set()
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef) and any(
                getattr(base, "id", None) == "LayerAdapter" for base in node.bases
            ):
                defined.add(node.name)
    registered = [type(adapter).__name__ for adapter in adapters.ADAPTERS]
    assert sorted(registered) == sorted(defined) and len(set(registered)) == len(registered)
    assert all(isinstance(a, LayerAdapter) for a in adapters.ADAPTERS)
    families = [entry.family for entry in adapters.CAPTURE_REGISTRY]
    assert adapters.looked_for().split("; ")[0].startswith(families[0])
    # The message lists the families in the table's order, last the attention cores.
    listed = [part.split(": ")[0] for part in adapters.looked_for().split("; ")]
    assert listed == [e.family for e in adapters.CAPTURE_REGISTRY if e.recognises]
    assert listed[-1] == "deformable attention cores"


def test_cli_modules_import_no_library_at_module_level() -> None:
    modules = _modules()
    light = ("dcn_inspect.cli", "dcn_inspect.core.defaults", "dcn_inspect.core.errors")
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
            if isinstance(node, ast.Call) and getattr(
                node.func, "id", getattr(node.func, "attr", None)
            ) in ("InputError", "ImageError", "warn"):
                calls.append(node)
    return calls


def _literal_text(node: ast.AST) -> str:
    return " ".join(
        n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)
    )


def test_library_errors_name_parameters_not_flags() -> None:
    calls = _error_calls()
    assert len(calls) > 100
    flagged = [
        ast.unparse(call)[:120]
        for call in calls
        if re.search(r"(^|[\s(`])--[a-z]", _literal_text(call.args[0]) if call.args else "")
    ]
    assert flagged == []


def test_every_parameter_an_error_names_is_an_option_of_some_command() -> None:
    import typer.main

    from dcn_inspect.cli import app
    from dcn_inspect.cli.spelling import FALLBACK_FLAGS

    group = typer.main.get_command(app)
    known = {param.name for command in group.commands.values() for param in command.params} | set(
        FALLBACK_FLAGS
    )
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
    from dcn_inspect.core.errors import InputError

    error = InputError("'jpg': use png, svg or pdf (see `max_pixels`, `rois_file`)", param="fmt")
    assert str(error) == "fmt 'jpg': use png, svg or pdf (see max_pixels, rois_file)"
    assert (
        error_line(error, "bins")
        == "--format 'jpg': use png, svg or pdf (see --max-pixels, --rois)"
    )
    assert (
        error_line(InputError(": unknown", param="layers"), "dilation-stats") == "--layers: unknown"
    )


@pytest.mark.parametrize(
    "argv", [["--help"], ["sample-points", "--help"], ["bins", "--no-such-flag"]]
)
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


#: Library strings that may spell a flag: the name of a command's mode, and a column description
#: that cites another command's invocation (both command-line words, not parameters).
FLAG_TEXT_ALLOWED = ("receptive-field --stats", "(the unit_selection of sample-points --boxes)")


def _flag_strings(path: Path) -> List[str]:
    """String constants of ``path`` (docstrings excepted) that spell a command-line flag."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    found = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in docstrings
            and re.search(r"(?<![\w-])--[a-z]", node.value)
            and not any(allowed in node.value for allowed in FLAG_TEXT_ALLOWED)
        ):
            found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {node.value[:60]!r}")
    return found


def test_library_text_never_spells_a_flag() -> None:
    """Provenance the library writes (how a unit or RoI was chosen) names parameters in backticks
    and goes through ``spell_parameters``: flags are the CLI's words (issue #20)."""
    found = [
        line
        for path in PACKAGE.rglob("*.py")
        if "cli" not in path.relative_to(PACKAGE).parts
        for line in _flag_strings(path)
    ]
    assert found == []
    probe = PACKAGE.parent / "cli_tests" / "test_structure.py"
    assert _flag_strings(probe)  # the check finds a flag where there is one


def test_provenance_is_spelled_by_the_front_end() -> None:
    from dcn_inspect.core.errors import parameter_spelling, spell_parameters

    assert spell_parameters("`at` 10,10") == "at 10,10"
    with parameter_spelling(lambda name: "--" + name.replace("_", "-")):
        assert spell_parameters("`rois_file` a.csv") == "--rois-file a.csv"
    assert spell_parameters("`rois_file` a.csv") == "rois_file a.csv"


#: The features whose layers share one name (command, analysis, report, CLI), and the shared
#: options (declared as flags in cli/, as option groups in commands/).
FEATURE_NAMES = {
    "sample_points", "dilation_stats", "bins", "offsets", "receptive_field", "info", "options",
    "attention", "attention_trees", "attention_stats", "explore",
}  # fmt: skip


def test_one_file_name_per_feature() -> None:
    """Two modules share a file name only when they are the same feature's layers."""
    seen: Dict[str, List[str]] = {}
    for name in _modules():
        if name.startswith("dcn_inspect.") and name.count(".") >= 2:
            seen.setdefault(name.rsplit(".", 1)[1], []).append(name)
    shared = {stem: names for stem, names in seen.items() if len(names) > 1}
    assert set(shared) <= FEATURE_NAMES, {s: n for s, n in shared.items() if s not in FEATURE_NAMES}

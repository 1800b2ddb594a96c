"""Rules of the house that a reader should not have to check by hand."""

from __future__ import annotations

import ast
from pathlib import Path

import tandem
from tests.helpers.paths import REPO_ROOT

ROOT = Path(tandem.__file__).parent
STAGES = ("gateway", "tokenizer", "scheduler", "prefill", "decode")


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports (top level and inside functions)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module)
    return out


def test_no_stage_package_imports_another_stage_package():
    """A stage reaches another only through the wire (transport): its messages and clients."""
    crossings = []
    for stage in STAGES:
        for path in (ROOT / "services" / stage).rglob("*.py"):
            for module in imported_modules(path):
                parts = module.split(".")
                if parts[:2] == ["tandem", "services"] and len(parts) > 2:
                    if parts[2] in STAGES and parts[2] != stage:
                        crossings.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not crossings, crossings


def test_the_wire_package_imports_no_stage():
    for path in (ROOT / "services" / "transport").rglob("*.py"):
        stages = [m for m in imported_modules(path) if m.split(".")[2:3] in ([s] for s in STAGES)]
        assert not stages, f"{path.name} imports {stages}"


def imported_test_modules(source: str) -> set[str]:
    """The test modules a file imports: `tests.` modules other than `tests.helpers` and
    conftest, and any `test_*` module by its bare or relative name."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            modules = ["." * node.level + (node.module or "")]
        else:
            continue
        for module in modules:
            parts = module.lstrip(".").split(".")
            shared = parts[:2] == ["tests", "helpers"] or parts[-1] == "conftest"
            if not shared and (parts[0] == "tests" or any(p.startswith("test_") for p in parts)):
                found.add(module)
    return found


def test_the_import_check_sees_each_way_of_importing_a_test_module():
    source = (
        "from tests.integration.services.test_server import server\n"
        "import tests.unit.test_sampler\n"
        "from test_cluster import start_cluster\n"
        "def f():\n"
        "    from .test_bus import nats\n"
        "from tests.helpers.cluster import stop_cluster\n"
        "import tests.helpers\n"
        "from tandem.engine import test_mode\n"
    )
    assert imported_test_modules(source) == {
        "tests.integration.services.test_server",
        "tests.unit.test_sampler",
        "test_cluster",
        ".test_bus",
    }


def test_no_test_module_imports_another():
    """Shared helpers live in tests/helpers and shared fixtures in a conftest.py: importing a
    test module runs it a second time under another name, and ties its tests to another's."""
    tests_dir = REPO_ROOT / "tests"
    paths = sorted(tests_dir.rglob("*.py"))
    assert len(paths) > 40
    crossings = [
        f"{path.relative_to(tests_dir)} imports {module}"
        for path in paths
        for module in sorted(imported_test_modules(path.read_text()))
    ]
    assert not crossings, crossings


def module_name(path: Path) -> str:
    name = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)
    return name.removesuffix(".__init__")


def import_graph() -> dict[str, set[str]]:
    """Module -> the tandem modules it imports (at load or inside functions)."""
    paths = {module_name(p): p for p in ROOT.rglob("*.py") if "v1" not in p.parts}
    graph = {}
    for name, path in paths.items():
        edges = imported_modules(path) & paths.keys()
        for node in ast.walk(ast.parse(path.read_text())):  # from package import module
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                edges |= {f"{node.module}.{a.name}" for a in node.names} & paths.keys()
        graph[name] = edges - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_anywhere():
    assert cycles(import_graph()) == []


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_gateway_loads_no_torch():
    """A gateway holds a client, never an engine: its package runs without torch."""
    import subprocess
    import sys

    modules = [module_name(p) for p in (ROOT / "services" / "gateway").glob("*.py")]
    code = "import sys\n" + "".join(f"import {m}\n" for m in modules)
    code += "assert 'torch' not in sys.modules, 'torch loaded'\n"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_services_common_is_gone():
    assert not (ROOT / "services" / "common").exists()


def test_the_subject_page_is_the_subject_table():
    from tandem.services.transport.subjects import grpc_table, markdown_table

    page = (REPO_ROOT / "docs" / "subjects.md").read_text()
    assert markdown_table() in page and grpc_table() in page, "regenerate docs/subjects.md"


MAX_MODULE_LINES = 500


def test_no_module_is_over_500_lines():
    """A module past this holds two things that each want a module of their own: split it by
    what it holds. The generated protobuf modules (tandem/v1) are not written by hand."""
    too_long = {
        str(path.relative_to(ROOT)): num_lines
        for path in sorted(ROOT.rglob("*.py"))
        if path.relative_to(ROOT).parts[0] != "v1"
        and (num_lines := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not too_long, f"modules over {MAX_MODULE_LINES} lines: {too_long}"

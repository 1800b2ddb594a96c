"""Rules of the house that a reader should not have to check by hand."""

from __future__ import annotations

import ast
from pathlib import Path

import tandem

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

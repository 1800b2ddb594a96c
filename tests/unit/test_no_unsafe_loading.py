"""Nothing on the wire or in model loading can run code: no pickle (or torch.load, which
unpickles), no eval/exec, no remote code, no YAML object construction. Checked on the source,
so a new use shows up here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.helpers.paths import REPO_ROOT

PACKAGE = REPO_ROOT / "tandem"
SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if "v1" not in p.relative_to(PACKAGE).parts)
BANNED_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}
BANNED_CALLS = {"eval", "exec", "compile", "__import__"}
BANNED_ATTRIBUTES = {("torch", "load"), ("yaml", "load"), ("yaml", "unsafe_load"),
                     ("numpy", "load"), ("np", "load")}  # fmt: skip


def problems(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names]
            module = getattr(node, "module", None) or ""
            for name in [module, *names]:
                if name.split(".")[0] in BANNED_MODULES:
                    found.append(f"line {node.lineno}: imports {name}")
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id in BANNED_CALLS:
                found.append(f"line {node.lineno}: calls {func.id}()")
            if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
                if (func.value.id, func.attr) in BANNED_ATTRIBUTES:
                    found.append(f"line {node.lineno}: calls {func.value.id}.{func.attr}()")
            for kw in node.keywords:
                if kw.arg == "trust_remote_code" and not (
                    isinstance(kw.value, ast.Constant) and kw.value.value is False
                ):
                    found.append(f"line {node.lineno}: trust_remote_code not False")
    return found


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_code_runs_from_data(path: Path):
    assert problems(path.read_text()) == []


def test_the_check_finds_each_kind():
    bad = (
        "import pickle\nfrom dill import loads\neval('1')\ntorch.load('x')\n"
        "AutoModel.from_pretrained('m', trust_remote_code=True)\nyaml.load(s)\n"
    )
    assert len(problems(bad)) == 6

"""Tests share helpers through harness.py and fixtures through conftest.py, never by importing each other."""

import ast
from pathlib import Path

TESTS = Path(__file__).parent


def imported_modules(path: Path) -> set[str]:
    """The top-level names of every module PATH imports, at any depth (function-local imports too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_no_test_module_imports_another_or_conftest():
    test_modules = {path.stem for path in TESTS.glob("test_*.py")}
    offenders = {
        path.name: sorted(imported_modules(path) & (test_modules | {"conftest"}))
        for path in sorted(TESTS.glob("test_*.py"))
    }
    assert not {name: modules for name, modules in offenders.items() if modules}, (
        "move what is shared to tests/harness.py (helpers) or tests/conftest.py (fixtures)"
    )

"""The layout holds: tests share helpers through harness.py and conftest.py, never by importing each other;
dependencies point one way (front doors -> core <- storage); onnxruntime is imported in one module."""

import ast
from pathlib import Path

TESTS = Path(__file__).parent
PACKAGE = TESTS.parent / "mds_grpc"


def imported_modules(path: Path) -> set[str]:
    """The full names of every module PATH imports, at any depth (function-local imports too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_no_test_module_imports_another_or_conftest():
    test_modules = {path.stem for path in TESTS.glob("test_*.py")}
    offenders = {
        path.name: sorted({name.split(".")[0] for name in imported_modules(path)} & (test_modules | {"conftest"}))
        for path in sorted(TESTS.glob("test_*.py"))
    }
    assert not {name: modules for name, modules in offenders.items() if modules}, (
        "move what is shared to tests/harness.py (helpers) or tests/conftest.py (fixtures)"
    )


def test_the_core_depends_on_no_front_door_and_no_storage_backend():
    """The store Protocols (core/stores.py) are the core's ports: storage/ implements them, the core never
    imports storage/, and neither imports a front door."""
    outward = ("mds_grpc.api", "mds_grpc.client", "mds_grpc.cli", "mds_grpc.server", "mds_grpc.storage", "mds.")
    for folder, forbidden in (("core", outward), ("storage", outward[:4])):
        for path in sorted((PACKAGE / folder).glob("*.py")):
            wrong = sorted(name for name in imported_modules(path) if name.startswith(forbidden))
            assert not wrong, f"mds_grpc/{folder}/{path.name} imports {wrong}"


def test_onnxruntime_is_imported_by_the_runtime_alone():
    importers = sorted(
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if any(name.split(".")[0] == "onnxruntime" for name in imported_modules(path))
    )
    assert importers == ["core/runtime.py"]

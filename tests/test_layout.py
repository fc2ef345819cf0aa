"""The tests' own layout: each test module sits in the folder of the package it tests (tests/<package>/
mirrors src/emoserve/<package>/), and no test module imports another - shared helpers live in
tests/support/, shared fixtures in a conftest.py."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.support.paths import SRC, TESTS

EXTRA_FOLDERS = {"support", "deploy", "benchmarks", "docs", "fixtures"}  # not packages of emoserve


def packages(src: Path) -> set[str]:
    """emoserve's packages, as paths relative to src ("api", "webui", ...), and its top-level modules
    that have a folder of tests (cli.py: tests/cli/, as it becomes the package cli/)."""
    found = {str(init.parent.relative_to(src)) for init in src.rglob("__init__.py") if init.parent != src}
    return found | {module.stem for module in src.glob("*.py") if module.stem != "__init__"}


def misplaced(tests: Path, src: Path) -> list[str]:
    """Test modules whose folder mirrors no package of src and is none of EXTRA_FOLDERS."""
    allowed = packages(src) | EXTRA_FOLDERS
    found = []
    for module in sorted(tests.rglob("test_*.py")):
        folder = module.parent.relative_to(tests)
        if folder != Path(".") and str(folder) not in allowed and folder.parts[0] not in EXTRA_FOLDERS:
            found.append(str(module.relative_to(tests)))
    return found


def imported_names(node: ast.Import | ast.ImportFrom) -> list[str]:
    """The dotted names an import statement reaches, each module and each name taken from it."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    return (
        [base, *(f"{base}.{alias.name}".lstrip(".") for alias in node.names)]
        if base
        else [alias.name for alias in node.names]
    )


def imports_of_test_modules(module: Path, tests: Path) -> list[str]:
    """The imports in `module` that reach another test module: tests.<x> where x is not support, or a
    relative import of a test_* module."""
    found = []
    for node in ast.walk(ast.parse(module.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Import | ast.ImportFrom):
            continue
        relative = isinstance(node, ast.ImportFrom) and node.level > 0
        for name in imported_names(node):
            parts = name.split(".")
            if relative:
                breach = any(part.startswith("test_") for part in parts)
            else:
                breach = parts[0] == tests.name and len(parts) > 1 and parts[1] != "support"
            if breach:
                found.append(f"{module.relative_to(tests)}:{node.lineno}: {name}")
                break
    return found


def cross_imports(tests: Path) -> list[str]:
    return [hit for module in sorted(tests.rglob("*.py")) for hit in imports_of_test_modules(module, tests)]


def test_every_test_module_mirrors_a_package_or_an_allowed_folder() -> None:
    assert misplaced(TESTS, SRC) == []


def test_every_test_folder_is_a_package() -> None:
    """tests/ and each folder of test modules is a package, so that equal names in two folders
    (tests/api/test_stream.py, tests/cli/test_stream.py) are two modules."""
    folders = {module.parent for module in TESTS.rglob("test_*.py")}
    assert [str(f) for f in sorted(folders) if not (f / "__init__.py").exists()] == []


def test_no_test_module_imports_another() -> None:
    assert cross_imports(TESTS) == []


def test_the_checks_see_a_misplaced_module_and_an_import_of_a_test_module(tmp_path: Path) -> None:
    """The same functions on a made-up tree: each kind of breach is found, and what is allowed is not."""
    src, tests = tmp_path / "src" / "emoserve", tmp_path / "tests"
    for package in ("api", "serving"):
        (src / package).mkdir(parents=True)
        (src / package / "__init__.py").write_text("")
    (src / "__init__.py").write_text("")
    (src / "cli.py").write_text("")
    for folder in ("api", "cli", "support", "deploy", "nowhere"):
        (tests / folder).mkdir(parents=True)
    (tests / "test_top.py").write_text("from tests.support.server import LIVE\nimport tests.support\n")
    (tests / "api" / "test_app.py").write_text("from ..support.server import LIVE\nfrom .conftest import x\n")
    (tests / "deploy" / "test_kubernetes.py").write_text("from tests.api.test_app import helper\n")
    (tests / "cli" / "test_predict.py").write_text("import emoserve.cli\nfrom tests.support import paths\n")
    (tests / "nowhere" / "test_orphan.py").write_text("from .test_sibling import helper\n")
    (tests / "support" / "server.py").write_text("from ..api import test_app\nimport tests.test_top\n")
    assert misplaced(tests, src) == ["nowhere/test_orphan.py"]
    assert cross_imports(tests) == [
        "deploy/test_kubernetes.py:1: tests.api.test_app",
        "nowhere/test_orphan.py:1: test_sibling",
        "support/server.py:1: api.test_app",
        "support/server.py:2: tests.test_top",
    ]

"""Who may import whom outside the product's layers (which import-linter checks, see
pyproject.toml): a test module imports no other test module (shared code is in
tests/support/, fixtures in tests/conftest.py), testbed/ and bench/ import nothing from
tests/, and the product imports neither tests/ nor testbed/."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("app", "workers", "service", "infra", "schemas", "merging", "weightsmith")


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth (inside functions too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def matches(module: str, forbidden: str) -> bool:
    """``forbidden`` names a module (and those below it) or, ending in ``_``, a prefix."""
    if forbidden.endswith("_"):
        return module.startswith(forbidden)
    return module == forbidden or module.startswith(forbidden + ".")


def offending(
    paths: list[Path], forbidden: tuple[str, ...], root: Path = ROOT
) -> dict[str, list[str]]:
    """The paths that import a forbidden module (or one below it), with those imports."""
    out = {}
    for path in paths:
        bad = sorted(m for m in imported_modules(path) if any(matches(m, f) for f in forbidden))
        if bad:
            out[str(path.relative_to(root))] = bad
    return out


def test_the_checker_finds_imports_in_functions_and_from_imports(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("import os\ndef f():\n    from tests import test_api\n")
    (tmp_path / "b.py").write_text("from tests.test_runner import linear\n")
    (tmp_path / "c.py").write_text("from tests.support.checkpoints import linear\n")
    paths = sorted(tmp_path.glob("*.py"))

    found = offending(paths, ("tests.test_",), root=tmp_path)

    assert found == {
        "a.py": ["tests.test_api"],
        "b.py": ["tests.test_runner", "tests.test_runner.linear"],
    }


def test_no_test_module_imports_another() -> None:
    modules = sorted((ROOT / "tests").glob("test_*.py"))
    assert len(modules) > 20
    assert offending(modules, ("tests.test_", "tests.conftest")) == {}


def test_shared_test_code_and_the_benchmarks_import_no_test() -> None:
    paths = [
        *(ROOT / "tests" / "support").glob("*.py"),
        *(ROOT / "testbed").glob("*.py"),
        *(ROOT / "bench").glob("*.py"),
    ]
    assert offending(paths, ("tests.test_", "tests.conftest")) == {}
    outside = [p for p in paths if "tests" not in p.relative_to(ROOT).parts]
    assert offending(outside, ("tests",)) == {}


def test_the_product_imports_neither_tests_nor_the_testbed() -> None:
    paths = [p for package in PRODUCT for p in (ROOT / package).rglob("*.py")]
    assert len(paths) > 50
    assert offending(paths, ("tests", "testbed")) == {}

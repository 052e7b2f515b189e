"""The merge-method registry (merging/): discovery, the torch-free layer, the generated docs.

A method is one module of merging/methods/; the registry finds it, the recipe schema
validates against its declarations without torch, docs/recipes.md lists it, and the engine
runs its math. These tests pin each of those promises down.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from merging import METHODS
from merging.method import MergeMethod
from merging.reference import BEGIN, END, main, with_reference

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "merging"


def test_docs_recipes_method_reference_is_what_the_registry_generates():
    page = (ROOT / "docs" / "recipes.md").read_text(encoding="utf-8")
    assert with_reference(page) == page, "run: python -m merging.reference"
    for name in METHODS:  # every method is listed
        assert f"### `{name}` — " in page


def test_the_reference_generator_rewrites_only_its_section_and_check_reports_staleness(
    tmp_path: Path,
):
    page = tmp_path / "recipes.md"
    page.write_text(f"# hand-written\n\n{BEGIN}\nstale\n{END}\n\nhand-written tail\n")
    assert main([str(page), "--check"]) == 1
    assert main([str(page)]) == 0
    text = page.read_text()
    assert text.startswith("# hand-written\n") and text.endswith("hand-written tail\n")
    assert "stale" not in text and "| `density` | each model | 1 |" in text
    assert main([str(page), "--check"]) == 0
    page.write_text("no markers")
    with pytest.raises(ValueError, match="no"):
        main([str(page)])


def test_every_method_module_registers_its_methods_under_unique_names():
    modules = sorted(p.stem for p in (PACKAGE / "methods").glob("*.py") if p.stem != "__init__")
    by_module = {
        m: [n for n, v in METHODS.items() if type(v).__module__.endswith(m)] for m in modules
    }
    assert all(by_module.values()), f"modules registering nothing: {by_module}"
    assert list(METHODS) == sorted(METHODS)
    for name, method in METHODS.items():
        assert isinstance(method, MergeMethod) and method.name == name
        assert method.title and method.reference.startswith("https://")
        names = method.parameter_names
        assert len(set(names)) == len(names), f"{name}: a parameter declared twice"


def test_the_task_vector_variants_are_data_over_one_class():
    from merging.methods.task_vectors import TaskVectorMethod

    family = {n: m for n, m in METHODS.items() if isinstance(m, TaskVectorMethod)}
    assert set(family) == {
        "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della",
        "della_linear",
    }  # fmt: skip
    assert {n for n, m in family.items() if m.consensus} == {
        "ties", "dare_ties", "breadcrumbs_ties", "della",
    }  # fmt: skip
    assert type(family["dare_ties"].sparsify) is type(family["dare_linear"].sparsify)


def test_importing_the_registry_and_validating_a_recipe_loads_no_torch_nor_engine():
    # The API validates recipes with this package and has no torch: reading every
    # declaration, running the recipe rules and generating the docs must not import it.
    code = textwrap.dedent(
        """
        import sys
        from merging import METHODS
        from merging.reference import methods_reference
        from schemas.recipe import RecipeError, parse_recipe
        methods_reference()
        parse_recipe({"merge_method": "ties", "base_model": "org/base",
                      "models": [{"model": "org/a", "parameters": {"density": 0.5}}]})
        try:
            parse_recipe({"merge_method": "slerp", "base_model": "org/base",
                          "models": [{"model": "org/a"}]})
        except RecipeError:
            pass
        loaded = {m.split(".")[0] for m in sys.modules}
        assert not loaded & {"torch", "workers", "app", "infra"}, loaded & {"torch", "workers"}
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(top-level module, imported only for type checking) of every import in a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name.split(".")[0], id(node) in typing_only) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.module.split(".")[0], id(node) in typing_only))
    return found


def test_the_merging_package_imports_only_itself_and_the_standard_library():
    # It is the bottom layer: schemas, the service and the engine import it, never the other
    # way round; torch (and numpy, which comes with it) only through merging.lazy_torch,
    # on first use.
    for path in sorted(PACKAGE.rglob("*.py")):
        for module, typing_only in _imports(path):
            if module in ("merging", "__future__") or module in sys.stdlib_module_names:
                continue
            lazy = typing_only or path.name == "lazy_torch.py"
            allowed = module in ("torch", "numpy") and lazy
            assert allowed, f"{path.relative_to(ROOT)} imports {module}"


def test_a_method_is_one_new_file_the_registry_finds_and_the_engine_runs(tmp_path: Path):
    # A plain per-tensor method written as a new module of merging/methods/ (here placed in
    # another folder of that package's search path): no list or table is edited, and the
    # recipe schema, the docs generator and the engine all pick it up.
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "halfway.py").write_text(
        textwrap.dedent(
            '''
            """Halfway: the mean of the base and the first model, scaled (a test method)."""
            from merging.inputs import Block, TensorInputs
            from merging.method import MergeMethod, register
            from merging.parameters import ParameterSpec, ParamScope


            @register
            class Halfway(MergeMethod):
                name = "halfway"
                title = "Halfway"
                reference = "https://example.org/halfway"
                max_models = 1
                parameters = (
                    ParameterSpec("scale", float, 1.0, ParamScope.SHARED, "factor"),
                )

                def merge_block(self, x: TensorInputs, b: Block):
                    return b.base32().add(b.theta(0)).mul_(x.shared["scale"] / 2)
            '''
        )
    )
    models = tmp_path / "models"
    code = textwrap.dedent(
        f"""
        import torch
        from pathlib import Path
        from safetensors.torch import load_file, save_file
        import merging, merging.methods
        merging.methods.__path__.append({str(tmp_path / "extra")!r})
        merging.METHODS.update(merging._discover())
        from merging.reference import methods_reference
        from schemas.recipe import parse_recipe
        from workers.merge.engine import run_merge

        assert "### `halfway` — Halfway" in methods_reference()
        root = Path({str(models)!r})
        base = {{"w": torch.arange(600_000, dtype=torch.float32).reshape(600, 1000)}}
        other = {{"w": base["w"] * 3}}
        for name, tensors in (("base", base), ("other", other)):
            (root / name).mkdir(parents=True)
            save_file(tensors, str(root / name / "model.safetensors"))
        recipe = parse_recipe({{
            "merge_method": "halfway", "base_model": str(root / "base"),
            "models": [{{"model": str(root / "other")}}], "parameters": {{"scale": 0.5}},
        }})
        run_merge(recipe, root / "out")
        (shard,) = (root / "out").glob("*.safetensors")
        assert torch.equal(load_file(str(shard))["w"], base["w"] * 4 * 0.5 / 2)
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)

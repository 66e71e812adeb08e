"""The package's import structure: no import cycles between its modules (imports inside functions
count too: they hide a cycle rather than remove it), every module imports on its own in a fresh
interpreter, and a source tree without the built C core says how to build it."""
import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import deepspot_napari

PACKAGE = Path(deepspot_napari.__file__).resolve().parent  # the one under test: installed or built in place
OPTIONAL = {"_widgets": "napari"}  # needs the napari extra


def source(module: str) -> Path:
    return PACKAGE / module / "__init__.py" if (PACKAGE / module).is_dir() else PACKAGE / f"{module}.py"


def package_modules() -> list[str]:
    """The package's modules and subpackages (not the package itself)."""
    return sorted({path.stem for path in PACKAGE.glob("*.py") if path.stem != "__init__"}
                  | {path.parent.name for path in PACKAGE.glob("*/__init__.py")})


def imported_modules(module: str) -> set[str]:
    """The package's modules that `module` imports anywhere in its code (module level or in a function)."""
    tree = ast.parse(source(module).read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found.update([node.module.split(".")[0]] if node.module else [alias.name for alias in node.names])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("deepspot_napari."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[1] for alias in node.names if alias.name.startswith("deepspot_napari."))
    return found & set(package_modules()) - {module}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node):
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycles_between_the_package_modules():
    graph = {module: imported_modules(module) for module in package_modules()}
    assert graph["model"] and graph["cli"]  # the scan sees the package's imports
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("module", package_modules())
def test_every_module_imports_first_in_a_fresh_interpreter(module):
    """Imported first, before anything else of the package: the order in which a cycle breaks."""
    if module in OPTIONAL:
        pytest.importorskip(OPTIONAL[module], reason=f"{OPTIONAL[module]} is not installed")
    env = {**os.environ, "PYTHONPATH": str(PACKAGE.parent)}
    result = subprocess.run([sys.executable, "-c", f"import deepspot_napari.{module}"], cwd=PACKAGE.parent,
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr


def test_a_source_tree_without_the_built_core_says_how_to_build_it(tmp_path):
    source = tmp_path / "deepspot_napari"
    shutil.copytree(PACKAGE, source, ignore=shutil.ignore_patterns("_core*", "__pycache__"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", "from deepspot_napari import Model"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode != 0
    assert "not built" in result.stderr and "tools/dev_build.sh" in result.stderr, result.stderr
    assert "circular import" not in result.stderr

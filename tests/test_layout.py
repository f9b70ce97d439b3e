"""The layout holds: what production loads never pulls in development-only code.

Production is what Airflow and the `balances` CLI load to take snapshots and
reconcile them: dags/, extractors/, loaders/, pipeline/, reconciliation/, cli/.
Development-only code (devtools/, sandbox/, bench/, tests/) may import
production, never the other way round, so a deployment can leave it out.

The layers and that rule are import-linter contracts (``[tool.importlinter]``
in pyproject.toml), which see imports inside functions too; this file runs
them, and finds import cycles, which no contract names.
"""
import ast
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PRODUCTION = ("extractors", "loaders", "pipeline", "reconciliation", "cli")
DEVELOPMENT = ("devtools", "sandbox", "bench", "tests")


def production_modules() -> list[str]:
    names = []
    for package in PRODUCTION:
        names.append(package)
        names += [f"{package}.{m.name}" for m in pkgutil.iter_modules([str(ROOT / package)])]
    return names


def test_every_production_package_is_found():
    modules = production_modules()
    # A rename that empties a package would make the next test pass vacuously.
    for package in PRODUCTION:
        assert sum(m.startswith(package + ".") for m in modules) >= 3, package


@pytest.mark.parametrize("dag_file", sorted(p.name for p in (ROOT / "dags").glob("*.py")))
def test_production_imports_no_development_code(dag_file, tmp_path):
    # In a fresh interpreter: importing every production module and parsing
    # a DAG file must leave no development-only module loaded.
    probe = f"""
import importlib, importlib.util, json, sys
for name in {production_modules()!r}:
    importlib.import_module(name)
spec = importlib.util.spec_from_file_location("dag_under_test", {str(ROOT / "dags" / dag_file)!r})
spec.loader.exec_module(importlib.util.module_from_spec(spec))
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {DEVELOPMENT!r})))
"""
    env = {"AIRFLOW_HOME": str(tmp_path), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
           "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
           "BALANCES_CONFIG": str(ROOT / "config" / "balances.example.toml"),
           "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


@pytest.mark.parametrize("dag_file", sorted(p.name for p in (ROOT / "dags").glob("*.py")))
def test_no_dag_file_shadows_an_importable_module(dag_file, tmp_path):
    # Airflow puts the DAGs folder on sys.path, ahead of an editable install:
    # a DAG file named like a package (reconciliation.py beside reconciliation/)
    # makes every `import reconciliation.x` fail in the DAG processor.
    # Probed from outside the repository and the DAGs folder, so only what is
    # installed (the project included) is found.
    stem = dag_file.removesuffix(".py")
    probe = f"import importlib.util; print(importlib.util.find_spec({stem!r}) is None)"
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env={"PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "True", f"dags/{dag_file} has the name of an importable module {stem!r}"


def test_the_import_contracts_hold():
    """``lint-imports``: the layers and the production / development split (lazy imports included)."""
    lint = Path(sys.executable).parent / "lint-imports"
    done = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "Contracts: 3 kept, 0 broken." in done.stdout


def test_no_module_imports_itself_back():
    """No import cycle between modules, lazy imports included (``TYPE_CHECKING`` ones aside: they never run)."""
    import grimp

    packages = (*PRODUCTION, *DEVELOPMENT[:-1])
    graph = grimp.build_graph(*packages, exclude_type_checking_imports=True, cache_dir=None)
    cycles = import_cycles({m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules})
    assert cycles == []


def import_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that import each other round (strongly connected components), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for other in edges.get(module, ()):
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for module in sorted(edges):
        if module not in index:
            visit(module)
    return sorted(found)


def test_a_cycle_is_found():
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("dag_file", sorted(p.name for p in (ROOT / "dags").glob("*.py")))
def test_dag_files_import_only_production(dag_file):
    """Every import of a DAG file, inside its functions too (no contract sees dags/: it is no package)."""
    tree = ast.parse((ROOT / "dags" / dag_file).read_text())
    imported = {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                and node.module} | {alias.name.split(".")[0] for node in ast.walk(tree)
                                    if isinstance(node, ast.Import) for alias in node.names}
    ours = imported & {*PRODUCTION, *DEVELOPMENT}
    assert ours and ours <= set(PRODUCTION) - {"cli"}, ours

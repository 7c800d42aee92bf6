"""The folders are the layers: no top-level package imports one on its own floor or above it.

Floors, lowest first (a package may import only packages on lower floors):

    0  sum_models                        the model: torch code with no platform dependency
    1  sum_platform                      the shared base: config, workspace, day record, files, Feast glue,
                                         registry, versioning, simulator, partitions
    2  validation, serving, feature_repo the gates, SOAP serving, the Feast declarations
    3  sum_pipeline                      the daily tasks, promotion, faults, soak, Airflow glue, the CLI
    4  dags, benchmarks,                 Airflow's DAG files; the benchmarks; the stack scheduler's
       airflow_settings                  airflow_local_settings (preloads the tasks' modules)

Every import counts, at module level or inside a function (a lazy import hides a dependency from the
reader, not from the layering).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[2]
FLOORS = {
    "sum_models": 0,
    "sum_platform": 1,
    "validation": 2, "serving": 2, "feature_repo": 2,
    "sum_pipeline": 3,
    "dags": 4, "benchmarks": 4, "airflow_settings": 4,
}


def project_imports(folder: Path, root: Path = PROJECT_ROOT) -> list[tuple[str, int, str]]:
    """``(file, line, imported top-level package)`` for every import of a project package under ``folder``."""
    out = []
    for path in sorted(folder.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in FLOORS:
                    out.append((path.relative_to(root).as_posix(), node.lineno, top))
    return out


def layer_violations(root: Path = PROJECT_ROOT) -> list[str]:
    """Every import of a package on the importer's own floor (another package) or a higher one."""
    bad = []
    for package, floor in FLOORS.items():
        for file, line, target in project_imports(root / package, root):
            if target != package and FLOORS[target] >= floor:
                bad.append(f"{file}:{line} imports {target} (floor {FLOORS[target]}) from floor {floor}")
    return bad


def test_every_top_level_package_has_a_floor():
    packages = {p.name for p in PROJECT_ROOT.iterdir()
                if p.is_dir() and not p.name.startswith(".") and p.name != "tests" and any(p.glob("*.py"))}
    assert packages == set(FLOORS), "place a new top-level package on a floor in FLOORS"


def test_no_package_imports_its_own_floor_or_above():
    assert layer_violations() == []


def test_the_check_sees_an_upward_import_even_inside_a_function(tmp_path):
    # The check itself must be able to fail: a lazy upward import in the base is reported.
    for package in FLOORS:
        (tmp_path / package).mkdir()
    (tmp_path / "sum_platform" / "bad.py").write_text("def f():\n    from sum_pipeline import tasks\n")
    (tmp_path / "serving" / "sideways.py").write_text("import validation.gate\n")
    (tmp_path / "sum_pipeline" / "fine.py").write_text("from serving import rollout\nimport sum_models\n")
    found = layer_violations(tmp_path)
    assert len(found) == 2
    assert any("sum_platform/bad.py:2 imports sum_pipeline" in v for v in found)
    assert any("serving/sideways.py:1 imports validation" in v for v in found)


HEAVY_LIBRARIES = {"torch", "ray", "fastapi", "starlette", "feast", "great_expectations", "airflow", "dvc", "gto"}


def _module_file(name: str) -> Path | None:
    base = PROJECT_ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _module_level_imports(path: Path) -> set[str]:
    """Modules a file imports when it is imported (``if TYPE_CHECKING:`` blocks excluded)."""
    names: set[str] = set()

    def visit(stmts):
        for node in stmts:
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.unparse(node.test):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)

    visit(ast.parse(path.read_text()).body)
    return names


def pulls_heavy_library(name: str, seen: frozenset = frozenset()) -> bool:
    """Whether importing project module ``name`` imports torch, Ray, FastAPI, Feast, GX, Airflow or DVC."""
    parts = name.split(".")
    for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__, a/b/__init__, then a/b/c
        module = ".".join(parts[:i])
        path = _module_file(module)
        if path is None or module in seen:
            continue
        for imported in _module_level_imports(path):
            top = imported.split(".")[0]
            if top in HEAVY_LIBRARIES:
                return True
            if top in FLOORS and _module_file(imported) and pulls_heavy_library(imported, seen | {module}):
                return True
    return False


@pytest.mark.parametrize("package", sorted(FLOORS))
def test_light_project_imports_are_at_module_level(package):
    """Only project modules that pull a heavy library may be imported inside a function: a lazy import of
    a light module only hides the dependency graph from the reader."""
    hidden = []
    for path in sorted((PROJECT_ROOT / package).rglob("*.py")):
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if not (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module):
                    continue
                if node.module.split(".")[0] not in FLOORS:
                    continue
                targets = [f"{node.module}.{a.name}" for a in node.names if _module_file(f"{node.module}.{a.name}")]
                if not any(pulls_heavy_library(t) for t in (targets or [node.module])):
                    hidden.append(f"{path.relative_to(PROJECT_ROOT)}:{node.lineno} {node.module}")
    assert hidden == []


def test_the_heaviness_check_follows_imports_transitively():
    assert pulls_heavy_library("sum_models.snapshot")  # torch
    assert pulls_heavy_library("sum_platform.offline_store")  # feast
    assert not pulls_heavy_library("sum_platform.workspace")
    assert not pulls_heavy_library("sum_models.spec")

"""The arrows between the parts point one way (executor/__init__.py draws them): one table of
which package may import which, checked for every module, and no cycle between packages."""

from __future__ import annotations

import ast
import subprocess
import sys
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

from tests.helpers import ROOT

PACKAGE = ROOT / "executor"
# Each part and the parts it may import. "core" is executor's top-level modules (config,
# errors, units, redact, paths, params, outcomes): they import nothing above them.
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "store": {"core"},
    "machine": {"core"},
    "engine": {"core", "machine"},
    "gguf": {"core", "store"},
    "planning": {"core", "store", "machine", "engine", "gguf"},
    "run": {"core", "store", "machine", "engine", "gguf", "planning"},
    "jobs": {"core", "store", "machine", "gguf", "planning", "run"},
    "serve": {"core", "store", "machine", "planning", "jobs"},
    "cli": {"core", "store", "machine", "engine", "gguf", "planning", "run", "jobs", "serve"},
}
PARTS = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}


def part_of_module(name: str) -> str:
    """executor.run.worker → run; executor.config → core."""
    pieces = name.split(".")
    return pieces[1] if len(pieces) > 1 and pieces[1] in PARTS else "core"


def part_of_file(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    if relative.name == "__main__.py":
        return "cli"  # `python -m executor` is the command line
    return relative.parts[0] if len(relative.parts) > 1 else "core"


def imports_of(path: Path) -> set[str]:
    """Every module `path` imports, at the top or inside a function."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            if node.module == "executor":  # from executor import x: x may be a part
                names.update(f"executor.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_the_table_names_every_part_and_has_no_cycle():
    assert set(ALLOWED) == PARTS | {"core"}
    TopologicalSorter(ALLOWED).static_order()  # CycleError if the table had one


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_every_import_follows_the_table(path):
    part = part_of_file(path)
    wrong = {
        m
        for m in imports_of(path)
        if m.split(".")[0] == "executor"
        and part_of_module(m) != part
        and part_of_module(m) not in ALLOWED[part]
    }
    assert not wrong, f"{part} may not import {wrong}"


def test_the_parts_import_each_other_without_a_cycle():
    graph: dict[str, set[str]] = {}
    for path in MODULES:
        part = part_of_file(path)
        graph.setdefault(part, set()).update(
            part_of_module(m)
            for m in imports_of(path)
            if m.split(".")[0] == "executor" and part_of_module(m) != part
        )
    try:
        TopologicalSorter(graph).static_order()
    except CycleError as exc:
        pytest.fail(f"the parts import each other in a cycle: {exc.args[1]}")


def loaded_after_import(*modules: str) -> set[str]:
    """The modules a fresh interpreter holds after importing `modules`."""
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in modules)
        + "print('\\n'.join(sorted(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    return set(out.split())


def test_the_model_process_loads_only_the_engine_and_what_it_shares():
    """What the spawned model process imports: engine/, the CPU count, the parameters and
    outcomes of items; never the store, SQLAlchemy or Alembic."""
    engine = [
        "executor.engine.child",
        "executor.engine.fake",
        "executor.engine.faults",
        "executor.engine.llama",
    ]
    ours = {m for m in loaded_after_import(*engine) if m.startswith("executor")}
    shared = {"executor", "executor.machine", "executor.machine.cpus", "executor.params",
              "executor.outcomes"}  # fmt: skip
    assert {m for m in ours if not m.startswith("executor.engine")} <= shared
    loaded = loaded_after_import(*engine)
    assert "sqlalchemy" not in loaded and "alembic" not in loaded


def test_the_plan_is_pure():
    loaded = loaded_after_import("executor.planning.plan")
    assert not {
        m for m in loaded if m.startswith(("executor.store", "executor.engine", "executor.run"))
    }
    assert "sqlalchemy" not in loaded and "llama_cpp" not in loaded


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_sql_lives_in_the_store_and_llama_cpp_in_the_engine(path):
    imported = {m.split(".")[0] for m in imports_of(path)}
    if "store" not in path.relative_to(PACKAGE).parts:
        assert not imported & {"sqlalchemy", "alembic"}, path
    if "engine" not in path.relative_to(PACKAGE).parts:
        assert "llama_cpp" not in imported, path


def test_the_worker_knows_no_screen():
    run = {m for p in (PACKAGE / "run").glob("*.py") for m in imports_of(p)}
    assert not {m for m in run if m.startswith("executor.cli")}


def test_no_module_is_over_600_lines():
    long = {
        str(p.relative_to(PACKAGE)): n
        for p in MODULES
        if (n := len(p.read_text().splitlines())) > 600
    }
    assert not long

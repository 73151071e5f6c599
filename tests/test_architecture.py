"""The arrows between the parts point one way (executor/__init__.py draws them)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

PACKAGE = ROOT / "executor"


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


def test_the_model_process_never_loads_the_store():
    engine = [
        "executor.engine",
        "executor.engine.child",
        "executor.engine.fake",
        "executor.engine.faults",
        "executor.engine.llama",
    ]
    loaded = loaded_after_import(*engine)
    assert "executor.store" not in loaded
    assert "sqlalchemy" not in loaded and "alembic" not in loaded


def test_the_plan_is_pure():
    loaded = loaded_after_import("executor.plan")
    assert not {m for m in loaded if m.startswith(("executor.store", "executor.engine"))}
    assert "sqlalchemy" not in loaded and "llama_cpp" not in loaded


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


@pytest.mark.parametrize(
    "path", sorted(p for p in PACKAGE.rglob("*.py") if "store" not in p.parts), ids=str
)
def test_sql_lives_in_the_store(path):
    """Only executor/store/ talks to SQLAlchemy; only executor/engine/ to llama_cpp."""
    imported = imports_of(path)
    assert not {m for m in imported if m.split(".")[0] in ("sqlalchemy", "alembic")}, path
    if "engine" not in path.parts:
        assert not {m for m in imported if m.split(".")[0] == "llama_cpp"}, path


@pytest.mark.parametrize("path", sorted((PACKAGE / "engine").glob("*.py")), ids=str)
def test_the_engine_imports_no_service(path):
    """The model process loads what crosses the pipe and two pure helpers (stdlib only):
    how many threads, and how to pick the parallel from measured rates."""
    allowed = {"executor.engine", "executor.records", "executor.cpus", "executor.decode_rates"}
    ours = {m for m in imports_of(path) if m.startswith("executor")}
    assert all(m in allowed or m.startswith("executor.engine.") for m in ours), ours


def test_the_worker_knows_no_screen():
    assert not {
        m for m in imports_of(PACKAGE / "worker.py") if m in ("executor.progress", "executor.logs")
    }


@pytest.mark.parametrize("name", ["cpus.py", "decode_rates.py", "records.py"])
def test_what_the_model_process_shares_imports_no_service(name):
    assert not {m for m in imports_of(PACKAGE / name) if m.startswith("executor")} - {
        "executor.cpus",
        "executor.config",  # records: a type-checking import only
    }

"""A non-editable install (`pip install .`) carries the migrations and upgrades a database."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.helpers import ROOT


def test_wheel_ships_migrations_and_they_run(tmp_path: Path):
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(wheels),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    (wheel,) = wheels.glob("executor-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    # Every module and data file of the source tree ships (a hand-kept package list once
    # left executor.serve out of every `pip install .`).
    package = ROOT / "executor"
    tracked = subprocess.run(
        ["git", "ls-files", "executor"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    wanted = {p for p in tracked if (ROOT / p).is_file() and not p.endswith(".ini")}
    assert wanted - names == set()
    assert {f"executor/{p.relative_to(package)}" for p in package.rglob("*.py")} <= names
    assert "executor/store/migrations/script.py.mako" in names
    assert "executor/serve/routes.py" in names

    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    code = (
        "from executor.store import open_database\n"
        "from executor.store.db import head_revision, migrations_dir\n"
        "db = open_database('sqlite:///installed.db')\n"
        "print(migrations_dir())\n"
        "assert db.revision() == head_revision(), db.revision()\n"
    )
    # cwd outside the checkout and the installed copy first on the path: no source tree used.
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    assert out.stdout.strip() == str(target / "executor" / "store" / "migrations")

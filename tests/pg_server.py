"""A throwaway PostgreSQL server for the tests: its own data folder, a Unix socket, no TCP.

EXECUTOR_TEST_PG_URL (a SQLAlchemy URL) uses an existing server instead.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

PORT = 5439


def server_bin() -> Path | None:
    """The folder with initdb and pg_ctl: on PATH or in Debian's /usr/lib/postgresql/N/bin."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(os.path.realpath(found)).parent
    versions = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parent.parent.name)
    )
    return Path(versions[-1]).parent if versions else None


class PgServer:
    """initdb + pg_ctl start in a temporary folder; `url()` for a database name."""

    def __init__(self) -> None:
        bindir = server_bin()
        if bindir is None:
            raise RuntimeError(
                "PostgreSQL is not installed (scripts/ensure-postgres installs "
                "it), and EXECUTOR_TEST_PG_URL is not set"
            )
        self.bindir = bindir
        self.folder = Path(tempfile.mkdtemp(prefix="executor-pg-"))
        self.data = self.folder / "data"
        # The server refuses to run as root: run it as the `postgres` user then.
        self.user = "postgres" if os.geteuid() == 0 else None
        if self.user:
            entry = pwd.getpwnam(self.user)
            os.chown(self.folder, entry.pw_uid, entry.pw_gid)
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
            "-E",
            "UTF8",
        )
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.folder / "server.log"),
            "-w",
            "-o",
            f"-k {self.folder} -p {PORT} -c listen_addresses='' "
            "-c fsync=off -c max_connections=200",
            "start",
        )

    def _run(self, program: str, *args: str) -> None:
        command = [str(self.bindir / program), *args]
        if self.user:
            command = ["runuser", "-u", self.user, "--", *command]
        subprocess.run(command, check=True, capture_output=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@/{database}?host={self.folder}&port={PORT}"

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "stop")
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)

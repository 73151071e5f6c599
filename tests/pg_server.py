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

import sqlalchemy as sa

from executor.store import open_database

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


class PgDatabases:
    """Fresh PostgreSQL databases for tests, copied from a template already at head."""

    def __init__(self, admin_url: str) -> None:
        self.admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
        self.count = 0
        with self.admin.connect() as conn:
            conn.exec_driver_sql("DROP DATABASE IF EXISTS executor_template")
            conn.exec_driver_sql("CREATE DATABASE executor_template")
        open_database(self.url("executor_template")).dispose()

    def url(self, name: str) -> str:
        return self.admin.url.set(database=name).render_as_string(hide_password=False)

    def create(self, blank: bool = False) -> str:
        self.count += 1
        name = f"executor_test_{os.getpid()}_{self.count}"
        template = "template0" if blank else "executor_template"
        with self.admin.connect() as conn:
            conn.exec_driver_sql(f"CREATE DATABASE {name} TEMPLATE {template}")
        return self.url(name)

    def drop(self, url: str) -> None:
        with self.admin.connect() as conn:
            conn.exec_driver_sql(
                f"DROP DATABASE IF EXISTS {sa.make_url(url).database} WITH (FORCE)"
            )

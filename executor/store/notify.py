"""Waking idle workers the moment there is work: PostgreSQL's LISTEN/NOTIFY.

Whatever puts work in the queue — a submitted job, items given back (a stopped worker's, an
expired lease's), a retry, a lifted pause — announces it in the same transaction
(`announce`: NOTIFY is sent when it commits). An idle worker waits on its own connection
(`Waiter`) and claims at once instead of after up to `poll_seconds`. The poll stays as the
net under it: a notification lost with a dropped connection costs one poll interval. SQLite
has no notifications: there the wait is the poll.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import suppress
from typing import Any

import sqlalchemy as sa

from executor.store.db import Database

log = logging.getLogger(__name__)

CHANNEL = "executor_work"


def announce(conn: sa.Connection) -> None:
    """Inside a write transaction: wake the waiting workers once it commits (PostgreSQL)."""
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text(f"NOTIFY {CHANNEL}"))


class Waiter:
    """An idle worker's wait: up to a timeout, or until work is announced."""

    def __init__(self, db: Database, *, listen: bool = True) -> None:
        self.db = db
        self.listen = listen and not db.is_sqlite
        self._raw: Any = None  # the pooled DBAPI connection kept LISTENing

    def wait(self, seconds: float, stop: Callable[[], bool] = lambda: False) -> bool:
        """Sleep at most `seconds` (in slices, so that `stop` is seen); True when woken by an
        announcement."""
        end = time.monotonic() + seconds
        if self.listen and self._listening():
            try:
                pg = self._raw.driver_connection
                while not stop() and (left := end - time.monotonic()) > 0:
                    # Each notifies() runs to its end before the next: the generator holds
                    # the connection's lock while it lives (a nested call would deadlock).
                    woken = False
                    for _ in pg.notifies(timeout=min(left, 0.2), stop_after=1):
                        woken = True
                    if woken:
                        # Those that came while the worker was busy say the same: one claim
                        # answers them all, not one spurious wake-up each. (timeout=0 would
                        # mean "no timeout" to psycopg's wait.)
                        for _ in pg.notifies(timeout=0.01):
                            pass
                        return True
                return False
            except Exception as exc:  # the connection dropped: poll, and listen anew next time
                log.info("listening for new work failed (%s); polling", exc)
                self.close()
        while not stop() and time.monotonic() < end:
            time.sleep(min(0.2, max(end - time.monotonic(), 0)))
        return False

    def _listening(self) -> bool:
        if self._raw is not None:
            return True
        try:
            raw = self.db.engine.raw_connection()
            pg = raw.driver_connection
            pg.autocommit = True
            pg.execute(f"LISTEN {CHANNEL}")
        except Exception as exc:
            log.info("cannot listen for new work (%s); polling", exc)
            return False
        self._raw = raw
        return True

    def close(self) -> None:
        if self._raw is not None:
            with suppress(Exception):  # a dropped connection closes as it can
                self._raw.invalidate()  # not back into the pool in LISTEN mode
            self._raw = None

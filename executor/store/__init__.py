"""Persistence: schema, engine factory and migrations (db), queue operations (queue).

Nothing outside this package writes SQL.
"""

from executor.store.db import Database, open_database

__all__ = ["Database", "open_database"]

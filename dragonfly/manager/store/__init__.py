"""The manager's database: one schema, one list of migrations, two backends.

SQLite (WAL, through sqlite-utils) is the embedded default; PostgreSQL (psycopg 3,
its sync API in a worker thread) lets several managers share one state. Everything
above this package speaks SQL through `Tx` (`?` placeholders, rows as dicts) and
runs one transaction per thread hop with `Database.run`.
"""

from dragonfly.manager.store.db import Conflict, Database, DatabaseError, Tx, open_database

__all__ = ["Conflict", "Database", "DatabaseError", "Tx", "open_database"]

"""`Database`: one transaction per worker-thread hop, on SQLite or PostgreSQL.

SQL is written once with `?` placeholders; the PostgreSQL backend turns them into
psycopg's `%s`. Column types differ in one place only (`migrations.DIALECTS`).
A unique-key violation is `Conflict` on both backends, so the API answers 409 the
same way whichever database is behind it.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import sqlite_utils
import trio

T = TypeVar("T")
Params = Sequence[Any]


class DatabaseError(Exception):
    """The database could not be reached or refused a statement."""


class Conflict(DatabaseError):
    """A row with the same unique key exists."""


class Tx(Protocol):
    """One open transaction (used from the worker thread only)."""

    dialect: str

    def query(self, sql: str, params: Params = ()) -> list[dict[str, Any]]: ...

    def one(self, sql: str, params: Params = ()) -> dict[str, Any] | None: ...

    def execute(self, sql: str, params: Params = ()) -> int: ...

    def insert(self, table: str, row: dict[str, Any]) -> int: ...

    def lock_migrations(self) -> None: ...


def _insert_sql(table: str, row: dict[str, Any]) -> str:
    columns = ", ".join(row)
    marks = ", ".join("?" for _ in row)
    return f"INSERT INTO {table} ({columns}) VALUES ({marks}) RETURNING id"


class _SQLiteTx:
    dialect = "sqlite"

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def _cursor(self, sql: str, params: Params) -> sqlite3.Cursor:
        try:
            return self.conn.execute(sql, tuple(params))
        except sqlite3.IntegrityError as exc:
            if "UNIQUE" in str(exc) or "PRIMARY KEY" in str(exc):
                raise Conflict(str(exc)) from None
            raise DatabaseError(str(exc)) from None
        except OverflowError:  # an integer beyond 64 bits: no row can match it
            raise DatabaseError("integer out of range") from None

    def query(self, sql: str, params: Params = ()) -> list[dict[str, Any]]:
        cur = self._cursor(sql, params)
        names = [d[0] for d in cur.description or ()]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def one(self, sql: str, params: Params = ()) -> dict[str, Any] | None:
        rows = self.query(sql, params)
        return rows[0] if rows else None

    def execute(self, sql: str, params: Params = ()) -> int:
        return self._cursor(sql, params).rowcount

    def insert(self, table: str, row: dict[str, Any]) -> int:
        return int(self.query(_insert_sql(table, row), list(row.values()))[0]["id"])

    def lock_migrations(self) -> None:
        """SQLite: the write transaction (BEGIN IMMEDIATE) already excludes others."""


class _PostgresTx:
    dialect = "postgres"

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def _cursor(self, sql: str, params: Params) -> Any:
        import psycopg

        try:
            return self.conn.execute(sql.replace("%", "%%").replace("?", "%s"), tuple(params))
        except psycopg.errors.UniqueViolation as exc:
            raise Conflict(str(exc).splitlines()[0]) from None
        except psycopg.errors.NumericValueOutOfRange:
            raise DatabaseError("integer out of range") from None
        except psycopg.errors.DataError as exc:
            raise DatabaseError(str(exc).splitlines()[0]) from None

    def query(self, sql: str, params: Params = ()) -> list[dict[str, Any]]:
        cur = self._cursor(sql, params)
        return list(cur.fetchall()) if cur.description else []

    def one(self, sql: str, params: Params = ()) -> dict[str, Any] | None:
        rows = self.query(sql, params)
        return rows[0] if rows else None

    def execute(self, sql: str, params: Params = ()) -> int:
        return int(self._cursor(sql, params).rowcount)

    def insert(self, table: str, row: dict[str, Any]) -> int:
        return int(self.query(_insert_sql(table, row), list(row.values()))[0]["id"])

    def lock_migrations(self) -> None:
        """Managers starting together on one database migrate one after the other."""
        self.conn.execute("SELECT pg_advisory_xact_lock(7232891734)")


class Database:
    """Runs `fn(tx)` in a worker thread inside one transaction (one hop per call)."""

    dialect: str

    async def run(self, fn: Callable[[Tx], T]) -> T:
        raise NotImplementedError

    async def aclose(self) -> None:
        raise NotImplementedError


class SQLiteDatabase(Database):
    """One connection, one transaction at a time (SQLite has one writer anyway)."""

    dialect = "sqlite"

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Created 0600 before SQLite opens it; its -wal and -shm files copy the mode.
        os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
        os.chmod(path, 0o600)
        conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db = sqlite_utils.Database(conn)
        self.db.enable_wal()
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=5000")
        conn.execute("PRAGMA foreign_keys=ON")
        self.conn = conn
        self._limiter = trio.CapacityLimiter(1)

    def _transaction(self, fn: Callable[[Tx], T]) -> T:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(_SQLiteTx(self.conn))
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")
        return result

    async def run(self, fn: Callable[[Tx], T]) -> T:
        return await trio.to_thread.run_sync(self._transaction, fn, limiter=self._limiter)

    async def aclose(self) -> None:
        async with self._limiter:
            self.conn.close()


class PostgresDatabase(Database):
    """A few connections, each used by one worker thread at a time; a broken one is
    dropped and the next call opens a new one."""

    dialect = "postgres"

    def __init__(self, dsn: str, *, pool_size: int = 4, connect_timeout: float = 5.0) -> None:
        self.dsn = dsn
        self.connect_timeout = connect_timeout
        self._idle: list[Any] = []
        self._lock = threading.Lock()
        self._limiter = trio.CapacityLimiter(pool_size)

    def _connect(self) -> Any:
        import psycopg
        from psycopg.rows import dict_row

        try:
            return psycopg.connect(
                self.dsn,
                autocommit=True,
                row_factory=dict_row,
                connect_timeout=max(1, round(self.connect_timeout)),
            )
        except psycopg.Error as exc:
            raise DatabaseError(f"cannot connect to PostgreSQL: {exc}") from None

    def _transaction(self, fn: Callable[[Tx], T]) -> T:
        import psycopg

        with self._lock:
            conn = self._idle.pop() if self._idle else None
        if conn is None or conn.closed:
            conn = self._connect()
        try:
            with conn.transaction():
                result = fn(_PostgresTx(conn))
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            conn.close()
            raise DatabaseError(f"PostgreSQL: {str(exc).splitlines()[0]}") from None
        except BaseException:
            if conn.closed or conn.broken:
                conn.close()
            else:
                with self._lock:
                    self._idle.append(conn)
            raise
        with self._lock:
            self._idle.append(conn)
        return result

    async def run(self, fn: Callable[[Tx], T]) -> T:
        return await trio.to_thread.run_sync(self._transaction, fn, limiter=self._limiter)

    async def aclose(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def open_database(driver: str, *, path: Path, dsn: str) -> Database:
    if driver == "postgres":
        return PostgresDatabase(dsn)
    return SQLiteDatabase(path)

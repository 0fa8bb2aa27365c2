"""Leases: background work (GC now, jobs later) runs on one manager at a time.

A lease is a row (name, holder, expires_at). A manager takes it when it is free or
expired and renews it while it works; a manager that stops releases it, one that
dies loses it when it expires, and another takes over. Chosen over PostgreSQL's
advisory locks because the same statement works on SQLite, no connection has to be
held for the lock's lifetime (psycopg runs in worker threads, connections come and
go), and a manager that hangs while still connected loses the lease too. Managers'
clocks must agree to well within the lease's length (NTP).
"""

from __future__ import annotations

from dragonfly.manager.store.db import Tx


def acquire(tx: Tx, name: str, holder: str, now: float, ttl: float) -> bool:
    """Take or renew the lease `name` for `ttl` seconds; True if `holder` holds it."""
    tx.execute(
        "INSERT INTO leases (name, holder, expires_at) VALUES (?, ?, ?) "
        "ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, "
        "expires_at = excluded.expires_at "
        "WHERE leases.holder = excluded.holder OR leases.expires_at < ?",
        [name, holder, now + ttl, now],
    )
    row = tx.one("SELECT holder FROM leases WHERE name = ?", [name])
    return row is not None and row["holder"] == holder


def release(tx: Tx, name: str, holder: str) -> None:
    tx.execute("DELETE FROM leases WHERE name = ? AND holder = ?", [name, holder])

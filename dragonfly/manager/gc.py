"""Background work, on the one manager that holds the `gc` lease: members silent for
three keepalive intervals turn inactive, members inactive for `keepalive.remove_after`
are removed, so are peers no scheduler reported (`peers.timeout`, `peers.remove_after`),
old audit rows, expired session revocations, and issued credentials past their expiry
(with their host's revocation: nothing is left to refuse).

It runs every keepalive interval, so a member that stopped is shown inactive within
about one interval of its timeout. Each round takes or renews the lease first; a
manager that loses it (its database was away longer than the lease) just skips
rounds until it holds it again.
"""

from __future__ import annotations

import contextlib
from functools import partial

import trio

from dragonfly.log import get_logger
from dragonfly.manager import members, peer_table
from dragonfly.manager.context import Context
from dragonfly.manager.store import DatabaseError, Tx, leases

log = get_logger("dragonfly.manager.gc")
LEASE = "gc"


def collect(tx: Tx, ctx: Context, now: float) -> dict[str, int] | None:
    """One round if this manager holds the lease (None otherwise)."""
    if not leases.acquire(tx, LEASE, ctx.holder, now, ctx.config.gc.lease_ttl):
        return None
    keepalive = ctx.config.keepalive
    counts = members.sweep(tx, now, keepalive.timeout, keepalive.remove_after)
    counts["audits_removed"] = tx.execute(
        "DELETE FROM audits WHERE created_at < ?", [now - ctx.config.gc.audit_ttl]
    )
    counts["revocations_removed"] = tx.execute(
        "DELETE FROM revoked_sessions WHERE expires_at < ?", [now]
    )
    peers = ctx.config.peers
    counts.update(peer_table.sweep(tx, now, peers.timeout, peers.remove_after))
    counts["host_revocations_removed"] = tx.execute(
        "DELETE FROM revocations WHERE host_id IN "
        "(SELECT host_id FROM host_credentials WHERE expires_at < ?)",
        [now],
    )
    counts["host_credentials_removed"] = tx.execute(
        "DELETE FROM host_credentials WHERE expires_at < ?", [now]
    )
    return counts


async def run_gc(ctx: Context) -> None:
    try:
        while True:
            now = ctx.clock()
            try:
                counts = await ctx.db.run(partial(collect, ctx=ctx, now=now))
            except DatabaseError as exc:
                log.warning("background work skipped: database", error=str(exc))
                counts = None
            ctx.metrics.lease_held.set(0 if counts is None else 1)
            if counts is not None:
                ctx.metrics.gc_runs.inc()
                for change, n in counts.items():
                    if n:
                        ctx.metrics.gc_changes.labels(change).inc(n)
                        log.info("background work", change=change, rows=n)
            await trio.sleep(ctx.config.keepalive.interval)
    finally:
        # A manager that stops hands the lease on at once instead of letting it expire.
        with (
            trio.CancelScope(shield=True),
            trio.move_on_after(2),
            contextlib.suppress(DatabaseError),
        ):
            await ctx.db.run(lambda tx: leases.release(tx, LEASE, ctx.holder))

"""The schema, as one list of migrations applied in order by both backends.

Each migration is a name and its statements; `{id}`, `{int}` and `{real}` stand for
the column types that differ between SQLite and PostgreSQL. Applied migrations are
recorded in `schema_migrations`; a manager applies the missing ones at start, under
a lock, so managers starting together on one PostgreSQL do it once. Never edit a
migration that shipped: add one.

Times are seconds since the epoch (`{real}`); JSON documents (cluster configs,
scopes, features) are TEXT.
"""

from __future__ import annotations

from dragonfly.manager.store.db import Tx

DIALECTS: dict[str, dict[str, str]] = {
    "sqlite": {"id": "INTEGER PRIMARY KEY AUTOINCREMENT", "int": "INTEGER", "real": "REAL"},
    "postgres": {"id": "BIGSERIAL PRIMARY KEY", "int": "BIGINT", "real": "DOUBLE PRECISION"},
}

_TIMES = "created_at {real} NOT NULL, updated_at {real} NOT NULL"
_PEER_COLUMNS = (
    "created_at, updated_at, host_name, type, idc, location, ip, port, download_port, "
    "proxy_port, object_storage_port, state, os, platform, platform_family, "
    "platform_version, kernel_version, git_version, git_commit, build_platform, "
    "scheduler_cluster_id"
)

MIGRATIONS: list[tuple[str, list[str]]] = [
    (
        "0001_initial",
        [
            f"""CREATE TABLE users (id {{id}}, {_TIMES}, name TEXT NOT NULL UNIQUE,
                email TEXT NOT NULL DEFAULT '', phone TEXT NOT NULL DEFAULT '',
                avatar TEXT NOT NULL DEFAULT '', location TEXT NOT NULL DEFAULT '',
                bio TEXT NOT NULL DEFAULT '', state TEXT NOT NULL DEFAULT 'enable',
                encrypted_password TEXT NOT NULL, session_generation {{int}} NOT NULL DEFAULT 0)""",
            "CREATE TABLE roles (name TEXT PRIMARY KEY)",
            """CREATE TABLE role_permissions (role TEXT NOT NULL REFERENCES roles(name)
                ON DELETE CASCADE, object TEXT NOT NULL, action TEXT NOT NULL,
                PRIMARY KEY (role, object, action))""",
            """CREATE TABLE user_roles (user_id {int} NOT NULL REFERENCES users(id)
                ON DELETE CASCADE, role TEXT NOT NULL REFERENCES roles(name) ON DELETE CASCADE,
                PRIMARY KEY (user_id, role))""",
            """CREATE TABLE revoked_sessions (jti TEXT PRIMARY KEY,
                expires_at {real} NOT NULL)""",
            f"""CREATE TABLE personal_access_tokens (id {{id}}, {_TIMES},
                name TEXT NOT NULL UNIQUE, bio TEXT NOT NULL DEFAULT '',
                token_hash TEXT NOT NULL UNIQUE, scopes TEXT NOT NULL,
                state TEXT NOT NULL, expired_at {{real}} NOT NULL,
                user_id {{int}} NOT NULL REFERENCES users(id) ON DELETE CASCADE)""",
            f"""CREATE TABLE scheduler_clusters (id {{id}}, {_TIMES}, name TEXT NOT NULL UNIQUE,
                bio TEXT NOT NULL DEFAULT '', config TEXT NOT NULL, client_config TEXT NOT NULL,
                seed_client_config TEXT NOT NULL, scopes TEXT NOT NULL,
                is_default {{int}} NOT NULL DEFAULT 0)""",
            f"""CREATE TABLE seed_peer_clusters (id {{id}}, {_TIMES}, name TEXT NOT NULL UNIQUE,
                bio TEXT NOT NULL DEFAULT '', config TEXT NOT NULL)""",
            """CREATE TABLE scheduler_cluster_seed_peer_clusters (
                scheduler_cluster_id {int} NOT NULL REFERENCES scheduler_clusters(id)
                    ON DELETE CASCADE,
                seed_peer_cluster_id {int} NOT NULL REFERENCES seed_peer_clusters(id)
                    ON DELETE CASCADE,
                PRIMARY KEY (scheduler_cluster_id, seed_peer_cluster_id))""",
            # ip is the address the manager saw the member connect from; claimed_ip
            # what it said of itself (shown, never used to reach it).
            f"""CREATE TABLE schedulers (id {{id}}, {_TIMES}, host_name TEXT NOT NULL,
                idc TEXT NOT NULL DEFAULT '', location TEXT NOT NULL DEFAULT '',
                ip TEXT NOT NULL, claimed_ip TEXT NOT NULL DEFAULT '', port {{int}} NOT NULL,
                state TEXT NOT NULL DEFAULT 'inactive', features TEXT NOT NULL,
                version TEXT NOT NULL DEFAULT '', session TEXT NOT NULL DEFAULT '',
                last_keep_alive_at {{real}} NOT NULL DEFAULT 0,
                scheduler_cluster_id {{int}} NOT NULL REFERENCES scheduler_clusters(id),
                UNIQUE (host_name, ip, scheduler_cluster_id))""",
            f"""CREATE TABLE seed_peers (id {{id}}, {_TIMES}, host_name TEXT NOT NULL,
                type TEXT NOT NULL DEFAULT 'super', idc TEXT NOT NULL DEFAULT '',
                location TEXT NOT NULL DEFAULT '', ip TEXT NOT NULL,
                claimed_ip TEXT NOT NULL DEFAULT '', port {{int}} NOT NULL,
                download_port {{int}} NOT NULL, object_storage_port {{int}} NOT NULL DEFAULT 0,
                state TEXT NOT NULL DEFAULT 'inactive', version TEXT NOT NULL DEFAULT '',
                session TEXT NOT NULL DEFAULT '', last_keep_alive_at {{real}} NOT NULL DEFAULT 0,
                seed_peer_cluster_id {{int}} NOT NULL REFERENCES seed_peer_clusters(id),
                UNIQUE (host_name, ip, seed_peer_cluster_id))""",
            f"""CREATE TABLE peers (id {{id}}, {_TIMES}, host_name TEXT NOT NULL,
                type TEXT NOT NULL, idc TEXT NOT NULL DEFAULT '',
                location TEXT NOT NULL DEFAULT '', ip TEXT NOT NULL, port {{int}} NOT NULL,
                download_port {{int}} NOT NULL, proxy_port {{int}} NOT NULL,
                object_storage_port {{int}} NOT NULL DEFAULT 0,
                state TEXT NOT NULL DEFAULT 'inactive', os TEXT NOT NULL DEFAULT '',
                platform TEXT NOT NULL DEFAULT '', platform_family TEXT NOT NULL DEFAULT '',
                platform_version TEXT NOT NULL DEFAULT '',
                kernel_version TEXT NOT NULL DEFAULT '', git_version TEXT NOT NULL DEFAULT '',
                git_commit TEXT NOT NULL DEFAULT '', build_platform TEXT NOT NULL DEFAULT '',
                scheduler_cluster_id {{int}} NOT NULL REFERENCES scheduler_clusters(id),
                UNIQUE (host_name, ip, scheduler_cluster_id))""",
            f"""CREATE TABLE configs (id {{id}}, {_TIMES}, name TEXT NOT NULL UNIQUE,
                value TEXT NOT NULL, bio TEXT NOT NULL DEFAULT '', user_id {{int}} NOT NULL)""",
            f"""CREATE TABLE applications (id {{id}}, {_TIMES}, name TEXT NOT NULL UNIQUE,
                url TEXT NOT NULL, bio TEXT NOT NULL DEFAULT '', priority TEXT NOT NULL,
                user_id {{int}} NOT NULL)""",
            f"""CREATE TABLE audits (id {{id}}, {_TIMES}, actor_type TEXT NOT NULL,
                actor_name TEXT NOT NULL, event_type TEXT NOT NULL, operation TEXT NOT NULL,
                operated_at {{real}} NOT NULL, state TEXT NOT NULL, path TEXT NOT NULL,
                status_code {{int}} NOT NULL, source TEXT NOT NULL DEFAULT '')""",
            "CREATE INDEX audits_created_at ON audits (created_at)",
            # Background work (GC now, jobs later) runs on the manager holding its lease.
            "CREATE TABLE leases (name TEXT PRIMARY KEY, holder TEXT NOT NULL, "
            "expires_at {real} NOT NULL)",
        ],
    ),
    (
        "0002_jobs_and_download_records",
        [
            # args: what the request asked, secrets left out; secrets: those, sealed
            # (dragonfly/manager/jobs/secrets.py), '' when none.
            f"""CREATE TABLE jobs (id {{id}}, {_TIMES}, task_id TEXT NOT NULL,
                bio TEXT NOT NULL DEFAULT '', type TEXT NOT NULL, state TEXT NOT NULL,
                args TEXT NOT NULL, secrets TEXT NOT NULL DEFAULT '',
                scheduler_cluster_ids TEXT NOT NULL, user_id {{int}} NOT NULL DEFAULT 0)""",
            "CREATE INDEX jobs_created_at ON jobs (created_at)",
            # One part per scheduler cluster, run by the manager that claims it (holder,
            # until claimed_until) through a scheduler of that cluster connected to it;
            # results: per host and task; details: the hosts listed, an image's layers.
            f"""CREATE TABLE job_parts (id {{id}}, {_TIMES},
                job_id {{int}} NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
                scheduler_cluster_id {{int}} NOT NULL, state TEXT NOT NULL,
                holder TEXT NOT NULL DEFAULT '', claimed_until {{real}} NOT NULL DEFAULT 0,
                scheduler_id {{int}} NOT NULL DEFAULT 0, error TEXT NOT NULL DEFAULT '',
                results TEXT NOT NULL DEFAULT '[]', details TEXT NOT NULL DEFAULT '{{{{}}}}',
                finished_at {{real}} NOT NULL DEFAULT 0)""",
            "CREATE INDEX job_parts_job ON job_parts (job_id)",
            "CREATE INDEX job_parts_state ON job_parts (state, scheduler_cluster_id)",
            """CREATE TABLE download_records (id {id}, created_at {real} NOT NULL,
                scheduler_cluster_id {int} NOT NULL, scheduler_id {int} NOT NULL,
                host_id TEXT NOT NULL, hostname TEXT NOT NULL, ip TEXT NOT NULL,
                task_id TEXT NOT NULL, url TEXT NOT NULL, content_length {int} NOT NULL,
                finished_at {real} NOT NULL, duration_ms {int} NOT NULL,
                bytes_p2p {int} NOT NULL, bytes_source {int} NOT NULL,
                bytes_local {int} NOT NULL, parents TEXT NOT NULL, error TEXT NOT NULL)""",
            "CREATE INDEX download_records_task ON download_records (task_id)",
            # Bytes by source per cluster and hour: kept beyond the records themselves.
            """CREATE TABLE traffic_hourly (scheduler_cluster_id {int} NOT NULL,
                hour {real} NOT NULL, bytes_p2p {int} NOT NULL DEFAULT 0,
                bytes_source {int} NOT NULL DEFAULT 0, bytes_local {int} NOT NULL DEFAULT 0,
                downloads {int} NOT NULL DEFAULT 0, failures {int} NOT NULL DEFAULT 0,
                PRIMARY KEY (scheduler_cluster_id, hour))""",
        ],
    ),
    (
        "0003_identity_and_peers",
        [
            # One join token per role; only its SHA-256 is kept.
            f"""CREATE TABLE join_tokens (role TEXT PRIMARY KEY, {_TIMES},
                token_hash TEXT NOT NULL UNIQUE, user_id {{int}} NOT NULL DEFAULT 0)""",
            # The credentials issued against join tokens (never their keys).
            f"""CREATE TABLE host_credentials (id {{id}}, {_TIMES}, host_id TEXT NOT NULL UNIQUE,
                role TEXT NOT NULL, host_name TEXT NOT NULL DEFAULT '',
                ip TEXT NOT NULL DEFAULT '', key_id TEXT NOT NULL,
                expires_at {{real}} NOT NULL)""",
            # Every credential of host_id issued up to created_at is revoked.
            f"""CREATE TABLE revocations (id {{id}}, {_TIMES}, host_id TEXT NOT NULL UNIQUE,
                bio TEXT NOT NULL DEFAULT '', user_id {{int}} NOT NULL DEFAULT 0)""",
            # Requests that every scheduler report its hosts now (POST /api/v1/peers/sync).
            "CREATE TABLE requests (name TEXT PRIMARY KEY, requested_at {real} NOT NULL)",
            # Peers as schedulers report them, by host ID (several daemons may share a host
            # name and address); rows made through the API have none. The rows of the
            # first schema are copied with new ids.
            "ALTER TABLE peers RENAME TO peers_0001",
            f"""CREATE TABLE peers (id {{id}}, {_TIMES}, host_id TEXT, host_name TEXT NOT NULL,
                type TEXT NOT NULL, idc TEXT NOT NULL DEFAULT '',
                location TEXT NOT NULL DEFAULT '', ip TEXT NOT NULL, port {{int}} NOT NULL,
                download_port {{int}} NOT NULL, proxy_port {{int}} NOT NULL,
                object_storage_port {{int}} NOT NULL DEFAULT 0,
                state TEXT NOT NULL DEFAULT 'inactive', os TEXT NOT NULL DEFAULT '',
                platform TEXT NOT NULL DEFAULT '', platform_family TEXT NOT NULL DEFAULT '',
                platform_version TEXT NOT NULL DEFAULT '',
                kernel_version TEXT NOT NULL DEFAULT '', git_version TEXT NOT NULL DEFAULT '',
                git_commit TEXT NOT NULL DEFAULT '', build_platform TEXT NOT NULL DEFAULT '',
                last_seen_at {{real}} NOT NULL DEFAULT 0,
                scheduler_cluster_id {{int}} NOT NULL REFERENCES scheduler_clusters(id),
                UNIQUE (host_id, scheduler_cluster_id))""",
            f"""INSERT INTO peers ({_PEER_COLUMNS}) SELECT {_PEER_COLUMNS} FROM peers_0001""",
            "DROP TABLE peers_0001",
        ],
    ),
]


def migrate(tx: Tx, now: float) -> list[str]:
    """Apply the migrations `tx`'s database lacks; return their names."""
    tx.lock_migrations()
    types = DIALECTS[tx.dialect]
    tx.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (name TEXT PRIMARY KEY, "
        f"applied_at {types['real']} NOT NULL)"
    )
    done = {row["name"] for row in tx.query("SELECT name FROM schema_migrations")}
    applied = []
    for name, statements in MIGRATIONS:
        if name in done:
            continue
        for statement in statements:
            tx.execute(statement.format(**types))
        tx.execute("INSERT INTO schema_migrations (name, applied_at) VALUES (?, ?)", [name, now])
        applied.append(name)
    return applied

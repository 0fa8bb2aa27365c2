"""Every key of conf/*.toml does what it says, or says that nothing reads it yet.

EFFECTS names, for each key, the tests that show what the key changes: each must exist,
and at least one of them must set the key (name it, dotted, in the test or in its
module's constants; a key's last part alone is enough where no other key of the role
ends so). A key that nothing reads yet is marked `# reserved: WHY` above it, or above
its table or at the top of its file (from config.RESERVED). A new key with neither, a
reserved key with an entry here, or an entry for a key that is gone fails this test.
"""

from __future__ import annotations

import ast
import re
import tomllib
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"

IT = "tests/integration/test_config_effects.py::"
UT = "tests/unit/test_config_effects.py::"
CLUSTER = "tests/integration/test_cluster_config.py::test_files_and_sets_reach_the_roles_they_name"
LISTENERS = IT + "test_listeners_and_the_host_section_reach_where_they_are_used"
COMPONENTS = IT + "test_components_get_their_timeouts_and_fsync"
P2P_FAULTS = "tests/faults/test_p2p_faults.py::"
REGISTRY_FAULTS = "tests/faults/test_registry_faults.py::"
HTTPS = "tests/interop/test_https_proxy.py::test_hijacked_https_goes_peer_to_peer"
HIJACK = "tests/integration/test_connect_tunnel.py::test_hijacked_requests_stay_on_the_tunnels_host"
SCHED = "tests/unit/test_sched_scheduler.py::"
SCHED_LIFE = "tests/unit/test_sched_lifecycle.py::"
SCHED_INV = "tests/unit/test_sched_invariants.py::"
SETTINGS = UT + "test_every_scheduling_and_gc_key_becomes_its_setting"
CREDENTIALS = "tests/unit/test_credentials.py::"
TRUST_SETTINGS = "tests/unit/test_sched_trust.py::test_trust_and_limits_keys_become_settings"
PRIVATE = "tests/security/test_private_tasks.py::"
SEC = "tests/security/"
CAPS = SEC + "test_bounds.py::test_connections_beyond_the_cap_are_refused_early_and_counted"
OUTSIDER = (
    SEC + "test_proxy_exposure.py::test_an_allowed_outsider_reaches_the_origin_and_nothing_else"
)
ACCESS = "tests/unit/test_access.py::"
MEMBERS = "tests/integration/test_manager_members.py::"
ANNOUNCE = MEMBERS + "test_members_announce_their_host_and_cluster"
KEEPALIVE = MEMBERS + "test_scheduler_keepalive_stop_restart_and_silence"
MANAGER_CONFIG = "tests/integration/test_manager_config.py::"
MANAGER_LISTEN = MANAGER_CONFIG + "test_server_listen_and_port_are_where_the_manager_answers"
MANAGER_FILES = MANAGER_CONFIG + "test_data_dir_and_database_path_are_where_the_files_go"
SESSIONS = MANAGER_CONFIG + "test_sessions_follow_the_auth_keys"
MANAGER_API = "tests/integration/test_manager_api.py::"
POSTGRES = "tests/integration/test_manager_postgres.py::test_two_managers_one_database"
MANAGER_GC = "tests/unit/test_manager_core.py::test_gc_lease_ttl_and_audit_ttl"
SETTINGS_IT = "tests/integration/test_manager_settings.py::"
CONFIG_CHANGE = SETTINGS_IT + "test_a_config_change_reaches_a_running_scheduler_and_peer"
DISCOVERY = (
    "tests/integration/test_manager_discovery.py::test_discovery_picks_the_cluster_by_cidr_and_idc"
)
JOIN = "tests/integration/test_manager_identity.py::test_join_tokens_wrong_rotated_and_wrong_role"
JOIN_UNIT = CREDENTIALS + "test_a_peer_with_a_join_token_joins_unless_its_credential_holds"
PEER_TABLE = (
    "tests/unit/test_manager_identity.py::test_reported_peers_age_out_and_expired_credentials_go"
)
JOB_KEYS = "tests/unit/test_manager_jobs.py::test_jobs_ttl_records_max_rows_and_traffic_ttl"
DISPATCH = (
    "tests/integration/test_manager_jobs.py::"
    "test_a_cluster_without_a_scheduler_fails_after_jobs_dispatch_timeout"
)
TLS_SEC = SEC + "test_cluster_tls.py::"
TLS_UNIT = "tests/unit/test_cluster_tls.py::"
TLS_FILES = TLS_UNIT + "test_tls_files_are_checked_at_start_naming_the_key"
TLS_CLUSTER = "tests/integration/test_cluster_tls.py::test_a_tls_cluster_moves_every_piece_over_tls"
OBSERVER = TLS_SEC + "test_a_passive_observer_of_an_upload_port_reads_no_ticket_and_no_piece"

# conf/peer.toml and conf/seed-peer.toml: one schema (seed.cluster_id is read with seed.enabled)
PEER: dict[str, tuple[str, ...]] = {
    "host.hostname": (LISTENERS,),
    "host.ip": (LISTENERS,),
    "host.idc": (
        LISTENERS,
        "tests/unit/test_sched_resources.py::test_same_idc_beats_other_at_equal_load",
    ),
    "host.location": (
        LISTENERS,
        "tests/unit/test_sched_resources.py::test_location_prefix_counts_leading_levels",
    ),
    "log.level": (CLUSTER,),
    "log.format": (UT + "test_log_format",),
    "scheduler.addresses": (LISTENERS,),
    "scheduler.connect_timeout": (IT + "test_a_silent_scheduler_is_waited_for_connect_timeout",),
    "scheduler.rejoin_timeout": (
        "tests/faults/test_restarts.py::"
        "test_after_rejoin_timeout_without_a_scheduler_downloads_finish_from_the_origin",
        "tests/faults/test_restarts.py::test_downloads_in_flight_ride_out_a_scheduler_restart",
    ),
    "download.concurrent_piece_count": (
        IT + "test_concurrent_piece_count_one_asks_one_piece_at_a_time",
    ),
    "download.rate_limit": (IT + "test_download_rate_limit_holds_peer_to_peer",),
    "download.back_to_source": (IT + "test_back_to_source_off_fails_rather_than_ask_the_origin",),
    "download.back_to_source_rate_limit": (IT + "test_back_to_source_rate_limit",),
    "download.origin_concurrency": (
        IT + "test_origin_concurrency_one_fetches_one_range_at_a_time",
    ),
    "download.piece_timeout": (IT + "test_a_piece_slower_than_piece_timeout_is_given_up",),
    "download.stall_timeout": (
        "tests/faults/test_stalls.py::test_a_parent_that_hangs_is_left_for_the_origin",
    ),
    "download.connect_timeout": (
        COMPONENTS,
        "tests/integration/test_http_client.py::test_connect_errors_are_named",
    ),
    "download.read_timeout": (
        COMPONENTS,
        "tests/integration/test_http_client.py::test_read_timeout",
    ),
    "download.origin_ca_file": (HTTPS, "tests/unit/test_tls.py::test_config_checks_name_the_key"),
    "upload.listen": (LISTENERS,),
    "upload.port": (LISTENERS,),
    "upload.rate_limit": (P2P_FAULTS + "test_upload_rate_limit",),
    "upload.max_connections": (CAPS,),
    "upload.concurrent_limit": (
        P2P_FAULTS + "test_a_busy_parent_answers_503_and_children_still_get_every_byte",
    ),
    "upload.queue_limit": (
        P2P_FAULTS + "test_a_busy_parent_answers_503_and_children_still_get_every_byte",
    ),
    "upload.children_limit": (
        LISTENERS,
        UT + "test_a_hosts_children_limit_caps_the_children_it_is_given",
    ),
    "proxy.listen": (LISTENERS,),
    "proxy.port": (LISTENERS,),
    "proxy.filtered_query_params": (
        CLUSTER,
        "tests/unit/test_identity.py::test_user_filters_add_to_the_defaults",
    ),
    "proxy.prefetch": (IT + "test_prefetch_fetches_the_whole_file_for_a_range",),
    "proxy.rules.regex": (HTTPS,),
    "proxy.rules.direct": (CLUSTER,),
    "proxy.rules.allow_credentials": (
        IT + "test_allow_credentials_lets_a_request_with_credentials_use_p2p",
    ),
    "proxy.max_connections": (CAPS,),
    "proxy.workers": (
        "tests/integration/test_proxy_workers.py::"
        "test_a_worker_serves_local_hits_and_hands_the_rest_to_the_daemon",
        SEC + "test_proxy_exposure.py::test_a_proxy_worker_checks_an_outsider_as_the_daemon_does",
    ),
    "proxy.allowed_clients": (
        OUTSIDER,
        SEC
        + "test_proxy_exposure.py::test_beyond_loopback_without_allow_list_or_credentials_refuses_to_start",
    ),
    "proxy.auth_file": (SEC + "test_proxy_exposure.py::test_an_outsider_must_authenticate",),
    "proxy.allowed_destinations": (ACCESS + "test_what_a_remote_client_may_reach",),
    "proxy.connect_ports": (OUTSIDER, ACCESS + "test_connect_ports"),
    "proxy.hijack_https.leaf_cache_size": (
        "tests/unit/test_tls.py::test_leaf_cache_makes_each_host_once",
    ),
    "proxy.hijack_https.leaf_rate": (
        SEC + "test_interception_ca.py::test_leaf_certificates_are_bounded_and_constrained",
    ),
    "proxy.hijack_https.ca_cert": (HIJACK, HTTPS),
    "proxy.hijack_https.ca_key": (HIJACK, HTTPS),
    "proxy.hijack_https.hosts": (HIJACK, HTTPS),
    "registry_mirror.upstream": (
        REGISTRY_FAULTS + "test_a_blob_url_through_the_forward_proxy_is_the_mirrors_task",
    ),
    "registry_mirror.insecure": (
        REGISTRY_FAULTS + "test_a_registry_the_client_names_must_show_the_blobs_bytes",
    ),
    "registry_mirror.auth_cache_ttl": (
        IT + "test_auth_cache_ttl_is_how_long_a_registrys_yes_is_reused",
    ),
    "storage.data_dir": (
        CLUSTER,
        "tests/integration/test_p2p.py::test_small_files_errors_and_credentials",
    ),
    "storage.fsync": (
        COMPONENTS,
        "tests/faults/test_storage_crash.py::test_kill_9_mid_write_then_resume",
    ),
    "storage.sync_delay": (
        COMPONENTS,
        "tests/unit/test_storage.py::test_pieces_are_served_at_once_and_durable_within_sync_delay",
        "tests/faults/test_storage_crash.py::test_kill_9_mid_write_then_resume",
    ),
    "storage.task_ttl": (IT + "test_task_ttl_and_gc_interval_remove_unused_tasks",),
    "storage.gc_interval": (IT + "test_task_ttl_and_gc_interval_remove_unused_tasks",),
    "storage.disk_quota": (IT + "test_disk_quota_and_watermarks_evict_the_least_recently_used",),
    "storage.high_watermark": (
        IT + "test_disk_quota_and_watermarks_evict_the_least_recently_used",
    ),
    "storage.low_watermark": (IT + "test_disk_quota_and_watermarks_evict_the_least_recently_used",),
    "seed.enabled": (LISTENERS, SCHED + "test_first_registration_triggers_exactly_one_seed"),
    "upload.min_rate": (
        "tests/security/test_channel_bounds.py::"
        "test_a_reader_below_the_minimum_rate_loses_its_upload_slot",
    ),
    "proxy.credential_headers": (
        PRIVATE + "test_item4_a_presigned_urls_task_reaches_only_clients_the_origin_accepts",
    ),
    "proxy.private_check_ttl": (PRIVATE + "test_the_origins_yes_is_remembered_private_check_ttl",),
    "trust.credential_file": (
        CREDENTIALS + "test_roles_refuse_to_start_without_identity_naming_key_and_command",
        "tests/integration/test_tickets.py::test_a_child_renews_its_tickets_before_they_expire",
    ),
    "trust.insecure": ("tests/security/test_cluster_identity.py::test_an_insecure_cluster",),
    "trust.ca_file": (
        TLS_SEC + "test_children_refuse_a_parent_whose_certificate_is_not_the_clusters",
        TLS_UNIT + "test_the_cluster_ca_is_all_a_peer_trusts",
        TLS_CLUSTER,
    ),
    "upload.tls_cert": (OBSERVER, TLS_FILES, TLS_CLUSTER),
    "upload.tls_key": (OBSERVER, TLS_FILES, TLS_CLUSTER),
    "trust.join_token_file": (JOIN, JOIN_UNIT),
    "seed.cluster_id": (ANNOUNCE,),
    "scheduler.manager": (DISCOVERY, CONFIG_CHANGE),
    "scheduler.refresh_interval": (CONFIG_CHANGE, DISCOVERY),
}

# A seed peer also registers at scheduler.manager.
SEED_PEER: dict[str, tuple[str, ...]] = {
    **PEER,
    "scheduler.manager": (ANNOUNCE, CONFIG_CHANGE),
}

SCHEDULER: dict[str, tuple[str, ...]] = {
    "host.hostname": (ANNOUNCE, KEEPALIVE),
    "host.ip": (ANNOUNCE,),
    "host.idc": (ANNOUNCE,),
    "host.location": (ANNOUNCE,),
    "log.level": (CLUSTER, UT + "test_log_level"),
    "log.format": (UT + "test_log_format",),
    "server.listen": (LISTENERS,),
    "server.port": (LISTENERS,),
    "server.max_connections": (CAPS,),
    "server.tls_cert": (
        TLS_SEC + "test_a_peer_that_does_not_trust_the_ca_tells_the_scheduler_nothing",
        TLS_FILES,
    ),
    "server.tls_key": (
        TLS_SEC + "test_a_peer_that_does_not_trust_the_ca_tells_the_scheduler_nothing",
        TLS_FILES,
    ),
    "scheduling.candidate_parent_limit": (
        SETTINGS,
        SCHED + "test_parent_limit_and_idle_parents_first",
    ),
    "scheduling.filter_parent_limit": (
        SETTINGS,
        SCHED_INV + "test_same_events_and_seed_give_the_same_decisions",
    ),
    "scheduling.back_to_source_count": (
        SETTINGS,
        SCHED_LIFE + "test_back_to_source_count_is_respected",
    ),
    "scheduling.retry_limit": (
        SETTINGS,
        SCHED_LIFE + "test_no_parent_after_retries_goes_back_to_source",
    ),
    "scheduling.retry_interval": (
        SETTINGS,
        SCHED_LIFE + "test_no_parent_after_retries_goes_back_to_source",
    ),
    "scheduling.rejoin_grace": (
        SETTINGS,
        "tests/unit/test_sched_continuity.py::test_when_the_grace_ends_a_task_nobody_holds_gets_its_seed",
    ),
    "gc.peer_ttl": (SETTINGS, SCHED_LIFE + "test_collection_after_ttls"),
    "gc.task_ttl": (SETTINGS, SCHED_LIFE + "test_collection_after_ttls"),
    "gc.host_ttl": (SETTINGS, SCHED_LIFE + "test_collection_after_ttls"),
    "gc.interval": (SETTINGS, SCHED_LIFE + "test_collection_after_ttls"),
    "trust.secret_file": (
        CREDENTIALS + "test_roles_refuse_to_start_without_identity_naming_key_and_command",
        CREDENTIALS + "test_the_cli_refuses_to_start_a_scheduler_without_a_secret",
    ),
    "trust.insecure": (
        TRUST_SETTINGS,
        "tests/security/test_cluster_identity.py::test_an_insecure_cluster",
    ),
    "trust.ticket_ttl": (
        TRUST_SETTINGS,
        "tests/integration/test_tickets.py::test_a_child_renews_its_tickets_before_they_expire",
    ),
    "limits.peers_per_host": (
        TRUST_SETTINGS,
        "tests/security/test_work_amplification.py::"
        "test_item5_piece_length_and_registrations_are_bounded",
    ),
    "limits.registration_rate": (
        TRUST_SETTINGS,
        "tests/unit/test_sched_trust.py::test_bounds_per_host",
    ),
    "manager.address": (ANNOUNCE, KEEPALIVE),
    "manager.cluster_id": (ANNOUNCE, MEMBERS + "test_discovery_by_cidr_and_idc", DISCOVERY),
    "trust.join_token_file": (JOIN, CONFIG_CHANGE, JOIN_UNIT),
}

MANAGER: dict[str, tuple[str, ...]] = {
    "log.level": (UT + "test_log_level",),
    "log.format": (UT + "test_log_format",),
    "server.listen": (MANAGER_LISTEN,),
    "server.port": (MANAGER_LISTEN,),
    "data.dir": (
        MANAGER_FILES,
        SEC + "test_manager_security.py::test_forged_revoked_and_malformed_sessions",
    ),
    "database.driver": (POSTGRES,),
    "database.path": (MANAGER_FILES,),
    "database.dsn": (POSTGRES,),
    "auth.signup": (
        MANAGER_API + "test_open_sign_up",
        MANAGER_API + "test_sign_up_roles_passwords_and_sessions",
    ),
    "auth.jwt_key": (SESSIONS, POSTGRES),
    "auth.session_ttl": (SESSIONS,),
    "auth.refresh_ttl": (SESSIONS,),
    "auth.cookie_secure": (SESSIONS,),
    "keepalive.interval": (KEEPALIVE,),
    "keepalive.timeout": (KEEPALIVE,),
    "keepalive.remove_after": (KEEPALIVE,),
    "gc.lease_ttl": (MANAGER_GC, POSTGRES),
    "gc.audit_ttl": (MANAGER_GC,),
    "trust.secret_file": (
        "tests/integration/test_manager_identity.py::"
        "test_the_secret_is_the_configured_file_or_made_in_the_data_dir",
        POSTGRES,
    ),
    "trust.credential_ttl": (JOIN,),
    "peers.report_interval": (
        PEER_TABLE,
        SETTINGS_IT + "test_a_peer_no_scheduler_reports_turns_inactive_then_goes",
    ),
    "peers.timeout": (
        PEER_TABLE,
        SETTINGS_IT + "test_a_peer_no_scheduler_reports_turns_inactive_then_goes",
    ),
    "peers.remove_after": (
        PEER_TABLE,
        SETTINGS_IT + "test_a_peer_no_scheduler_reports_turns_inactive_then_goes",
    ),
    "jobs.ttl": (JOB_KEYS,),
    "jobs.dispatch_timeout": (DISPATCH,),
    "records.max_rows": (JOB_KEYS,),
    "records.traffic_ttl": (JOB_KEYS,),
}

EFFECTS: dict[str, dict[str, tuple[str, ...]]] = {
    "peer.toml": PEER,
    "seed-peer.toml": SEED_PEER,
    "scheduler.toml": SCHEDULER,
    "manager.toml": MANAGER,
}

_TABLE = re.compile(r"^\[\[?([A-Za-z0-9_.-]+)\]\]?")
_KEY = re.compile(r"^([A-Za-z0-9_-]+) = ")


def conf_keys(path: Path) -> dict[str, bool]:
    """Every dotted key of a conf file (items of a list of tables without their index),
    and whether it is reserved: by a `# reserved:` line among the comments right above it
    or above its table, or in the file's opening comments."""
    keys: dict[str, bool] = {}
    table = ""
    reserved_tables: set[str] = set()
    whole_file = False
    notes: list[str] = []
    seen_content = False
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            notes.append(line)
            continue
        marked = any(n.startswith("# reserved: ") for n in notes)
        if not line.strip():
            if not seen_content and marked:
                whole_file = True
            notes = []
            continue
        seen_content = True
        notes_marked, notes = marked, []
        if m := _TABLE.match(line):
            table = m.group(1)
            if notes_marked:
                reserved_tables.add(table)
            continue
        m = _KEY.match(line)
        assert m, f"{path.name}: cannot read {line!r}"
        key = f"{table}.{m.group(1)}" if table else m.group(1)
        in_reserved_table = any(key.startswith(f"{t}.") for t in reserved_tables)
        keys[key] = whole_file or in_reserved_table or notes_marked
    return keys


def toml_keys(table: dict[str, object], prefix: str = "") -> set[str]:
    out: set[str] = set()
    for key, value in table.items():
        if isinstance(value, dict):
            out |= toml_keys(value, f"{prefix}{key}.")
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for item in value:
                out |= toml_keys(item, f"{prefix}{key}.")  # type: ignore[arg-type]
        else:
            out.add(f"{prefix}{key}")
    return out


FILES = sorted(p.name for p in CONF.glob("*.toml"))


def test_every_conf_file_has_a_table_here() -> None:
    assert set(FILES) == set(EFFECTS)


@pytest.mark.parametrize("name", FILES)
def test_the_reader_here_sees_every_key(name: str) -> None:
    path = CONF / name
    assert set(conf_keys(path)) == toml_keys(tomllib.loads(path.read_text()))


@pytest.mark.parametrize("name", FILES)
def test_every_key_shows_its_effect_or_is_reserved(name: str) -> None:
    keys = conf_keys(CONF / name)
    effects = EFFECTS[name]
    missing = [k for k, reserved in keys.items() if not reserved and k not in effects]
    assert not missing, (
        f"conf/{name}: no test shows what these keys do: {missing}; name one in "
        "tests/unit/test_config_keys.py, or mark the key in config.RESERVED"
    )
    both = [k for k, reserved in keys.items() if reserved and k in effects]
    assert not both, f"conf/{name}: reserved, yet named as having an effect: {both}"
    gone = sorted(set(effects) - set(keys))
    assert not gone, f"conf/{name} has no such keys: {gone}"


@cache
def _module(path: str) -> tuple[str, dict[str, str]]:
    """A test module's constants (its top-level assignments) and its test functions'
    sources by name."""
    source = (ROOT / path).read_text()
    tree = ast.parse(source)
    constants = "\n".join(
        ast.get_source_segment(source, node) or ""
        for node in tree.body
        if isinstance(node, ast.Assign | ast.AnnAssign)
    )
    functions = {
        node.name: ast.get_source_segment(source, node) or ""
        for node in tree.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    }
    return constants, functions


def _sets(key: str, text: str, unique_leaf: bool) -> bool:
    leaf = key.rsplit(".", 1)[-1]
    return key in text or (unique_leaf and re.search(rf"\b{re.escape(leaf)}\b", text) is not None)


@pytest.mark.parametrize("name", [n for n in FILES if EFFECTS[n]])
def test_each_named_test_exists_and_one_sets_the_key(name: str) -> None:
    effects = EFFECTS[name]
    leaves = [k.rsplit(".", 1)[-1] for k in conf_keys(CONF / name)]
    for key, node_ids in effects.items():
        assert node_ids, f"{key}: no test named"
        unique_leaf = leaves.count(key.rsplit(".", 1)[-1]) == 1
        setting = []
        for node_id in node_ids:
            path, _, function = node_id.partition("::")
            constants, functions = _module(path)
            assert function in functions, f"{key}: {node_id} does not exist"
            setting.append(_sets(key, functions[function] + "\n" + constants, unique_leaf))
        assert any(setting), f"{key}: none of {node_ids} sets it"

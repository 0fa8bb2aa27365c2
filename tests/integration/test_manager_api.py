"""The manager's REST API over a real socket: every route, each status it answers
(200, 401, 403, 404, 409, 422), pagination and its Link header, roles per route,
personal access tokens with their scopes, expiry and state, and the audit trail."""

from __future__ import annotations

from pathlib import Path

import trio

from tests.manager_support import FUTURE, PAST, RunningManager, start_manager

CLUSTER = {
    "name": "hz",
    "scopes": {"idc": "hz-1|hz-2", "location": "cn|hz", "cidrs": ["10.0.0.0/8"]},
    "scheduler_cluster_config": {"candidate_parent_limit": 4, "filter_parent_limit": 40},
    "peer_cluster_config": {
        "load_limit": 100,
        "block_list": {"task": {"download": {"applications": ["bad"], "urls": ["^http://x/"]}}},
    },
    "seed_peer_cluster_config": {"load_limit": 500},
}


async def _manager(nursery: trio.Nursery, tmp_path: Path, *overrides: str) -> RunningManager:
    return await start_manager(nursery, tmp_path / "manager", *overrides)


async def test_health_metrics_sign_in_and_users(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        m = await _manager(nursery, tmp_path)
        api = m.api
        health = await api.call("GET", "/healthy", headers=[("authorization", "Bearer x")])
        assert (health.status, health.body) == (200, "OK")
        metrics = await api.call("GET", "/metrics")
        assert metrics.status == 200 and b"dragonfly_manager_gc_runs_total" in metrics.raw

        bad = await api.call("POST", "/api/v1/users/signin", {"name": "root", "password": "x" * 9})
        assert (bad.status, bad.body) == (401, {"message": "Unauthorized"})
        garbage = await api.call("POST", "/api/v1/users/signin", raw=b"{not json")
        assert garbage.status == 401
        reply = await api.call(
            "POST", "/api/v1/users/signin", {"name": "root", "password": m.root_password}
        )
        assert reply.status == 200 and set(reply.body) == {"token", "expire"}
        cookie = reply.headers.get("set-cookie")
        assert cookie.startswith("jwt=") and "HttpOnly" in cookie and "SameSite=lax" in cookie
        root = reply.body["token"]
        # the cookie alone is a session too
        by_cookie = await api.call(
            "GET", "/api/v1/users/1", headers=[("cookie", cookie.split(";")[0])]
        )
        assert by_cookie.status == 200 and by_cookie.body["name"] == "root"
        by_query = await api.call("GET", f"/api/v1/users?token={root}")
        assert by_query.status == 200 and [u["name"] for u in by_query.body] == ["root"]

        user = (await api.call("GET", "/api/v1/users/1", token=root)).body
        assert (
            user["state"] == "enable" and user["is_del"] == 0 and "encrypted_password" not in user
        )
        assert (await api.call("GET", "/api/v1/users/99", token=root)).status == 404
        assert (await api.call("GET", "/api/v1/users/abc", token=root)).status == 404
        patched = await api.call("PATCH", "/api/v1/users/1", {"bio": "admin"}, token=root)
        assert patched.status == 200 and patched.body["bio"] == "admin"
        assert (
            await api.call("PATCH", "/api/v1/users/1", {"state": "off"}, token=root)
        ).status == 422
        last_root = await api.call("PATCH", "/api/v1/users/1", {"state": "disable"}, token=root)
        assert last_root.status == 409
        roles = await api.call("GET", "/api/v1/users/1/roles", token=root)
        assert roles.body == ["root"]
        assert (await api.call("DELETE", "/api/v1/users/1/roles/root", token=root)).status == 409
        unknown = await api.call("GET", "/nothing/here")
        assert unknown.status == 404 and unknown.body == {"message": "Not Found"}
        m.stop()


async def test_sign_up_roles_passwords_and_sessions(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        m = await _manager(nursery, tmp_path)
        api = m.api
        root = await m.root()
        form = {"name": "alice", "password": "alice-pass-1", "email": "alice@example.com"}
        assert (await api.call("POST", "/api/v1/users/signup", form)).status == 401  # off
        created = await api.call("POST", "/api/v1/users/signup", form, token=root)
        assert created.status == 200 and created.body["name"] == "alice"
        alice_id = created.body["id"]
        assert (await api.call("POST", "/api/v1/users/signup", form, token=root)).status == 409
        bad_email = {**form, "name": "bob", "email": "nope"}
        reply = await api.call("POST", "/api/v1/users/signup", bad_email, token=root)
        assert reply.status == 422 and "email" in reply.body["message"]
        short = {**form, "name": "bob", "password": "short"}
        assert (await api.call("POST", "/api/v1/users/signup", short, token=root)).status == 422

        alice = await api.signin("alice", "alice-pass-1")
        assert (await api.call("GET", f"/api/v1/users/{alice_id}/roles", token=alice)).body == [
            "guest"
        ]
        assert (await api.call("GET", "/api/v1/users", token=alice)).status == 200
        denied = await api.call("PATCH", f"/api/v1/users/{alice_id}", {"bio": "x"}, token=alice)
        assert (denied.status, denied.body) == (403, {"message": "permission deny"})
        guest_signup = await api.call(
            "POST", "/api/v1/users/signup", {**form, "name": "eve"}, token=alice
        )
        assert guest_signup.status == 403

        # password change by the user (old password needed), reset by root (not needed)
        path = f"/api/v1/users/{alice_id}/reset_password"
        wrong = await api.call(
            "POST", path, {"old_password": "nope-nope", "new_password": "alice-pass-2"}, token=alice
        )
        assert wrong.status == 401
        ok = await api.call(
            "POST",
            path,
            {"old_password": "alice-pass-1", "new_password": "alice-pass-2"},
            token=alice,
        )
        assert ok.status == 200
        assert (await api.call("GET", "/api/v1/users", token=alice)).status == 401  # old session
        alice = await api.signin("alice", "alice-pass-2")
        other = await api.call(
            "POST", "/api/v1/users/1/reset_password", {"new_password": "hijacked-1"}, token=alice
        )
        assert other.status == 403
        reset = await api.call("POST", path, {"new_password": "alice-pass-3"}, token=root)
        assert reset.status == 200
        assert (await api.call("POST", path, {"new_password": "x" * 8}, token=root)).status == 200
        assert (
            await api.call(
                "POST", "/api/v1/users/77/reset_password", {"new_password": "x" * 8}, token=root
            )
        ).status == 404
        alice = await api.signin("alice", "x" * 8)

        # roles of a user
        role_path = f"/api/v1/users/{alice_id}/roles/root"
        assert (await api.call("PUT", role_path, token=root)).status == 200
        assert (await api.call("PUT", role_path, token=root)).status == 409
        assert (
            await api.call("PUT", f"/api/v1/users/{alice_id}/roles/nope", token=root)
        ).status == 404
        assert (await api.call("PUT", "/api/v1/users/99/roles/root", token=root)).status == 404
        assert (
            await api.call("PATCH", f"/api/v1/users/{alice_id}", {"bio": "b"}, token=alice)
        ).status == 200
        assert (await api.call("DELETE", role_path, token=root)).status == 200
        assert (await api.call("DELETE", role_path, token=root)).status == 404

        # refresh: a new token works, the refreshed one is done; sign-out revokes
        refreshed = await api.call("POST", "/api/v1/users/refresh_token", token=alice)
        assert refreshed.status == 200
        assert (await api.call("GET", "/api/v1/users", token=alice)).status == 401
        alice = refreshed.body["token"]
        assert (await api.call("GET", "/api/v1/users", token=alice)).status == 200
        out = await api.call("POST", "/api/v1/users/signout", token=alice)
        assert out.status == 200 and "jwt=" in out.headers.get("set-cookie")
        assert (await api.call("GET", "/api/v1/users", token=alice)).status == 401
        assert (await api.call("POST", "/api/v1/users/refresh_token", token=alice)).status == 401

        # root disables alice: her sessions end and she cannot sign in
        alice = await api.signin("alice", "x" * 8)
        assert (
            await api.call("PATCH", f"/api/v1/users/{alice_id}", {"state": "disable"}, token=root)
        ).status == 200
        assert (await api.call("GET", "/api/v1/users", token=alice)).status == 401
        assert (
            await api.call("POST", "/api/v1/users/signin", {"name": "alice", "password": "x" * 8})
        ).status == 401
        m.stop()


async def test_open_sign_up(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        m = await _manager(nursery, tmp_path, "auth.signup=true")
        form = {"name": "carol", "password": "carol-pass-1", "email": "c@example.com"}
        reply = await m.api.call("POST", "/api/v1/users/signup", form)
        assert reply.status == 200
        carol = await m.api.signin("carol", "carol-pass-1")
        roles = await m.api.call("GET", f"/api/v1/users/{reply.body['id']}/roles", token=carol)
        assert roles.body == ["guest"]
        m.stop()


async def test_roles_and_permissions(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        m = await _manager(nursery, tmp_path)
        api, root = m.api, await m.root()
        assert (await api.call("GET", "/api/v1/roles", token=root)).body == ["guest", "root"]
        perms = (await api.call("GET", "/api/v1/permissions", token=root)).body
        assert {"object": "clusters", "action": "*"} in perms
        assert {"object": "clusters", "action": "read"} in perms
        role = {"role": "operator", "permissions": [{"object": "clusters", "action": "*"}]}
        assert (await api.call("POST", "/api/v1/roles", role, token=root)).status == 200
        assert (await api.call("POST", "/api/v1/roles", role, token=root)).status == 409
        bad = {"role": "x", "permissions": [{"object": "clusters", "action": "write"}]}
        assert (await api.call("POST", "/api/v1/roles", bad, token=root)).status == 422
        bad_object = {"role": "x", "permissions": [{"object": "nope", "action": "read"}]}
        assert (await api.call("POST", "/api/v1/roles", bad_object, token=root)).status == 422
        got = await api.call("GET", "/api/v1/roles/operator", token=root)
        assert got.body == [["operator", "clusters", "*"]]
        assert (await api.call("GET", "/api/v1/roles/nope", token=root)).status == 404
        perm = {"object": "schedulers", "action": "read"}
        path = "/api/v1/roles/operator/permissions"
        assert (await api.call("POST", path, perm, token=root)).status == 200
        assert (await api.call("POST", path, perm, token=root)).status == 409
        assert (
            await api.call("POST", "/api/v1/roles/root/permissions", perm, token=root)
        ).status == 409

        # a user with the operator role may write clusters and read schedulers only
        user_id = await api.add_user(root, "oscar", "oscar-pass-1")
        assert (
            await api.call("PUT", f"/api/v1/users/{user_id}/roles/operator", token=root)
        ).status == 200
        guest = f"/api/v1/users/{user_id}/roles/guest"
        assert (await api.call("DELETE", guest, token=root)).status == 200
        oscar = await api.signin("oscar", "oscar-pass-1")
        assert (
            await api.call("POST", "/api/v1/clusters", {"name": "o"}, token=oscar)
        ).status == 200
        assert (await api.call("GET", "/api/v1/schedulers", token=oscar)).status == 200
        assert (
            await api.call("POST", "/api/v1/configs", {"name": "n", "value": "v"}, token=oscar)
        ).status == 403

        assert (await api.call("DELETE", path, perm, token=root)).status == 200
        assert (await api.call("DELETE", path, perm, token=root)).status == 404
        assert (await api.call("GET", "/api/v1/schedulers", token=oscar)).status == 403
        assert (await api.call("DELETE", "/api/v1/roles/operator", token=root)).status == 200
        assert (await api.call("DELETE", "/api/v1/roles/operator", token=root)).status == 404
        assert (await api.call("DELETE", "/api/v1/roles/guest", token=root)).status == 409
        m.stop()


async def test_clusters_and_their_parts(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        m = await _manager(nursery, tmp_path)
        api, root = m.api, await m.root()
        seeded = (await api.call("GET", "/api/v1/clusters", token=root)).body
        assert [(c["id"], c["name"], c["is_default"]) for c in seeded] == [(1, "cluster-1", True)]
        assert seeded[0]["scheduler_cluster_config"] == {
            "candidate_parent_limit": 3,
            "filter_parent_limit": 15,
            "job_rate_limit": 10,
        }
        created = await api.call("POST", "/api/v1/clusters", CLUSTER, token=root)
        assert created.status == 200, created.raw
        c = created.body
        assert c["scopes"] == {
            "idc": "hz-1|hz-2",
            "location": "cn|hz",
            "cidrs": ["10.0.0.0/8"],
            "hostnames": [],
        }
        assert c["scheduler_cluster_config"]["job_rate_limit"] == 10  # default filled in
        assert c["peer_cluster_config"]["block_list"]["task"]["download"]["applications"] == ["bad"]
        assert c["seed_peer_cluster_config"]["load_limit"] == 500
        assert c["scheduler_cluster_id"] == c["id"] and c["seed_peer_cluster_id"] > 1
        assert (await api.call("POST", "/api/v1/clusters", CLUSTER, token=root)).status == 409
        for bad in (
            {"name": "x", "scopes": {"cidrs": ["10.0.0.0/33"]}},
            {"name": "x", "scopes": {"hostnames": ["(unclosed"]}},
            {"name": "x", "scheduler_cluster_config": {"candidate_parent_limit": 21}},
            {"name": "x", "peer_cluster_config": {"load_limit": 0}},
            {
                "name": "x",
                "peer_cluster_config": {"block_list": {"task": {"download": {"priorities": [9]}}}},
            },
            {"name": ""},
            {"bio": "no name"},
            {"name": 5},
        ):
            reply = await api.call("POST", "/api/v1/clusters", bad, token=root)
            assert reply.status == 422, (bad, reply.raw)
            assert "message" in reply.body
        cid = c["id"]
        got = await api.call("GET", f"/api/v1/clusters/{cid}", token=root)
        assert got.body == c
        patched = await api.call(
            "PATCH",
            f"/api/v1/clusters/{cid}",
            {"seed_peer_cluster_config": {"load_limit": 9}, "is_default": True},
            token=root,
        )
        assert patched.status == 200
        assert patched.body["seed_peer_cluster_config"]["load_limit"] == 9
        assert patched.body["is_default"] and patched.body["scopes"]["idc"] == "hz-1|hz-2"
        assert (await api.call("GET", "/api/v1/clusters/999", token=root)).status == 404
        assert (
            await api.call("PATCH", "/api/v1/clusters/999", {"bio": "x"}, token=root)
        ).status == 404

        # the parts
        sc = await api.call("GET", f"/api/v1/scheduler-clusters/{cid}", token=root)
        assert sc.status == 200 and sc.body["client_config"]["load_limit"] == 100
        assert [s["id"] for s in sc.body["seed_peer_clusters"]] == [c["seed_peer_cluster_id"]]
        spc = await api.call(
            "POST",
            "/api/v1/seed-peer-clusters",
            {"name": "spc", "config": {"load_limit": 7}},
            token=root,
        )
        assert spc.status == 200 and spc.body["config"] == {"load_limit": 7}
        new_sc = await api.call(
            "POST",
            "/api/v1/scheduler-clusters",
            {"name": "sc2", "seed_peer_cluster_id": spc.body["id"]},
            token=root,
        )
        assert new_sc.status == 200
        assert [s["id"] for s in new_sc.body["seed_peer_clusters"]] == [spc.body["id"]]
        missing = await api.call(
            "POST",
            "/api/v1/scheduler-clusters",
            {"name": "sc3", "seed_peer_cluster_id": 999},
            token=root,
        )
        assert missing.status == 404 and "seed peer cluster 999" in missing.body["message"]
        link = f"/api/v1/seed-peer-clusters/{spc.body['id']}/scheduler-clusters/{cid}"
        assert (await api.call("PUT", link, token=root)).status == 200
        assert (
            await api.call(
                "PUT",
                f"/api/v1/seed-peer-clusters/{spc.body['id']}/scheduler-clusters/999",
                token=root,
            )
        ).status == 404
        assert (
            await api.call(
                "PATCH",
                f"/api/v1/scheduler-clusters/{new_sc.body['id']}",
                {"config": {"filter_parent_limit": 5}},
                token=root,
            )
        ).status == 422
        assert (
            await api.call(
                "PATCH", f"/api/v1/seed-peer-clusters/{spc.body['id']}", {"bio": "b"}, token=root
            )
        ).body["bio"] == "b"
        assert (await api.call("GET", "/api/v1/scheduler-clusters?name=sc2", token=root)).body[0][
            "name"
        ] == "sc2"

        # a cluster with a scheduler cannot go; without, it goes with its seed peer cluster
        sched = await api.call(
            "POST",
            "/api/v1/schedulers",
            {"host_name": "s1", "ip": "10.0.0.1", "port": 8002, "scheduler_cluster_id": cid},
            token=root,
        )
        assert sched.status == 200 and sched.body["state"] == "inactive"
        refused = await api.call("DELETE", f"/api/v1/clusters/{cid}", token=root)
        assert refused.status == 409
        moved = f"/api/v1/scheduler-clusters/{new_sc.body['id']}/schedulers/{sched.body['id']}"
        assert (await api.call("PUT", moved, token=root)).status == 200
        assert (await api.call("DELETE", f"/api/v1/clusters/{cid}", token=root)).status == 200
        assert (await api.call("DELETE", f"/api/v1/clusters/{cid}", token=root)).status == 404
        gone = await api.call(
            "GET", f"/api/v1/seed-peer-clusters/{c['seed_peer_cluster_id']}", token=root
        )
        assert gone.status == 404
        assert (
            await api.call("DELETE", f"/api/v1/scheduler-clusters/{new_sc.body['id']}", token=root)
        ).status == 409
        m.stop()


async def test_schedulers_seed_peers_peers(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        m = await _manager(nursery, tmp_path)
        api, root = m.api, await m.root()
        s = {"host_name": "s1", "ip": "10.0.0.1", "port": 8002, "scheduler_cluster_id": 1}
        created = await api.call("POST", "/api/v1/schedulers", s, token=root)
        assert created.status == 200 and created.body["features"] == ["schedule", "preheat"]
        assert (await api.call("POST", "/api/v1/schedulers", s, token=root)).status == 409
        assert (
            await api.call("POST", "/api/v1/schedulers", {**s, "ip": "nope"}, token=root)
        ).status == 422
        assert (
            await api.call("POST", "/api/v1/schedulers", {**s, "port": 0}, token=root)
        ).status == 422
        assert (
            await api.call(
                "POST",
                "/api/v1/schedulers",
                {**s, "host_name": "s2", "scheduler_cluster_id": 9},
                token=root,
            )
        ).status == 404
        sid = created.body["id"]
        patched = await api.call(
            "PATCH",
            f"/api/v1/schedulers/{sid}",
            {"idc": "hz", "features": ["schedule"]},
            token=root,
        )
        assert patched.body["idc"] == "hz" and patched.body["features"] == ["schedule"]
        listed = await api.call("GET", "/api/v1/schedulers?state=inactive&host_name=s1", token=root)
        assert [x["id"] for x in listed.body] == [sid]
        assert (await api.call("GET", "/api/v1/schedulers?state=dead", token=root)).status == 422
        assert (
            await api.call("GET", "/api/v1/schedulers?scheduler_cluster_id=x", token=root)
        ).status == 422
        assert (await api.call("GET", "/api/v1/scheduler-features", token=root)).body == [
            "schedule",
            "preheat",
        ]
        assert (await api.call("DELETE", f"/api/v1/schedulers/{sid}", token=root)).status == 200
        assert (await api.call("GET", f"/api/v1/schedulers/{sid}", token=root)).status == 404

        sp = {
            "host_name": "seed",
            "ip": "10.0.0.2",
            "port": 65001,
            "download_port": 65002,
            "seed_peer_cluster_id": 1,
        }
        created = await api.call("POST", "/api/v1/seed-peers", sp, token=root)
        assert created.status == 200 and created.body["type"] == "super"
        assert (
            await api.call("POST", "/api/v1/seed-peers", {**sp, "type": "weak"}, token=root)
        ).status == 422
        spid = created.body["id"]
        assert (
            await api.call("PATCH", f"/api/v1/seed-peers/{spid}", {"port": 1}, token=root)
        ).body["port"] == 1
        assert (
            await api.call("PUT", f"/api/v1/seed-peer-clusters/1/seed-peers/{spid}", token=root)
        ).status == 200
        assert (await api.call("DELETE", f"/api/v1/seed-peers/{spid}", token=root)).status == 200

        p = {
            "host_name": "n1",
            "type": "normal",
            "ip": "10.0.0.3",
            "port": 1,
            "download_port": 2,
            "proxy_port": 3,
            "scheduler_cluster_id": 1,
        }
        created = await api.call("POST", "/api/v1/peers", p, token=root)
        assert created.status == 200 and created.body["state"] == "inactive"
        assert (
            await api.call("POST", "/api/v1/peers", {**p, "type": "x"}, token=root)
        ).status == 422
        pid = created.body["id"]
        assert (
            await api.call("PATCH", f"/api/v1/peers/{pid}", {"port": 5}, token=root)
        ).status == 405
        assert (await api.call("GET", "/api/v1/peers?type=normal", token=root)).body[0][
            "host_name"
        ] == "n1"
        assert (await api.call("DELETE", f"/api/v1/peers/{pid}", token=root)).status == 200
        m.stop()


async def test_configs_applications_and_pagination(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        m = await _manager(nursery, tmp_path)
        api, root = m.api, await m.root()
        for i in range(12):
            reply = await api.call(
                "POST", "/api/v1/configs", {"name": f"k{i:02}", "value": "v"}, token=root
            )
            assert reply.status == 200 and reply.body["user_id"] == 1
        assert (
            await api.call("POST", "/api/v1/configs", {"name": "k00", "value": "v"}, token=root)
        ).status == 409
        assert (
            await api.call(
                "POST", "/api/v1/configs", {"name": "z", "value": "v", "user_id": 42}, token=root
            )
        ).status == 404
        assert (
            await api.call(
                "POST", "/api/v1/configs", {"name": "z", "value": "v" * 1025}, token=root
            )
        ).status == 422
        page = await api.call("GET", "/api/v1/configs?per_page=5&page=2&value=v", token=root)
        assert [c["name"] for c in page.body] == ["k05", "k06", "k07", "k08", "k09"]
        assert page.headers.get("link") == (
            "</api/v1/configs?page=1&per_page=5&value=v>;rel=prev,"
            "</api/v1/configs?page=3&per_page=5&value=v>;rel=next,"
            "</api/v1/configs?page=1&per_page=5&value=v>;rel=first,"
            "</api/v1/configs?page=3&per_page=5&value=v>;rel=last"
        )
        last = await api.call("GET", "/api/v1/configs?per_page=5&page=3", token=root)
        assert len(last.body) == 2 and "page=3&per_page=5>;rel=next" in last.headers.get("link")
        first = await api.call("GET", "/api/v1/configs", token=root)
        assert len(first.body) == 10  # default per_page
        for bad in ("per_page=-1", "page=x", "per_page=1001"):
            assert (await api.call("GET", f"/api/v1/configs?{bad}", token=root)).status == 422
        cid = first.body[0]["id"]
        assert (await api.call("PATCH", f"/api/v1/configs/{cid}", {"value": "w"}, token=root)).body[
            "value"
        ] == "w"
        assert (await api.call("DELETE", f"/api/v1/configs/{cid}", token=root)).status == 200

        app = {
            "name": "a",
            "url": "http://a.example",
            "priority": {"value": 10, "urls": [{"regex": "^http://a/", "value": 5}]},
        }
        created = await api.call("POST", "/api/v1/applications", app, token=root)
        assert created.status == 200 and created.body["priority"]["urls"][0]["value"] == 5
        assert (
            await api.call(
                "POST",
                "/api/v1/applications",
                {**app, "name": "b", "priority": {"value": 21}},
                token=root,
            )
        ).status == 422
        assert (
            await api.call(
                "POST", "/api/v1/applications", {**app, "name": "b", "url": "ftp://x"}, token=root
            )
        ).status == 422
        aid = created.body["id"]
        assert (
            await api.call("PATCH", f"/api/v1/applications/{aid}", {"bio": "x"}, token=root)
        ).body["bio"] == "x"
        assert (await api.call("GET", f"/api/v1/applications/{aid}", token=root)).status == 200
        assert (await api.call("DELETE", f"/api/v1/applications/{aid}", token=root)).status == 200
        m.stop()


async def test_personal_access_tokens(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        m = await _manager(nursery, tmp_path)
        api, root = m.api, await m.root()
        created = await api.call(
            "POST",
            "/api/v1/personal-access-tokens",
            {"name": "harbor", "scopes": ["cluster"], "expired_at": FUTURE},
            token=root,
        )
        assert created.status == 200 and created.body["token"].startswith("dfpat_")
        token, tid = created.body["token"], created.body["id"]
        shown = await api.call("GET", f"/api/v1/personal-access-tokens/{tid}", token=root)
        assert shown.status == 200 and "token" not in shown.body
        assert (
            token
            not in (
                await api.call("GET", "/api/v1/personal-access-tokens", token=root)
            ).raw.decode()
        )
        dup = {"name": "harbor", "expired_at": FUTURE}
        assert (
            await api.call("POST", "/api/v1/personal-access-tokens", dup, token=root)
        ).status == 409
        for bad in (
            {"name": "p", "expired_at": PAST},
            {"name": "p", "expired_at": "tomorrow"},
            {"name": "p", "expired_at": FUTURE, "scopes": ["admin"]},
            {"name": "p"},
        ):
            assert (
                await api.call("POST", "/api/v1/personal-access-tokens", bad, token=root)
            ).status == 422

        assert (await api.call("GET", "/oapi/v1/clusters", token=token)).status == 200
        by_query = await api.call("GET", f"/oapi/v1/clusters?access_token={token}")
        assert by_query.status == 200 and by_query.body[0]["name"] == "cluster-1"
        lower = await api.call(
            "GET", "/oapi/v1/clusters", headers=[("authorization", f"bearer {token}")]
        )
        assert lower.status == 200
        made = await api.call("POST", "/oapi/v1/clusters", {"name": "by-pat"}, token=token)
        assert made.status == 200
        assert (
            await api.call(
                "PATCH", f"/oapi/v1/clusters/{made.body['id']}", {"bio": "p"}, token=token
            )
        ).status == 200
        assert (
            await api.call("DELETE", f"/oapi/v1/clusters/{made.body['id']}", token=token)
        ).status == 200
        assert (
            await api.call("GET", "/api/v1/clusters", token=token)
        ).status == 401  # not a session

        job_only = await api.add_token(root, ["job"])
        scope = await api.call("GET", "/oapi/v1/clusters", token=job_only)
        assert scope.status == 403 and "Required permission: cluster" in scope.body["message"]

        inactive = await api.call(
            "PATCH", f"/api/v1/personal-access-tokens/{tid}", {"state": "inactive"}, token=root
        )
        assert inactive.status == 200 and inactive.body["state"] == "inactive"
        refused = await api.call("GET", "/oapi/v1/clusters", token=token)
        assert (refused.status, refused.body) == (403, {"message": "Token is inactive"})
        await api.call(
            "PATCH",
            f"/api/v1/personal-access-tokens/{tid}",
            {"state": "active", "expired_at": PAST},
            token=root,
        )
        expired = await api.call("GET", "/oapi/v1/clusters", token=token)
        assert (expired.status, expired.body) == (403, {"message": "Token has expired"})
        assert (await api.call("GET", "/oapi/v1/clusters", token="dfpat_nope")).status == 401
        assert (await api.call("GET", "/oapi/v1/clusters")).status == 401

        # a guest's token reads, never writes
        await api.add_user(root, "gina", "gina-pass-1")
        gina = await api.signin("gina", "gina-pass-1")
        assert (
            await api.call("POST", "/api/v1/personal-access-tokens", dup, token=gina)
        ).status == 403
        guest_token = await api.add_token(root, ["cluster"])
        listed = await api.call("GET", "/api/v1/personal-access-tokens?state=active", token=root)
        assert listed.status == 200 and all(t["state"] == "active" for t in listed.body)
        gina_id = (await api.call("GET", "/api/v1/users?name=gina", token=root)).body[0]["id"]
        own = await api.call(
            "POST",
            "/api/v1/personal-access-tokens",
            {"name": "gina-token", "expired_at": FUTURE, "user_id": gina_id},
            token=root,
        )
        assert (await api.call("GET", "/oapi/v1/clusters", token=own.body["token"])).status == 200
        assert (
            await api.call("POST", "/oapi/v1/clusters", {"name": "g"}, token=own.body["token"])
        ).status == 403
        assert guest_token
        assert (
            await api.call("DELETE", f"/api/v1/personal-access-tokens/{tid}", token=root)
        ).status == 200
        assert (await api.call("GET", "/oapi/v1/clusters", token=token)).status == 401
        m.stop()


async def test_audit_rows_for_writes_and_refusals(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        m = await _manager(nursery, tmp_path)
        api, root = m.api, await m.root()
        await api.call("POST", "/api/v1/configs", {"name": "a", "value": "b"}, token=root)
        await api.call("GET", "/api/v1/configs", token=root)  # a read: no row
        await api.call("DELETE", "/api/v1/configs/1", token="forged")
        await api.call("GET", "/api/v1/users?token=secret-in-query")
        audits = await api.call("GET", "/api/v1/audits", token=root)
        rows = [
            (
                a["actor_type"],
                a["actor_name"],
                a["operation"],
                a["path"],
                a["status_code"],
                a["state"],
            )
            for a in audits.body
        ]
        assert rows[:3] == [
            ("UNKNOWN", "", "GET", "/api/v1/users", 401, "FAILURE"),
            ("UNKNOWN", "", "DELETE", "/api/v1/configs/1", 401, "FAILURE"),
            ("USER", "root", "POST", "/api/v1/configs", 200, "SUCCESS"),
        ]
        assert ("USER", "root", "POST", "/api/v1/users/signin", 200, "SUCCESS") in rows
        filtered = await api.call("GET", "/api/v1/audits?status_code=401&state=FAILURE", token=root)
        assert len(filtered.body) == 2
        assert (await api.call("GET", "/api/v1/audits?actor_type=ROBOT", token=root)).status == 422
        one = await api.call("GET", f"/api/v1/audits/{audits.body[0]['id']}", token=root)
        assert one.status == 200
        assert (
            await api.call("DELETE", f"/api/v1/audits/{audits.body[0]['id']}", token=root)
        ).status == 405
        m.stop()

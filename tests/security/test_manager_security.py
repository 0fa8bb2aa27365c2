"""What an outsider or a guest tries against the manager's API, route by route: no
credentials (401), a guest's session writing (403), expired, inactive or wrongly
scoped personal access tokens (403), forged or revoked sessions (401), a session
where a token belongs and the other way round, oversize bodies, and a member lying
about its address."""

from __future__ import annotations

import time
from pathlib import Path

import jwt
import trio
from starlette.routing import Route

from dragonfly.manager.app import ROUTES
from dragonfly.wire.messages import AnnounceMember, MemberRegistered
from tests.manager_support import FUTURE, issuer_of, member_channel, start_manager

PUBLIC = {"/api/v1/users/signin", "/api/v1/users/signout"}
OWN = "/api/v1/users/refresh_token"  # a guest may refresh its own session


def _routes(prefix: str) -> list[tuple[str, str]]:
    """(method, concrete path) of every route under `prefix`."""
    found = []
    for route in ROUTES:
        if not isinstance(route, Route) or not route.path.startswith(prefix):
            continue
        path = route.path.replace("{role}", "guest")
        for param in ("{id}", "{scheduler_id}", "{seed_peer_id}", "{scheduler_cluster_id}"):
            path = path.replace(param, "1")
        for method in sorted(route.methods or ()):
            if method != "HEAD":
                found.append((method, path))
    return found


async def test_every_route_refuses_the_unauthenticated_and_guests(tmp_path: Path) -> None:
    api_routes = _routes("/api/v1/")
    assert len(api_routes) > 50  # the table above really lists the API
    async with trio.open_nursery() as nursery:
        m = await start_manager(nursery, tmp_path / "m")
        api, root = m.api, await m.root()
        await api.add_user(root, "guest1", "guest-pass-1")
        guest = await api.signin("guest1", "guest-pass-1")
        for method, path in api_routes:
            if path in PUBLIC:
                continue
            anonymous = await api.call(method, path, {})
            assert anonymous.status == 401, (method, path, anonymous.raw)
            assert anonymous.body == {"message": "Unauthorized"}
            forged = jwt.encode(
                {
                    "id": 1,
                    "iat": int(time.time()),
                    "exp": int(time.time()) + 60,
                    "jti": "x",
                    "gen": 0,
                },
                "not-the-managers-key-" * 3,
                algorithm="HS256",
            )
            assert (await api.call(method, path, {}, token=forged)).status == 401, (method, path)
            as_guest = await api.call(method, path, {}, token=guest)
            if path == OWN:
                assert as_guest.status == 200
                guest = as_guest.body["token"]
            elif method == "GET":
                assert as_guest.status not in (401, 403), (method, path, as_guest.raw)
            else:
                assert as_guest.status == 403, (method, path, as_guest.raw)
        # nothing was changed by any of it
        assert [u["name"] for u in (await api.call("GET", "/api/v1/users", token=root)).body] == [
            "root",
            "guest1",
        ]
        assert (await api.call("GET", "/api/v1/users/1/roles", token=root)).body == ["root"]
        refusals = await api.call("GET", "/api/v1/audits?status_code=403&per_page=1000", token=root)
        assert len(refusals.body) >= sum(
            1 for m_, p in api_routes if m_ != "GET" and p not in (*PUBLIC, OWN)
        )
        m.stop()


async def test_access_tokens_expired_inactive_wrong_scope(tmp_path: Path) -> None:
    # (/oapi/v1/jobs: tests/security/test_jobs_security.py)
    oapi_routes = [r for r in _routes("/oapi/v1/") if r[1].startswith("/oapi/v1/clusters")]
    assert {p for _, p in oapi_routes} == {"/oapi/v1/clusters", "/oapi/v1/clusters/1"}
    async with trio.open_nursery() as nursery:
        m = await start_manager(nursery, tmp_path / "m")
        api, root = m.api, await m.root()
        made = {}
        for name, body in {
            "inactive": {"scopes": ["cluster"]},
            "expired": {"scopes": ["cluster"]},
            "job": {"scopes": ["job"]},
        }.items():
            reply = await api.call(
                "POST",
                "/api/v1/personal-access-tokens",
                {"name": name, "expired_at": FUTURE, **body},
                token=root,
            )
            made[name] = reply.body
        await api.call(
            "PATCH",
            f"/api/v1/personal-access-tokens/{made['inactive']['id']}",
            {"state": "inactive"},
            token=root,
        )
        await api.call(
            "PATCH",
            f"/api/v1/personal-access-tokens/{made['expired']['id']}",
            {"expired_at": "2000-01-01T00:00:00Z"},
            token=root,
        )
        for method, path in oapi_routes:
            assert (await api.call(method, path, {})).status == 401
            assert (await api.call(method, path, {}, token="dfpat_guessed")).status == 401
            assert (
                await api.call(method, path, {}, token=root)
            ).status == 401  # a session is no token
            for name, message in (
                ("inactive", "Token is inactive"),
                ("expired", "Token has expired"),
            ):
                reply = await api.call(method, f"{path}?access_token={made[name]['token']}", {})
                assert (reply.status, reply.body) == (403, {"message": message}), (method, path)
            wrong = await api.call(method, path, {}, token=made["job"]["token"])
            assert wrong.status == 403, (method, path)
        # a token is no session either
        assert (await api.call("GET", "/api/v1/clusters", token=made["job"]["token"])).status == 401
        # nothing the refused tokens tried happened
        assert [
            c["name"] for c in (await api.call("GET", "/api/v1/clusters", token=root)).body
        ] == ["cluster-1"]
        m.stop()


async def test_forged_revoked_and_malformed_sessions(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        m = await start_manager(nursery, tmp_path / "m")
        api, root = m.api, await m.root()
        unsigned = jwt.encode({"id": 1, "exp": int(time.time()) + 60}, None, algorithm="none")
        assert (await api.call("GET", "/api/v1/users", token=unsigned)).status == 401
        header, payload, _ = root.split(".")
        assert (
            await api.call("GET", "/api/v1/users", token=f"{header}.{payload}.AAAA")
        ).status == 401
        # the manager's own key, but no generation or jti: refused
        key = (Path(m.config.data.dir) / "jwt.key").read_text().strip()
        bare = jwt.encode(
            {"id": 1, "iat": int(time.time()), "exp": int(time.time()) + 60}, key, algorithm="HS256"
        )
        assert (await api.call("GET", "/api/v1/users", token=bare)).status == 401
        expired = jwt.encode(
            {"id": 1, "iat": 1, "exp": 2, "orig_iat": 1, "jti": "old", "gen": 0},
            key,
            algorithm="HS256",
        )
        assert (await api.call("GET", "/api/v1/users", token=expired)).status == 401
        assert (await api.call("POST", "/api/v1/users/refresh_token", token=expired)).status == 401
        await api.call("POST", "/api/v1/users/signout", token=root)
        assert (await api.call("GET", "/api/v1/users", token=root)).status == 401
        # an oversize body is refused before it is read whole
        root = await m.root()
        port = int(m.url.rsplit(":", 1)[1])
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(
            b"POST /api/v1/configs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + root.encode() + b"\r\nContent-Length: 2097152\r\n\r\n"
        )
        answer = b""
        with trio.move_on_after(10):
            while b"\r\n\r\n" not in answer:
                answer += await stream.receive_some(4096)
        await stream.aclose()
        assert answer.startswith(b"HTTP/1.1 413")
        # injection through a filter is just a value
        odd = await api.call("GET", "/api/v1/users?name=root'%20OR%20'1'='1", token=root)
        assert odd.status == 200 and odd.body == []
        # the root password file is the owner's only
        assert (Path(m.config.data.dir) / "root-password").stat().st_mode & 0o777 == 0o600
        assert (Path(m.config.data.dir) / "manager.db").stat().st_mode & 0o777 == 0o600
        m.stop()


async def test_a_member_cannot_claim_another_address(tmp_path: Path) -> None:
    """A scheduler that says it is 10.1.2.3 is recorded, and offered to peers, at the
    address it connected from; it cannot take over the row of a scheduler elsewhere."""
    async with trio.open_nursery() as nursery:
        m = await start_manager(nursery, tmp_path / "m")
        api, root = m.api, await m.root()
        real = await api.call(
            "POST",
            "/api/v1/schedulers",
            {"host_name": "s", "ip": "10.1.2.3", "port": 8002, "scheduler_cluster_id": 1},
            token=root,
        )
        member = issuer_of(m).credential("s-elsewhere", "scheduler")  # a real member
        async with member_channel(m.url, "scheduler", member) as channel:
            await channel.send(AnnounceMember(hostname="s", ip="10.1.2.3", port=6666, cluster_id=1))
            registered = await channel.receive()
            assert isinstance(registered, MemberRegistered)
            assert registered.member_id != real.body["id"]
            liar = (
                await api.call("GET", f"/api/v1/schedulers/{registered.member_id}", token=root)
            ).body
            assert (liar["ip"], liar["claimed_ip"]) == ("127.0.0.1", "10.1.2.3")
        untouched = (
            await api.call("GET", f"/api/v1/schedulers/{real.body['id']}", token=root)
        ).body
        assert (untouched["port"], untouched["state"]) == (8002, "inactive")
        m.stop()

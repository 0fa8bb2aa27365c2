"""What an outsider, a guest or a token without the right scope tries against the jobs,
the download records and the web console: every new route without credentials, a
guest's writes, a PAT without `job` (or a guest's PAT with it), console forms posted
without their CSRF token or with another session's, a flood of jobs past a cluster's
job_rate_limit, and a registry password looked for in the database and the answers."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlencode

import trio
from starlette.routing import Route

from dragonfly.manager.app import ROUTES
from dragonfly.manager.console.routes import ROUTES as CONSOLE
from tests.manager_support import Api, start_manager

JOB_ROUTES = [
    (method, route.path.replace("{id}", "1"))
    for route in ROUTES
    if isinstance(route, Route)
    and route.path.startswith(
        ("/api/v1/jobs", "/oapi/v1/jobs", "/api/v1/download-records", "/api/v1/traffic")
    )
    for method in sorted(route.methods or ())
    if method != "HEAD"
]
PREHEAT = {
    "type": "preheat",
    "args": {"type": "file", "url": "http://origin.example/a.bin"},
    "scheduler_cluster_ids": [1],
}
FORM = [("content-type", "application/x-www-form-urlencoded")]


async def jobs_count(api: Api, root: str) -> int:
    return len((await api.call("GET", "/api/v1/jobs?per_page=1000", token=root)).body)


async def console_session(api: Api, name: str, password: str) -> tuple[str, str, str]:
    """Sign in through the console's form: (the session cookie's value, its
    Set-Cookie header, a CSRF token of a page rendered for that session)."""
    page = await api.call("GET", "/signin")
    pre = re.search(r"df_signin=([^;]+)", page.headers.get("set-cookie") or "").group(1)  # type: ignore[union-attr]
    token = re.search(rb'name="csrf" value="([0-9a-f]+)"', page.raw).group(1).decode()  # type: ignore[union-attr]
    body = urlencode({"csrf": token, "name": name, "password": password, "next": "/"})
    done = await api.call(
        "POST", "/signin", raw=body.encode(), headers=[*FORM, ("cookie", f"df_signin={pre}")]
    )
    assert done.status == 303, done.raw
    cookie = done.headers.get("set-cookie") or ""
    session = re.search(r"jwt=([^;]+)", cookie).group(1)  # type: ignore[union-attr]
    form_page = await api.call("GET", "/clusters/new", headers=[("cookie", f"jwt={session}")])
    csrf = re.search(rb'name="csrf" value="([0-9a-f]+)"', form_page.raw).group(1).decode()  # type: ignore[union-attr]
    return session, cookie, csrf


async def test_job_routes_refuse_outsiders_guests_and_wrong_tokens(tmp_path: Path) -> None:
    assert len(JOB_ROUTES) == 12  # the jobs (both prefixes), records and traffic
    async with trio.open_nursery() as nursery:
        m = await start_manager(nursery, tmp_path / "m")
        api, root = m.api, await m.root()
        await api.add_user(root, "guest1", "guest-pass-1")
        guest = await api.signin("guest1", "guest-pass-1")
        cluster_pat = await api.add_token(root, ["cluster"])
        job_pat = await api.add_token(root, ["job"])
        for method, path in JOB_ROUTES:
            body = PREHEAT if method == "POST" else {}
            anonymous = await api.call(method, path, body)
            assert anonymous.status == 401, (method, path, anonymous.raw)
            if path.startswith("/oapi/"):
                # a PAT without `job`; a session where a token belongs
                assert (await api.call(method, path, body, token=cluster_pat)).status == 403
                assert (await api.call(method, path, body, token=root)).status == 401
            else:
                reply = await api.call(method, path, body, token=guest)
                if method == "GET":
                    assert reply.status in (200, 404), (method, path, reply.raw)
                else:
                    assert reply.status == 403, (method, path, reply.raw)
                # a token is no session
                assert (await api.call(method, path, body, token=job_pat)).status == 401
        assert await jobs_count(api, root) == 0
        # a job token works (root's), the same request as the refused ones
        made = await api.call("POST", "/oapi/v1/jobs", PREHEAT, token=job_pat)
        assert made.status == 200 and made.body["state"] == "PENDING", made.raw
        assert await jobs_count(api, root) == 1
        m.stop()


async def test_a_flood_of_jobs_is_cut_at_the_clusters_rate(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        m = await start_manager(nursery, tmp_path / "m")
        api, root = m.api, await m.root()
        changed = await api.call(
            "PATCH",
            "/api/v1/clusters/1",
            {"scheduler_cluster_config": {"job_rate_limit": 2}},
            token=root,
        )
        assert changed.status == 200, changed.raw
        statuses = [
            (await api.call("POST", "/api/v1/jobs", PREHEAT, token=root)).status for _ in range(6)
        ]
        assert statuses[:2] == [200, 200]
        assert 429 in statuses[2:], statuses
        refused = await api.call("POST", "/api/v1/jobs", PREHEAT, token=root)
        if refused.status == 429:
            assert refused.raw.startswith(b"rate limit exceeded")
        assert await jobs_count(api, root) == statuses.count(200) + (refused.status == 200)
        m.stop()


async def test_the_registry_password_is_never_stored_or_shown(tmp_path: Path) -> None:
    secret = "hunter2-registry-password"
    token = "registry-bearer-token-xyz"
    async with trio.open_nursery() as nursery:
        m = await start_manager(nursery, tmp_path / "m")
        api, root = m.api, await m.root()
        made = await api.call(
            "POST",
            "/api/v1/jobs",
            {
                "type": "preheat",
                "args": {
                    "type": "image",
                    "url": "http://registry.example/v2/app/manifests/1",
                    "username": "alice",
                    "password": secret,
                    "headers": {"Authorization": f"Bearer {token}"},
                },
            },
            token=root,
        )
        assert made.status == 200, made.raw
        shown = [
            made.raw,
            (await api.call("GET", f"/api/v1/jobs/{made.body['id']}", token=root)).raw,
        ]
        shown.append((await api.call("GET", "/api/v1/jobs", token=root)).raw)
        for raw in shown:
            assert secret.encode() not in raw and token.encode() not in raw
        assert made.body["args"]["headers"] == {"Authorization": "REDACTED"}
        m.stop()
    # nor in the database's files, in any form the manager wrote
    assert _files_holding(Path(m.config.data.dir), [secret, token]) == []


def _files_holding(directory: Path, needles: list[str]) -> list[Path]:
    return [
        p
        for p in directory.iterdir()
        if p.is_file() and any(n.encode() in p.read_bytes() for n in needles)
    ]


async def test_console_forms_need_their_session_and_csrf_token(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        m = await start_manager(nursery, tmp_path / "m")
        api, root = m.api, await m.root()
        await api.add_user(root, "guest1", "guest-pass-1")
        session, cookie, csrf = await console_session(api, "root", m.root_password)
        assert "samesite=strict" in cookie.lower() and "httponly" in cookie.lower()
        other, _, other_csrf = await console_session(api, "root", m.root_password)
        guest, _, guest_csrf = await console_session(api, "guest1", "guest-pass-1")

        # every console page without a session: to the sign-in page, nothing done
        for route in CONSOLE:
            assert isinstance(route, Route)
            path = route.path.replace("{id}", "1")
            if path in ("/signin", "/static/console.css"):
                continue
            for method in route.methods or ():
                if method == "HEAD":
                    continue
                reply = await api.call(method, path, raw=b"name=x", headers=FORM)
                assert reply.status == 303, (method, path, reply.status)
                assert (reply.headers.get("location") or "").startswith("/signin")

        def post(path: str, fields: dict[str, str], who: str) -> object:
            return api.call(
                "POST",
                path,
                raw=urlencode(fields).encode(),
                headers=[*FORM, ("cookie", f"jwt={who}")],
            )

        attempts = {
            "/clusters/new": {"name": "forged"},
            "/clusters/1/delete": {},
            "/jobs/new": {"type": "file", "urls": "http://origin.example/a"},
            "/tokens": {"name": "stolen", "scopes": "job"},
            "/users": {"name": "mallory", "email": "m@example.com", "password": "mallory-pass"},
            "/tasks/delete": {"task": "http://origin.example/a"},
        }
        for path, fields in attempts.items():
            for token in ("", "0" * 40, other_csrf):  # none, made up, another session's
                reply = await post(path, {**fields, "csrf": token} if token else fields, session)  # type: ignore[misc]
                assert reply.status == 403, (path, token, reply.status)  # type: ignore[attr-defined]
            # a guest's session with its own valid token: its role refuses
            reply = await post(path, {**fields, "csrf": guest_csrf}, guest)  # type: ignore[misc]
            assert reply.status == 403, (path, reply.status)  # type: ignore[attr-defined]
        clusters = (await api.call("GET", "/api/v1/clusters", token=root)).body
        assert [c["name"] for c in clusters] == ["cluster-1"]
        assert await jobs_count(api, root) == 0
        tokens = (await api.call("GET", "/api/v1/personal-access-tokens", token=root)).body
        assert tokens == []
        users = (await api.call("GET", "/api/v1/users", token=root)).body
        assert [u["name"] for u in users] == ["root", "guest1"]

        # the same form with its token does what it says
        made = await post("/clusters/new", {"name": "real", "csrf": csrf}, session)
        assert made.status == 303  # type: ignore[attr-defined]
        names = [c["name"] for c in (await api.call("GET", "/api/v1/clusters", token=root)).body]
        assert names == ["cluster-1", "real"]
        # signed out: the session and its token are done
        assert (await post("/signout", {"csrf": other_csrf}, other)).status == 303  # type: ignore[attr-defined]
        again = await post("/clusters/new", {"name": "after", "csrf": other_csrf}, other)
        assert again.status == 303 and "/signin" in again.headers.get("location")  # type: ignore[attr-defined]
        refused = await api.call("GET", "/api/v1/audits?state=FAILURE&per_page=1000", token=root)
        assert sum(1 for a in refused.body if a["status_code"] == 403) >= 4 * len(attempts)
        m.stop()

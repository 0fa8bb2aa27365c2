"""What every console page shares: the signed-in user, CSRF checks, forms, pagination,
rendering, and the answers to a page that may not be seen.

A page is `async def page(request, who) -> Response`, wrapped by `page()`: no session
→ the sign-in page; a write (POST) without the form's CSRF token → 403; a guest's
write → 403 (the role check is the API's: `who.may(group, action)`).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

import jinja2
from markupsafe import Markup
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from dragonfly import __version__
from dragonfly.manager import auth, guard
from dragonfly.manager.console import csrf
from dragonfly.manager.context import Context, context
from dragonfly.manager.http import ApiError, read_body, rfc3339
from dragonfly.manager.store.rows import NotFound

HERE = Path(__file__).parent
ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(HERE / "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
)
PER_PAGE = 20
MAX_FIELDS = 500


def size(n: int | float | None) -> str:
    """Bytes for people: 0 B, 12.3 MiB..."""
    value = float(n or 0)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def when(seconds: float | None) -> str:
    return rfc3339(seconds or 0)[:19].replace("T", " ") if seconds else "—"


ENV.filters["size"] = size
ENV.filters["when"] = when


@dataclass
class Who:
    principal: guard.Principal
    csrf: str

    @property
    def name(self) -> str:
        return self.principal.name

    def may(self, group: str, action: str = auth.ALL) -> bool:
        return self.principal.may(group, action)


def render(
    request: Request, template: str, who: Who | None, status: int = 200, **values: Any
) -> HTMLResponse:
    html = ENV.get_template(template).render(
        who=who,
        path=request.url.path,
        version=__version__,
        flash=request.query_params.get("flash", "")[:200],
        **values,
    )
    response = HTMLResponse(html, status_code=status)
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Content-Security-Policy"] = (
        "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    )
    return response


async def form(request: Request) -> dict[str, list[str]]:
    """An application/x-www-form-urlencoded body (bounded), every value of each name."""
    body = (await read_body(request)).decode("utf-8", "replace")
    fields: dict[str, list[str]] = {}
    try:
        pairs = parse_qsl(body, keep_blank_values=True, max_num_fields=MAX_FIELDS)
    except ValueError:
        raise ApiError(413, f"more than {MAX_FIELDS} form fields") from None
    for name, value in pairs:
        fields.setdefault(name, []).append(value)
    return fields


def one(fields: dict[str, list[str]], name: str, default: str = "") -> str:
    return (fields.get(name) or [default])[0].strip()


def lines(text: str) -> list[str]:
    """A textarea's non-empty lines (and comma-separated items), trimmed."""
    return [item.strip() for line in text.splitlines() for item in line.split(",") if item.strip()]


def redirect(url: str, flash: str = "") -> RedirectResponse:
    if flash:
        url += ("&" if "?" in url else "?") + urlencode({"flash": flash})
    return RedirectResponse(url, status_code=303)


@dataclass
class Pages:
    page: int
    pages: int
    total: int
    query: str  # the other query parameters, for the links

    @property
    def offset(self) -> int:
        return (self.page - 1) * PER_PAGE

    def link(self, number: int) -> str:
        sep = "&" if self.query else ""
        return f"?{self.query}{sep}page={number}"


def pages(request: Request, total: int) -> Pages:
    text = request.query_params.get("page", "1")
    number = int(text) if text.isdigit() and len(text) < 9 else 1
    count = max(1, math.ceil(total / PER_PAGE))
    rest = urlencode(
        [(k, v) for k, v in request.query_params.multi_items() if k not in ("page", "flash")]
    )
    return Pages(min(max(1, number), count), count, total, rest)


PageFn = Callable[[Request, Who], Awaitable[Response]]


def page(
    fn: PageFn, *, group: str = "", need: str = auth.READ
) -> Callable[[Request], Awaitable[Response]]:
    """A console page: signed in (else the sign-in page), CSRF on POST, `need` on `group`
    (a POST needs `*`)."""

    async def handler(request: Request) -> Response:
        ctx = context(request)
        try:
            principal = await guard.session_principal(request)
        except ApiError:
            target = request.url.path
            return redirect("/signin?" + urlencode({"next": target}))
        assert principal.session is not None
        who = Who(principal, csrf.form_token(ctx.jwt_key, principal.session.jti))
        action = auth.ALL if request.method == "POST" else need
        if request.method == "POST":
            fields = await form(request)
            if not csrf.valid(who.csrf, one(fields, "csrf")):
                return refused(request, who, "This form expired or did not come from this console.")
            request.state.fields = fields
        if group and not who.may(group, action):
            return refused(request, who, "Your role may not do this.")
        try:
            return await fn(request, who)
        except NotFound as exc:
            return render(request, "refused.html", who, status=404, reason=f"Not found: {exc}")

    return handler


def refused(request: Request, who: Who | None, reason: str) -> HTMLResponse:
    return render(request, "refused.html", who, status=403, reason=reason)


def fields_of(request: Request) -> dict[str, list[str]]:
    found: dict[str, list[str]] = getattr(request.state, "fields", {})
    return found


def ctx_of(request: Request) -> Context:
    return context(request)


def svg(markup: str) -> Markup:
    return Markup(markup)

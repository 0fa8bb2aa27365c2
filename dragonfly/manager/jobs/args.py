"""Job requests as Dragonfly's API takes them (and Harbor sends them), validated and
defaulted, without I/O.

A request body is `{"type", "args", "bio", "user_id", "scheduler_cluster_ids"}`;
unknown keys are ignored (Harbor sends `concurrent_count`), zero values take the
defaults (`timeout: 0`, `scope: ""`), `scheduler_cluster_ids: null` means every
cluster. `Plan` is what the manager keeps: the arguments it shows (secrets left out),
the secrets it seals, and how a scheduler runs the job.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import msgspec

from dragonfly.identity import IdentityError, check_piece_length
from dragonfly.wire.messages import TaskSpec
from dragonfly.wire.oci import MirrorError, parse_route

TYPES = ("preheat", "get_task", "delete_task", "get_image_distribution", "sync_peers")
SYNC_TYPES = ("get_image_distribution", "sync_peers")  # answered when done, not as a job
SCOPES = ("single_seed_peer", "all_seed_peers", "all_peers")
NS = 1_000_000_000
PREHEAT_TIMEOUT = 3600.0  # seconds, Dragonfly's default
QUERY_TIMEOUT = 60.0  # get_task, delete_task, image distribution, sync_peers
MAX_TIMEOUT = 86400.0
MAX_URLS = 1000
REDACTED = "REDACTED"

Url = Annotated[str, msgspec.Meta(max_length=8192)]
Text = Annotated[str, msgspec.Meta(max_length=1024)]
Headers = Annotated[
    dict[
        Annotated[str, msgspec.Meta(max_length=256)], Annotated[str, msgspec.Meta(max_length=8192)]
    ],
    msgspec.Meta(max_length=64),
]
Nanoseconds = Annotated[int, msgspec.Meta(ge=0, le=int(MAX_TIMEOUT * NS))]
ClusterId = Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)]


class ArgsError(ValueError):
    """Arguments that cannot make a job (answered 422, naming what)."""


class CreateJob(msgspec.Struct):
    type: Annotated[str, msgspec.Meta(max_length=64)]
    args: msgspec.Raw = msgspec.Raw(b"{}")
    bio: Text = ""
    user_id: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)] = 0
    scheduler_cluster_ids: Annotated[list[ClusterId], msgspec.Meta(max_length=1000)] | None = None
    seed_peer_cluster_ids: list[int] | None = None  # accepted, unused (as in Dragonfly)


class PreheatArgs(msgspec.Struct):
    type: Literal["image", "file"]
    url: Url = ""
    urls: Annotated[list[Url], msgspec.Meta(max_length=MAX_URLS)] | None = None
    piece_length: int | None = None
    tag: Text = ""
    application: Text = ""
    filtered_query_params: Text = ""
    headers: Headers | None = None
    username: Text = ""
    password: Text = ""
    platform: Annotated[str, msgspec.Meta(max_length=64)] = ""
    scope: Annotated[str, msgspec.Meta(max_length=64)] = ""
    ips: (
        Annotated[list[Annotated[str, msgspec.Meta(max_length=64)]], msgspec.Meta(max_length=100)]
        | None
    ) = None
    percentage: Annotated[int, msgspec.Meta(ge=0, le=100)] | None = None
    count: Annotated[int, msgspec.Meta(ge=0, le=200)] | None = None
    concurrent_task_count: Annotated[int, msgspec.Meta(ge=0, le=100)] = 0
    concurrent_peer_count: Annotated[int, msgspec.Meta(ge=0, le=1000)] = 0
    timeout: Nanoseconds = 0


class TaskArgs(msgspec.Struct):
    """get_task and delete_task: a task ID, or the URL and fields that make it."""

    task_id: Annotated[str, msgspec.Meta(max_length=128)] = ""
    url: Url = ""
    piece_length: int | None = None
    tag: Text = ""
    application: Text = ""
    filtered_query_params: Text = ""
    timeout: Nanoseconds = 0


class ImageArgs(msgspec.Struct):
    """get_image_distribution: which hosts hold which layers of an image."""

    url: Url
    headers: Headers | None = None
    username: Text = ""
    password: Text = ""
    platform: Annotated[str, msgspec.Meta(max_length=64)] = ""
    timeout: Nanoseconds = 0


class SyncArgs(msgspec.Struct):
    timeout: Nanoseconds = 0


ARGS: dict[str, type[msgspec.Struct]] = {
    "preheat": PreheatArgs,
    "get_task": TaskArgs,
    "delete_task": TaskArgs,
    "get_image_distribution": ImageArgs,
    "sync_peers": SyncArgs,
}


@dataclass
class Plan:
    """What a job request becomes."""

    type: str
    kind: str  # the scheduler's: preheat, get_task, delete_task, list_hosts
    shown: dict[str, Any]  # args as stored and answered (no secret in them)
    secrets: dict[str, Any] = field(default_factory=dict)  # sealed in the row
    timeout: float = QUERY_TIMEOUT  # seconds


def parse_args(job_type: str, raw: bytes) -> Plan:
    """The plan of a job of `job_type` with JSON `raw` arguments; ArgsError naming what
    is wrong."""
    kind = ARGS.get(job_type)
    if kind is None:
        raise ArgsError(f"unknown job type {job_type[:64]!r}: expected one of {', '.join(TYPES)}")
    try:
        args = msgspec.json.decode(raw or b"{}", type=kind)
    except msgspec.ValidationError as exc:
        raise ArgsError(f"args: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ArgsError(f"args: not JSON: {exc}") from None
    if isinstance(args, PreheatArgs):
        return _preheat(args)
    if isinstance(args, TaskArgs):
        return _task(job_type, args)
    if isinstance(args, ImageArgs):
        _check_manifest_url(args.url)
        shown, secrets = _split_credentials(msgspec.to_builtins(args), args.headers, args.password)
        return Plan(job_type, "get_task", shown, secrets, _seconds(args.timeout, QUERY_TIMEOUT))
    assert isinstance(args, SyncArgs)
    return Plan(
        job_type, "list_hosts", {"timeout": args.timeout}, {}, _seconds(args.timeout, QUERY_TIMEOUT)
    )


def _seconds(ns: int, default: float) -> float:
    return ns / NS if ns else default


def _split_credentials(
    shown: dict[str, Any], headers: dict[str, str] | None, password: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Header values and the password move to the secrets; the shown args keep the
    header names (values REDACTED) and an empty password."""
    secrets: dict[str, Any] = {}
    if headers:
        secrets["headers"] = dict(headers)
        shown["headers"] = {name: REDACTED for name in headers}
    if password:
        secrets["password"] = password
        shown["password"] = ""
    return shown, secrets


def _check_piece_length(piece_length: int | None) -> None:
    if piece_length is not None:
        try:
            check_piece_length(piece_length)
        except (IdentityError, ValueError) as exc:
            raise ArgsError(f"args.piece_length: {exc}") from None


def _check_manifest_url(url: str) -> None:
    problem = "expected a manifest URL, http(s)://REGISTRY/v2/NAME/manifests/REFERENCE"
    if not url:
        raise ArgsError(f"args.url: required: {problem}")
    scheme, _, rest = url.partition("://")
    path = "/" + rest.partition("/")[2].partition("?")[0]
    try:
        route = parse_route(path)
    except MirrorError:
        raise ArgsError(f"args.url: {problem}") from None
    if scheme not in ("http", "https") or route.kind.value != "manifest":
        raise ArgsError(f"args.url: {problem}")


def filtered_params(text: str) -> list[str]:
    """Dragonfly's "&"-separated list (empty: the defaults, which always apply)."""
    return [p for p in text.split("&") if p]


def file_spec(
    url: str, tag: str, application: str, params: str, piece_length: int | None
) -> TaskSpec:
    """The task a proxy request for `url` with these fields makes (its ID must match)."""
    spec = TaskSpec(
        url=url,
        tag=tag,
        application=application,
        filtered_query_params=filtered_params(params),
        piece_length=piece_length,
    )
    try:
        spec.task_id  # noqa: B018 (the ID is checked, and its error named, here)
    except IdentityError as exc:
        raise ArgsError(f"args.url {url[:200]!r}: {exc}") from None
    return spec


def _preheat(args: PreheatArgs) -> Plan:
    scope = args.scope or "single_seed_peer"
    if scope not in SCOPES:
        raise ArgsError(f"args.scope: expected one of {', '.join(SCOPES)}, got {scope[:64]!r}")
    _check_piece_length(args.piece_length)
    for ip in args.ips or []:
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            raise ArgsError(f"args.ips: not an IP address: {ip[:64]!r}") from None
    if args.type == "image":
        _check_manifest_url(args.url)
    else:
        urls = ([args.url] if args.url else []) + list(args.urls or [])
        if not urls:
            raise ArgsError("args.url or args.urls: a file preheat needs at least one URL")
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise ArgsError(f"args.urls: not an http(s) URL: {url[:200]!r}")
            file_spec(
                url, args.tag, args.application, args.filtered_query_params, args.piece_length
            )
    shown = msgspec.to_builtins(args)
    shown.update(
        scope=scope,
        concurrent_task_count=args.concurrent_task_count or 8,
        concurrent_peer_count=args.concurrent_peer_count or 500,
        timeout=args.timeout or int(PREHEAT_TIMEOUT * NS),
    )
    shown, secrets = _split_credentials(shown, args.headers, args.password)
    return Plan("preheat", "preheat", shown, secrets, _seconds(args.timeout, PREHEAT_TIMEOUT))


def _task(job_type: str, args: TaskArgs) -> Plan:
    if not args.task_id and not args.url:
        raise ArgsError("invalid params: task_id or url is required")
    _check_piece_length(args.piece_length)
    if not args.task_id:
        file_spec(
            args.url, args.tag, args.application, args.filtered_query_params, args.piece_length
        )
    kind = "get_task" if job_type == "get_task" else "delete_task"
    return Plan(
        job_type, kind, msgspec.to_builtins(args), {}, _seconds(args.timeout, QUERY_TIMEOUT)
    )

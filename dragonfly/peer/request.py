"""What a client asks a peer to download, and how a download that cannot complete says so."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from dragonfly.identity import carries_credentials, credential_scope
from dragonfly.wire.messages import TaskSpec


class DownloadFailed(Exception):
    """The download cannot complete; `http_status` is the origin's when it refused."""

    def __init__(self, reason: str, http_status: int = 0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.http_status = http_status

    @property
    def client_status(self) -> int:
        """The status to answer a client with: the origin's error, else 502."""
        return self.http_status if 400 <= self.http_status < 600 else 502


@dataclass
class DownloadRequest:
    """What a client asked for: the task (whose ID is computed from it) and how."""

    spec: TaskSpec
    headers: dict[str, str] = field(default_factory=dict)
    back_to_source: bool = True
    # A seed peer answering a trigger: it is the origin's first reader.
    seed_trigger: bool = False
    # False: only the byte ranges given through `Download.want_range` (a Range request
    # with proxy.prefetch off); the rest of the task is left for later.
    whole: bool = True
    # Made with credentials (identity.carries_credentials): the task is private.
    private: bool = False
    task_id: str = field(init=False)

    def __post_init__(self) -> None:
        self.task_id = self.spec.task_id  # IdentityError for a spec that makes none

    @classmethod
    def for_url(
        cls,
        url: str,
        *,
        tag: str = "",
        application: str = "",
        headers: dict[str, str] | None = None,
        filtered_query_params: list[str] | None = None,
        back_to_source: bool = True,
        shared_credentials: bool = False,
        credential_headers: Sequence[str] = (),
    ) -> DownloadRequest:
        """The request and its task. A download made with someone's credentials
        (Authorization, Cookie) is theirs unless a rule says the origin is asked first
        (`shared_credentials`): its task is scoped to those credentials, so nobody
        else is ever served it from P2P. Any credential (those two, a signature left out
        of the ID, a header named in `credential_headers`) makes the task private."""
        headers = headers or {}
        spec = TaskSpec(
            url=url,
            tag=tag,
            application=application,
            filtered_query_params=list(filtered_query_params or []),
            scope="" if shared_credentials else credential_scope(headers),
        )
        request = cls(spec, headers, back_to_source=back_to_source)  # (the URL is checked)
        request.private = carries_credentials(
            url, headers, spec.filtered_query_params, extra_headers=credential_headers
        )
        return request

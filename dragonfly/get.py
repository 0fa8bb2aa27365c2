"""`python -m dragonfly get URL -O FILE`: download through the local peer (like dfget).

The peer daemon downloads the task (through P2P, or from the origin) and says where
its task file is and how much of it is verified from the start; the verified bytes are
copied out with copy_file_range while the rest arrives (or the whole file hard-linked
at the end with --hard-link) to a temporary name next to FILE, checked against
--digest when given, and renamed into place: FILE appears only complete and verified.
When no daemon answers, a one-shot peer runs inside this process.

The daemon is asked through its local API, a unix socket in its data directory
(DATA_DIR/api.sock, its user's only): `--peer` names that directory or the socket.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from dragonfly.config import ConfigError, PeerConfig, data_dir
from dragonfly.identity import IdentityError, parse_sha256_digest
from dragonfly.local_api_path import LOCAL_API, SOCKET_NAME, api_socket
from dragonfly.net.http_client import HTTPClient, HTTPClientError
from dragonfly.units import human_bytes


class GetError(Exception):
    """A download that failed; the message is the one-line reason."""


class DaemonUnavailable(Exception):
    pass


@dataclass
class Outcome:
    path: Path
    content_length: int
    task_id: str


class Progress:
    """A one-line progress display on a terminal; silent otherwise."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.started = time.monotonic()
        self.last = 0.0

    def update(self, completed: int, total: int) -> None:
        now = time.monotonic()
        if not self.enabled or now - self.last < 0.1:
            return
        self.last = now
        rate = completed / max(now - self.started, 1e-3)
        pct = f"{100 * completed / total:5.1f}%" if total > 0 else "  ?  "
        sys.stderr.write(
            f"\r{pct}  {human_bytes(completed)} / {human_bytes(max(total, 0))}  {human_bytes(rate)}/s   "
        )
        sys.stderr.flush()

    def done(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


def parse_headers(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            raise GetError(f"--header {item!r}: expected 'Name: value'")
        out[name.strip().lower()] = value.strip()
    return out


def peer_socket(peer: str) -> Path:
    """The local API socket --peer names: a data directory's api.sock, or the socket."""
    path = Path(os.path.expanduser(peer))
    return api_socket(path) if path.is_dir() else path


class Copier:
    """Copies the task file out to a temporary name next to FILE as its verified prefix
    grows, and the pieces verified past it as they land (copy_file_range: in the kernel,
    no byte through Python); then renamed into place, complete. When a digest is to be
    checked it hashes what it copies, so it copies in order: the prefix only."""

    def __init__(self, output: Path, digest: bytes | None) -> None:
        self.output = output.resolve()
        self.tmp = self.output.with_name(f".{self.output.name}.dragonfly-{os.getpid()}.tmp")
        self.digest = digest
        self.hash = hashlib.sha256() if digest is not None else None
        self.copied = 0  # bytes [0, copied) are out
        self._ahead: dict[int, int] = {}  # start -> end of byte ranges out past `copied`
        self._src: int | None = None
        self._dst: int | None = None

    def behind(self, ready: int, ahead: Sequence[Sequence[int]]) -> bool:
        """Whether ``advance`` would copy anything (no thread hop for a line without news)."""
        return ready > self.copied or (self.hash is None and bool(ahead))

    def advance(self, source: Path, ready: int, ahead: Iterable[Sequence[int]] = ()) -> None:
        """Copy bytes [copied, ready) of the task file, and the (offset, length) ranges
        ``ahead`` (verified pieces past ``ready``) unless copying in order to hash."""
        if self.hash is None:
            for offset, length in ahead:
                if offset >= max(self.copied, ready) and offset not in self._ahead:
                    self._copy(source, offset, offset + length)
                    self._ahead[offset] = offset + length
        while self.copied < ready:
            end = self._ahead.pop(self.copied, None)
            if end is None:  # up to `ready`, or to the next range already out
                end = min((start for start in self._ahead if start > self.copied), default=ready)
                end = min(end, ready)
                self._copy(source, self.copied, end)
            self.copied = end

    def _copy(self, source: Path, start: int, end: int) -> None:
        if self._src is None:
            self._src = os.open(source, os.O_RDONLY)
            self._dst = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        assert self._dst is not None
        while start < end:
            n = os.copy_file_range(self._src, self._dst, end - start, start, start)
            if n == 0:
                raise GetError(f"task file {source} is shorter than {end} bytes")
            if self.hash is not None:
                self.hash.update(os.pread(self._src, n, start))
            start += n

    def finish(self, source: Path, length: int, *, hard_link: bool) -> None:
        """The rest, the digest check, the rename: FILE appears only complete and verified."""
        try:
            if hard_link and self.copied == 0 and not self._ahead:  # (nothing copied yet)
                os.link(source, self.tmp)
                if self.hash is not None:
                    with open(self.tmp, "rb") as f:
                        while chunk := f.read(8 << 20):
                            self.hash.update(chunk)
            else:
                self.advance(source, length)
                if length == 0 and self._dst is None:
                    self.tmp.write_bytes(b"")
            self._close()
            if self.hash is not None and self.hash.digest() != self.digest:
                assert self.digest is not None
                raise GetError(
                    f"digest mismatch: expected sha256:{self.digest.hex()}, "
                    f"got sha256:{self.hash.hexdigest()}"
                )
            os.replace(self.tmp, self.output)
        finally:
            self.abandon()

    def _close(self) -> None:
        for fd in (self._src, self._dst):
            if fd is not None:
                os.close(fd)
        self._src = self._dst = None

    def abandon(self) -> None:
        self._close()
        self.tmp.unlink(missing_ok=True)


async def _via_daemon(
    socket: Path, spec: dict[str, Any], progress: Progress, copier: Copier | None = None
) -> Outcome:
    client = HTTPClient(connect_timeout=2, read_timeout=3600, unix_socket=socket)
    peer = str(socket)
    try:
        response = await client.send(
            "POST",
            "http://localhost" + LOCAL_API,
            _headers({"content-type": "application/json"}),
            json.dumps(spec).encode(),
        )
    except HTTPClientError as exc:
        raise DaemonUnavailable(str(exc)) from None
    try:
        if response.status != 200:
            body = (await response.read(limit=1 << 16)).decode(errors="replace").strip()
            raise GetError(f"peer at {peer} refused: {response.status} {body}")
        buffer = b""
        async for chunk in response.iter_chunks():
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                event = json.loads(line)
                if event.get("state") == "failed":
                    status = event.get("http_status") or 0
                    raise GetError(
                        event.get("reason", "failed") + (f" (HTTP {status})" if status else "")
                    )
                progress.update(int(event.get("completed", 0)), int(event.get("total", -1)))
                if copier is not None and event.get("path"):
                    ready, ahead = int(event.get("ready", 0)), _ranges(event.get("ahead", []))
                    if copier.behind(ready, ahead):
                        # (in a thread: a cold page cache must not stall reading the progress)
                        await trio.to_thread.run_sync(
                            copier.advance, Path(event["path"]), ready, ahead
                        )
                if event.get("state") == "succeeded":
                    return Outcome(
                        Path(event["path"]), int(event["content_length"]), event["task_id"]
                    )
        raise GetError(f"peer at {peer} ended the answer before the download finished")
    except HTTPClientError as exc:
        raise GetError(f"peer at {peer}: {exc}") from None
    finally:
        await response.aclose()
        await client.aclose()


def _ranges(value: object) -> list[tuple[int, int]]:
    """The `ahead` of a progress line: [offset, length] pairs of non-negative ints."""
    if not isinstance(value, list) or not all(
        isinstance(r, list)
        and len(r) == 2
        and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in r)
        for r in value
    ):
        raise GetError(f"the peer's progress line has a malformed 'ahead': {str(value)[:200]}")
    return [(r[0], r[1]) for r in value]


def _headers(d: dict[str, str]) -> Any:
    from dragonfly.wire.http_common import Headers

    return Headers(d.items())


async def _embedded(
    cfg: PeerConfig, spec: dict[str, Any], progress: Progress, copier: Copier | None = None
) -> Outcome:
    """No daemon: run a one-shot peer in this process for this one download."""
    from dragonfly.blocklist import refused
    from dragonfly.nursery.peer import PeerDaemon
    from dragonfly.peer.request import DownloadFailed, DownloadRequest

    cfg.proxy.port = 0
    cfg.upload.port = 0
    if not cfg.trust.insecure and not cfg.trust.credential_file and not cfg.trust.join_token_file:
        # No scheduler admits a host without a credential: this one fetches from the
        # origin alone (and its upload port serves nobody).
        cfg.scheduler.addresses = []
        cfg.scheduler.manager = ""
    req = DownloadRequest.for_url(
        spec["url"],
        tag=spec["tag"],
        application=spec["application"],
        headers=spec["headers"],
        filtered_query_params=list(cfg.proxy.filtered_query_params)
        + list(spec["filtered_query_params"]),
        back_to_source=spec["back_to_source"],
    )
    failure: str | None = None
    outcome: Outcome | None = None
    async with trio.open_nursery() as nursery:
        daemon: PeerDaemon = await nursery.start(PeerDaemon(cfg).run)
        if daemon.discovery is not None:  # the cluster's settings, before anything starts
            with trio.move_on_after(cfg.scheduler.connect_timeout):
                await daemon.discovery.answered.wait()
        priority = spec.get("priority")
        refusal = refused(daemon.block_list, req.spec, None if priority is None else str(priority))
        if refusal is not None:
            failure = refusal[1]
        else:
            from dragonfly.storage.taskfile import task_path

            path = task_path(daemon.data_dir, req.task_id)
            download = daemon.tasks.open(req)
            try:
                with download.attached():
                    await download.wait_metadata()
                    # As through a daemon: the verified prefix is copied out as it grows,
                    # and the pieces verified past it as they land.
                    told: set[int] = set()
                    while not download.finished.is_set():
                        ready = download.verified_prefix
                        progress.update(download.completed_bytes, download.content_length)
                        if copier is not None:
                            ahead = download.verified_ahead(told)
                            if copier.behind(ready, ahead):
                                await trio.to_thread.run_sync(copier.advance, path, ready, ahead)
                        with trio.move_on_after(0.2):
                            await download.wait_prefix_past(ready)
                    await download.wait_finished()  # (raises if it failed)
                outcome = Outcome(path, download.content_length, req.task_id)
            except DownloadFailed as exc:
                failure = exc.reason + (f" (HTTP {exc.http_status})" if exc.http_status else "")
        nursery.cancel_scope.cancel()
    if outcome is None:
        raise GetError(failure or "the download did not finish")
    return outcome


def _check_files(cfg: PeerConfig) -> None:
    """The files a one-shot peer's configuration names (CA certificates and keys, the
    proxy's users): ConfigError naming the key."""
    from dragonfly.net.tls import check_peer_files
    from dragonfly.peer.exposure import check_proxy_files

    check_peer_files(cfg)
    check_proxy_files(cfg.proxy)


def run_get(args: Any, cfg: PeerConfig) -> int:
    try:
        digest = parse_sha256_digest(args.digest) if args.digest else None
    except IdentityError as exc:
        print(f"dragonfly get: --digest: {exc}", file=sys.stderr)
        return 2
    try:
        headers = parse_headers(args.header)
    except GetError as exc:
        print(f"dragonfly get: {exc}", file=sys.stderr)
        return 2
    output = Path(args.output)
    if not output.parent.resolve().is_dir():
        print(
            f"dragonfly get: -O {output}: directory {output.parent} does not exist", file=sys.stderr
        )
        return 2
    spec = {
        "url": args.url,
        "tag": args.tag,
        "application": args.application,
        "headers": headers,
        "filtered_query_params": args.filtered_query_param,
        "back_to_source": not args.no_back_to_source,
    }
    if args.priority is not None:
        spec["priority"] = args.priority
    peer = args.peer or os.environ.get("DRAGONFLY_PEER") or str(data_dir(cfg.storage))
    if "://" in peer:
        print(
            f"dragonfly get: --peer {peer}: name the peer's data directory (its local API "
            f"is the unix socket DATA_DIR/{SOCKET_NAME}), not a URL",
            file=sys.stderr,
        )
        return 2
    progress = Progress(sys.stderr.isatty())
    # A hard link is made of the whole file at the end; a copy follows the download.
    copier = Copier(output, digest)
    try:
        try:
            live = None if args.hard_link else copier
            outcome = trio.run(_via_daemon, peer_socket(peer), spec, progress, live)
        except DaemonUnavailable:
            copier.abandon()
            copier = Copier(output, digest)
            live = None if args.hard_link else copier
            try:
                _check_files(cfg)
            except ConfigError as exc:
                print(f"dragonfly: configuration error: {exc}", file=sys.stderr)
                return 2
            outcome = trio.run(_embedded, cfg, spec, progress, live)
        progress.done()
        copier.finish(outcome.path, outcome.content_length, hard_link=args.hard_link)
    except GetError as exc:
        copier.abandon()
        progress.done()
        print(f"dragonfly get: {args.url}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        copier.abandon()
        progress.done()
        print(f"dragonfly get: {output}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0

"""A scheduler's or seed peer's connection to the manager: register, then keep alive.

`ManagerMember.run` connects to the manager's websocket, sends `AnnounceMember`,
learns its keepalive interval from `MemberRegistered` and sends a `Ping` at that
interval (a missing `Pong` within two intervals counts as a lost connection). On
any loss it waits a moment and starts over; the manager marks the row inactive
when the connection ends, and active again at the next registration.

Other messages from the manager (jobs) go to `on_message`; `queue` sends one to the
manager (job results, download records) as soon as a session is up, keeping at most
OUTBOX_LIMIT while none is.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from urllib.parse import urlsplit

import trio

from dragonfly.log import get_logger
from dragonfly.net.channel import MANAGER_PATH, Channel, ChannelClosed, connect
from dragonfly.wire.codec import MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, Message, ProtocolError
from dragonfly.wire.messages import (
    AnnounceMember,
    Error,
    Hello,
    MemberRegistered,
    Ping,
    Pong,
)

log = get_logger("dragonfly.manager_client")
RETRY_MIN, RETRY_MAX = 0.5, 10.0
OUTBOX_LIMIT = 10_000


def websocket_url(manager: str) -> str:
    """http://host:port → ws://host:port/v1/manager."""
    parts = urlsplit(manager)
    scheme = "wss" if parts.scheme == "https" else "ws"
    return f"{scheme}://{parts.netloc}{MANAGER_PATH}"


class ManagerMember:
    def __init__(
        self,
        manager: str,
        role: str,
        announce: AnnounceMember,
        *,
        connect_timeout: float = 5.0,
        on_message: Callable[[Message], None] | None = None,
    ) -> None:
        self.url = websocket_url(manager)
        self.role = role
        self.announce = announce
        self.connect_timeout = connect_timeout
        self.on_message = on_message
        self.member_id = 0
        self.registrations = 0  # how many times the manager accepted this member
        self.dropped = 0  # messages for the manager dropped while it was away too long
        self._outbox: deque[Message] = deque()
        self._outbox_ready = trio.Event()

    def queue(self, msg: Message) -> None:
        """Send `msg` to the manager (in order, as soon as a session is up)."""
        if len(self._outbox) >= OUTBOX_LIMIT:
            self._outbox.popleft()
            self.dropped += 1
        self._outbox.append(msg)
        self._outbox_ready.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        delay = RETRY_MIN
        while True:
            try:
                await self._session()
                delay = RETRY_MIN
            except (OSError, ChannelClosed, ProtocolError, trio.TooSlowError) as exc:
                log.warning("manager connection lost", url=self.url, error=str(exc) or repr(exc))
            except Exception as exc:  # trio-websocket's handshake errors and the like
                log.warning("manager connection failed", url=self.url, error=repr(exc))
            await trio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)

    async def _session(self) -> None:
        hello = Hello(version=PROTOCOL_VERSION, min_version=MIN_PROTOCOL_VERSION, role=self.role)
        async with connect(
            self.url, hello, name="manager", connect_timeout=self.connect_timeout
        ) as channel:
            await channel.send(self.announce)
            with trio.fail_after(self.connect_timeout):
                answer = await channel.receive()
            if not isinstance(answer, MemberRegistered):
                reason = answer.message if isinstance(answer, Error) else answer.TAG
                raise ChannelClosed(f"manager refused registration: {reason}")
            self.member_id = answer.member_id
            self.registrations += 1
            interval = answer.keepalive_ms / 1000
            log.info("registered with the manager", member_id=self.member_id, interval=interval)
            await self._keep_alive(channel, interval)

    async def _keep_alive(self, channel: Channel, interval: float) -> None:
        last_pong = trio.current_time()

        async def read() -> None:
            nonlocal last_pong
            while True:
                msg = await channel.receive()
                if isinstance(msg, Pong):
                    last_pong = trio.current_time()
                elif isinstance(msg, Error):
                    raise ChannelClosed(f"manager: {msg.message}")
                elif self.on_message is not None:
                    self.on_message(msg)

        async def write() -> None:
            while True:
                while self._outbox:
                    await channel.send(self._outbox[0])
                    self._outbox.popleft()
                self._outbox_ready = trio.Event()
                await self._outbox_ready.wait()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            nursery.start_soon(write)
            for nonce in itertools.count():
                await channel.send(Ping(nonce=nonce % 2**64))
                await trio.sleep(interval)
                if trio.current_time() - last_pong > 2 * interval + self.connect_timeout:
                    raise trio.TooSlowError("no keepalive answer from the manager")

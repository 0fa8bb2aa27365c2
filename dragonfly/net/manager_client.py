"""A scheduler's or seed peer's connection to the manager: register, then keep alive.

`ManagerMember.run` connects to the manager's websocket, sends `AnnounceMember`,
learns its keepalive interval from `MemberRegistered` and sends a `Ping` at that
interval (a missing `Pong` within two intervals counts as a lost connection). On
any loss it waits a moment and starts over; the manager marks the row inactive
when the connection ends, and active again at the next registration.
"""

from __future__ import annotations

import itertools
from urllib.parse import urlsplit

import trio

from dragonfly.log import get_logger
from dragonfly.net.channel import MANAGER_PATH, Channel, ChannelClosed, connect
from dragonfly.wire.codec import MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, ProtocolError
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


def websocket_url(manager: str) -> str:
    """http://host:port → ws://host:port/v1/manager."""
    parts = urlsplit(manager)
    scheme = "wss" if parts.scheme == "https" else "ws"
    return f"{scheme}://{parts.netloc}{MANAGER_PATH}"


class ManagerMember:
    def __init__(
        self, manager: str, role: str, announce: AnnounceMember, *, connect_timeout: float = 5.0
    ) -> None:
        self.url = websocket_url(manager)
        self.role = role
        self.announce = announce
        self.connect_timeout = connect_timeout
        self.member_id = 0
        self.registrations = 0  # how many times the manager accepted this member

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

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            for nonce in itertools.count():
                await channel.send(Ping(nonce=nonce % 2**64))
                await trio.sleep(interval)
                if trio.current_time() - last_pong > 2 * interval + self.connect_timeout:
                    raise trio.TooSlowError("no keepalive answer from the manager")

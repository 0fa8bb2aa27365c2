"""The swarm benchmark's lighter mode: every node in ONE private network namespace, on
its loopback, each node at an address of its own (127.0.K.1), its upload capped by an
htb class of that loopback matched on the packets' source address.

Why: the netns mode gives each node a namespace, a veth pair and a bridge port, and
shapes one MSS per packet without offloads; on two cores the kernel's share of that
(veth, bridge, htb per packet) leaves too little CPU for N = 32. Here a packet crosses
one loopback with 64 KiB segments, shaped once. The cap is still enforced by the kernel,
outside the code under test: a node's upload is every byte whose source address is the
node's, whichever side opened the connection (a BitTorrent leecher uploads over the
connections it opened too, so its client binds to its address: `aria2c --interface`).
A node's download cap (`--peer-down`) is not possible this way (a packet is classified
once, by its sender), and the mode refuses it.

Small packets (ACKs, requests, announcements) go first within the node's cap, as in the
netns mode, so a node with a full uplink still acknowledges what it downloads.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from benchmarks import netns

T = TypeVar("T")

QUEUE_SECONDS = netns.QUEUE_SECONDS
# A loopback segment: up to 64 KiB (GSO); a bucket must hold one whole.
SEGMENT = 65536


@dataclass
class SharedLoopback:
    """One namespace, its loopback shaped per node; a context manager that removes it."""

    run_id: str = field(default_factory=lambda: f"{netns.PREFIX}{os.getpid()}")
    addrs: dict[str, str] = field(default_factory=dict)
    ns: str = ""
    _topo: netns.Topology = field(default_factory=netns.Topology)
    _classes: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def start(self) -> SharedLoopback:
        self._topo.tools()
        self.ns = f"{self.run_id}-lo"
        try:
            self._ip(f"netns add {self.ns}")
            self._ip(f"-n {self.ns} link set lo up")
            # Unclassified traffic (a client and its own peer's proxy, 127.0.0.1) is not
            # capped: class 1:1 at far more than the machine moves.
            self._tc("qdisc add dev lo root handle 1: htb default 1")
            self._tc("class add dev lo parent 1: classid 1:1 htb rate 100gbit")
        except BaseException:
            self.stop()
            raise
        return self

    def _ip(self, args: str) -> None:
        netns.run([self._topo._ip, *args.split()])

    def _tc(self, args: str) -> None:
        netns.run([self._topo._tc, "-n", self.ns, *args.split()])

    def add(self, name: str, *, up: int | None = None, down: int | None = None) -> str:
        """A node `name` at an address of its own, its upload capped at `up` bytes/s."""
        if down is not None:
            raise SystemExit(
                "swarm: --mode lo-shaped cannot cap downloads (--peer-down): use --mode netns"
            )
        k = len(self.addrs) + 1
        addr = self.addrs[name] = f"127.0.{k}.1"
        if up is not None:
            self._shape(addr, up)
        return addr

    def _shape(self, addr: str, rate: int) -> None:
        node = next(self._classes) * 10 + 100  # 1:N the node, 1:N+1 small, 1:N+2 bulk
        bits = rate * 8
        small = max(bits // 20, 8000)
        burst = f"burst {2 * SEGMENT} cburst {2 * SEGMENT}"
        limit = max(16, int(rate * QUEUE_SECONDS / SEGMENT) + 2)
        self._tc(
            f"class add dev lo parent 1: classid 1:{node} htb rate {bits}bit ceil {bits}bit {burst}"
        )
        self._tc(
            f"class add dev lo parent 1:{node} classid 1:{node + 1} htb rate {small}bit"
            f" ceil {bits}bit {burst} prio 0 quantum 1514"
        )
        self._tc(
            f"class add dev lo parent 1:{node} classid 1:{node + 2} htb rate {bits - small}bit"
            f" ceil {bits}bit {burst} prio 1 quantum {SEGMENT}"
        )
        self._tc(f"qdisc add dev lo parent 1:{node + 1} pfifo limit 256")
        self._tc(f"qdisc add dev lo parent 1:{node + 2} pfifo limit {limit}")
        # From this node and under 256 bytes (the IPv4 length's high byte is zero): small.
        self._tc(
            f"filter add dev lo parent 1: protocol ip prio 1 u32 match ip src {addr}/32"
            f" match u16 0x0000 0xff00 at 2 flowid 1:{node + 1}"
        )
        self._tc(
            f"filter add dev lo parent 1: protocol ip prio 2 u32 match ip src {addr}/32"
            f" flowid 1:{node + 2}"
        )

    def exec_argv(self, argv: list[str]) -> list[str]:
        """`argv` run inside the namespace (`ip netns exec` execs it: same pid)."""
        return [self._topo._ip, "netns", "exec", self.ns, *argv]

    def call(self, fn: Callable[[], T]) -> T:
        return netns.run_in_netns(self.ns, fn)

    def stop(self) -> None:
        if self.ns:
            netns._delete_namespace(self.ns)

    def __enter__(self) -> SharedLoopback:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

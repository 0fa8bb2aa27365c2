"""Network namespaces for benchmarks: one namespace per node, capped links, full teardown.

A *hub* namespace holds a bridge; every node gets a namespace of its own with a veth
pair (``eth0`` inside the node, ``h<i>`` on the bridge), an address in 10.77.0.0/16 and
loopback up. A node can instead be linked to the root namespace itself
(:meth:`Topology.add_root_linked`: one veth pair, a /30 in 10.78.0.0/16), so that
ordinary processes reach it through its capped link without a namespace of their own.
Caps are enforced by the kernel, outside the code under test: an htb token bucket on
the node's ``eth0`` egress (its upload) and, if asked, on the bridge (or root) side's
egress towards the node (its download). Segmentation and receive offloads are turned
off, so the buckets see wire-sized packets rather than 64 KiB bursts.

Every name starts with ``dfb-<pid>-`` (the benchmark's own pid): concurrent runs do not
collide, and a later run removes what a dead run left behind (:func:`cleanup_stale`).
Everything runs as root; :func:`unavailable` says why namespaces cannot be used.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

PREFIX = "dfb-"
CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/run/netns")
MTU = 1500
# Caps are on file bytes (TCP payload), as the bound counts them: a full 1514-byte frame
# carries 1448 payload bytes (Ethernet 14, IP 20, TCP with timestamps 32), so the buckets
# run that much faster on the wire.
WIRE_PER_PAYLOAD = (MTU + 14) / (MTU - 52)
# Bulk queue per capped link: about 50 ms at the cap (at least 64 packets), so a full
# uplink adds a bounded delay instead of a deep FIFO's seconds.
QUEUE_SECONDS = 0.05


def _ip_binary() -> str | None:
    return shutil.which("ip") or next(
        (p for p in ("/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip") if os.path.exists(p)), None
    )


def _tc_binary() -> str | None:
    return shutil.which("tc") or next(
        (p for p in ("/usr/sbin/tc", "/sbin/tc") if os.path.exists(p)), None
    )


def run(cmd: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    """A setup command; a failure raises with the command and its stderr."""
    proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def unavailable() -> str | None:
    """Why namespaces cannot be used here, or None if they can (probed for real)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    ip, tc = _ip_binary(), _tc_binary()
    if ip is None or tc is None:
        return "iproute2 (ip, tc) is not installed"
    probe = f"{PREFIX}{os.getpid()}-probe"
    try:
        added = run([ip, "netns", "add", probe], check=False)
        if added.returncode != 0:
            return f"`ip netns add` failed: {added.stderr.strip()}"
        shaped = run(
            [ip, "-n", probe, "link", "add", "p0", "type", "veth", "peer", "name", "p1"],
            check=False,
        )
        if shaped.returncode != 0:
            return f"veth pairs are not available: {shaped.stderr.strip()}"
        htb = run([tc, "-n", probe, "qdisc", "add", "dev", "p0", "root", "htb"], check=False)
        if htb.returncode != 0:
            return f"tc htb is not available: {htb.stderr.strip()}"
    finally:
        run([ip, "netns", "del", probe], check=False)
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def namespaces() -> list[str]:
    """Names of every named network namespace."""
    ip = _ip_binary()
    if ip is None:
        return []
    out = run([ip, "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def netns_pids(name: str) -> list[int]:
    ip = _ip_binary()
    if ip is None:
        return []
    out = run([ip, "netns", "pids", name], check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def kill_pids(pids: list[int], grace: float = 3.0) -> None:
    """SIGTERM these processes, then SIGKILL whichever is still there after `grace`."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _delete_namespace(name: str) -> None:
    """Stop what still runs inside (a leftover of ours), then delete the namespace."""
    pids = netns_pids(name)
    if pids:
        kill_pids(pids)
    ip = _ip_binary()
    if ip is not None:
        run([ip, "netns", "del", name], check=False)


def cleanup_stale() -> list[str]:
    """Delete the namespaces (and tmpfs work directories) of benchmark runs whose process
    is gone: the leftovers of a run killed with SIGKILL. Returns what was removed."""
    removed = []
    pattern = re.compile(rf"^{re.escape(PREFIX)}(\d+)-")
    for name in namespaces():
        m = pattern.match(name)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            _delete_namespace(name)
            removed.append(name)
    shm = Path("/dev/shm")
    if shm.is_dir():
        for path in shm.glob(f"{PREFIX}*"):
            m = re.match(rf"^{re.escape(PREFIX)}(\d+)$", path.name)
            if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(str(path))
    return removed


# libc, loaded once here: a forked child must not dlopen (the loader's lock may be held
# by a thread that does not exist in the child).
_libc = ctypes.CDLL(None, use_errno=True)


def run_in_netns(ns: str | None, fn: Callable[[], T]) -> T:
    """Call `fn` in a thread that first joins namespace `ns` (None: here).

    setns(2) on a thread moves only that thread, and a socket keeps the namespace it was
    made in: health checks and metrics scrapes need no `ip netns exec` process each."""
    if ns is None:
        return fn()
    libc = _libc
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            fd = os.open(NETNS_DIR / ns, os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({ns}): {os.strerror(err)}")
            finally:
                os.close(fd)
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


@dataclass
class NetNode:
    """One node: its namespace, address and link."""

    name: str
    ns: str
    addr: str
    hub_dev: str
    up: int | None = None  # bytes/s, None: uncapped
    down: int | None = None
    dev: str = "eth0"
    root_addr: str = ""  # root-linked node: the root namespace's end (hub_dev is there)


@dataclass
class Topology:
    """A hub bridge and one namespace per node; a context manager that tears it all down."""

    run_id: str = field(default_factory=lambda: f"{PREFIX}{os.getpid()}")
    nodes: dict[str, NetNode] = field(default_factory=dict)
    hub: str = ""
    _ip: str = "ip"
    _tc: str = "tc"
    _ethtool: str | None = None

    def _ip_cmd(self, ns: str | None, args: str, *, check: bool = True) -> None:
        """`ip [-n ns] ARGS`; ARGS split on spaces (names here never hold one)."""
        run([self._ip, *(["-n", ns] if ns else []), *args.split()], check=check)

    def _tc_cmd(self, ns: str | None, args: str) -> None:
        run([self._tc, *(["-n", ns] if ns else []), *args.split()])

    def tools(self) -> Topology:
        """Find ip, tc (and ethtool); start() does it, add_root_linked alone needs only this."""
        ip, tc = _ip_binary(), _tc_binary()
        if ip is None or tc is None:
            raise RuntimeError("iproute2 (ip, tc) is not installed")
        self._ip, self._tc, self._ethtool = ip, tc, shutil.which("ethtool")
        return self

    def start(self) -> Topology:
        self.tools()
        self.hub = f"{self.run_id}-hub"
        try:
            self._ip_cmd(None, f"netns add {self.hub}")
            self._ip_cmd(self.hub, "link add br0 type bridge")
            self._ip_cmd(self.hub, "link set br0 up")
            self._ip_cmd(self.hub, "link set lo up")
        except BaseException:
            self.stop()
            raise
        return self

    def add(self, name: str, *, up: int | None = None, down: int | None = None) -> NetNode:
        """A node `name` with upload cap `up` and download cap `down` (bytes/s)."""
        i = len(self.nodes)
        n = NetNode(
            name=name,
            ns=f"{self.run_id}-{name}",
            addr=f"10.77.{i // 200}.{i % 200 + 10}",
            hub_dev=f"h{i}",
            up=up,
            down=down,
        )
        self.nodes[name] = n
        self._ip_cmd(None, f"netns add {n.ns}")
        self._ip_cmd(self.hub, f"link add {n.hub_dev} type veth peer name {n.dev} netns {n.ns}")
        self._offloads_off(self.hub, n.hub_dev)
        self._offloads_off(n.ns, n.dev)
        self._ip_cmd(self.hub, f"link set {n.hub_dev} master br0 up")
        self._ip_cmd(n.ns, f"addr add {n.addr}/16 dev {n.dev}")
        self._ip_cmd(n.ns, f"link set {n.dev} up")
        self._ip_cmd(n.ns, "link set lo up")
        if up:
            self._shape(n.ns, n.dev, up)
        if down:
            self._shape(self.hub, n.hub_dev, down)
        return n

    def add_root_linked(
        self,
        name: str,
        *,
        up: int | None = None,
        down: int | None = None,
        offloads: bool = True,
    ) -> NetNode:
        """A node `name` in a namespace of its own, joined to the *root* namespace by one
        veth pair (no hub): processes outside any namespace reach it at `addr`, through
        its upload cap `up` and download cap `down` (bytes/s). Needs tools() or start().

        `offloads` (default on, unlike add()): caps of 100 MB/s and more are for fast
        links, and wire-sized packets cost the kernel too much there. On a 2-core VM, 4
        flows through an uncapped link with offloads off moved 104 MB/s with both cores
        busy; with them on, 100 MB/s through a 100 MB/s cap took 8 % of the cores. htb
        counts a segmentation-offloaded packet by its wire length, so the average rate
        is the same; only its bursts grow to 64 KiB (under 1 ms at 100 MB/s).

        The root end's name carries the run id too; it goes with the namespace."""
        i = len(self.nodes)
        root_dev = f"{self.run_id}-r{i}"
        if len(root_dev) > 15:  # IFNAMSIZ
            raise ValueError(f"interface name {root_dev!r} is too long")
        a, b = _free_root_subnet(self._ip)
        n = NetNode(
            name=name,
            ns=f"{self.run_id}-{name}",
            addr=f"10.78.{a}.{b + 2}",
            hub_dev=root_dev,
            up=up,
            down=down,
            root_addr=f"10.78.{a}.{b + 1}",
        )
        self.nodes[name] = n
        self._ip_cmd(None, f"netns add {n.ns}")
        self._ip_cmd(None, f"link add {root_dev} type veth peer name {n.dev} netns {n.ns}")
        if not offloads:
            self._offloads_off(None, root_dev)
            self._offloads_off(n.ns, n.dev)
        self._ip_cmd(None, f"addr add {n.root_addr}/30 dev {root_dev}")
        self._ip_cmd(None, f"link set {root_dev} up")
        self._ip_cmd(n.ns, f"addr add {n.addr}/30 dev {n.dev}")
        self._ip_cmd(n.ns, f"link set {n.dev} up")
        self._ip_cmd(n.ns, "link set lo up")
        if up:
            self._shape(n.ns, n.dev, up)
        if down:
            self._shape(None, root_dev, down)
        return n

    def _offloads_off(self, ns: str | None, dev: str) -> None:
        # One MSS per skb and no GRO merging: the token bucket meters real packets.
        frame = MTU + 14
        self._ip_cmd(ns, f"link set {dev} gso_max_segs 1 gso_max_size {frame} gro_max_size {frame}")
        if self._ethtool:  # also the feature flags, where the tool is installed
            run(
                [
                    *([self._ip, "netns", "exec", ns] if ns else []),
                    self._ethtool,
                    "-K",
                    dev,
                    *["tso", "off", "gso", "off", "gro", "off"],
                ],
                check=False,
            )

    def _shape(self, ns: str | None, dev: str, rate: int) -> None:
        """htb capping `dev`'s egress at `rate` payload bytes/s.

        Small packets (pure ACKs, piece requests, announcements) go first, within the
        same cap: a node whose uplink is full still acknowledges what it downloads, as
        on any link with a sane queue. Bulk waits in a FIFO of about QUEUE_SECONDS."""
        bits = int(rate * WIRE_PER_PAYLOAD * 8)
        small = max(bits // 20, 8000)
        limit = max(64, int(rate * QUEUE_SECONDS / MTU))
        burst = "burst 15k cburst 15k"
        d = f"dev {dev}"
        self._tc_cmd(ns, f"qdisc add {d} root handle 1: htb default 20")
        self._tc_cmd(
            ns, f"class add {d} parent 1: classid 1:1 htb rate {bits}bit ceil {bits}bit {burst}"
        )
        self._tc_cmd(
            ns,
            f"class add {d} parent 1:1 classid 1:10 htb rate {small}bit ceil {bits}bit {burst}"
            " prio 0 quantum 1514",
        )
        self._tc_cmd(
            ns,
            f"class add {d} parent 1:1 classid 1:20 htb rate {bits - small}bit ceil {bits}bit"
            f" {burst} prio 1 quantum 60000",
        )
        self._tc_cmd(ns, f"qdisc add {d} parent 1:10 handle 10: pfifo limit 256")
        self._tc_cmd(ns, f"qdisc add {d} parent 1:20 handle 20: pfifo limit {limit}")
        # IPv4 total length < 256 bytes (the high byte of the length field is zero).
        self._tc_cmd(
            ns,
            f"filter add {d} parent 1: protocol ip prio 1 u32"
            " match u16 0x0000 0xff00 at 2 flowid 1:10",
        )

    def exec_argv(self, node: str, argv: list[str]) -> list[str]:
        """`argv` run inside node's namespace (`ip netns exec` execs it: same pid)."""
        return [self._ip, "netns", "exec", self.nodes[node].ns, *argv]

    def link_bytes(self, node: str) -> tuple[int, int]:
        """(tx, rx) bytes of the node's eth0 so far, headers included."""
        n = self.nodes[node]
        out = run([self._ip, "-n", n.ns, "-s", "-j", "link", "show", "dev", n.dev]).stdout
        stats = json.loads(out)[0]["stats64"]
        return int(stats["tx"]["bytes"]), int(stats["rx"]["bytes"])

    def all_link_bytes(self) -> dict[str, tuple[int, int]]:
        return {name: self.link_bytes(name) for name in self.nodes}

    def stop(self) -> None:
        """Stop anything still running in our namespaces, then delete them (and the hub,
        which takes the bridge and every veth end with it)."""
        for node in list(self.nodes.values()):
            _delete_namespace(node.ns)
            # The root end goes with the namespace, but the kernel frees a namespace
            # asynchronously: delete it now (a no-op if it is gone already).
            if node.root_addr:
                run([self._ip, "link", "del", node.hub_dev], check=False)
        if self.hub:
            _delete_namespace(self.hub)
        self.nodes.clear()

    def __enter__(self) -> Topology:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _free_root_subnet(ip: str) -> tuple[int, int]:
    """(a, b): a /30 10.78.a.b that no address in the root namespace uses, searched from
    a pid-derived start so that concurrent runs pick different ones."""
    used = run([ip, "-4", "-o", "addr", "show"]).stdout
    taken = set(re.findall(r"inet (10\.78\.\d+\.\d+)/", used))
    start = os.getpid() % 16384
    for j in range(16384):
        k = (start + j) % 16384
        a, b = k // 64, k % 64 * 4
        if not {f"10.78.{a}.{b + d}" for d in range(4)} & taken:
            return a, b
    raise RuntimeError("no free /30 left in 10.78.0.0/16")


def ours(run_id: str) -> list[str]:
    """Namespaces of one run that still exist."""
    return [n for n in namespaces() if n.startswith(f"{run_id}-")]


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """SIGTERM (and SIGHUP) raise KeyboardInterrupt like Ctrl-C, so `finally` blocks tear
    everything down whichever way the run is stopped."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def signals_ignored() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP ignored for a while (a teardown that must finish)."""
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in sigs}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In a child before exec: SIGTERM it when the benchmark dies, even by SIGKILL (the
    setting survives exec, though not a change of user such as opentracker's)."""
    _libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)

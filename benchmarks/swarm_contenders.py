"""swarm's contenders: dragonfly (scheduler, seed peers, peers behind their proxies),
direct (curl from the origin) and BitTorrent (opentracker and aria2c), each one run at
one N against the same origin file. Part of `python -m benchmarks swarm`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from benchmarks import bittorrent
from benchmarks.swarm_nodes import Env, Procs, http_get, start_origin, wait_ready
from benchmarks.swarm_race import (
    Caps,
    Run,
    Snapshot,
    barrier,
    cpu_during,
    cpu_times,
    proc_cpu,
    race,
    release,
)
from dragonfly.testing.cluster_tls import LocalTLS
from dragonfly.testing.nginx import wait_for_port
from dragonfly.testing.trust import LocalIssuer

CONTENDERS = ("dragonfly", "direct", "bittorrent")
TRACKER_PORT = 6969
BT_PORT = 6881
RPC_PORT = 6800


# ------------------------------------------------------------------------------- contenders


@dataclass
class Bench:
    env: Env
    procs: Procs
    caps: Caps
    src: Path
    want: str
    shm: Path  # tmpfs for node data: the disk stays out of the figure
    logs: Path
    app_limits: bool = True
    tls: bool = False  # TLS on dragonfly's scheduler and upload ports
    _tls_client: ssl.SSLContext | None = None  # verifies them (the run's CA)

    def fresh_logs(self, name: str) -> Path:
        """This run's log directory, emptied of an earlier run's logs."""
        path = self.logs / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def timeout(self, run: Run) -> float:
        """Give up on a run this late: twice the time the origin alone needs to serve
        every peer (no distribution should be slower), at least 5 × its own bound."""
        direct = run.peers * self.caps.size / self.caps.origin_up
        return max(5 * run.bound, 2 * direct) + 60

    def snapshot(self) -> Snapshot:
        return Snapshot(self.env.link_bytes(), cpu_times())

    def links(self, run: Run, before: Snapshot) -> None:
        """Per-node wire bytes and the machine's CPU use since `before`."""
        after = self.snapshot()
        busy, total = (a - b for a, b in zip(after.cpu, before.cpu, strict=True))
        run.cpu_busy = round(busy / total, 3) if total else None
        if before.links is None or after.links is None:
            return
        run.link_tx = {n: after.links[n][0] - before.links[n][0] for n in after.links}
        run.link_rx = {n: after.links[n][1] - before.links[n][1] for n in after.links}

    # -- dragonfly

    def dragonfly(self, n: int) -> Run:
        caps, env = self.caps, self.env
        run = Run("dragonfly", n, caps.bound("dragonfly", n), caps.size)
        logs = self.fresh_logs(f"dragonfly-n{n}")
        data = self.shm / f"dragonfly-n{n}"
        loopback = env.mode == "loopback"
        nginx = start_origin(
            env, self.procs, self.src.parent, data / "nginx", caps.origin_up if loopback else 0
        )
        nodes: list[subprocess.Popen[bytes]] = []
        try:
            py = [sys.executable, "-m", "dragonfly"]
            sched_port = env.port("scheduler")
            # With --tls, a CA for the run and a certificate per node naming its address
            # (and 127.0.0.1, where its own namespace's checks reach it).
            pki = LocalTLS(data / "tls") if self.tls else None
            self._tls_client = pki.client_context() if pki else None
            http, ws = ("https", "wss") if pki else ("http", "ws")
            sched_url = f"{ws}://{env.addr('scheduler')}:{sched_port}"
            # Identity on, as in any cluster: a secret for the scheduler, a credential
            # per peer (made here, as `dragonfly cluster` does).
            issuer = LocalIssuer(data / "trust")
            sched_settings = {
                "server.listen": env.listen_any,
                "server.port": sched_port,
                "host.ip": env.addr("scheduler"),
                "host.hostname": "scheduler",
                "log.format": "json",
                "trust.secret_file": str(issuer.secret_file),
                **(pki.scheduler_settings("scheduler", _ips(env, "scheduler")) if pki else {}),
            }
            sched = self.procs.spawn(
                env.argv("scheduler", [*py, "--role", "scheduler", *sets(sched_settings)]),
                log=logs / "scheduler.log",
            )
            nodes.append(sched)
            health = f"{http}://{env.addr('scheduler')}:{sched_port}/healthy"
            wait_ready(
                env, "scheduler", _getter(health, self._tls_client), sched, logs / "scheduler.log"
            )
            names = [f"seed-{i}" for i in range(caps.seed_peers)] + [f"peer-{i}" for i in range(n)]
            proxies: dict[str, str] = {}
            metrics: dict[str, str] = {}
            started: dict[str, subprocess.Popen[bytes]] = {}
            for name in names:
                proxy_port, upload_port = env.port("proxy"), env.port("upload")
                settings: dict[str, object] = {
                    "proxy.listen": "127.0.0.1",
                    "proxy.port": proxy_port,
                    "upload.listen": env.listen_any,
                    "upload.port": upload_port,
                    "host.ip": env.addr(name),
                    "host.hostname": name,
                    "storage.data_dir": str(data / name),
                    "scheduler.addresses": json.dumps([sched_url]),
                    "log.format": "json",
                    **(pki.peer_settings(name, _ips(env, name)) if pki else {}),
                }
                role = "seed-peer" if name.startswith("seed") else "peer"
                settings["trust.credential_file"] = str(issuer.credential_file(name, role))
                if loopback or self.app_limits:
                    # As an operator configures a peer for its link: the scheduler then
                    # knows each host's upload rate (as in the simulation). In netns mode
                    # the kernel's buckets still enforce the caps; on loopback they are
                    # the only ones, with the origin's per connection (nginx).
                    settings["upload.rate_limit"] = caps.peer_up
                    if caps.peer_down:
                        settings["download.rate_limit"] = caps.peer_down
                if loopback:
                    settings["download.back_to_source_rate_limit"] = caps.origin_up
                proc = self.procs.spawn(
                    env.argv(name, [*py, "--role", role, *sets(settings)]),
                    log=logs / f"{name}.log",
                )
                nodes.append(proc)
                started[name] = proc
                proxies[name] = f"http://127.0.0.1:{proxy_port}"
                metrics[name] = f"{http}://127.0.0.1:{upload_port}/metrics"
            for name, proc in started.items():
                url = metrics[name].replace("/metrics", "/healthy")
                wait_ready(env, name, _getter(url, self._tls_client), proc, logs / f"{name}.log")
            url = f"http://{env.addr('origin')}:{nginx.port}/{self.src.name}"
            clients = {
                f"peer-{i}": ["curl", "-sS", "-f", "-x", proxies[f"peer-{i}"], url]
                for i in range(n)
            }
            pids = {"scheduler": sched.pid, **{k: p.pid for k, p in started.items()}}
            cpu0 = {k: proc_cpu(p) for k, p in pids.items()}
            before = self.snapshot()
            race(env, self.procs, clients, self.want, run, self.timeout(run), logs)
            self.links(run, before)
            cpu_during(run, pids, cpu0)
            for name in names:
                run.metrics[name] = self._scrape(name, metrics[name])
        finally:
            for proc in reversed(nodes):
                self.procs.stop(proc)
            nginx.stop()
            run.origin_bytes = nginx.served_bytes("/")
            if nginx.access_log.exists():
                shutil.copy(nginx.access_log, logs / "origin-access.log")
            shutil.rmtree(data, ignore_errors=True)
        return run

    def _scrape(self, node: str, url: str) -> dict[str, float]:
        try:
            text = http_get(self.env, node, url, context=self._tls_client).decode()
        except (OSError, urllib.error.URLError):
            return {}
        out = {}
        for key, pattern in (
            ("p2p", r'^dragonfly_download_bytes_total\{source="p2p"\} (\S+)$'),
            (
                "back_to_source",
                r'^dragonfly_download_bytes_total\{source="back_to_source"\} (\S+)$',
            ),
            ("upload", r"^dragonfly_upload_bytes_total (\S+)$"),
            ("busy", r"^dragonfly_upload_busy_refusals_total (\S+)$"),
        ):
            m = re.search(pattern, text, re.MULTILINE)
            out[key] = float(m.group(1)) if m else 0.0
        return out

    # -- direct

    def direct(self, n: int) -> Run:
        caps, env = self.caps, self.env
        run = Run("direct", n, caps.bound("direct", n), caps.size)
        logs = self.fresh_logs(f"direct-n{n}")
        data = self.shm / f"direct-n{n}"
        # N connections of U_o/N each make the origin's total U_o. Loopback: no kernel
        # bucket caps the origin. lo-shaped: its bucket does, but its FIFO of 64-KiB
        # segments starves some of N greedy connections until the kernel aborts them
        # (nginx: ETIMEDOUT after ~65 s; no fair queueing qdisc in this kernel).
        limit = caps.origin_up // n if env.mode in ("loopback", "lo-shaped") else 0
        nginx = start_origin(env, self.procs, self.src.parent, data / "nginx", limit)
        try:
            url = f"http://{env.addr('origin')}:{nginx.port}/{self.src.name}"
            curl = ["curl", "-sS", "-f"]
            if env.mode == "loopback" and caps.peer_down:  # no kernel bucket for D either
                curl += ["--limit-rate", str(caps.peer_down)]
            clients = {f"peer-{i}": [*curl, url] for i in range(n)}
            before = self.snapshot()
            race(env, self.procs, clients, self.want, run, self.timeout(run), logs)
            self.links(run, before)
        finally:
            nginx.stop()
            run.origin_bytes = nginx.served_bytes("/")
            if (data / "nginx" / "error.log").exists():  # (kept: the data goes)
                shutil.copy(data / "nginx" / "error.log", logs / "origin-error.log")
            shutil.rmtree(data, ignore_errors=True)
        return run

    # -- bittorrent

    def bittorrent(self, n: int) -> Run:
        caps, env = self.caps, self.env
        run = Run("bittorrent", n, caps.bound("bittorrent", n), caps.size)
        logs = self.fresh_logs(f"bittorrent-n{n}")
        data = self.shm / f"bittorrent-n{n}"
        loopback = env.mode == "loopback"
        tracker_port = env.port("tracker") if loopback else TRACKER_PORT

        def bound_to(node: str) -> str:
            # lo-shaped: a node's upload is what leaves from its address, over the
            # connections it opened too
            return env.addr(node) if env.mode == "lo-shaped" else ""

        tracker = f"http://{env.addr('tracker')}:{tracker_port}"
        # The seeder's copy: a hard link to the origin's file (same bytes, no copy).
        seed_dir = self.src.parent.parent / "bt-seed"
        shutil.rmtree(seed_dir, ignore_errors=True)
        seed_dir.mkdir(parents=True)
        try:
            os.link(self.src, seed_dir / self.src.name)
        except OSError:
            shutil.copy(self.src, seed_dir / self.src.name)
        torrent_bytes, info_hash = bittorrent.make_torrent(
            seed_dir / self.src.name, f"{tracker}/announce"
        )
        tracker_root = data / "tracker"
        tracker_root.mkdir(parents=True)
        data.chmod(0o755)
        tracker_root.chmod(0o755)
        (tracker_root / "whitelist").write_text(info_hash + "\n")
        torrent = data / "f.torrent"
        torrent.write_bytes(torrent_bytes)
        torrent.chmod(0o644)
        hook = bittorrent.write_hook(data / "hook.sh")
        procs: list[subprocess.Popen[bytes]] = []
        seeder_rpc = ""
        try:
            tr = self.procs.spawn(
                env.argv(
                    "tracker",
                    bittorrent.opentracker_argv(
                        env.addr("tracker"), tracker_port, tracker_root, "whitelist"
                    ),
                ),
                log=logs / "opentracker.log",
            )
            procs.append(tr)
            addr = env.addr("tracker")
            wait_ready(
                env,
                "tracker",
                lambda: wait_for_port(addr, tracker_port, 0.5),
                tr,
                logs / "opentracker.log",
            )
            rpc_port = env.port("rpc") if loopback else RPC_PORT
            seeder = self.procs.spawn(
                env.argv(
                    "origin",
                    bittorrent.aria2_argv(
                        torrent,
                        seed_dir,
                        listen_port=env.port("bt") if loopback else BT_PORT,
                        log=logs / "seeder.log",
                        upload_limit=caps.origin_up if loopback else 0,
                        rpc_port=rpc_port,
                        stop_with_pid=os.getpid(),
                        interface=bound_to("origin"),
                    ),
                ),
                log=logs / "seeder.out",
            )
            procs.append(seeder)
            seeder_rpc = f"http://127.0.0.1:{rpc_port}/jsonrpc"

            def seeding() -> None:
                if bittorrent.scrape_complete(tracker, info_hash) < 1:
                    raise ValueError("the seeder has not announced yet")

            wait_ready(env, "tracker", seeding, seeder, logs / "seeder.log")
            leechers: dict[str, subprocess.Popen[bytes]] = {}
            for i in range(n):
                peer = f"peer-{i}"
                d = data / peer
                d.mkdir()
                argv = bittorrent.aria2_argv(
                    torrent,
                    d,
                    listen_port=env.port("bt") if loopback else BT_PORT,
                    log=logs / f"{peer}.log",
                    upload_limit=caps.peer_up if loopback else 0,
                    download_limit=(caps.peer_down or 0) if loopback else 0,
                    hook=hook,
                    stop_with_pid=os.getpid(),
                    interface=bound_to(peer),
                )
                out = shlex.quote(str(logs / f"{peer}.out"))
                script = f"echo ready; read go; exec {shlex.join(argv)} >>{out} 2>&1"
                leechers[peer] = self.procs.spawn(
                    env.argv(peer, ["bash", "-c", script]),
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                )
            procs.extend(leechers.values())
            barrier(leechers)
            pids = {"origin": seeder.pid, **{k: p.pid for k, p in leechers.items()}}
            cpu0 = {k: proc_cpu(p) for k, p in pids.items()}
            before = self.snapshot()
            t0 = time.time()  # the hooks stamp with the wall clock
            release(leechers)
            deadline = time.monotonic() + self.timeout(run)
            done: dict[str, tuple[float, str]] = {}
            while len(done) < n and time.monotonic() < deadline:
                for peer in leechers:
                    if peer not in done and (
                        got := bittorrent.read_done(data / peer / f"{self.src.name}.done")
                    ):
                        done[peer] = got
                dead = [
                    p for p, proc in leechers.items() if p not in done and proc.poll() is not None
                ]
                if dead:
                    run.error = f"aria2c exited early: {', '.join(dead)}; see {logs}"
                    break
                time.sleep(0.05)
            self.links(run, before)
            cpu_during(run, pids, cpu0)
            with contextlib.suppress(OSError, urllib.error.URLError, ValueError):
                run.origin_bytes = env.call("origin", lambda: bittorrent.uploaded_bytes(seeder_rpc))
            errors = []
            for i in range(n):
                peer = f"peer-{i}"
                if peer not in done:
                    errors.append(f"{peer}: not done")
                    continue
                run.peer_sha256[peer] = done[peer][1]
                if done[peer][1] != self.want:
                    errors.append(f"{peer}: sha256 is not the origin's")
                else:
                    run.peer_seconds[peer] = round(done[peer][0] - t0, 3)
            if errors and run.error is None:
                run.error = "; ".join(errors)
        finally:
            for proc in reversed(procs):
                self.procs.stop(proc)
            shutil.rmtree(data, ignore_errors=True)
            shutil.rmtree(seed_dir, ignore_errors=True)
        return run


def _ips(env: Env, node: str) -> tuple[str, ...]:
    """The addresses a node's certificate names: where others reach it, and loopback."""
    return tuple(dict.fromkeys((env.addr(node), "127.0.0.1")))


def _getter(url: str, context: ssl.SSLContext | None = None) -> Callable[[], None]:
    def get() -> None:
        with urllib.request.urlopen(url, timeout=2, context=context) as r:
            if r.status != 200:
                raise ValueError(f"{url}: {r.status}")

    return get


def sets(settings: dict[str, object]) -> list[str]:
    """`--set key=value` for each setting."""
    out: list[str] = []
    for key, value in settings.items():
        out += ["--set", f"{key}={value}"]
    return out

"""`make demo`: distribute one file to four peers through P2P and show where bytes went.

Starts nginx with a generated file as the origin and a local cluster (1 scheduler,
1 seed peer, 4 peers), fetches the file through every peer's proxy at once with
curl, checks every sha256, prints a summary, then times the same four fetches
straight from the origin, and stops everything.

A manager runs beside the cluster (its scheduler and seed peer register there, the
peers' download records reach it): the demo ends with the console's URL and root's
password, and keeps the manager up until Ctrl-C when run from a terminal, so the
traffic page shows where the demo's bytes went.

python -m dragonfly.demo [--size 512MiB] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from dragonfly.cluster import Cluster, ClusterError
from dragonfly.testing.nginx import Nginx, free_port
from dragonfly.testing.probe import metric, sha256_file
from dragonfly.testing.process import spawn_logged, stop_process_group
from dragonfly.units import human_bytes, parse_size

MiB = 1024 * 1024


def _make_file(path: Path, size: int) -> None:
    if path.exists() and path.stat().st_size == size:
        return
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(16 * MiB, left)
            f.write(os.urandom(n))
            left -= n


def _fetch_all(commands: list[list[str]]) -> list[tuple[float, str]]:
    """Run the curl commands at once, each piped into sha256sum (the clients keep no
    copy: the figure is distribution, not the client's disk); (wall time, sha256) each."""
    start = time.monotonic()
    procs = []
    for c in commands:
        curl = subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        digest = subprocess.Popen(["sha256sum"], stdin=curl.stdout, stdout=subprocess.PIPE)
        assert curl.stdout is not None
        curl.stdout.close()
        procs.append((curl, digest))
    results: list[tuple[float, str]] = [(0.0, "")] * len(procs)
    pending = set(range(len(procs)))
    while pending:
        for i in list(pending):
            curl, digest = procs[i]
            if digest.poll() is not None and curl.poll() is not None:
                assert digest.stdout is not None
                results[i] = (time.monotonic() - start, digest.stdout.read().decode().split()[0])
                pending.discard(i)
        time.sleep(0.01)
    for (curl, _), c in zip(procs, commands, strict=True):
        if curl.returncode != 0:
            err = curl.stderr.read().decode() if curl.stderr else ""
            raise SystemExit(f"demo: {' '.join(c)} failed: {err}")
    return results


class DemoManager:
    """A manager process for the demo, with a root password made here."""

    def __init__(self, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.password = secrets.token_urlsafe(12)
        self.url = f"http://127.0.0.1:{free_port()}"
        argv = [sys.executable, "-m", "dragonfly", "--role", "manager"]
        for item in (f"data.dir={workdir / 'data'}", f"server.port={self.url.rsplit(':', 1)[1]}"):
            argv += ["--set", item]
        env = {**os.environ, "DRAGONFLY_INITIAL_ROOT_PASSWORD": self.password}
        self.process = spawn_logged(argv, workdir / "manager.log", env=env)
        self._token = ""

    def _call(self, path: str, body: dict[str, str] | None = None) -> object:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data)
        if self._token:
            request.add_header("Authorization", f"Bearer {self._token}")
        with urllib.request.urlopen(request, timeout=5) as r:
            return json.loads(r.read())

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                answer = self._call(
                    "/api/v1/users/signin", {"name": "root", "password": self.password}
                )
                self._token = str(answer["token"])  # type: ignore[index]
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("demo: the manager did not start") from None
                time.sleep(0.1)

    def wait_records(self, count: int, timeout: float = 20.0) -> int:
        """Until the manager holds `count` download records (peers send them every few
        seconds, through their scheduler); how many it holds."""
        deadline = time.monotonic() + timeout
        while True:
            found = self._call("/api/v1/download-records?per_page=1000")
            if len(found) >= count or time.monotonic() > deadline:  # type: ignore[arg-type]
                return len(found)  # type: ignore[arg-type]
            time.sleep(0.5)

    def stop(self) -> None:
        stop_process_group(self.process)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dragonfly.demo")
    parser.add_argument("--size", default="512MiB")
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--workdir", default="")
    args = parser.parse_args(argv)
    size = parse_size(args.size)
    workdir = (
        Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="dragonfly-demo-"))
    )
    try:
        return _run(workdir, size, args.peers)
    finally:
        if not args.workdir:  # ours: leave no 512 MiB behind
            shutil.rmtree(workdir, ignore_errors=True)


def _run(workdir: Path, size: int, peer_count: int) -> int:
    www = workdir / "www"
    www.mkdir(parents=True, exist_ok=True)
    print(f"demo: generating a {human_bytes(size)} file as the origin's content ...", flush=True)
    src = www / "demo.bin"
    _make_file(src, size)
    want = sha256_file(src)
    shutil.rmtree(workdir / "cluster", ignore_errors=True)
    shutil.rmtree(workdir / "manager", ignore_errors=True)
    manager = DemoManager(workdir / "manager")
    try:
        manager.wait_ready()
        return _run_with(workdir, size, peer_count, src, want, manager)
    finally:
        manager.stop()


def _run_with(
    workdir: Path, size: int, peer_count: int, src: Path, want: str, manager: DemoManager
) -> int:
    www = src.parent
    with Nginx(root=www, workdir=workdir / "nginx") as nginx:
        url = f"{nginx.url}/demo.bin"
        print(
            f"demo: starting a cluster: 1 scheduler, 1 seed peer, {peer_count} peers ...",
            flush=True,
        )
        try:
            cluster = Cluster(
                workdir / "cluster",
                schedulers=1,
                seed_peers=1,
                peers=peer_count,
                overrides=[
                    f"scheduler:manager.address={manager.url}",
                    f"seed-peer:scheduler.manager={manager.url}",
                ],
            ).start()
        except ClusterError as exc:
            print(f"demo: {exc}", file=sys.stderr)
            return 1
        try:
            peers = [n for n in cluster.nodes if n.role == "peer"]
            print(
                f"demo: {len(peers)} clients fetch {url} through their peer's proxy at once ...",
                flush=True,
            )
            p2p_results = _fetch_all(
                [["curl", "-sS", "-f", "-x", p.info["proxy"], url] for p in peers]
            )
            p2p_times = [t for t, _ in p2p_results]
            origin_after_p2p = nginx.served_bytes("/demo.bin")
            rows = []
            ok = True
            for p, (t, digest) in zip(peers, p2p_results, strict=True):
                good = digest == want
                ok &= good
                rows.append(
                    (
                        p.name,
                        metric(p.info["metrics"], "dragonfly_download_bytes_total", 'source="p2p"'),
                        metric(
                            p.info["metrics"],
                            "dragonfly_download_bytes_total",
                            'source="back_to_source"',
                        ),
                        t,
                        good,
                    )
                )
            seed = next(n for n in cluster.nodes if n.role == "seed-peer")
            seed_source = metric(
                seed.info["metrics"], "dragonfly_download_bytes_total", 'source="back_to_source"'
            )
            seed_up = metric(seed.info["metrics"], "dragonfly_upload_bytes_total", "")
            records = manager.wait_records(len(peers) + 1)
        finally:
            cluster.stop()
        print(f"demo: the same {len(peers)} fetches straight from the origin ...", flush=True)
        direct = _fetch_all([["curl", "-sS", "-f", url] for _ in peers])
        direct_times = [t for t, _ in direct]
        ok = ok and all(digest == want for _, digest in direct)
    print()
    print(f"file: {human_bytes(size)}, sha256 {want[:16]}…")
    print(
        f"origin served during the P2P run: {human_bytes(origin_after_p2p)} ({origin_after_p2p / size:.2f}× the file)"
    )
    print(
        f"seed peer: {human_bytes(seed_source)} from the origin, {human_bytes(seed_up)} uploaded to peers"
    )
    print()
    print(f"{'peer':<10}{'peer-to-peer':>16}{'from origin':>14}{'time':>9}  sha256")
    for name, p2p, b2s, t, good in rows:
        print(
            f"{name:<10}{human_bytes(p2p):>16}{human_bytes(b2s):>14}{t:>8.2f}s  {'ok' if good else 'MISMATCH'}"
        )
    print()
    print(
        f"all {len(peers)} through P2P: {max(p2p_times):.2f}s;  all {len(peers)} straight from the origin: {max(direct_times):.2f}s"
    )
    print(f"logs and data: {workdir} (removed at exit unless --workdir was given)")
    print()
    print(f"console: {manager.url}/  user root, password {manager.password}")
    print(f"  ({records} download records reached it: see Traffic)")
    if sys.stdin.isatty():
        print("the manager keeps running for the console: Ctrl-C to stop it", flush=True)
        try:
            while manager.process.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

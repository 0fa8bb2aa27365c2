"""`make demo`: distribute one file to four peers through P2P and show where bytes went.

Starts nginx with a generated file as the origin and a local cluster (a manager,
1 scheduler, 1 seed peer, 4 peers: the others join the manager and find their
scheduler through it), fetches the file through every peer's proxy at once with
curl, checks every sha256, times the same four fetches straight from the origin,
prints a summary and how to sign in to the manager (its console's traffic page shows
where the demo's bytes went), and stops everything (on a terminal, once Enter is
pressed, so the manager can be tried first).

python -m dragonfly.demo [--size 512MiB] [--workdir DIR] [--no-wait]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dragonfly.cluster import MANAGER, Cluster, ClusterError, manager_help
from dragonfly.testing.nginx import Nginx
from dragonfly.testing.probe import metric, sha256_file
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


def _wait_records(cluster: Cluster, count: int, timeout: float = 20.0) -> int:
    """Until the manager holds `count` download records (peers send them every few
    seconds, through their scheduler); how many it holds."""
    deadline = time.monotonic() + timeout
    while True:
        found = cluster.manager_api("GET", "/api/v1/download-records?per_page=1000", None)
        if len(found) >= count or time.monotonic() > deadline:
            return len(found)
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dragonfly.demo")
    parser.add_argument("--size", default="512MiB")
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--workdir", default="")
    parser.add_argument("--no-wait", action="store_true", help="stop at once, even on a terminal")
    args = parser.parse_args(argv)
    size = parse_size(args.size)
    workdir = (
        Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="dragonfly-demo-"))
    )
    try:
        return _run(workdir, size, args.peers, wait=sys.stdin.isatty() and not args.no_wait)
    finally:
        if not args.workdir:  # ours: leave no 512 MiB behind
            shutil.rmtree(workdir, ignore_errors=True)


def _run(workdir: Path, size: int, peer_count: int, *, wait: bool = False) -> int:
    www = workdir / "www"
    www.mkdir(parents=True, exist_ok=True)
    print(f"demo: generating a {human_bytes(size)} file as the origin's content ...", flush=True)
    src = www / "demo.bin"
    _make_file(src, size)
    want = sha256_file(src)
    shutil.rmtree(workdir / "cluster", ignore_errors=True)
    with Nginx(root=www, workdir=workdir / "nginx") as nginx:
        url = f"{nginx.url}/demo.bin"
        print(
            f"demo: starting a cluster: a manager, 1 scheduler, 1 seed peer, {peer_count} "
            "peers ...",
            flush=True,
        )
        try:
            cluster = Cluster(
                workdir / "cluster", schedulers=1, seed_peers=1, peers=peer_count
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
            print(f"demo: the same {len(peers)} fetches straight from the origin ...", flush=True)
            direct = _fetch_all([["curl", "-sS", "-f", url] for _ in peers])
            direct_times = [t for t, _ in direct]
            ok = ok and all(digest == want for _, digest in direct)
            _summary(size, want, origin_after_p2p, seed_source, seed_up, rows, p2p_times)
            print(
                f"all {len(peers)} straight from the origin: {max(direct_times):.2f}s",
                flush=True,
            )
            # The peers' records; the seed's comes once it stops serving its children's
            # announcement schedule (download.py), later than the demo needs to wait.
            records = _wait_records(cluster, len(peers))
            print()
            print(manager_help(cluster.node(MANAGER), show_password=True), flush=True)
            print(
                f"  the console: the same URL in a browser ({records} download records reached "
                "it: see Traffic)",
                flush=True,
            )
            if wait:
                print("the cluster keeps running: press Enter to stop it", flush=True)
                sys.stdin.readline()
            else:
                print("(the cluster stops now; on a terminal it runs until Enter)", flush=True)
        finally:
            cluster.stop()
    print(f"logs and data: {workdir} (removed at exit unless --workdir was given)")
    return 0 if ok else 1


def _summary(
    size: int,
    want: str,
    origin_after_p2p: int,
    seed_source: float,
    seed_up: float,
    rows: list[tuple[str, float, float, float, bool]],
    p2p_times: list[float],
) -> None:
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
    print(f"all {len(rows)} through P2P: {max(p2p_times):.2f}s")


if __name__ == "__main__":
    raise SystemExit(main())

"""Small requests: local hits of a 100 KiB file, many clients at once, through one peer's
proxy against nginx serving the same file directly, in the same run.

python -m benchmarks small_requests [--size 100KiB] [--connections 500] [--seconds 5]
    [--rounds 3] [--workers 1]

Two clients, each against both: wrk (HTTP/1.1, keep-alive: what curl, containerd and
pip do) and ab -k (HTTP/1.0: a new connection per request for an HTTP/1.1 server like
the peer's, which keeps HTTP/1.0 connections open only when asked and h11 cannot). The
figure is requests per second, and the ratio to nginx's. wrk runs `--rounds` times
against each, alternating (this machine's speed drifts within a run), and the figure is
the median; the peer runs with proxy.workers = `--workers`. Also reported: the CPU the
peer's processes (daemon and workers) and wrk spent per proxied request.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import machine, one_peer_cluster, write_result
from dragonfly.testing.nginx import Nginx
from dragonfly.testing.process import child_pids
from dragonfly.units import parse_size


def wrk(target: str, url: str, connections: int, seconds: float, work: Path) -> float:
    """Requests/s of wrk against `target` (a proxy, or the origin itself) for `url`."""
    script = work / "path.lua"
    script.write_text(f'wrk.path = "{url}"\n' if target != url else "")
    out = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{round(seconds)}s", "--timeout", "30s",
         *(["-s", str(script)] if target != url else []), target],
        capture_output=True,
        text=True,
        timeout=seconds + 120,
    )  # fmt: skip
    m = re.search(r"Requests/sec:\s+([\d.]+)", out.stdout)
    errors = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out.stdout)
    if m is None or errors is not None:
        raise RuntimeError(f"wrk failed: {out.stdout[-500:]}{out.stderr[-500:]}")
    return float(m.group(1))


def ab(url: str, proxy: str | None, connections: int, requests: int) -> float:
    cmd = ["ab", "-q", "-k", "-n", str(requests), "-c", str(connections), "-s", "60"]
    if proxy:
        cmd += ["-X", proxy.split("//", 1)[1]]
    out = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=600)
    m = re.search(r"Requests per second:\s+([\d.]+)", out.stdout)
    failed = re.search(r"Failed requests:\s+(\d+)", out.stdout)
    if m is None or (failed is not None and failed.group(1) != "0"):
        raise RuntimeError(f"ab failed: {out.stdout[-500:]}{out.stderr[-500:]}")
    return float(m.group(1))


def _cpu_seconds(pids: list[int]) -> float:
    """utime + stime of these processes so far (0 for one that is gone)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks small_requests", description=__doc__)
    p.add_argument("--size", type=parse_size, default=100 * 1024)
    p.add_argument("--connections", type=int, default=500)
    p.add_argument("--seconds", type=float, default=5.0, help="each wrk round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, default=1, help="the peer's proxy.workers")
    p.add_argument("--ab-requests", type=int, default=10000)
    args = p.parse_args(argv)
    rounds: dict[str, list[float]] = {"wrk nginx": [], "wrk proxy": []}
    with tempfile.TemporaryDirectory(prefix="dragonfly-small-") as tmp:
        work = Path(tmp)
        www = work / "www"
        www.mkdir()
        (www / "small.bin").write_bytes(os.urandom(args.size))
        with (
            Nginx(root=www, workdir=work / "nginx") as nginx,
            one_peer_cluster(work, args.workers) as cluster,
        ):
            peer = cluster.node("peer-0")
            assert peer.process is not None
            proxy = str(peer.info["proxy"])
            url = f"{nginx.url}/small.bin"
            subprocess.run(["curl", "-sSf", "-x", proxy, "-o", os.devnull, url], check=True)
            time.sleep(2.0)  # (the workers are up: they start beside the daemon)
            pids = [peer.process.pid, *child_pids(peer.process.pid)]
            if len(pids) != 1 + args.workers:
                raise RuntimeError(f"expected {args.workers} proxy workers, found {pids[1:]}")
            c, n = args.connections, args.ab_requests
            cpu = requests = 0.0
            for _ in range(args.rounds):
                rounds["wrk nginx"].append(wrk(url, url, c, args.seconds, work))
                before = _cpu_seconds(pids)
                rate = wrk(proxy, url, c, args.seconds, work)
                cpu += _cpu_seconds(pids) - before
                requests += rate * round(args.seconds)
                rounds["wrk proxy"].append(rate)
            figures = {name: statistics.median(values) for name, values in rounds.items()}
            figures["ab nginx"] = ab(url, None, c, n)
            figures["ab proxy"] = ab(url, proxy, c, n)
    per_request = cpu / requests * 1e6 if requests else 0.0
    print(
        f"small requests: {args.size} bytes, {args.connections} at once, proxy.workers "
        f"{args.workers} ({machine()})"
    )
    for client in ("wrk", "ab"):
        direct, through = figures[f"{client} nginx"], figures[f"{client} proxy"]
        print(
            f"  {client:<4} nginx {direct:>9.0f}/s   proxy local hit {through:>9.0f}/s"
            f"   ratio {through / direct:.2f}"
        )
    per_round = [
        f"{b / a:.2f}" for a, b in zip(rounds["wrk nginx"], rounds["wrk proxy"], strict=True)
    ]
    print(f"  wrk rounds (ratio): {', '.join(per_round)}")
    print(f"  the peer's CPU per proxied request: {per_request:.0f} µs (daemon and workers)")
    write_result(
        "small_requests",
        {
            "args": vars(args),
            "requests_per_second": figures,
            "wrk_rounds": rounds,
            "peer_cpu_us_per_request": per_request,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""swarm: N peers ask for the same file at the same moment; how close to the fluid bound?

One measurement of three contenders (dragonfly, direct, BitTorrent) in one of three modes
(netns, lo-shaped, loopback) under one set of caps and one bound. This module is the command line; the rest
is in benchmarks/swarm_nodes.py (processes, where nodes run, the origin, the netns
topology), swarm_race.py (caps, bound, a run and its results, the start barrier),
swarm_contenders.py (the three contenders) and swarm_report.py (the table); the parts
shared with other benchmarks are in benchmarks/common.py and benchmarks/netns.py.

One origin with its upload capped at U_o; N peers and M seed peers, each with its
upload capped at U_p (and its download at D, if given); every peer asks for the same
file of F bytes at the same moment and its client discards the bytes after hashing
them (`curl ... | sha256sum`), so the figure measures distribution, not the disk.

    T_all       time until every peer has the whole file, its sha256 verified
    bound       Kumar & Ross's minimum distribution time (dragonfly.sim.bound):
                T_min = max(F/U_o, F/D, N·F / (U_o + (N+M)·U_p))
    efficiency  T_min / T_all
    origin / F  bytes the origin served, in copies of the file

Three contenders in the same run, each against its own bound:
    dragonfly   scheduler, M seed peers, N peers; curl through each peer's proxy
    direct      N curls straight from the origin (bound N·F/U_o)
    bittorrent  opentracker and aria2c: the origin the only seeder (capped at U_o),
                N leechers (capped at U_p) that keep seeding until all are done;
                4 MiB pieces, tracker only (bound with M = 0)

Modes:
    netns       (default as root) every node in a network namespace of its own, on a
                bridge in a hub namespace; the caps are htb token buckets in the
                kernel, outside the code under test (benchmarks/netns.py)
    lo-shaped   (lighter: N = 32 fits two cores) every node in one private namespace at
                an address of its own on its loopback; each node's upload capped by an
                htb class matched on the source address, also in the kernel
                (benchmarks/lo_shaped.py); no download caps
    loopback    127.0.0.1 only: nginx `limit_rate` for the origin, dragonfly's own
                upload rate limit for the peers, aria2's for BitTorrent (approximate)

Dragonfly's peers are configured with upload.rate_limit = U_p (download.rate_limit = D),
as an operator sizes them, so the scheduler knows their rates; in netns mode the kernel
enforces the caps all the same (--no-app-limits: leave the peers' own limits unset).
--tls turns TLS on for dragonfly's scheduler and upload ports (results in swarm-tls.json).

python -m benchmarks swarm [--peers 8,16] [--size 256MiB] [--origin-up 10MB/s]
    [--peer-up 10MB/s] [--peer-down RATE] [--seed-peers 1] [--mode netns|lo-shaped|loopback]
    [--only dragonfly,direct,bittorrent] [--no-app-limits] [--tls]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from benchmarks import common, netns
from benchmarks.lo_shaped import SharedLoopback
from benchmarks.swarm_contenders import CONTENDERS, Bench
from benchmarks.swarm_nodes import (
    Env,
    LoopbackEnv,
    NetnsEnv,
    Procs,
    SharedLoEnv,
    build_nodes,
    choose_mode,
)
from benchmarks.swarm_race import Caps, Run
from benchmarks.swarm_report import fmt, print_table
from dragonfly.testing.nginx import nginx_binary
from dragonfly.testing.probe import sha256_file
from dragonfly.units import human_bytes, parse_rate, parse_size

__all__ = ["Caps", "main"]


# ------------------------------------------------------------------------------ main


def parse_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: a comma list of peer counts >= 1")
    return values


def parse_only(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in names if v not in CONTENDERS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(CONTENDERS)}")
    return [c for c in CONTENDERS if c in names]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks swarm", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--peers", type=parse_list, default=[8, 16], help="comma list of N (default 8,16)"
    )
    parser.add_argument("--size", default="256MiB", help="file size F (default 256MiB)")
    parser.add_argument("--origin-up", default="10MB/s", help="origin upload cap U_o")
    parser.add_argument(
        "--peer-up", default="10MB/s", help="upload cap U_p of every peer and seed peer"
    )
    parser.add_argument(
        "--peer-down", default=None, help="download cap D of every peer (default none)"
    )
    parser.add_argument(
        "--seed-peers", type=int, default=1, help="dragonfly seed peers M (default 1)"
    )
    parser.add_argument(
        "--no-app-limits",
        action="store_true",
        help="netns mode: leave dragonfly's own upload/download rate limits unset "
        "(the kernel's caps alone; the scheduler is not told the peers' rates)",
    )
    parser.add_argument(
        "--mode",
        choices=("netns", "lo-shaped", "loopback"),
        default=None,
        help="default: netns when root and `ip netns` work, else loopback",
    )
    parser.add_argument(
        "--only", type=parse_only, default=list(CONTENDERS), help="comma list of contenders"
    )
    parser.add_argument(
        "--tls", action="store_true", help="TLS on dragonfly's scheduler and upload ports"
    )
    args = parser.parse_args(argv)
    caps = Caps(
        size=parse_size(args.size),
        origin_up=parse_rate(args.origin_up),
        peer_up=parse_rate(args.peer_up),
        peer_down=parse_rate(args.peer_down) if args.peer_down else None,
        seed_peers=args.seed_peers,
    )
    if caps.origin_up <= 0 or caps.peer_up <= 0 or caps.seed_peers < 0 or caps.size <= 0:
        parser.error("sizes and caps must be positive, --seed-peers >= 0")
    missing = [
        p
        for p, needed in (
            ("nginx", "dragonfly" in args.only or "direct" in args.only),
            ("curl", True),
            ("aria2c", "bittorrent" in args.only),
            ("opentracker", "bittorrent" in args.only),
        )
        if needed and shutil.which(p) is None and not (p == "nginx" and nginx_binary())
    ]
    if missing:
        raise SystemExit(f"swarm: not installed: {', '.join(missing)} (make deps installs them)")
    mode, why = choose_mode(args.mode)
    print(f"swarm: mode {mode} ({why})", flush=True)
    # One results file per mode that make bench runs (netns and lo-shaped), and for TLS.
    name = "swarm" + ("-lo-shaped" if mode == "lo-shaped" else "") + ("-tls" if args.tls else "")
    netns.cleanup_stale()  # what runs killed outright left behind (dead pids only)
    work = common.RESULTS / name
    src = common.ensure_file(work / "www" / f"f-{caps.size}.bin", caps.size)
    want = sha256_file(src)
    run_id = f"{netns.PREFIX}{os.getpid()}"
    shm_root = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path("/tmp")
    shm = shm_root / run_id
    procs = Procs()
    topo = netns.Topology(run_id=run_id)
    shared = SharedLoopback(run_id=run_id)
    runs: list[Run] = []
    interrupted = False
    try:
        with netns.signals_raise():
            shm.mkdir(mode=0o755)
            if mode == "netns":
                topo.start()
                build_nodes(topo, caps, max(args.peers))
                env: Env = NetnsEnv(topo)
            elif mode == "lo-shaped":
                shared.start()
                build_nodes(shared, caps, max(args.peers))
                env = SharedLoEnv(shared)
            else:
                env = LoopbackEnv()
            bench = Bench(
                env,
                procs,
                caps,
                src,
                want,
                shm,
                work / "logs",
                app_limits=not args.no_app_limits,
                tls=args.tls,
            )
            for n in args.peers:
                for contender in args.only:
                    print(f"N={n} {contender} ...", flush=True)
                    try:
                        run = getattr(bench, contender)(n)
                    except Exception as exc:  # one contender's failure is a result too
                        run = Run(contender, n, caps.bound(contender, n), caps.size)
                        run.error = f"{type(exc).__name__}: {exc}"
                    runs.append(run)
                    print(
                        f"N={n} {contender}: T_all {fmt(run.t_all, '.1f')} s, "
                        f"bound {run.bound:.1f} s, efficiency {fmt(run.efficiency, '.2f')}"
                        + (f"; FAILED: {run.error[:300]}" if run.error else ""),
                        flush=True,
                    )
    except KeyboardInterrupt:
        interrupted = True
    finally:
        with netns.signals_ignored():  # a second Ctrl-C must not cut the teardown short
            procs.stop_all()
            topo.stop()
            shared.stop()
            shutil.rmtree(shm, ignore_errors=True)
    if interrupted:
        print("swarm: interrupted; every process and namespace of the run is gone", flush=True)
        return 130
    print_table(caps, mode, runs)
    payload = {
        "mode": mode,
        "size": caps.size,
        "origin_up": caps.origin_up,
        "peer_up": caps.peer_up,
        "peer_down": caps.peer_down,
        "seed_peers": caps.seed_peers,
        "tls": args.tls,
        "sha256": want,
        "run_id": run_id,
        "pids": procs.pids,
        "runs": [r.summary() for r in runs],
    }
    path = common.write_result(name, payload)
    for n in args.peers:
        series = {f"{r.contender}": list(r.peer_seconds.values()) for r in runs if r.peers == n}
        if any(series.values()):
            png = common.plot_cdf(
                f"{name}-n{n}",
                series,
                xlabel="seconds until the peer has the whole verified file",
                title=f"swarm ({mode}): N = {n}, F = {human_bytes(caps.size)}, "
                f"U_o = {caps.origin_up / 1e6:g} MB/s, U_p = {caps.peer_up / 1e6:g} MB/s",
                bound=caps.bound("dragonfly", n),
            )
            print(f"wrote {png}")
    print(f"wrote {path}")
    return 0 if all(r.ok for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

"""throughput: one download through dragonfly against the usual clients straight from nginx.

One file (default 1 GiB) from nginx on loopback; every client writes it to a file on the
same disk. In each round, side by side:
  curl direct        curl -o FILE straight from nginx (the reference)
  aria2c -x8 direct  aria2c with 8 connections (ranges) straight from nginx
  proxy cold         curl through peer-0: the seed fetches from the origin, peer-0 from it
  proxy remote hit   curl through peer-1 after peer-0 finished (P2P from peers holding it)
  proxy local hit    curl through peer-0 again (sendfile from its own task file)
  dragonfly get      `python -m dragonfly get` through peer-2's daemon, which does not
                     hold the file yet: a P2P remote hit, then the copy out of the task
                     file into FILE (what a dfget user waits for)
Ratio = curl direct time / time (1.0 = as fast as curl direct); each contender's median
over the rounds. Each round is a new task (a distinct query string), so "cold" is cold.
Every download's sha256 is checked; peak private memory of every daemon is sampled.
`--tls` runs the cluster with TLS on its scheduler and upload ports (results in
throughput-tls.json): every piece between peers is then encrypted and read rather than
spliced and sent with sendfile; its cost is the ratios' difference between two runs.

python -m benchmarks throughput [--size 1GiB] [--rounds 3] [--tls]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks.common import (
    RESULTS,
    ProxyRig,
    check_download,
    curl_cmd,
    ensure_file,
    median,
    plot_bars,
    print_memory,
    print_ratios,
    proxy_rig,
    timed,
    write_result,
)
from dragonfly.testing.probe import sha256_file
from dragonfly.units import human_bytes, parse_size

REFERENCE = "curl direct"
# The order they run in each round: the proxies' cold run first, the hits after it.
CONTENDERS = (
    REFERENCE,
    "aria2c -x8 direct",
    "proxy cold",
    "proxy remote hit",
    "proxy local hit",
    "dragonfly get",
)
# The targets (#15), as ratios to curl direct. `dragonfly get` measures a remote
# hit, and must be no slower than the proxy's: it answers to the remote hit's target.
TARGETS = {
    "proxy cold": 0.5,
    "proxy remote hit": 0.7,
    "proxy local hit": 1.0,
    "dragonfly get": 0.7,
}
GET_CASE = "remote hit: through peer-2's daemon, which does not hold the file yet"


def aria2c_cmd(out: Path, url: str) -> list[str]:
    """aria2c with 8 ranged connections, writing one file, no console output but errors."""
    return [
        "aria2c",
        "--no-conf=true",
        "-x8",
        "-s8",
        "-k1M",
        "--file-allocation=none",
        "--allow-overwrite=true",
        "--auto-file-renaming=false",
        "--console-log-level=error",
        "--summary-interval=0",
        "--show-console-readout=false",
        "--download-result=hide",
        "-d",
        str(out.parent),
        "-o",
        out.name,
        url,
    ]


def get_cmd(out: Path, url: str, peer: str) -> list[str]:
    # --peer: the daemon must be this one; with none answering `get` would quietly run a
    # one-shot embedded peer and measure something else.
    return [sys.executable, "-m", "dragonfly", "get", url, "-O", str(out), "--peer", peer]


def command(contender: str, out: Path, url: str, rig: ProxyRig) -> list[str]:
    """What one contender runs to download URL into OUT."""
    if contender == REFERENCE:
        return curl_cmd(out, url)
    if contender == "aria2c -x8 direct":
        return aria2c_cmd(out, url)
    if contender == "dragonfly get":
        return get_cmd(out, url, str(rig.cluster.node("peer-2").info["data_dir"]))
    # cold and local hit through peer-0; the remote hit through peer-1, which P2P serves
    node = "peer-1" if contender == "proxy remote hit" else "peer-0"
    return curl_cmd(out, url, rig.proxy(node))


def run(argv: list[str], *, name: str, contenders: Sequence[str], rounds: int) -> int:
    """Parse NAME's options and measure `contenders` (some of CONTENDERS, the reference
    among them) over the rounds; print the table, write NAME.json and NAME.png."""
    contenders = [c for c in CONTENDERS if c in contenders]  # cold before the hits
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks {name}")
    parser.add_argument("--size", default="1GiB", help="file size (default 1GiB)")
    parser.add_argument(
        "--rounds", type=int, default=rounds, help=f"rounds, medians reported ({rounds})"
    )
    parser.add_argument(
        "--tls", action="store_true", help="TLS on the scheduler and upload ports (NAME-tls)"
    )
    args = parser.parse_args(argv)
    size = parse_size(args.size)
    name = f"{name}-tls" if args.tls else name
    work = RESULTS / name
    www = work / "www"
    src = ensure_file(www / "f.bin", size)
    want = sha256_file(src)
    out = work / "out.bin"
    runs: dict[str, list[float]] = {c: [] for c in contenders}
    digests: dict[str, list[str]] = {c: [] for c in contenders}
    targets = {c: t for c, t in TARGETS.items() if c in contenders}
    peers = 3 if "dragonfly get" in contenders else 2
    with proxy_rig(work, www, peers=peers, tls=args.tls) as rig:
        pids = rig.pids()
        # Warm the page cache with the origin's file once, for every contender alike.
        timed(curl_cmd(out, f"{rig.nginx.url}/f.bin"))
        out.unlink()
        for r in range(args.rounds):
            url = f"{rig.nginx.url}/f.bin?round={r}-{time.time_ns()}"
            for contender in contenders:
                runs[contender].append(timed(command(contender, out, url, rig), sync=True))
                digests[contender].append(check_download(contender, out, want))
    med = {k: median(v) for k, v in runs.items()}
    title = f"{name}: {human_bytes(size)}, median of {args.rounds}, every client writes a file"
    if "dragonfly get" in contenders:
        title += f"\n(dragonfly get = {GET_CASE})"
    ratios = print_ratios(title, med, REFERENCE, targets, size)
    print_memory(rig.sampler.peak)
    path = write_result(
        name,
        {
            "size": size,
            "rounds": args.rounds,
            "tls": args.tls,
            "reference": REFERENCE,
            "get_case": GET_CASE if "dragonfly get" in contenders else None,
            "seconds": runs,
            "median_seconds": med,
            "ratios": ratios,
            "targets": targets,
            "passed": {k: ratios[k] >= t for k, t in targets.items()},
            "sha256": want,
            "download_sha256": digests,
            "peak_rss_anon": rig.sampler.peak,
            "pids": pids,
        },
    )
    png = plot_bars(
        name,
        ratios,
        ylabel="curl direct time / time (1 = as fast)",
        title=f"{name}, {human_bytes(size)}, median of {args.rounds}",
        reference=1.0,
    )
    print(f"wrote {path} and {png}")
    return 0


def main(argv: list[str]) -> int:
    return run(argv, name="throughput", contenders=CONTENDERS, rounds=3)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

"""http_serve: the h11 sendfile server against nginx, the h11 client against curl.

One run, same 1 GiB file, same disk, interleaved rounds (the machine is shared
and noisy, so only ratios measured side by side mean anything):
  curl ← nginx           the reference
  curl ← h11 server      server ratio = reference time / this time
  h11 client ← nginx     client ratio = reference time / this time
Every client writes to a file on the same disk.

python -m benchmarks http_serve [--size 1GiB] [--rounds 5]
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from benchmarks.common import (
    RESULTS,
    check_download,
    ensure_file,
    median,
    plot_bars,
    timed,
    write_result,
)
from dragonfly.testing.nginx import Nginx, free_port, wait_for_port
from dragonfly.testing.probe import sha256_file
from dragonfly.units import human_bytes, parse_size

TARGET_SERVER = 0.9
TARGET_CLIENT = 0.8


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks http_serve")
    parser.add_argument("--size", default="1GiB", help="file size (default 1GiB)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    size = parse_size(args.size)
    work = RESULTS / "http_serve"
    www = work / "www"
    src = ensure_file(www / "f.bin", size)
    out = work / "out.bin"
    nginx = Nginx(root=www, workdir=work / "nginx").start()
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.file_server", str(www), str(port)],
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_for_port("127.0.0.1", port)
        runs: dict[str, list[float]] = {"curl<-nginx": [], "curl<-h11": [], "h11<-nginx": []}
        commands = {
            "curl<-nginx": ["curl", "-sSf", "-o", str(out), f"{nginx.url}/f.bin"],
            "curl<-h11": ["curl", "-sSf", "-o", str(out), f"http://127.0.0.1:{port}/f.bin"],
            "h11<-nginx": [
                sys.executable,
                "-m",
                "benchmarks.fetch",
                f"{nginx.url}/f.bin",
                str(out),
            ],
        }
        want = sha256_file(src)
        timed(commands["curl<-nginx"])  # warm the page cache for every contender alike
        names = list(commands)
        for round_no in range(args.rounds):
            # Rotate the order, and start each run with no dirty pages of the last one
            # being written back under it.
            for name in names[round_no % len(names) :] + names[: round_no % len(names)]:
                runs[name].append(timed(commands[name], sync=True))
                check_download(name, out, want)
    finally:
        server.terminate()
        server.wait(timeout=10)
        nginx.stop()
    med = {k: median(v) for k, v in runs.items()}
    server_ratio = med["curl<-nginx"] / med["curl<-h11"]
    client_ratio = med["curl<-nginx"] / med["h11<-nginx"]
    print(f"http_serve: {human_bytes(size)}, median of {args.rounds}, client writes to a file")
    print(f"{'run':<14}{'median s':>10}{'MB/s':>10}")
    for name, t in med.items():
        print(f"{name:<14}{t:>10.3f}{size / t / 1e6:>10.0f}")
    print(
        f"server ratio (h11 server / nginx, via curl): {server_ratio:.2f}  target >= {TARGET_SERVER}"
    )
    print(
        f"client ratio (h11 client / curl, from nginx): {client_ratio:.2f}  target >= {TARGET_CLIENT}"
    )
    path = write_result(
        "http_serve",
        {
            "size": size,
            "rounds": args.rounds,
            "seconds": runs,
            "median_seconds": med,
            "server_ratio": server_ratio,
            "client_ratio": client_ratio,
        },
    )
    png = plot_bars(
        "http_serve",
        {"server (curl <- h11)": server_ratio, "client (h11 <- nginx)": client_ratio},
        ylabel="curl <- nginx time / time (1 = as fast)",
        title=f"http_serve, {human_bytes(size)}, median of {args.rounds}",
        reference=1.0,
    )
    print(f"wrote {path} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

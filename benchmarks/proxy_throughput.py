"""proxy_throughput: one client through a peer's proxy against the same client direct.

One file (default 1 GiB) from nginx on loopback; every client is `curl -o FILE` on the
same disk. In each round, side by side:
  curl direct       straight from nginx (the reference)
  proxy cold        through peer-0: the seed fetches from the origin, peer-0 from the seed
  proxy remote hit  through peer-1 after peer-0 finished (P2P from a peer that has it)
  proxy local hit   through peer-0 again (sendfile from its own task file)
Ratios are reference time / run time (1.0 = as fast as direct). Each round uses a new
task (a distinct query string), so "cold" is cold. Peak private memory (RssAnon: heap,
not mapped file pages) of every daemon is sampled throughout.

The same machinery as `throughput` (benchmarks/throughput.py), with these contenders only.

python -m benchmarks proxy_throughput [--size 1GiB] [--rounds 1]
"""

from __future__ import annotations

import sys

from benchmarks.throughput import REFERENCE, run

CONTENDERS = (REFERENCE, "proxy cold", "proxy remote hit", "proxy local hit")


def main(argv: list[str]) -> int:
    return run(argv, name="proxy_throughput", contenders=CONTENDERS, rounds=1)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

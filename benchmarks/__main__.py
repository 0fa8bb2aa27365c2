"""python -m benchmarks NAME [options]: run one benchmark module."""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path

HELPERS = {
    "file_server",
    "fetch",
    "common",
    "scheduler_load",
    "scheduler_core",
    "netns",
    "bittorrent",
    "scheduler_wire",
    "swarm_nodes",
    "swarm_race",
    "swarm_contenders",
    "swarm_report",
}


def available() -> list[str]:
    here = Path(__file__).parent
    return sorted(
        m.name
        for m in pkgutil.iter_modules([str(here)])
        if m.name not in HELPERS and not m.name.startswith("_")
    )


def main(argv: list[str]) -> int:
    names = available()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in names:
        print("usage: python -m benchmarks NAME [options]\nbenchmarks: " + ", ".join(names))
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(f"benchmarks.{argv[0]}")
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

"""``python -m dragonfly sim``: run one swarm simulation and print what it measured.

``main(argv)`` parses the options (sizes and rates as in the config files: "1GiB",
"10MB/s"), runs the simulation and prints a table, the ``efficiency: 0.xxx`` line
(T_min / T_all), the origin bytes, the per-peer download-time CDF and the wall time.
Everything but the wall time is a function of the options: the same seed prints the
same numbers, always.

Exit status: 0 when every peer finished, 1 when some did not (failed, or the swarm
stopped making progress), 2 for bad options.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

from dragonfly.config import PeerConfig, SchedulerConfig
from dragonfly.identity import piece_length_for
from dragonfly.sched.scheduler import SchedulerSettings
from dragonfly.sim.scenario import SimConfig, SimResult
from dragonfly.sim.swarm import run_simulation
from dragonfly.units import format_size, parse_duration, parse_rate, parse_size

__all__ = ["build_parser", "config_from_args", "main", "render"]

EXIT_OK = 0
EXIT_UNFINISHED = 1
EXIT_USAGE = 2


def _checked(parse: Callable[[str], float], what: str, *, minimum: float) -> Callable[[str], float]:
    """An argparse type: ``parse`` the text, refuse values below ``minimum``."""

    def convert(text: str) -> float:
        try:
            value = parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{what} must be at least {minimum:g}, got {text!r}")
        return value

    convert.__name__ = what  # argparse names the type in its messages
    return convert


_size = _checked(parse_size, "size", minimum=1)
_rate = _checked(parse_rate, "rate", minimum=1)
_count = _checked(int, "count", minimum=1)
_count0 = _checked(int, "count", minimum=0)
_duration = _checked(parse_duration, "duration", minimum=0)
_timeout = _checked(parse_duration, "duration", minimum=0.001)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction from 0 to 1")
    return value


def _arrival(text: str) -> tuple[str, float]:
    """'burst' or 'poisson:RATE' (arrivals per second)."""
    if text == "burst":
        return ("burst", 0.0)
    kind, _, rate = text.partition(":")
    if kind == "poisson" and rate:
        try:
            value = float(rate)
        except ValueError:
            value = -1.0
        if value > 0 and value != float("inf"):
            return ("poisson", value)
    raise argparse.ArgumentTypeError(
        f"{text!r} is not an arrival process (burst, or poisson:RATE with RATE > 0 per second)"
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dragonfly sim",
        description=(
            "Simulate a swarm downloading one file, driving the real scheduler and piece "
            "picker from a discrete-event loop (virtual time, deterministic for a seed)."
        ),
    )
    p.add_argument("--peers", metavar="N", type=_count, required=True, help="downloading peers (N)")
    p.add_argument("--size", metavar="SIZE", type=_size, required=True, help="file size, e.g. 1GiB")
    p.add_argument(
        "--piece-size",
        metavar="SIZE",
        type=_size,
        help="piece length, e.g. 4MiB (default: the system's rule)",
    )
    p.add_argument(
        "--origin-up", metavar="BW", type=_rate, default=10_000_000, help="origin upload (10MB/s)"
    )
    p.add_argument(
        "--peer-up", metavar="BW", type=_rate, default=10_000_000, help="peer upload (10MB/s)"
    )
    p.add_argument(
        "--peer-down", metavar="BW", type=_rate, help="peer download cap (default: none)"
    )
    p.add_argument(
        "--seed-peers", metavar="M", type=_count0, default=1, help="seed peers (M, default 1)"
    )
    p.add_argument(
        "--arrival",
        metavar="burst|poisson:RATE",
        type=_arrival,
        default=("burst", 0.0),
        help="burst (all at t=0, the default) or poisson:RATE (arrivals per second)",
    )
    p.add_argument(
        "--departures",
        metavar="F",
        type=_fraction,
        default=0.0,
        help="fraction of the peers that leave before they finish (default 0)",
    )
    p.add_argument(
        "--crashes",
        metavar="F",
        type=_fraction,
        default=0.0,
        help="fraction of the peers whose host dies silently before they finish (default 0)",
    )
    p.add_argument("--seed", metavar="S", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the result as JSON")
    knobs = p.add_argument_group("model knobs (defaults: the shipped configuration)")
    peer, sched = PeerConfig(), SchedulerConfig()
    knobs.add_argument(
        "--latency", type=_duration, default=0.001, help="peer-scheduler one-way latency (1ms)"
    )
    knobs.add_argument(
        "--parents",
        type=_count,
        default=sched.scheduling.candidate_parent_limit,
        help="[scheduling] candidate_parent_limit (%(default)s)",
    )
    knobs.add_argument(
        "--concurrent-pieces",
        type=_count,
        default=peer.download.concurrent_piece_count,
        help="[download] concurrent_piece_count (%(default)s)",
    )
    knobs.add_argument(
        "--per-parent",
        type=_count,
        default=2,
        help="piece picker requests per parent (%(default)s)",
    )
    knobs.add_argument(
        "--upload-slots",
        type=_count,
        default=peer.upload.concurrent_limit,
        help="[upload] concurrent_limit (%(default)s)",
    )
    knobs.add_argument(
        "--upload-queue",
        type=_count0,
        default=peer.upload.queue_limit,
        help="[upload] queue_limit (%(default)s)",
    )
    knobs.add_argument(
        "--upload-children",
        type=_count,
        default=peer.upload.children_limit,
        help="[upload] children_limit (%(default)s)",
    )
    knobs.add_argument(
        "--no-stagger",
        action="store_true",
        help="a peer fetching from the origin announces each piece to every child at once",
    )
    knobs.add_argument(
        "--piece-timeout", type=_timeout, default=30.0, help="[download] piece_timeout (30s)"
    )
    knobs.add_argument(
        "--stall-limit",
        type=_timeout,
        default=120.0,
        help="give up when no piece lands for this long (120s)",
    )
    knobs.add_argument(
        "--check-invariants",
        action="store_true",
        help="check the scheduler's bookkeeping on every tick (slow)",
    )
    return p


def config_from_args(args: argparse.Namespace) -> SimConfig:
    """The SimConfig the parsed options describe (ValueError if they are inconsistent)."""
    kind, rate = args.arrival
    piece = args.piece_size if args.piece_size is not None else piece_length_for(args.size)
    return SimConfig(
        peers=args.peers,
        size=args.size,
        piece_size=piece,
        origin_up=args.origin_up,
        peer_up=args.peer_up,
        peer_down=args.peer_down,
        seed_peers=args.seed_peers,
        arrival=kind,
        arrival_rate=rate,
        departures=args.departures,
        crashes=args.crashes,
        seed=args.seed,
        latency=args.latency,
        concurrent_pieces=args.concurrent_pieces,
        per_parent_limit=args.per_parent,
        upload_slots=args.upload_slots,
        upload_queue=args.upload_queue,
        upload_children=args.upload_children,
        stagger=not args.no_stagger,
        piece_timeout=args.piece_timeout,
        stall_limit=args.stall_limit,
        settings=SchedulerSettings(candidate_parent_limit=args.parents, top_up_limit=args.parents),
        check_invariants=args.check_invariants,
    )


def _rate_text(rate: float | None) -> str:
    if rate is None:
        return "unlimited"
    return f"{format_size(int(rate))}/s"


def render(result: SimResult, out: TextIO, *, wall_time: bool = True) -> None:
    """The report; without ``wall_time`` it is a pure function of the configuration."""
    cfg = result.config
    k = result.piece_count
    arrival = (
        "burst (all at t=0)"
        if cfg.arrival == "burst"
        else f"poisson, {cfg.arrival_rate:g}/s (T_all counts from t=0; T_min assumes a burst)"
    )
    t_all = f"{result.t_all:.3f} s" if result.finished == cfg.peers else "-"
    best = 1.0 / result.piece_factor
    origin_ratio = result.origin_bytes / cfg.size
    rows = [
        ("peers", f"{cfg.peers} + {cfg.seed_peers} seed peer(s)"),
        ("file", f"{format_size(cfg.size)} = {k} pieces of {format_size(cfg.piece_size)}"),
        ("origin upload", _rate_text(cfg.origin_up)),
        ("peer upload", _rate_text(cfg.peer_up)),
        ("peer download", _rate_text(cfg.peer_down)),
        ("arrival", arrival),
        ("seed", str(cfg.seed)),
        ("T_min (fluid bound)", f"{result.t_min:.3f} s"),
        ("T_all (last peer done)", t_all),
        ("piece-schedule bound", f"T_min x {result.piece_factor:.3f} (efficiency <= {best:.3f})"),
        (
            "finished",
            f"{result.finished}/{cfg.peers} ({result.failed} failed, {result.departed} left)",
        ),
        (
            "origin bytes",
            f"{result.origin_bytes} ({origin_ratio:.2f} x file; seeds {result.seed_origin_bytes})",
        ),
        ("peer-to-peer bytes", str(result.p2p_bytes)),
        ("cancelled bytes", str(result.wasted_bytes)),
        ("back to source", f"{result.back_to_source_peers} peer(s)"),
        ("reschedules sent", str(result.reschedules)),
        ("piece timeouts", str(result.timeouts)),
        ("scheduler decisions", str(result.counters.get("schedule_decisions", 0))),
        ("scheduler errors", str(result.errors)),
        ("simulated time", f"{result.sim_time:.3f} s"),
        ("events", str(result.events)),
    ]
    width = max(len(name) for name, _ in rows)
    out.write("Dragonfly swarm simulation\n")
    for name, value in rows:
        out.write(f"  {name:<{width}}  {value}\n")
    if result.gave_up:
        out.write(f"  {'incomplete':<{width}}  {result.gave_up}\n")
    pct = result.percentiles()
    if pct:
        head = "".join(f"{'p' + str(p):>9}" for p in pct)
        vals = "".join(f"{v:>9.2f}" for v in pct.values())
        out.write(f"per-peer download time CDF (s, {len(result.durations)} peers)\n")
        out.write(f"  {head}\n  {vals}\n")
    out.write(f"efficiency: {result.efficiency:.3f}\n")
    out.write(f"origin bytes: {result.origin_bytes}\n")
    if wall_time:
        out.write(f"wall time: {result.wall_time:.2f} s\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, simulate, print; see the module docstring for the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 with a message on bad options
    try:
        cfg = config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    result = run_simulation(cfg)
    render(result, sys.stdout)
    if args.json is not None:
        try:
            args.json.write_text(json.dumps(result.as_dict(), indent=2) + "\n")
        except OSError as exc:
            print(f"dragonfly sim: cannot write {args.json}: {exc}", file=sys.stderr)
            return EXIT_UNFINISHED
    return EXIT_OK if result.finished == cfg.peers else EXIT_UNFINISHED

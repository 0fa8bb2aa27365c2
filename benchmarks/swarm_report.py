"""swarm's report: the table `python -m benchmarks swarm` prints after its runs."""

from __future__ import annotations

from benchmarks.swarm_race import Caps, Run
from dragonfly.units import human_bytes

TARGET_EFFICIENCY = 0.85
TARGET_ORIGIN = 1.02


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(caps: Caps, mode: str, runs: list[Run]) -> None:
    f = caps
    down = f"{f.peer_down / 1e6:g} MB/s" if f.peer_down else "none"
    print(
        f"swarm ({mode}): F = {human_bytes(f.size)}, U_o = {f.origin_up / 1e6:g} MB/s, "
        f"U_p = {f.peer_up / 1e6:g} MB/s, D = {down}, M = {f.seed_peers} seed peer(s)"
    )
    heads = f"{'T_all s':>9}{'bound s':>9}{'effic.':>8}{'origin/F':>10}{'p50 s':>8}{'max s':>8}"
    heads += f"{'cpu':>6}"
    print(f"{'N':>3}  {'contender':<11}{heads}")
    for r in runs:
        s = r.summary()
        print(
            f"{r.peers:>3}  {r.contender:<11}{fmt(s['t_all'], '.1f'):>9}{r.bound:>9.1f}"
            f"{fmt(s['efficiency'], '.2f'):>8}{fmt(s['origin_ratio'], '.3f'):>10}"
            f"{fmt(s['p50'], '.1f'):>8}{fmt(s['max'], '.1f'):>8}"
            f"{'-' if r.cpu_busy is None else f'{r.cpu_busy:.0%}':>6}"
        )
        if r.error:
            print(f"     failed: {r.error[:500]}")
    print(f"target: dragonfly efficiency >= {TARGET_EFFICIENCY}, origin <= {TARGET_ORIGIN} × F")
    for r in runs:
        if r.link_tx:
            ups = ", ".join(
                f"{n} {b / f.size:.2f}" for n, b in r.link_tx.items() if b > f.size * 0.01
            )
            print(f"  N={r.peers} {r.contender}: uploaded (wire bytes / F): {ups}")
        if r.cpu_seconds:
            cpus = ", ".join(f"{n} {c:.1f}" for n, c in r.cpu_seconds.items())
            print(f"  N={r.peers} {r.contender}: CPU seconds in the race: {cpus}")
        if r.metrics:
            parts = []
            for n, m in r.metrics.items():
                if m:
                    parts.append(
                        f"{n} up {m['upload'] / f.size:.2f} p2p {m['p2p'] / f.size:.2f}"
                        f" b2s {m['back_to_source'] / f.size:.2f}"
                        f" 503s {m.get('busy', 0):.0f}"
                    )
            print(f"  N={r.peers} dragonfly metrics (/ F): " + "; ".join(parts))

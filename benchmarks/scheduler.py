"""scheduler: one scheduler process under the load of many simulated hosts.

The scheduler runs as it does in production (`python -m dragonfly --role scheduler`,
a subprocess stopped by PID); the load runs in separate processes
(benchmarks/scheduler_load.py, --load-procs of them): --hosts plain hosts and
--seed-hosts seed hosts, each on its own websocket, register peers for --tasks tasks
and report pieces in batches, as fast as they can, for --warmup + --duration seconds.
Every download is a closed loop (register, first answer, report every piece,
PeerFinished, LeavePeer, register again for another task), so the run measures a
steady state in which the scheduler's memory stays bounded.

Figures, over the --duration window after the warm-up:
  registrations/s                    first answers (CandidateParents or NeedBackToSource)
                                     the load received: registrations the scheduler
                                     handled
  piece reports/s                    pieces the load reported in PiecesFinished
  register -> candidates p50/p99     seen by the load: RegisterPeer written to the
                                     socket -> first CandidateParents parsed
  scheduler CPU                      utime + stime from /proc/PID/stat over the window
                                     (100 % = one core: the scheduler is one thread)
  per scheduler CPU-second           the two rates over the scheduler's own CPU time:
                                     what compares on a machine shared with others
  load CPU                           the same for each load process, so a reader sees
                                     which side was saturated
At the end every registration must have had an answer and the scheduler's own totals
(/metrics: registrations, piece reports) must equal what the load sent.

python -m benchmarks scheduler [--duration 30s] [--hosts 1000] [--tasks 100]
    [--seed-hosts 4] [--pieces 64] [--batch 16] [--peers-per-host 1] [--load-procs 1]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import queue
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from benchmarks.common import RESULTS, _pyplot, _save, plot_cdf, rss_anon, write_result
from benchmarks.scheduler_core import run_core
from benchmarks.scheduler_load import BIN
from dragonfly.testing.nginx import free_port
from dragonfly.testing.trust import LocalIssuer
from dragonfly.units import parse_duration

TARGETS = {"registrations/s": 2500.0, "piece reports/s": 100000.0}
METRICS = {
    "registrations": "dragonfly_scheduler_registrations_total",
    "piece_reports": "dragonfly_scheduler_piece_reports_total",
    "schedule_decisions": "dragonfly_scheduler_schedule_decisions_total",
    "back_to_source": "dragonfly_scheduler_back_to_source_decisions_total",
    "triggers": "dragonfly_scheduler_seed_triggers_total",
    "protocol_errors": "dragonfly_scheduler_protocol_errors_total",
    "connected_hosts": "dragonfly_scheduler_connected_hosts",
}
CLK_TCK = os.sysconf("SC_CLK_TCK")
SAMPLE_EVERY = 0.5  # seconds between /proc samples
READY_TIMEOUT = 120.0


class BenchError(Exception):
    pass


# ---------------------------------------------------------------------------
# Looking at processes from outside
# ---------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (fields 14 and 15 of /proc/PID/stat), in seconds."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return float("nan")
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": field 3 onward
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def scrape(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url, timeout=30).read().decode()
    values = dict.fromkeys(METRICS, 0.0)
    names = {v: k for k, v in METRICS.items()}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in names:
            values[names[name]] = float(value)
    return values


@dataclass
class Sample:
    """Every process's CPU time and the scheduler's private memory at one moment."""

    t: float
    cpu: dict[str, float]
    rss: int


@dataclass
class Worker:
    index: int
    process: subprocess.Popen[str]
    lines: queue.Queue[str] = field(default_factory=queue.Queue)

    def start_reader(self) -> None:
        def read(out: IO[str]) -> None:
            for line in out:
                self.lines.put(line.rstrip("\n"))
            self.lines.put("")  # EOF

        assert self.process.stdout is not None
        threading.Thread(target=read, args=(self.process.stdout,), daemon=True).start()

    def line(self, deadline: float) -> str:
        try:
            return self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            raise BenchError(f"load worker {self.index} silent until its deadline") from None


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------


def start_scheduler(port: int, log_path: Path, secret_file: Path) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable,
        "-m",
        "dragonfly",
        "--role",
        "scheduler",
        "--set",
        f"server.port={port}",
        "--set",
        "log.format=json",
        "--set",
        f"trust.secret_file={secret_file}",
    ]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise BenchError(f"scheduler exited with {proc.returncode}: see {log_path}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthy", timeout=1) as r:
                if r.status == 200:
                    return proc
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            stop(proc)
            raise BenchError("scheduler not healthy after 30 s")
        time.sleep(0.05)


def stop(proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """SIGTERM by PID, then SIGKILL if it does not go."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def start_workers(
    args: argparse.Namespace, port: int, log_dir: Path, secret_file: Path
) -> list[Worker]:
    workers = []
    for i in range(args.load_procs):
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.scheduler_load",
            f"--port={port}",
            f"--worker={i}",
            f"--workers={args.load_procs}",
            f"--hosts={args.hosts}",
            f"--seed-hosts={args.seed_hosts}",
            f"--tasks={args.tasks}",
            f"--pieces={args.pieces}",
            f"--batch={args.batch}",
            f"--peers-per-host={args.peers_per_host}",
            f"--seed-upload-slots={args.seed_upload_slots}",
            f"--warmup={args.warmup}",
            f"--duration={args.duration}",
            f"--drain={args.drain}",
            f"--rng-seed={args.seed}",
            f"--secret-file={secret_file}",
        ]
        with open(log_dir / f"load-{i}.log", "w") as err:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True
            )
        w = Worker(i, proc)
        w.start_reader()
        workers.append(w)
    return workers


def sample(pids: dict[str, int]) -> Sample:
    # /proc, not /metrics: a scrape waits its turn behind a busy scheduler's hosts
    # (seconds under load), and the window's ends must be exact.
    return Sample(
        time.monotonic(),
        {name: cpu_seconds(pid) for name, pid in pids.items()},
        rss_anon(pids["scheduler"]),
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    log_dir = RESULTS / "scheduler-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    # Identity on, as in any cluster: the load's hosts prove credentials made from it.
    secret_file = LocalIssuer(log_dir / "trust").secret_file
    sched = start_scheduler(port, log_dir / "scheduler.log", secret_file)
    # The PID is for a profiler (py-spy record --pid) and for ps.
    print(f"scheduler pid {sched.pid} on port {port}; logs in {log_dir}", flush=True)
    workers: list[Worker] = []
    try:
        workers = start_workers(args, port, log_dir, secret_file)
        deadline = time.monotonic() + READY_TIMEOUT
        for w in workers:
            line = w.line(deadline)
            if line != "ready":
                raise BenchError(f"load worker {w.index}: {line or 'exited'}; see {log_dir}")
        connected = scrape(url)["connected_hosts"]
        pids = {"scheduler": sched.pid} | {f"load-{w.index}": w.process.pid for w in workers}
        start = time.monotonic() + 0.2
        for w in workers:
            assert w.process.stdin is not None
            w.process.stdin.write(f"go {start!r}\n")
            w.process.stdin.flush()
        # A sample every half second for the time series; the window's ends are two.
        t0, t1 = start + args.warmup, start + args.warmup + args.duration
        steps = int((t1 - start) / SAMPLE_EVERY)
        times = sorted({t0, t1, *(start + SAMPLE_EVERY * k for k in range(steps + 1))})
        samples: list[Sample] = []
        for at in (t for t in times if t <= t1):
            time.sleep(max(0.0, at - time.monotonic()))
            samples.append(sample(pids))
        first = samples[times.index(t0)]
        last = samples[-1]
        results = []
        finish = t1 + args.drain + 30
        for w in workers:
            line = w.line(finish)
            if not line.startswith("{"):
                raise BenchError(f"load worker {w.index}: {line or 'exited'}; see {log_dir}")
            results.append(json.loads(line))
            w.process.wait(timeout=10)
        sent = {k: sum(r["counts"][k] for r in results) for k in ("registrations", "pieces")}
        # The totals must meet what was sent; the scheduler may still be busy with a
        # backlog when the load is done, so give it a moment.
        totals = scrape(url)
        settle = time.monotonic() + 15
        while (
            totals["registrations"] != sent["registrations"]
            or totals["piece_reports"] != sent["pieces"]
        ) and time.monotonic() < settle:
            time.sleep(0.2)
            totals = scrape(url)
    finally:
        for w in workers:
            stop(w.process, timeout=5)
        stop(sched)
    return summarize(args, connected, samples, first, last, results, sent, totals, sched)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    xs = sorted(values)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def _window_sum(results: list[dict[str, Any]], name: str, lo: float, hi: float) -> int:
    """Sum of the load's 0.1 s bins of `name` for [lo, hi) seconds after the start."""
    a, b = round(lo / BIN), round(hi / BIN)
    return sum(sum(r["bins"][name][a:b]) for r in results)


def summarize(
    args: argparse.Namespace,
    connected: float,
    samples: list[Sample],
    first: Sample,
    last: Sample,
    results: list[dict[str, Any]],
    sent: dict[str, int],
    totals: dict[str, float],
    sched: subprocess.Popen[bytes],
) -> dict[str, Any]:
    span = last.t - first.t
    cpu = {k: 100 * (last.cpu[k] - first.cpu[k]) / span for k in first.cpu}
    sched_cpu_s = max(1e-9, last.cpu["scheduler"] - first.cpu["scheduler"])
    counts = {k: sum(r["counts"][k] for r in results) for k in results[0]["counts"]}
    lat_ms = [x * 1000 for r in results for x in r["latencies"]]
    # Registrations the scheduler handled = first answers the load got; the pieces are
    # those reported in the window (sent right after each answer, so at most one
    # download per host is still in flight at the window's end).
    lo, hi = args.warmup, args.warmup + args.duration
    answers = _window_sum(results, "answers", lo, hi)
    pieces = _window_sum(results, "pieces", lo, hi)
    start = samples[0]
    series = []
    for a, b in itertools.pairwise(samples):
        dt = max(1e-9, b.t - a.t)
        t_lo, t_hi = a.t - start.t, b.t - start.t
        series.append(
            {
                "t": round(t_hi, 3),
                "registrations/s": round(_window_sum(results, "answers", t_lo, t_hi) / dt, 1),
                "piece reports/s": round(_window_sum(results, "pieces", t_lo, t_hi) / dt, 1),
                "scheduler CPU %": round(100 * (b.cpu["scheduler"] - a.cpu["scheduler"]) / dt, 1),
                "scheduler RssAnon": b.rss,
            }
        )
    figures = {
        "registrations/s": answers / args.duration,
        "piece reports/s": pieces / args.duration,
        "candidates p50 ms": statistics.median(lat_ms) if lat_ms else float("nan"),
        "candidates p99 ms": percentile(lat_ms, 0.99),
        "candidates max ms": max(lat_ms) if lat_ms else float("nan"),
        "scheduler CPU %": cpu["scheduler"],
        # Per second of the scheduler's own CPU time: on a shared machine where other
        # processes take CPU from the scheduler, this is the figure that compares.
        "registrations per CPU-s": answers / sched_cpu_s,
        "piece reports per CPU-s": pieces / sched_cpu_s,
    }
    keys = (
        "duration warmup hosts seed_hosts tasks pieces batch peers_per_host seed_upload_slots "
        "load_procs seed"
    )
    return {
        "config": {k: getattr(args, k) for k in keys.split()},
        "connected_hosts": connected,
        "window_s": args.duration,
        "figures": figures,
        "targets": TARGETS,
        "window": {
            "answers": answers,
            "pieces": pieces,
            "cpu_percent": cpu,
            "scheduler_cpu_s": sched_cpu_s,
            "latency_samples": len(lat_ms),
        },
        "totals": {"sent": sent, "scheduler": totals, "load": counts},
        "unanswered": sum(r["unanswered"] for r in results),
        "error_samples": [e for r in results for e in r["error_samples"]],
        "unanswered_samples": [e for r in results for e in r["unanswered_samples"]],
        "scheduler_rss": {
            "window_start": first.rss,
            "window_end": last.rss,
            "peak": max(x.rss for x in samples),
        },
        "scheduler_pid": sched.pid,
        "load_pids": [r["pid"] for r in results],
        "scheduler_exit": sched.returncode,
        "problems": problems(results, sent, totals, counts),
        "series": series,
        # The latency distribution as 1,000 quantiles (0.1 % steps), not every sample.
        "latency_quantiles_ms": [round(percentile(lat_ms, i / 1000), 3) for i in range(1001)],
        "latencies_ms": lat_ms,  # dropped before writing the JSON
    }


def plot_series(name: str, result: dict[str, Any]) -> Path:
    """Registrations/s and the scheduler's CPU through the run (the window shaded): a
    steady state looks flat."""
    plt = _pyplot()
    series = result["series"]
    t = [p["t"] for p in series]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(t, [p["registrations/s"] for p in series], color="tab:blue", label="registrations/s")
    ax.set_xlabel("s since the load started")
    ax.set_ylabel("registrations/s")
    ax.set_ylim(bottom=0)
    warmup = result["config"]["warmup"]
    ax.axvspan(warmup, warmup + result["config"]["duration"], color="grey", alpha=0.1)
    cpu = ax.twinx()
    cpu.plot(t, [p["scheduler CPU %"] for p in series], color="tab:red", label="scheduler CPU %")
    cpu.set_ylabel("scheduler CPU %")
    cpu.set_ylim(0, 110)
    fig.legend(loc="lower right", fontsize=8)
    ax.set_title("scheduler benchmark: throughput and CPU (window shaded)")
    ax.grid(alpha=0.3)
    return _save(plt, fig, name)


def problems(
    results: list[dict[str, Any]],
    sent: dict[str, int],
    totals: dict[str, float],
    counts: dict[str, int],
) -> list[str]:
    """What makes the run's figures untrustworthy: lost answers, errors, counts that
    do not add up between what the load sent and what the scheduler counted."""
    out = []
    unanswered = sum(r["unanswered"] for r in results)
    if unanswered:
        out.append(f"{unanswered} registrations never answered")
    answers = counts["candidate_answers"] + counts["back_to_source_answers"]
    if answers + unanswered + counts["task_failed"] != counts["registrations"]:
        out.append(f"{answers} first answers for {counts['registrations']} registrations")
    for key in ("errors", "unexpected", "closed_by_scheduler", "task_failed"):
        if counts[key]:
            out.append(f"{counts[key]} {key.replace('_', ' ')}")
    if totals["registrations"] != sent["registrations"]:
        out.append(
            f"scheduler counted {totals['registrations']:.0f} registrations, "
            f"the load sent {sent['registrations']}"
        )
    if totals["piece_reports"] != sent["pieces"]:
        out.append(
            f"scheduler counted {totals['piece_reports']:.0f} piece reports, "
            f"the load sent {sent['pieces']}"
        )
    if totals["protocol_errors"]:
        out.append(f"{totals['protocol_errors']:.0f} protocol errors on the scheduler")
    return out


def report(result: dict[str, Any]) -> None:
    f, cfg = result["figures"], result["config"]
    print(
        f"scheduler: {cfg['hosts']} hosts + {cfg['seed_hosts']} seed hosts, {cfg['tasks']} tasks "
        f"of {cfg['pieces']} pieces (batches of {cfg['batch']}), {cfg['load_procs']} load "
        f"process(es), window {result['window_s']:.1f} s after {cfg['warmup']} s warm-up"
    )
    rows = [
        ("registrations/s", f"{f['registrations/s']:,.0f}", f"≥ {TARGETS['registrations/s']:,.0f}"),
        ("piece reports/s", f"{f['piece reports/s']:,.0f}", f"≥ {TARGETS['piece reports/s']:,.0f}"),
        ("register → candidates p50", f"{f['candidates p50 ms']:.1f} ms", ""),
        ("register → candidates p99", f"{f['candidates p99 ms']:.1f} ms", ""),
        ("scheduler CPU", f"{f['scheduler CPU %']:.0f} %", "100 % = one core"),
        ("registrations per CPU-s", f"{f['registrations per CPU-s']:,.0f}", "of the scheduler"),
        ("piece reports per CPU-s", f"{f['piece reports per CPU-s']:,.0f}", ""),
    ]
    for name, value in result["window"]["cpu_percent"].items():
        if name != "scheduler":
            rows.append((f"{name} CPU", f"{value:.0f} %", ""))
    rss = result["scheduler_rss"]
    rows.append(
        (
            "scheduler RssAnon",
            f"{rss['window_start'] / 2**20:.0f} → {rss['window_end'] / 2**20:.0f} MiB",
            f"peak {rss['peak'] / 2**20:.0f} MiB",
        )
    )
    width = max(len(r[0]) for r in rows)
    for name, value, note in rows:
        print(f"  {name:<{width}}  {value:>16}  {note}")
    t = result["totals"]
    print(
        f"  totals: scheduler counted {t['scheduler']['registrations']:.0f} registrations and "
        f"{t['scheduler']['piece_reports']:.0f} piece reports; the load sent "
        f"{t['sent']['registrations']} and {t['sent']['pieces']}; "
        f"unanswered {result['unanswered']}, errors {t['load']['errors']}"
    )
    load = t["load"]
    print(
        f"  per registration: {load['pieces_messages'] / max(1, load['registrations']):.1f} "
        f"PiecesFinished sent; {load['parent_updates'] / max(1, load['registrations']):.1f} "
        f"parent updates and {load['piece_digests'] / max(1, load['registrations']):.1f} "
        "PieceDigests received"
    )
    for problem in result["problems"]:
        print(f"  PROBLEM: {problem}")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks scheduler")
    p.add_argument("--duration", default="30s", help="measured window (after the warm-up)")
    p.add_argument("--warmup", default="3s", help="load before the window opens")
    p.add_argument("--hosts", type=int, default=1000, help="plain simulated hosts")
    p.add_argument("--seed-hosts", type=int, default=4, help="simulated seed hosts")
    p.add_argument("--tasks", type=int, default=100)
    p.add_argument("--pieces", type=int, default=64, help="pieces per task (4 MiB each)")
    p.add_argument("--batch", type=int, default=16, help="pieces per PiecesFinished")
    p.add_argument("--peers-per-host", type=int, default=1, help="downloads at once per host")
    p.add_argument(
        "--seed-upload-slots", type=int, default=1000, help="upload slots a seed host announces"
    )
    p.add_argument(
        "--load-procs",
        type=int,
        default=1,
        help="load generator processes (one was enough: ~30 %% of a core with the scheduler at 100 %%)",
    )
    p.add_argument("--drain", default="60s", help="time for outstanding answers at the end")
    p.add_argument("--seed", type=int, default=1, help="seed of the load's random choices")
    p.add_argument("--name", default="scheduler", help="result file name")
    core = p.add_argument_group("the core alone, in this process (benchmarks/scheduler_core.py)")
    core.add_argument(
        "--core", action="store_true", help="drive the sans-I/O core with the same workload"
    )
    core.add_argument("--codec", action="store_true", help="with --core: through the codec too")
    core.add_argument("--registrations", type=int, default=30000, help="with --core: how many")
    core.add_argument("--profile", default="", help="with --core: write a cProfile here")
    args = p.parse_args(argv)
    args.duration = parse_duration(args.duration)
    args.warmup = parse_duration(args.warmup)
    args.drain = parse_duration(args.drain)
    if args.hosts < 1 or args.tasks < 1 or args.pieces < 1 or args.batch < 1:
        p.error("--hosts, --tasks, --pieces and --batch must be at least 1")
    if args.seed_hosts < 1:
        p.error("--seed-hosts must be at least 1 (triggers need a seed)")
    if not 1 <= args.load_procs <= args.hosts:
        p.error("--load-procs must be between 1 and --hosts")
    if args.core:
        result = run_core(args)
        path = write_result(f"{args.name}_core", result)
        print(f"  results: {path}")
        return 0
    try:
        result = run(args)
    except BenchError as exc:
        print(f"scheduler benchmark failed: {exc}", file=sys.stderr)
        return 1
    report(result)
    latencies = result.pop("latencies_ms")
    path = write_result(args.name, result)
    png = plot_cdf(
        args.name,
        {"register → first CandidateParents": latencies},
        xlabel="ms",
        ylabel="fraction of registrations answered",
        title=(
            f"scheduler: {args.hosts} hosts, {args.tasks} tasks, "
            f"{result['figures']['registrations/s']:,.0f} registrations/s"
        ),
    )
    series_png = plot_series(f"{args.name}_series", result)
    print(f"  results: {path}, {png}, {series_png}")
    return 1 if result["problems"] else 0

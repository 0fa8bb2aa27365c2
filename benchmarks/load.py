"""Load: every request through one peer ends with the right bytes or a clear error.

python -m benchmarks load [--bursts 3] [--urls 400] [--concurrency 200] [--size 8MiB]
                          [--hits 10000] [--hit-concurrency 500]

A cluster of one scheduler, one seed peer and one peer; nginx as the origin. What real
clients do to one peer at once, in rounds:

* bursts of cold URLs, many at a time (curl through the proxy, each with --max-time);
* local hits of one file, hundreds at a time (ab -k through the proxy);
* a mix: Range requests, clients killed mid-body, requests with bodies passed through.

After each round the peer's file descriptors, sockets, tasks in progress and memory
(RssAnon) are compared with a baseline taken after a warm-up: nothing may be left behind.
The small form runs in `make test` (tests/load/test_load.py); this module's defaults are
the large form (`make bench`), the issue's own scenario: 400 different 8 MiB URLs, 200 at
a time.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import one_peer_cluster, rss_anon, write_result
from dragonfly.cluster import Cluster
from dragonfly.testing.nginx import Nginx
from dragonfly.testing.probe import metric
from dragonfly.units import parse_size

__all__ = ["Footprint", "Rig", "Round", "burst", "footprint", "local_hits", "mixed", "rig"]

DAV = "location /up/ { dav_methods PUT; create_full_put_path on; client_max_body_size 0; }"


@dataclass
class Round:
    """One round of requests and how they ended."""

    name: str
    count: int
    concurrency: int
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    wall: float = 0.0

    @property
    def max_time(self) -> float:
        return max(self.times, default=0.0)

    def line(self) -> str:
        return (
            f"{self.name:<24} {self.count:>6} at {self.concurrency:>4}: {self.ok} ok, "
            f"{len(self.failures)} failed, max {self.max_time:.2f} s per request, "
            f"wall {self.wall:.1f} s"
        )


@dataclass(frozen=True)
class Footprint:
    """What a daemon holds: compared before and after the load."""

    fds: int  # other than task files
    sockets: int
    task_files: int  # open task files (the store keeps up to 128 idle ones open)
    tasks: float  # downloads in progress (dragonfly_active_tasks)
    rss_anon: int

    def __str__(self) -> str:
        return (
            f"{self.fds} fds ({self.sockets} sockets) and {self.task_files} task files, "
            f"{self.tasks:g} tasks, RssAnon {self.rss_anon / 2**20:.1f} MiB"
        )


def footprint(pid: int, metrics_url: str) -> Footprint:
    fds = sockets = task_files = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if "/tasks/" in target:
            task_files += 1
            continue
        fds += 1
        sockets += target.startswith("socket:")
    tasks = metric(metrics_url, "dragonfly_active_tasks")
    return Footprint(fds, sockets, task_files, tasks, rss_anon(pid))


@dataclass
class Rig:
    cluster: Cluster
    origin: Nginx
    www: Path
    work: Path
    node: str = "peer-0"  # whose proxy the requests go through

    @property
    def peer(self) -> dict[str, object]:
        return self.cluster.node(self.node).info

    @property
    def proxy(self) -> str:
        return str(self.peer["proxy"])

    @property
    def pid(self) -> int:
        process = self.cluster.node(self.node).process
        assert process is not None
        return process.pid

    def footprint(self) -> Footprint:
        return footprint(self.pid, str(self.peer["metrics"]))

    def settled(self, baseline: Footprint, timeout: float = 60.0) -> Footprint:
        """The footprint once the downloads ended and connections closed (or the last)."""
        deadline = time.monotonic() + timeout
        while True:
            now = self.footprint()
            calm = now.tasks == 0 and now.fds <= baseline.fds + 2
            if calm or time.monotonic() > deadline:
                return now
            time.sleep(0.25)


@contextmanager
def rig(work: Path, workers: int = 0) -> Iterator[Rig]:
    """An origin and a cluster whose peer runs `workers` proxy workers."""
    www = work / "www"
    www.mkdir(parents=True, exist_ok=True)
    with (
        Nginx(root=www, workdir=work / "nginx", extra_server_conf=DAV) as origin,
        one_peer_cluster(work, workers) as cluster,
    ):
        yield Rig(cluster, origin, www, work)


def make_files(www: Path, prefix: str, count: int, size: int) -> dict[str, str]:
    """`count` files of random bytes: name -> sha256."""
    out = {}
    for i in range(count):
        data = os.urandom(size)
        name = f"{prefix}-{i:05d}.bin"
        (www / name).write_bytes(data)
        out[name] = hashlib.sha256(data).hexdigest()
    return out


def burst(rig: Rig, files: dict[str, str], concurrency: int, max_time: float, name: str) -> Round:
    """Every file once, cold, `concurrency` at a time; each checked against its sha256."""
    out_dir = rig.work / f"out-{name}"
    out_dir.mkdir(exist_ok=True)
    jobs = []
    for fname in files:
        url = f"{rig.origin.url}/{fname}"
        jobs.append((url, out_dir / fname, ["-x", rig.proxy]))
    started = time.monotonic()
    results = _run_plain_curls(jobs, concurrency, max_time)
    result = Round(name, len(files), concurrency, wall=time.monotonic() - started)
    for (url, out, _), (rc, seconds, message) in zip(jobs, results, strict=True):
        result.times.append(seconds)
        fname = url.rsplit("/", 1)[1]
        if rc != 0:
            result.failures.append(f"{fname}: curl exit {rc}: {message}")
        elif hashlib.sha256(out.read_bytes()).hexdigest() != files[fname]:
            result.failures.append(f"{fname}: wrong bytes")
        else:
            result.ok += 1
        out.unlink(missing_ok=True)
    return result


def _run_plain_curls(
    jobs: list[tuple[str, Path, list[str]]], concurrency: int, max_time: float
) -> list[tuple[int, float, str]]:
    """curl jobs, `concurrency` at a time: per job (exit code, seconds, last error line)."""

    def one(job: tuple[str, Path, list[str]]) -> tuple[int, float, str]:
        url, out, extra = job
        started = time.monotonic()
        proc = subprocess.run(
            ["curl", "-sS", "-f", "--max-time", str(max_time), "-o", str(out), *extra, url],
            capture_output=True,
            text=True,
        )
        message = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
        return proc.returncode, time.monotonic() - started, message

    with concurrent.futures.ThreadPoolExecutor(max_workers=concurrency) as pool:
        return list(pool.map(one, jobs))


def local_hits(rig: Rig, name: str, sha: str, count: int, concurrency: int) -> Round:
    """`count` requests of one held file, `concurrency` at a time (ab -k), then one curl
    to check the bytes."""
    url = f"{rig.origin.url}/{name}"
    started = time.monotonic()
    proc = subprocess.run(
        ["ab", "-q", "-k", "-n", str(count), "-c", str(concurrency), "-s", "60",
         "-X", rig.proxy.split("//", 1)[1], url],
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    wall = time.monotonic() - started
    result = Round("local hits", count, concurrency, wall=wall)
    done = _ab_field(proc.stdout, r"Complete requests:\s+(\d+)")
    failed = _ab_field(proc.stdout, r"Failed requests:\s+(\d+)")
    non2xx = _ab_field(proc.stdout, r"Non-2xx responses:\s+(\d+)")
    longest = _ab_field(proc.stdout, r"100%\s+(\d+)")
    result.ok = int(done - failed - non2xx)
    if proc.returncode != 0 or done != count or failed or non2xx:
        result.failures.append(
            f"ab exit {proc.returncode}: {done:g} done, {failed:g} failed, {non2xx:g} non-2xx; "
            + proc.stderr.strip()[-300:]
        )
    result.times.append(longest / 1000)
    rate = _ab_field(proc.stdout, r"Requests per second:\s+([\d.]+)")
    result.name = f"local hits ({rate:.0f}/s)"
    check = rig.work / "hit.bin"
    subprocess.run(["curl", "-sS", "-f", "-x", rig.proxy, "-o", str(check), url], check=True)
    if hashlib.sha256(check.read_bytes()).hexdigest() != sha:
        result.failures.append("a local hit returned the wrong bytes")
    return result


def _ab_field(text: str, pattern: str) -> float:
    m = re.search(pattern, text)
    return float(m.group(1)) if m else 0.0


def mixed(rig: Rig, files: dict[str, str], concurrency: int, max_time: float) -> Round:
    """Ranges, clients killed mid-body and bodies passed through, all at once."""
    names = list(files)
    result = Round("mixed", 0, concurrency)
    started = time.monotonic()

    def ranged(fname: str) -> str | None:
        size = (rig.www / fname).stat().st_size
        lo, hi = size // 3, size // 3 + size // 4
        proc = subprocess.run(
            ["curl", "-sS", "-f", "--max-time", str(max_time), "-x", rig.proxy,
             "-r", f"{lo}-{hi}", f"{rig.origin.url}/{fname}"],
            capture_output=True,
        )  # fmt: skip
        want = (rig.www / fname).read_bytes()[lo : hi + 1]
        return None if proc.returncode == 0 and proc.stdout == want else f"range of {fname}"

    def aborted(fname: str) -> str | None:
        proc = subprocess.Popen(
            ["curl", "-sS", "--limit-rate", "100k", "-x", rig.proxy, "-o", os.devnull,
             f"{rig.origin.url}/{fname}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(0.3)
        proc.kill()
        proc.wait()
        return None

    def upload(i: int) -> str | None:
        body = os.urandom(256 * 1024)
        path = rig.work / f"up-{i}.bin"
        path.write_bytes(body)
        url = f"{rig.origin.url}/up/u{i}.bin"
        proc = subprocess.run(
            ["curl", "-sS", "-f", "--max-time", str(max_time), "-x", rig.proxy, "-T", str(path),
             url],
            capture_output=True,
        )  # fmt: skip
        path.unlink()
        stored = rig.www / "up" / f"u{i}.bin"
        ok = proc.returncode == 0 and stored.exists() and stored.read_bytes() == body
        return None if ok else f"upload {i}: {proc.stderr.decode(errors='replace')[-200:]}"

    work = []
    for i, fname in enumerate(names):
        work.append(
            (ranged, fname) if i % 3 == 0 else (aborted, fname) if i % 3 == 1 else (upload, i)
        )

    def timed(job: tuple[Callable[[Any], str | None], Any]) -> str | None:
        began = time.monotonic()
        try:
            return job[0](job[1])
        finally:
            result.times.append(time.monotonic() - began)  # (list.append: thread-safe)

    with concurrent.futures.ThreadPoolExecutor(max_workers=concurrency) as pool:
        outcomes = list(pool.map(timed, work))
    result.count = len(work)
    result.failures = [o for o in outcomes if o]
    result.ok = result.count - len(result.failures)
    result.wall = time.monotonic() - started
    return result


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks load", description=__doc__)
    p.add_argument("--bursts", type=int, default=3)
    p.add_argument("--urls", type=int, default=400, help="cold URLs per burst (400)")
    p.add_argument("--concurrency", type=int, default=200, help="curls at once (200)")
    p.add_argument("--size", type=parse_size, default=8 << 20, help="file size (8MiB)")
    p.add_argument("--hits", type=int, default=10000)
    p.add_argument("--hit-concurrency", type=int, default=500)
    p.add_argument("--max-time", type=float, default=120.0, help="curl --max-time (120 s)")
    p.add_argument("--workers", type=int, default=0, help="the peer's proxy.workers (0)")
    args = p.parse_args(argv)
    with (
        tempfile.TemporaryDirectory(prefix="dragonfly-load-") as tmp,
        rig(Path(tmp), args.workers) as r,
    ):
        rounds, footprints = run(r, args)
    for one in rounds:
        print(one.line())
        for failure in one.failures[:10]:
            print(f"    {failure}")
    for label, fp in footprints:
        print(f"{label:<24} {fp}")
    failed = sum(len(one.failures) for one in rounds)
    write_result(
        "load",
        {
            "rounds": [
                {
                    "name": o.name,
                    "count": o.count,
                    "concurrency": o.concurrency,
                    "ok": o.ok,
                    "failed": len(o.failures),
                    "max_time": o.max_time,
                    "wall": o.wall,
                }
                for o in rounds
            ],
            "footprints": {label: vars(fp) for label, fp in footprints},
        },
    )
    return 1 if failed else 0


def run(r: Rig, args: argparse.Namespace) -> tuple[list[Round], list[tuple[str, Footprint]]]:
    warm = make_files(r.www, "warm", 10, args.size)
    burst(r, warm, 10, args.max_time, "warm-up")
    baseline = r.settled(r.footprint())
    footprints = [("baseline", baseline)]
    rounds = []
    for b in range(args.bursts):
        files = make_files(r.www, f"burst{b}", args.urls, args.size)
        rounds.append(burst(r, files, args.concurrency, args.max_time, f"cold burst {b + 1}"))
        for fname in files:
            (r.www / fname).unlink()
    hit = make_files(r.www, "hit", 1, 100 * 1024)
    ((name, sha),) = hit.items()
    burst(r, hit, 1, args.max_time, "hit warm-up")
    rounds.append(local_hits(r, name, sha, args.hits, args.hit_concurrency))
    mix = make_files(r.www, "mix", max(30, args.urls // 4), args.size)
    rounds.append(mixed(r, mix, min(args.concurrency, 60), args.max_time))
    footprints.append(("after", r.settled(baseline)))
    return rounds, footprints


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

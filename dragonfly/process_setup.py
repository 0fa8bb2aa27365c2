"""Process-wide settings of the long-running roles (scheduler, peer, proxy worker).

The cyclic garbage collector's thresholds: the defaults (700, 10, 10) made a busy
scheduler spend ~13 % of its CPU in collections (a full one every few seconds, ~150 ms
each, while its hosts, tasks and caches grow); its objects are freed by reference
counting, cycles are rare. With these it spent ~6 % and handled ~12 % more registrations
per CPU-second (benchmarks/scheduler.py's workload, in-process, 2 runs each). A peer
answering many small requests allocates a few dozen objects per request, and is tuned
the same way.

The descriptor limit: a daemon serves up to max_connections clients (1024 by default)
besides its task files, sockets to peers and schedulers, and the descriptors a proxy
worker is passed; the usual soft limit (1024) would run out first, so the soft limit is
raised to the hard one.
"""

from __future__ import annotations

import contextlib
import gc
import resource

GC_THRESHOLDS = (20_000, 20, 50)


def tune_process() -> None:
    gc.set_threshold(*GC_THRESHOLDS)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):  # (as much as the system allows)
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))

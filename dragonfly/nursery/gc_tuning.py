"""The cyclic garbage collector's thresholds for the long-running roles.

The defaults (700, 10, 10) made a busy scheduler spend ~13 % of its CPU in collections
(a full one every few seconds, ~150 ms each, while its hosts, tasks and caches grow);
its objects are freed by reference counting, cycles are rare. With these it spent ~6 %
and handled ~12 % more registrations per CPU-second (benchmarks/scheduler.py's
workload, in-process, 2 runs each). A peer answering many small requests allocates a
few dozen objects per request, and is tuned the same way.
"""

from __future__ import annotations

import gc

GC_THRESHOLDS = (20_000, 20, 50)


def tune_gc() -> None:
    gc.set_threshold(*GC_THRESHOLDS)

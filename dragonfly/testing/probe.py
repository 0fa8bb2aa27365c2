"""Looking at a running cluster from outside: Prometheus samples and file digests."""

from __future__ import annotations

import hashlib
import re
import ssl
import urllib.request
from pathlib import Path


def metric(url: str, name: str, labels: str = "", *, ca_file: str | None = None) -> float:
    """One sample from a Prometheus text endpoint, e.g. metric(u, "x_total", 'source="p2p"');
    0 when absent. An https URL (a TLS cluster's) is verified with `ca_file`."""
    context = ssl.create_default_context(cafile=ca_file) if ca_file else None
    text = urllib.request.urlopen(url, timeout=5, context=context).read().decode()
    selector = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else "")
    m = re.search("^" + selector + r" ([0-9.e+]+)$", text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()

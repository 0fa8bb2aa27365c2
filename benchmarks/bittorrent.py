"""The BitTorrent reference: bencoding, a .torrent writer, opentracker and aria2c commands.

No new dependency: a single-file torrent is a few lines of bencoding, and the swarm is
Debian's opentracker (whitelist-only build: it serves only the info-hashes written to
its whitelist, and drops root for `nobody` itself) with aria2c seeders and leechers,
tracker only (no DHT, no local peer discovery, no peer exchange).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

PIECE_LENGTH = 4 * 1024 * 1024

Bencodable = int | bytes | str | list[Any] | dict[Any, Any]


def bencode(value: Bencodable) -> bytes:
    """BEP 3 bencoding; dictionary keys sorted as raw byte strings."""
    if isinstance(value, bool):
        raise TypeError("booleans have no bencoding")
    if isinstance(value, int):
        return b"i%de" % value
    if isinstance(value, str):
        value = value.encode()
    if isinstance(value, bytes):
        return b"%d:%s" % (len(value), value)
    if isinstance(value, list):
        return b"l" + b"".join(bencode(v) for v in value) + b"e"
    if isinstance(value, dict):
        items = sorted((k.encode() if isinstance(k, str) else k, v) for k, v in value.items())
        return b"d" + b"".join(bencode(k) + bencode(v) for k, v in items) + b"e"
    raise TypeError(f"cannot bencode {type(value).__name__}")


def make_torrent(path: Path, announce: str, piece_length: int = PIECE_LENGTH) -> tuple[bytes, str]:
    """A single-file .torrent for `path` and its info-hash (hex, lowercase)."""
    pieces = bytearray()
    with open(path, "rb") as f:
        while chunk := f.read(piece_length):
            pieces += hashlib.sha1(chunk).digest()
    info = {
        "length": path.stat().st_size,
        "name": path.name,
        "piece length": piece_length,
        "pieces": bytes(pieces),
    }
    torrent = bencode({"announce": announce, "info": info})
    return torrent, hashlib.sha1(bencode(info)).hexdigest()


def opentracker_argv(addr: str, port: int, root: Path, whitelist_name: str) -> list[str]:
    """opentracker on addr:port (TCP and UDP), chrooted into `root`, whose whitelist file
    must lie inside it. As root it changes to `nobody` itself (it refuses to stay root)."""
    binary = shutil.which("opentracker") or "/usr/bin/opentracker"
    argv = [binary, "-i", addr, "-p", str(port), "-P", str(port)]
    argv += ["-d", str(root), "-w", whitelist_name]
    if os.geteuid() == 0:
        argv += ["-u", "nobody"]
    return argv


def scrape_complete(tracker: str, info_hash: str) -> int:
    """Seeders the tracker knows for `info_hash` (its /scrape answer, "complete")."""
    q = urllib.parse.quote(bytes.fromhex(info_hash))
    with urllib.request.urlopen(f"{tracker}/scrape?info_hash={q}", timeout=2) as r:
        body = r.read()
    m = re.search(rb"8:completei(\d+)e", body)
    return int(m.group(1)) if m else 0


def aria2_argv(
    torrent: Path,
    directory: Path,
    *,
    listen_port: int,
    log: Path,
    upload_limit: int = 0,
    download_limit: int = 0,
    rpc_port: int = 0,
    hook: Path | None = None,
    stop_with_pid: int | None = None,
    interface: str = "",
) -> list[str]:
    """aria2c for one torrent: tracker only, seeding until it is stopped (by PID).

    A leecher keeps seeding after it completes, as BitTorrent peers do while the
    others still download; the benchmark stops every aria2c once all have finished.
    `upload_limit` is aria2's own limit (the loopback fallback; in namespaces the
    kernel caps the link instead). `interface`: the address every socket is bound to (in
    the lo-shaped mode, where a node's upload is what leaves from its address)."""
    binary = shutil.which("aria2c") or "/usr/bin/aria2c"
    argv = [
        binary,
        f"--dir={directory}",
        f"--listen-port={listen_port}",
        *([f"--interface={interface}"] if interface else []),
        "--enable-dht=false",
        "--enable-dht6=false",
        "--bt-enable-lpd=false",
        "--enable-peer-exchange=false",
        "--seed-ratio=0.0",  # seed regardless of ratio, until stopped
        "--bt-seed-unverified=false",
        "--check-integrity=true",
        "--file-allocation=none",
        "--disk-cache=0",  # every verified piece is in the file when the hook runs
        "--disable-ipv6=true",
        "--bt-stop-timeout=0",
        "--summary-interval=0",
        "--console-log-level=warn",
        f"--log={log}",
        "--log-level=notice",
        f"--max-overall-upload-limit={upload_limit}",
        f"--max-overall-download-limit={download_limit}",
    ]
    if rpc_port:
        argv += ["--enable-rpc=true", f"--rpc-listen-port={rpc_port}", "--rpc-listen-all=false"]
    if hook is not None:
        argv.append(f"--on-bt-download-complete={hook}")
    if stop_with_pid is not None:
        argv.append(f"--stop-with-process={stop_with_pid}")
    return [*argv, str(torrent)]


# The leecher's completion hook: the time it completed (aria2 verified every piece by
# SHA-1), then the sha256 of the whole file, into FILE.done (written, then renamed).
HOOK_SCRIPT = """#!/bin/sh
t=$(date +%s.%N)
d=$(sha256sum "$3" | cut -d' ' -f1)
echo "$t $d" > "$3.done.tmp" && mv "$3.done.tmp" "$3.done"
"""


def write_hook(path: Path) -> Path:
    path.write_text(HOOK_SCRIPT)
    path.chmod(0o755)
    return path


def read_done(path: Path) -> tuple[float, str] | None:
    """(completion time since the epoch, sha256 hex) from a leecher's .done file."""
    try:
        t, digest = path.read_text().split()
    except (OSError, ValueError):
        return None
    return float(t), digest


def uploaded_bytes(rpc_url: str) -> int:
    """Payload bytes an aria2c has uploaded, summed over its active downloads (RPC)."""
    body = json.dumps(
        {"jsonrpc": "2.0", "id": "b", "method": "aria2.tellActive", "params": [["uploadLength"]]}
    ).encode()
    req = urllib.request.Request(rpc_url, data=body, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r:
        answer = json.loads(r.read())
    return sum(int(d["uploadLength"]) for d in answer.get("result", []))

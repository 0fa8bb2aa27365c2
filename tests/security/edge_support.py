"""What the security tests of the proxy's edges share: an address of this host that is
not loopback (a client from it is an outsider to the proxy), starting a daemon that is
expected to refuse, a process's memory, polling, raw exchanges. (Metrics and curl:
tests/p2p_support.py.)"""

from __future__ import annotations

import ipaddress
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest


def outside_address() -> str:
    """A non-loopback IPv4 address of this host: a client connecting from it is not on
    loopback, as far as the proxy can tell. Skips the test on a host with none."""
    out = subprocess.run(
        ["ip", "-j", "-4", "addr", "show", "scope", "global"],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode == 0:
        for link in json.loads(out.stdout or "[]"):
            for info in link.get("addr_info", []):
                address = info.get("local", "")
                if address and not ipaddress.ip_address(address).is_loopback:
                    return str(address)
    pytest.skip("this host has no non-loopback IPv4 address to play the outsider from")


def run_expecting_refusal(args: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run `python -m dragonfly ARGS`, which should refuse to start; a daemon that starts
    instead is killed (by its PID) after `timeout` and reported as returncode None."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "dragonfly", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(args, proc.returncode, out, err)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        return subprocess.CompletedProcess(args, None, out, err)  # type: ignore[arg-type]


def status_field(pid: int, field: str) -> int:
    """A /proc/PID/status field in kB (VmRSS, VmHWM...)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def raw_exchange(host: str, port: int, data: bytes, *, source: str | None = None) -> bytes:
    """Send `data` on a fresh connection (from `source`), read until the server closes."""
    with socket.create_connection(
        (host, port), timeout=30, source_address=(source, 0) if source else None
    ) as s:
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)

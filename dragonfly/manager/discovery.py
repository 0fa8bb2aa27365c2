"""Which scheduler cluster should serve a host: Dragonfly's ranking, as pure functions.

    score = 0.30 * cidr       the host's IP is in one of the cluster's CIDRs
          + 0.30 * hostname   the host name matches one of its regexes (search)
          + 0.25 * idc        the host's IDC is the cluster's, or one of its "|" parts
          + 0.14 * location   leading "|" levels in common, up to 5, over 5
          + 0.01 * default    the cluster is a default one

Comparisons of IDC and location ignore case; an empty IDC or location on either
side scores 0. Ties go to the lower cluster id, so the answer is stable.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

CIDR_WEIGHT = 0.30
HOSTNAME_WEIGHT = 0.30
IDC_WEIGHT = 0.25
LOCATION_WEIGHT = 0.14
DEFAULT_WEIGHT = 0.01
LOCATION_LEVELS = 5


@dataclass(frozen=True)
class HostQuery:
    """The host asking (its IP as the manager saw it)."""

    ip: str
    hostname: str = ""
    idc: str = ""
    location: str = ""


@dataclass(frozen=True)
class ClusterCandidate:
    cluster_id: int
    idc: str = ""
    location: str = ""
    cidrs: Sequence[str] = field(default_factory=tuple)
    hostnames: Sequence[str] = field(default_factory=tuple)
    is_default: bool = False


@functools.lru_cache(maxsize=1024)
def _network(cidr: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    try:
        return ipaddress.ip_network(cidr, strict=False)
    except ValueError:
        return None


@functools.lru_cache(maxsize=1024)
def _regex(pattern: str) -> re.Pattern[str] | None:
    try:
        return re.compile(pattern)
    except re.error:
        return None


def cidr_score(ip: str, cidrs: Iterable[str]) -> float:
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return 0.0
    for cidr in cidrs:
        network = _network(cidr)
        if network is not None and address.version == network.version and address in network:
            return 1.0
    return 0.0


def hostname_score(hostname: str, patterns: Iterable[str]) -> float:
    if not hostname:
        return 0.0
    for pattern in patterns:
        regex = _regex(pattern)
        if regex is not None and regex.search(hostname):
            return 1.0
    return 0.0


def idc_score(idc: str, cluster_idc: str) -> float:
    if not idc or not cluster_idc:
        return 0.0
    wanted = idc.lower()
    if wanted == cluster_idc.lower():
        return 1.0
    return 1.0 if wanted in (part.lower() for part in cluster_idc.split("|")) else 0.0


def location_score(location: str, cluster_location: str) -> float:
    if not location or not cluster_location:
        return 0.0
    if location.lower() == cluster_location.lower():
        return 1.0
    mine, theirs = location.lower().split("|"), cluster_location.lower().split("|")
    common = 0
    for a, b in zip(mine[:LOCATION_LEVELS], theirs[:LOCATION_LEVELS], strict=False):
        if a != b:
            break
        common += 1
    return common / LOCATION_LEVELS


def score(host: HostQuery, cluster: ClusterCandidate) -> float:
    return (
        CIDR_WEIGHT * cidr_score(host.ip, cluster.cidrs)
        + HOSTNAME_WEIGHT * hostname_score(host.hostname, cluster.hostnames)
        + IDC_WEIGHT * idc_score(host.idc, cluster.idc)
        + LOCATION_WEIGHT * location_score(host.location, cluster.location)
        + DEFAULT_WEIGHT * (1.0 if cluster.is_default else 0.0)
    )


def rank(host: HostQuery, clusters: Iterable[ClusterCandidate]) -> list[ClusterCandidate]:
    """Clusters best first (ties: lower id first)."""
    return sorted(clusters, key=lambda c: (-score(host, c), c.cluster_id))

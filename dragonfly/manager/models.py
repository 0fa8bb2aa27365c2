"""Cluster documents: scopes, limits and block lists, as msgspec Structs.

Bounds are Dragonfly's. Every field has a default, so a stored document written by
an older manager decodes with the new fields filled in. CIDRs and regular
expressions are checked on decode: a bad one is a 422 naming the field, never a
row that breaks discovery or a scheduler later.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any

import msgspec

Text = Annotated[str, msgspec.Meta(max_length=1024)]
Items = Annotated[list[Text], msgspec.Meta(max_length=1000)]
Priority = Annotated[int, msgspec.Meta(ge=0, le=6)]


def _regexes(values: list[str], what: str) -> None:
    for value in values:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"{what}: invalid regular expression {value[:64]!r}: {exc}") from None


class DownloadBlockList(msgspec.Struct, forbid_unknown_fields=False):
    """Downloads refused by schedulers and peers (applied in phase 2)."""

    applications: Items = msgspec.field(default_factory=list)
    urls: Items = msgspec.field(default_factory=list)  # regular expressions
    tags: Items = msgspec.field(default_factory=list)
    priorities: Annotated[list[Priority], msgspec.Meta(max_length=7)] = msgspec.field(
        default_factory=list
    )

    def __post_init__(self) -> None:
        _regexes(self.urls, "urls")


class TaskBlockList(msgspec.Struct):
    download: DownloadBlockList = msgspec.field(default_factory=DownloadBlockList)


class BlockList(msgspec.Struct):
    task: TaskBlockList = msgspec.field(default_factory=TaskBlockList)


class Scopes(msgspec.Struct):
    """Which hosts a cluster serves (discovery ranks clusters by these)."""

    idc: Text = ""  # several IDCs separated by "|"
    location: Text = ""  # "|"-separated levels, e.g. "cn|hangzhou|xihu"
    cidrs: Items = msgspec.field(default_factory=list)
    hostnames: Items = msgspec.field(default_factory=list)  # regular expressions

    def __post_init__(self) -> None:
        for cidr in self.cidrs:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(f"cidrs: invalid CIDR {cidr[:64]!r}") from None
        _regexes(self.hostnames, "hostnames")


class SchedulerClusterConfig(msgspec.Struct):
    candidate_parent_limit: Annotated[int, msgspec.Meta(ge=1, le=20)] = 3
    filter_parent_limit: Annotated[int, msgspec.Meta(ge=10, le=1000)] = 15
    job_rate_limit: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 10


class PeerClusterConfig(msgspec.Struct):
    """A scheduler cluster's `client_config`: what its peers may do."""

    load_limit: Annotated[int, msgspec.Meta(ge=1, le=2000)] = 200
    block_list: BlockList = msgspec.field(default_factory=BlockList)


class SeedClientConfig(msgspec.Struct):
    """A scheduler cluster's `seed_client_config`: what its seed peers may do."""

    block_list: BlockList = msgspec.field(default_factory=BlockList)


class SeedPeerClusterConfig(msgspec.Struct):
    load_limit: Annotated[int, msgspec.Meta(ge=1, le=50_000)] = 2000


class SeedPeerClusterFacadeConfig(msgspec.Struct):
    """/api/v1/clusters' `seed_peer_cluster_config`: the seed peer cluster's load limit
    and the scheduler cluster's seed block list, as one document."""

    load_limit: Annotated[int, msgspec.Meta(ge=1, le=50_000)] = 2000
    block_list: BlockList = msgspec.field(default_factory=BlockList)


def builtins(value: Any) -> Any:
    return msgspec.to_builtins(value)


def stored(kind: type[Any], text: str) -> Any:
    """A stored JSON document as `kind`, missing fields at their defaults."""
    return msgspec.json.decode(text.encode(), type=kind)

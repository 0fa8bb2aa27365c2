"""image_pull: one container image pulled by several clients at once, three ways.

A synthetic image (default 4 uncompressed tar layers, 1 GiB in all, written once as an
OCI layout and reused) is pushed to Debian's docker-registry (distribution 2.8). The
registry sits behind a link capped at --registry-rate (default 100MB/s) in both
directions: it runs in a network namespace of its own (`ip netns exec NS docker-registry
serve CONFIG`), joined to the root namespace by a veth pair with an htb bucket on each
end (benchmarks/netns.py). Everything else (the pull-through cache, the dragonfly
cluster, the clients) stays in the root namespace on loopback, so whatever reaches the
registry crosses the cap, as a real registry sits behind a link slower than the fleet's
aggregate. --registry-rate 0: the registry on 127.0.0.1 as well, no cap (the default
when namespaces are unavailable: not root, or no iproute2). Then, one scenario after
the other, N clients (default 4) run `skopeo copy docker://... dir:OUT` at the same
moment:

  registry direct     every client straight from the registry (the reference)
  pull-through cache  every client from a docker-registry in proxy mode in front of the
                      registry, its cache empty at the start: what a user sets up
                      without dragonfly
  dragonfly mirror    client i through peer i's registry mirror (1 scheduler, 1 seed
                      peer, N peers; the mirror's upstream is the registry)

For each: every pull's wall time (max and median reported: the last client done is
when the fleet can start), the bytes the registry itself served (from its log: blob
GETs), and that multiple of the image's size. Each client's layers are checked against
their digests. Clients name the cache and the peers directly (docker://HOST:PORT/NAME),
not as a registries.conf mirror: a mirror that fails would be hidden by the client's
fallback to the registry (tests/interop checks the registries.conf route).

python -m benchmarks image_pull [--size 1GiB] [--layers 4] [--clients 4]
    [--registry-rate 100MB/s|0]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks import netns
from benchmarks.common import (
    RESULTS,
    MemorySampler,
    median,
    plot_bars,
    print_memory,
    write_result,
)
from dragonfly.cluster import Cluster
from dragonfly.testing.oci_image import OciImage, push, write_oci_layout
from dragonfly.testing.probe import sha256_file
from dragonfly.testing.registry import Registry
from dragonfly.units import human_bytes, parse_rate, parse_size

REFERENCE = "registry direct"
SCENARIOS = (REFERENCE, "pull-through cache", "dragonfly mirror")
NAME = "dragonfly/image-pull"
PULL_TIMEOUT = 1800.0  # one pull; a hung client fails the run instead of stalling it
DEFAULT_RATE = "100MB/s"
REGISTRY_PORT = 5000  # inside the registry's own namespace: nothing else binds there


def skopeo_pull_cmd(source: str, out: Path) -> list[str]:
    """skopeo copy of HOST:PORT/NAME:TAG from a plain-http registry into a dir."""
    return [
        "skopeo",
        "--insecure-policy",
        "copy",
        "--retry-times",
        "0",
        "--src-tls-verify=false",
        "--src-no-creds",
        f"docker://{source}",
        f"dir:{out}",
    ]


def pull_all(sources: list[str], outs: list[Path]) -> list[float]:
    """Start one skopeo per source at the same moment; each one's wall time."""
    for out in outs:
        shutil.rmtree(out, ignore_errors=True)
        out.parent.mkdir(parents=True, exist_ok=True)  # skopeo makes OUT, not its parent
    os.sync()  # the previous scenario's writeback stays off this one's clock
    times = [0.0] * len(sources)
    errors: list[str] = []
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            skopeo_pull_cmd(src, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        for src, out in zip(sources, outs, strict=True)
    ]

    def wait(i: int, proc: subprocess.Popen[bytes]) -> None:
        try:
            _, err = proc.communicate(timeout=PULL_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        times[i] = time.perf_counter() - start
        if proc.returncode != 0:
            errors.append(f"client {i} ({sources[i]}): {err.decode(errors='replace')}")

    threads = [threading.Thread(target=wait, args=(i, p), daemon=True) for i, p in enumerate(procs)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:  # interrupted: no client outlives the run
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if errors:
        raise SystemExit("image_pull: a pull failed:\n" + "\n".join(errors))
    return times


def check_outputs(image: OciImage, outs: list[Path]) -> None:
    """Every client holds every blob with the right digest; then the copies go."""
    for out in outs:
        for blob in image.blobs:
            path = out / blob.hex
            if not path.exists() or sha256_file(path) != blob.hex:
                raise SystemExit(f"image_pull: {path} is missing or has other bytes")
        shutil.rmtree(out)


def run_scenario(
    registry: Registry,
    image: OciImage,
    sources: list[str],
    outs: list[Path],
    topo: netns.Topology | None,
) -> dict[str, Any]:
    """One scenario; `topo`: the registry's capped link, whose bytes are counted too."""

    def link_tx() -> int:
        return topo.link_bytes("registry")[0] if topo else 0

    before = registry.total_blob_bytes()
    tx_before = link_tx()
    times = pull_all(sources, outs)
    served = registry.total_blob_bytes() - before
    result = {
        "seconds": times,
        "max_seconds": max(times),
        "median_seconds": median(times),
        "registry_bytes": served,
        "registry_copies": served / image_bytes(image),
    }
    if topo:  # what crossed the capped link, headers included: the log's cross-check
        result["registry_link_tx_bytes"] = link_tx() - tx_before
    check_outputs(image, outs)
    return result


def image_bytes(image: OciImage) -> int:
    return sum(b.size for b in image.blobs)


def print_table(title: str, results: dict[str, dict[str, Any]]) -> None:
    ref = results[REFERENCE]["max_seconds"]
    print(title)
    print(
        f"{'scenario':<20}{'max s':>9}{'median s':>10}{'ratio':>8}"
        f"{'registry served':>17}{'x image':>9}"
    )
    for name, r in results.items():
        print(
            f"{name:<20}{r['max_seconds']:>9.2f}{r['median_seconds']:>10.2f}"
            f"{ref / r['max_seconds']:>8.2f}{human_bytes(r['registry_bytes']):>17}"
            f"{r['registry_copies']:>9.2f}"
        )
    print(
        "ratio = registry direct's max time / the scenario's (above 1: the fleet is ready sooner)"
    )


def rate_text(rate: int) -> str:
    return f"{rate / 1e6:g} MB/s" if rate else "uncapped (loopback)"


def choose_rate(text: str | None) -> tuple[int, str]:
    """(cap in bytes/s, 0 for none; why): the default cap where namespaces work here,
    loopback where they do not; a cap asked for explicitly must be possible."""
    reason = netns.unavailable()
    if text is None:
        if reason:
            return 0, f"no cap: network namespaces unavailable ({reason})"
        return parse_rate(DEFAULT_RATE), "the default"
    rate = parse_rate(text)
    if rate < 0:
        raise SystemExit("image_pull: --registry-rate must be >= 0")
    if rate and reason:
        raise SystemExit(
            f"image_pull: --registry-rate {text} needs network namespaces: {reason} "
            "(--registry-rate 0: uncapped, on loopback)"
        )
    return rate, "requested"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks image_pull")
    parser.add_argument("--size", default="1GiB", help="bytes in all layers (default 1GiB)")
    parser.add_argument("--layers", type=int, default=4, help="layers (default 4)")
    parser.add_argument("--clients", type=int, default=4, help="clients at once (default 4)")
    parser.add_argument(
        "--registry-rate",
        default=None,
        help=f"cap on the registry's link, each direction (default {DEFAULT_RATE} where "
        "network namespaces work, else 0); 0: uncapped, the registry on loopback",
    )
    args = parser.parse_args(argv)
    size = parse_size(args.size)
    clients = args.clients
    rate, why = choose_rate(args.registry_rate)
    print(f"image_pull: registry link {rate_text(rate)} ({why})", flush=True)
    if rate:
        netns.cleanup_stale()  # what runs killed outright left behind (dead pids only)
    work = RESULTS / "image_pull"
    # The layout is reused while its parameters match; registries and cluster start empty.
    image = write_oci_layout(work / "image", total_size=size, layers=args.layers, seed=1)
    for stale in ("registry", "cache", "cluster", "out"):
        shutil.rmtree(work / stale, ignore_errors=True)
    outs = [work / "out" / f"client-{i}" for i in range(clients)]
    results: dict[str, dict[str, Any]] = {}
    pids: dict[str, int] = {}
    peak: dict[str, int] = {}
    topo = netns.Topology()
    started: list[Registry | Cluster] = []  # stopped again at the end, whatever happened
    interrupted = False
    try:
        with netns.signals_raise():
            if rate:
                topo.tools()
                node = topo.add_root_linked("registry", up=rate, down=rate)
                origin = Registry(
                    work / "registry",
                    host=node.addr,
                    port=REGISTRY_PORT,
                    command_prefix=topo.exec_argv("registry", []),
                    preexec_fn=netns.die_with_parent,  # not left behind by a SIGKILLed run
                )
            else:
                origin = Registry(work / "registry")
            started.append(origin)
            with origin as registry:
                assert registry.process is not None
                pids["registry"] = registry.process.pid
                # The push crosses the cap too (the registry's download direction).
                ref = push(image, registry.address, NAME, timeout=PULL_TIMEOUT).split("/", 1)[1]
                print(
                    f"pushed {human_bytes(image_bytes(image))} ({args.layers} layers) "
                    f"to {registry.url}",
                    flush=True,
                )

                def scenario(name: str, hosts: list[str]) -> None:
                    print(f"{name}: {clients} clients...", flush=True)
                    sources = [f"{h}/{ref}" for h in hosts]
                    results[name] = run_scenario(
                        registry, image, sources, outs, topo if rate else None
                    )
                    print(f"{name}: last client done after {results[name]['max_seconds']:.1f} s")

                scenario(REFERENCE, [registry.address] * clients)
                cache_reg = Registry(work / "cache", proxy_remote=registry.url)
                started.append(cache_reg)
                with cache_reg as cache:
                    assert cache.process is not None
                    pids["pull-through cache"] = cache.process.pid
                    scenario("pull-through cache", [cache.address] * clients)
                shutil.rmtree(work / "cache" / "storage", ignore_errors=True)
                cluster_obj = Cluster(
                    work / "cluster",
                    schedulers=1,
                    seed_peers=1,
                    peers=clients,
                    extra=registry.mirror_options(),
                )
                started.append(cluster_obj)
                with cluster_obj as cluster:
                    sampler = MemorySampler({n.name: n.info["pid"] for n in cluster.nodes})
                    pids.update(sampler.pids)
                    sampler.start()
                    try:
                        hosts = [
                            cluster.node(f"peer-{i}").info["proxy"].removeprefix("http://")
                            for i in range(clients)
                        ]
                        scenario("dragonfly mirror", hosts)
                    finally:
                        sampler.stop()
                    peak = sampler.peak
    except KeyboardInterrupt:
        interrupted = True
    finally:
        with netns.signals_ignored():  # a second Ctrl-C must not cut the teardown short
            for obj in reversed(started):  # a no-op for what its `with` stopped already
                with contextlib.suppress(Exception):
                    obj.stop()
            topo.stop()  # the registry's namespace and both ends of its veth
            # 1 GiB per peer and per registry: keep the logs, drop the bytes.
            shutil.rmtree(work / "cluster" / "data", ignore_errors=True)
            for d in ("registry", "cache"):
                shutil.rmtree(work / d / "storage", ignore_errors=True)
            shutil.rmtree(work / "out", ignore_errors=True)
    if interrupted:
        print("image_pull: interrupted; every process and namespace of the run is gone")
        return 130
    size_text = human_bytes(image_bytes(image))
    title = (
        f"image_pull: {size_text} in {args.layers} layers, {clients} skopeo clients at once, "
        f"registry link {rate_text(rate)}"
    )
    print_table(title, results)
    if rate:
        one = image_bytes(image) / rate
        print(
            f"at the cap one image takes {one:.1f} s to leave the registry, "
            f"{clients} take {clients * one:.1f} s"
        )
    print_memory(peak)
    ref_max = results[REFERENCE]["max_seconds"]
    ratios = {name: ref_max / r["max_seconds"] for name, r in results.items()}
    path = write_result(
        "image_pull",
        {
            "size": size,
            "image_bytes": image_bytes(image),
            "layers": [{"digest": b.digest, "size": b.size} for b in image.layers],
            "clients": clients,
            "registry_rate": rate,
            "mode": "netns" if rate else "loopback",
            "reference": REFERENCE,
            "scenarios": results,
            "ratios_max": ratios,
            "peak_rss_anon": peak,
            "pids": pids,
            "run_id": topo.run_id,
        },
    )
    png = plot_bars(
        "image_pull",
        {name: r["max_seconds"] for name, r in results.items()},
        ylabel="seconds until the last client is done",
        title=f"image_pull, {size_text}, {clients} clients, registry {rate_text(rate)}",
    )
    print(f"wrote {path} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

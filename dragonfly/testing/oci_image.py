"""A synthetic container image as an OCI image layout, and pushing it with skopeo.

The layers are real (uncompressed) tar archives, because podman and containerd unpack
or at least inspect what they pull; their files hold pseudo-random bytes from a seed, so
the same arguments always give the same digests (a benchmark can reuse a layout it wrote
before). Layout: DIR/oci-layout, DIR/index.json, DIR/blobs/sha256/<hex>.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from dragonfly.wire.oci import go_arch

LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
INDEX_TYPE = "application/vnd.oci.image.index.v1+json"

_CHUNK = 64 * 1024  # Random.randbytes is fastest in chunks of about this size
# A fixed mtime: tar headers then depend on the seed and sizes only.
_MTIME = 1_700_000_000


@dataclass(frozen=True)
class Blob:
    digest: str  # "sha256:<hex>"
    size: int
    media_type: str

    @property
    def hex(self) -> str:
        return self.digest.removeprefix("sha256:")


@dataclass(frozen=True)
class OciImage:
    """What write_oci_layout wrote: the layout directory, its tag and its blobs."""

    path: Path
    tag: str
    layers: tuple[Blob, ...]
    config: Blob
    manifest: Blob

    @property
    def blobs(self) -> tuple[Blob, ...]:
        """Every blob a pull fetches with GET /v2/NAME/blobs/DIGEST (layers and config)."""
        return (*self.layers, self.config)

    @property
    def layer_bytes(self) -> int:
        return sum(layer.size for layer in self.layers)

    def blob_path(self, blob: Blob) -> Path:
        return self.path / "blobs" / "sha256" / blob.hex

    def oci_ref(self) -> str:
        return f"oci:{self.path}:{self.tag}"


class _RandomReader(io.RawIOBase):
    """`size` pseudo-random bytes from `rng`, read by tarfile.addfile."""

    def __init__(self, rng: random.Random, size: int) -> None:
        self.rng = rng
        self.left = size

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        out = b"".join(self.rng.randbytes(min(_CHUNK, n - i)) for i in range(0, n, _CHUNK))
        self.left -= len(out)
        return out


class _HashingWriter(io.RawIOBase):
    """Writes through to a file, hashing and counting what passes."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.h = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:  # tarfile asks where it starts
        return self.size

    def write(self, b: Any) -> int:
        data = bytes(b)
        self.h.update(data)
        self.size += len(data)
        self.f.write(data)
        return len(data)


def _store(blobs: Path, data: bytes, media_type: str) -> Blob:
    hexd = hashlib.sha256(data).hexdigest()
    (blobs / hexd).write_bytes(data)
    return Blob(f"sha256:{hexd}", len(data), media_type)


def _write_layer(blobs: Path, index: int, size: int, rng: random.Random) -> Blob:
    """A tar with one directory and one file of `size` random bytes, stored by digest."""
    tmp = blobs / f".layer-{index}.tmp"
    with open(tmp, "wb") as f:
        writer = _HashingWriter(f)
        with tarfile.open(fileobj=writer, mode="w", format=tarfile.PAX_FORMAT) as tar:
            d = tarfile.TarInfo("dragonfly-test")
            d.type, d.mode, d.mtime = tarfile.DIRTYPE, 0o755, _MTIME
            tar.addfile(d)
            info = tarfile.TarInfo(f"dragonfly-test/layer-{index}.bin")
            info.size, info.mode, info.mtime = size, 0o644, _MTIME
            tar.addfile(info, _RandomReader(rng, size))
    hexd = writer.h.hexdigest()
    os.replace(tmp, blobs / hexd)
    return Blob(f"sha256:{hexd}", writer.size, LAYER_TYPE)


def write_oci_layout(
    path: Path, *, total_size: int, layers: int = 3, seed: int = 0, tag: str = "latest"
) -> OciImage:
    """Write an image of `layers` tar layers holding `total_size` random bytes in all.

    The same (total_size, layers, seed, tag) always gives the same digests; an existing
    layout at `path` with exactly those is reused as it is."""
    if layers < 1:
        raise ValueError("an image needs at least one layer")
    params = {"total_size": total_size, "layers": layers, "seed": seed, "tag": tag}
    stamp = path / ".dragonfly-test.json"
    if stamp.exists():
        saved = json.loads(stamp.read_text())
        if saved.get("params") == params:
            image = _from_description(path, saved)
            if all(image.blob_path(b).exists() for b in (*image.blobs, image.manifest)):
                return image
    blobs = path / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    for old in blobs.iterdir():  # a previous image's blobs would only take up space
        old.unlink()
    layer_blobs, config_blob, manifest_blob = _write_image(
        blobs, random.Random(seed), total_size, layers, go_arch()
    )
    index = {
        "schemaVersion": 2,
        "mediaType": INDEX_TYPE,
        "manifests": [
            {
                **_descriptor(manifest_blob),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    (path / "index.json").write_bytes(_json(index))
    (path / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    image = OciImage(path, tag, layer_blobs, config_blob, manifest_blob)
    stamp.write_text(json.dumps({"params": params, **_describe(image)}, indent=1))
    return image


def _write_image(
    blobs: Path, rng: random.Random, total_size: int, layers: int, arch: str
) -> tuple[tuple[Blob, ...], Blob, Blob]:
    """Layers, config and manifest of one image for linux/`arch`, stored by digest."""
    sizes = [total_size // layers + (1 if i < total_size % layers else 0) for i in range(layers)]
    layer_blobs = tuple(_write_layer(blobs, i, size, rng) for i, size in enumerate(sizes))
    # Uncompressed layers: each diff_id is the layer's own digest.
    config = {
        "architecture": arch,
        "os": "linux",
        "created": "2023-11-14T22:13:20Z",
        "config": {"Cmd": ["/bin/true"]},
        "rootfs": {"type": "layers", "diff_ids": [b.digest for b in layer_blobs]},
        "history": [{"created_by": f"dragonfly test layer {i}"} for i in range(layers)],
    }
    config_blob = _store(blobs, _json(config), CONFIG_TYPE)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": _descriptor(config_blob),
        "layers": [_descriptor(b) for b in layer_blobs],
    }
    return layer_blobs, config_blob, _store(blobs, _json(manifest), MANIFEST_TYPE)


@dataclass(frozen=True)
class MultiPlatformImage:
    """An OCI index over one image per platform ("linux/amd64": its OciImage)."""

    path: Path
    tag: str
    images: dict[str, OciImage]
    index: Blob

    def oci_ref(self) -> str:
        return f"oci:{self.path}:{self.tag}"


def write_multi_platform_layout(
    path: Path,
    *,
    arches: tuple[str, ...] = ("amd64", "arm64"),
    total_size: int,
    layers: int = 2,
    seed: int = 0,
    tag: str = "latest",
) -> MultiPlatformImage:
    """An OCI layout whose tag names an image index with one image per linux/ARCH, each
    with its own layers (no layer is shared between platforms)."""
    blobs = path / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    images: dict[str, OciImage] = {}
    entries = []
    for n, arch in enumerate(arches):
        layer_blobs, config, manifest = _write_image(
            blobs, random.Random(seed * 1000 + n), total_size, layers, arch
        )
        images[f"linux/{arch}"] = OciImage(path, tag, layer_blobs, config, manifest)
        entries.append({**_descriptor(manifest), "platform": {"os": "linux", "architecture": arch}})
    index_doc = {"schemaVersion": 2, "mediaType": INDEX_TYPE, "manifests": entries}
    index = _store(blobs, _json(index_doc), INDEX_TYPE)
    top = {
        "schemaVersion": 2,
        "mediaType": INDEX_TYPE,
        "manifests": [
            {**_descriptor(index), "annotations": {"org.opencontainers.image.ref.name": tag}}
        ],
    }
    (path / "index.json").write_bytes(_json(top))
    (path / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return MultiPlatformImage(path, tag, images, index)


def push_all(
    image: MultiPlatformImage, registry: str, name: str, *, creds: str | None = None
) -> str:
    """Push the index and every platform's image (`skopeo copy --all`); "HOST:PORT/NAME:TAG"."""
    ref = f"{registry}/{name}:{image.tag}"
    skopeo_copy(
        image.oci_ref(),
        f"docker://{ref}",
        dest_creds=creds,
        extra=("--all", "--preserve-digests"),
    )
    return ref


def _json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def _descriptor(blob: Blob) -> dict[str, Any]:
    return {"mediaType": blob.media_type, "digest": blob.digest, "size": blob.size}


def _describe(image: OciImage) -> dict[str, Any]:
    return {
        "tag": image.tag,
        "layers": [_descriptor(b) for b in image.layers],
        "config": _descriptor(image.config),
        "manifest": _descriptor(image.manifest),
    }


def _from_description(path: Path, d: dict[str, Any]) -> OciImage:
    def blob(x: dict[str, Any]) -> Blob:
        return Blob(x["digest"], x["size"], x["mediaType"])

    return OciImage(
        path,
        d["tag"],
        tuple(blob(x) for x in d["layers"]),
        blob(d["config"]),
        blob(d["manifest"]),
    )


def skopeo_copy(
    src: str,
    dest: str,
    *,
    src_creds: str | None = None,
    src_authfile: Path | None = None,
    dest_creds: str | None = None,
    registries_conf: Path | None = None,
    tls_verify: bool = False,
    timeout: float = 600,
    extra: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[str]:
    """`skopeo copy SRC DEST`; raises with skopeo's stderr when it fails.

    Plain http registries on loopback: TLS verification is off on both sides unless
    asked (skopeo then speaks http to a registry that answers http). `registries_conf`
    is skopeo's global --registries-conf (hidden in Debian 12's skopeo 1.9, but there;
    that skopeo ignores CONTAINERS_REGISTRIES_CONF, which podman reads)."""
    cmd = ["skopeo", "--insecure-policy"]
    if registries_conf is not None:
        cmd += ["--registries-conf", str(registries_conf)]
    cmd += ["copy", "--retry-times", "0"]
    if not tls_verify:
        if src.startswith("docker://"):
            cmd.append("--src-tls-verify=false")
        if dest.startswith("docker://"):
            cmd.append("--dest-tls-verify=false")
    # containers/image never sends --src-creds to a mirror (they are meant for the
    # registry named in the reference): a mirror's credentials come from an auth file
    # keyed by the mirror's HOST:PORT, as `skopeo login MIRROR` would write it.
    if src_creds:
        cmd += ["--src-creds", src_creds]
    if src_authfile is not None:
        cmd += ["--src-authfile", str(src_authfile)]
    if not src_creds and src_authfile is None and src.startswith("docker://"):
        cmd.append("--src-no-creds")  # never a login from ~/.docker or $XDG_RUNTIME_DIR
    if dest_creds:
        cmd += ["--dest-creds", dest_creds]
    elif dest.startswith("docker://"):
        cmd.append("--dest-no-creds")
    cmd += [*extra, src, dest]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if run.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({run.returncode}):\n{run.stderr}")
    return run


def push(
    image: OciImage, registry: str, name: str, *, creds: str | None = None, timeout: float = 600
) -> str:
    """Push the layout to a plain-http registry at `registry` (HOST:PORT) as NAME:TAG.

    Returns the reference pushed, "HOST:PORT/NAME:TAG"."""
    ref = f"{registry}/{name}:{image.tag}"
    # --preserve-digests: skopeo must not recompress or re-encode the layers.
    skopeo_copy(
        image.oci_ref(),
        f"docker://{ref}",
        dest_creds=creds,
        timeout=timeout,
        extra=("--preserve-digests",),
    )
    return ref

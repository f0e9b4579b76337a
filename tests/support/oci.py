"""Build small OCI/Docker images in Python and push them with raw HTTP.

Independent of ``banger_build`` on purpose: the registry client is tested
against a pusher that shares no code with it. Uploads are monolithic
(``POST /blobs/uploads/`` then ``PUT <location>?digest=``) with the body
streamed from a file object for big blobs.

* ``Entry`` / ``make_layer(entries, compression)``: tar layers from member
  specs (every type, pax headers such as ``SCHILY.xattr.*``), or raw
  ``tarfile.TarInfo`` for hostile cases.
* ``push_image(url, repo, tag, layers, ...)``: config + manifest (OCI or
  Docker v2), optionally one image per platform plus an index / manifest list.
* ``push_layout(url, repo, tag, layout_dir)``: an OCI image layout pushed as-is.
* ``Pusher``: the raw client (basic and bearer auth) for hand-made cases.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import re
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import requests
import zstandard

MTIME = 1_700_000_000
CREATED = "2023-11-14T22:13:20Z"

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"

_KINDS = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "fifo": tarfile.FIFOTYPE,
    "chardev": tarfile.CHRTYPE,
    "blockdev": tarfile.BLKTYPE,
}


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


# ------------------------------------------------------------------- layers


@dataclass(frozen=True)
class Entry:
    """One tar member. ``pax`` values may be bytes (e.g. a security.capability)."""

    kind: str
    name: str
    data: bytes = b""
    mode: int | None = None
    uid: int = 0
    gid: int = 0
    mtime: int = MTIME
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    pax: dict[str, str | bytes] = field(default_factory=dict)
    uname: str = ""
    gname: str = ""

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"unknown entry kind {self.kind!r}")

    @classmethod
    def file(cls, name: str, data: bytes = b"", mode: int = 0o644, **kw: Any) -> Entry:
        return cls("file", name, data, mode, **kw)

    @classmethod
    def dir(cls, name: str, mode: int = 0o755, **kw: Any) -> Entry:
        return cls("dir", name, mode=mode, **kw)

    @classmethod
    def symlink(cls, name: str, target: str, **kw: Any) -> Entry:
        return cls("symlink", name, mode=0o777, linkname=target, **kw)

    @classmethod
    def hardlink(cls, name: str, target: str, **kw: Any) -> Entry:
        return cls("hardlink", name, mode=0o644, linkname=target, **kw)

    @classmethod
    def fifo(cls, name: str, mode: int = 0o644, **kw: Any) -> Entry:
        return cls("fifo", name, mode=mode, **kw)

    @classmethod
    def chardev(cls, name: str, major: int, minor: int, mode: int = 0o666, **kw: Any) -> Entry:
        return cls("chardev", name, mode=mode, devmajor=major, devminor=minor, **kw)

    @classmethod
    def blockdev(cls, name: str, major: int, minor: int, mode: int = 0o660, **kw: Any) -> Entry:
        return cls("blockdev", name, mode=mode, devmajor=major, devminor=minor, **kw)

    @classmethod
    def whiteout(cls, path: str) -> Entry:
        """``a/b`` -> the whiteout file ``a/.wh.b``."""
        head, _, base = path.rstrip("/").rpartition("/")
        return cls.file(f"{head}/.wh.{base}" if head else f".wh.{base}")

    @classmethod
    def opaque(cls, directory: str) -> Entry:
        return cls.file(f"{directory.rstrip('/')}/.wh..wh..opq")

    def tarinfo(self) -> tuple[tarfile.TarInfo, bytes]:
        info = tarfile.TarInfo(self.name)
        info.type = _KINDS[self.kind]
        default = 0o755 if self.kind == "dir" else 0o777 if self.kind == "symlink" else 0o644
        info.mode = self.mode if self.mode is not None else default
        info.uid, info.gid, info.mtime = self.uid, self.gid, self.mtime
        info.uname, info.gname = self.uname, self.gname
        info.linkname = self.linkname
        info.devmajor, info.devminor = self.devmajor, self.devminor
        info.size = len(self.data) if self.kind == "file" else 0
        if self.pax:
            info.pax_headers = {
                k: v.decode("utf-8", "surrogateescape") if isinstance(v, bytes) else v
                for k, v in self.pax.items()
            }
        return info, self.data if self.kind == "file" else b""

    @classmethod
    def xattr(cls, name: str, value: bytes) -> dict[str, str | bytes]:
        """A pax header dict for one xattr: ``{"SCHILY.xattr.<name>": value}``."""
        return {f"SCHILY.xattr.{name}": value}


Member = Entry | tarfile.TarInfo | tuple[tarfile.TarInfo, bytes]


def tar_bytes(entries: Iterable[Member]) -> bytes:
    """An uncompressed PAX tar of ``entries`` (raw TarInfo written as given)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in entries:
            if isinstance(entry, Entry):
                info, data = entry.tarinfo()
            elif isinstance(entry, tarfile.TarInfo):
                info, data = entry, b""
            else:
                info, data = entry
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def compress(raw: bytes, compression: str) -> bytes:
    if compression == "gzip":
        return gzip.compress(raw, compresslevel=6, mtime=0)
    if compression == "zstd":
        return zstandard.ZstdCompressor(level=3).compress(raw)
    if compression == "none":
        return raw
    raise ValueError(f"unknown compression {compression!r}")


def decompress(blob: bytes) -> bytes:
    if blob[:2] == b"\x1f\x8b":
        return gzip.decompress(blob)
    if blob[:4] == b"\x28\xb5\x2f\xfd":
        return zstandard.ZstdDecompressor().decompressobj().decompress(blob)
    return blob


def make_layer(entries: Iterable[Member], compression: str = "gzip") -> bytes:
    return compress(tar_bytes(entries), compression)


def layer_media_type(blob: bytes, media: str = "oci") -> str:
    if blob[:2] == b"\x1f\x8b":
        return OCI_LAYER_GZIP if media == "oci" else DOCKER_LAYER_GZIP
    if blob[:4] == b"\x28\xb5\x2f\xfd":
        return OCI_LAYER_ZSTD  # Docker v2 has no zstd type; OCI's is used in practice
    return OCI_LAYER_TAR if media == "oci" else DOCKER_LAYER_TAR


# --------------------------------------------------------------------- pusher


class PushError(Exception):
    pass


class Pusher:
    """Raw registry HTTP for one repository: basic or bearer auth, monolithic uploads."""

    def __init__(self, url: str, repo: str, auth: tuple[str, str] | None = None) -> None:
        self.url = url.rstrip("/")
        self.repo = repo
        self.auth = auth
        self.session = requests.Session()
        self.session.trust_env = False
        self._authz: str | None = None

    def _token(self, challenge: str) -> str:
        params = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
        realm = params.pop("realm")
        r = self.session.get(realm, params=params, auth=self.auth, timeout=10)
        if r.status_code != 200:
            raise PushError(f"token request failed: HTTP {r.status_code} {r.text[:200]}")
        body = r.json()
        return str(body.get("token") or body["access_token"])

    def request(
        self,
        method: str,
        url: str,
        *,
        data: bytes | BinaryIO | None = None,
        headers: dict[str, str] | None = None,
        ok: Sequence[int] = (200, 201, 202),
    ) -> requests.Response:
        if not url.startswith("http"):
            url = self.url + url
        for attempt in range(2):
            hdrs = dict(headers or {})
            if self._authz:
                hdrs["Authorization"] = self._authz
            if hasattr(data, "seek"):
                data.seek(0)  # type: ignore[union-attr]
            r = self.session.request(method, url, data=data, headers=hdrs, timeout=60)
            if r.status_code == 401 and attempt == 0:
                challenge = r.headers.get("WWW-Authenticate", "")
                if challenge.startswith("Bearer "):
                    self._authz = "Bearer " + self._token(challenge)
                    continue
                if challenge.startswith("Basic ") and self.auth:
                    user, pw = self.auth
                    self._authz = "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()
                    continue
            break
        if r.status_code not in ok:
            raise PushError(f"{method} {url}: HTTP {r.status_code} {r.text[:300]}")
        return r

    def has_blob(self, digest: str) -> bool:
        r = self.request("HEAD", f"/v2/{self.repo}/blobs/{digest}", ok=(200, 404))
        return r.status_code == 200

    def push_blob(self, data: bytes | Path, digest: str | None = None) -> dict[str, Any]:
        """Upload a blob (bytes, or a file streamed from disk); return its descriptor."""
        if isinstance(data, Path):
            size = data.stat().st_size
            if digest is None:
                h = hashlib.sha256()
                with data.open("rb") as f:
                    while chunk := f.read(1 << 20):
                        h.update(chunk)
                digest = "sha256:" + h.hexdigest()
        else:
            size = len(data)
            digest = digest or sha256(data)
        desc = {"digest": digest, "size": size}
        if self.has_blob(digest):
            return desc
        r = self.request("POST", f"/v2/{self.repo}/blobs/uploads/")
        location = r.headers["Location"]
        if not location.startswith("http"):
            location = self.url + location
        sep = "&" if "?" in location else "?"
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        if isinstance(data, Path):
            with data.open("rb") as f:
                self.request("PUT", f"{location}{sep}digest={digest}", data=f, headers=headers)
        else:
            self.request("PUT", f"{location}{sep}digest={digest}", data=data, headers=headers)
        return desc

    def push_manifest(self, ref: str, data: bytes, media_type: str) -> str:
        self.request(
            "PUT",
            f"/v2/{self.repo}/manifests/{ref}",
            data=data,
            headers={"Content-Type": media_type},
        )
        return sha256(data)


# --------------------------------------------------------------------- images


@dataclass(frozen=True)
class PushedImage:
    repo: str
    tag: str
    manifest_digest: str  # the (first) platform image manifest
    index_digest: str | None  # the index / manifest list, when platforms were given
    config_digest: str
    layer_digests: tuple[str, ...]
    manifests: dict[str, str]  # platform -> manifest digest
    manifest_bytes: bytes
    config: dict[str, Any]
    media_types: tuple[str, ...]  # the layers' media types

    @property
    def digest(self) -> str:
        """What the tag points at."""
        return self.index_digest or self.manifest_digest


def make_config(
    layers: Sequence[bytes], platform: str = "linux/amd64", extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    parts = platform.split("/")
    config: dict[str, Any] = {
        "architecture": parts[1],
        "os": parts[0],
        "created": CREATED,
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [sha256(decompress(b)) for b in layers]},
        "history": [{"created": CREATED, "created_by": "tests.support.oci"} for _ in layers],
    }
    if len(parts) == 3:
        config["variant"] = parts[2]
    if extra:
        config.update(extra)
    return config


def push_image(
    registry_url: str,
    repo: str,
    tag: str,
    layers: list[bytes],
    *,
    config: dict[str, Any] | None = None,
    media: str = "oci",
    platforms: list[str] | None = None,
    layer_media_types: list[str] | None = None,
    annotations: dict[str, str] | None = None,
    auth: tuple[str, str] | None = None,
) -> PushedImage:
    """Push ``layers`` as an image tagged ``tag``; with ``platforms`` as an index.

    ``config`` replaces the generated config (per platform, os/architecture
    are still filled in when absent).
    """
    if media not in ("oci", "docker"):
        raise ValueError(f"media must be 'oci' or 'docker', not {media!r}")
    pusher = Pusher(registry_url, repo, auth)
    manifest_type = OCI_MANIFEST if media == "oci" else DOCKER_MANIFEST
    config_type = OCI_CONFIG if media == "oci" else DOCKER_CONFIG
    types = layer_media_types or [layer_media_type(b, media) for b in layers]
    if len(types) != len(layers):
        raise ValueError("layer_media_types must match layers")
    layer_descs = []
    for blob, mt in zip(layers, types, strict=True):
        layer_descs.append({"mediaType": mt, **pusher.push_blob(blob)})

    manifests: dict[str, str] = {}
    index_entries: list[dict[str, Any]] = []
    first: tuple[str, bytes, str, dict[str, Any]] | None = None
    for platform in platforms or ["linux/amd64"]:
        if config is not None:
            cfg = dict(config)
            parts = platform.split("/")
            cfg.setdefault("os", parts[0])
            cfg.setdefault("architecture", parts[1])
        else:
            cfg = make_config(layers, platform)
        config_bytes = canonical(cfg)
        config_desc = {"mediaType": config_type, **pusher.push_blob(config_bytes)}
        manifest: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": manifest_type,
            "config": config_desc,
            "layers": layer_descs,
        }
        if annotations and media == "oci":
            manifest["annotations"] = annotations
        manifest_bytes = json.dumps(manifest, indent=3).encode()  # not canonical on purpose
        ref = tag if platforms is None else sha256(manifest_bytes)
        digest = pusher.push_manifest(ref, manifest_bytes, manifest_type)
        manifests[platform] = digest
        parts = platform.split("/")
        plat = {"architecture": parts[1], "os": parts[0]}
        if len(parts) == 3:
            plat["variant"] = parts[2]
        index_entries.append(
            {
                "mediaType": manifest_type,
                "digest": digest,
                "size": len(manifest_bytes),
                "platform": plat,
            }
        )
        if first is None:
            first = (digest, manifest_bytes, str(config_desc["digest"]), cfg)
    assert first is not None
    index_digest = None
    if platforms is not None:
        index_type = OCI_INDEX if media == "oci" else DOCKER_LIST
        index = {"schemaVersion": 2, "mediaType": index_type, "manifests": index_entries}
        index_digest = pusher.push_manifest(tag, json.dumps(index, indent=2).encode(), index_type)
    return PushedImage(
        repo=repo,
        tag=tag,
        manifest_digest=first[0],
        index_digest=index_digest,
        config_digest=first[2],
        layer_digests=tuple(str(d["digest"]) for d in layer_descs),
        manifests=manifests,
        manifest_bytes=first[1],
        config=first[3],
        media_types=tuple(types),
    )


# --------------------------------------------------------------------- layouts


_MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
_INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)


def _layout_blob(layout: Path, digest: str) -> Path:
    algo, _, hexpart = digest.partition(":")
    return layout / "blobs" / algo / hexpart


def _push_layout_manifest(pusher: Pusher, layout: Path, desc: dict[str, Any], depth: int) -> str:
    """Push the blobs and child manifests of ``desc`` and then ``desc`` by digest."""
    if depth > 4:
        raise PushError("image layout nests indexes too deeply")
    digest = str(desc["digest"])
    data = _layout_blob(layout, digest).read_bytes()
    if sha256(data) != digest:
        raise PushError(f"layout blob {digest} does not match its digest")
    body = json.loads(data)
    media_type = str(desc.get("mediaType") or body.get("mediaType") or "")
    if media_type in _INDEX_TYPES:
        for child in body.get("manifests", []):
            _push_layout_manifest(pusher, layout, child, depth + 1)
    else:
        for blob_desc in [body["config"], *body.get("layers", [])]:
            pusher.push_blob(
                _layout_blob(layout, str(blob_desc["digest"])), str(blob_desc["digest"])
            )
    pusher.push_manifest(digest, data, media_type)
    return media_type


def push_layout(
    registry_url: str,
    repo: str,
    tag: str,
    layout_dir: Path,
    *,
    auth: tuple[str, str] | None = None,
) -> str:
    """Push an OCI image layout (``index.json`` + ``blobs/sha256``) as-is; tag it.

    Every manifest (and its blobs) named by ``index.json`` is pushed by
    digest with its bytes unchanged. ``tag`` then points at the single
    manifest when ``index.json`` names one, else at ``index.json`` itself
    pushed as an image index. Returns the tagged digest.
    """
    layout = Path(layout_dir)
    pusher = Pusher(registry_url, repo, auth)
    index_bytes = (layout / "index.json").read_bytes()
    index = json.loads(index_bytes)
    entries = index.get("manifests", [])
    if not entries:
        raise PushError(f"{layout}/index.json names no manifests")
    media_types = [_push_layout_manifest(pusher, layout, e, 0) for e in entries]
    if len(entries) == 1:
        digest = str(entries[0]["digest"])
        data = _layout_blob(layout, digest).read_bytes()
        pusher.push_manifest(tag, data, media_types[0])
        return digest
    return pusher.push_manifest(tag, index_bytes, OCI_INDEX)

"""A real Debian bookworm test image, built once with debootstrap and cached.

``debian_layout()`` debootstraps a minimal bookworm (systemd-sysv, udev,
iproute2) as root and packs it into an OCI image layout with two gzip layers:

* the lower layer is the debootstrap tree (device nodes, hard links,
  setuid files, root:shadow 0640 /etc/shadow, all as debootstrap made them);
* the upper layer plants the cases a flattener gets wrong (see ``SPECIAL``):
  a whiteout, a whited-out directory, an opaque directory with a new file,
  a setuid-root file, a root-owned 0600 file, a file owned by ids that are
  in no /etc/passwd, a hard link pair and a file with a
  ``security.capability`` xattr.

The layout is cached in
``${BANGER_TEST_CACHE:-/var/cache/banger-build-tests}/debian-<hash16>/layout``
where the hash is the sha256 of this file: edit the file and the image is
rebuilt, otherwise it is reused. Builds happen in a temp dir beside it under
an flock and are renamed into place.

``expected_tree(layout)`` is an oracle independent of ``banger_build``: it
replays the layout's tar layers (oldest first, whiteouts and opaque dirs)
into ``{path: Expected}``, with paths relative to / and without a leading
slash, like ``tests.support.ext4read.read_image`` ("usr/bin/su").

Fixtures: ``debian_oci_layout`` (the layout dir) and ``debian_image`` (the
layout pushed to the session ``registry`` as ``library/debian:bookworm``, so
``--mirror docker.io=<registry.url>`` serves docker.io/library/debian:bookworm).

CLI: ``python -m tests.support.debian build`` prints the layout path;
``python -m tests.support.debian info`` prints build statistics as JSON.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest

SUITE = "bookworm"
INCLUDE = "systemd-sysv,udev,iproute2"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
CACHE_ENV = "BANGER_TEST_CACHE"
DEFAULT_CACHE = "/var/cache/banger-build-tests"
REPO, TAG = "library/debian", "bookworm"
REFERENCE = f"docker.io/{REPO}:{TAG}"

#: mtime of everything the upper layer adds, and the image's creation time.
UPPER_MTIME = 1_700_000_000
CREATED = "2023-11-14T22:13:20Z"  # == UPPER_MTIME
GZIP_LEVEL = 6

MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MT_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
MT_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

# security.capability v2: cap_net_raw (13) permitted + effective.
CAP_NET_RAW_EP = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)


@dataclass(frozen=True)
class Special:
    """Paths the upper layer plants (relative, no leading slash)."""

    whiteout_victim: str = "etc/motd"  # file in the lower, .wh. in the upper
    whiteout_dir: str = "usr/share/doc/sed"  # directory (with a subdir) whited out
    opaque_dir: str = "usr/share/doc/adduser/examples"  # nested lower content, .wh..wh..opq
    opaque_new: str = "usr/share/doc/adduser/examples/banger-opaque.txt"  # only child left
    setuid: str = "usr/local/bin/banger-test-suid"  # root:root 04755
    secret: str = "etc/banger-test-secret"  # root:root 0600
    owned: str = "usr/local/share/banger-test-owned"  # 4242:4343 0640 (no such user)
    hardlink: tuple[str, str] = (
        "usr/local/lib/banger-test/hardlink-a",  # regular file
        "usr/local/lib/banger-test/hardlink-b",  # tar hard link to -a
    )
    capability: str = "usr/local/bin/banger-test-cap"  # security.capability cap_net_raw+ep
    owned_ids: tuple[int, int] = (4242, 4343)


SPECIAL = Special()


# --------------------------------------------------------------------------- cache


def source_hash() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def cache_dir() -> Path:
    root = Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)
    return root / f"debian-{source_hash()[:16]}"


def _layout_ready(layout: Path) -> bool:
    return (layout / "index.json").is_file() and (layout / "oci-layout").is_file()


def debian_layout(*, log: IO[str] | None = None) -> Path:
    """Build (once) or reuse the cached Debian OCI layout; return its directory."""
    base = cache_dir()
    layout = base / "layout"
    if _layout_ready(layout):
        with contextlib.suppress(OSError):
            os.utime(base / "stats.json")  # in use: not pruned
        return layout
    out = log if log is not None else sys.stderr
    base.mkdir(parents=True, exist_ok=True)
    os.chmod(base.parent, 0o755)
    os.chmod(base, 0o755)
    with open(base / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _layout_ready(layout):
            return layout
        for stale in base.glob("build-*"):  # a crashed builder's leftovers
            _remove_tree(stale)
        if os.geteuid() != 0:
            raise RuntimeError(
                f"the Debian test image is not cached at {layout} and building it "
                "(debootstrap) needs root"
            )
        if shutil.which("debootstrap") is None:
            raise RuntimeError("debootstrap is not installed (apt-get install debootstrap)")
        work = Path(tempfile.mkdtemp(prefix="build-", dir=base))
        try:
            rootfs = work / "rootfs"
            mirror = apt_mirror()
            print(f"debian test image: debootstrap {SUITE} from {mirror} ...", file=out, flush=True)
            t0 = time.monotonic()
            debootstrap(rootfs, mirror)
            t1 = time.monotonic()
            normalize_tree(rootfs)
            print("debian test image: packing OCI layout ...", file=out, flush=True)
            stats = pack_layout(rootfs, work / "layout")
            t2 = time.monotonic()
            stats.update(
                debootstrap_seconds=round(t1 - t0, 1),
                pack_seconds=round(t2 - t1, 1),
                mirror=mirror,
                source_hash=source_hash(),
            )
            _chmod_readable(work / "layout")
            os.rename(work / "layout", layout)
            (base / "stats.json").write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")
            os.chmod(base / "stats.json", 0o644)
            print(
                f"debian test image: {layout} ({stats['entries']} entries, "
                f"debootstrap {stats['debootstrap_seconds']} s, pack {stats['pack_seconds']} s)",
                file=out,
                flush=True,
            )
        finally:
            _remove_tree(work)
    _prune(base)
    return layout


def _prune(keep: Path, max_age: float = 3 * 86400) -> None:
    """Drop images of older versions of this file that nobody used for days."""
    for other in keep.parent.glob("debian-*"):
        stats = other / "stats.json"
        if other == keep or other.is_symlink() or not stats.is_file():
            continue
        if time.time() - stats.stat().st_mtime > max_age:
            with contextlib.suppress(OSError, RuntimeError):
                _remove_tree(other)


def build_stats() -> dict[str, Any]:
    path = cache_dir() / "stats.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _chmod_readable(top: Path) -> None:
    for dirpath, _dirs, files in os.walk(top):
        os.chmod(dirpath, 0o755)
        for name in files:
            os.chmod(os.path.join(dirpath, name), 0o644)


def _mounts_under(top: Path) -> list[str]:
    prefix = str(top.resolve()).rstrip("/") + "/"
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")
            if point.startswith(prefix) or point == prefix[:-1]:
                found.append(point)
    return sorted(found, key=len, reverse=True)


def _remove_tree(top: Path) -> None:
    """rm -rf, but never through a mount left behind by a failed debootstrap."""
    if not top.exists():
        return
    for point in _mounts_under(top):
        subprocess.run(["umount", "-l", point], check=False)
    left = _mounts_under(top)
    if left:
        raise RuntimeError(f"refusing to remove {top}: still mounted: {left}")
    shutil.rmtree(top)


# ---------------------------------------------------------------------- debootstrap


def apt_mirror(apt_dir: Path = Path("/etc/apt")) -> str:
    """The Debian mirror apt uses for the main archive (BANGER_DEBIAN_MIRROR wins)."""
    if os.environ.get("BANGER_DEBIAN_MIRROR"):
        return os.environ["BANGER_DEBIAN_MIRROR"]
    candidates: list[str] = []
    sources = sorted((apt_dir / "sources.list.d").glob("*.sources"))
    for path in sources:
        with contextlib.suppress(OSError):
            for stanza in re.split(r"\n\s*\n", path.read_text()):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    if line.startswith("#") or ":" not in line or line[:1].isspace():
                        continue
                    key, _, value = line.partition(":")
                    fields[key.strip().lower()] = value.strip()
                if fields.get("enabled", "yes").lower() == "no":
                    continue
                if "deb" not in fields.get("types", "").split():
                    continue
                if SUITE not in fields.get("suites", "").split():
                    continue
                candidates += fields.get("uris", "").split()
    lists = [apt_dir / "sources.list", *sorted((apt_dir / "sources.list.d").glob("*.list"))]
    for path in lists:
        with contextlib.suppress(OSError):
            for line in path.read_text().splitlines():
                words = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
                if len(words) >= 3 and words[0] == "deb" and words[2] == SUITE:
                    candidates.append(words[1])
    for uri in candidates:
        if uri.startswith(("http://", "https://")):
            return uri.rstrip("/")
    return DEFAULT_MIRROR


def debootstrap(target: Path, mirror: str) -> None:
    cmd = [
        "debootstrap",
        "--variant=minbase",
        f"--include={INCLUDE}",
        SUITE,
        str(target),
        mirror,
    ]
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LC_ALL": "C",
        "DEBIAN_FRONTEND": "noninteractive",
        "HOME": "/root",
    }
    for key in ("http_proxy", "https_proxy", "no_proxy"):
        if key in os.environ:
            env[key] = os.environ[key]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        log = target / "debootstrap" / "debootstrap.log"
        tail = log.read_text(errors="replace")[-4000:] if log.is_file() else ""
        raise RuntimeError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
            f"{proc.stderr[-4000:]}\n{tail}"
        )


def normalize_tree(root: Path) -> None:
    """Drop what is host-specific or only a download cache (like Docker's debian image)."""
    for deb in (root / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()
    for f in (root / "var/cache/apt").glob("*.bin"):
        f.unlink()
    for f in (root / "var/lib/apt/lists").iterdir():
        if f.is_file() and f.name != "lock":
            f.unlink()
    with contextlib.suppress(FileNotFoundError):
        (root / "etc/resolv.conf").unlink()  # the build host's nameserver
    (root / "etc/hostname").write_text("debian\n")
    os.chmod(root / "etc/hostname", 0o644)
    mid = root / "etc/machine-id"  # systemd makes one per VM at first boot
    if mid.exists():
        mid.write_text("")


# ------------------------------------------------------------------------- packing


class _HashingWriter(io.RawIOBase):
    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.sha = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        data = bytes(b)
        self.sha.update(data)
        self.size += len(data)
        self.inner.write(data)
        return len(data)


@dataclass
class LayerEntry:
    info: tarfile.TarInfo
    source: Path | bytes | None = None  # file to copy, or inline bytes


def _sort_key(name: str) -> tuple[bytes, ...]:
    return tuple(os.fsencode(p) for p in name.split("/"))


def _walk(root: Path) -> Iterator[tuple[str, os.stat_result]]:
    """(relative path, lstat) for every entry below root, parents first, byte order."""
    stack = [""]
    while stack:
        rel = stack.pop()
        top = root / rel if rel else root
        names = sorted(os.listdir(top), key=os.fsencode)
        subdirs = []
        for name in names:
            path = f"{rel}/{name}" if rel else name
            st = os.lstat(root / path)
            yield path, st
            if stat.S_ISDIR(st.st_mode):
                subdirs.append(path)
        stack.extend(reversed(subdirs))


def _tree_members(root: Path) -> tuple[list[LayerEntry], dict[str, int]]:
    members: list[LayerEntry] = []
    first_link: dict[tuple[int, int], str] = {}
    counts = {"entries": 0, "hardlinks": 0, "devices": 0, "xattrs": 0, "skipped_sockets": 0}
    for rel, st in _walk(root):
        mode = st.st_mode
        info = tarfile.TarInfo(rel)
        info.mode = stat.S_IMODE(mode)
        info.uid, info.gid = st.st_uid, st.st_gid
        info.uname = info.gname = ""
        info.mtime = int(st.st_mtime)
        source: Path | None = None
        if stat.S_ISSOCK(mode):
            counts["skipped_sockets"] += 1
            continue
        if not stat.S_ISDIR(mode) and st.st_nlink > 1:
            key = (st.st_dev, st.st_ino)
            if key in first_link:
                info.type = tarfile.LNKTYPE
                info.linkname = first_link[key]
                members.append(LayerEntry(info))
                counts["entries"] += 1
                counts["hardlinks"] += 1
                continue
            first_link[key] = rel
        if stat.S_ISREG(mode):
            info.type, info.size, source = tarfile.REGTYPE, st.st_size, root / rel
        elif stat.S_ISDIR(mode):
            info.type = tarfile.DIRTYPE
        elif stat.S_ISLNK(mode):
            info.type, info.linkname = tarfile.SYMTYPE, os.readlink(root / rel)
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            info.type = tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE
            info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
            counts["devices"] += 1
        elif stat.S_ISFIFO(mode):
            info.type = tarfile.FIFOTYPE
        else:
            raise RuntimeError(f"unsupported file type {oct(mode)}: {rel}")
        if not stat.S_ISLNK(mode):
            with contextlib.suppress(OSError):
                cap = os.getxattr(root / rel, "security.capability", follow_symlinks=False)
                info.pax_headers = {
                    "SCHILY.xattr.security.capability": cap.decode("utf-8", "surrogateescape")
                }
                counts["xattrs"] += 1
        members.append(LayerEntry(info, source))
        counts["entries"] += 1
    return members, counts


def _upper_members(root: Path) -> list[LayerEntry]:
    s = SPECIAL
    out: dict[str, LayerEntry] = {}

    def dir_from_lower(rel: str) -> None:
        parts = rel.split("/")
        for i in range(1, len(parts) + 1):
            p = "/".join(parts[:i])
            if p in out:
                continue
            if (root / p).is_dir() and not (root / p).is_symlink():
                st = os.lstat(root / p)
                info = tarfile.TarInfo(p)
                info.type, info.mode = tarfile.DIRTYPE, stat.S_IMODE(st.st_mode)
                info.uid, info.gid, info.mtime = st.st_uid, st.st_gid, int(st.st_mtime)
            else:
                info = tarfile.TarInfo(p)
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                info.uid = info.gid = 0
                info.mtime = UPPER_MTIME
            info.uname = info.gname = ""
            out[p] = LayerEntry(info)

    def add(
        rel: str,
        data: bytes = b"",
        *,
        kind: bytes = tarfile.REGTYPE,
        mode: int = 0o644,
        uid: int = 0,
        gid: int = 0,
        linkname: str = "",
        xattrs: dict[str, bytes] | None = None,
    ) -> None:
        dir_from_lower(rel.rpartition("/")[0])
        info = tarfile.TarInfo(rel)
        info.type, info.mode, info.uid, info.gid = kind, mode, uid, gid
        info.uname = info.gname = ""
        info.mtime = UPPER_MTIME
        info.linkname = linkname
        info.size = len(data) if kind == tarfile.REGTYPE else 0
        if xattrs:
            info.pax_headers = {
                f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape") for k, v in xattrs.items()
            }
        out[rel] = LayerEntry(info, data if kind == tarfile.REGTYPE else None)

    for victim in (s.whiteout_victim, s.whiteout_dir):
        if not (root / victim).exists():
            raise RuntimeError(f"whiteout victim {victim} is not in the debootstrap tree")
        d, _, name = victim.rpartition("/")
        add(f"{d}/.wh.{name}", mode=0o644)
    if not any((root / s.opaque_dir).iterdir()):
        raise RuntimeError(f"opaque dir {s.opaque_dir} is empty in the debootstrap tree")
    dir_from_lower(s.opaque_dir)
    add(f"{s.opaque_dir}/.wh..wh..opq", mode=0o644)
    add(s.opaque_new, b"only this file survives the opaque whiteout\n")
    add(s.setuid, b"#!/bin/sh\necho banger setuid test file\n", mode=0o4755)
    add(s.secret, b"root-only secret of the banger test image\n", mode=0o600)
    add(
        s.owned,
        b"owned by 4242:4343, a user no passwd names\n",
        mode=0o640,
        uid=s.owned_ids[0],
        gid=s.owned_ids[1],
    )
    add(s.hardlink[0], b"one inode, two names\n", mode=0o644)
    add(s.hardlink[1], kind=tarfile.LNKTYPE, mode=0o644, linkname=s.hardlink[0])
    add(
        s.capability,
        b"#!/bin/sh\necho banger capability test file\n",
        mode=0o755,
        xattrs={"security.capability": CAP_NET_RAW_EP},
    )
    return [out[k] for k in sorted(out, key=_sort_key)]


def _write_layer(members: list[LayerEntry], blobs: Path) -> dict[str, Any]:
    """Write one gzip layer blob; return its descriptor plus diff_id and sizes."""
    fd, tmp_name = tempfile.mkstemp(dir=blobs, prefix=".tmp-")
    with os.fdopen(fd, "wb") as raw:
        compressed = _HashingWriter(raw)
        with gzip.GzipFile(
            filename="", mode="wb", fileobj=compressed, compresslevel=GZIP_LEVEL, mtime=0
        ) as gz:
            uncompressed = _HashingWriter(gz)
            with tarfile.open(fileobj=uncompressed, mode="w|", format=tarfile.PAX_FORMAT) as tf:
                for m in members:
                    if isinstance(m.source, Path):
                        with open(m.source, "rb") as f:
                            tf.addfile(m.info, f)
                    elif isinstance(m.source, bytes):
                        tf.addfile(m.info, io.BytesIO(m.source))
                    else:
                        tf.addfile(m.info)
    digest = compressed.sha.hexdigest()
    os.chmod(tmp_name, 0o644)
    os.rename(tmp_name, blobs / digest)
    return {
        "descriptor": {
            "mediaType": MT_LAYER_GZIP,
            "digest": f"sha256:{digest}",
            "size": compressed.size,
        },
        "diff_id": f"sha256:{uncompressed.sha.hexdigest()}",
        "uncompressed_size": uncompressed.size,
    }


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _put_blob(blobs: Path, data: bytes) -> dict[str, Any]:
    digest = hashlib.sha256(data).hexdigest()
    (blobs / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def write_layout(
    layout: Path,
    layers: list[list[LayerEntry]],
    *,
    history: list[str] | None = None,
    tag: str = TAG,
) -> dict[str, Any]:
    """Write an OCI image layout (gzip layers, lowest first); deterministic bytes."""
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    written = [_write_layer(members, blobs) for members in layers]
    history = history or [f"layer {i}" for i in range(len(layers))]
    config = {
        "architecture": "amd64",
        "os": "linux",
        "created": CREATED,
        "config": {
            "Cmd": ["bash"],
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        },
        "rootfs": {"type": "layers", "diff_ids": [w["diff_id"] for w in written]},
        "history": [{"created": CREATED, "created_by": h} for h in history],
    }
    config_desc = {"mediaType": MT_CONFIG, **_put_blob(blobs, _canonical(config))}
    manifest = {
        "schemaVersion": 2,
        "mediaType": MT_MANIFEST,
        "config": config_desc,
        "layers": [w["descriptor"] for w in written],
    }
    manifest_desc = {"mediaType": MT_MANIFEST, **_put_blob(blobs, _canonical(manifest))}
    index = {
        "schemaVersion": 2,
        "mediaType": MT_INDEX,
        "manifests": [
            {
                **manifest_desc,
                "platform": {"architecture": "amd64", "os": "linux"},
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    (layout / "oci-layout").write_bytes(_canonical({"imageLayoutVersion": "1.0.0"}))
    (layout / "index.json").write_bytes(_canonical(index))
    return {
        "manifest_digest": manifest_desc["digest"],
        "layers": [w["descriptor"]["digest"] for w in written],
        "compressed_bytes": sum(w["descriptor"]["size"] for w in written),
        "uncompressed_bytes": sum(w["uncompressed_size"] for w in written),
    }


def pack_layout(root: Path, layout: Path) -> dict[str, Any]:
    """Pack a debootstrap tree into the two-layer test image (lower: the tree,
    upper: the SPECIAL entries)."""
    lower, counts = _tree_members(root)
    upper = _upper_members(root)
    written = write_layout(
        layout,
        [lower, upper],
        history=[
            f"debootstrap --variant=minbase --include={INCLUDE} {SUITE}",
            "banger-build test fixture: whiteouts, opaque dir, setuid, 0600, hard links, xattr",
        ],
    )
    return {**counts, "upper_entries": len(upper), **written}


# -------------------------------------------------------------------- layout reader


def _blob(layout: Path, digest: str) -> Path:
    algo, _, hexa = digest.partition(":")
    return layout / "blobs" / algo / hexa


def read_json_blob(layout: Path, digest: str) -> dict[str, Any]:
    data = _blob(layout, digest).read_bytes()
    if f"sha256:{hashlib.sha256(data).hexdigest()}" != digest:
        raise ValueError(f"blob {digest} in {layout} does not match its digest")
    result: dict[str, Any] = json.loads(data)
    return result


def manifest_digest(layout: Path) -> str:
    """Digest of the linux/amd64 image manifest in the layout."""
    index = json.loads((layout / "index.json").read_text())
    for desc in index["manifests"]:
        if desc["mediaType"] in (
            MT_INDEX,
            "application/vnd.docker.distribution.manifest.list.v2+json",
        ):
            inner = read_json_blob(layout, desc["digest"])
            for d in inner["manifests"]:
                p = d.get("platform", {})
                if p.get("os") == "linux" and p.get("architecture") == "amd64":
                    return str(d["digest"])
        else:
            return str(desc["digest"])
    raise ValueError(f"{layout}: no linux/amd64 manifest")


def read_manifest(layout: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(manifest, config) of the layout's linux/amd64 image."""
    manifest = read_json_blob(layout, manifest_digest(layout))
    return manifest, read_json_blob(layout, manifest["config"]["digest"])


# ------------------------------------------------------------------------- oracle


@dataclass(frozen=True)
class Expected:
    """What one path of the flattened image must look like (from the tar headers)."""

    path: str
    type: str  # "reg", "dir", "symlink", "chr", "blk", "fifo"
    uid: int
    gid: int
    mode: int  # full st_mode, type bits included
    mtime: int
    size: int  # content length (reg), target length (symlink), else 0
    linkname: str | None = None  # symlink target
    sha256: str | None = None  # content of regular files
    hardlink_group: str | None = None  # first path (byte order) of a multi-name inode
    nlink: int = 1  # names sharing the inode (directories: 1)
    rdev: tuple[int, int] | None = None  # (major, minor) of device nodes
    xattrs: dict[str, bytes] = field(default_factory=dict)


_KIND = {
    tarfile.REGTYPE: ("reg", stat.S_IFREG),
    tarfile.AREGTYPE: ("reg", stat.S_IFREG),
    tarfile.CONTTYPE: ("reg", stat.S_IFREG),
    tarfile.DIRTYPE: ("dir", stat.S_IFDIR),
    tarfile.SYMTYPE: ("symlink", stat.S_IFLNK),
    tarfile.CHRTYPE: ("chr", stat.S_IFCHR),
    tarfile.BLKTYPE: ("blk", stat.S_IFBLK),
    tarfile.FIFOTYPE: ("fifo", stat.S_IFIFO),
}


@dataclass
class _Inode:
    type: str
    uid: int
    gid: int
    mode: int
    mtime: int
    size: int = 0
    linkname: str | None = None
    sha256: str | None = None
    rdev: tuple[int, int] | None = None
    xattrs: dict[str, bytes] = field(default_factory=dict)


def _clean(name: str) -> str:
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ValueError(f"layer entry escapes the root: {name!r}")
    return "/".join(parts)


class _HashingReader(io.RawIOBase):
    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.sha = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data: bytes = self.inner.read(n)
        self.sha.update(data)
        return data

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def _open_layer(path: Path, media_type: str) -> Any:
    if media_type.endswith("gzip"):
        return gzip.open(path, "rb")
    if media_type.endswith("zstd"):
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
    if media_type in (MT_LAYER_TAR, "application/vnd.docker.image.rootfs.diff.tar"):
        return open(path, "rb")
    raise ValueError(f"unsupported layer media type {media_type}")


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _remove(state: dict[str, _Inode], path: str, keep: set[str]) -> None:
    node = state.get(path)
    if node is None:  # parents always exist, so nothing can be below it either
        return
    if node.type != "dir":
        if path not in keep:
            del state[path]
        return
    prefix = path + "/" if path else ""
    for p in [p for p in state if (p == path or p.startswith(prefix)) and p not in keep]:
        del state[p]


def _replay(layout: Path) -> dict[str, Expected]:
    manifest, config = read_manifest(layout)
    diff_ids = config.get("rootfs", {}).get("diff_ids", [])
    if len(diff_ids) != len(manifest["layers"]):
        raise ValueError("config diff_ids and manifest layers differ in number")
    state: dict[str, _Inode] = {}
    for desc, diff_id in zip(manifest["layers"], diff_ids, strict=True):
        path = _blob(layout, desc["digest"])
        if f"sha256:{_file_sha256(path)}" != desc["digest"]:
            raise ValueError(f"layer {desc['digest']} does not match its digest")
        added: set[str] = set()
        with _open_layer(path, desc["mediaType"]) as stream:
            reader = _HashingReader(stream)
            with tarfile.open(fileobj=reader, mode="r|") as tf:
                for ti in tf:
                    _apply(state, added, ti, tf)
            reader.drain()
        if f"sha256:{reader.sha.hexdigest()}" != diff_id:
            raise ValueError(f"layer {desc['digest']}: uncompressed digest is not {diff_id}")
    groups: dict[int, list[str]] = {}
    for p, node in state.items():
        groups.setdefault(id(node), []).append(p)
    out: dict[str, Expected] = {}
    for p, node in state.items():
        names = sorted(groups[id(node)], key=os.fsencode)
        multi = len(names) > 1 and node.type != "dir"
        out[p] = Expected(
            path=p,
            type=node.type,
            uid=node.uid,
            gid=node.gid,
            mode=node.mode,
            mtime=node.mtime,
            size=node.size,
            linkname=node.linkname,
            sha256=node.sha256,
            hardlink_group=names[0] if multi else None,
            nlink=len(names) if multi else 1,
            rdev=node.rdev,
            xattrs=dict(node.xattrs),
        )
    return dict(sorted(out.items(), key=lambda kv: _sort_key(kv[0])))


def _apply(
    state: dict[str, _Inode], added: set[str], ti: tarfile.TarInfo, tf: tarfile.TarFile
) -> None:
    path = _clean(ti.name)
    parent, _, base = path.rpartition("/")
    if base == ".wh..wh..opq":
        prefix = parent + "/" if parent else ""
        for p in [p for p in state if p.startswith(prefix) and p != parent and p not in added]:
            del state[p]
        return
    if base.startswith(".wh."):
        victim = f"{parent}/{base[4:]}" if parent else base[4:]
        _remove(state, victim, added)
        return
    # Parents a layer does not declare exist as plain root directories.
    parts = parent.split("/") if parent else []
    for i in range(1, len(parts) + 1):
        p = "/".join(parts[:i])
        if p not in state or state[p].type != "dir":
            _remove(state, p, set())
            state[p] = _Inode("dir", 0, 0, stat.S_IFDIR | 0o755, 0)
    xattrs = {
        k[len("SCHILY.xattr.") :]: v.encode("utf-8", "surrogateescape")
        for k, v in ti.pax_headers.items()
        if k.startswith("SCHILY.xattr.")
    }
    if ti.type == tarfile.LNKTYPE:
        target = _clean(ti.linkname)
        if target not in state or state[target].type == "dir":
            raise ValueError(f"hard link {path!r} -> {ti.linkname!r}: no such file")
        node = state[target]
        if path != target:
            _remove(state, path, set())
            state[path] = node
        added.add(path)
        return
    if ti.type not in _KIND:
        raise ValueError(f"unsupported tar entry type {ti.type!r}: {path!r}")
    kind, fmt = _KIND[ti.type]
    node = _Inode(kind, ti.uid, ti.gid, fmt | (ti.mode & 0o7777), int(ti.mtime), xattrs=xattrs)
    if kind == "reg":
        h = hashlib.sha256()
        f = tf.extractfile(ti)
        assert f is not None
        while chunk := f.read(1 << 20):
            h.update(chunk)
        node.sha256, node.size = h.hexdigest(), ti.size
    elif kind == "symlink":
        node.linkname = ti.linkname
        node.size = len(os.fsencode(ti.linkname))
    elif kind in ("chr", "blk"):
        node.rdev = (ti.devmajor, ti.devminor)
    old = state.get(path)
    if not (old is not None and old.type == "dir" and kind == "dir"):
        _remove(state, path, set())  # replaces a file, or a directory and all below it
    state[path] = node
    added.add(path)


@functools.lru_cache(maxsize=4)
def _replay_cached(layout: str, index_sha: str) -> dict[str, Expected]:
    return _replay(Path(layout))


def expected_tree(layout: Path) -> dict[str, Expected]:
    """Replay the layout's layers into {relative path: Expected} (root itself excluded
    unless a layer names it, as "")."""
    index_sha = hashlib.sha256((Path(layout) / "index.json").read_bytes()).hexdigest()
    return dict(_replay_cached(str(Path(layout).resolve()), index_sha))


def layer_members(layout: Path, index: int) -> list[tarfile.TarInfo]:
    """Headers of the index-th layer (0 = lowest), in tar order."""
    manifest, _ = read_manifest(layout)
    desc = manifest["layers"][index]
    with (
        _open_layer(_blob(layout, desc["digest"]), desc["mediaType"]) as stream,
        tarfile.open(fileobj=stream, mode="r|") as tf,
    ):
        return list(tf)


def image_file(layout: Path, path: str) -> bytes:
    """Content of a regular file of the flattened image, checked against expected_tree()."""
    tree = expected_tree(layout)
    path = _clean(path)
    want = tree.get(path)
    if want is None or want.type != "reg":
        raise FileNotFoundError(path)
    names = {path} | {
        p
        for p, e in tree.items()
        if want.hardlink_group and e.hardlink_group == want.hardlink_group
    }
    manifest, _ = read_manifest(layout)
    for desc in reversed(manifest["layers"]):
        with (
            _open_layer(_blob(layout, desc["digest"]), desc["mediaType"]) as stream,
            tarfile.open(fileobj=stream, mode="r|") as tf,
        ):
            for ti in tf:
                if ti.isreg() and _clean(ti.name) in names:
                    f = tf.extractfile(ti)
                    assert f is not None
                    data = f.read()
                    if hashlib.sha256(data).hexdigest() == want.sha256:
                        return data
    raise FileNotFoundError(f"{path}: content not found in the layers")


def group_id(layout: Path, name: str) -> int:
    """gid of a group per the image's own /etc/group (not the host's)."""
    for line in image_file(layout, "etc/group").decode().splitlines():
        fields = line.split(":")
        if len(fields) >= 3 and fields[0] == name:
            return int(fields[2])
    raise KeyError(f"no group {name!r} in the image's /etc/group")


def user_id(layout: Path, name: str) -> int:
    """uid of a user per the image's own /etc/passwd."""
    for line in image_file(layout, "etc/passwd").decode().splitlines():
        fields = line.split(":")
        if len(fields) >= 3 and fields[0] == name:
            return int(fields[2])
    raise KeyError(f"no user {name!r} in the image's /etc/passwd")


# ---------------------------------------------------------------------- fixtures


@dataclass(frozen=True)
class DebianImage:
    registry: Any  # tests.support.registry's server object (.url, .host)
    digest: str  # manifest digest, "sha256:..."
    layout: Path
    special: Special = SPECIAL
    repository: str = REPO
    tag: str = TAG
    reference: str = REFERENCE  # what recipes name; --mirror docker.io=<url> serves it

    @property
    def mirror(self) -> str:
        """The value for ``--mirror``: ``docker.io=http://127.0.0.1:PORT``."""
        return f"docker.io={self.registry.url}"

    @property
    def pinned_reference(self) -> str:
        return f"{self.reference}@{self.digest}"


def _require_layout() -> Path:
    try:
        return debian_layout()
    except Exception as exc:
        pytest.fail(f"cannot build the Debian test image: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def debian_oci_layout() -> Path:
    """The cached Debian OCI image layout directory (built on first use)."""
    return _require_layout()


@pytest.fixture(scope="session")
def debian_image(registry: Any, debian_oci_layout: Path) -> DebianImage:
    """The Debian image pushed to the session registry as library/debian:bookworm."""
    from tests.support.oci import push_layout

    digest = push_layout(registry.url, REPO, TAG, debian_oci_layout)
    assert digest == manifest_digest(debian_oci_layout), (digest, debian_oci_layout)
    return DebianImage(registry=registry, digest=digest, layout=debian_oci_layout)


# ---------------------------------------------------------------------------- CLI


def main(argv: list[str]) -> int:
    try:
        return _main(argv)
    except (RuntimeError, OSError, ValueError) as exc:
        print(f"tests.support.debian: error: {exc}", file=sys.stderr)
        return 1


def _main(argv: list[str]) -> int:
    cmd = argv[0] if argv else "build"
    if cmd == "build":
        print(debian_layout())
        return 0
    if cmd == "info":
        layout = debian_layout()
        info = {
            "layout": str(layout),
            **build_stats(),
            "manifest_digest": manifest_digest(layout),
            "expected_paths": len(expected_tree(layout)),
        }
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    print("usage: python -m tests.support.debian [build|info]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

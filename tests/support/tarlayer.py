"""Real tar layers on disk (gzip, zstd or plain) as flatten inputs, for unit tests.

Members are built from ``tarfile.TarInfo`` directly, so hostile names
(``..``, newlines, links out of the tree) are as easy to write as good ones.
"""

from __future__ import annotations

import gzip
import hashlib
import subprocess
import tarfile
from pathlib import Path

from banger_build.flatten import LayerInput
from banger_build.oci.reference import Digest
from tests.support.oci import compress, tar_bytes

MTIME = 1_700_000_000
_TYPES = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "fifo": tarfile.FIFOTYPE,
    "chr": tarfile.CHRTYPE,
    "blk": tarfile.BLKTYPE,
}


def member(
    name: str,
    kind: str = "file",
    data: bytes = b"",
    *,
    mode: int | None = None,
    uid: int = 0,
    gid: int = 0,
    mtime: int = MTIME,
    linkname: str = "",
    dev: tuple[int, int] = (0, 0),
    xattrs: dict[str, bytes] | None = None,
    pax: dict[str, str] | None = None,
) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = _TYPES[kind]
    info.mode = mode if mode is not None else (0o755 if kind == "dir" else 0o644)
    info.uid, info.gid, info.mtime = uid, gid, mtime
    info.linkname = linkname
    info.devmajor, info.devminor = dev
    info.size = len(data) if kind == "file" else 0
    if xattrs:
        info.pax_headers = {
            f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape") for k, v in xattrs.items()
        }
    if pax:
        info.pax_headers = {**info.pax_headers, **pax}
    return info, data


def write_layer(
    directory: Path, members: list[tuple[tarfile.TarInfo, bytes]], compression: str = "gzip"
) -> LayerInput:
    raw = tar_bytes(members)
    blob = compress(raw, compression)
    digest = hashlib.sha256(blob).hexdigest()
    path = directory / f"layer-{digest[:16]}"
    path.write_bytes(blob)
    return LayerInput(Digest(digest), path, Digest(hashlib.sha256(raw).hexdigest()))


def layer_from_tar(directory: Path, raw: bytes, compression: str = "gzip") -> LayerInput:
    """A layer of an already-built tar (e.g. by GNU tar), with its diff_id."""
    blob = compress(raw, compression)
    digest = hashlib.sha256(blob).hexdigest()
    path = directory / f"layer-{digest[:16]}"
    path.write_bytes(blob)
    return LayerInput(Digest(digest), path, Digest(hashlib.sha256(raw).hexdigest()))


def gnu_tar_layer(directory: Path, root: Path, *options: str) -> LayerInput:
    """A layer made by GNU tar from ``root``'s contents (e.g. ``--format=gnu -S``)."""
    names = sorted(p.name for p in root.iterdir())
    proc = subprocess.run(
        ["tar", "-c", "-f", "-", "--numeric-owner", *options, "-C", str(root), *names],
        capture_output=True,
        check=True,
    )
    return layer_from_tar(directory, proc.stdout)


def gzip_bomb(directory: Path, name: str, size: int, fill: int = 0x41) -> LayerInput:
    """A gzip layer of one file of ``size`` bytes of ``fill``, small on disk.

    gzip allows concatenated members; each is the same compressed MiB, so a
    GiB of content costs about a MiB of layer (and no time to make). No
    diff_id: it would take hashing the whole content.
    """
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, MTIME
    header = info.tobuf(format=tarfile.GNU_FORMAT)
    mib = gzip.compress(bytes([fill]) * (1 << 20), compresslevel=9, mtime=0)
    whole, rest = divmod(size, 1 << 20)
    pad = -size % tarfile.BLOCKSIZE
    blob = b"".join(
        [
            gzip.compress(header, mtime=0),
            mib * whole,
            gzip.compress(bytes([fill]) * rest + bytes(pad + 2 * tarfile.BLOCKSIZE), mtime=0),
        ]
    )
    digest = hashlib.sha256(blob).hexdigest()
    path = directory / f"bomb-{digest[:16]}"
    path.write_bytes(blob)
    return LayerInput(Digest(digest), path)


def sparse_member(
    name: str, segments: list[tuple[int, bytes]], size: int
) -> tuple[tarfile.TarInfo, bytes]:
    """A PAX sparse (format 0.1) member: ``segments`` of data at their offsets in a
    file of ``size`` bytes; any map (hostile ones too) is written as given."""
    info = tarfile.TarInfo(name)
    data = b"".join(d for _, d in segments)
    info.size, info.mode, info.mtime = len(data), 0o644, MTIME
    info.pax_headers = {
        "GNU.sparse.size": str(size),
        "GNU.sparse.map": ",".join(f"{off},{len(d)}" for off, d in segments),
    }
    return info, data

"""Real tar layers on disk (gzip, zstd or plain) as flatten inputs, for unit tests.

Members are built from ``tarfile.TarInfo`` directly, so hostile names
(``..``, newlines, links out of the tree) are as easy to write as good ones.
"""

from __future__ import annotations

import hashlib
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

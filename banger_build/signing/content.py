"""Re-hashing what a signature vouches for: a store path's files, a bundle's members.

``hash_outputs`` checks a store path's files against its manifest.json;
``read_bundle`` reads an imagecat bundle (zstd of a tar holding exactly
``manifest.json`` then ``rootfs.ext4``) strictly and in constant memory:
zstd's window at most 2^27 bytes (``MAX_WINDOW``), the uncompressed stream
bounded by the sizes manifest.json records, tar headers bounded as for
layers (``tarstream``), exactly those two regular members in that order.
Anything else is a ``BundleError`` (reason ``bundle-invalid``).
"""

from __future__ import annotations

import hashlib
import os
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path

import zstandard

from banger_build.errors import InputError, Reason
from banger_build.fsutil import hash_file
from banger_build.signing.statement import MODULES_DIR, ROOTFS, StoreManifest
from banger_build.store import MANIFEST
from banger_build.tarstream import (
    DECOMPRESS_ERRORS,
    PARSE_ERRORS,
    LayerReader,
    Refused,
    members,
    open_tar,
)

#: zstd window a bundle may ask for (the bundle format pins <= 2^27; zstd's default
#: limit is 2^27 too, said here so a decoder never allocates more)
MAX_WINDOW = 1 << 27
#: tar bytes besides the two files: headers (PAX ones bounded by tarstream), padding,
#: the end-of-archive blocks and the record's padding
TAR_OVERHEAD = 4 << 20
_CHUNK = 1 << 20


class BundleError(InputError):
    reason = Reason.BUNDLE_INVALID


@dataclass(frozen=True)
class BundleDigests:
    manifest: bytes  # the manifest.json member, whole (it is bounded)
    rootfs_sha256: str
    rootfs_size: int


def max_bundle_size(manifest: StoreManifest) -> int:
    """The most compressed bytes a bundle of this store path can take: zstd adds at
    most a few bytes per 128 KiB block to incompressible data."""
    raw = len(manifest.data) + manifest.outputs[ROOTFS][1] + TAR_OVERHEAD
    return raw + raw // 256 + (1 << 20)


def read_bundle(
    path: Path, manifest: StoreManifest, *, rootfs_to: Path | None = None
) -> BundleDigests:
    """The members of bundle ``path`` of the store path ``manifest`` describes;
    with ``rootfs_to``, rootfs.ext4 is also written there (a new file, its runs
    of zeros left as holes) as it is hashed."""
    rootfs_size = manifest.outputs[ROOTFS][1]
    budget = len(manifest.data) + rootfs_size + TAR_OVERHEAD
    where = f"bundle {path.name}"
    try:
        with open(path, "rb") as raw:
            dctx = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW)
            with (
                dctx.stream_reader(raw, read_size=_CHUNK, read_across_frames=True) as zs,
                LayerReader(zs, budget, hashed=False) as stream,
            ):
                tar = open_tar(stream, bufsize=_CHUNK)
                found = _members(tar, manifest, where, rootfs_to)
                stream.drain()
    except Refused as exc:
        raise BundleError(f"{where}: {exc}") from None
    except DECOMPRESS_ERRORS as exc:
        raise BundleError(f"{where}: not a valid zstd stream ({exc})") from None
    return found


def _members(
    tar: tarfile.TarFile, manifest: StoreManifest, where: str, rootfs_to: Path | None
) -> BundleDigests:
    manifest_bytes = b""
    rootfs_sha = ""
    rootfs_size = 0
    expected = [(MANIFEST, len(manifest.data)), (ROOTFS, manifest.outputs[ROOTFS][1])]
    for i, member in enumerate(members(tar)):
        if i >= len(expected):
            raise BundleError(f"{where}: an extra member {member.name[:200]!r}")
        name, size = expected[i]
        if member.name != name or not member.isreg():
            raise BundleError(
                f"{where}: member {i + 1} is {member.name[:200]!r}, expected the file {name}"
            )
        if member.size != size:
            raise BundleError(f"{where}: {name} is {member.size} bytes, manifest.json says {size}")
        out = _create(rootfs_to) if name == ROOTFS and rootfs_to is not None else None
        try:
            f = tar.extractfile(member)
            assert f is not None  # a regular member always has content
            sha = hashlib.sha256()
            data = bytearray()
            while chunk := f.read(_CHUNK):
                sha.update(chunk)
                if name == MANIFEST:
                    data += chunk
                elif out is not None:
                    _write_sparse(out, chunk)
            if out is not None:
                os.ftruncate(out, member.size)
        except PARSE_ERRORS as exc:
            raise BundleError(f"{where}: {name}: {exc}") from None
        finally:
            if out is not None:
                os.close(out)
        if name == MANIFEST:
            manifest_bytes = bytes(data)
        else:
            rootfs_sha, rootfs_size = sha.hexdigest(), member.size
    if not rootfs_sha:
        raise BundleError(f"{where}: it does not hold {MANIFEST} and {ROOTFS}")
    return BundleDigests(manifest_bytes, rootfs_sha, rootfs_size)


def _create(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)


#: holes are left at this granularity (an image's unused blocks come in runs, but
#: rarely whole MiBs of them)
_HOLE = 64 << 10
_ZEROS = bytes(_CHUNK)


def _write_sparse(fd: int, chunk: bytes) -> None:
    """Append ``chunk`` at the file offset, leaving each all-zero ``_HOLE`` of it a
    hole (an image is mostly unused blocks; ftruncate at the end gives the size)."""
    view = memoryview(chunk)
    zeros = memoryview(_ZEROS)
    pos = 0
    while pos < len(view):
        piece = view[pos : pos + _HOLE]
        if piece == zeros[: len(piece)]:
            os.lseek(fd, len(piece), os.SEEK_CUR)
        else:
            while piece:
                piece = piece[os.write(fd, piece) :]
        pos += _HOLE


def hash_outputs(path: Path, manifest: StoreManifest) -> list[str]:
    """How the files of store path ``path`` differ from manifest.json's record ([]: none).

    The modules directory is only checked to be a directory: its recorded digest
    is of the source tree, whose modes the store changed (read-only)."""
    found: list[str] = []
    for name, (digest, size) in sorted(manifest.outputs.items()):
        file = path / name
        try:
            mode = os.lstat(file).st_mode
            if name == MODULES_DIR:
                if not stat.S_ISDIR(mode):
                    found.append(f"{file}: not a directory, as manifest.json records")
                continue
            if not stat.S_ISREG(mode):  # never open a FIFO (a hang) or follow a link
                found.append(f"{file}: not a regular file")
                continue
            actual, actual_size = hash_file(file)
        except OSError as exc:
            found.append(f"{file}: {exc.strerror or exc}")
            continue
        if (actual, actual_size) != (digest, size):
            found.append(
                f"{file}: sha256 {actual} ({actual_size} bytes), manifest.json records "
                f"{digest} ({size} bytes)"
            )
    try:
        present = set(os.listdir(path))
    except OSError as exc:
        return [*found, f"{path}: {exc.strerror}"]
    for extra in sorted(present - set(manifest.outputs) - {MANIFEST}):
        found.append(f"{path / extra}: not among manifest.json's outputs")
    return found


__all__ = ["BundleDigests", "BundleError", "hash_outputs", "max_bundle_size", "read_bundle"]

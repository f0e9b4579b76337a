"""The imagecat bundle of a store path: ``<name>-<key>.tar.zst``, the form banger
consumes (its daemon fetches it, strips manifest.json, stages the kernel beside
the image and publishes).

Format 1, byte for byte -- a pure function of the store path's two files and
of the zstd library:

tar
    A POSIX.1-2001 (pax) archive of exactly two regular files, in this order:
    ``manifest.json`` (the store path's bytes, unchanged) then ``rootfs.ext4``
    (unchanged; holes are read as the zeros they are). Each is a 512-byte
    ustar header then its data, NUL-padded to a multiple of 512. The header:
    name; mode ``0000644``; uid and gid ``0000000``; size as 11 octal
    digits; mtime ``00000000000``; checksum as 6 octal digits, NUL, space;
    typeflag ``0``; magic ``ustar\\0`` version ``00``; linkname, uname,
    gname, devmajor, devminor and prefix empty (all NUL). A size of 8 GiB or
    more does not fit 11 octal digits: the member is then preceded by a pax
    extended header (the same header with name ``././@PaxHeader``, mode
    ``0000000``, typeflag ``x``, size the length of its one record) and one
    block holding the record ``<len> size=<decimal>\\n``, and its own size
    field is ``00000000000``. Nothing else: no sparse maps, no xattrs, no
    times, no owner names. After the members, two zero blocks, then NULs up
    to a multiple of 10240 bytes (the record size GNU tar and Python's
    tarfile pad to). These are the bytes Python's tarfile writes in
    PAX_FORMAT for such members today; they are written here, not by
    tarfile, because its output has changed between Python releases
    (device fields of regular files, 3.11.4).

zstd
    One frame from ``zstandard.ZstdCompressor(compression_params=P)
    .stream_writer(out, size=<tar size>)``, fed the tar in order and closed
    once, never flushed (each flush ends a block, so flushes would change the
    bytes), where P is level 3 with long-distance matching over a window of
    2^27 bytes (128 MiB: the largest any ``zstd -d`` decodes without
    ``--long``), a content checksum, the content size in the frame header (the
    tar's size is known before the first byte: it follows from the two file
    sizes), and multi-threaded compression with up to ``MAX_THREADS`` workers.
    libzstd's multi-threaded output is the same for every worker count >= 1
    (and differs from single-threaded output), so the count follows the
    machine without changing a byte. Why these: measured on 2 cores (libzstd
    1.5.7), the Debian fixture (487 MiB image, 186 MiB of data) gives 54.0 MB
    in 1.2 s, and a 1.15 GB tar of /usr binaries 357.6 MB in 3.6 s, where
    plain level 3 gives 57.5 MB / 398.4 MB in 0.5 s / 2.6 s, and level 9
    (window 2^22) 51.3 MB / 361.8 MB in 1.5 s / 10.4 s: long matches over the
    whole window find what an image repeats far apart (the same libraries,
    locales, firmware) at a third of level 9's time. The compressor's memory
    is about 170 MiB whatever the image's size; a decoder needs a 128 MiB
    window.

The same store path gives the same bundle bytes on every machine with the same
zstandard and libzstd versions; ``ZSTD`` records them and the parameters
(``push`` puts them in the artifact's annotations). Signatures and
verification use the raw digests of the two files, never the bundle's.

Everything is streamed in constant memory: the image is read in 1 MiB pieces,
hashed as it is read (and checked against the sha256 its manifest.json
records: a damaged store path is never bundled), and compressed as a stream.
The sidecar ``<bundle>.sha256`` holds ``<hex>  <file name>`` as sha256sum
writes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, cast

import zstandard

from banger_build.errors import HostError, Reason, host_error
from banger_build.oci.reference import Digest
from banger_build.store import MANIFEST
from banger_build.storepath import ROOTFS, StorePath, damaged, mismatch, open_output

FORMAT = 1
BLOCK = 512
RECORD = 10240
#: the largest size the 11 octal digits of a ustar header hold
MAX_OCTAL = 8**11 - 1
PAX_NAME = "././@PaxHeader"
LEVEL = 3
WINDOW_LOG = 27
#: at most this many compression workers (their buffers share the one window)
MAX_THREADS = 4
READ_CHUNK = 1 << 20
SUFFIX = ".tar.zst"
LIBZSTD = ".".join(str(n) for n in zstandard.ZSTD_VERSION)
#: the zstd library and parameters, as recorded with every bundle
ZSTD: dict[str, object] = {
    "zstandard": zstandard.__version__,
    "libzstd": LIBZSTD,
    "level": LEVEL,
    "window_log": WINDOW_LOG,
    "long_distance_matching": True,
    "checksum": True,
    "content_size": True,
    "multithreaded": True,
    "api": "ZstdCompressor.stream_writer",
}
#: (what, bytes done, bytes in all)
Progress = Callable[[str, int, int | None], None]


def bundle_name(name: str, key: str) -> str:
    return f"{name}-{key}{SUFFIX}"


def zstd_version() -> str:
    return f"zstandard {zstandard.__version__} (libzstd {LIBZSTD})"


def zstd_params() -> str:
    """The parameters in one line, e.g. for an annotation."""
    return (
        f"format={FORMAT},level={LEVEL},window_log={WINDOW_LOG},long=1,checksum=1,"
        "content_size=1,multithreaded=1,api=stream_writer"
    )


# -- tar ---------------------------------------------------------------------------


def _octal(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value)


def _field(text: str, width: int) -> bytes:
    data = text.encode("ascii")
    assert len(data) <= width, text
    return data.ljust(width, b"\0")


def ustar_header(name: str, size: int, *, typeflag: bytes = b"0", mode: int = 0o644) -> bytes:
    """One 512-byte ustar header as the module docstring specifies."""
    head = b"".join(
        (
            _field(name, 100),
            _octal(mode, 8),
            _octal(0, 8),  # uid
            _octal(0, 8),  # gid
            _octal(size, 12),
            _octal(0, 12),  # mtime
            b" " * 8,  # the checksum, counted as spaces
            typeflag,
            b"\0" * 100,  # linkname
            b"ustar\x0000",
            b"\0" * 32,  # uname
            b"\0" * 32,  # gname
            b"\0" * 8,  # devmajor
            b"\0" * 8,  # devminor
            b"\0" * 155,  # prefix
        )
    ).ljust(BLOCK, b"\0")
    checksum = b"%06o\0" % sum(head)
    return head[:148] + checksum + head[155:]


def _pax_record(keyword: str, value: str) -> bytes:
    """``<len> keyword=value\\n``, where <len> counts the whole record, itself included."""
    body = f" {keyword}={value}\n".encode()
    length = len(body)
    while len(str(length)) + len(body) != length:
        length = len(str(length)) + len(body)
    return str(length).encode() + body


def member_header(name: str, size: int) -> bytes:
    """The header blocks before a member's data (a pax header first when needed)."""
    if size <= MAX_OCTAL:
        return ustar_header(name, size)
    record = _pax_record("size", str(size))
    pax = ustar_header(PAX_NAME, len(record), typeflag=b"x", mode=0)
    return pax + record.ljust(BLOCK, b"\0") + ustar_header(name, 0)


def _padding(size: int) -> int:
    return -size % BLOCK


def tar_size(members: list[tuple[str, int]]) -> int:
    """The archive's size in bytes, from its members' names and sizes."""
    total = sum(len(member_header(n, s)) + s + _padding(s) for n, s in members) + 2 * BLOCK
    return total + -total % RECORD


# -- the bundle ----------------------------------------------------------------------


@dataclass(frozen=True)
class BundleInfo:
    file_name: str  # <name>-<key>.tar.zst
    digest: Digest  # of the .tar.zst
    size: int
    tar_size: int
    rootfs_sha256: str
    manifest_sha256: str

    def record(self) -> dict[str, object]:
        """The bundle as JSON: what it is and how it was made."""
        return {
            "format": FORMAT,
            "file": self.file_name,
            "sha256": self.digest.hex,
            "size": self.size,
            "tar_size": self.tar_size,
            "rootfs_sha256": self.rootfs_sha256,
            "manifest_sha256": self.manifest_sha256,
            "zstd": dict(ZSTD),
        }


class _Sink:
    """The compressed stream's destination: written through, hashed and counted."""

    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.out.write(data)
        self.sha.update(data)
        self.size += len(data)
        return len(data)


def threads() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(MAX_THREADS, cpus))


def compressor(workers: int | None = None) -> zstandard.ZstdCompressor:
    """The one compressor of every bundle (``workers`` >= 1 never changes the bytes)."""
    params = zstandard.ZstdCompressionParameters.from_level(
        LEVEL,
        window_log=WINDOW_LOG,
        enable_ldm=1,
        threads=workers or threads(),
        write_checksum=1,
        write_content_size=1,
        write_dict_id=0,
    )
    return zstandard.ZstdCompressor(compression_params=params)


def _open_rootfs(sp: StorePath) -> tuple[int, int]:
    """An fd of the image: a regular file of the size its manifest.json records."""
    fd = open_output(sp, ROOTFS)
    size = os.fstat(fd).st_size
    if size != sp.rootfs.size:
        os.close(fd)
        raise damaged(sp, ROOTFS, f"it has {size} bytes, {MANIFEST} records {sp.rootfs.size}")
    return fd, size


def write_bundle(
    sp: StorePath, out: IO[bytes], progress: Progress | None = None, *, file_name: str = ""
) -> BundleInfo:
    """Stream the bundle of ``sp`` into ``out``; its digest and size, and the raw
    digests of the two files (rootfs.ext4 verified against manifest.json)."""
    manifest = sp.manifest_bytes
    fd, size = _open_rootfs(sp)
    total = tar_size([(MANIFEST, len(manifest)), (ROOTFS, size)])
    sink = _Sink(out)
    rootfs_sha = hashlib.sha256()
    done = 0
    try:
        with os.fdopen(fd, "rb", buffering=0) as image:
            # one frame, ended by close() after the last byte (an error before leaves
            # the writer unclosed: closing would report the size shortfall instead)
            writer = compressor().stream_writer(cast(IO[bytes], sink), size=total, closefd=False)
            head = member_header(MANIFEST, len(manifest)) + manifest
            head += b"\0" * _padding(len(manifest)) + member_header(ROOTFS, size)
            writer.write(head)
            buf = bytearray(READ_CHUNK)
            view = memoryview(buf)
            while done < size:
                n = image.readinto(view[: min(READ_CHUNK, size - done)])
                if not n:
                    raise damaged(sp, ROOTFS, f"it ended after {done} of {size} bytes")
                rootfs_sha.update(view[:n])
                writer.write(view[:n])
                done += n
                if progress is not None:
                    progress("bundle", done, size)
            writer.write(b"\0" * (total - len(head) - size))  # padding, end blocks, record
            writer.close()  # type: ignore[no-untyped-call]
    except zstandard.ZstdError as exc:
        raise HostError(f"bundle: zstd failed: {exc}", reason=Reason.IO) from exc
    error = mismatch(sp, ROOTFS, rootfs_sha.hexdigest(), done)
    if error is not None:
        raise error
    return BundleInfo(
        file_name or bundle_name(sp.name, sp.key),
        Digest(sink.sha.hexdigest()),
        sink.size,
        total,
        rootfs_sha.hexdigest(),
        sp.manifest_sha256,
    )


def sidecar_text(info: BundleInfo, file_name: str) -> str:
    """``<hex>  <file name>\\n``, as ``sha256sum`` writes it (``sha256sum -c`` reads it)."""
    return f"{info.digest.hex}  {file_name}\n"


def _create_beside(dest: Path) -> tuple[Path, IO[bytes]]:
    """A new file beside ``dest`` (same filesystem, mode by the umask), open for writing."""
    tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    return tmp, os.fdopen(fd, "wb")


def write_bundle_file(
    sp: StorePath, dest: Path, progress: Progress | None = None, *, sidecar: bool = True
) -> BundleInfo:
    """Write the bundle to ``dest`` (a temp file renamed into place: a failure never
    leaves a partial bundle at ``dest``) and, with ``sidecar``, ``dest.sha256``."""
    tmp: Path | None = None
    try:
        tmp, out = _create_beside(dest)
        with out:
            info = write_bundle(sp, out, progress, file_name=dest.name)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dest)
        tmp = None
        if sidecar:
            side = dest.with_name(dest.name + ".sha256")
            tmp, out = _create_beside(side)
            with out:
                out.write(sidecar_text(info, dest.name).encode())
            os.replace(tmp, side)
            tmp = None
    except OSError as exc:
        raise host_error("bundle", exc) from exc
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()
    return info

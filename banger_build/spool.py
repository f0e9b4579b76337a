"""The content of the image's regular files, on the host, as one append-only file.

Flattening reads every layer once, front to back; which of a layer's files
survive is only known after the last layer. So each regular file's bytes go
to the spool as they stream (holes left out), the ``Inode`` records where
(``src``) and which ranges of the file hold data (``segments``), and the ext4
writer copies the survivors into their blocks with ``copy_file_range``.
Overwritten and whited-out files never reach the image: their bytes stay in
the spool, which is deleted with the build directory.

No file of the image is created on the host: the spool is one file of the
build's, whatever the layers hold, so names, modes, owners and links in a
layer never touch the host filesystem.
"""

from __future__ import annotations

import errno
import hashlib
import os
import queue
import threading
from array import array
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType

from banger_build.fsutil import ContentChanged, pwrite_all
from banger_build.tree import Inode

#: Bytes per read when copying a host file into the spool.
_READ = 1 << 20
#: Chunks waiting for the writer thread.
_QUEUED = 32


class Spool:
    """One file; ``add_*`` append a regular file's data and point its inode at it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
        self.fd = os.open(path, flags, 0o600)
        self.end = 0
        # Writes go through one thread, so the page cache's copy of a chunk overlaps
        # the decompression of the next (both release the GIL). At most _QUEUED
        # chunks (of at most a MiB) wait: memory stays bounded.
        self._queue: queue.Queue[tuple[int, bytes] | None] = queue.Queue(_QUEUED)
        self._failed: OSError | None = None
        self._thread: threading.Thread | None = None

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def flush(self) -> None:
        """Wait until every chunk handed over is written; raise a write's OSError."""
        if self._thread is not None:
            self._queue.join()
        if self._failed is not None:
            raise self._failed

    def _drain(self) -> None:
        while (item := self._queue.get()) is not None:
            offset, data = item
            try:
                if self._failed is None:
                    pwrite_all(self.fd, data, offset)
            except OSError as exc:  # the host's disk: name the file
                self._failed = OSError(exc.errno, exc.strerror, os.fspath(self.path))
            except Exception as exc:  # reported to the thread that writes next
                self._failed = OSError(errno.EIO, f"spool writer: {exc!r}", os.fspath(self.path))
            finally:
                self._queue.task_done()
        self._queue.task_done()

    def __enter__(self) -> Spool:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- writing ------------------------------------------------------------------

    def add(self, inode: Inode, chunks: Iterable[tuple[int, bytes]]) -> int:
        """Append (file offset, bytes) chunks, in increasing offset order, as
        ``inode``'s data; return the bytes stored. Adjacent chunks make one segment."""
        inode.src = self.end
        segments = array("Q")
        seg_start = seg_end = -1
        for offset, chunk in chunks:
            if offset != seg_end:
                if seg_end > seg_start:
                    segments.extend((seg_start, seg_end - seg_start))
                seg_start = seg_end = offset
            self._write(chunk)
            seg_end += len(chunk)
        if seg_end > seg_start:
            segments.extend((seg_start, seg_end - seg_start))
        stored = sum(segments[1::2])
        if segments == array("Q", (0, inode.size)):
            inode.segments = None  # the common case: dense from 0 to the end
        else:
            inode.segments = segments
        return stored

    def add_bytes(self, inode: Inode, data: bytes) -> None:
        inode.size = len(data)
        self.add(inode, [(0, data)] if data else [])

    def add_file(self, inode: Inode, path: Path, expected: str | None = None) -> str:
        """Append a host file (a recipe's source) while hashing it; return its
        sha256. ``expected``: the digest resolved earlier, checked (ContentChanged)."""
        sha = hashlib.sha256()

        def chunks() -> Iterator[tuple[int, bytes]]:
            inode.size = 0  # counted as read: ``add`` ends knowing the whole size
            with open(path, "rb") as f:
                while chunk := f.read(_READ):
                    sha.update(chunk)
                    yield inode.size, chunk
                    inode.size += len(chunk)

        self.add(inode, chunks())
        digest = sha.hexdigest()
        if expected is not None and digest != expected:
            raise ContentChanged(path, expected, digest)
        return digest

    def _write(self, data: bytes) -> None:
        if self._failed is not None:
            raise self._failed
        if self._thread is None:
            self._thread = threading.Thread(target=self._drain, name="spool", daemon=True)
            self._thread.start()
        self._queue.put((self.end, bytes(data)))
        self.end += len(data)

    # -- reading ------------------------------------------------------------------

    def read(self, inode: Inode, limit: int) -> bytes:
        """The first ``limit`` bytes of a regular file (holes as zeros)."""
        self.flush()
        out = bytearray()
        pos = inode.src
        for offset, length in data_segments(inode):
            if offset >= limit:
                break
            out += bytes(offset - len(out))
            take = min(length, limit - offset)
            out += os.pread(self.fd, take, pos)
            pos += length
        return bytes(out)

    def copy(self, src: int, length: int, dst_fd: int, dst: int) -> None:
        """Copy ``length`` bytes at ``src`` in the spool to ``dst`` in ``dst_fd``."""
        self.flush()
        while length > 0:
            try:
                n = os.copy_file_range(self.fd, dst_fd, length, src, dst)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                n = self._copy_slow(src, length, dst_fd, dst)
            if n <= 0:
                raise OSError(errno.EIO, "the spool ended early", os.fspath(self.path))
            src += n
            dst += n
            length -= n

    def _copy_slow(self, src: int, length: int, dst_fd: int, dst: int) -> int:
        data = os.pread(self.fd, min(length, _READ), src)
        pwrite_all(dst_fd, data, dst)
        return len(data)


def data_segments(inode: Inode) -> list[tuple[int, int]]:
    """(file offset, length) of each range of a regular file that holds data;
    the bytes are back to back in the spool from ``inode.src``."""
    if inode.segments is None:
        return [(0, inode.size)] if inode.size else []
    s = inode.segments
    return [(s[i], s[i + 1]) for i in range(0, len(s), 2)]

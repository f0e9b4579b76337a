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
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import TracebackType

from banger_build.fsutil import ContentChanged, pwrite_all
from banger_build.tree import Inode

#: Bytes per read when copying a host file into the spool.
_READ = 1 << 20
#: Writes waiting for the writer thread.
_QUEUED = 8
#: Bytes, and buffers, gathered into one write (IOV_MAX is 1024): one hand-over to
#: the thread per MiB, not per small file, or the GIL ping-pong starves it.
_GATHER = 1 << 20
_GATHER_BUFFERS = 512
#: Each file's data starts at a multiple of this in the spool, as in the image
#: (its block size): files that follow each other in both are one copy.
ALIGN = 4096
_PAD = memoryview(bytes(ALIGN))


#: What the spool writes: chunks of a layer or a file (bytes), padding (a view of zeros).
Buffer = bytes | memoryview


def _pwritev_all(fd: int, buffers: list[Buffer], offset: int) -> None:
    done = os.pwritev(fd, buffers, offset)
    total = sum(len(b) for b in buffers)
    if done < total:  # a short write: the rest, joined
        pwrite_all(fd, b"".join(buffers)[done:], offset + done)


class Spool:
    """One file; ``add_*`` append a regular file's data and point its inode at it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
        self.fd = os.open(path, flags, 0o600)
        self.end = 0
        # Writes go through one thread, so the page cache's copy of a chunk overlaps
        # the decompression of the next (both release the GIL). At most _QUEUED
        # writes (of about a MiB) wait: memory stays bounded.
        self._queue: queue.Queue[tuple[int, list[Buffer]] | None] = queue.Queue(_QUEUED)
        self._failed: OSError | None = None
        self._thread: threading.Thread | None = None
        self._gathered: list[Buffer] = []  # the next write, from offset _gathered_at
        self._gathered_at = 0
        self._gathered_bytes = 0

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def flush(self) -> None:
        """Wait until every chunk added is written; raise a write's OSError."""
        self._hand_over()
        if self._thread is not None:
            self._queue.join()
        if self._failed is not None:
            raise self._failed

    def _drain(self) -> None:
        while (item := self._queue.get()) is not None:
            offset, buffers = item
            try:
                if self._failed is None:
                    _pwritev_all(self.fd, buffers, offset)
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
        pad = -self.end % ALIGN
        if pad and self._gathered:
            self._gather(_PAD[:pad])  # zeros, so the gathered write stays one range
        else:
            self.end += pad  # a hole: zeros, never written
        inode.src = self.end
        segments = array("Q")
        seg_start = seg_end = -1
        for offset, chunk in chunks:
            if offset != seg_end:
                if seg_end > seg_start:
                    segments.extend((seg_start, seg_end - seg_start))
                seg_start = seg_end = offset
            self._gather(chunk)
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

    def _gather(self, data: Buffer) -> None:
        if self._failed is not None:
            raise self._failed
        if not self._gathered:
            self._gathered_at = self.end
        self._gathered.append(data)
        self._gathered_bytes += len(data)
        self.end += len(data)
        if self._gathered_bytes >= _GATHER or len(self._gathered) >= _GATHER_BUFFERS:
            self._hand_over()

    def _hand_over(self) -> None:
        """Give the gathered write to the writer thread."""
        if not self._gathered:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._drain, name="spool", daemon=True)
            self._thread.start()
        self._queue.put((self._gathered_at, self._gathered))
        self._gathered = []
        self._gathered_bytes = 0

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


class Copier:
    """Copies spool ranges into a file in a thread of its own, in the order given,
    while the caller goes on (``copy_file_range`` releases the GIL).

    ``add`` queues one (spool offset, length, file offset) copy; offsets in the
    file must increase, so ``done`` (the end of the last copy made) says that
    every copy below it is in place; after ``report(final)``, ``final`` is told
    ``done`` every few MiB. ``close`` waits for the last copy and raises the
    thread's error (OSError, or RuntimeError for copies out of order).
    """

    _BATCH = 256  # copies handed over at once, at most
    _BATCH_BYTES = 1 << 20  # bytes of copies handed over at once, at least
    _QUEUED = 64  # batches waiting at most (memory is bounded)
    _REPORT = 4 << 20  # bytes copied between two reports

    def __init__(self, spool: Spool, fd: int) -> None:
        self.spool = spool
        self.fd = fd
        self.done = 0
        self._bytes = 0  # in the batch being gathered
        self._final: Callable[[int], None] | None = None
        self._told = 0
        self._batch = array("Q")
        self._queue: queue.Queue[array[int] | None] = queue.Queue(self._QUEUED)
        self._failed: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="copier", daemon=True)
        self._thread.start()

    def add(self, src: int, length: int, dst: int) -> None:
        if self._failed is not None:
            raise self._failed
        batch = self._batch
        if batch:  # one copy with the last when it ends, padded to ALIGN, where this
            last_src, last_len, last_dst = batch[-3], batch[-2], batch[-1]  # starts, in both
            end = last_src + last_len + (-(last_src + last_len) % ALIGN)
            if (
                src == end
                and dst - last_dst == end - last_src
                and last_src % ALIGN == last_dst % ALIGN
            ):
                batch[-2] = src + length - last_src  # the padding's zeros copied too
                self._bytes += src + length - last_src - last_len
                length = 0
        if length:
            batch.extend((src, length, dst))
            self._bytes += length
        if self._bytes >= self._BATCH_BYTES or len(batch) >= 3 * self._BATCH:
            self._queue.put(batch)
            self._batch = array("Q")
            self._bytes = 0

    def _run(self) -> None:
        while (batch := self._queue.get()) is not None:
            if self._failed is not None:
                continue  # drained, not copied: close() raises
            try:
                for i in range(0, len(batch), 3):
                    src, length, dst = batch[i], batch[i + 1], batch[i + 2]
                    if dst < self.done:
                        raise RuntimeError(f"copy out of order at byte {dst} (after {self.done})")
                    self.spool.copy(src, length, self.fd, dst)
                    self.done = dst + length
                    final = self._final
                    if final is not None and self.done - self._told >= self._REPORT:
                        self._told = self.done
                        final(self.done)
            except BaseException as exc:  # raised by add() or close()
                self._failed = exc

    def report(self, final: Callable[[int], None]) -> None:
        """From now on, tell ``final`` how far the copies are made."""
        self._final = final
        final(self.done)

    def close(self) -> None:
        """Wait for every copy; raise the first error."""
        if self._thread.is_alive():
            if self._batch:
                self._queue.put(self._batch)
                self._batch = array("Q")
            self._queue.put(None)
            self._thread.join()
        if self._failed is not None:
            raise self._failed


def data_segments(inode: Inode) -> list[tuple[int, int]]:
    """(file offset, length) of each range of a regular file that holds data;
    the bytes are back to back in the spool from ``inode.src``."""
    if inode.segments is None:
        return [(0, inode.size)] if inode.size else []
    s = inode.segments
    return [(s[i], s[i + 1]) for i in range(0, len(s), 2)]

"""Small filesystem helpers shared by the store, the blob cache, the lock file and
the image writer (``FollowingHash``).

Trees are walked without recursion and addressed relative to a directory file
descriptor: a hostile layer can stage directories nested deeper than Python's
recursion limit and paths longer than PATH_MAX once the store's prefix is
added, and neither may crash a build or gc.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

CHUNK = 1 << 20
_ZEROS = bytes(CHUNK)


def hash_file(path: Path) -> tuple[str, int]:
    """sha256 hex digest and size of a file, read in constant memory.

    A sparse file's holes are hashed from a buffer of zeros, not read: an image
    is mostly holes, and the kernel zero-filling them costs more than the hash.
    """
    sha = hashlib.sha256()
    view = memoryview(bytearray(CHUNK))
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        _hash_span(f.fileno(), sha, view, 0, size, os.fspath(path))
    return sha.hexdigest(), size


def _hash_span(
    fd: int, sha: hashlib._Hash, view: memoryview, pos: int, end: int, name: str
) -> None:
    """Hash bytes [pos, end) of ``fd`` into ``sha``: holes from zeros, data read."""
    while pos < end:
        try:
            data = min(os.lseek(fd, pos, os.SEEK_DATA), end)
        except OSError as exc:  # ENXIO: only a hole is left; EINVAL: no SEEK_DATA
            data = end if exc.errno == errno.ENXIO else pos
        while pos < data:  # a hole
            n = min(CHUNK, data - pos)
            sha.update(_ZEROS[:n] if n < CHUNK else _ZEROS)
            pos += n
        if pos >= end:
            break
        try:
            hole = min(os.lseek(fd, pos, os.SEEK_HOLE), end)
        except OSError:
            hole = end
        while pos < hole:
            n = os.preadv(fd, [view[: min(CHUNK, hole - pos)]], pos)
            if not n:
                raise OSError(errno.EIO, "file shrank while being hashed", name)
            sha.update(view[:n])
            pos += n


class FollowingHash:
    """The sha256 of a file that is being written front to back, hashed by a
    thread as its bytes become final: the writer says ``final(offset)`` when
    everything below ``offset`` will not change any more, so hashing overlaps
    the writing. ``digest()`` (everything is final) waits for the thread; the
    context's exit stops it, whatever happened.
    """

    def __init__(self, path: Path, size: int) -> None:
        self._name = os.fspath(path)
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        self._size = size
        self._final = 0
        self._stopped = False
        self._cond = threading.Condition()
        self._sha = hashlib.sha256()
        self._failed: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="image-hash", daemon=True)
        self._thread.start()

    def final(self, offset: int) -> None:
        with self._cond:
            if offset > self._final:
                self._final = offset
                self._cond.notify()

    def _run(self) -> None:
        view = memoryview(bytearray(CHUNK))
        pos = 0
        try:
            while pos < self._size:
                with self._cond:
                    while self._final <= pos and not self._stopped:
                        self._cond.wait()
                    if self._stopped:
                        return
                    end = min(self._final, self._size)
                _hash_span(self._fd, self._sha, view, pos, end, self._name)
                pos = end
        except BaseException as exc:  # given to digest(): never a digest of part of it
            self._failed = exc

    def digest(self) -> str:
        """The whole file's sha256 hex digest, once all of it is final."""
        self.final(self._size)
        self._thread.join()
        if self._failed is not None:
            raise self._failed
        return self._sha.hexdigest()

    def __enter__(self) -> FollowingHash:
        return self

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join()
        os.close(self._fd)


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (``os.pwrite`` may write less)."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        offset += n
        view = view[n:]


class ContentChanged(Exception):
    """A file's bytes differ from the digest taken of it earlier."""

    def __init__(self, path: Path, expected: str, actual: str) -> None:
        super().__init__(f"{path}: sha256 {actual}, expected {expected}")
        self.path = path
        self.expected = expected
        self.actual = actual


def copy_verified(src: Path, dest: Path, sha256: str) -> int:
    """Copy regular file ``src`` to the new file ``dest``, hashing the bytes as
    they are copied; ContentChanged (and no ``dest``) unless they hash to
    ``sha256``. What is verified is exactly what was written, so a source
    changed after it was resolved can never enter an image under the old digest."""
    fd = os.open(src, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise IsADirectoryError(errno.EINVAL, "not a regular file", str(src))
        sha = hashlib.sha256()
        size = 0
        with open(dest, "xb") as out:
            while chunk := os.read(fd, CHUNK):
                sha.update(chunk)
                out.write(chunk)
                size += len(chunk)
    finally:
        os.close(fd)
    if sha.hexdigest() != sha256:
        os.unlink(dest)
        raise ContentChanged(src, sha256, sha.hexdigest())
    return size


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (best effort)."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _open_dir(name: str, dir_fd: int | None) -> int:
    return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)


@dataclass(frozen=True)
class Entry:
    """One entry met by ``walk``: its parent's fd, its name, its lstat."""

    parent_fd: int
    name: str
    st: os.stat_result
    path: str  # relative to the walked root, for messages

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.st.st_mode)


#: Directory fds ``walk`` keeps open at once; deeper levels are closed and
#: reopened through ``..`` (checked by device and inode) on the way back up.
MAX_OPEN_DIRS = 64


class _Frame:
    __slots__ = ("fd", "ident", "names", "own", "rel")

    def __init__(self, fd: int, rel: str, own: Entry | None) -> None:
        self.fd = fd
        self.rel = rel
        self.own = own
        try:
            st = os.fstat(fd)
            self.names = iter(sorted(os.listdir(fd)))
        except BaseException:
            os.close(fd)
            raise
        self.ident = (st.st_dev, st.st_ino)


def walk(root: Path, *, topdown: bool = True) -> Iterator[Entry]:
    """Every entry below ``root`` (not ``root`` itself), never following symlinks.

    Iterative and fd-relative: each directory is opened with ``O_NOFOLLOW``
    relative to its parent and listed once, so neither depth nor path length
    is limited. ``topdown=False`` yields a directory after its contents (for
    removal). An entry's ``parent_fd`` is open while it is being yielded.
    Entries that vanish while the walk runs are skipped.
    """
    stack = [_Frame(_open_dir(os.fspath(root), None), "", None)]
    try:
        while stack:
            top = stack[-1]
            name = next(top.names, None)
            if name is None:
                stack.pop()
                try:
                    if stack and stack[-1].fd < 0:
                        _reopen_parent(stack[-1], top.fd)
                finally:
                    os.close(top.fd)
                if top.own is not None and not topdown:  # its parent's fd may be a new one
                    yield dataclasses.replace(top.own, parent_fd=stack[-1].fd)
                continue
            try:
                st = os.stat(name, dir_fd=top.fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            entry = Entry(top.fd, name, st, f"{top.rel}/{name}" if top.rel else name)
            if not entry.is_dir:
                yield entry
                continue
            if topdown:
                yield entry
            try:
                child = _open_dir(name, top.fd)
            except FileNotFoundError:
                continue
            stack.append(_Frame(child, entry.path, entry))
            if len(stack) > MAX_OPEN_DIRS and stack[-MAX_OPEN_DIRS - 1].fd >= 0:
                frame = stack[-MAX_OPEN_DIRS - 1]
                os.close(frame.fd)
                frame.fd = -1
    finally:
        for frame in stack:
            if frame.fd >= 0:
                os.close(frame.fd)


def _reopen_parent(frame: _Frame, child_fd: int) -> None:
    fd = os.open("..", os.O_RDONLY | os.O_DIRECTORY, dir_fd=child_fd)
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != frame.ident:
        os.close(fd)
        raise OSError(errno.ESTALE, "directory moved while walking", frame.rel)
    frame.fd = fd


@dataclass
class Removal:
    """What ``remove_tree`` could not remove, as ``path: reason`` lines."""

    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


def _make_writable(root: Path) -> None:
    """Give the owner rwx on every directory (published trees are 0555). The
    entries were just lstat'ed as directories of our own private tree, so the
    plain chmod (which needs no /proc, unlike the no-follow variant) is safe."""
    os.chmod(root, stat.S_IRWXU)
    for entry in walk(root):
        if entry.is_dir and entry.st.st_mode & stat.S_IRWXU != stat.S_IRWXU:
            os.chmod(entry.name, stat.S_IRWXU, dir_fd=entry.parent_fd)


def remove_tree(path: Path) -> Removal:
    """rm -rf, read-only directories included, without recursion.

    Never raises for what it cannot remove: the returned ``Removal`` names
    each path and the errno's words. A missing ``path`` is not a failure.
    """
    result = Removal()
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return result
    except OSError as exc:
        result.failures.append(f"{path}: {exc.strerror}")
        return result
    try:
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(path)
            return result
        _make_writable(path)
        for entry in walk(path, topdown=False):
            try:
                if entry.is_dir:
                    os.rmdir(entry.name, dir_fd=entry.parent_fd)
                else:
                    os.unlink(entry.name, dir_fd=entry.parent_fd)
            except FileNotFoundError:
                pass
            except OSError as exc:
                result.failures.append(f"{path}/{entry.path}: {exc.strerror}")
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if not (exc.errno == errno.ENOTEMPTY and result.failures):
            result.failures.append(f"{path}: {exc.strerror}")
    if not result.failures and os.path.lexists(path):  # something appeared meanwhile
        result.failures.append(f"{path}: still there after removing it")
    return result


def make_read_only(root: Path) -> None:
    """Files 0444 (keeping execute bits), directories 0555, ``root`` included."""
    for entry in walk(root, topdown=False):
        mode = entry.st.st_mode
        if entry.is_dir:
            os.chmod(entry.name, 0o555, dir_fd=entry.parent_fd)
        elif stat.S_ISREG(mode):
            os.chmod(entry.name, 0o444 | (mode & 0o111), dir_fd=entry.parent_fd)
    os.chmod(root, 0o555)


def fsync_tree(root: Path) -> None:
    """fsync every regular file and directory under ``root``, then ``root``: what is
    renamed into the store afterwards survives a power cut whole or not at all."""
    for entry in walk(root, topdown=False):
        if entry.is_dir or stat.S_ISREG(entry.st.st_mode):
            flags = os.O_RDONLY | os.O_NOFOLLOW | (os.O_DIRECTORY if entry.is_dir else 0)
            fd = os.open(entry.name, flags, dir_fd=entry.parent_fd)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def disk_usage(root: Path) -> int:
    """Bytes a tree uses on disk (sparse files count what they use)."""
    try:
        total = os.lstat(root).st_blocks * 512
    except OSError:
        return 0
    try:
        for entry in walk(root):
            total += entry.st.st_blocks * 512
    except OSError:
        pass  # removed under us: what was counted stands
    return total

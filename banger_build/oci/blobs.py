"""The content-addressed blob cache: ``<home>/blobs/sha256/<hex>``.

A blob enters the cache only one way: streamed into a temp file under
``<root>/tmp`` (same filesystem), hashed while it is written, fsynced,
checked against the expected digest and size, and renamed into place. So
nothing ever appears at a final path unverified, and an interrupted or
truncated download leaves nothing behind (the seed's zero-byte blob that
poisoned every later pull cannot happen).

Reads verify too: ``get()`` hashes the file before handing it out and removes
a corrupt, empty or truncated one; ``read()`` returns the bytes it hashed. A
successful check is remembered for the life of the process, keyed by the
file's identity (size, mtime, inode), so asking twice costs one ``stat``.

Temp roots: a cache made with ``roots`` calls ``roots.add(hex)`` before it
touches a blob's file (read or write), so a garbage collector that honours
those roots never deletes a blob a running build is about to use.

Failures: ``BlobMismatch`` (content that is not the digest) and
``CacheError`` (an ``OSError`` of the cache's own files, e.g. ENOSPC) are
``failure.Failure``s for the boundary to turn into the user's error.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import stat
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from banger_build.errors import BangerError, Reason, StoreError
from banger_build.fsutil import fsync_dir, hash_file
from banger_build.oci.failure import Failure
from banger_build.oci.reference import Digest

#: sha256 of zero bytes: the only digest whose blob may be empty.
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
CHUNK = 1 << 20
FILE_MODE = 0o644

T = TypeVar("T")


class BlobRoots(Protocol):
    """Where a build records the blobs it uses, before using them (gc keeps them)."""

    def add(self, hex_digest: str) -> None: ...

    def guard(self) -> contextlib.AbstractContextManager[None]:
        """Held while a partial download is created (gc's shared lock)."""
        ...


class BlobMismatch(Failure):
    """Content did not hash to the expected digest, or had the wrong size."""

    def __init__(
        self,
        expected: Digest,
        actual: Digest,
        size: int,
        *,
        expected_size: int | None = None,
    ) -> None:
        self.expected = expected
        self.actual = actual
        self.size = size
        self.expected_size = expected_size
        if expected_size is not None and size != expected_size:
            text = f"expected {expected} ({expected_size} bytes), got {size} bytes"
            if size < expected_size:
                text += " (truncated)"
        else:
            text = f"expected {expected}, got {actual} ({size} bytes)"
        super().__init__(text, reason=Reason.DIGEST_MISMATCH)


class CacheError(Failure):
    """The cache's own files failed (disk full, permissions): a store problem."""

    def __init__(self, action: str, path: Path, exc: OSError) -> None:
        self.path = path
        why = exc.strerror or str(exc)
        super().__init__(
            f"cannot {action} to the blob cache {path}: {why}", reason=Reason.BLOB_CACHE
        )

    def error_for(self, reference: str) -> BangerError:
        return StoreError(f"{reference}: {self.message}", reason=self.reason)


def _cache_op(op: Callable[..., T], *args: Any, digest: Digest, root: Path) -> T:
    """``op(*args)``, its OSError a CacheError naming the blob and the cache."""
    try:
        return op(*args)
    except OSError as exc:
        raise CacheError(f"write {digest}", root, exc) from exc


def _write_all(fd: int, data: bytes, digest: Digest, root: Path) -> None:
    view = memoryview(data)
    while view:
        view = view[_cache_op(os.write, fd, view, digest=digest, root=root) :]


class BlobCache:
    """Blobs by sha256 digest under ``root`` (normally ``<home>/blobs``)."""

    def __init__(self, root: Path, roots: BlobRoots | None = None) -> None:
        self.root = Path(root)
        self.tmp = self.root / "tmp"
        self.roots = roots
        # hex -> (st_size, st_mtime_ns, st_ino) of the file we last verified
        self._verified: dict[str, tuple[int, int, int]] = {}

    def __repr__(self) -> str:
        return f"BlobCache({str(self.root)!r})"

    def path(self, digest: Digest) -> Path:
        return self.root / "sha256" / digest.hex

    def _root(self, digest: Digest) -> None:
        if self.roots is not None:
            self.roots.add(digest.hex)

    def present(self, digest: Digest, size: int) -> Path | None:
        """The blob's path if a file of ``size`` bytes is there, *not hashed*: for a
        reader that checks every byte it uses against a digest it trusts (a layer's
        uncompressed bytes against the config's diff_id) and calls ``get`` (which
        hashes the file, and removes a bad one) before anything else relies on it."""
        self._root(digest)
        path = self.path(digest)
        try:
            st = path.stat()
        except OSError:
            return None
        return path if st.st_size == size and stat.S_ISREG(st.st_mode) else None

    def get(self, digest: Digest, size: int | None = None) -> Path | None:
        """The blob's path if it is present and verified, else None.

        A file that is empty (for any digest but the empty one), has the
        wrong size or does not hash to ``digest`` is removed.
        """
        self._root(digest)
        path = self.path(digest)
        try:
            st = path.stat()
        except OSError:
            self._verified.pop(digest.hex, None)
            return None
        ident = (st.st_size, st.st_mtime_ns, st.st_ino)
        if self._verified.get(digest.hex) == ident:
            if size is None or size == st.st_size:
                return path
            self._discard(path, digest)
            return None
        good = (st.st_size > 0 or digest.hex == EMPTY_SHA256) and (
            size is None or size == st.st_size
        )
        if good:
            try:
                actual, n = hash_file(path)
            except OSError:
                return None
            good = actual == digest.hex and n == st.st_size
        if not good:
            self._discard(path, digest)
            return None
        self._verified[digest.hex] = ident
        return path

    def read(self, digest: Digest, size: int | None = None, *, limit: int) -> bytes | None:
        """The blob's verified bytes if it is present, else None (as ``get``).

        One open: the bytes returned are the bytes hashed. A blob larger than
        ``limit`` is never read whole: ``Failure`` (reason ``too-large``).
        """
        self._root(digest)
        path = self.path(digest)
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                if st.st_size > limit:
                    raise Failure(
                        f"{digest} is {st.st_size} bytes in the blob cache, more than the "
                        f"limit of {limit} bytes",
                        reason=Reason.TOO_LARGE,
                    )
                data = f.read(limit + 1)
        except OSError:
            self._verified.pop(digest.hex, None)
            return None
        ident = (st.st_size, st.st_mtime_ns, st.st_ino)
        good = len(data) == st.st_size and (size is None or size == st.st_size)
        if good and self._verified.get(digest.hex) != ident:
            allowed = len(data) > 0 or digest.hex == EMPTY_SHA256
            good = allowed and hashlib.sha256(data).hexdigest() == digest.hex
        if not good:
            self._discard(path, digest)
            return None
        self._verified[digest.hex] = ident
        return data

    def _discard(self, path: Path, digest: Digest) -> None:
        self._verified.pop(digest.hex, None)
        # a read-only shared cache: leave the file, but never hand it out
        with contextlib.suppress(OSError):
            path.unlink()

    def put_stream(self, digest: Digest, chunks: Iterable[bytes], size: int | None = None) -> Path:
        """Write ``chunks`` to the cache as ``digest``, verifying digest and size.

        Raises BlobMismatch (and leaves nothing behind) when the content
        does not match, CacheError when the cache's files fail (ENOSPC...).
        Exceptions raised by ``chunks`` propagate as they are, also leaving
        nothing behind.
        """
        self._root(digest)
        final = self.path(digest)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            self.tmp.mkdir(parents=True, exist_ok=True)
            # Created under the shared gc lock and flocked until renamed: gc
            # removes only partial downloads nobody holds (a killed pull's).
            with self.roots.guard() if self.roots is not None else contextlib.nullcontext():
                fd, tmpname = tempfile.mkstemp(
                    prefix=f"{digest.hex[:16]}.", suffix=".part", dir=self.tmp
                )
                fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            raise CacheError(f"write {digest}", self.root, exc) from exc
        tmp = Path(tmpname)
        try:
            h = hashlib.sha256()
            n = 0
            _cache_op(os.fchmod, fd, FILE_MODE, digest=digest, root=self.root)
            for chunk in chunks:  # the source's own exceptions pass through
                if not chunk:
                    continue
                n += len(chunk)
                h.update(chunk)
                if size is not None and n > size:
                    # Too much already: stop before filling the disk.
                    raise BlobMismatch(digest, Digest(h.hexdigest()), n, expected_size=size)
                _write_all(fd, chunk, digest, self.root)
            _cache_op(os.fsync, fd, digest=digest, root=self.root)
            actual = Digest(h.hexdigest())
            if actual != digest or (size is not None and n != size):
                raise BlobMismatch(digest, actual, n, expected_size=size)
            _cache_op(os.replace, tmp, final, digest=digest, root=self.root)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        finally:
            os.close(fd)  # the flock ends only now, after the rename
        fsync_dir(final.parent)
        st = _cache_op(os.stat, final, digest=digest, root=self.root)
        self._verified[digest.hex] = (st.st_size, st.st_mtime_ns, st.st_ino)
        return final

    def put_bytes(self, digest: Digest, data: bytes) -> Path:
        return self.put_stream(digest, (data,), len(data))

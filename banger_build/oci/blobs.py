"""The content-addressed blob cache: ``<home>/blobs/sha256/<hex>``.

A blob enters the cache only one way: streamed into a temp file under
``<root>/tmp`` (same filesystem), hashed while it is written, fsynced,
checked against the expected digest and size, and renamed into place. So
nothing ever appears at a final path unverified, and an interrupted or
truncated download leaves nothing behind (the seed's zero-byte blob that
poisoned every later pull cannot happen).

Reads verify too: ``get()`` hashes the file before handing it out and removes
a corrupt, empty or truncated one. A successful check is remembered for the
life of the process, keyed by the file's identity (size, mtime, inode), so
asking twice costs one ``stat``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from banger_build.fsutil import fsync_dir, hash_file
from banger_build.oci.reference import Digest

#: sha256 of zero bytes: the only digest whose blob may be empty.
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
CHUNK = 1 << 20
FILE_MODE = 0o644


class BlobMismatch(Exception):
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
        super().__init__(text)


class BlobCache:
    """Blobs by sha256 digest under ``root`` (normally ``<home>/blobs``)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.tmp = self.root / "tmp"
        # hex -> (st_size, st_mtime_ns, st_ino) of the file we last verified
        self._verified: dict[str, tuple[int, int, int]] = {}

    def __repr__(self) -> str:
        return f"BlobCache({str(self.root)!r})"

    def path(self, digest: Digest) -> Path:
        return self.root / "sha256" / digest.hex

    def get(self, digest: Digest, size: int | None = None) -> Path | None:
        """The blob's path if it is present and verified, else None.

        A file that is empty (for any digest but the empty one), has the
        wrong size or does not hash to ``digest`` is removed.
        """
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

    def _discard(self, path: Path, digest: Digest) -> None:
        self._verified.pop(digest.hex, None)
        # a read-only shared cache: leave the file, but never hand it out
        with contextlib.suppress(OSError):
            path.unlink()

    def put_stream(self, digest: Digest, chunks: Iterable[bytes], size: int | None = None) -> Path:
        """Write ``chunks`` to the cache as ``digest``, verifying digest and size.

        Raises BlobMismatch (and leaves nothing behind) when the content
        does not match. Exceptions raised by ``chunks`` propagate, also
        leaving nothing behind.
        """
        final = self.path(digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        fd, tmpname = tempfile.mkstemp(prefix=f"{digest.hex[:16]}.", suffix=".part", dir=self.tmp)
        tmp = Path(tmpname)
        try:
            h = hashlib.sha256()
            n = 0
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), FILE_MODE)
                for chunk in chunks:
                    if not chunk:
                        continue
                    n += len(chunk)
                    if size is not None and n > size:
                        # Too much already: stop before filling the disk.
                        h.update(chunk)
                        raise BlobMismatch(digest, Digest(h.hexdigest()), n, expected_size=size)
                    h.update(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            actual = Digest(h.hexdigest())
            if actual != digest or (size is not None and n != size):
                raise BlobMismatch(digest, actual, n, expected_size=size)
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        fsync_dir(final.parent)
        st = final.stat()
        self._verified[digest.hex] = (st.st_size, st.st_mtime_ns, st.st_ino)
        return final

    def put_bytes(self, digest: Digest, data: bytes) -> Path:
        return self.put_stream(digest, (data,), len(data))

"""The content-addressed blob cache: verified on the way in and on the way out."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from banger_build.errors import StoreError
from banger_build.oci import blobs
from banger_build.oci.blobs import EMPTY_SHA256, BlobCache, BlobMismatch, CacheError
from banger_build.oci.failure import Failure
from banger_build.oci.reference import Digest


def digest_of(data: bytes) -> Digest:
    return Digest(hashlib.sha256(data).hexdigest())


@pytest.fixture
def cache(tmp_path: Path) -> BlobCache:
    return BlobCache(tmp_path / "blobs")


def leftovers(cache: BlobCache) -> list[str]:
    return sorted(p.name for p in cache.tmp.iterdir()) if cache.tmp.exists() else []


def test_put_and_get_round_trip(cache: BlobCache) -> None:
    data = b"hello blob\n" * 1000
    d = digest_of(data)
    path = cache.put_bytes(d, data)
    assert path == cache.root / "sha256" / d.hex == cache.path(d)
    assert path.read_bytes() == data
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert cache.get(d) == path
    assert cache.get(d, len(data)) == path
    assert leftovers(cache) == []


def test_get_missing_is_none(cache: BlobCache) -> None:
    assert cache.get(digest_of(b"nothing")) is None  # not even the root exists


def test_put_stream_is_chunked_and_verified(cache: BlobCache) -> None:
    chunks = [os.urandom(1000) for _ in range(50)]
    data = b"".join(chunks)
    path = cache.put_stream(digest_of(data), iter(chunks), len(data))
    assert path.read_bytes() == data


def test_put_stream_without_size(cache: BlobCache) -> None:
    data = b"abc"
    assert cache.put_stream(digest_of(data), [b"a", b"", b"bc"], None).read_bytes() == data


def test_digest_mismatch_leaves_nothing(cache: BlobCache) -> None:
    good, evil = b"the real content", b"the evil content"
    d = digest_of(good)
    with pytest.raises(BlobMismatch) as info:
        cache.put_stream(d, [evil], len(evil))
    assert info.value.expected == d
    assert info.value.actual == digest_of(evil)
    assert info.value.size == len(evil)
    assert not cache.path(d).exists()
    assert leftovers(cache) == []


def test_truncated_stream_is_refused(cache: BlobCache) -> None:
    data = b"0123456789" * 10
    with pytest.raises(BlobMismatch, match="truncated"):
        cache.put_stream(digest_of(data), [data[:50]], len(data))
    assert not cache.path(digest_of(data)).exists()
    assert leftovers(cache) == []


def test_overlong_stream_stops_early(cache: BlobCache) -> None:
    data = b"x" * 10
    consumed: list[int] = []

    def endless() -> Iterator[bytes]:
        for i in range(1000):
            consumed.append(i)
            yield data

    with pytest.raises(BlobMismatch):
        cache.put_stream(digest_of(data), endless(), len(data))
    assert len(consumed) == 2  # stopped as soon as it had too much
    assert leftovers(cache) == []


def test_right_digest_wrong_size_is_refused(cache: BlobCache) -> None:
    data = b"content"
    with pytest.raises(BlobMismatch):
        cache.put_stream(digest_of(data), [data], len(data) + 1)
    assert not cache.path(digest_of(data)).exists()


def test_failing_source_leaves_nothing(cache: BlobCache) -> None:
    def broken() -> Iterator[bytes]:
        yield b"partial"
        raise ConnectionError("network went away")

    with pytest.raises(ConnectionError):
        cache.put_stream(digest_of(b"partial and more"), broken(), 16)
    assert not cache.path(digest_of(b"partial and more")).exists()
    assert leftovers(cache) == []


def test_empty_blob_only_for_the_empty_digest(cache: BlobCache) -> None:
    empty = Digest(EMPTY_SHA256)
    assert cache.put_bytes(empty, b"").stat().st_size == 0
    assert cache.get(empty, 0) == cache.path(empty)
    # A zero-byte file under any other digest is the seed's poisoned blob: removed.
    d = digest_of(b"layer")
    cache.path(d).write_bytes(b"")
    assert cache.get(d) is None
    assert not cache.path(d).exists()


@pytest.mark.parametrize("damage", ["corrupt", "truncate", "extend"])
def test_damaged_blob_is_removed(cache: BlobCache, damage: str) -> None:
    data = os.urandom(4096)
    d = digest_of(data)
    path = cache.put_bytes(d, data)
    fresh = BlobCache(cache.root)  # no memo of the earlier verification
    if damage == "corrupt":
        path.write_bytes(bytes(b ^ 0xFF for b in data))
    elif damage == "truncate":
        path.write_bytes(data[:100])
    else:
        path.write_bytes(data + b"!")
    assert fresh.get(d) is None
    assert not path.exists()


def test_size_mismatch_on_get(cache: BlobCache) -> None:
    data = b"sized"
    d = digest_of(data)
    cache.put_bytes(d, data)
    assert cache.get(d, len(data) + 1) is None
    assert not cache.path(d).exists()


def test_verification_is_memoised(cache: BlobCache, monkeypatch: pytest.MonkeyPatch) -> None:
    data = os.urandom(10000)
    d = digest_of(data)
    cache.put_bytes(d, data)
    fresh = BlobCache(cache.root)
    calls: list[Path] = []
    real = blobs.hash_file

    def counting(path: Path) -> tuple[str, int]:
        calls.append(path)
        return real(path)

    monkeypatch.setattr(blobs, "hash_file", counting)
    for _ in range(5):
        assert fresh.get(d) is not None
    assert len(calls) == 1
    # Replacing the file (new inode/mtime) forces a new check, which finds it corrupt.
    path = cache.path(d)
    tmp = path.with_name("x")
    tmp.write_bytes(os.urandom(10000))
    os.replace(tmp, path)
    assert fresh.get(d) is None
    assert len(calls) == 2


def test_put_is_memoised_too(cache: BlobCache, monkeypatch: pytest.MonkeyPatch) -> None:
    data = b"just written"
    d = digest_of(data)
    cache.put_bytes(d, data)
    monkeypatch.setattr(blobs, "hash_file", lambda path: pytest.fail("re-hashed"))
    assert cache.get(d) == cache.path(d)


def test_rewriting_an_existing_blob_is_harmless(cache: BlobCache) -> None:
    data = b"twice"
    d = digest_of(data)
    first = cache.put_bytes(d, data)
    second = cache.put_bytes(d, data)
    assert first == second and second.read_bytes() == data
    assert leftovers(cache) == []


def test_blob_mismatch_message_names_both_digests() -> None:
    a, b = digest_of(b"a"), digest_of(b"b")
    text = str(BlobMismatch(a, b, 1))
    assert str(a) in text and str(b) in text


# -- reading whole small blobs ---------------------------------------------------


def test_read_returns_the_verified_bytes(cache: BlobCache) -> None:
    data = b'{"config": true}'
    d = digest_of(data)
    assert cache.read(d, limit=100) is None
    cache.put_bytes(d, data)
    assert BlobCache(cache.root).read(d, len(data), limit=100) == data
    assert cache.read(d, len(data) + 1, limit=100) is None  # wrong size: removed
    assert not cache.path(d).exists()


def test_read_removes_a_corrupt_blob(cache: BlobCache) -> None:
    data = b"manifest bytes"
    d = digest_of(data)
    cache.put_bytes(d, data).write_bytes(b"tampered bytes")
    assert BlobCache(cache.root).read(d, limit=100) is None
    assert not cache.path(d).exists()


def test_read_refuses_past_its_limit(cache: BlobCache) -> None:
    data = b"x" * 101
    d = digest_of(data)
    cache.put_bytes(d, data)
    with pytest.raises(Failure) as info:
        cache.read(d, limit=100)
    assert info.value.reason == "too-large" and "101 bytes" in str(info.value)


# -- temp roots -------------------------------------------------------------------


class Roots:
    """A fake ``BlobRoots`` that runs ``on_add`` when a root is added."""

    def __init__(self, on_add: Callable[[str], None] = lambda hex_digest: None) -> None:
        self.added: list[str] = []
        self.on_add = on_add
        self.guarded = 0

    def add(self, hex_digest: str) -> None:
        self.added.append(hex_digest)
        self.on_add(hex_digest)

    def guard(self) -> contextlib.AbstractContextManager[None]:
        self.guarded += 1
        return contextlib.nullcontext()


@pytest.mark.parametrize("method", ["get", "read"])
def test_reads_root_the_blob_before_touching_it(tmp_path: Path, method: str) -> None:
    """The fake root writes the blob as it is added: a read that looked at the
    file before adding its root would have found nothing."""
    data = b"the blob"
    d = digest_of(data)
    cache = BlobCache(tmp_path / "blobs")

    def appear(hex_digest: str) -> None:
        cache.path(Digest(hex_digest)).parent.mkdir(parents=True, exist_ok=True)
        cache.path(Digest(hex_digest)).write_bytes(data)

    roots = Roots(appear)
    cache.roots = roots
    if method == "get":
        assert cache.get(d) == cache.path(d)
    else:
        assert cache.read(d, limit=100) == data
    assert roots.added == [d.hex]


def test_writes_root_the_blob_before_creating_any_file(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path / "blobs")
    seen: list[list[str]] = []
    roots = Roots(lambda hex_digest: seen.append(sorted(str(p) for p in tmp_path.rglob("*"))))
    cache.roots = roots
    data = b"new blob"
    cache.put_bytes(digest_of(data), data)
    assert roots.added == [digest_of(data).hex]
    assert seen == [[]]  # not even the cache's directories existed yet


def test_a_write_failure_is_a_cache_error_naming_the_cache(
    cache: BlobCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(fd: int, data: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(blobs.os, "write", full)
    data = b"does not fit"
    with pytest.raises(CacheError) as info:
        cache.put_bytes(digest_of(data), data)
    assert str(info.value) == (
        f"cannot write {digest_of(data)} to the blob cache {cache.root}: No space left on device"
    )
    error = info.value.error_for("r.example/app:1")
    assert isinstance(error, StoreError) and error.reason == "blob-cache"
    assert str(error).startswith("r.example/app:1: cannot write ")
    assert leftovers(cache) == [] and not cache.path(digest_of(data)).exists()

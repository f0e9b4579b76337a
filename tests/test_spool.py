"""The spool's copier and the hash that follows it, on real files.

``Copier`` merges copies that follow each other (padded to ALIGN) in the spool
and in the target into one ``copy_file_range``; ``FollowingHash`` hashes a file
behind its writer. Both must give exactly the bytes and the digest that plain
writes give, whatever the sizes, gaps and order of the pieces.
"""

from __future__ import annotations

import hashlib
import os
import random
import tarfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from banger_build.fsutil import FollowingHash
from banger_build.spool import ALIGN, Copier, Spool, data_segments
from banger_build.tree import REG, Inode
from tests.support.ext4read import read_image
from tests.support.image import build_image
from tests.support.tarlayer import member, sparse_member, write_layer


def _spool_files(tmp: Path, sizes: list[int], seed: int) -> tuple[Spool, list[tuple[Inode, bytes]]]:
    rng = random.Random(seed)
    spool = Spool(tmp / "spool")
    files = []
    for size in sizes:
        data = rng.randbytes(size)
        inode = Inode(REG, size=size)
        spool.add_bytes(inode, data)
        files.append((inode, data))
    spool.flush()
    return spool, files


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 3 * ALIGN + 7), min_size=1, max_size=40),
    gaps=st.lists(st.integers(0, 3), min_size=40, max_size=40),
    seed=st.integers(0, 2**32),
)
def test_copies_give_the_bytes_plain_writes_give(
    tmp_path_factory: pytest.TempPathFactory, sizes: list[int], gaps: list[int], seed: int
) -> None:
    tmp = tmp_path_factory.mktemp("copier")
    spool, files = _spool_files(tmp, sizes, seed)
    with spool:
        # block-aligned places in the target, some right after the last, some not;
        # the blocks in between hold other data (as directory blocks would)
        placed, at = [], 0
        for (inode, data), gap in zip(files, gaps, strict=False):
            at += gap * ALIGN
            placed.append((inode, data, at))
            at += -(-len(data) // ALIGN) * ALIGN
        size = at + ALIGN
        expected = bytearray(b"\xee" * size)
        for _inode, data, dst in placed:  # a file's blocks: its data, then zeros
            blocks = -(-len(data) // ALIGN) * ALIGN
            expected[dst : dst + blocks] = data.ljust(blocks, b"\0")
        target = tmp / "target"
        target.write_bytes(b"\xee" * size)
        with open(target, "r+b") as f:  # the blocks the files get hold zeros before
            for _inode, data, dst in placed:
                f.seek(dst)
                f.write(bytes(-(-len(data) // ALIGN) * ALIGN))
        fd = os.open(target, os.O_RDWR)
        try:
            with FollowingHash(target, size) as hashing:
                copier = Copier(spool, fd)
                copier.report(hashing.final)
                for inode, _data, dst in placed:
                    src = inode.src
                    for offset, length in data_segments(inode):
                        copier.add(src, length, dst + offset)
                        src += length
                copier.close()
                digest = hashing.digest()
        finally:
            os.close(fd)
        assert target.read_bytes() == bytes(expected)
        assert digest == hashlib.sha256(expected).hexdigest()


def test_copies_out_of_order_are_refused(tmp_path: Path) -> None:
    spool, files = _spool_files(tmp_path, [5000, 5000], 1)
    target = tmp_path / "target"
    target.write_bytes(bytes(8 * ALIGN))
    fd = os.open(target, os.O_RDWR)
    try:
        with spool:
            copier = Copier(spool, fd)
            copier.add(files[0][0].src, 5000, 4 * ALIGN)
            copier.add(files[1][0].src, 5000, 0)
            with pytest.raises(RuntimeError, match="out of order"):
                copier.close()
    finally:
        os.close(fd)


def test_following_hash_waits_for_what_is_final(tmp_path: Path) -> None:
    """Hashed behind the writes: a range said final is never read before it is."""
    path = tmp_path / "f"
    size = 9 * ALIGN + 100
    with open(path, "wb") as f:
        f.truncate(size)  # all a hole at first
    rng = random.Random(7)
    chunks = [rng.randbytes(ALIGN) for _ in range(9)] + [rng.randbytes(100)]
    fd = os.open(path, os.O_WRONLY)
    try:
        with FollowingHash(path, size) as hashing:
            for i, chunk in enumerate(chunks):
                os.pwrite(fd, chunk, i * ALIGN)
                hashing.final((i + 1) * ALIGN if i < 9 else size)
            assert hashing.digest() == hashlib.sha256(b"".join(chunks)).hexdigest()
    finally:
        os.close(fd)


def test_following_hash_of_holes_and_an_unfinished_exit(tmp_path: Path) -> None:
    path = tmp_path / "f"
    with open(path, "wb") as f:
        f.truncate(5 << 20)
        f.seek(3 << 20)
        f.write(b"x")
    with FollowingHash(path, 5 << 20) as hashing:
        assert hashing.digest() == hashlib.sha256(path.read_bytes()).hexdigest()
    with FollowingHash(path, 5 << 20) as hashing:
        hashing.final(1 << 20)  # left without digest(): the exit stops the thread


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_merged_copies_of_sparse_files_give_each_file_its_bytes(tmp_path: Path, seed: int) -> None:
    """Sparse members of random segments (lengths at, below and past 4 KiB, gaps of
    none to a few blocks) beside dense files of sizes about a block: the writer's
    copies merge over the padding where spool and image align; every file of the
    image must read back as its member, byte for byte."""
    rng = random.Random(seed)
    members: list[tuple[tarfile.TarInfo, bytes]] = []
    expect: dict[str, bytes] = {}
    for i in range(60):
        name = f"f{i:03d}"
        if rng.random() < 0.4:
            size = rng.choice([0, 1, 100, 4095, 4096, 4097, 8192, 12287, rng.randrange(1, 30000)])
            data = rng.randbytes(size)
            members.append(member(name, data=data))
            expect[name] = data
            continue
        size = rng.choice([4096 * rng.randrange(1, 12), rng.randrange(1, 60000)])
        segments: list[tuple[int, bytes]] = []
        pos = 0
        while pos < size:
            off = pos + rng.choice(
                [0, 0, rng.randrange(5000), -pos % 4096, 4096 * rng.randrange(3)]
            )
            if off >= size:
                break
            n = rng.choice([1, 100, 4096, 8192, 4096 - off % 4096, rng.randrange(1, 9000)])
            segments.append((off, rng.randbytes(min(size - off, n))))
            pos = off + len(segments[-1][1]) + rng.choice([0, 0, 1, 100, 4096])
        segments = segments or [(0, rng.randbytes(min(size, 10)))]
        whole = bytearray(size)
        for off, data in segments:
            whole[off : off + len(data)] = data
        members.append(sparse_member(name, segments, size))
        expect[name] = bytes(whole)
    image = build_image(tmp_path, [write_layer(tmp_path, members)])
    seen = read_image(image)
    for name, data in expect.items():
        assert (seen[name].size, seen[name].sha256) == (
            len(data),
            hashlib.sha256(data).hexdigest(),
        ), name


def test_following_hash_never_gives_a_digest_of_part_of_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from banger_build import fsutil

    path = tmp_path / "f"
    path.write_bytes(b"x" * (3 * ALIGN))

    def broken(*_args: object) -> None:
        raise MemoryError("hashing thread died")

    monkeypatch.setattr(fsutil, "_hash_span", broken)
    with FollowingHash(path, 3 * ALIGN) as hashing, pytest.raises(MemoryError):
        hashing.digest()


def test_a_failing_diff_id_hash_is_raised_not_hung(tmp_path: Path) -> None:
    """The hashing thread dies: the stream is still read to its end (the queue
    drains, the decompressing thread never blocks) and hexdigest raises."""
    import io

    from banger_build.tarstream import LayerReader

    class Broken:
        def update(self, _data: bytes) -> None:
            raise RuntimeError("sha256 failed")

    data = os.urandom(20 << 20)  # more chunks than both queues hold
    with LayerReader(io.BytesIO(data), budget=len(data)) as reader:
        reader._sha = Broken()  # type: ignore[assignment]
        read = 0
        while chunk := reader.read(1 << 20):
            read += len(chunk)
        assert read == len(data)
        with pytest.raises(RuntimeError, match="sha256 failed"):
            reader.hexdigest()

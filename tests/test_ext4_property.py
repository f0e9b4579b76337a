"""Property: any tree a layer can describe is written as an ext4 image that
e2fsck -fn passes and debugfs reads back as the layer said.

Hypothesis draws the trees: names of every length (1 to 255 bytes, any
Unicode but '/'), chains of directories 1 to 200 deep, directories of up to
1,500 entries, empty, small, sparse and 300 MiB-apparent files, many names
for one inode, xattrs of every size up to a full xattr block, symlinks up to
4095 bytes, devices, fifos, 32-bit owners, every mode bit, times from 1901
to 2446 with nanoseconds. The expected tree is computed from the drawn
entries here, not by banger_build.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from banger_build.ext4.format import MAX_TIME, MIN_TIME
from tests.support.ext4read import read_at, read_image
from tests.support.image import build_image
from tests.support.tarlayer import member, sparse_member, write_layer

_NAME_CHARS = st.characters(
    blacklist_characters="/\x00\r\n", blacklist_categories=("Cs",), max_codepoint=0x2FFFF
)


def _name_ok(name: str) -> bool:
    return name not in (".", "..") and not name.startswith(".wh.") and len(name.encode()) <= 255


NAMES = st.one_of(
    st.text(_NAME_CHARS, min_size=1, max_size=40),
    st.integers(100, 255).map(lambda n: "L" * n),
    st.integers(60, 85).map(lambda n: "\u00e9" * n),  # 2 bytes each: 120-170 bytes
).filter(_name_ok)


@dataclass
class Want:
    kind: str
    uid: int
    gid: int
    perm: int
    mtime: int
    mtime_ns: int
    data: bytes = b""
    size: int = 0
    pieces: list[tuple[int, bytes]] = field(default_factory=list)  # sparse files
    target: str | None = None
    rdev: tuple[int, int] | None = None
    xattrs: dict[str, bytes] = field(default_factory=dict)
    links: int = 1
    same_as: str | None = None


TIMES = st.tuples(st.integers(MIN_TIME, MAX_TIME), st.integers(0, 999_999_999))
IDS = st.integers(0, 0xFFFF_FFFE)
XATTRS = st.one_of(
    st.just({}),
    st.dictionaries(
        st.sampled_from(["user.a", "user.comment", "trusted.x", "security.capability"]),
        st.binary(max_size=200),
        max_size=4,
    ),
    st.integers(1, 3960).map(lambda n: {"user.big": b"v" * n}),  # up to a full block
)


@st.composite
def leaves(draw: st.DrawFn) -> Want:
    kind = draw(st.sampled_from(["reg", "reg", "sparse", "symlink", "chr", "blk", "fifo"]))
    seconds, nsec = draw(TIMES)
    want = Want(
        kind="reg" if kind == "sparse" else kind,
        uid=draw(IDS),
        gid=draw(IDS),
        perm=draw(st.integers(0, 0o7777)),
        mtime=seconds,
        mtime_ns=nsec,
        xattrs=draw(XATTRS),
    )
    if kind == "reg":
        want.data = draw(st.one_of(st.binary(max_size=300), st.integers(0, 300_000).map(_bytes)))
        want.size = len(want.data)
    elif kind == "sparse":
        want.xattrs = {}  # a sparse member carries none here
        want.size = draw(st.integers(1, 300 << 20))
        offsets = sorted(draw(st.sets(st.integers(0, want.size - 1), min_size=1, max_size=40)))
        ends = [*offsets[1:], want.size]
        want.pieces = [(o, _bytes(min(e - o, 5000), o)) for o, e in zip(offsets, ends, strict=True)]
    elif kind == "symlink":
        want.target = draw(
            st.one_of(
                st.text(_NAME_CHARS, min_size=1, max_size=70),
                st.integers(1, 4095).map(lambda n: "t" * n),
            ).filter(lambda t: len(t.encode()) <= 4095 and ".." not in t.split("/"))
        )
        want.perm = 0o777
    elif kind in ("chr", "blk"):
        want.rdev = (draw(st.integers(0, 4095)), draw(st.integers(0, 0xFFFFF)))
    return want


def _bytes(n: int, seed: int = 0) -> bytes:
    out = bytearray()
    block = hashlib.sha256(b"%d" % seed).digest()
    while len(out) < n:
        out += block
        block = hashlib.sha256(block).digest()
    return bytes(out[:n])


@st.composite
def trees(draw: st.DrawFn) -> dict[str, Want]:
    """path -> what it must be; directories included (their parents first)."""
    out: dict[str, Want] = {}

    def add_dir(path: str) -> None:
        seconds, nsec = draw(TIMES)
        out[path] = Want("dir", draw(IDS), draw(IDS), draw(st.integers(0, 0o7777)), seconds, nsec)

    for i in range(draw(st.integers(0, 3))):  # deep chains
        path = f"deep{i}"
        add_dir(path)
        for _ in range(draw(st.integers(1, 200))):
            path += "/" + draw(st.sampled_from(["d", "dd", "a" * 200]))
            if len(path.encode()) > 3800:
                break
            add_dir(path)
        out[path + "/leaf"] = draw(leaves())
    for i in range(draw(st.integers(0, 2))):  # wide directories
        add_dir(f"wide{i}")
        for j in range(draw(st.integers(1, 1500))):
            out[f"wide{i}/{j}-" + "w" * (j % 97)] = Want("reg", 0, 0, 0o644, 0, 0)
    add_dir("misc")
    for name in draw(st.lists(NAMES, max_size=25, unique=True)):
        out[f"misc/{name}"] = draw(leaves())
    regular = [p for p, w in out.items() if w.kind == "reg" and w.same_as is None]
    if regular:
        first = draw(st.sampled_from(regular))
        names = draw(st.integers(1, 60))
        for k in range(names):
            out[f"misc/link-{k}"] = Want("reg", 0, 0, 0, 0, 0, same_as=first)
        out[first].links += names
    return out


def _layer_members(tree: dict[str, Want]) -> list:  # type: ignore[type-arg]
    members = []
    for path, w in tree.items():
        pax = {"mtime": f"{w.mtime}.{w.mtime_ns:09d}"} if w.mtime >= 0 else None
        meta = {"uid": w.uid, "gid": w.gid, "mode": w.perm, "mtime": w.mtime, "pax": pax}
        if w.same_as is not None:
            members.append(member(path, "hardlink", linkname=w.same_as))
        elif w.kind == "dir":
            members.append(member(path, "dir", xattrs=w.xattrs, **meta))
        elif w.pieces:
            info, data = sparse_member(path, w.pieces, w.size)
            info.uid, info.gid, info.mode, info.mtime = w.uid, w.gid, w.perm, w.mtime
            info.pax_headers = {**info.pax_headers, **(pax or {})}
            members.append((info, data))
        elif w.kind == "reg":
            members.append(member(path, data=w.data, xattrs=w.xattrs, **meta))
        elif w.kind == "symlink":
            members.append(member(path, "symlink", linkname=w.target or "", **meta))
        else:
            members.append(member(path, w.kind, dev=w.rdev or (0, 0), xattrs=w.xattrs, **meta))
    return members


@settings(
    max_examples=int(os.environ.get("BANGER_PROPERTY_EXAMPLES", "30")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(tree=trees())
def test_any_tree_is_written_as_ext4_and_read_back_as_written(tree: dict[str, Want]) -> None:
    import tempfile

    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        work = Path(tmp)
        layer = write_layer(work, _layer_members(tree), "none")
        image = build_image(work / "img", [layer])  # e2fsck -fn passes (asserted there)
        seen = read_image(image, contents=True)
        for path, w in tree.items():
            got = seen[path]
            src = tree[w.same_as] if w.same_as else w
            kind = {"reg": stat.S_IFREG, "dir": stat.S_IFDIR, "symlink": stat.S_IFLNK}
            kind |= {"chr": stat.S_IFCHR, "blk": stat.S_IFBLK, "fifo": stat.S_IFIFO}
            assert got.mode == kind[src.kind] | src.perm, path
            assert (got.uid, got.gid) == (src.uid, src.gid), path
            if src.mtime >= 0:  # tarfile writes a negative mtime without its fraction
                assert (got.mtime, got.mtime_ns) == (src.mtime, src.mtime_ns), path
            if src.kind == "reg" and not src.pieces:
                assert got.sha256 == hashlib.sha256(src.data).hexdigest(), path
            if src.pieces:
                assert got.size == src.size
                for offset, data in src.pieces[:3]:
                    assert read_at(image, got.ino, offset, len(data)) == data, (path, offset)
            if src.kind == "symlink":
                assert got.target == src.target, path
            if src.rdev is not None:
                assert got.rdev == src.rdev, path
            if src.kind != "symlink":
                assert got.xattrs == src.xattrs, path
            if src.kind != "dir":
                assert got.links == src.links, path
            if w.same_as:
                assert got.ino == seen[w.same_as].ino

"""The in-memory model of the image's filesystem.

Flattening builds a ``Tree``: every path the image will hold, with the
owner, mode, times and xattrs its tar headers gave it; a regular file's
content is in the build's spool (``banger_build.spool``), which the tree's
inodes point into. The ext4 writer turns tree and spool into the image.

Hard links are two ``Node``s sharing one ``Inode``.
"""

from __future__ import annotations

import stat
from array import array
from collections.abc import Iterator
from dataclasses import dataclass

REG, DIR, SYMLINK, FIFO, CHR, BLK = "reg", "dir", "symlink", "fifo", "chr", "blk"
SPECIAL = frozenset({FIFO, CHR, BLK})

_TYPE_BITS = {
    REG: stat.S_IFREG,
    DIR: stat.S_IFDIR,
    SYMLINK: stat.S_IFLNK,
    FIFO: stat.S_IFIFO,
    CHR: stat.S_IFCHR,
    BLK: stat.S_IFBLK,
}

#: Longest name ext4 can store in a directory entry, in bytes.
NAME_MAX = 255


@dataclass(eq=False, slots=True)
class Inode:
    """What ext4 keeps per inode. Mutable while flattening; shared by hard links.

    Slotted, with defaults that allocate nothing (a tree holds one per entry of
    the image: memory per entry is what bounds a build's peak).
    """

    type: str
    uid: int = 0
    gid: int = 0
    perm: int = 0o755  # permission bits incl. setuid/setgid/sticky (0o7777)
    mtime: int = 0
    size: int = 0
    target: str = ""  # symlink target
    rdev: tuple[int, int] = (0, 0)
    xattrs: dict[str, bytes] | None = None
    nlink: int = 1
    ino: int = 0  # assigned by the ext4 writer
    #: where a regular file's data starts in the build's spool (``banger_build.spool``)
    src: int = -1
    #: the ranges of a regular file that hold data, flat (offset, length, ...) in an
    #: array of 64-bit numbers (16 bytes a range); None: all of it, from 0 to
    #: ``size``. Holes take no blocks in the image.
    segments: array[int] | None = None
    #: nanoseconds of ``mtime`` (times are kept as the tar header gives them)
    mtime_ns: int = 0

    @property
    def mode(self) -> int:
        """Full st_mode, file-type bits included (what ``sif mode`` takes)."""
        return _TYPE_BITS[self.type] | (self.perm & 0o7777)


@dataclass(eq=False, slots=True)
class Node:
    """A directory entry: a name bound to an inode (and, for dirs, children)."""

    inode: Inode
    children: dict[str, Node] | None = None
    #: which layer touched the entry last, for whiteouts (``Flattener``'s marks)
    mark: int = 0

    @property
    def is_dir(self) -> bool:
        return self.inode.type == DIR


def new_dir(uid: int = 0, gid: int = 0, perm: int = 0o755, mtime: int = 0) -> Node:
    return Node(Inode(DIR, uid=uid, gid=gid, perm=perm, mtime=mtime), children={})


class Tree:
    """A rooted directory tree of Nodes addressed by normalised relative paths."""

    def __init__(self) -> None:
        self.root = new_dir()

    def lookup(self, path: str) -> Node | None:
        node = self.root
        if not path:
            return node
        for part in path.split("/"):
            if node.children is None:
                return None
            child = node.children.get(part)
            if child is None:
                return None
            node = child
        return node

    def walk(self) -> Iterator[tuple[str, Node]]:
        """Every (path, node), parents before children, names in byte order."""
        stack: list[tuple[str, Node]] = [("", self.root)]
        while stack:
            path, node = stack.pop()
            yield path, node
            if node.children:
                for name in sorted(node.children, key=_name_key, reverse=True):
                    child = node.children[name]
                    stack.append((f"{path}/{name}" if path else name, child))

    def nodes(self) -> Iterator[Node]:
        """Every node in ``walk`` order, without building the paths."""
        stack: list[Node] = [self.root]
        while stack:
            node = stack.pop()
            yield node
            if node.children:
                children = node.children
                stack.extend(children[n] for n in sorted(children, key=_name_key, reverse=True))

    def inodes(self) -> list[Inode]:
        """Distinct inodes, in walk order of their first path."""
        seen: set[int] = set()  # only inodes with more than one name can repeat
        out: list[Inode] = []
        for node in self.nodes():
            inode = node.inode
            if inode.nlink > 1:
                if id(inode) in seen:
                    continue
                seen.add(id(inode))
            out.append(inode)
        return out


def _name_key(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")


def name_bytes(name: str) -> bytes:
    return _name_key(name)

"""kmod's index format, the ``modules.*.bin`` files libkmod reads: a trie of keys to values.

Written as depmod of kmod 30 (Debian 12's) writes it, byte for byte (kmod's
``libkmod/libkmod-index.c`` documents the format; ``tools/depmod.c`` writes it)::

    u32 magic 0xB007F457, u32 version 0x00020001, u32 offset of the root node
    node:  [prefix NUL]  [first, last: u8; u32 child offset per character first..last]
           [u32 value count; per value: u32 priority, value NUL]

Integers are big-endian. A node's offset carries in its high nibble which parts
it has (0x8 prefix, 0x4 values, 0x2 children), so a node with none is never
read past its offset. A node other than the root has values or two children
at least (a chain of single children is one node, its prefix). Children are written
before their parent, in character order; a node's values are sorted by
priority, a later value before an earlier one of the same priority. Keys and
values are 7-bit ASCII without NUL.
"""

from __future__ import annotations

import struct

MAGIC = 0xB007F457
VERSION = 0x00020001
_PREFIX = 0x80000000
_VALUES = 0x40000000
_CHILDREN = 0x20000000
_MASK = 0x0FFFFFFF  # the most a node's offset can be


class IndexFormatError(ValueError):
    """A key or value the format cannot carry, or an index past its offsets' range."""


class _Node:
    __slots__ = ("children", "offset", "prefix", "values")

    def __init__(self, prefix: bytes) -> None:
        self.prefix = prefix
        self.children: dict[int, _Node] = {}
        #: (priority, -insertion number, value): sorting gives the written order
        self.values: list[tuple[int, int, bytes]] = []
        self.offset = 0


def _check(text: bytes) -> None:
    if any(b >= 0x80 or b == 0 for b in text):
        raise IndexFormatError(f"{text[:200]!r}: not 7-bit ASCII (the index cannot carry it)")


class Index:
    """An index being built: ``insert`` then ``to_bytes``."""

    def __init__(self) -> None:
        self._root = _Node(b"")
        self._count = 0

    def insert(self, key: bytes, value: bytes, priority: int) -> None:
        """Add ``value`` under ``key`` (a key may have several values, duplicates too)."""
        _check(key)
        _check(value)
        self._count += 1
        entry = (priority, -self._count, value)
        node, i = self._root, 0
        while True:
            prefix = node.prefix
            j = 0
            while j < len(prefix):
                if i + j >= len(key) or key[i + j] != prefix[j]:
                    # split: the node keeps prefix[:j], a child at prefix[j] keeps the rest
                    child = _Node(prefix[j + 1 :])
                    child.children, child.values = node.children, node.values
                    node.prefix, node.children, node.values = prefix[:j], {prefix[j]: child}, []
                    break
                j += 1
            i += j
            if i == len(key):
                node.values.append(entry)
                return
            nxt = node.children.get(key[i])
            if nxt is None:
                leaf = _Node(key[i + 1 :])
                leaf.values.append(entry)
                node.children[key[i]] = leaf
                return
            node, i = nxt, i + 1

    def to_bytes(self) -> bytes:
        out = bytearray(struct.pack(">III", MAGIC, VERSION, 0))
        stack: list[tuple[_Node, bool]] = [(self._root, False)]
        while stack:  # post-order without recursion: keys can be PATH_MAX long
            node, children_done = stack.pop()
            if not children_done:
                stack.append((node, True))
                stack.extend((node.children[c], False) for c in sorted(node.children, reverse=True))
                continue
            offset = len(out)
            if offset > _MASK:
                raise IndexFormatError(f"the index is larger than {_MASK} bytes")
            if node.prefix:
                out += node.prefix + b"\0"
                offset |= _PREFIX
            if node.children:
                first, last = min(node.children), max(node.children)
                out += bytes((first, last))
                for c in range(first, last + 1):
                    child = node.children.get(c)
                    out += struct.pack(">I", child.offset if child is not None else 0)
                offset |= _CHILDREN
            if node.values:
                out += struct.pack(">I", len(node.values))
                for priority, _, value in sorted(node.values):
                    out += struct.pack(">I", priority) + value + b"\0"
                offset |= _VALUES
            node.offset = offset
        out[8:12] = struct.pack(">I", self._root.offset)
        return bytes(out)


def read_index(data: bytes) -> dict[bytes, list[tuple[int, bytes]]]:
    """Every key of an index and its values in stored order (whatever order its
    nodes were written in: kmod 30 writes children first, later versions parents)."""
    magic, version, root = struct.unpack_from(">III", data)
    if magic != MAGIC or version >> 16 != VERSION >> 16:
        raise IndexFormatError(f"not a kmod index (magic {magic:#x}, version {version:#x})")

    def string(pos: int) -> tuple[bytes, int]:
        end = data.index(b"\0", pos)
        return data[pos:end], end + 1

    out: dict[bytes, list[tuple[int, bytes]]] = {}
    stack = [(root, b"")]
    while stack:
        offset, key = stack.pop()
        pos = offset & _MASK
        if offset & _PREFIX:
            prefix, pos = string(pos)
            key += prefix
        if offset & _CHILDREN:
            first, last = data[pos], data[pos + 1]
            pos += 2
            for c in range(first, last + 1):
                (child,) = struct.unpack_from(">I", data, pos)
                pos += 4
                if child & _MASK:
                    stack.append((child, key + bytes((c,))))
        if offset & _VALUES:
            (count,) = struct.unpack_from(">I", data, pos)
            pos += 4
            values = []
            for _ in range(count):
                (priority,) = struct.unpack_from(">I", data, pos)
                value, pos = string(pos + 4)
                values.append((priority, value))
            out[key] = values
    return out

"""ext4's on-disk structures, packed: superblock, group descriptors, inodes,
extent nodes, directory blocks, xattrs, the journal superblock; and the
crc32c checksums ``metadata_csum`` puts on each of them.

Only what banger-build writes is here: 4 KiB blocks, 256-byte inodes,
64-byte group descriptors, linear directories with a checksum tail. Offsets
follow the kernel's ``fs/ext4/ext4.h`` and e2fsprogs' ``ext2_fs.h``.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import struct
from collections.abc import Callable
from typing import cast


def _load_crc32c() -> Callable[..., int]:
    """The ``crc32c`` package's C function (hardware CRC32C). The package's
    ``__init__`` asks ``importlib.metadata`` for its own version, 14 ms of every
    run, so its extension module is loaded by itself; the package is imported
    when that cannot be done."""
    try:
        spec = importlib.util.find_spec("crc32c")  # finds, does not import
        for where in (spec.submodule_search_locations or []) if spec else []:
            finder = importlib.machinery.FileFinder(
                where,
                (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES),
            )
            found = finder.find_spec("crc32c._crc32c")
            if found is not None and found.loader is not None:
                module = importlib.util.module_from_spec(found)
                found.loader.exec_module(module)
                return cast("Callable[..., int]", module.crc32c)
    except (ImportError, OSError, AttributeError):
        pass
    import crc32c

    return cast("Callable[..., int]", crc32c.crc32c)


_crc32c = _load_crc32c()

BLOCK = 4096
INODE_SIZE = 256
DESC_SIZE = 64
BLOCKS_PER_GROUP = 8 * BLOCK  # bits in one bitmap block
#: Bytes of the fixed inode fields beyond the first 128 (through i_projid).
EXTRA_ISIZE = 32
FIRST_INO = 11
ROOT_INO = 2
RESIZE_INO = 7
JOURNAL_INO = 8
LOST_FOUND_INO = 11
#: Extents: 4 in the inode's i_block, (4096 - 12 - 4) / 12 in a block.
EXTENTS_IN_INODE = 4
EXTENTS_IN_BLOCK = (BLOCK - 12 - 4) // 12
MAX_EXTENT_LEN = 32768  # an initialized extent's ee_len
#: A symlink target shorter than i_block (60 bytes) is stored in it.
FAST_SYMLINK_MAX = 59
#: One dirent checksum tail at the end of every directory block.
DIR_TAIL = 12
#: The in-inode xattr area: after the extra fields, to the end of the inode.
INODE_XATTR_AREA = INODE_SIZE - 128 - EXTRA_ISIZE

S_IFMT = 0o170000
FT_REG, FT_DIR, FT_CHR, FT_BLK, FT_FIFO, FT_SOCK, FT_SYMLINK = 1, 2, 3, 4, 5, 6, 7

COMPAT_HAS_JOURNAL = 0x4
COMPAT_EXT_ATTR = 0x8
COMPAT_RESIZE_INODE = 0x10
COMPAT_DIR_INDEX = 0x20
INCOMPAT_FILETYPE = 0x2
INCOMPAT_EXTENTS = 0x40
INCOMPAT_64BIT = 0x80
INCOMPAT_FLEX_BG = 0x200
RO_COMPAT_SPARSE_SUPER = 0x1
RO_COMPAT_LARGE_FILE = 0x2
RO_COMPAT_HUGE_FILE = 0x8
RO_COMPAT_DIR_NLINK = 0x20
RO_COMPAT_EXTRA_ISIZE = 0x40
RO_COMPAT_METADATA_CSUM = 0x400

EXTENTS_FL = 0x80000
BG_INODE_ZEROED = 0x4
XATTR_MAGIC = 0xEA020000
EXTENT_MAGIC = 0xF30A
JBD2_MAGIC = 0xC03B3998
JBD2_SUPERBLOCK_V2 = 4


def crc32c(seed: int, data: bytes | bytearray | memoryview) -> int:
    """e2fsprogs' ``ext2fs_crc32c_le(seed, data)``: raw CRC32C, no final inversion."""
    return (~_crc32c(data, value=~seed & 0xFFFFFFFF)) & 0xFFFFFFFF


def fs_seed(uuid: bytes) -> int:
    return crc32c(0xFFFFFFFF, uuid)


def inode_seed(seed: int, ino: int, generation: int = 0) -> int:
    """The checksum seed of one inode's metadata (its extent and directory blocks)."""
    return crc32c(crc32c(seed, struct.pack("<I", ino)), struct.pack("<I", generation))


# -- time ---------------------------------------------------------------------

#: Seconds ext4 keeps with 256-byte inodes: a signed 32-bit field plus two epoch
#: bits, 1901-12-13 to 2446-05-10.
MIN_TIME = -(2**31)
MAX_TIME = 2**34 - 2**31 - 1


def encode_time(seconds: int, nsec: int) -> tuple[int, int]:
    """(the 32-bit field, the extra field) of a time; clamped to ext4's range."""
    if seconds < MIN_TIME:
        seconds, nsec = MIN_TIME, 0
    elif seconds > MAX_TIME:
        seconds, nsec = MAX_TIME, 999_999_999
    low = seconds & 0xFFFFFFFF
    signed = low - (1 << 32) if low & 0x80000000 else low
    epoch = ((seconds - signed) >> 32) & 3
    return low, (nsec << 2) | epoch


# -- inodes -------------------------------------------------------------------

_INODE = struct.Struct(
    "<HHIIIIIHHIII60sIIIIHHHHHH"  # the first 128 bytes (osd2 unrolled)
    "HHIIIIIII"  # isize, csum_hi, c/m/atime extra, crtime (+extra), version_hi, projid
)


def pack_inode(
    *,
    ino: int,
    seed: int,
    mode: int,
    uid: int,
    gid: int,
    size: int,
    times: tuple[int, int],  # (seconds, nsec) for atime, ctime and mtime
    crtime: tuple[int, int],
    links: int,
    blocks: int,  # 512-byte units
    flags: int,
    i_block: bytes,
    file_acl: int = 0,
    xattrs: bytes = b"",  # the in-inode area (magic + entries + values), or empty
) -> bytes:
    t, t_extra = encode_time(*times)
    c, c_extra = encode_time(*crtime)
    raw = bytearray(
        _INODE.pack(
            mode,
            uid & 0xFFFF,
            size & 0xFFFFFFFF,
            t,
            t,
            t,
            0,
            gid & 0xFFFF,
            links,
            blocks & 0xFFFFFFFF,
            flags,
            0,
            i_block,
            0,  # generation
            file_acl & 0xFFFFFFFF,
            size >> 32,
            0,
            (blocks >> 32) & 0xFFFF,
            file_acl >> 32,
            uid >> 16,
            gid >> 16,
            0,  # checksum lo
            0,
            EXTRA_ISIZE,
            0,  # checksum hi
            t_extra,
            t_extra,
            t_extra,
            c,
            c_extra,
            0,
            0,
        )
    )
    raw += xattrs
    raw += bytes(INODE_SIZE - len(raw))
    csum = crc32c(inode_seed(seed, ino), raw)
    struct.pack_into("<H", raw, 0x7C, csum & 0xFFFF)
    struct.pack_into("<H", raw, 0x82, csum >> 16)
    return bytes(raw)


def device_block(major: int, minor: int) -> bytes:
    """i_block of a device node: the old 16-bit encoding when it fits, else the new."""
    if major < 256 and minor < 256:
        return struct.pack("<I", (major << 8) | minor) + bytes(56)
    new = (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)
    return struct.pack("<II", 0, new) + bytes(52)


# -- extents --------------------------------------------------------------------

Extent = tuple[int, int, int]  # (logical block, physical block, length)


def extent_header(entries: int, capacity: int, depth: int) -> bytes:
    return struct.pack("<HHHHI", EXTENT_MAGIC, entries, capacity, depth, 0)


def pack_leaf_entries(extents: list[Extent]) -> bytes:
    return b"".join(
        struct.pack("<IHHI", lblk, length, pblk >> 32, pblk & 0xFFFFFFFF)
        for lblk, pblk, length in extents
    )


def pack_index_entries(entries: list[tuple[int, int]]) -> bytes:
    """(first logical block covered, the child node's block) per entry."""
    return b"".join(
        struct.pack("<IIHH", lblk, pblk & 0xFFFFFFFF, pblk >> 32, 0) for lblk, pblk in entries
    )


def extent_block(body: bytes, entries: int, depth: int, iseed: int) -> bytes:
    """A non-root extent node: header, entries, zeros, and the checksum tail."""
    raw = bytearray(BLOCK)
    head = extent_header(entries, EXTENTS_IN_BLOCK, depth) + body
    raw[: len(head)] = head
    tail = 12 + 12 * EXTENTS_IN_BLOCK
    struct.pack_into("<I", raw, tail, crc32c(iseed, raw[:tail]))
    return bytes(raw)


# -- directories ------------------------------------------------------------------


def dirent_size(name_len: int) -> int:
    return (8 + name_len + 3) & ~3


def dir_tail(block: bytearray, iseed: int) -> None:
    """Write the checksum tail (a fake dirent) into the last 12 bytes of ``block``."""
    end = BLOCK - DIR_TAIL
    struct.pack_into("<IHBB", block, end, 0, DIR_TAIL, 0, 0xDE)
    struct.pack_into("<I", block, end + 8, crc32c(iseed, block[:end]))


# -- xattrs ---------------------------------------------------------------------------

#: ext4's name indexes: the prefix is not stored, its number is.
_NAME_INDEX = (
    ("system.posix_acl_access", 2),
    ("system.posix_acl_default", 3),
    ("user.", 1),
    ("trusted.", 4),
    ("security.", 6),
    ("system.", 7),
)
_ACL_SHORT_TAGS = frozenset({0x01, 0x04, 0x10, 0x20})  # USER_OBJ GROUP_OBJ MASK OTHER


def split_xattr_name(name: bytes) -> tuple[int, bytes]:
    for prefix, index in _NAME_INDEX:
        if name.startswith(prefix.encode()):
            return index, name[len(prefix) :]
    return 0, name


def acl_to_disk(value: bytes) -> bytes:
    """A POSIX ACL as the VFS passes it (version 2, 8-byte entries) in ext4's
    on-disk form (version 1; owner, group, mask and other entries without an id)."""
    out = [struct.pack("<I", 1)]
    for tag, perm, ident in struct.iter_unpack("<HHI", value[4:]):
        if tag in _ACL_SHORT_TAGS:
            out.append(struct.pack("<HH", tag, perm))
        else:
            out.append(struct.pack("<HHI", tag, perm, ident))
    return b"".join(out)


def _entry_hash(name: bytes, value: bytes) -> int:
    h = 0
    for c in name:
        h = ((h << 5) ^ (h >> 27) ^ c) & 0xFFFFFFFF
    padded = value + bytes(-len(value) % 4)
    for (word,) in struct.iter_unpack("<I", padded):
        h = ((h << 16) ^ (h >> 16) ^ word) & 0xFFFFFFFF
    return h


XattrEntry = tuple[int, bytes, bytes]  # (name index, name suffix, value on disk)


def xattr_entries(xattrs: dict[str, bytes]) -> list[XattrEntry]:
    """The entries in ext4's order (index, name length, name): the kernel stops
    looking in a block at the first larger entry."""
    out = []
    for name, value in xattrs.items():
        index, suffix = split_xattr_name(name.encode())
        if index in (2, 3):
            value = acl_to_disk(value)
        out.append((index, suffix, value))
    out.sort(key=lambda e: (e[0], len(e[1]), e[1]))
    return out


def xattr_space(entries: list[XattrEntry]) -> int:
    """Bytes of entries and values (each padded to 4), without header or end marker."""
    return sum(dirent_size(len(s)) + 8 + (len(v) + 3 & ~3) for _, s, v in entries)


def _pack_xattrs(entries: list[XattrEntry], area: int, base: int) -> tuple[bytearray, list[int]]:
    """Entries from offset 0 and values from the end of an ``area``-byte buffer.
    Value offsets are stored relative to ``base`` bytes before the buffer."""
    raw = bytearray(area)
    pos = 0
    end = area
    hashes = []
    for index, suffix, value in entries:
        offset = 0  # an empty value has no place (as the kernel writes it)
        if value:
            end -= len(value) + 3 & ~3
            raw[end : end + len(value)] = value
            offset = end + base
        h = _entry_hash(suffix, value)
        hashes.append(h)
        struct.pack_into("<BBHIII", raw, pos, len(suffix), index, offset, 0, len(value), h)
        raw[pos + 16 : pos + 16 + len(suffix)] = suffix
        pos += dirent_size(len(suffix)) + 8
    return raw, hashes


def inode_xattrs(entries: list[XattrEntry]) -> bytes | None:
    """The in-inode area (magic, entries, values), or None when they do not fit."""
    area = INODE_XATTR_AREA - 4
    if xattr_space(entries) + 4 > area:  # 4: the zero word ending the entries
        return None
    raw, _ = _pack_xattrs(entries, area, 0)
    return struct.pack("<I", XATTR_MAGIC) + bytes(raw)


def xattr_block(entries: list[XattrEntry], blocknr: int, seed: int) -> bytes:
    raw, hashes = _pack_xattrs(entries, BLOCK - 32, 32)
    block_hash = 0
    for h in hashes:
        block_hash = ((block_hash << 16) ^ (block_hash >> 16) ^ h) & 0xFFFFFFFF
    out = bytearray(struct.pack("<IIII", XATTR_MAGIC, 1, 1, block_hash) + bytes(16)) + raw
    csum = crc32c(crc32c(seed, struct.pack("<Q", blocknr)), out)
    struct.pack_into("<I", out, 16, csum)
    return bytes(out)


def fits_in_block(entries: list[XattrEntry]) -> bool:
    return xattr_space(entries) + 4 <= BLOCK - 32


# -- journal --------------------------------------------------------------------------


def journal_superblock(blocks: int, uuid: bytes) -> bytes:
    """An empty, clean jbd2 v2 superblock (big-endian), as mke2fs writes it."""
    raw = bytearray(BLOCK)
    struct.pack_into(">III", raw, 0, JBD2_MAGIC, JBD2_SUPERBLOCK_V2, 0)
    # s_blocksize, s_maxlen, s_first, s_sequence, s_start, s_errno
    struct.pack_into(">IIIIIi", raw, 12, BLOCK, blocks, 1, 1, 0, 0)
    raw[0x30:0x40] = uuid
    struct.pack_into(">I", raw, 0x40, 1)  # s_nr_users
    return bytes(raw)

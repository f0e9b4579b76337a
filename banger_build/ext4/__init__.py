"""ext4 images, written directly: no mkfs, no debugfs, nothing from the host.

- ``format``: the on-disk structures and their crc32c checksums;
- ``layout``: the geometry of an image of a given size, the block allocator,
  and sizing (the smallest image a tree fits, ``auto`` and fixed sizes);
- ``writer``: the tree and the spool -> ``rootfs.ext4``;
- ``fsck``: ``e2fsck -fn``, the independent check.

``PARAMS`` are the choices that shape the bytes; they and the writer's
``FORMAT_VERSION`` go into the derivation (the host's e2fsprogs does not).
"""

from __future__ import annotations

import hashlib
import uuid

from banger_build.ext4.format import BLOCK, INODE_SIZE
from banger_build.ext4.fsck import check_filesystem
from banger_build.ext4.layout import (
    INODE_RATIO,
    MAX_SIZE,
    MiB,
    SizePlan,
    human,
    plan_size,
)
from banger_build.ext4.writer import FORMAT_VERSION, LABEL, Written, write_image

FEATURES = (
    "has_journal,ext_attr,resize_inode,dir_index,filetype,extent,64bit,flex_bg,"
    "sparse_super,large_file,huge_file,dir_nlink,extra_isize,metadata_csum"
)

PARAMS: dict[str, object] = {
    "writer": FORMAT_VERSION,
    "block_size": BLOCK,
    "inode_size": INODE_SIZE,
    "features": FEATURES.split(","),
    "reserved_percent": 0,
    "inode_ratio": INODE_RATIO,
    "label": LABEL.decode(),
}

__all__ = [
    "BLOCK",
    "MAX_SIZE",
    "PARAMS",
    "MiB",
    "SizePlan",
    "Written",
    "check_filesystem",
    "derived_uuid",
    "human",
    "plan_size",
    "write_image",
]


def derived_uuid(key: str, purpose: str) -> str:
    """A non-zero RFC 4122 version-4-shaped UUID derived from the store key."""
    raw = bytearray(hashlib.sha256(f"{purpose}:{key}".encode()).digest()[:16])
    raw[6] = (raw[6] & 0x0F) | 0x40
    raw[8] = (raw[8] & 0x3F) | 0x80
    return str(uuid.UUID(bytes=bytes(raw)))

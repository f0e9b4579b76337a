"""The named bounds on what one image may make a build do.

Every layer is hostile: each resource a layer can grow (disk, memory, time,
what ext4 and the kernel can carry) has a bound here, with the reason for its
default. A layer past a bound is refused with a LayerError naming the layer
digest and the path. Only ``max_image_size`` is meant to be raised by users
(``--max-image-size``); the others are what ext4, the kernel or our tools can
carry, or keep the work of one build bounded.
"""

from __future__ import annotations

from dataclasses import dataclass

from banger_build.oci.manifest import MAX_LAYERS

MiB = 1 << 20
GiB = 1 << 30


@dataclass(frozen=True)
class Limits:
    #: Uncompressed bytes of all layers of one image together, counted as they are
    #: decompressed (tar headers included): a gzip bomb stops here, not at a full disk.
    #: Generous: a large distribution image is a few GiB.
    max_image_size: int = 32 * GiB
    #: Layers of one image: the manifest parser refuses more before anything is
    #: pulled (``oci.manifest.MAX_LAYERS``, twice what Docker's overlay2 can stack).
    max_layers: int = MAX_LAYERS
    #: Entries (paths) in the image at any time, implicit directories included: the
    #: tree costs a few hundred bytes of memory each. 10x a large distribution image.
    max_entries: int = 2_000_000
    #: Data ranges of all regular files together (a sparse member's segments, and a
    #: file's runs between all-zero MiBs): 16 bytes of memory each while building.
    max_segments: int = 4_000_000
    #: Entries in one directory. The writer is linear in them (100,000 in one
    #: directory: 0.6 s); the directory is linear too (no htree index), so the guest
    #: pays a scan of it per lookup: past a million entries that is seconds per name.
    max_dir_entries: int = 1_048_576
    #: Components of a path. Real images stay below 50; tools in the guest that
    #: recurse per level (a frame and an fd each) stay far from their limits.
    max_depth: int = 256
    #: Bytes of a path in the image, the leading "/" included: PATH_MAX (4096) less
    #: its NUL. A longer path cannot be opened by its full name in the guest.
    max_path: int = 4095
    #: Names of one inode (hard links): ext4's EXT4_LINK_MAX.
    max_links: int = 65_000
    #: Bytes of an xattr name, namespace included: the kernel's XATTR_NAME_MAX.
    max_xattr_name: int = 255
    #: Bytes one inode's xattrs take in ext4's layout (per xattr a 16-byte entry plus
    #: the name, and the value, each padded to 4; a 4-byte end marker): one 4 KiB
    #: xattr block less its 32-byte header. Without the ea_inode feature (we do not
    #: enable it) a value cannot spill into an inode of its own.
    max_xattr_bytes: int = 4096 - 32
    #: Bytes of one file input fetched for the recipe (``[[files]] ref``/``url``, the
    #: guest agent's ``agent_ref``/``agent_url``): refused before download when the
    #: artifact says so, else when the download passes it. Such a file is one entry of
    #: the image (a binary, an archive, a model), held whole in the blob cache and
    #: copied once into the spool: 1 GiB keeps a typo'd URL from filling the disk.
    max_file_input: int = 1 * GiB
    #: Bytes of all distinct xattr sets of the image together (each set is held once
    #: in memory however many inodes share it): 64x a large SELinux-labelled image.
    max_xattr_total: int = 256 * MiB

"""Flatten OCI layers, oldest first, into a ``Tree`` (file contents into a spool).

Modelled on go-containerregistry's ``mutate.Extract`` and the OCI image
spec's layer rules: whiteouts (``.wh.<name>``) and opaque directories
(``.wh..wh..opq``) hide what lower layers put there; a later entry replaces
an earlier one at the same path (directories merge).

Every layer is hostile. An entry is refused, with a LayerError naming the
layer digest and the path inside it, when:

- its name has a ``..`` component (``path-escape``), or a byte line-based
  tools cannot carry: NUL, CR or LF (``unsafe-name``), or a component longer
  than ext4's 255 bytes (``name-too-long``);
- an ancestor of it is a symlink (``through-symlink``, naming the path reached
  through the link) or not a directory (``not-a-directory``): nothing is ever
  written through a link, whichever layer planted it;
- it is a whiteout of nothing: ``.wh.``, ``.wh..``, ``.wh...`` (``bad-whiteout``);
- it is a symlink with an empty target (``corrupt``), or a hard link whose
  target is missing, a directory, or escapes (``hardlink-target``);
- it goes past a bound of ``Limits`` (the uncompressed size of the image,
  depth, path length, entries, entries per directory, links per inode,
  xattr sizes) or what ext4 can carry (file size, device numbers);
- its tar header is malformed or larger than ``tarstream`` allows.

Nothing of a layer is created on the host: the tree holds every entry and
its metadata, and a regular file's bytes go to the build's spool as they
stream (``banger_build.spool``), so the result is the same as root or not.
Times are kept as the header gives them (PAX times exactly, to the
nanosecond, negative ones too); the ext4 writer clamps what lies outside
ext4's range (1901-2446).
"""

from __future__ import annotations

import math
import re
import struct
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from banger_build.errors import LayerError, Reason
from banger_build.ext4 import human
from banger_build.limits import Limits
from banger_build.oci.reference import Digest
from banger_build.spool import Spool
from banger_build.tarstream import (
    MAX_FILE_SIZE,
    BudgetExceeded,
    Refused,
    member_chunks,
    members,
    open_layer,
    open_tar,
)
from banger_build.tree import (
    BLK,
    CHR,
    FIFO,
    NAME_MAX,
    REG,
    SYMLINK,
    Inode,
    Node,
    Tree,
    name_bytes,
    new_dir,
)

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
MAX_ID = 0xFFFF_FFFE  # (uid_t)-1 means "no change" to the kernel
MAX_TARGET = 4095  # PATH_MAX - 1
#: Bounds on a kept mtime, far beyond ext4's 1901-2446 (where the writer clamps):
#: a PAX time of any size is read, not turned into a number of any size.
_MIN_TIME = -(2**40)
_MAX_TIME = 2**40
#: A PAX time as the standard writes it (decimal seconds, a fraction); anything else
#: is tarfile's float, never a Fraction of an exponent (1e99999999 is not a time).
_PAX_TIME = re.compile(r"-?[0-9]{1,20}(\.[0-9]{0,30})?")
#: Device numbers: ext4 stores the kernel's dev_t encoding, a 12-bit major and a
#: 20-bit minor (a larger one would wrap).
MAX_MAJOR = 4095
MAX_MINOR = 0xFFFFF
_XATTR_PAX_PREFIX = "SCHILY.xattr."
_ACLS = ("system.posix_acl_access", "system.posix_acl_default")
_XATTR_NAMESPACES = ("security.", "trusted.", "user.", *_ACLS)
#: Prefixes ext4 stores as a name index rather than as bytes of the name.
_EXT4_NAME_INDEX = (*_ACLS, "security.", "trusted.", "user.")
#: POSIX ACL xattr format: a little-endian u32 version 2, then 8-byte entries whose
#: u16 tag is one of these (libext2fs refuses anything else with EINVAL).
_ACL_TAGS = frozenset({0x01, 0x02, 0x04, 0x08, 0x10, 0x20})


@dataclass(frozen=True)
class LayerInput:
    digest: Digest  # of the (compressed) blob, as the manifest names it
    path: Path  # the verified blob in the cache
    diff_id: Digest | None = None  # sha256 of the uncompressed tar (image config)


@dataclass(frozen=True)
class LayerStats:
    entries: int
    bytes: int


def normalize_name(name: str) -> str:
    """Tar member name -> normalised relative path ('' is the root).

    Leading ``/`` and ``./`` are dropped (they mean the image root); ``..``
    components are refused by the caller via ``check_name``.
    """
    parts = [p for p in name.split("/") if p not in ("", ".")]
    return "/".join(parts)


def check_name(path: str, raw: str) -> Reason | None:
    """The reason an unsafe name is refused, else None."""
    if "\x00" in raw or "\r" in raw or "\n" in raw:
        return Reason.UNSAFE_NAME
    parts = path.split("/")
    if ".." in parts:
        return Reason.PATH_ESCAPE
    # a character is at most 4 bytes: shorter components need no encoding to count
    if any(len(p) > NAME_MAX // 4 and len(name_bytes(p)) > NAME_MAX for p in parts):
        return Reason.NAME_TOO_LONG
    return None


_REFUSALS = {
    Reason.UNSAFE_NAME: "name contains a NUL, CR or LF byte (line-based tools, debugfs "
    "among them, cannot carry it)",
    Reason.PATH_ESCAPE: "path has a '..' component and would escape the image root",
    Reason.NAME_TOO_LONG: f"a path component is longer than {NAME_MAX} bytes (ext4's limit)",
}


def _xattrs(member: tarfile.TarInfo) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for key, value in member.pax_headers.items():
        if key.startswith(_XATTR_PAX_PREFIX):
            name = key[len(_XATTR_PAX_PREFIX) :]
            out[name] = value.encode("utf-8", "surrogateescape")
    return out


def _xattr_name_ok(name: str) -> bool:
    """A namespace we restore, in printable bytes (what debugfs and getfattr print)."""
    if not name.startswith(_XATTR_NAMESPACES):
        return False
    if name.startswith("system.") and name not in _ACLS:
        return False
    return all("!" <= c <= "~" and c not in "\"'\\" for c in name)


def _acl_ok(value: bytes) -> bool:
    if len(value) < 4 or (len(value) - 4) % 8 or value[:4] != b"\x02\x00\x00\x00":
        return False
    return all(tag in _ACL_TAGS for (tag,) in struct.iter_unpack("<H6x", value[4:]))


def xattr_bytes(xattrs: dict[str, bytes]) -> int:
    """Bytes the xattrs take in an ext4 xattr block: per xattr a 16-byte entry plus
    the name (less its indexed prefix) and the value, each padded to 4; a 4-byte end."""
    total = 4
    for name, value in xattrs.items():
        prefix = next((p for p in _EXT4_NAME_INDEX if name.startswith(p)), "")
        total += 16 + _pad4(len(name) - len(prefix)) + _pad4(len(value))
    return total


def _pad4(n: int) -> int:
    return (n + 3) & ~3


class Flattener:
    """Replays layers into ``tree``, regular files' bytes into ``spool``.

    Whiteouts need to know what the current layer put where: each node
    carries a mark, ``2n + 1`` when layer n created (or replaced, or set) it,
    at least ``2n`` when layer n created something beneath it. Marks only
    grow, so a mark from an older layer is always below the current ones.
    """

    def __init__(self, spool: Spool, epoch: int = 0, limits: Limits | None = None) -> None:
        self.spool = spool
        self.limits = limits or Limits()
        self.tree = Tree()
        self.tree.root.inode.mtime = epoch
        self.epoch = epoch
        self._layer = ""
        self._layers = 0
        self._touched = 0  # the current layer's marks (see the class docstring)
        self._created = 1
        self._entries = 1  # nodes in the tree, the root included
        self._segments = 0  # data ranges of regular files (``Inode.segments``)
        #: distinct xattr sets, each kept once and shared by the inodes that have it
        self._xattr_sets: dict[tuple[tuple[str, bytes], ...], dict[str, bytes]] = {}
        self._xattr_total = 0  # their bytes in ext4's layout
        self._used = 0  # uncompressed bytes of the layers applied so far
        self._member: str | None = None  # the member being read, for errors

    # -- public ---------------------------------------------------------------

    def apply(self, layer: LayerInput) -> LayerStats:
        self._layer = str(layer.digest)
        self._member = None
        self._layers += 1
        if self._layers > self.limits.max_layers:
            raise LayerError(
                f"the image has more than {self.limits.max_layers} layers",
                layer=self._layer,
                reason=Reason.TOO_MANY_LAYERS,
            )
        self._touched = 2 * self._layers
        self._created = self._touched + 1
        entries = 0
        total = 0
        try:
            with open_layer(layer.path, self.limits.max_image_size - self._used) as reader:
                with open_tar(reader) as tar:
                    for member in members(tar):
                        self._member = member.name
                        total += self._apply_member(tar, member)
                        entries += 1
                        self._member = None
                reader.drain()
        except BudgetExceeded as exc:
            raise LayerError(
                f"the image's layers uncompress to more than "
                f"{human(self.limits.max_image_size)} (--max-image-size)",
                layer=self._layer,
                path=self._member,
                reason=Reason.IMAGE_TOO_LARGE,
            ) from exc
        except Refused as exc:
            raise LayerError(
                str(exc), layer=self._layer, path=self._member, reason=exc.reason
            ) from exc
        self._used += reader.count
        digest = reader.hexdigest()
        if layer.diff_id is not None and digest != layer.diff_id.hex:
            raise LayerError(
                f"uncompressed content has digest sha256:{digest}, "
                f"but the image config's diff_id is {layer.diff_id}",
                layer=self._layer,
                reason=Reason.DIFF_ID_MISMATCH,
            )
        return LayerStats(entries, total)

    # -- one tar member -------------------------------------------------------

    def _refuse(self, path: str, message: str, reason: Reason) -> LayerError:
        return LayerError(message, layer=self._layer, path=path, reason=reason)

    def _apply_member(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> int:
        """Apply one member; return the bytes of content it brought (regular files)."""
        raw = member.name
        path = normalize_name(raw)
        bad = check_name(path, raw)
        if bad is None and member.issym() and any(c in member.linkname for c in "\x00\r\n"):
            bad = Reason.UNSAFE_NAME
        if bad is not None:
            raise self._refuse(raw, _REFUSALS[bad], bad)
        parent, _, base = path.rpartition("/")

        if base.startswith(WHITEOUT_PREFIX):
            parent_node = self._parent_dir(parent, raw, create=False)
            if base == OPAQUE_MARKER:
                if parent_node is not None:
                    self._make_opaque(parent, parent_node)
            elif base[len(WHITEOUT_PREFIX) :] in ("", ".", ".."):
                raise self._refuse(
                    raw,
                    f"whiteout {base!r} hides no name (a whiteout of '', '.' or '..')",
                    Reason.BAD_WHITEOUT,
                )
            elif parent_node is not None and not base.startswith(WHITEOUT_PREFIX * 2):
                assert parent_node.children is not None
                victim = parent_node.children.get(base[4:])
                if victim is not None and victim.mark != self._created:  # this layer's stay
                    self._remove(parent_node, parent, base[4:])
            return 0  # other .wh..wh. entries are aufs metadata: ignore

        if not path:  # the root directory itself
            if member.isdir():
                self._set_meta(self.tree.root.inode, member)
            return 0

        self._check_path(path, raw)
        parent_node = self._parent_dir(parent, raw, create=True)
        assert parent_node is not None and parent_node.children is not None
        existing = parent_node.children.get(base)

        if member.isdir():
            if existing is not None and existing.is_dir:
                self._set_meta(existing.inode, member)
                existing.mark = self._created
            else:
                self._remove(parent_node, parent, base)
                node = new_dir()
                self._set_meta(node.inode, member)
                self._insert(parent_node, base, node, raw)
        elif member.isreg():
            if not 0 <= member.size <= MAX_FILE_SIZE:
                raise self._refuse(
                    raw,
                    f"file of {member.size} bytes: ext4 holds files up to {MAX_FILE_SIZE} bytes",
                    Reason.FILE_TOO_LARGE,
                )
            self._remove(parent_node, parent, base)
            inode = Inode(REG, size=member.size)
            self._set_meta(inode, member)
            self._insert(parent_node, base, Node(inode), raw)
            self.spool.add(inode, member_chunks(tar, member))
            if inode.segments is not None:
                self._segments += len(inode.segments) // 2
                if self._segments > self.limits.max_segments:
                    raise self._refuse(
                        raw,
                        f"the image's files would hold more than {self.limits.max_segments} "
                        "separate data ranges (sparse files and runs of zeros)",
                        Reason.TOO_MANY_SEGMENTS,
                    )
            return int(member.size)
        elif member.issym():
            if len(name_bytes(member.linkname)) > MAX_TARGET:
                raise self._refuse(
                    raw, "symlink target longer than 4095 bytes", Reason.LINK_TOO_LONG
                )
            if not member.linkname:  # symlink(2) refuses an empty target; ext4 cannot hold one
                raise self._refuse(raw, "symlink with an empty target", Reason.CORRUPT)
            self._remove(parent_node, parent, base)
            inode = Inode(SYMLINK, target=member.linkname, size=len(name_bytes(member.linkname)))
            self._set_meta(inode, member)
            inode.perm = 0o777
            self._insert(parent_node, base, Node(inode), raw)
        elif member.islnk():
            self._hardlink(parent_node, parent, base, member, raw)
        elif member.isfifo() or member.ischr() or member.isblk():
            kind = FIFO if member.isfifo() else CHR if member.ischr() else BLK
            rdev = (0, 0)
            if kind != FIFO:
                rdev = (member.devmajor, member.devminor)
                if not (0 <= rdev[0] <= MAX_MAJOR and 0 <= rdev[1] <= MAX_MINOR):
                    raise self._refuse(
                        raw,
                        f"device number {rdev[0]}:{rdev[1]} out of range (major at most "
                        f"{MAX_MAJOR}, minor at most {MAX_MINOR})",
                        Reason.BAD_DEVICE,
                    )
            self._remove(parent_node, parent, base)
            inode = Inode(kind, rdev=rdev)
            self._set_meta(inode, member)
            self._insert(parent_node, base, Node(inode), raw)
        else:
            raise self._refuse(
                raw, f"unsupported tar entry type {member.type!r}", Reason.UNSUPPORTED_TYPE
            )
        return 0

    def _check_path(self, path: str, raw: str) -> None:
        limits = self.limits
        depth = path.count("/") + 1
        if depth > limits.max_depth:
            raise self._refuse(
                raw,
                f"path is {depth} levels deep (at most {limits.max_depth})",
                Reason.TOO_DEEP,
            )
        length = len(name_bytes(path)) + 1  # with its leading "/"
        if length > limits.max_path:
            raise self._refuse(
                raw,
                f"path is {length} bytes long (at most {limits.max_path}: PATH_MAX less its NUL)",
                Reason.PATH_TOO_LONG,
            )

    def _hardlink(
        self, parent_node: Node, parent: str, base: str, member: tarfile.TarInfo, raw: str
    ) -> None:
        assert parent_node.children is not None
        link_raw = member.linkname
        link = normalize_name(link_raw)
        bad = check_name(link, link_raw)
        if bad is not None:
            raise self._refuse(raw, f"hard link target {link_raw!r}: {_REFUSALS[bad]}", bad)
        path = f"{parent}/{base}" if parent else base
        if link == path:
            existing = parent_node.children.get(base)
            if existing is not None:
                existing.mark = self._created
            return
        src = self._resolve_existing(link, raw)
        if src is None:
            raise self._refuse(
                raw,
                f"hard link target {link_raw!r} does not exist in the image",
                Reason.HARDLINK_TARGET,
            )
        if src.is_dir:
            raise self._refuse(
                raw, f"hard link target {link_raw!r} is a directory", Reason.HARDLINK_TARGET
            )
        if src.inode.nlink >= self.limits.max_links and parent_node.children.get(base) is not src:
            raise self._refuse(
                raw,
                f"one more name for {link_raw!r}, which has {src.inode.nlink} already "
                f"(at most {self.limits.max_links} links to an inode)",
                Reason.TOO_MANY_LINKS,
            )
        self._remove(parent_node, parent, base)
        src.inode.nlink += 1
        self._insert(parent_node, base, Node(src.inode), raw)

    # -- tree helpers ---------------------------------------------------------

    def _insert(
        self, parent_node: Node, base: str, node: Node, raw: str, *, implicit: bool = False
    ) -> None:
        """Bind ``node`` at ``base`` (no entry there), within the entry bounds."""
        children = parent_node.children
        assert children is not None and base not in children
        if len(children) >= self.limits.max_dir_entries:
            raise self._refuse(
                raw,
                f"its directory would hold more than {self.limits.max_dir_entries} entries",
                Reason.DIR_TOO_LARGE,
            )
        if self._entries >= self.limits.max_entries:
            raise self._refuse(
                raw,
                f"the image would hold more than {self.limits.max_entries} entries",
                Reason.TOO_MANY_ENTRIES,
            )
        self._entries += 1
        node.mark = self._touched if implicit else self._created
        children[base] = node

    def _parent_dir(self, parent: str, raw: str, *, create: bool) -> Node | None:
        """The directory node for ``parent``; never through a symlink.

        With ``create``, missing directories are made and every directory on the
        way is marked as holding something of this layer.
        """
        node = self.tree.root
        parts = parent.split("/") if parent else []
        for i, part in enumerate(parts):
            assert node.children is not None
            child = node.children.get(part)
            if child is None:
                if not create:
                    return None
                child = new_dir(mtime=self.epoch)
                self._insert(node, part, child, raw, implicit=True)
            elif child.inode.type == SYMLINK:
                walked = "/".join(parts[: i + 1])
                raise self._refuse(
                    raw,
                    f"writes through the symlink {walked!r} (-> {child.inode.target!r}): "
                    f"{parent!r} would be reached through it",
                    Reason.THROUGH_SYMLINK,
                )
            elif not child.is_dir:
                walked = "/".join(parts[: i + 1])
                raise self._refuse(raw, f"{walked!r} is not a directory", Reason.NOT_A_DIRECTORY)
            elif create and child.mark < self._touched:
                child.mark = self._touched
            node = child
        return node

    def _resolve_existing(self, path: str, raw: str) -> Node | None:
        parent, _, base = path.rpartition("/")
        parent_node = self._parent_dir(parent, raw, create=False)
        if parent_node is None or parent_node.children is None:
            return None
        return parent_node.children.get(base)

    def _remove(self, parent_node: Node, parent: str, base: str) -> None:
        assert parent_node.children is not None
        node = parent_node.children.pop(base, None)
        if node is None:
            return
        self._forget(node)

    def _forget(self, node: Node) -> None:
        """Drop a removed subtree from the link and entry counts (no recursion)."""
        stack = [node]
        while stack:
            n = stack.pop()
            n.inode.nlink -= 1
            self._entries -= 1
            if n.children:
                stack.extend(n.children.values())

    def _make_opaque(self, path: str, node: Node) -> None:
        """Hide everything lower layers put under ``path``; keep this layer's."""
        stack = [(path, node)]
        while stack:
            dir_path, dir_node = stack.pop()
            assert dir_node.children is not None
            for name in list(dir_node.children):
                child_path = f"{dir_path}/{name}" if dir_path else name
                child = dir_node.children[name]
                if child.is_dir and child.mark >= self._touched:
                    stack.append((child_path, child))
                elif child.mark != self._created:
                    self._remove(dir_node, dir_path, name)

    def _mtime(self, member: tarfile.TarInfo) -> tuple[int, int]:
        """(seconds, nanoseconds) of a member's mtime; a PAX time read exactly."""
        text = member.pax_headers.get("mtime")
        if text is None and type(member.mtime) is int and _MIN_TIME <= member.mtime <= _MAX_TIME:
            return member.mtime, 0  # a ustar header's whole seconds, in range
        if text is not None and _PAX_TIME.fullmatch(text):
            exact = Fraction(text)
        elif isinstance(member.mtime, int) or math.isfinite(member.mtime):
            exact = Fraction(math.floor(member.mtime))
        else:
            raise self._refuse(member.name, f"mtime {member.mtime} is not a time", Reason.CORRUPT)
        seconds = math.floor(exact)
        if not _MIN_TIME <= seconds <= _MAX_TIME:  # far outside ext4's range: clamped there
            seconds = max(_MIN_TIME, min(seconds, _MAX_TIME))
            return seconds, 0
        return seconds, math.floor((exact - seconds) * 1_000_000_000)

    def _set_meta(self, inode: Inode, member: tarfile.TarInfo) -> None:
        for what, value in (("uid", member.uid), ("gid", member.gid)):
            if not 0 <= value <= MAX_ID:
                raise self._refuse(member.name, f"{what} {value} is out of range", Reason.BAD_OWNER)
        inode.mtime, inode.mtime_ns = self._mtime(member)
        inode.uid = member.uid
        inode.gid = member.gid
        inode.perm = member.mode & 0o7777
        xattrs = _xattrs(member)
        if not xattrs:
            inode.xattrs = None
            return
        limits = self.limits
        for name, data in xattrs.items():
            if not _xattr_name_ok(name):
                raise self._refuse(
                    member.name, f"unsupported xattr name {name!r}", Reason.UNSAFE_XATTR
                )
            if len(name) > limits.max_xattr_name:
                raise self._refuse(
                    member.name,
                    f"xattr name of {len(name)} bytes (at most {limits.max_xattr_name})",
                    Reason.XATTR_TOO_LARGE,
                )
            if name in _ACLS and not _acl_ok(data):
                raise self._refuse(
                    member.name, f"xattr {name} is not a POSIX ACL", Reason.UNSAFE_XATTR
                )
        size = xattr_bytes(xattrs)
        if size > limits.max_xattr_bytes:
            raise self._refuse(
                member.name,
                f"xattrs take {size} bytes in ext4's layout, more than one 4 KiB xattr block "
                f"holds ({limits.max_xattr_bytes})",
                Reason.XATTR_TOO_LARGE,
            )
        # one dict per distinct set (an SELinux label repeats on every file): the
        # memory is the distinct sets', and that is bounded
        key = tuple(sorted(xattrs.items()))
        shared = self._xattr_sets.get(key)
        if shared is None:
            self._xattr_total += size
            if self._xattr_total > limits.max_xattr_total:
                raise self._refuse(
                    member.name,
                    f"the image's distinct xattr sets take more than "
                    f"{human(limits.max_xattr_total)}",
                    Reason.XATTR_TOO_LARGE,
                )
            shared = self._xattr_sets[key] = xattrs
        inode.xattrs = shared


def flatten(
    layers: Sequence[LayerInput], spool: Spool, epoch: int = 0, limits: Limits | None = None
) -> Tree:
    """Replay ``layers`` oldest first; return the Tree (file contents in ``spool``)."""
    flattener = Flattener(spool, epoch, limits)
    for layer in layers:
        flattener.apply(layer)
    return flattener.tree

"""Flatten OCI layers, oldest first, into a staging directory plus a ``Tree``.

Modelled on go-containerregistry's ``mutate.Extract`` and the OCI image
spec's layer rules: whiteouts (``.wh.<name>``) and opaque directories
(``.wh..wh..opq``) hide what lower layers put there; a later entry replaces
an earlier one at the same path (directories merge).

Every layer is hostile. An entry is refused, with a LayerError naming the
layer digest and the path inside it, when:

- its name has a ``..`` component (``path-escape``), or a byte debugfs
  cannot carry safely: NUL, CR or LF (``unsafe-name``), or a component longer
  than ext4's 255 bytes (``name-too-long``);
- an ancestor of it is a symlink (``through-symlink``) or not a directory
  (``not-a-directory``): nothing is ever written through a link;
- it is a symlink whose target leaves the root (``link-escape``), or a hard
  link whose target is missing, a directory, or escapes (``hardlink-target``).

The staging tree is written only through paths checked against the Tree,
which mirrors it exactly; only regular files, directories, symlinks and hard
links are staged. Devices and fifos exist only in the Tree: they are created
in the image with debugfs (the same way as root or not, so the bytes do not
depend on who builds). Staged modes are owner-readable (0644 files, 0755
dirs): the real modes are restored from the Tree after mkfs.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import zstandard

from banger_build.errors import LayerError, Reason
from banger_build.oci.reference import Digest
from banger_build.tree import (
    BLK,
    CHR,
    FIFO,
    NAME_MAX,
    REG,
    SPECIAL,
    SYMLINK,
    Inode,
    Node,
    Tree,
    name_bytes,
    new_dir,
)

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
_CHUNK = 1 << 20
MAX_ID = 0xFFFF_FFFE  # (uid_t)-1 means "no change" to the kernel
MAX_TIME = 0x7FFF_FFFF
MAX_TARGET = 4095  # PATH_MAX - 1
_XATTR_PAX_PREFIX = "SCHILY.xattr."
_XATTR_NAMESPACES = ("security.", "trusted.", "user.", "system.posix_acl_")


@dataclass(frozen=True)
class LayerInput:
    digest: Digest  # of the (compressed) blob, as the manifest names it
    path: Path  # the verified blob in the cache
    diff_id: Digest | None = None  # sha256 of the uncompressed tar (image config)


@dataclass(frozen=True)
class LayerStats:
    entries: int
    bytes: int


class _HashingReader:
    """A read-only stream that hashes what passes through it."""

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self.sha = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        self.sha.update(data)
        return data

    def drain(self) -> None:
        while self.read(_CHUNK):
            pass


@contextmanager
def open_layer(path: Path) -> Iterator[IO[bytes]]:
    """The uncompressed tar stream of a blob; gzip, zstd or plain, by magic bytes."""
    with open(path, "rb") as raw:
        magic = raw.read(4)
        raw.seek(0)
        if magic[:2] == b"\x1f\x8b":
            with gzip.GzipFile(fileobj=raw, mode="rb") as gz:
                yield gz  # type: ignore[misc]
        elif magic == b"\x28\xb5\x2f\xfd":
            dctx = zstandard.ZstdDecompressor()
            with dctx.stream_reader(raw, read_size=_CHUNK, read_across_frames=True) as zs:
                yield zs
        else:
            yield raw


def normalize_name(name: str) -> str:
    """Tar member name -> normalised relative path ('' is the root).

    Leading ``/`` and ``./`` are dropped (they mean the image root); ``..``
    components are refused by the caller via ``check_name``.
    """
    parts = [p for p in name.split("/") if p not in ("", ".")]
    return "/".join(parts)


def check_name(path: str, raw: str) -> Reason | None:
    """The reason an unsafe name is refused, else None."""
    if any(c in raw for c in "\x00\r\n"):
        return Reason.UNSAFE_NAME
    if ".." in path.split("/"):
        return Reason.PATH_ESCAPE
    if any(len(name_bytes(p)) > NAME_MAX for p in path.split("/")):
        return Reason.NAME_TOO_LONG
    return None


_REFUSALS = {
    Reason.UNSAFE_NAME: "name contains a NUL, CR or LF byte, which debugfs cannot carry safely",
    Reason.PATH_ESCAPE: "path has a '..' component and would escape the image root",
    Reason.NAME_TOO_LONG: f"a path component is longer than {NAME_MAX} bytes (ext4's limit)",
}


def link_escapes(link_dir: str, target: str) -> bool:
    """Does a symlink in ``link_dir`` pointing at ``target`` leave the root?"""
    stack = [] if target.startswith("/") else [p for p in link_dir.split("/") if p]
    for part in target.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not stack:
                return True
            stack.pop()
        else:
            stack.append(part)
    return False


def _xattrs(member: tarfile.TarInfo) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for key, value in member.pax_headers.items():
        if key.startswith(_XATTR_PAX_PREFIX):
            name = key[len(_XATTR_PAX_PREFIX) :]
            out[name] = value.encode("utf-8", "surrogateescape")
    return out


class Flattener:
    """Replays layers into ``staging`` and records every path in ``tree``."""

    def __init__(self, staging: Path, epoch: int = 0) -> None:
        self.staging = staging
        self.tree = Tree()
        self.tree.root.inode.mtime = epoch
        self.epoch = epoch
        self._layer = ""
        self._created: set[str] = set()
        self._created_ancestors: set[str] = set()
        staging.mkdir(parents=True, exist_ok=True)
        os.chmod(staging, 0o755)

    # -- public ---------------------------------------------------------------

    def apply(self, layer: LayerInput) -> LayerStats:
        self._layer = str(layer.digest)
        self._created = set()
        self._created_ancestors = set()
        entries = 0
        total = 0
        try:
            with open_layer(layer.path) as stream:
                hashing = _HashingReader(stream)
                with tarfile.open(fileobj=hashing, mode="r|", errorlevel=2) as tar:  # type: ignore[call-overload]
                    for member in tar:
                        self._apply_member(tar, member)
                        entries += 1
                        total += member.size if member.isreg() else 0
                hashing.drain()
        except LayerError:
            raise
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
            raise LayerError(
                f"corrupt layer: {exc}", layer=self._layer, reason=Reason.CORRUPT
            ) from exc
        except zstandard.ZstdError as exc:
            raise LayerError(
                f"corrupt zstd stream: {exc}", layer=self._layer, reason=Reason.CORRUPT
            ) from exc
        if layer.diff_id is not None and hashing.sha.hexdigest() != layer.diff_id.hex:
            raise LayerError(
                f"uncompressed content has digest sha256:{hashing.sha.hexdigest()}, "
                f"but the image config's diff_id is {layer.diff_id}",
                layer=self._layer,
                reason=Reason.DIFF_ID_MISMATCH,
            )
        return LayerStats(entries, total)

    # -- one tar member -------------------------------------------------------

    def _refuse(self, path: str, message: str, reason: Reason) -> LayerError:
        return LayerError(message, layer=self._layer, path=path, reason=reason)

    def _apply_member(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
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
            elif not base.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):
                victim = f"{parent}/{base[4:]}" if parent else base[4:]
                if parent_node is not None and victim not in self._created:
                    self._remove(parent_node, parent, base[4:])
            return  # other .wh..wh. entries are aufs metadata: ignore

        if not path:  # the root directory itself
            if member.isdir():
                self._set_meta(self.tree.root.inode, member)
            return

        parent_node = self._parent_dir(parent, raw, create=True)
        assert parent_node is not None and parent_node.children is not None
        existing = parent_node.children.get(base)
        target = self._stage_path(path)

        if member.isdir():
            if existing is not None and existing.is_dir:
                self._set_meta(existing.inode, member)
            else:
                self._remove(parent_node, parent, base)
                os.mkdir(target, 0o755)
                node = new_dir()
                self._set_meta(node.inode, member)
                parent_node.children[base] = node
        elif member.isreg():
            self._remove(parent_node, parent, base)
            self._write_file(tar, member, target, raw)
            inode = Inode(REG, size=member.size)
            self._set_meta(inode, member)
            parent_node.children[base] = Node(inode)
        elif member.issym():
            if len(name_bytes(member.linkname)) > MAX_TARGET:
                raise self._refuse(
                    raw, "symlink target longer than 4095 bytes", Reason.LINK_TOO_LONG
                )
            if link_escapes(parent, member.linkname) or not member.linkname:
                raise self._refuse(
                    raw,
                    f"symlink target {member.linkname!r} leaves the image root",
                    Reason.LINK_ESCAPE,
                )
            self._remove(parent_node, parent, base)
            os.symlink(member.linkname, target)
            inode = Inode(SYMLINK, target=member.linkname, size=len(name_bytes(member.linkname)))
            self._set_meta(inode, member)
            inode.perm = 0o777
            parent_node.children[base] = Node(inode)
        elif member.islnk():
            self._hardlink(parent_node, parent, base, member, raw)
        elif member.isfifo() or member.ischr() or member.isblk():
            kind = FIFO if member.isfifo() else CHR if member.ischr() else BLK
            self._remove(parent_node, parent, base)
            inode = Inode(kind, rdev=(member.devmajor, member.devminor) if kind != FIFO else (0, 0))
            self._set_meta(inode, member)
            parent_node.children[base] = Node(inode)
        else:
            raise self._refuse(
                raw, f"unsupported tar entry type {member.type!r}", Reason.UNSUPPORTED_TYPE
            )
        self._mark_created(path)

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
        self._remove(parent_node, parent, base)
        if src.inode.type not in SPECIAL:
            os.link(self._stage_path(link), self._stage_path(path), follow_symlinks=False)
        src.inode.nlink += 1
        parent_node.children[base] = Node(src.inode)

    # -- tree helpers ---------------------------------------------------------

    def _stage_path(self, path: str) -> str:
        return os.path.join(self.staging, path)

    def _parent_dir(self, parent: str, raw: str, *, create: bool) -> Node | None:
        """The directory node for ``parent``; never through a symlink."""
        node = self.tree.root
        walked = ""
        for part in parent.split("/") if parent else ():
            walked = f"{walked}/{part}" if walked else part
            assert node.children is not None
            child = node.children.get(part)
            if child is None:
                if not create:
                    return None
                os.mkdir(self._stage_path(walked), 0o755)
                child = new_dir(mtime=self.epoch)
                node.children[part] = child
            elif child.inode.type == SYMLINK:
                raise self._refuse(
                    raw,
                    f"writes through the symlink {walked!r} planted earlier",
                    Reason.THROUGH_SYMLINK,
                )
            elif not child.is_dir:
                raise self._refuse(raw, f"{walked!r} is not a directory", Reason.NOT_A_DIRECTORY)
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
        path = f"{parent}/{base}" if parent else base
        target = self._stage_path(path)
        if node.is_dir:
            shutil.rmtree(target)
        elif node.inode.type not in SPECIAL:
            os.unlink(target)
        self._forget(node)

    def _forget(self, node: Node) -> None:
        node.inode.nlink -= 1
        if node.children:
            for child in node.children.values():
                self._forget(child)

    def _make_opaque(self, path: str, node: Node) -> None:
        """Hide everything lower layers put under ``path``; keep this layer's."""
        assert node.children is not None
        for name in list(node.children):
            child_path = f"{path}/{name}" if path else name
            child = node.children[name]
            if child_path in self._created_ancestors and child.is_dir:
                self._make_opaque(child_path, child)
            elif child_path not in self._created:
                self._remove(node, path, name)

    def _mark_created(self, path: str) -> None:
        self._created.add(path)
        while path and path not in self._created_ancestors:
            self._created_ancestors.add(path)
            path = path.rpartition("/")[0]

    def _set_meta(self, inode: Inode, member: tarfile.TarInfo) -> None:
        for what, value in (("uid", member.uid), ("gid", member.gid)):
            if not 0 <= value <= MAX_ID:
                raise self._refuse(member.name, f"{what} {value} is out of range", Reason.BAD_OWNER)
        inode.uid = member.uid
        inode.gid = member.gid
        inode.perm = member.mode & 0o7777
        # ext4 keeps 32-bit signed seconds (plus epoch bits we do not set)
        inode.mtime = max(0, min(int(member.mtime), MAX_TIME))
        xattrs = _xattrs(member)
        for name in xattrs:
            if not name.startswith(_XATTR_NAMESPACES) or any(c in name for c in "\x00\r\n \"'\\"):
                raise self._refuse(
                    member.name, f"unsupported xattr name {name!r}", Reason.UNSAFE_XATTR
                )
        inode.xattrs = xattrs

    def _write_file(
        self, tar: tarfile.TarFile, member: tarfile.TarInfo, target: str, raw: str
    ) -> None:
        src = tar.extractfile(member)
        assert src is not None
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        try:
            with os.fdopen(fd, "wb") as out:
                written = 0
                while chunk := src.read(_CHUNK):
                    out.write(chunk)
                    written += len(chunk)
        except OSError as exc:  # the host's disk: name the file we were writing
            if exc.filename is None:
                raise OSError(exc.errno, exc.strerror, target) from exc
            raise
        if written != member.size:
            raise self._refuse(raw, "truncated file content", Reason.CORRUPT)


def flatten(layers: Sequence[LayerInput], staging: Path, epoch: int = 0) -> Tree:
    """Replay ``layers`` oldest first into ``staging``; return the Tree."""
    flattener = Flattener(staging, epoch)
    for layer in layers:
        flattener.apply(layer)
    return flattener.tree

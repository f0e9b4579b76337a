"""Put the recipe's files, rendered templates and symlinks into the flattened tree.

Destinations are resolved inside the image: a symlinked directory on the way
(``/lib -> usr/lib`` on merged-/usr systems) is followed within the image
root, never on the build host. Missing parent directories are created
root-owned 0755. Owners given by name are looked up in the image's own
/etc/passwd and /etc/group.
"""

from __future__ import annotations

import os
from pathlib import Path

from banger_build import depmod
from banger_build.entries import Where, error_at
from banger_build.errors import InputError, Reason
from banger_build.flatten import check_name
from banger_build.fsutil import ContentChanged
from banger_build.inputs import Injected
from banger_build.spool import Spool
from banger_build.tree import REG, SYMLINK, Inode, Node, Tree, name_bytes, new_dir

_MAX_HOPS = 40
LOST_FOUND = "lost+found"  # the filesystem's (e2fsck's)
#: The most of /etc/passwd or /etc/group read to look up owner names.
_ID_FILE_MAX = 1 << 20


def _resolve_dir(tree: Tree, path: str, epoch: int, where: Where | None = None) -> tuple[str, Node]:
    """Resolve directory ``path`` (relative) inside the image, creating what is missing.
    Problems are reported at ``where``, the recipe entry that asked for the path."""
    found = _walk(tree, path, create=True, epoch=epoch, where=where)
    assert found is not None  # creating, it finds or fails
    return found


def _walk(
    tree: Tree, path: str, *, create: bool, epoch: int = 0, where: Where | None = None
) -> tuple[str, Node] | None:
    """(the real path, the node) of ``path`` in the image, symlinks followed within it.

    ``create``: missing directories are made, and a symlink loop or a non-directory
    on the way is an error at ``where``. Else such a path, or a missing one, is None
    (its last component may then be any kind of file).
    """
    parts = [p for p in path.split("/") if p]
    real: list[str] = []
    node = tree.root
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == ".":
            continue
        if part == "..":
            if real:
                real.pop()
            node = tree.lookup("/".join(real)) or tree.root
            continue
        child = node.children.get(part) if node.children is not None else None
        if child is None:
            if not create or node.children is None:
                return None
            child = new_dir(mtime=epoch)
            node.children[part] = child
        elif child.inode.type == SYMLINK:
            hops += 1
            if hops > _MAX_HOPS:
                if not create:
                    return None
                raise error_at(
                    where,
                    f"too many levels of symlinks resolving /{path} in the image",
                    Reason.DEST_INVALID,
                )
            target = child.inode.target
            if target.startswith("/"):
                real = []
                node = tree.root
            parts = [p for p in target.split("/") if p] + parts
            continue
        elif not child.is_dir and (create or parts):
            if not create:
                return None
            raise error_at(
                where,
                f"/{'/'.join([*real, part])} is not a directory in the image",
                Reason.DEST_INVALID,
            )
        real.append(part)
        node = child
    return "/".join(real), node


def _id_map(spool: Spool, tree: Tree, filename: str) -> dict[str, int]:
    node = tree.lookup(f"etc/{filename}")
    if node is None or node.inode.type != REG:
        return {}
    out: dict[str, int] = {}
    text = spool.read(node.inode, _ID_FILE_MAX).decode("utf-8", "replace")
    for line in text.splitlines():
        fields = line.split(":")
        if len(fields) >= 3 and fields[2].isdigit():
            out.setdefault(fields[0], int(fields[2]))
    return out


class OwnerResolver:
    def __init__(self, spool: Spool, tree: Tree) -> None:
        self._users = _id_map(spool, tree, "passwd")
        self._groups = _id_map(spool, tree, "group")

    def resolve(self, item: Injected) -> tuple[int, int]:
        user, _, group = item.owner.partition(":")
        return self._one(user, self._users, "user", item), self._one(
            group, self._groups, "group", item
        )

    @staticmethod
    def _one(name: str, table: dict[str, int], what: str, item: Injected) -> int:
        if name.isdigit():
            return int(name)
        if name not in table:
            raise error_at(
                item.owner_where,
                f"{item.dest}: owner {what} {name!r} is not defined in the image's /etc/"
                f"{'passwd' if what == 'user' else 'group'}",
                Reason.UNKNOWN_OWNER,
            )
        return table[name]


def _copy_input(item: Injected, spool: Spool, inode: Inode) -> None:
    assert item.source is not None
    try:
        spool.add_file(inode, item.source, item.sha256)
    except ContentChanged as exc:
        raise error_at(
            item.where,
            f"{item.source} changed while the image was being built (it had sha256 "
            f"{exc.expected} when the build started, now {exc.actual}): {item.dest} was not "
            "written; build again",
            Reason.INPUT_CHANGED,
        ) from None


def resolve_owners(tree: Tree, spool: Spool, items: tuple[Injected, ...]) -> list[tuple[int, int]]:
    """Each item's (uid, gid): names looked up in the image's /etc/passwd and /etc/group
    as the layers left them; an unknown name is an error at the entry's position."""
    owners = OwnerResolver(spool, tree)
    return [owners.resolve(item) for item in items]


def inject(
    tree: Tree,
    spool: Spool,
    items: tuple[Injected, ...],
    owners: list[tuple[int, int]],
    *,
    epoch: int,
) -> None:
    for item, (uid, gid) in zip(items, owners, strict=True):
        parent, _, name = item.dest.strip("/").rpartition("/")
        real_parent, dir_node = _resolve_dir(tree, parent, epoch, item.where)
        assert dir_node.children is not None
        if (real_parent or name).split("/")[0] == LOST_FOUND:
            raise error_at(
                item.where,
                f"{item.dest}: /{LOST_FOUND} belongs to the filesystem (e2fsck's); "
                "put the file elsewhere",
                Reason.DEST_INVALID,
            )
        existing = dir_node.children.get(name)
        if existing is not None:
            if existing.inode.type == SYMLINK and not item.replace:
                raise error_at(
                    item.where,
                    f"{item.dest}: the image has a symlink there (-> {existing.inode.target}); "
                    f"the {item.kind} would replace the link: set replace = true in this entry "
                    "to do so, or write to the link's target",
                    Reason.DEST_IS_SYMLINK,
                )
            if existing.is_dir:
                raise error_at(
                    item.where,
                    f"{item.dest}: the image has a directory there; refusing to replace it",
                    Reason.DEST_IS_DIRECTORY,
                )
            existing.inode.nlink -= 1
        if item.kind == "symlink":
            inode = Inode(
                SYMLINK,
                uid,
                gid,
                0o777,
                epoch,
                size=len(name_bytes(item.target)),
                target=item.target,
            )
        else:
            inode = Inode(REG, uid, gid, item.mode, epoch)
            if item.source is not None:
                _copy_input(item, spool, inode)
            else:
                assert item.data is not None
                spool.add_bytes(inode, item.data)
        dir_node.children[name] = Node(inode)


def _lookup(tree: Tree, path: str) -> Node | None:
    """The node at ``path`` in the image, symlinks followed within it (None: missing)."""
    found = _walk(tree, path, create=False)
    return None if found is None else found[1]


#: What runs ``kmod static-nodes``, the one reader of modules.devname
#: (systemd's kmod-static-nodes.service, when the file is not empty).
KMOD_TOOL = "bin/kmod"


def install_modules(
    tree: Tree, spool: Spool, modules: Path, version: str, *, epoch: int, label: str = ""
) -> str:
    """Copy a kernel's ``lib/modules/<version>`` directory into the image, with the
    ``modules.dep`` and indexes modprobe reads generated from it (``depmod``).

    Returns the guest path. Everything is root-owned, directories 0755 and
    files 0644 whatever the source's modes (so the bytes do not depend on who
    unpacked the kernel), symlinks (``build``, ``source``) kept as they are.
    The tree's own files of the generated names are replaced; ``modules.devname``
    is left empty when the image has no ``/bin/kmod`` to read it. Errors name the
    tree ``label`` (default: its path).
    """
    generated = depmod.generate(modules, label)  # a tree it refuses is refused before any copying
    real, parent = _resolve_dir(tree, "lib/modules", epoch)
    assert parent.children is not None
    parent.children.pop(version, None)  # the image's own modules for this version: replaced
    top = new_dir(mtime=epoch)
    parent.children[version] = top
    stack: list[tuple[Path, Node]] = [(modules, top)]
    while stack:
        src, node = stack.pop()
        assert node.children is not None
        for entry in sorted(os.scandir(src), key=lambda e: e.name):
            if check_name(entry.name, entry.name) is not None:  # the rule every layer obeys
                raise InputError(
                    f"{entry.path}: a name the image cannot carry (NUL, CR, LF or over 255 bytes)",
                    reason=Reason.UNSAFE_NAME,
                )
            if node is top and entry.name in generated:
                continue
            if entry.is_symlink():
                link = os.readlink(entry.path)
                node.children[entry.name] = Node(
                    Inode(SYMLINK, 0, 0, 0o777, epoch, size=len(name_bytes(link)), target=link)
                )
            elif entry.is_dir():
                child = new_dir(mtime=epoch)
                node.children[entry.name] = child
                stack.append((Path(entry.path), child))
            elif entry.is_file():
                inode = Inode(REG, 0, 0, 0o644, epoch)
                spool.add_file(inode, Path(entry.path))
                node.children[entry.name] = Node(inode)
            else:
                raise InputError(f"{entry.path}: not a file, directory or symlink")
    assert top.children is not None
    kmod = _lookup(tree, KMOD_TOOL)
    if kmod is None or kmod.inode.type != REG:
        # without the tool the unit would run and fail: an empty list skips it
        generated["modules.devname"] = b""
    for name, data in generated.items():
        inode = Inode(REG, 0, 0, 0o644, epoch)
        spool.add_bytes(inode, data)
        top.children[name] = Node(inode)
    return f"/{real}/{version}"

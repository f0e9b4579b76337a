"""A kernel's modules tree on the host: found, checked, named, its modules read.

A modules tree is a kernel's ``lib/modules/<version>`` directory; its top holds
``modules.order`` (every kernel build writes it) or ``kernel/``. ``find_tree``
takes the directory a user names (the recipe's ``[kernel] modules``,
``kernel push --modules``) and returns the tree: the directory itself, or the
one tree below it where a package root, ``lib/modules`` or ``usr/lib`` holds it
(``_BELOW``). Several trees below, or none, is a ``ModulesTreeError`` naming
what was found. Symlinks are never followed on the way down (a package's
``lib -> usr/lib`` is found through ``usr/lib``).

Module files are read through ``read_module``: regular files only, never
through a symlink, decompressed (``.ko.xz``, ``.ko.zst``, ``.ko.gz``) within a
bound.
"""

from __future__ import annotations

import io
import lzma
import os
import re
import stat
import zlib
from pathlib import Path

import zstandard

from banger_build.errors import InputError, Reason
from banger_build.sources import SourceRefused, open_regular

#: What the top of a modules tree holds (one of them).
ORDER = "modules.order"
KERNEL_DIR = "kernel"
#: Where a tree may lie below the directory a user names, relative to it: the
#: directory is ``lib/modules`` (or ``modules`` of a ``lib``/``usr/lib``), or a
#: package root, usr-merged or not.
_BELOW = ("", "modules", "lib/modules", "usr/lib/modules")
#: The suffixes of a module file, the compressed ones as kmod names them.
MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")
#: Bytes of one module read (compressed, and again decompressed) to find its
#: ``vermagic=``: modules are KiBs to a few MiB; the bound stops a decompression
#: bomb named ``*.ko.xz``.
MAX_MODULE_BYTES = 64 << 20


class ModulesTreeError(Exception):
    """A directory that is not a modules tree and holds no single one below it."""

    def __init__(self, message: str, reason: Reason) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except OSError:
        return None


def is_tree(path: Path) -> bool:
    """``path`` is a directory with ``modules.order`` (a file) or ``kernel/`` at its top."""
    order, kernel = _lstat(path / ORDER), _lstat(path / KERNEL_DIR)
    return (order is not None and stat.S_ISREG(order.st_mode)) or (
        kernel is not None and stat.S_ISDIR(kernel.st_mode)
    )


def _real_dir(top: Path, rel: str) -> Path | None:
    """``top/rel`` when every component of ``rel`` is a directory, not a symlink."""
    path = top
    for part in rel.split("/") if rel else ():
        path = path / part
        st = _lstat(path)
        if st is None or not stat.S_ISDIR(st.st_mode):
            return None
    return path


def find_tree(path: Path) -> tuple[Path, str | None]:
    """The modules tree ``path`` names, and a note when it lies below ``path``."""
    if is_tree(path):
        return path, None
    found: list[str] = []
    for rel in _BELOW:
        base = _real_dir(path, rel)
        if base is None:
            continue
        try:
            entries = sorted(os.scandir(base), key=lambda e: e.name)
        except OSError:
            continue
        for entry in entries:
            if entry.is_dir(follow_symlinks=False) and is_tree(Path(entry.path)):
                found.append(f"{rel}/{entry.name}" if rel else entry.name)
    if len(found) == 1:
        tree = path / found[0]
        return tree, f"{path} is not a modules tree; using {found[0]} below it"
    if found:
        raise ModulesTreeError(
            f"{path} holds {len(found)} modules trees: {', '.join(found)}; name one of them",
            Reason.AMBIGUOUS_MODULES,
        )
    raise ModulesTreeError(
        f"{path} is not a kernel modules tree: a lib/modules/<version> directory holds "
        f"{ORDER} or {KERNEL_DIR}/ at its top, and none lies below it",
        Reason.NOT_A_MODULES_TREE,
    )


# -- the version --------------------------------------------------------------------

_VERSION_NAME = re.compile(r"\d+\.\d+[\w.+~-]*")


def modules_version(modules: Path) -> str:
    """The kernel version a ``lib/modules/<version>`` tree is for: its name when
    that looks like a version, else the ``vermagic=`` of one of its modules."""
    if _VERSION_NAME.fullmatch(modules.name):
        return modules.name
    for ko in module_files(modules):
        try:
            data = read_module(ko, MAX_MODULE_BYTES, truncate=True)
        except InputError:
            continue
        found = re.search(rb"vermagic=(\S+)", data)
        if found:
            return found.group(1).decode("ascii", "replace")
    raise InputError(
        f"{modules}: cannot tell the kernel version (name the directory after it, "
        "e.g. lib/modules/6.1.0-13-amd64)",
        reason=Reason.MODULES_VERSION,
    )


def module_files(root: Path) -> list[Path]:
    """Regular files named ``*.ko*`` under ``root``, sorted; symlinks never followed."""
    found: list[Path] = []
    stack = [root]
    while stack:
        directory = stack.pop()
        try:
            scan = list(os.scandir(directory))
        except OSError:
            continue
        for entry in scan:
            if entry.is_dir(follow_symlinks=False):
                stack.append(Path(entry.path))
            elif entry.is_file(follow_symlinks=False) and ".ko" in entry.name:  # *.ko*
                found.append(Path(entry.path))
    return sorted(found)


# -- reading a module ---------------------------------------------------------------


def read_module(ko: Path, limit: int, *, truncate: bool = False, name: str = "") -> bytes:
    """The ELF bytes of module file ``ko``, decompressed by its suffix. Past ``limit``
    bytes (compressed or not): the first ``limit`` with ``truncate``, else an error.
    Errors call it ``name`` (default: its path)."""
    shown = name or str(ko)
    try:
        fd = open_regular(ko, "kernel module")
    except SourceRefused as exc:
        raise InputError(f"{shown}: {exc.detail}", reason=exc.reason) from None
    try:
        with os.fdopen(fd, "rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise InputError(
            f"{shown}: cannot read it: {exc.strerror or exc}", reason=Reason.IO
        ) from exc
    try:
        if ko.name.endswith(".xz"):
            un = lzma.LZMADecompressor()
            data = un.decompress(data, max_length=limit + 1)
            complete = un.eof
        elif ko.name.endswith(".gz"):
            zun = zlib.decompressobj(16 + zlib.MAX_WBITS)
            data = zun.decompress(data, limit + 1)
            complete = zun.eof
        elif ko.name.endswith(".zst"):
            reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data))
            data = reader.read(limit + 1)
            complete = len(data) <= limit and reader.read(1) == b""
        else:
            complete = True
    except (lzma.LZMAError, zlib.error, zstandard.ZstdError) as exc:
        raise InputError(
            f"{shown}: cannot decompress it: {exc}", reason=Reason.INVALID_MODULES
        ) from None
    if len(data) > limit:
        if truncate:
            return data[:limit]
        raise InputError(
            f"{shown}: more than {limit >> 20} MiB decompressed (not a kernel module)",
            reason=Reason.INVALID_MODULES,
        )
    if not complete and not truncate:
        raise InputError(
            f"{shown}: its compressed stream is cut short", reason=Reason.INVALID_MODULES
        )
    return data
